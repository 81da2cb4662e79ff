"""Diagnostic: can the proxy's LLM learn the task's retrieval when vision is solved for it?

``python -m bench.proxy.oracle_probe LOG --steps N``

The visual tokens are replaced by oracle embeddings (a learned vector per shape × colour on the tokens
over objects, a "background" vector on a random ``--keep`` share of the others), so only the
language model (same widths and prompt as the proxy) has to learn: find the tokens of the named
shape and read their colour, count or side.  If this fails to leave the answer prior within the
steps the CPU budget allows, the end-to-end run cannot succeed either, whatever the vision tower
learns.

Finding (docs/accuracy/README.md): at the old default ``--lr 2e-3`` (also 5e-3, 1e-2) the probe stays
on the answer prior; at 3e-4 with a warm-up, colour questions alone reach 0.965 on validation within
2000 steps.  ``--types`` restricts the question types (a curriculum); the log has accuracy per type.
Note that the oracle carries no position, so ``location`` questions are unanswerable here by design.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
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
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--types", default="colour,presence,count,location", help="question types trained on")
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
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(args.warmup, 1)))
    types = set(args.types.split(","))
    gen = torch.Generator().manual_seed(0)
    log = args.log.open("w")
    start, window = time.perf_counter(), defaultdict(list)
    for step, item in enumerate(SceneStream(processor, "train", 500_000, args.steps, args.per_type)):
        chosen = [i for i, q in enumerate(item.questions) if q.qtype in types]
        if chosen:
            target = scene_targets(layout, item)[0]
            keep = (target > 0) | (torch.rand(target.shape[0], generator=gen) < args.keep)
            feats = oracle(target.clamp(min=0)[keep])
            answers = item.answer_ids[chosen]
            logits = answer_logits(model, prefix_embeddings(model, item.prefix_ids, feats)[None],
                                   [item.suffix_ids[i] for i in chosen], processor.tokenizer.pad_token_id)
            loss = torch.nn.functional.cross_entropy(logits, answers)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            for i, ok in zip(chosen, (logits.argmax(-1) == answers).tolist()):
                window["train_acc"].append(ok)
                window[f"train_acc_{item.questions[i].qtype}"].append(ok)
        if (step + 1) % 50 == 0 and window:
            record = {"step": step + 1, **{k: round(sum(v) / len(v), 4) for k, v in window.items()},
                      "loss": round(float(loss), 4), "elapsed_s": round(time.perf_counter() - start, 1)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(json.dumps(record), flush=True)
            window = defaultdict(list)


if __name__ == "__main__":
    main()
