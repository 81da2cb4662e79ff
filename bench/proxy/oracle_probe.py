"""Diagnostic: can the proxy's LLM learn the task when vision is solved for it?

``python -m bench.proxy.oracle_probe LOG --steps N [--attention 0]``

The visual tokens are replaced by oracle embeddings: a learned vector per shape × colour on the tile
token holding each object, a colour vector plus a left/right vector on its global-view token (the
global view resolves colour and place, not shape), and one background vector for every other token
(a random ``--keep`` share of them is shown, as in stage 2's focus phase).  Only the LLM, with the
same widths, prompt and loss as stage 2 of ``train.py``, has to learn.

``--attention 0`` trains on the answer loss alone, for comparison (what it showed: docs/accuracy/training.md).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from ptp_ros.proxy import COLOURS, proxy_words
from ptp_ros.testing import BASE_WORDS
from ptp_ros.vlm.llava_next import LlavaNextAdapter, LlavaNextOptions

from .auxiliary import CLASSES
from .train import LanguageStage, SceneLayout, SceneStream, build_model, shown_tokens


class Oracle(nn.Module):
    """Perfect vision features: what the tokens hold, as learned embeddings."""

    def __init__(self, width: int):
        super().__init__()
        self.tile = nn.Embedding(1 + len(CLASSES), width)  # 0: background
        self.glob = nn.Embedding(1 + len(COLOURS), width)
        self.side = nn.Embedding(2, width)
        self.newline = nn.Parameter(torch.randn(width))

    def forward(self, layout: SceneLayout) -> torch.Tensor:
        classes = layout.tokens.clamp(min=0)
        glob = layout.overview
        colour = torch.where(classes > 0, (classes - 1) % len(COLOURS) + 1, 0)
        feats = torch.where(glob[:, None], self.glob(colour) + self.side(layout.sides.clamp(min=0)), self.tile(classes))
        return torch.where((layout.region < 0)[:, None], self.newline.expand_as(feats), feats)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log", type=Path)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--attention", type=float, default=1.0, help="weight of the attention supervision (0: off)")
    ap.add_argument("--per-type", type=int, default=8)
    ap.add_argument("--keep", type=float, default=0.1, help="share of background tokens shown")
    ap.add_argument("--text-width", type=int, default=128)
    ap.add_argument("--text-layers", type=int, default=4)
    ap.add_argument("--val-scenes", type=int, default=40)
    ap.add_argument("--val-every", type=int, default=250)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    words = list(dict.fromkeys([*BASE_WORDS, *proxy_words()]))
    model, processor = build_model(
        words, 0, dict(vision_width=32, vision_layers=1, text_width=args.text_width, text_layers=args.text_layers)
    )
    adapter = LlavaNextAdapter(model, processor, LlavaNextOptions(llm_layer=0))  # token layout only
    oracle = Oracle(args.text_width)
    stage = LanguageStage(model, processor, hop_layer=0, retrieval_layer=1, weight=args.attention)
    params = [*model.model.language_model.parameters(), *model.lm_head.parameters(), *oracle.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    val = [(item, SceneLayout(adapter, item)) for item in SceneStream(processor, "val", 0, args.val_scenes, 2)]
    gen = torch.Generator().manual_seed(0)
    model.train()
    log = args.log.open("w")
    start, window = time.perf_counter(), defaultdict(list)
    for step, item in enumerate(SceneStream(processor, "train", 500_000, args.steps, args.per_type)):
        layout = SceneLayout(adapter, item)
        loss, correct = stage(item, layout, oracle(layout), shown_tokens(layout, "focus", args.keep, gen), True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        window["train_acc"] += correct.tolist()
        if (step + 1) % args.val_every == 0:
            model.eval()
            hits = defaultdict(list)
            with torch.no_grad():
                for v, v_layout in val:
                    _, ok = stage(v, v_layout, oracle(v_layout), shown_tokens(v_layout, "focus", args.keep, gen), False)
                    for q, o in zip(v.questions, ok.tolist()):
                        hits["val_acc"].append(o)
                        hits[f"val_acc_{q.qtype}"].append(o)
            model.train()
            record = {
                "step": step + 1,
                "attention": args.attention,
                **{k: round(sum(v) / len(v), 4) for k, v in {**window, **hits}.items()},
                "elapsed_s": round(time.perf_counter() - start, 1),
            }
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(json.dumps(record), flush=True)
            window = defaultdict(list)


if __name__ == "__main__":
    main()
