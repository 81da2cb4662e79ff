"""Diagnostic: can the proxy's LLM learn the task's retrieval when vision is solved for it?

``python -m bench.proxy.oracle_probe LOG --steps N``

The visual tokens are replaced by oracle embeddings (a learned vector per shape × colour on the tokens
over objects, a "background" vector on a random ``--keep`` share of the others), so only the
language model (same widths and prompt as the proxy) has to learn: find the tokens of the named
shape and read their colour, count or side.  If this fails to leave the answer prior within the
steps the CPU budget allows, the end-to-end run cannot succeed either, whatever the vision tower
learns: that is what the training logs of the first attempts showed.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ptp_ros.proxy import proxy_words
from ptp_ros.vlm.llava_next import LlavaNextAdapter, LlavaNextOptions
from ptp_ros.vlm.tokenizer import BASE_WORDS

from .auxiliary import CLASSES
from .data import answer_logits, prefix_embeddings
from .train import SceneStream, build_model, scene_targets


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log", type=Path)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--per-type", type=int, default=3)
    ap.add_argument("--keep", type=float, default=0.1, help="share of background tokens shown")
    ap.add_argument("--text-width", type=int, default=128)
    ap.add_argument("--text-layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    words = list(dict.fromkeys([*BASE_WORDS, *proxy_words()]))
    model, processor = build_model(words, 0, dict(vision_width=32, vision_layers=2, text_width=args.text_width,
                                                  text_layers=args.text_layers))
    layout = LlavaNextAdapter(model, processor, LlavaNextOptions(llm_layer=0))  # for token boxes only
    model.train()
    oracle = torch.nn.Embedding(1 + len(CLASSES), args.text_width)
    params = [*model.model.language_model.parameters(), *model.lm_head.parameters(), *oracle.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    log = args.log.open("w")
    start, window = time.perf_counter(), []
    for step, item in enumerate(SceneStream(processor, "train", 500_000, args.steps, args.per_type)):
        target = scene_targets(layout, item)[0]
        keep = (target > 0) | (torch.rand(target.shape[0], generator=gen) < args.keep)
        feats = oracle(target.clamp(min=0)[keep])
        logits = answer_logits(model, prefix_embeddings(model, item.prefix_ids, feats)[None], item.suffix_ids,
                               processor.tokenizer.pad_token_id)
        loss = torch.nn.functional.cross_entropy(logits, item.answer_ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window.append(float((logits.argmax(-1) == item.answer_ids).float().mean()))
        if (step + 1) % 50 == 0:
            record = {"step": step + 1, "train_acc": round(sum(window) / len(window), 4), "loss": round(float(loss), 4),
                      "elapsed_s": round(time.perf_counter() - start, 1)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(json.dumps(record), flush=True)
            window = []


if __name__ == "__main__":
    main()
