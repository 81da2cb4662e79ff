"""``ptp-eval --retrieval-probe``: at which LLM layer does the instruction's attention find the *asked* object?

PTP's instruction level and its camera level (``view_split="shared"``) both assume that, at the layer they read
(K, the adapter's ``llm_layer``), the instruction attends more to what it asks about than to other things of the
same kind.  Beating random tokens does not show that: a layer that attends to every object alike beats random
too.  This probe asks it directly on the two-camera proxy scenes of ``--multicamera`` (the asked scene on one
camera, a scene with no object of the asked shape on the other; bench/accuracy/multicamera.py), at every LLM
layer, for PTP's instruction relevance (the selector's reduction over the instruction rows) and for the last
prompt token's row (FastV's):

* **same view**: the mean attention on the asked object's tile tokens exceeds that on the other objects of its
  own scene (the instruction level's premise; 50 % is chance);
* **other camera**: it exceeds that on the other camera's objects (the camera level's premise);
* **camera by peak**: the view holding the highest-attended token is the asked one;
* **camera by evidence**: the view ``view_split="shared"`` favours (``views.view_evidence``) is the asked one.

Each share comes with its 95 % Wilson interval, beside its control: the same four checks on random relevance
(uniform over the question's tokens, seeded per question): what chance is for each check, which is not always
0.5 (the camera checks also read the views' token and region layouts, which random values go through too).
Where the model directory's ``train_log.jsonl`` names the layers whose attention the proxy's training
supervised (``hop_layer``, ``retrieval_layer``), the report marks them: a pruning method must not read those
(docs/accuracy/training.md).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from ptp_ros.pruning import ConfiguredSelector, instruction_relevance
from ptp_ros.pruning.types import NO_REGION
from ptp_ros.pruning.views import view_evidence, view_parts

from .multicamera import CAMERAS, object_cover, target_cover, two_camera_questions
from .runner import summarize_ci

#: the probe's columns: (key, heading)
CHECKS = (
    ("same_view", "asked object > other objects of its view"),
    ("other_camera", "asked object > the other camera's objects"),
    ("camera_by_peak", "camera by peak = asked"),
    ("camera_by_evidence", "camera by evidence (`shared`) = asked"),
)
ROWS = ("relevance", "last")  # PTP's instruction relevance; the last prompt token's row (FastV's)
CONTROL = "random"  # the same checks on uniform random relevance, seeded per question


def supervised_layers(model: Path) -> list[int]:
    """The LLM layers whose attention the proxy's training supervised, from its ``train_log.jsonl`` (none known: [])."""
    log = Path(model) / "train_log.jsonl"
    if not log.is_file():
        return []
    try:
        with log.open() as f:
            start = json.loads(f.readline() or "{}")
        args = start.get("args", {}) if start.get("event") == "start" else {}
        if float(args.get("attention", 0) or 0) <= 0:
            return []
        return sorted({int(args[k]) for k in ("hop_layer", "retrieval_layer") if args.get(k) not in (None, "None")})
    except (OSError, ValueError, TypeError, AttributeError):  # not this trainer's log: nothing known
        return []


def _checks(visual, relevance: torch.Tensor, asked: int, target, same, other) -> dict[str, int]:
    """One question's four checks on one row of attention ([N] over both views' tokens)."""
    parts = view_parts(dataclasses.replace(visual.scores, relevance=relevance))
    peaks = [float(p.relevance[p.region != NO_REGION].max()) for p in parts]
    evidence = [view_evidence(p) for p in parts]
    mean_target = float(relevance[target].mean())
    return {
        "same_view": int(mean_target > float(relevance[same].mean())),
        "other_camera": int(mean_target > float(relevance[other].mean())),
        "camera_by_peak": int(max(range(len(parts)), key=peaks.__getitem__) == asked),
        "camera_by_evidence": int(max(range(len(parts)), key=evidence.__getitem__) == asked),
    }


def probe(
    adapter, split: str, pairs: int, per_type: int, layers: list[int], size: tuple[int, int] | None = None
) -> list[dict]:
    """Per question (with a target, another object in its scene and one on the other camera): each check at each
    of ``layers``, for each of ``ROWS``."""
    reduce = ConfiguredSelector().reduce
    rows: list[dict] = []
    for q in two_camera_questions(adapter, split, pairs, per_type, size, tool="--retrieval-probe"):
        visual, objects = q.visual, q.scene.objects
        target = target_cover(visual, q.asked, q.scene, q.question)
        rest = [o for i, o in enumerate(objects) if i not in q.question.targets]
        same = object_cover(visual, q.asked, rest) & ~target
        other = object_cover(visual, 1 - q.asked, q.other.objects)
        if not (target.any() and same.any() and other.any()):
            continue
        row: dict = {"pair": q.pair, "qtype": q.question.qtype, "asked": CAMERAS[q.asked]}
        noise = torch.rand(visual.num_tokens, generator=torch.Generator().manual_seed(len(rows)))
        row[CONTROL] = _checks(visual, noise, q.asked, target, same, other)
        for layer, attention in zip(layers, adapter.instruction_attention(q.prepared, visual, layers=layers)):
            row[str(layer)] = {
                "relevance": _checks(visual, instruction_relevance(attention, reduce), q.asked, target, same, other),
                "last": _checks(visual, attention[-1], q.asked, target, same, other),
            }
        rows.append(row)
    return rows


def build(rows: list[dict], meta: dict) -> dict:
    """Per layer and attention row, each check's share of questions with its 95 % Wilson interval."""
    shares = {
        str(layer): {
            name: {key: summarize_ci([r[str(layer)][name][key] for r in rows]) for key, _ in CHECKS} for name in ROWS
        }
        for layer in meta["layers"]
    }
    control = {key: summarize_ci([r[CONTROL][key] for r in rows]) for key, _ in CHECKS}
    controls = {CONTROL: {"relevance": "uniform random per token, seeded per question", "shares": control}}
    return {"meta": meta, "questions": len(rows), "shares": shares, "controls": controls, "rows": rows}


def write(data: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(data, separators=(",", ":")) + "\n")
    meta = data["meta"]
    supervised = set(meta["supervised_layers"])
    lines = [
        "# Where the instruction's attention finds the asked object, layer by layer",
        "",
        f"Generated by `{meta['command']}` ({meta['model']}, {meta['split']} split, {meta['device']}, "
        f"{meta['seconds']:.0f} s); bench/accuracy/retrieval.py says how. {data['questions']} questions on "
        f"{meta['pairs']} two-camera scenes (the asked scene on one camera, a scene without the asked shape on the "
        "other). Each cell: the share of questions for which the check holds, 95 % Wilson interval; the last row "
        "of each table is the control, the same checks on random relevance (uniform per token, seeded per "
        f"question): what chance gives each column. PTP reads LLM layer {meta['llm_layer']}."
        + (
            f" **Supervised** marks the layers whose attention the proxy's training supervised "
            f"(layers {', '.join(map(str, sorted(supervised)))}, from its train_log.jsonl): no method may read them."
            if supervised
            else ""
        ),
        "",
    ]
    for name, title in (
        ("relevance", "PTP's instruction relevance (the selector's reduction over the instruction rows)"),
        ("last", "The last prompt token's row (FastV's)"),
    ):
        lines += [f"## {title}", "", "| LLM layer | " + " | ".join(h for _, h in CHECKS) + " |"]
        lines.append("|---" * (len(CHECKS) + 1) + "|")
        table = [
            (_layer_label(int(layer), meta["llm_layer"], supervised), cells[name])
            for layer, cells in data["shares"].items()
        ]
        for label, cells in [*table, ("random relevance (control)", data["controls"][CONTROL]["shares"])]:
            shown = " | ".join(f"{p:.2f} [{lo:.2f}, {hi:.2f}]" for p, lo, hi in (cells[key] for key, _ in CHECKS))
            lines.append(f"| {label} | {shown} |")
        lines.append("")
    (out / "results.md").write_text("\n".join(lines))


def _layer_label(layer: int, read: int, supervised: set[int]) -> str:
    return f"{layer} (supervised)" if layer in supervised else f"{layer} (PTP's)" if layer == read else str(layer)


def main(args, argv: list[str] | None) -> int:
    """``ptp-eval --retrieval-probe`` with ``args`` from ptp-eval's parser."""
    from ptp_ros.vlm.defaults import default_model_path
    from ptp_ros.vlm.loading import LoadOptions, load_adapter

    from . import _command, _shown

    split = {"validation": "val"}.get(args.split, args.split) or "val"
    pairs = args.scenes or (2 if args.quick else 30)
    per_type = args.per_type or (1 if args.quick else 2)
    model = Path(args.model) if args.model else default_model_path()
    device = args.device or "cpu"
    adapter = load_adapter(model, LoadOptions(device=device, dtype=args.dtype))
    layers = list(range(adapter.model.config.text_config.num_hidden_layers))
    start = time.perf_counter()
    rows = probe(adapter, split, pairs, per_type, layers)
    meta = {
        "command": _command(argv),
        "model": _shown(model),
        "split": split,
        "device": device,
        "pairs": pairs,
        "per_type": per_type,
        "layers": layers,
        "llm_layer": adapter.options.llm_layer,
        "supervised_layers": supervised_layers(model),
        "seconds": time.perf_counter() - start,
    }
    data = build(rows, meta)
    write(data, args.out or Path("docs/accuracy/retrieval"))
    control = data["controls"][CONTROL]["shares"]
    for layer, cells in [*data["shares"].items(), (CONTROL, {"relevance": control})]:
        same, camera = cells["relevance"]["same_view"][0], cells["relevance"]["camera_by_evidence"][0]
        print(f"[ptp-eval --retrieval-probe] {layer}: asked > same-view objects {same:.2f}, camera {camera:.2f}")
    return 0
