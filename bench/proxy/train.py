"""Train a proxy model on CPU in two stages: ``python -m bench.proxy.train OUT_DIR [--family qwen2_5_vl]``.

Families: LLaVA-NeXT (the built-in default model), Qwen2.5-VL (``--family qwen2_5_vl``: no tiles, no
global view, no [CLS]; it is trained at random lower resolutions too, ``--low-res``, as the real model is
trained over a range of resolutions, so that the ``max_pixels`` down-scaling baseline is measured on a
model that has seen small images) and Qwen3-VL (``--family qwen3_vl``: as Qwen2.5-VL, plus DeepStack: its
feature sets reach the first LLM layers in stage 2, and their mergers learn there with the LLM; the tower
blocks they read stay frozen).

Stage 1, vision (``--vision-minutes``): the vision tower and projector learn to see on *crowded*
scenes (``--crowd`` objects each, so a forward pass yields a hundred labelled patches instead of six)
through the auxiliary heads of ``auxiliary.py``; no language model runs.

Stage 2, language (the rest of ``--max-minutes``): the vision tower and projector are frozen (so
the [CLS] attention PTP reads is stage 1's), and the LLM learns the task on fresh task scenes, every
scene encoded once and asked ``--per-type`` questions of each type on one shared prefix pass.  The
loss is cross-entropy on the answer word plus attention supervision (``attention_aux.py``): one layer
gathers the question's shape and colour words into the answer position, the next retrieves the
objects they name.  A share of steps (``--global-only``) shows only the global view, so that
global-only accuracy measures what that view can resolve; the first ``--focus`` of the stage shows
the object tokens plus a random ``--focus-keep`` of the rest (short sequences, fast steps).

Only the stock ``*ForConditionalGeneration`` and its processor are saved.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ptp_ros.proxy import COLOURS, SHAPES, make_questions, make_scene, proxy_words, split_seed
from ptp_ros.proxy.scenes import PLURALS, SIDES
from ptp_ros.pruning import NO_REGION
from ptp_ros.testing import BASE_WORDS
from ptp_ros.testing.common import FIXTURES, random_model
from ptp_ros.vlm.base import PreparedInput
from ptp_ros.vlm.families import ADAPTERS
from ptp_ros.vlm.qwen2_5_vl import max_pixels_for_tokens, resolution_kwargs

from .attention_aux import AnswerAttentionTap, retrieval_loss, wanted_attention
from .auxiliary import AuxiliaryHeads, auxiliary_loss, object_tokens, side_targets, tile_targets, token_targets
from .data import (
    answer_logits,
    deepstack_prefix_inputs,
    encode_scene,
    kept_positions,
    pad_suffixes,
    prefix_embeddings,
)

SUPERVISED_HEADS = 3  # retrieval heads supervised (colour/location, count, presence)
#: Visual-token counts a ``--low-res`` scene is read at (the benchmark's ratios of ~1 250 tokens and more).
LOW_RES_TOKENS = (48, 64, 96, 128, 160, 192, 256, 384, 512, 640)


@dataclass(frozen=True)
class Family:
    """What training needs to know of a model family beyond its adapter and its tiny fixture (both from
    the shared registries: ``ptp_ros.vlm.families.ADAPTERS``, ``ptp_ros.testing.common.FIXTURES``)."""

    model_type: str
    has_cls: bool  # [CLS] states for the [CLS] head (and a global view)

    def configure(self, words: list[str], widths: dict, max_tokens: int | None = None) -> tuple:
        """(model class, config, processor) at ``widths`` (vision_width, vision_layers, text_width, text_layers),
        the processor capped at ``max_tokens`` visual tokens (None: the tiny fixture's own cap)."""
        model_class, config, processor = FIXTURES[self.model_type].parts(words, **widths)
        if max_tokens is not None:
            size = resolution_kwargs(processor.image_processor, token_pixels(processor, max_tokens))["size"]
            processor.image_processor.size = size
        return model_class, config, processor

    @property
    def adapter_class(self) -> type:
        return ADAPTERS[self.model_type]


#: The families the proxy task trains (``FeatureLayerTap`` and ``image_features`` read LLaVA-NeXT's, Qwen2.5-VL's
#: and Qwen3-VL's towers; another family joins with its own ``has_cls`` here once they read its tower too).
FAMILIES = {
    family.model_type: family
    for family in (
        Family("llava_next", has_cls=True),
        Family("qwen2_5_vl", has_cls=False),
        Family("qwen3_vl", has_cls=False),
    )
}
#: Parameters stage 2 trains: the LLM, and Qwen3-VL's DeepStack mergers (they feed the LLM; stage 1's heads
#: read only the projector's output, so they learn nothing there, and the tower blocks they read stay frozen).
LANGUAGE_SIDE = ("model.language_model.", "lm_head.", "model.visual.deepstack_merger_list.")


class SceneStream(IterableDataset):
    """Scenes ``split_seed(split, start + k)`` for k = 0, 1, …, encoded for the model (``crowd`` > 0:
    crowded vision pre-training scenes without questions; ``low_res``: the share read at a random lower
    resolution from ``LOW_RES_TOKENS``, ``max_pixels``: every scene at that resolution)."""

    def __init__(
        self,
        processor,
        split: str,
        start: int,
        count: int,
        per_type: int,
        crowd: int = 0,
        low_res: float = 0.0,
        max_pixels: int | None = None,
    ):
        self.processor, self.split, self.start, self.count = processor, split, start, count
        self.per_type, self.crowd, self.low_res, self.max_pixels = per_type, crowd, low_res, max_pixels

    def _resolution(self, seed: int) -> dict:
        rng = random.Random(seed)
        max_pixels = self.max_pixels
        if rng.random() < self.low_res:
            max_pixels = token_pixels(self.processor, rng.choice(LOW_RES_TOKENS))
        return {} if max_pixels is None else resolution_kwargs(self.processor.image_processor, max_pixels)

    def __iter__(self):
        info = get_worker_info()
        workers, wid = (info.num_workers, info.id) if info else (1, 0)
        for k in range(wid, self.count, workers):
            seed = split_seed(self.split, self.start + k)
            scene = make_scene(seed, crowd=self.crowd)
            questions = [] if self.crowd else make_questions(scene, self.per_type)
            yield encode_scene(self.processor, scene, questions, keep_scene=True, **self._resolution(seed))


def token_pixels(processor, tokens: int) -> int:
    """``max_pixels`` for at most ``tokens`` visual tokens of the processor's patch and merge sizes."""
    image_processor = processor.image_processor
    return max_pixels_for_tokens(tokens, image_processor.patch_size, image_processor.merge_size)


def build_model(words: list[str], seed: int, widths: dict, family: str = "llava_next", max_tokens: int | None = None):
    model_class, config, processor = FAMILIES[family].configure(words, widths, max_tokens)
    return random_model(model_class, config, processor.tokenizer, seed), processor


class FeatureLayerTap:
    """Keeps the output of the vision layer LLaVA reads features from (its [CLS] rows feed the aux head)."""

    def __init__(self, model):
        layers = model.model.vision_tower.encoder.layers
        self.hidden: torch.Tensor | None = None
        index = model.config.vision_feature_layer % (len(layers) + 1) - 1  # hidden_states[i] = output of layer i-1
        self._handle = layers[index].register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        self.hidden = output[0] if isinstance(output, tuple) else output


_GEOMETRY: dict[tuple, tuple] = {}


def token_geometry(adapter, item) -> tuple:
    """(region [N], token boxes [N, 4], region boxes [R, 4], global-view mask [N]) of an encoded scene,
    from the adapter itself (one encode per distinct image geometry, then cached)."""
    size = tuple(item.scene.image.shape[:2])
    key = (
        type(adapter).__name__,
        size,
        *(tuple(v.shape) for v in item.pixel_inputs.values()),
        *(tuple(v.flatten().tolist()) for k, v in item.pixel_inputs.items() if k != "pixel_values"),
    )
    if key not in _GEOMETRY:
        visual = adapter.encode(PreparedInput(item.inputs, (size,), ""))
        region = visual.scores.region
        overview = (
            region == visual.scores.global_region
            if visual.scores.global_region is not None
            else torch.zeros_like(region, dtype=torch.bool)
        )
        _GEOMETRY[key] = (region, visual.token_boxes, visual.region_boxes, overview)
    return _GEOMETRY[key]


class SceneLayout:
    """Where every visual token of a scene lies, which tokens hold its objects, and the LLM positions."""

    def __init__(self, adapter, item):
        self.region, token_boxes, region_boxes, self.overview = token_geometry(adapter, item)
        objects, (height, width) = item.scene.objects, item.scene.image.shape[:2]
        detail = (self.region != NO_REGION) & ~self.overview
        self.objects = object_tokens(token_boxes, detail, self.overview, objects)
        self.tokens = token_targets(self.objects, self.region, objects, token_boxes)
        self.tiles = tile_targets(region_boxes, objects)
        self.sides = side_targets(token_boxes, self.overview if self.overview.any() else detail, width)
        self.positions = adapter.rope_positions(PreparedInput(item.inputs, ((height, width),), ""))


def image_features(model, item) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The visual tokens [N, D] of an encoded scene and its DeepStack feature sets ([N, D] each; none but
    Qwen3-VL's)."""
    encoded = model.model.get_image_features(**item.pixel_inputs, return_dict=True)
    return encoded.pooler_output[0], [level[0] for level in getattr(encoded, "deepstack_features", None) or []]


def features(model, item) -> torch.Tensor:
    return image_features(model, item)[0]


def shown_tokens(layout: SceneLayout, tokens: str, focus_keep: float, gen: torch.Generator) -> torch.Tensor:
    """[N] bool: the packed tokens the LLM reads ("all", "global" or "focus": the tokens holding objects
    plus a random ``focus_keep`` of the rest)."""
    n = layout.region.shape[0]
    if tokens == "global":
        return layout.overview
    if tokens == "focus":
        return (layout.tokens > 0) | (torch.rand(n, generator=gen) < focus_keep)
    return torch.ones(n, dtype=torch.bool)


def question_key_ids(tokenizer) -> set[int]:
    """Ids of the words that say what a question is about (shapes, their plurals, colours)."""
    return set(tokenizer.convert_tokens_to_ids([*SHAPES, *PLURALS.values(), *COLOURS]))


class LanguageStage:
    """Stage 2's loss: answer cross-entropy, end-of-answer cross-entropy (the token after the answer word
    is the tokenizer's end of sequence, so that generation stops by itself) + attention supervision of
    two LLM layers."""

    def __init__(
        self,
        model,
        processor,
        hop_layer: int,
        retrieval_layer: int,
        weight: float,
        side_layer: int | None = None,
        side_weight: float = 0.0,
    ):
        lm = model.model.language_model
        self.model, self.processor, self.weight = model, processor, weight
        self.pad_id = processor.tokenizer.pad_token_id
        self.eos_id = processor.tokenizer.eos_token_id
        self.hop = AnswerAttentionTap(lm, hop_layer)
        self.retrieval = AnswerAttentionTap(lm, retrieval_layer)
        self.key_ids = question_key_ids(processor.tokenizer)
        # representation supervision: the answer position's state entering ``side_layer`` says the asked
        # object's side (location questions), read by a linear head that is not saved
        self.side = AnswerAttentionTap(lm, side_layer) if side_weight > 0 and side_layer is not None else None
        self.side_head = torch.nn.Linear(model.config.text_config.hidden_size, len(SIDES))
        self.side_weight = side_weight

    def __call__(
        self,
        item,
        layout: SceneLayout,
        feats: torch.Tensor,
        shown: torch.Tensor,
        supervise: bool,
        deepstack: list[torch.Tensor] = (),
    ):
        for tap in (self.hop, self.retrieval, self.side):
            if tap is not None:
                tap.reset()
        prefix = prefix_embeddings(self.model, item.prefix_ids, feats[shown])[None]
        kept = torch.nonzero(shown).squeeze(1)
        positions = kept_positions(layout.positions, item.prefix_ids.shape[0], shown.shape[0], kept)
        answered = [torch.cat([s, a.view(1)]) for s, a in zip(item.suffix_ids, item.answer_ids)]
        visual_inputs = deepstack_prefix_inputs(list(deepstack), item.prefix_ids.shape[0], [kept])
        logits, stop = answer_logits(
            self.model, prefix, answered, self.pad_id, positions, last_two=True, visual_inputs=visual_inputs
        )
        loss = torch.nn.functional.cross_entropy(logits, item.answer_ids)
        loss = loss + torch.nn.functional.cross_entropy(stop, torch.full_like(item.answer_ids, self.eos_id))
        correct = logits.argmax(-1) == item.answer_ids
        if not supervise or self.weight <= 0:
            return loss, correct
        ids, last = pad_suffixes(answered, self.pad_id)
        last = last - 1  # the answer position, before the answer word
        position = torch.full_like(layout.region, -1)
        position[shown] = item.prefix_ids.shape[0] + torch.arange(int(shown.sum()))
        hop, wanted = wanted_attention(
            item.questions,
            item.scene.objects,
            layout.objects,
            position,
            ids,
            self.key_ids,
            prefix.shape[1],
            SUPERVISED_HEADS,
        )
        attention = self.retrieval.answer_attention(last)
        supervision = retrieval_loss(self.hop.answer_attention(last)[:, 0], hop) + sum(
            retrieval_loss(attention[:, h], wanted[:, h]) for h in range(SUPERVISED_HEADS)
        )
        return loss + self.weight * supervision + self.side_weight * self._side_loss(item, last), correct

    def _side_loss(self, item, last: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the side head on the answer position's state entering ``side_layer``, over the
        location questions (0 when there are none or the head is off)."""
        asked = [i for i, q in enumerate(item.questions) if q.qtype == "location"]
        if self.side is None or not asked:
            return torch.zeros(())
        state = self.side.calls[-1][0]  # the suffix pass: [Q, S, D]
        rows = torch.tensor(asked)
        target = torch.tensor([SIDES.index(item.questions[i].answer) for i in asked])
        return torch.nn.functional.cross_entropy(self.side_head(state[rows, last[rows]]), target)


@torch.no_grad()
def evaluate(stage: LanguageStage, items: list[tuple], tag: str = "val_acc") -> dict:
    """Validation accuracy with all tokens and, where the model has one, with the global view only,
    overall and per type (``items``: (encoded scene, its SceneLayout) pairs, laid out once per run)."""
    stage.model.eval()
    hits: dict[str, list] = defaultdict(list)
    for item, layout in items:
        feats, deepstack = image_features(stage.model, item)
        views = (("all", tag), ("global", f"{tag}_global_only")) if layout.overview.any() else (("all", tag),)
        for tokens, name in views:
            shown = shown_tokens(layout, tokens, 0.0, None)
            _, correct = stage(item, layout, feats, shown, supervise=False, deepstack=deepstack)
            hits[name] += correct.tolist()
            if tokens == "all":
                for q, ok in zip(item.questions, correct.tolist()):
                    hits[f"{tag}_{q.qtype}"].append(ok)
    stage.model.train()
    return {k: round(sum(v) / len(v), 4) for k, v in hits.items()}


def cosine(progress: float, warmup: float) -> float:
    """Learning-rate factor: linear warm-up over the first ``warmup`` share, then cosine to 5 %."""
    if progress < warmup:
        return max(progress / warmup, 0.01)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (progress - warmup) / (1 - warmup)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--family", choices=tuple(FAMILIES), default="llava_next")
    ap.add_argument("--max-minutes", type=float, default=44.0, help="whole run, both stages; saves and stops")
    ap.add_argument("--vision-minutes", type=float, default=12.0)
    ap.add_argument("--vision-lr", type=float, default=1e-3)
    ap.add_argument("--crowd", type=int, default=120, help="objects per vision pre-training scene")
    ap.add_argument(
        "--lr",
        type=float,
        default=3e-4,
        help="LLM learning rate (higher rates such as 2e-3 keep the 4×128 LLM on the answer prior)",
    )
    ap.add_argument("--per-type", type=int, default=8, help="questions of each type per training scene")
    ap.add_argument(
        "--global-only",
        type=float,
        default=0.1,
        help="share of stage-2 steps with the global view only (a family without one: none)",
    )
    ap.add_argument(
        "--low-res",
        type=float,
        default=None,
        help="share of scenes read at a random lower resolution (default: 0.3 for qwen2_5_vl and qwen3_vl, "
        "whose processors take any resolution; 0 for llava_next)",
    )
    ap.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="the processor's cap in visual tokens, for a family that reads any resolution (default: its tiny "
        "fixture's: 1280 for qwen2_5_vl, as its proxy was trained; 640 for qwen3_vl, so pass 1280 for a proxy "
        "read like the Qwen2.5-VL one, ~1 250 tokens a scene)",
    )
    ap.add_argument("--focus", type=float, default=0.3, help="share of stage 2 reading object tokens + --focus-keep")
    ap.add_argument("--focus-keep", type=float, default=0.1)
    ap.add_argument("--attention", type=float, default=1.0, help="weight of the attention supervision (0: off)")
    ap.add_argument(
        "--hop-layer",
        type=int,
        default=6,
        help="LLM layer whose answer row is supervised to gather the question's words; keep it deeper than any "
        "layer a selector of the report reads (FastV and PTP in the LLM read layer K-1)",
    )
    ap.add_argument("--retrieval-layer", type=int, default=7, help="LLM layer supervised to retrieve the objects")
    ap.add_argument(
        "--side-layer",
        type=int,
        default=8,
        help="LLM layer whose input state at the answer position a linear head (not saved) reads the asked "
        "object's side from, on location questions: representation supervision, deeper than any layer a row reads",
    )
    ap.add_argument("--side-weight", type=float, default=0.0, help="weight of the side head's loss (0: off)")
    ap.add_argument(
        "--vision-from",
        type=Path,
        default=None,
        help="a trained checkpoint of the same family and vision width whose vision tower and projector are "
        "taken (frozen) instead of running stage 1",
    )
    ap.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="a trained checkpoint of the same family and widths whose every weight (the LLM too) starts stage 2, "
        "which runs a fresh schedule over it: training a shipped model further",
    )
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt (same arguments)")
    ap.add_argument("--checkpoint-every", type=int, default=100, help="stage-2 steps between resumable checkpoints")
    ap.add_argument("--vision-width", type=int, default=96)
    ap.add_argument("--vision-layers", type=int, default=4)
    ap.add_argument("--text-width", type=int, default=128)
    ap.add_argument("--text-layers", type=int, default=12)
    ap.add_argument("--val-scenes", type=int, default=24)
    ap.add_argument("--val-every", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="what --max-minutes and --vision-minutes count: wall-clock time, or this process's CPU time / "
        "--threads (a run that shares the cores then gets the steps of an unshared one, taking longer)",
    )
    ap.add_argument("--log", type=Path, default=None, help="JSON-lines log (default: OUT/train_log.jsonl)")
    args = ap.parse_args(argv)
    if not 0 <= args.hop_layer < args.retrieval_layer < args.text_layers:
        ap.error("need 0 <= --hop-layer < --retrieval-layer < --text-layers")
    if args.side_weight and not args.retrieval_layer < args.side_layer < args.text_layers:
        ap.error("need --retrieval-layer < --side-layer < --text-layers")
    if args.max_tokens is not None and (
        args.max_tokens < 1 or not FAMILIES[args.family].adapter_class.supports_downscaling
    ):
        ap.error(f"--max-tokens needs a positive count and a family that reads any resolution, not {args.family}")
    if args.vision_from and args.init_from:
        ap.error("--init-from already takes the vision tower: drop --vision-from")
    torch.set_num_threads(args.threads)
    words = list(dict.fromkeys([*BASE_WORDS, *proxy_words()]))
    widths = dict(
        vision_width=args.vision_width,
        vision_layers=args.vision_layers,
        text_width=args.text_width,
        text_layers=args.text_layers,
    )
    family = FAMILIES[args.family]
    low_res = args.low_res if args.low_res is not None else 0.3 if family.adapter_class.supports_downscaling else 0.0
    global_only = args.global_only if family.has_cls else 0.0
    model, processor = build_model(words, args.seed, widths, args.family, args.max_tokens)
    adapter = family.adapter_class(model, processor)
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = Checkpoint(args.out / "checkpoint.pt")
    state = checkpoint.load() if args.resume else None
    if args.resume and state is None:
        ap.error(f"--resume: no {checkpoint.path}")
    log = (args.log or args.out / "train_log.jsonl").open("a" if state else "w")
    clock = time.perf_counter if args.clock == "wall" else lambda: time.process_time() / args.threads
    start = clock() - (state["elapsed_s"] if state else 0.0)

    def elapsed() -> float:
        return clock() - start

    launched = time.perf_counter()

    def write(record: dict) -> None:
        # on the CPU clock, also the wall time since this process started (a resume starts it again)
        wall = {} if args.clock == "wall" else {"wall_s": round(time.perf_counter() - launched, 1)}
        log.write(json.dumps({**record, "elapsed_s": round(elapsed(), 1), **wall}) + "\n")
        log.flush()
        print(json.dumps(record), flush=True)

    def save() -> None:
        model.eval()
        model.save_pretrained(args.out, safe_serialization=True)
        processor.save_pretrained(args.out)
        model.train()

    write(
        {
            "event": "resume" if state else "start",
            "params": sum(p.numel() for p in model.parameters()),
            "args": {k: str(v) for k, v in vars(args).items()},
            "low_res": low_res,
            "global_only": global_only,
            "cpu_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            **({"stage": state["stage"], "step": state["step"]} if state else {}),
        }
    )
    model.train()

    vision_params = [p for name, p in model.named_parameters() if not name.startswith(LANGUAGE_SIDE)]
    if state:
        model.load_state_dict(state["model"])
    elif args.vision_from or args.init_from:
        source = args.vision_from or args.init_from
        taken = take_weights(model, source, language=bool(args.init_from))
        write({"event": "weights taken" if args.init_from else "vision taken", "from": str(source), "tensors": taken})
    if not (args.vision_from or args.init_from) and not (state and state["stage"] == "language"):
        run_vision_stage(
            args, model, processor, adapter, family, low_res, vision_params, state, checkpoint, write, elapsed
        )
        state = None
    for p in vision_params:
        p.requires_grad_(False)
    run_language_stage(args, model, processor, adapter, low_res, global_only, state, checkpoint, write, elapsed, save)


class Checkpoint:
    """A resumable training state in one file, written atomically (a run on these machines may stop anywhere)."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> dict | None:
        return torch.load(self.path, weights_only=False) if self.path.exists() else None

    def save(self, stage: str, step: int, elapsed_s: float, model, opt, **extra) -> None:
        tmp = self.path.with_suffix(".tmp")
        state = {"stage": stage, "step": step, "elapsed_s": elapsed_s, "model": model.state_dict()}
        torch.save({**state, "opt": opt.state_dict(), **extra}, tmp)
        tmp.replace(self.path)


def take_weights(model, source: Path, language: bool) -> int:
    """Copy a trained checkpoint's non-LLM tensors (vision tower, projector, newline) into ``model``, and with
    ``language`` its LLM too; a tensor missing or of another shape there is refused (another family or width)."""
    trained = type(model).from_pretrained(source).state_dict()
    wanted = [k for k in model.state_dict() if language or not k.startswith(("model.language_model.", "lm_head."))]
    own = model.state_dict()
    bad = [k for k in wanted if k not in trained or trained[k].shape != own[k].shape]
    if bad:
        flag = "--init-from" if language else "--vision-from"
        raise SystemExit(f"{flag} {source}: no {bad[:3]} of this model's shape (another family or width?)")
    model.load_state_dict({k: trained[k] for k in wanted}, strict=False)
    return len(wanted)


def run_vision_stage(
    args, model, processor, adapter, family, low_res, vision_params, state, checkpoint, write, elapsed
):
    """Stage 1: the vision tower and projector learn through the auxiliary heads on crowded scenes."""
    heads = AuxiliaryHeads(args.text_width, args.vision_width)
    tap = FeatureLayerTap(model) if family.has_cls else None
    params = vision_params + [*heads.parameters()]
    opt = torch.optim.AdamW(params, lr=args.vision_lr, weight_decay=0.01, betas=(0.9, 0.98))
    first = 0
    if state:
        heads.load_state_dict(state["heads"])
        opt.load_state_dict(state["opt"])
        first = state["step"]
    budget = 60 * args.vision_minutes
    # half as many low-resolution scenes as stage 2: crowded and small, most of their tokens hold two objects
    stream = DataLoader(
        SceneStream(processor, "train", 5_000_000 + first, 10**6, 0, crowd=args.crowd, low_res=low_res / 2),
        batch_size=None,
        num_workers=1,
        prefetch_factor=4,
    )
    window: dict[str, list] = defaultdict(list)
    step = first
    for step, item in enumerate(stream, start=first):
        for group in opt.param_groups:
            group["lr"] = args.vision_lr * cosine(elapsed() / budget, 0.05)
        layout = SceneLayout(adapter, item)
        feats = features(model, item)
        loss = auxiliary_loss(
            heads, feats, tap.hidden[:, 0] if tap else None, layout.tokens, layout.tiles, layout.sides
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            tile_obj = (layout.tokens > 0) & ~layout.overview
            predicted = heads.token(feats[tile_obj]).argmax(-1)
            window["loss"].append(loss.item())
            window["tile_class_acc"] += (predicted == layout.tokens[tile_obj]).tolist()
            sided = layout.sides >= 0
            window["side_acc"] += (heads.side(feats[sided]).argmax(-1) == layout.sides[sided]).tolist()
        done = elapsed() >= budget
        if (step + 1) % 25 == 0 or done:
            write({"stage": "vision", "step": step + 1, **{k: round(sum(v) / len(v), 4) for k, v in window.items()}})
            window = defaultdict(list)
        if (step + 1) % args.checkpoint_every == 0 and not done:
            checkpoint.save("vision", step + 1, elapsed(), model, opt, heads=heads.state_dict())
        if done:
            break
    write({"event": "vision done", "steps": step + 1})


def run_language_stage(args, model, processor, adapter, low_res, global_only, state, checkpoint, write, elapsed, save):
    """Stage 2: the LLM learns the task on task scenes (vision frozen), validated every ``--val-every`` steps."""
    stage = LanguageStage(
        model, processor, args.hop_layer, args.retrieval_layer, args.attention, args.side_layer, args.side_weight
    )
    lm_params = [p for p in model.parameters() if p.requires_grad] + [*stage.side_head.parameters()]
    opt = torch.optim.AdamW(lm_params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(args.seed)
    first = 0
    if state:
        opt.load_state_dict(state["opt"])
        gen.set_state(state["generator"])
        if "side_head" in state:
            stage.side_head.load_state_dict(state["side_head"])
        first, lm_start = state["step"], state["lm_start_s"]
    else:
        lm_start = elapsed()
    lm_budget = 60 * args.max_minutes - lm_start
    val = [(item, SceneLayout(adapter, item)) for item in SceneStream(processor, "val", 0, args.val_scenes, 2)]
    # a model read at any resolution is also validated at 128 tokens (~1/10 of its ~1 250, near the benchmark's 11.1 %)
    val_low = (
        []
        if not low_res
        else [
            (item, SceneLayout(adapter, item))
            for item in SceneStream(
                processor, "val", 0, args.val_scenes, 2, max_pixels=token_pixels(processor, LOW_RES_TOKENS[3])
            )
        ]
    )
    stream = DataLoader(
        SceneStream(processor, "train", first, 10**6, args.per_type, low_res=low_res),
        batch_size=None,
        num_workers=1,
        prefetch_factor=4,
    )
    window = defaultdict(list)
    step = first
    for step, item in enumerate(stream, start=first):
        progress = (elapsed() - lm_start) / lm_budget
        for group in opt.param_groups:
            group["lr"] = args.lr * cosine(progress, 0.03)
        only_global = bool(torch.rand((), generator=gen) < global_only)
        tokens = "global" if only_global else "focus" if progress < args.focus else "all"
        layout = SceneLayout(adapter, item)
        # the tower is frozen: only Qwen3-VL's DeepStack mergers (trainable here) build a graph
        feats, deepstack = image_features(model, item)
        shown = shown_tokens(layout, tokens, args.focus_keep, gen)
        loss, correct = stage(item, layout, feats, shown, supervise=not only_global, deepstack=deepstack)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm_params, 1.0)
        opt.step()
        if not only_global:
            window["loss"].append(loss.item())
            window["train_acc"] += correct.tolist()
        if (step + 1) % 25 == 0:
            write(
                {
                    "stage": "language",
                    "step": step + 1,
                    "tokens": tokens,
                    **{k: round(sum(v) / len(v), 4) for k, v in window.items()},
                    "lr": round(opt.param_groups[0]["lr"], 6),
                }
            )
            window = defaultdict(list)
        done = elapsed() >= 60 * args.max_minutes
        if (step + 1) % args.val_every == 0 or done:
            write(
                {
                    "stage": "language",
                    "step": step + 1,
                    **evaluate(stage, val),
                    **(evaluate(stage, val_low, "val_low_res_acc") if val_low else {}),
                }
            )
            save()
        if (step + 1) % args.checkpoint_every == 0 or done:
            checkpoint.save(
                "language",
                step + 1,
                elapsed(),
                model,
                opt,
                generator=gen.get_state(),
                lm_start_s=lm_start,
                side_head=stage.side_head.state_dict(),
            )
        if done:
            break
    write({"event": "done", "language_steps": step + 1, "train_seconds": round(elapsed(), 1)})


if __name__ == "__main__":
    main()
