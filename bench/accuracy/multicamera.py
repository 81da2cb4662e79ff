"""``ptp-eval --multicamera``: one budget over two camera views, on the proxy task (docs/accuracy/multicamera/).

Two-camera scenes: the proxy scene a question is about (its target objects known) is one camera, another proxy
scene holding no object of the asked shape is the other (so the answer is the same with both views), the target's
camera alternating between the first and the second image of the prompt.  At a shared budget of 11.1 % of both
views' tokens, each camera split of PTP (``view_split``: shared, equal, alone) keeps some of the target's tile
tokens; the target recall (as ``ptp-eval`` counts it: the kept share of the tile tokens overlapping the question's
target objects) is paired question by question, with a 95 % interval on the mean difference.  The control row,
``random``, keeps as many tokens drawn uniformly over both views (seeded per question): what a split's recall
must beat (target recall counts kept tokens, so the random control is the same before or inside the LLM).  The
upper-bound row, ``told camera``, is the shared split's formula with the asked camera's weight 1 (it gets
``(1 − α)/2 + α`` of the budget): what a perfect camera signal could buy over the equal split, not a method.

The selection is PTP's in-LLM one (the default): ranked by the instruction's attention at the adapter's relevance
layer over the whole two-image prompt — those rows are computed once per question (``instruction_attention``,
the same rows the in-LLM prune reads at that layer) and every split selects on them, so the splits differ only in
how the budget is shared.  The answers of single-camera requests through the camera-mapping path and through the
bare-image path are compared answer for answer, with both accuracies.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ptp_ros.budget import ratio_tokens
from ptp_ros.pipeline import Pipeline, PipelineConfig
from ptp_ros.proxy import Question, Scene, SceneObject, make_questions, make_scene, split_seed
from ptp_ros.pruning import VIEW_SPLITS, ConfiguredSelector, instruction_relevance
from ptp_ros.pruning.selectors import random_select
from ptp_ros.pruning.views import view_bounds
from ptp_ros.vlm.base import VisualTokens

from ..proxy.auxiliary import overlapping
from .runner import summarize_ci

SHARED_RATIO = 0.111  # the budget; where PTP's in-view pick still reaches nearly every target token
#: the shared budgets of the report: 11.1 %, and budgets low enough that a camera's share decides what is kept
RATIOS = (SHARED_RATIO, 0.028, 0.014, 0.007)
CAMERAS = ("head", "wrist")
CONTROL = "random"  # uniform tokens over both views at the same shared budget
#: the shared split told which camera holds the asked object (its weight 1, the other's 0): the most any camera
#: signal could buy the shared split, an upper bound and not a method
ORACLE = "told camera"
ROWS = (*VIEW_SPLITS, ORACLE, CONTROL)
ROW_NOTES = {ORACLE: " (upper bound: `shared` told the asked camera)", CONTROL: " (control)"}
DISTRACTOR_OFFSET = 5_000_000  # the other camera's scenes: a seed range of the split no report reads


def distractor(split: str, index: int, shape: str, size: tuple[int, int] | None = None) -> Scene:
    """The first scene of the distractor range from ``index`` on that holds no ``shape``."""
    k = index
    while True:
        scene = make_scene(split_seed(split, DISTRACTOR_OFFSET + k), size)
        if scene.count(shape) == 0:
            return scene
        k += 1


def object_cover(visual: VisualTokens, view: int, objects: Iterable[SceneObject]) -> torch.Tensor:
    """[N] bool over all views' tokens: the tile tokens (not the global view's) of view ``view`` overlapping any of
    ``objects`` (that view's scene's)."""
    start, end = view_bounds(visual.scores)[view]
    own = visual.view(view)
    tile = own.scores.region >= 0
    if own.scores.global_region is not None:
        tile &= own.scores.region != own.scores.global_region
    mask = torch.zeros(visual.num_tokens, dtype=torch.bool)
    for obj in objects:
        mask[start:end] |= tile & overlapping(own.token_boxes, obj)
    return mask


def target_cover(visual: VisualTokens, view: int, scene: Scene, question: Question) -> torch.Tensor:
    """[N] bool over both views' tokens: the tile tokens of camera ``view`` overlapping the question's targets."""
    return object_cover(visual, view, (scene.objects[t] for t in question.targets))


def paired_interval(diffs: list[float]) -> tuple[float, float, float]:
    """Mean of paired differences with its 95 % interval (normal approximation)."""
    d = np.asarray(diffs, dtype=float)
    if d.size < 2:
        return float(d.mean()) if d.size else math.nan, math.nan, math.nan
    half = 1.96 * d.std(ddof=1) / math.sqrt(d.size)
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


@dataclasses.dataclass(frozen=True)
class TwoCameraQuestion:
    """One question of a two-camera pair, prompted and encoded: the asked ``scene`` on view ``asked`` (0 or 1), the
    ``other`` scene on the other view."""

    pair: int
    asked: int
    scene: Scene
    other: Scene
    question: Question
    prepared: Any
    visual: VisualTokens


def two_camera_questions(
    adapter, split: str, pairs: int, per_type: int, size: tuple[int, int] | None = None, tool: str = "--multicamera"
) -> Iterator[TwoCameraQuestion]:
    """Every question with a target on ``pairs`` two-camera scenes (of ``size``; default: the task's sizes), the
    asked scene first on even pairs and second on odd ones; progress on stderr after each pair."""
    asked_so_far = 0
    for k in range(pairs):
        scene = make_scene(split_seed(split, k), size)
        asked = k % 2
        for question in make_questions(scene, per_type):
            if not question.targets:
                continue
            other = distractor(split, k, scene.objects[question.targets[0]].shape, size)  # targets have the shape
            images = [scene.image, other.image] if asked == 0 else [other.image, scene.image]
            prepared = adapter.prepare(images, question.text)
            asked_so_far += 1
            yield TwoCameraQuestion(k, asked, scene, other, question, prepared, adapter.encode(prepared))
        print(f"[ptp-eval {tool}] {k + 1}/{pairs} two-camera scenes, {asked_so_far} questions", file=sys.stderr)


def two_camera_recall(
    adapter, split: str, pairs: int, per_type: int, ratios: tuple[float, ...], size: tuple[int, int] | None = None
) -> list[dict]:
    """Target recall of each camera split at each shared keep ratio, per question, on ``pairs`` two-camera scenes
    (of ``size``; default: the task's sizes)."""
    pipelines = {s: Pipeline(adapter, PipelineConfig(selector=ConfiguredSelector(view_split=s))) for s in VIEW_SPLITS}
    reduce = pipelines["shared"].config.selector.reduce
    rows: list[dict] = []
    for q in two_camera_questions(adapter, split, pairs, per_type, size):
        visual = q.visual
        relevance = instruction_relevance(adapter.instruction_attention(q.prepared, visual), reduce)
        scores = dataclasses.replace(visual.scores, relevance=relevance, features=visual.features)
        cover = target_cover(visual, q.asked, q.scene, q.question)
        if not bool(cover.any()):
            continue
        start, end = view_bounds(visual.scores)[q.asked]
        row = {"pair": q.pair, "qtype": q.question.qtype, "target_view": CAMERAS[q.asked]}
        row["view_tokens"] = list(visual.scores.view_tokens)
        for ratio in ratios:
            budget = ratio_tokens(visual.num_tokens, ratio)
            cell: dict = {"budget": budget}
            kept_sets = {n: p.select(visual.num_tokens, scores, budget).kept for n, p in pipelines.items()}
            told = torch.eye(2, dtype=torch.double)[q.asked]  # the asked camera's weight 1, the other's 0
            kept_sets[ORACLE] = pipelines["shared"].select(visual.num_tokens, scores, budget, told).kept
            kept_sets[CONTROL] = random_select(scores, budget, seed=len(rows)).kept
            for name, kept in kept_sets.items():
                cell[name] = {
                    "recall": round(float(cover[kept].sum()) / float(cover.sum()), 6),
                    "target_view_kept": int(((kept >= start) & (kept < end)).sum()),
                }
            row[f"{ratio:g}"] = cell
        rows.append(row)
    return rows


def single_camera_agreement(
    adapter, split: str, scenes: int, per_type: int, size: tuple[int, int] | None = None
) -> dict:
    """Answers at 11.1 % of single-camera requests through ``{camera: frame}`` and through the bare frame, beside
    the control of their stage: as many random tokens dropped from the same LLM layer (``random_in_llm``)."""
    pipeline = Pipeline(adapter, PipelineConfig(max_new_tokens=4))
    control = Pipeline(
        adapter,
        PipelineConfig(
            max_new_tokens=4, selector=ConfiguredSelector("random_in_llm", {"k": adapter.options.llm_layer})
        ),
    )
    correct: dict[str, list[int]] = {"bare": [], "named": [], CONTROL: []}
    agree = []
    for k in range(scenes):
        scene = make_scene(split_seed(split, k), size)
        for question in make_questions(scene, per_type):
            bare = pipeline.answer(scene.image, question.text, keep_ratio=SHARED_RATIO).text.strip()
            named = pipeline.answer({CAMERAS[0]: scene.image}, question.text, keep_ratio=SHARED_RATIO).text.strip()
            randomly = control.answer(scene.image, question.text, keep_ratio=SHARED_RATIO).text.strip()
            for name, answer in (("bare", bare), ("named", named), (CONTROL, randomly)):
                correct[name].append(int(answer == question.answer))
            agree.append(int(bare == named))
    return {
        **{name: summarize_ci(values) for name, values in correct.items()},
        "gain_over_control": {
            name: paired_interval([a - b for a, b in zip(correct[name], correct[CONTROL])])
            for name in ("bare", "named")
        },
        "agree": sum(agree),
        "n": len(agree),
    }


def build(rows: list[dict], agreement: dict, meta: dict) -> dict:
    """The report's figures: per shared keep ratio, each split's mean target recall and budget share on the target's
    camera, and the paired differences of the shared split against the baselines."""
    ratios = [f"{r:g}" for r in meta["ratios"]]

    def mean(ratio: str, value) -> float:
        return float(np.mean([value(r[ratio]) for r in rows])) if rows else math.nan

    return {
        "meta": meta,
        "questions": len(rows),
        "recall": {q: {s: mean(q, lambda c, s=s: c[s]["recall"]) for s in ROWS} for q in ratios},
        "target_view_share": {
            q: {s: mean(q, lambda c, s=s: c[s]["target_view_kept"] / c["budget"]) for s in ROWS} for q in ratios
        },
        "paired": {
            q: {
                f"{split} - {base}": paired_interval([r[q][split]["recall"] - r[q][base]["recall"] for r in rows])
                for split, base in (
                    ("shared", "equal"),
                    ("shared", "alone"),
                    (ORACLE, "equal"),
                    *((s, CONTROL) for s in VIEW_SPLITS),
                )
            }
            for q in ratios
        },
        # the report's control rows, in ptp-eval's results.json form: random tokens at the splits' stage (inside the
        # LLM from the relevance layer; target recall counts kept tokens alike at any stage), and for the
        # single-camera answers random-after-K's accuracy
        "controls": {
            CONTROL: {
                "stage": "in_llm",
                "prune_layer": meta["llm_layer"],
                "ratios": {q: {"target_recall": mean(q, lambda c: c[CONTROL]["recall"])} for q in ratios},
            },
            f"random-after-{meta['llm_layer']}": {
                "stage": "in_llm",
                "prune_layer": meta["llm_layer"],
                "ratios": {f"{SHARED_RATIO:g}": {"accuracy": agreement[CONTROL][0]}},
            },
        },
        "questions_by_type": {t: sum(r["qtype"] == t for r in rows) for t in sorted({r["qtype"] for r in rows})},
        "single_camera": agreement,
        "rows": rows,
    }


def write(data: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(data, separators=(",", ":")) + "\n")  # one row per question: compact
    meta, single = data["meta"], data["single_camera"]
    lines = [
        "# Several cameras, one budget: the camera split on two-camera proxy scenes",
        "",
        f"Generated by `{meta['command']}` ({meta['model']}, {meta['split']} split, {meta['device']}, "
        f"{meta['threads']} torch thread(s), {meta['seconds']:.0f} s); bench/accuracy/multicamera.py says how.",
        "",
        f"{meta['pairs']} two-camera scenes: the scene a question is about on one camera (head and wrist in turn), "
        "a proxy scene with no object of the asked shape on the other; one prompt with both images; one budget "
        "for both views' tokens (the shared keep ratio); PTP's selection at its relevance layer "
        f"(LLM layer {meta['llm_layer']}) over the whole prompt. {data['questions']} questions with a target ("
        + ", ".join(f"{t} {n}" for t, n in data["questions_by_type"].items())
        + ").",
        "",
        "## Target recall (kept share of the target's tile tokens)",
        "",
        "| shared keep ratio | camera split | target recall | share of the budget on the target's camera |",
        "|---|---|---|---|",
    ]
    for q in data["recall"]:
        lines += [
            f"| {q} | {s}{ROW_NOTES.get(s, '')} | {data['recall'][q][s]:.3f} | {data['target_view_share'][q][s]:.3f} |"
            for s in ROWS
        ]
    lines += [
        "",
        "Paired, question by question (mean difference of target recall, 95 % interval; **not ahead**: a split "
        "whose interval over the random control reaches 0):",
        "",
    ]
    lines += [
        f"- {q}: {name} {mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        + (" **not ahead**" if name.endswith(f"- {CONTROL}") and not lo > 0 else "")
        for q, paired in data["paired"].items()
        for name, (mean, lo, hi) in paired.items()
    ]
    bare, named, control = single["bare"], single["named"], single[CONTROL]
    lines += [
        "",
        "## Single-camera requests: camera mapping vs bare image",
        "",
        f"{single['n']} questions on {meta['single_scenes']} proxy scenes at keep ratio {SHARED_RATIO}: the answers "
        f"agree on {single['agree']} of {single['n']}. Accuracy: bare image {bare[0]:.3f} "
        f'[{bare[1]:.3f}, {bare[2]:.3f}], `{{"{CAMERAS[0]}": frame}}` {named[0]:.3f} [{named[1]:.3f}, {named[2]:.3f}] '
        f"(95 % Wilson); the control, as many random tokens dropped from LLM layer {meta['llm_layer']} "
        f"(random-after-{meta['llm_layer']}), {control[0]:.3f} [{control[1]:.3f}, {control[2]:.3f}]. Gain over it "
        "(paired, 95 %): "
        + "; ".join(
            f"{name} {mean:+.3f} [{lo:+.3f}, {hi:+.3f}]{'' if lo > 0 else ' **not ahead**'}"
            for name, (mean, lo, hi) in single["gain_over_control"].items()
        )
        + ".",
        "",
    ]
    (out / "results.md").write_text("\n".join(lines))


def main(args, argv: list[str] | None, ratios: tuple[float, ...] = RATIOS) -> int:
    """``ptp-eval --multicamera`` with ``args`` from ptp-eval's parser, at the shared keep ``ratios``."""
    from ptp_ros.vlm.defaults import default_model_path
    from ptp_ros.vlm.loading import LoadOptions, load_adapter

    from . import _command, _shown

    split = {"validation": "val"}.get(args.split, args.split) or "test"
    pairs = args.scenes or (2 if args.quick else 120)
    per_type = args.per_type or (1 if args.quick else 2)
    single_scenes = max(1, pairs // 4)
    model = Path(args.model) if args.model else default_model_path()
    device = args.device or "cpu"
    adapter = load_adapter(model, LoadOptions(device=device, dtype=args.dtype))
    start = time.perf_counter()
    rows = two_camera_recall(adapter, split, pairs, per_type, ratios)
    agreement = single_camera_agreement(adapter, split, single_scenes, per_type)
    meta = {
        "command": _command(argv),
        "model": _shown(model),
        "split": split,
        "device": device,
        "threads": torch.get_num_threads(),
        "pairs": pairs,
        "per_type": per_type,
        "ratios": list(ratios),
        "single_scenes": single_scenes,
        "llm_layer": adapter.options.llm_layer,
        "seconds": time.perf_counter() - start,
    }
    data = build(rows, agreement, meta)
    out = args.out or Path("docs/accuracy/multicamera")
    write(data, out)
    for q, paired in data["paired"].items():
        mean, lo, hi = paired["shared - equal"]
        print(f"[ptp-eval --multicamera] {q}: shared - equal target recall {mean:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    return 0
