"""Cache oracle targets + tokenized questions of scenes: python cache.py SPLIT START COUNT OUT.pt (PYTHONPATH=repo root)."""
import sys, torch
torch.set_num_threads(1)
from ptp_ros.proxy import proxy_words
from ptp_ros.vlm.llava_next import LlavaNextAdapter, LlavaNextOptions
from ptp_ros.vlm.tokenizer import BASE_WORDS
from bench.proxy.train import SceneStream, build_model, scene_targets
words = list(dict.fromkeys([*BASE_WORDS, *proxy_words()]))
model, processor = build_model(words, 0, dict(vision_width=32, vision_layers=2, text_width=128, text_layers=4))
layout = LlavaNextAdapter(model, processor, LlavaNextOptions(llm_layer=0))
split, start, n, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
data = []
for item in SceneStream(processor, split, start, n, 3):
    data.append(dict(target=scene_targets(layout, item)[0], prefix=item.prefix_ids, suffix=item.suffix_ids,
                     answer=item.answer_ids, qtype=[q.qtype for q in item.questions],
                     objects=[(o.shape, o.colour, o.centre, o.box) for o in item.scene.objects],
                     W=item.scene.image.shape[1]))
torch.save(data, out)
