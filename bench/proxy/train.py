"""Train the proxy LLaVA-NeXT end to end on CPU: ``python -m bench.proxy.train OUT_DIR``.

Every step renders a fresh training scene (so the model never sees an image twice), encodes it once
through the stock ``get_image_features`` (anyres tiles, unpadding, newlines) and scores all its
questions on one shared prefix pass.  The loss is cross-entropy on the single answer word.

A fraction of steps (``--global-only``) shows the model the global view alone, so that the
global-view-only accuracy reported later is what that view can resolve, not the failure of a model
that never saw it on its own.  Auxiliary heads (``auxiliary.py``, weight ``--aux``) stand in for the
vision pre-training a real LVLM starts from; they are not part of the saved checkpoint.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ptp_ros.proxy import make_questions, make_scene, proxy_words, split_seed
from ptp_ros.vlm.tiny import llava_next_processor, tiny_llava_next_config
from ptp_ros.vlm.tokenizer import BASE_WORDS, build_word_tokenizer

from ptp_ros.vlm.llava_next import LlavaNextAdapter

from .auxiliary import AuxiliaryHeads, auxiliary_loss, tile_targets, token_targets
from .data import answer_logits, encode_scene, prefix_embeddings

GLOBAL_TOKENS = 576  # the global view's 24×24 patches come first in LLaVA-NeXT's packed order


class SceneStream(IterableDataset):
    """Scenes ``split_seed(split, start + k)`` for k = 0, 1, …, encoded for the model."""

    def __init__(self, processor, split: str, start: int, count: int, per_type: int):
        self.processor, self.split, self.start, self.count, self.per_type = processor, split, start, count, per_type

    def __iter__(self):
        info = get_worker_info()
        workers, wid = (info.num_workers, info.id) if info else (1, 0)
        for k in range(wid, self.count, workers):
            scene = make_scene(split_seed(self.split, self.start + k))
            yield encode_scene(self.processor, scene, make_questions(scene, self.per_type), keep_scene=True)


def build_model(words: list[str], seed: int, widths: dict):
    from transformers import LlavaNextForConditionalGeneration

    tokenizer = build_word_tokenizer(words)
    config = tiny_llava_next_config(len(tokenizer), tokenizer.image_token_id, **widths)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, llava_next_processor(tokenizer, config.image_grid_pinpoints)


class FeatureLayerTap:
    """Keeps the output of the vision layer LLaVA reads features from (its [CLS] rows feed the aux head)."""

    def __init__(self, model):
        layers = model.model.vision_tower.encoder.layers
        self.hidden: torch.Tensor | None = None
        index = model.config.vision_feature_layer % (len(layers) + 1) - 1  # hidden_states[i] = output of layer i-1
        self._handle = layers[index].register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        self.hidden = output[0] if isinstance(output, tuple) else output


def scene_targets(layout_adapter: LlavaNextAdapter, item) -> tuple[torch.Tensor, torch.Tensor]:
    """Auxiliary targets of one scene: per packed token and per region (see auxiliary.py)."""
    side = layout_adapter._patches_per_side
    layout = layout_adapter._packed_layout(torch.zeros(item.pixel_values.shape[1], side * side), item.image_sizes[0])
    grid = layout_adapter._grid_shape(item.image_sizes[0])
    token_boxes, region_boxes = layout_adapter._boxes(layout, grid, item.scene.image.shape[:2])
    return (token_targets(token_boxes, layout[:, 0].long(), item.scene.objects),
            tile_targets(region_boxes, item.scene.objects))


def scene_loss(model, item, pad_id: int, tokens: str = "all", aux=None, focus_keep: float = 0.15,
               gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Answer cross-entropy (+ the auxiliary losses when ``aux`` = (heads, tap, layout adapter, weight)).

    ``tokens`` is what the LLM reads: "all", "global" (the global view only) or "focus" (the tokens on
    objects plus a random ``focus_keep`` of the rest: a short-sequence warm-up in which the LLM learns
    to retrieve objects before it must find them among thousands of tokens; needs ``aux``).
    """
    feats = model.model.get_image_features(pixel_values=item.pixel_values, image_sizes=item.image_sizes,
                                           return_dict=True).pooler_output[0]
    targets = scene_targets(aux[2], item) if aux is not None else None
    seen = feats
    if tokens == "global":
        seen = feats[:GLOBAL_TOKENS]
    elif tokens == "focus":
        keep = (targets[0] > 0) | (torch.rand(feats.shape[0], generator=gen) < focus_keep)
        seen = feats[keep]
    logits = answer_logits(model, prefix_embeddings(model, item.prefix_ids, seen)[None], item.suffix_ids, pad_id)
    loss = torch.nn.functional.cross_entropy(logits, item.answer_ids)
    if aux is not None:
        heads, tap, _, weight = aux
        loss = loss + weight * auxiliary_loss(heads, feats, tap.hidden[:, 0], *targets)
    return loss, (logits.argmax(-1) == item.answer_ids).float()


@torch.no_grad()
def evaluate(model, items, pad_id: int) -> dict:
    model.eval()
    full, glob = [], []
    for item in items:
        full.append(scene_loss(model, item, pad_id, "all")[1])
        glob.append(scene_loss(model, item, pad_id, "global")[1])
    model.train()
    return {"val_acc": round(float(torch.cat(full).mean()), 4),
            "val_acc_global_only": round(float(torch.cat(glob).mean()), 4)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=3e-4,
                    help="2e-3 (the first attempts) keeps even the oracle probe on the answer prior")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--per-type", type=int, default=3, help="questions of each type per training scene")
    ap.add_argument("--global-only", type=float, default=0.1, help="fraction of steps with the global view only")
    ap.add_argument("--vision-width", type=int, default=96)
    ap.add_argument("--vision-layers", type=int, default=4)
    ap.add_argument("--text-width", type=int, default=128)
    ap.add_argument("--text-layers", type=int, default=4)
    ap.add_argument("--val-scenes", type=int, default=24)
    ap.add_argument("--val-every", type=int, default=250)
    ap.add_argument("--init-from", type=Path, default=None, help="continue from this checkpoint (a stage-1 run)")
    ap.add_argument("--first-scene", type=int, default=0, help="index of the first training scene")
    ap.add_argument("--focus", type=float, default=0.0,
                    help="share of the run in which the LLM reads only object tokens + --focus-keep of the rest")
    ap.add_argument("--focus-keep", type=float, default=0.15)
    ap.add_argument("--aux", type=float, default=1.0, help="weight of the auxiliary vision objectives (0: off)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-minutes", type=float, default=45.0, help="stop (and save) when the time is up")
    ap.add_argument("--log", type=Path, default=None, help="JSON-lines log (default: OUT/train_log.jsonl)")
    args = ap.parse_args(argv)
    if args.focus > 0 and args.aux <= 0:
        ap.error("--focus needs the auxiliary targets (--aux > 0) to know which tokens are on objects")
    torch.set_num_threads(args.threads)
    words = list(dict.fromkeys([*BASE_WORDS, *proxy_words()]))
    widths = dict(vision_width=args.vision_width, vision_layers=args.vision_layers, text_width=args.text_width,
                  text_layers=args.text_layers)
    model, processor = build_model(words, args.seed, widths)
    if args.init_from is not None:
        from transformers import AutoProcessor, LlavaNextForConditionalGeneration

        model = LlavaNextForConditionalGeneration.from_pretrained(args.init_from, local_files_only=True)
        processor = AutoProcessor.from_pretrained(args.init_from, local_files_only=True)
    pad_id = processor.tokenizer.pad_token_id
    params = sum(p.numel() for p in model.parameters())
    heads = AuxiliaryHeads(args.text_width, args.vision_width)
    aux = (heads, FeatureLayerTap(model), LlavaNextAdapter(model, processor), args.aux) if args.aux > 0 else None
    opt = torch.optim.AdamW([*model.parameters(), *heads.parameters()], lr=args.lr, weight_decay=0.01,
                            betas=(0.9, 0.98))
    start = time.perf_counter()

    def progress(step: int) -> float:
        """Share of the run done: by steps, or by wall time when the CPU is slower than planned (shared
        machines), so the cosine schedule always completes."""
        return min(1.0, max(step / args.steps, (time.perf_counter() - start) / (60 * args.max_minutes)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup) * (
        0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress(s)))))
    val = list(SceneStream(processor, "val", 0, args.val_scenes, 2))
    stream = DataLoader(SceneStream(processor, "train", args.first_scene, args.steps, args.per_type), batch_size=None,
                        num_workers=1, prefetch_factor=4)
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.log or args.out / "train_log.jsonl"
    log = log_path.open("w")

    def write(record: dict) -> None:
        log.write(json.dumps(record) + "\n")
        log.flush()
        print(json.dumps(record), flush=True)

    write({"event": "start", "params": params, "args": {k: str(v) for k, v in vars(args).items()},
           "cpu_threads": torch.get_num_threads(), "cpus": os.cpu_count()})
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    run_loss, run_acc, run_n = 0.0, 0.0, 0
    for step, item in enumerate(stream):
        global_only = bool(torch.rand((), generator=gen) < args.global_only)
        tokens = "global" if global_only else "focus" if progress(step) < args.focus else "all"
        loss, correct = scene_loss(model, item, pad_id, tokens, aux, args.focus_keep, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*model.parameters(), *heads.parameters()], 1.0)
        opt.step()
        sched.step()
        if not global_only:
            run_loss, run_acc, run_n = run_loss + loss.item(), run_acc + correct.mean().item(), run_n + 1
        if (step + 1) % 25 == 0:
            write({"step": step + 1, "tokens": tokens, "loss": round(run_loss / max(run_n, 1), 4),
                   "train_acc": round(run_acc / max(run_n, 1), 4),
                   "lr": round(sched.get_last_lr()[0], 6), "elapsed_s": round(time.perf_counter() - start, 1)})
            run_loss, run_acc, run_n = 0.0, 0.0, 0
        out_of_time = progress(step + 1) >= 1.0 and step + 1 < args.steps
        if (step + 1) % args.val_every == 0 or step + 1 == args.steps or out_of_time:
            write({"step": step + 1, **evaluate(model, val, pad_id),
                   "elapsed_s": round(time.perf_counter() - start, 1)})
            model.eval()
            model.save_pretrained(args.out, safe_serialization=True)
            processor.save_pretrained(args.out)
            model.train()
        if out_of_time:
            write({"event": "time limit", "step": step + 1})
            break
    write({"event": "done", "steps": step + 1, "train_seconds": round(time.perf_counter() - start, 1)})


if __name__ == "__main__":
    main()
