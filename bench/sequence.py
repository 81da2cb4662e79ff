"""``ptp-bench --sequence``: what reusing the vision encoding (vlm/encode_cache.py) buys on a camera, and what it costs.

A camera at 10 Hz and a question every 2 s: the questions land on every 20th frame, and the frames between are
never encoded (the node answers on the newest frame).  The scenes are the proxy task's (ptp_ros/proxy), 1344 px
square (2×2 anyres tiles and the global view), with sensor noise (σ = 2 grey levels) on every frame, in four
sequences: ``still``; ``pan`` (the view slides 2 px a frame); ``moved`` (one object crosses from one tile column to
the other over the sequence); ``cut`` (another scene from the second question on).

* **time**, on ``--model`` (default the real-size CPU proxy, random weights): end-to-end time per request
  (``Pipeline.answer``'s stages) unpruned without reuse, PTP at 11.1 % without reuse, and PTP at 11.1 % with an
  encode cache, for 1, 2 and 4 questions on one frame and for each sequence;
* **answers**, on the trained proxy LLaVA-NeXT: for each sequence, how often an answer with reuse (threshold 0 and
  ``--reuse-threshold``) equals the one from scratch and the ground truth, how much was reused, and for the moving
  object whether a kept token covers its current position.

Writes ``sequence.json`` (every request), ``README.md`` and ``sequence_time.png`` to ``--out``.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ptp_ros.pipeline import Pipeline, PipelineConfig
from ptp_ros.proxy import Question, make_questions, make_scene, move_object, split_seed

SEQUENCES = ("still", "pan", "moved", "cut")
FRAME_HZ, QUESTION_EVERY_S = 10, 2.0
QUESTION_EVERY = int(FRAME_HZ * QUESTION_EVERY_S)  # frames between two questions
SCENE_SIZE = (1344, 1344)
NOISE = 2.0  # sensor noise, σ in grey levels
PAN_PX = 2  # per frame
KEEP = 0.111
QUESTIONS_PER_FRAME = (1, 2, 4)


def _noisy(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(image + rng.normal(0, NOISE, image.shape), 0, 255).astype(np.uint8)


def _movable(seed: int):
    """(scene, index) of a scene whose object of a unique shape can cross to the mirrored place, clear of the rest."""
    while True:
        scene = make_scene(split_seed("test", seed), size=SCENE_SIZE)
        width = scene.image.shape[1]
        for i, o in enumerate(scene.objects):
            mirrored = width - o.centre[0]
            clear = all(abs(p.centre[0] - mirrored) > 40 or abs(p.centre[1] - o.centre[1]) > 40 for p in scene.objects)
            if scene.count(o.shape) == 1 and clear:
                return scene, i
        seed += 1000


def sequence(kind: str, seed: int, questions: int) -> list[tuple[np.ndarray, Question, tuple | None]]:
    """The frames a ``kind`` sequence asks about (one every ``QUESTION_EVERY``), each with its question and, for
    ``moved``, the moving object's centre."""
    rng = np.random.default_rng(seed)
    if kind == "moved":
        scene, index = _movable(seed)
        start = scene.objects[index].centre[0]
        end = scene.image.shape[1] - start
        out = []
        for k in range(questions):
            moved = move_object(scene, index, start + (end - start) * k / max(1, questions - 1))
            target = moved.objects[index]
            question = Question(f"what colour is the {target.shape} ?", target.colour, "colour", (index,))
            out.append((_noisy(moved.image, rng), question, target.centre))
        return out
    scenes = [make_scene(split_seed("test", seed), size=SCENE_SIZE)]
    if kind == "cut":
        scenes.append(make_scene(split_seed("test", seed + 500), size=SCENE_SIZE))
    out = []
    for k in range(questions):
        scene = scenes[min(k, len(scenes) - 1)]
        image = np.roll(scene.image, PAN_PX * QUESTION_EVERY * k, axis=1) if kind == "pan" else scene.image
        asked = make_questions(scene, per_type=1)
        out.append((_noisy(image, rng), asked[k % len(asked)], None))
    return out


def _request(pipeline: Pipeline, frame: np.ndarray, question: Question, keep: float, **fields) -> dict:
    answer = pipeline.answer({"camera": frame}, question.text, keep_ratio=keep)
    return {
        **fields,
        "total_ms": answer.timings_ms["total"],
        "stages_ms": {k: v for k, v in answer.timings_ms.items() if k != "total"},
        "encode_reused": answer.encode_reused,
        "answer": answer.text,
        "_answer": answer,
    }


def time_requests(adapter, questions: int, threshold: float, max_new_tokens: int, log) -> list[dict]:
    """Every timed request: the two baselines (no reuse), then PTP with reuse on 4 questions per frame and on each
    sequence (a fresh cache for each), then the baselines again (on a shared machine the load drifts: the baselines
    are their mean over the start and the end)."""
    plain = Pipeline(adapter, PipelineConfig(max_new_tokens=max_new_tokens))
    still = sequence("still", 0, max(QUESTIONS_PER_FRAME))
    warm = still[0][0][:336, :336]
    plain.answer(warm, "what is there ?", keep_ratio=KEEP)  # one-off costs (allocator growth) out of the figures
    records = []

    def note(record: dict) -> None:
        record.pop("_answer")
        records.append(record)
        print(
            f"ptp-bench --sequence: {record['part']} {record['mode']} {record.get('kind', '')} "
            f"q{record['index']}: {record['total_ms'] / 1e3:.1f} s, reused {record['encode_reused']:.2f}",
            file=log,
            flush=True,
        )

    frame, question, _ = still[0]

    def baselines(index: int) -> None:
        for mode, keep in (("unpruned", 1.0), ("ptp", KEEP)):
            note(_request(plain, frame, question, keep, part="baseline", mode=mode, index=index))

    baselines(0)
    config = PipelineConfig(max_new_tokens=max_new_tokens, encode_cache_frames=4, encode_reuse_threshold=threshold)
    reusing = Pipeline(adapter, config)
    asked = make_questions(make_scene(split_seed("test", 0), size=SCENE_SIZE), per_type=1)
    for k in range(max(QUESTIONS_PER_FRAME)):
        note(_request(reusing, frame, asked[k % len(asked)], KEEP, part="per_frame", mode="ptp_reuse", index=k))
    for kind in SEQUENCES:
        reusing = Pipeline(adapter, config)
        for k, (frame, question, _) in enumerate(sequence(kind, 0, questions)):
            note(_request(reusing, frame, question, KEEP, part="sequence", mode="ptp_reuse", kind=kind, index=k))
    frame, question, _ = still[0]
    baselines(1)
    return records


def _covers(answer, point) -> bool:
    boxes = answer.visual.token_boxes[answer.selection.kept]
    x, y = point
    return bool(((boxes[:, 0] <= x) & (x <= boxes[:, 2]) & (boxes[:, 1] <= y) & (y <= boxes[:, 3])).any())


def answer_agreement(adapter, scenes: int, questions: int, threshold: float, log) -> list[dict]:
    """For each sequence and scene, every question answered from scratch and with reuse at threshold 0 and at
    ``threshold`` (each its own cache over the sequence)."""
    records = []
    for kind in SEQUENCES:
        for seed in range(scenes):
            frames = sequence(kind, 100 + seed, questions)
            runs = {
                name: Pipeline(
                    adapter, PipelineConfig(max_new_tokens=2, encode_cache_frames=4, encode_reuse_threshold=t)
                )
                for name, t in (("reuse_0", 0.0), (f"reuse_{threshold:g}", threshold))
            }
            runs["scratch"] = Pipeline(adapter, PipelineConfig(max_new_tokens=2))
            for k, (frame, question, target) in enumerate(frames):
                for name, pipeline in runs.items():
                    record = _request(pipeline, frame, question, KEEP, kind=kind, scene=seed, index=k, mode=name)
                    answer = record.pop("_answer")
                    record["truth"] = question.answer
                    record["target_kept"] = None if target is None else _covers(answer, target)
                    records.append(record)
        print(f"ptp-bench --sequence: answers on {kind} done", file=log, flush=True)
    return records


def summarise(timed: list[dict], answered: list[dict], threshold: float) -> dict:
    runs = {
        mode: [r["total_ms"] for r in timed if r["part"] == "baseline" and r["mode"] == mode]
        for mode in ("unpruned", "ptp")
    }
    base = {mode: statistics.fmean(ms) for mode, ms in runs.items()}
    per_frame = [r["total_ms"] for r in timed if r["part"] == "per_frame"]
    unpruned = base["unpruned"]
    rows = {"questions_per_frame": [], "sequences": [], "answers": []}
    for q in QUESTIONS_PER_FRAME:
        mean = statistics.fmean(per_frame[:q])
        rows["questions_per_frame"].append({"questions": q, "ptp_reuse_ms": mean, "ratio": mean / unpruned})
    for kind in SEQUENCES:
        ours = [r for r in timed if r.get("kind") == kind]
        mean = statistics.fmean(r["total_ms"] for r in ours)
        later = statistics.fmean(r["total_ms"] for r in ours[1:])
        rows["sequences"].append(
            {
                "sequence": kind,
                "ptp_reuse_ms": mean,
                "ratio": mean / unpruned,
                "after_first_ms": later,
                "after_first_ratio": later / unpruned,
                "encode_reused": statistics.fmean(r["encode_reused"] for r in ours[1:]),
            }
        )
    for kind in SEQUENCES:
        for mode in ("reuse_0", f"reuse_{threshold:g}"):
            pairs = [
                (r, s)
                for r in answered
                for s in answered
                if r["mode"] == mode
                and s["mode"] == "scratch"
                and r["kind"] == s["kind"] == kind
                and (r["scene"], r["index"]) == (s["scene"], s["index"])
            ]
            later = [(r, s) for r, s in pairs if r["index"] > 0]
            targets = [r["target_kept"] for r, _ in pairs if r["target_kept"] is not None]
            rows["answers"].append(
                {
                    "sequence": kind,
                    "mode": mode,
                    "questions": len(pairs),
                    "same_as_scratch": statistics.fmean(r["answer"] == s["answer"] for r, s in pairs),
                    "correct": statistics.fmean(r["answer"] == r["truth"] for r, _ in pairs),
                    "scratch_correct": statistics.fmean(s["answer"] == s["truth"] for _, s in pairs),
                    "encode_reused": statistics.fmean(r["encode_reused"] for r, _ in later) if later else None,
                    "target_kept": statistics.fmean(targets) if targets else None,
                    "scratch_target_kept": statistics.fmean(
                        s["target_kept"] for _, s in pairs if s["target_kept"] is not None
                    )
                    if targets
                    else None,
                }
            )
    return {"unpruned_ms": unpruned, "ptp_ms": base["ptp"], "baseline_runs_ms": runs, **rows}


def _pct(value) -> str:
    return "" if value is None else f"{100 * value:.0f} %"


def _runs(summary: dict, mode: str) -> str:
    start, end = (ms / 1e3 for ms in summary["baseline_runs_ms"][mode])
    return f"mean of {start:.1f} s at the start and {end:.1f} s at the end"


def _target(row: dict) -> str:
    return "" if row["target_kept"] is None else f"{_pct(row['target_kept'])} ({_pct(row['scratch_target_kept'])})"


def conditions(report: dict) -> str:
    machine, load = report["machine"], report["load"]
    others = {p["name"] for snap in load.values() for p in snap["other_busy_processes"]}
    return (
        f"Machine: {machine['cpu']}, {machine['logical_cpus']} logical cores, torch {machine['versions']['torch']}, "
        f"transformers {machine['versions']['transformers']}. Contention: 1-min load average "
        f"{load['before']['load_avg_1m']} before and {load['after']['load_avg_1m']} after; other busy processes: "
        f"{', '.join(sorted(others)) or 'none'} — a shared, busy machine, so the times are what a contended CPU "
        "gives, not an idle one's."
    )


def markdown(report: dict) -> str:
    s, settings = report["summary"], report["settings"]
    lines = [
        "# Reusing the vision encoding on a camera (`ptp-bench --sequence`)",
        "",
        f"Generated by `{settings['command']}` (bench/sequence.py) in {report['wall_s'] / 60:.1f} min; every figure "
        f"is measured. {conditions(report)}",
        "",
        f"Time: `{report['model']}` ({settings['dtype']}, {settings['threads']} torch thread(s)), "
        f"{settings['max_new_tokens']} new tokens, one run per request. Unpruned without reuse: "
        f"**{s['unpruned_ms'] / 1e3:.1f} s** a request ({_runs(s, 'unpruned')}); PTP at 11.1 % without reuse: "
        f"{s['ptp_ms'] / 1e3:.1f} s ({_runs(s, 'ptp')}; {s['ptp_ms'] / s['unpruned_ms']:.2f}×). Ratios are to the "
        f"unpruned mean. PTP with reuse at threshold {settings['threshold']:g}:",
        "",
        "| questions per frame | PTP 11.1 % + reuse, s per request | × unpruned without reuse |",
        "|---|---|---|",
        *(f"| {r['questions']} | {r['ptp_reuse_ms'] / 1e3:.1f} | {r['ratio']:.2f} |" for r in s["questions_per_frame"]),
        "",
        f"Sequences (10 Hz, a question every 2 s, {settings['questions']} questions; the first encodes the whole "
        'frame, so the steady state is the "after the first" column):',
        "",
        "| sequence | s per request | × unpruned | after the first: s | × unpruned | views reused after the first |",
        "|---|---|---|---|---|---|",
        *(
            f"| {r['sequence']} | {r['ptp_reuse_ms'] / 1e3:.1f} | {r['ratio']:.2f} | {r['after_first_ms'] / 1e3:.1f} "
            f"| {r['after_first_ratio']:.2f} | {_pct(r['encode_reused'])} |"
            for r in s["sequences"]
        ),
        "",
        f"Answers: the trained proxy LLaVA-NeXT (`{settings['answer_model']}`), PTP at 11.1 %, "
        f"{settings['scenes']} scenes a sequence × {settings['questions']} questions; with reuse against from "
        'scratch (the same frames and questions, no cache). "target kept": a kept token covers the moving '
        "object's current position.",
        "",
        "| sequence | reuse | answers | same as from scratch | correct (from scratch) | views reused after the "
        "first | target kept (from scratch) |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {r['sequence']} | {r['mode'].removeprefix('reuse_')} | {r['questions']} | {_pct(r['same_as_scratch'])} "
            f"| {_pct(r['correct'])} ({_pct(r['scratch_correct'])}) | {_pct(r['encode_reused'])} "
            f"| {_target(r)} |"
            for r in s["answers"]
        ),
        "",
    ]
    return "\n".join(lines)


def plot(report: dict, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["summary"]
    unpruned, ptp = s["unpruned_ms"] / 1e3, s["ptp_ms"] / 1e3
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    qs = [r["questions"] for r in s["questions_per_frame"]]
    left.plot(qs, [unpruned] * len(qs), "k--", label="unpruned, no reuse")
    left.plot(qs, [ptp] * len(qs), "C1--", label="PTP 11.1 %, no reuse")
    left.plot(qs, [r["ptp_reuse_ms"] / 1e3 for r in s["questions_per_frame"]], "C0o-", label="PTP 11.1 % + reuse")
    for r in s["questions_per_frame"]:
        left.annotate(f"{r['ratio']:.2f}×", (r["questions"], r["ptp_reuse_ms"] / 1e3), ha="left", va="bottom")
    left.set(xlabel="questions per frame", ylabel="end-to-end s per request", xticks=qs, ylim=(0, None))
    left.legend()
    kinds = [r["sequence"] for r in s["sequences"]]
    x = np.arange(len(kinds))
    right.bar(x - 0.2, [r["ptp_reuse_ms"] / 1e3 for r in s["sequences"]], 0.4, label="PTP + reuse, all questions")
    right.bar(x + 0.2, [r["after_first_ms"] / 1e3 for r in s["sequences"]], 0.4, color="C2", label="after the first")
    right.axhline(unpruned, color="k", ls="--", label="unpruned, no reuse")
    right.axhline(ptp, color="C1", ls="--", label="PTP, no reuse")
    for i, r in enumerate(s["sequences"]):
        right.annotate(f"{r['after_first_ratio']:.2f}×", (i + 0.2, r["after_first_ms"] / 1e3), ha="center", va="bottom")
    right.set(xticks=x, xticklabels=kinds, xlabel="scene motion", ylabel="end-to-end s per request")
    right.legend(fontsize=8)
    fig.suptitle(f"{report['model']}: end-to-end time per request (ratio to unpruned without reuse)")
    fig.tight_layout()
    fig.savefig(out / "sequence_time.png", dpi=110)
    plt.close(fig)
    return "sequence_time.png"


def run(args, log=sys.stderr) -> dict:
    from ptp_ros.vlm.defaults import PROXY_MODEL
    from ptp_ros.vlm.loading import LoadOptions, load_adapter

    from .machine import describe, load_snapshot
    from .models import load_model

    model = args.model or "cpu-proxy"
    if args.threads:
        torch.set_num_threads(args.threads)
    questions = args.sequence_questions
    before, start = load_snapshot(), time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        adapter = load_model(model, torch.device("cpu"), torch.float32, Path(scratch))
        timed = time_requests(adapter, questions, args.reuse_threshold, args.max_new_tokens or 4, log)
    del adapter
    proxy = load_adapter(PROXY_MODEL, LoadOptions(device="cpu"))
    answered = answer_agreement(proxy, args.sequence_scenes, questions, args.reuse_threshold, log)
    return {
        "model": model,
        "machine": describe(torch.device("cpu")),
        "wall_s": time.perf_counter() - start,
        "load": {"before": before, "after": load_snapshot()},
        "settings": {
            "command": "ptp-bench " + " ".join(args.argv),
            "dtype": "float32",
            "threads": torch.get_num_threads(),
            "max_new_tokens": args.max_new_tokens or 4,
            "threshold": args.reuse_threshold,
            "questions": questions,
            "scenes": args.sequence_scenes,
            "answer_model": PROXY_MODEL.name,
        },
        "timed": timed,
        "answered": answered,
        "summary": summarise(timed, answered, args.reuse_threshold),
    }


def main(args) -> int:
    """Measure and report; with ``--report-only``, rebuild README.md and the plot from OUT/sequence.json."""
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        report = json.loads((args.out / "sequence.json").read_text())
    else:
        report = run(args)
        (args.out / "sequence.json").write_text(json.dumps(report, indent=1))
    (args.out / "README.md").write_text(markdown(report))
    print(
        f"ptp-bench --sequence: wrote sequence.json, README.md, {plot(report, args.out)} to {args.out}", file=sys.stderr
    )
    return 0
