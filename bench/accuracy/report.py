"""Turn ``Results`` into results.json, a markdown report and two plots: accuracy against total LLM prefill
FLOPs (the main one: every scoring pass included, from bench/cost_model.py, with the control rows on it) and
against keep ratio.

Every method's cell carries its paired gain over the random control of its own stage (``control_for``), and
PTP's default is compared with every peer at matched total cost (``matched_cost``)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from ptp_ros.proxy import QUESTION_TYPES

from ..cost_model import Passes, llm_dims_from_model_path, prefill_breakdown
from ..rows import Row
from .methods import control_for
from .runner import FULL, GLOBAL_ONLY, Results, summarize_ci

#: How a peer's accuracy at PTP's total cost is read off its measured points (the report says so).
MATCHED_RULE = (
    "linear interpolation of accuracy in total prefill FLOPs between the two neighbouring measured keep ratios "
    "of the peer (keep ratio 1, all tokens, counts as measured); no extrapolation"
)
OUTSIDE = "outside measured range"


def _nanmean(values: list[float]) -> float | None:
    arr = np.asarray(values, dtype=float)
    return None if np.all(np.isnan(arr)) else round(float(np.nanmean(arr)), 4)


def paired_difference(a: list[int], b: list[int]) -> tuple[float, float]:
    """Mean of a − b over the same questions and its 95 % half-width (normal approximation)."""
    d = np.asarray(a, float) - np.asarray(b, float)
    return float(d.mean()), float(1.96 * d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")


def _interval(diff: float, half: float) -> list[float]:
    return [round(diff - half, 4), round(diff + half, 4)]


def llm_dims(meta: dict) -> dict | None:
    """The cost model's dims of the evaluated LLM: ``meta["llm"]`` when the caller passed them, else read
    from the checkpoint's config.json at ``meta["model"]``; ``None`` when neither is there."""
    if meta.get("llm"):
        return meta["llm"]
    try:
        return llm_dims_from_model_path(meta["model"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def _flops(
    results: Results,
    llm: dict | None,
    label: str,
    ratio: float,
    passes: Passes | None,
    read_whole: bool = False,
    regions: int = 1,
    questions: int | None = None,
) -> dict | None:
    """Mean total LLM prefill FLOPs per question of one row (scoring passes and selection included), from
    its per-question kept counts and the prompt's text / visual token counts.  ``read_whole``: the row read
    a smaller image whole (the down-scaling baseline), so its visual tokens are its kept ones.  ``questions``:
    the first that many only."""
    kept_ratio = results.kept_ratio.get((label, ratio), [])[:questions]
    if llm is None or passes is None or not kept_ratio or len(results.text_tokens) < len(kept_ratio):
        return None
    parts = []
    sizes = results.region_sizes + [[]] * (len(kept_ratio) - len(results.region_sizes))
    for share, text, visual, own in zip(kept_ratio, results.text_tokens, results.visual_tokens, sizes):
        kept = round(share * visual)
        parts.append(prefill_breakdown(llm, text, kept if read_whole else visual, kept, passes, regions=own or regions))
    return {key: float(np.mean([p[key] for p in parts])) / 1e9 for key in ("total", "scoring", "selection")}


def build(results: Results, methods: list[Row], ratios: tuple[float, ...], meta: dict) -> dict:
    """Everything the report shows, as JSON-ready data (accuracy, CI, relative accuracy, recall, per type, the
    mean total LLM prefill GFLOPs per question with its ratio to all tokens, the paired gain over the row's
    control, the control rows and the matched-cost comparison).

    ``methods`` holds the control rows too (``group == "control"``, ``methods.control_methods``): they are
    reported under ``controls``.  The FLOPs need the LLM's dims (``meta["llm"]``, a
    ``cost_model.llm_dims_from_config`` dict, else read from ``meta["model"]``'s config.json) and the adapter's
    relevance layer (``meta["llm_layer"]``, default 2)."""
    full = results.correct[(FULL, 1.0)]
    full_acc = float(np.mean(full))
    qtypes = np.asarray(results.qtypes)
    # the proxy's types in their usual order, a user's in order of appearance
    types = [t for t in QUESTION_TYPES if t in results.qtypes] + [
        t for t in dict.fromkeys(results.qtypes) if t not in QUESTION_TYPES
    ]
    llm = llm_dims(meta)
    llm_layer = meta.get("llm_layer", 2)
    regions = meta.get("regions", 1)  # PTP's per-region diverse pick: one region is the upper bound

    def gain(correct: list[int], ratio: float, control: str | None) -> dict | None:
        """The row's paired gain over ``control`` on the questions both have (a row run on fewer scenes: the
        first ones)."""
        reference = results.correct.get((control, ratio)) if control is not None and ratio < 1.0 else None
        if not reference:
            return None
        n = min(len(correct), len(reference))
        diff, half = paired_difference(correct[:n], reference[:n])
        return {"control": control, "diff": round(diff, 4), "ci95": _interval(diff, half), "n": n}

    def entry(
        label: str,
        ratio: float,
        passes: Passes | None = Passes(),
        read_whole: bool = False,
        control: str | None = None,
    ) -> dict:
        correct = results.correct[(label, ratio)]
        acc, lo, hi = summarize_ci(correct)
        mine = qtypes[: len(correct)]
        by_type = {t: round(float(np.mean(np.asarray(correct)[mine == t])), 4) for t in types if np.any(mine == t)}
        ptp = results.correct.get(("ptp", ratio)) if ratio < 1.0 else None
        # methods run on fewer scenes (ablations) are compared on the questions both have: the first ones
        diff, half = (
            paired_difference(ptp[: len(correct)], correct) if ptp is not None and label != "ptp" else (None, None)
        )
        flops = _flops(results, llm, label, ratio, passes, read_whole, regions)
        # against all tokens on the same questions (a row run on fewer scenes has the first ones)
        base = _flops(results, llm, FULL, 1.0, Passes(), questions=len(correct)) if flops else None
        return {
            "n": len(correct),
            "accuracy": round(acc, 4),
            "ci95": [round(lo, 4), round(hi, 4)],
            "relative": round(acc / full_acc, 4) if full_acc else None,
            "by_type": by_type,
            "target_recall": _nanmean(results.recall[(label, ratio)]),
            "kept_ratio": round(float(np.mean(results.kept_ratio[(label, ratio)])), 4),
            "ptp_minus_this": None if diff is None else [round(diff, 4), round(half, 4)],
            "gain_over_control": gain(correct, ratio, control),
            "prefill_gflops": None if flops is None else round(flops["total"], 6),
            "scoring_gflops": None if flops is None else round(flops["scoring"] + flops["selection"], 6),
            "flops_ratio": None if flops is None else round(flops["total"] / base["total"], 4),
            "latency_ms": _latency(results.latency_ms.get((label, ratio))),
        }

    methods_out, controls_out = {}, {}
    for m in methods:
        control = None if m.group == "control" else control_for(m, llm_layer)
        passes = m.passes(llm_layer)
        pruned = {f"{r:g}": entry(m.label, r, passes, m.selector is None, control) for r in ratios if r < 1.0}
        selector = m.selector.record() if m.selector is not None else {"selector": None, "options": {}}
        described = {
            "selector": selector["selector"],
            "options": selector["options"],
            "passes": dataclasses.asdict(passes),
        }
        if m.group == "control":
            k = m.prune_layer(llm_layer)
            stage = {"stage": "pre_llm" if k is None else "in_llm", "prune_layer": k}
            controls_out[m.label] = {**stage, **described, "ratios": pruned}
            continue
        methods_out[m.label] = {
            "group": m.group,
            **described,
            "reduce": selector.get("reduce"),
            "adapter": dict(m.adapter),
            "prune_in_llm": selector.get("prune_in_llm", False),
            "control": control,
            "ratios": {"1.0": entry(FULL, 1.0), **pruned},
        }
    return {
        "meta": {
            **meta,
            "questions": len(full),
            "scenes": len(set(results.scenes)),
            "question_types": {t: int(np.sum(qtypes == t)) for t in types},
            "llm": llm,
            "llm_layer": llm_layer,
            "llm_layers": meta.get("llm_layers") or (llm or {}).get("layers"),
        },
        "all_tokens": entry(FULL, 1.0),
        "global_only": entry(GLOBAL_ONLY, 0.0) if (GLOBAL_ONLY, 0.0) in results.correct else None,
        "methods": methods_out,
        "controls": controls_out,
        "matched_cost": matched_cost(results, methods_out, ratios),
    }


def matched_cost(results: Results, methods: dict, ratios: tuple[float, ...], reference: str = "ptp") -> dict | None:
    """For ``reference`` (PTP's default) at each keep ratio, every peer at the keep ratio whose total prefill
    FLOPs equal PTP's: accuracy read off the peer's measured points by ``MATCHED_RULE``, with PTP − peer paired
    on the same questions (the peer's per-question correctness mixed with the same weights).  ``None`` without
    a reference row or FLOPs."""
    ref = methods.get(reference)
    if ref is None or ref["ratios"]["1.0"].get("prefill_gflops") is None:
        return None
    out = {}
    for r in ratios:
        cell = ref["ratios"].get(f"{r:g}") if r < 1.0 else None
        if cell is None or cell["prefill_gflops"] is None:
            continue
        ptp = results.correct[(reference, r)]
        peers = {
            label: _at_cost(results, label, m, cell["prefill_gflops"], ptp)
            for label, m in methods.items()
            if m["group"] == "peer"
        }
        ptp_cell = {k: cell[k] for k in ("accuracy", "ci95", "prefill_gflops", "flops_ratio")}
        out[f"{r:g}"] = {reference: ptp_cell, "peers": peers}
    return {"reference": reference, "rule": MATCHED_RULE, "ratios": out}


def _at_cost(results: Results, label: str, method: dict, target: float, reference: list[int]) -> dict:
    """``label``'s accuracy at ``target`` total GFLOPs (``MATCHED_RULE``) and ``reference`` − it, paired."""
    points = sorted(
        (float(r), c["prefill_gflops"]) for r, c in method["ratios"].items() if c.get("prefill_gflops") is not None
    )
    for (r0, f0), (r1, f1) in zip(points, points[1:]):
        if min(f0, f1) <= target <= max(f0, f1):
            w = 0.0 if f1 == f0 else (target - f0) / (f1 - f0)
            a0, a1 = (np.asarray(results.correct[(FULL, 1.0) if r == 1.0 else (label, r)], float) for r in (r0, r1))
            n = min(len(a0), len(a1), len(reference))
            mixed = (1 - w) * a0[:n] + w * a1[:n]
            diff, half = paired_difference(reference[:n], mixed)
            return {
                "accuracy": round(float(mixed.mean()), 4),
                "keep_ratio": round(r0 + w * (r1 - r0), 4),
                "between": [r0, r1],
                "reference_minus_this": {"diff": round(diff, 4), "ci95": _interval(diff, half), "n": n},
                "note": None,
            }
    measured = [f for _, f in points]
    return {"accuracy": None, "note": OUTSIDE, "measured_gflops": [min(measured), max(measured)] if measured else None}


def _latency(per_question: list[dict] | None) -> dict | None:
    """Median milliseconds per stage over the questions (``None``: the run did not time answers one by one)."""
    if not per_question:
        return None
    stages = dict.fromkeys(k for timings in per_question for k in timings)
    return {k: round(float(np.median([t.get(k, 0.0) for t in per_question])), 3) for k in stages}


def _cell(e: dict) -> str:
    return f"{100 * e['accuracy']:.1f} ± {100 * (e['ci95'][1] - e['ci95'][0]) / 2:.1f}"


def markdown(data: dict, ratios: tuple[float, ...]) -> str:
    meta = data["meta"]
    rs = [f"{r:g}" for r in ratios if r < 1.0]
    task = meta.get("task") or f"the proxy high-resolution VQA task ({meta['split']} split)"
    lines = [
        f"# Accuracy under pruning: {task}",
        "",
        f"Model `{meta['model']}`; {meta['questions']} questions on {meta['scenes']} "
        f"{meta.get('image_word', 'scenes')} "
        f"({', '.join(f'{k}: {v}' for k, v in meta['question_types'].items())}). "
        f"Accuracy in % with 95 % Wilson intervals; written by `{meta['command']}` "
        f"in {meta['seconds']:.0f} s.",
        "",
        f"* all tokens: **{_cell(data['all_tokens'])}**" + _gflops_note(data["all_tokens"]),
    ]
    glob = data["global_only"]
    if glob is not None:
        lines.append(
            f"* global view only (kept ratio {glob['kept_ratio']:.3f}): **{_cell(glob)}**" + _gflops_note(glob)
        )
    if meta.get("match"):
        lines.append(
            f"* answers matched by rule `{meta['match']}` (bench/accuracy/matching.py), "
            f"at most {meta['max_new_tokens']} new token(s), instruction `{meta.get('prompt', '{question}')}`, "
            f"device {meta['device']}, dtype {meta['dtype']}"
        )
    if meta.get("llm_layers"):
        lines.append(f"* the LLM has {meta['llm_layers']} layers")
    lines += _flops_section(data, rs)
    lines += _latency_section(data, rs)
    lines += _method_table(data, rs, "## Accuracy by keep ratio", _cell, _controls_intro(data), show_n=True)
    lines += _gain_section(data, rs)
    lines += _matched_section(data)
    lines += _method_table(
        data, rs, "## Relative accuracy (pruned / all tokens) and PTP − method (paired, 95 %)", _relative_cell
    )
    if any(m["ratios"][r]["target_recall"] is not None for m in data["methods"].values() for r in rs):
        lines += _method_table(
            data,
            rs,
            "## Target-object token recall (share of the tile tokens over the asked-about objects that are kept)",
            lambda e: "–" if e["target_recall"] is None else f"{100 * e['target_recall']:.1f}",
        )
    pick = rs[len(rs) // 2] if "0.111" not in rs else "0.111"
    types = list(data["all_tokens"]["by_type"])
    lines += [
        "",
        f"## Accuracy by question type at keep ratio {pick}",
        "",
        "| method | " + " | ".join(types) + " |",
        "|---|" + "---|" * len(types),
        "| all tokens | " + " | ".join(f"{100 * data['all_tokens']['by_type'][t]:.1f}" for t in types) + " |",
    ]
    if glob is not None:
        lines.append("| global view only | " + " | ".join(f"{100 * glob['by_type'][t]:.1f}" for t in types) + " |")
    for label, m in _rows(data):
        by_type = m["ratios"][pick]["by_type"]
        lines.append(
            f"| {label} | " + " | ".join(f"{100 * by_type[t]:.1f}" if t in by_type else "–" for t in types) + " |"
        )
    return "\n".join(lines) + "\n"


def _rows(data: dict):
    """(shown label, row) of every method, then of every control row, marked as one."""
    yield from data["methods"].items()
    yield from ((f"{label} (control)", c) for label, c in data.get("controls", {}).items())


def _method_table(
    data: dict,
    rs: list[str],
    heading: str,
    cell,
    intro: tuple[str, ...] = (),
    show_n: bool = False,
) -> list[str]:
    """A report section: ``heading``, ``intro`` lines, then one row per method (and control row) with
    ``cell(entry)`` per keep ratio (``show_n``: a row run on fewer questions says how many)."""
    lines = ["", heading, "", *intro, "| method | " + " | ".join(rs) + " |", "|---|" + "---|" * len(rs)]
    for label, m in _rows(data):
        n = m["ratios"][rs[0]]["n"]
        shown = f"{label} (n={n})" if show_n and n != data["meta"]["questions"] else label
        lines.append(f"| {shown} | " + " | ".join(cell(m["ratios"][r]) for r in rs) + " |")
    return lines


def _controls_intro(data: dict) -> tuple[str, ...]:
    """What the control rows are, for the first table."""
    controls = data.get("controls") or {}
    if not controls:
        return ()
    inside = sorted({c["prune_layer"] for c in controls.values() if c["stage"] == "in_llm"})
    text = (
        "Control rows: `random` keeps random visual tokens (seeded) before the LLM, the control of every method "
        "that prunes before it"
    )
    if inside:
        ks = ", ".join(map(str, inside))
        text += (
            f"; for each layer K at which a row prunes inside the LLM (K = {ks}), `random-after-K` keeps as many "
            "random tokens as the rows do and drops the rest from layer K on exactly as they do (layers < K read "
            "every token, kept tokens keep their positions), and `no-visual-after-K` drops every visual token "
            "from layer K on: what layers < K alone carry to the answer"
        )
    return (text + ".", "")


def _gain_cell(e: dict) -> str:
    g = e.get("gain_over_control")
    if g is None:
        return "–"
    lo, hi = g["ci95"]
    return f"{100 * g['diff']:+.1f} ({100 * lo:+.1f} to {100 * hi:+.1f})" + (" **not ahead**" if not lo > 0 else "")


def _gain_section(data: dict, rs: list[str]) -> list[str]:
    """Every method's paired gain over the random control of its own stage, and the rows not ahead of it."""
    rows = [(label, m) for label, m in data["methods"].items() if m.get("control") in data.get("controls", {})]
    if not rows:
        return []
    intro = (
        "Accuracy points gained over the random control of the row's own stage on the same questions (paired, "
        "95 % interval): rows that prune before the LLM against `random`, rows that prune inside it from "
        "layer K against `random-after-K`. **not ahead**: the interval's lower end is ≤ 0, so on these questions "
        "the row's choice of tokens is not shown to beat random tokens dropped at the same place.",
        "",
    )
    lines = ["", "## Gain over the random control of the row's stage (paired, 95 %)", "", *intro]
    lines += ["| method (its control) | " + " | ".join(rs) + " |", "|---|" + "---|" * len(rs)]
    lines += [
        f"| {label} ({m['control']}) | " + " | ".join(_gain_cell(m["ratios"][r]) for r in rs) + " |"
        for label, m in rows
    ]
    behind = []
    for label, m in rows:
        at = [r for r in rs if (g := m["ratios"][r].get("gain_over_control")) is not None and not g["ci95"][0] > 0]
        if at:
            behind.append(f"{label} ({', '.join(at)})")
    if behind:
        lines += ["", "Not ahead of their control: " + "; ".join(behind) + "."]
    return lines


def _matched_section(data: dict) -> list[str]:
    """PTP's default against every peer at the keep ratio whose total prefill FLOPs equal PTP's."""
    matched = data.get("matched_cost")
    if not matched or not matched["ratios"]:
        return []
    rs = list(matched["ratios"])
    ref = matched["reference"]
    peers = list(next(iter(matched["ratios"].values()))["peers"])
    lines = [
        "",
        "## Accuracy at matched total cost",
        "",
        f"For `{ref}` at each keep ratio, each peer at the keep ratio whose total LLM prefill FLOPs (scoring passes "
        f"included) equal {ref}'s: {MATCHED_RULE}. A cell: the peer's accuracy there, the keep ratio it needs, "
        f"and {ref} − peer on the same questions (paired, 95 %); a cost the peer's measured ratios do not bracket "
        f"is {OUTSIDE} (add keep ratios with `--ratios` until they do).",
        "",
        f"| | {' | '.join(rs)} |",
        "|---|" + "---|" * len(rs),
        f"| **{ref}** (total × unpruned) | "
        + " | ".join(
            f"**{100 * matched['ratios'][r][ref]['accuracy']:.1f}** ({matched['ratios'][r][ref]['flops_ratio']:.3f}×)"
            for r in rs
        )
        + " |",
    ]
    for label in peers:
        cells = []
        for r in rs:
            c = matched["ratios"][r]["peers"][label]
            if c["accuracy"] is None:
                cells.append(c["note"])
                continue
            d = c["reference_minus_this"]
            cells.append(
                f"{100 * c['accuracy']:.1f} at {c['keep_ratio']:.3g} ({100 * d['diff']:+.1f}, "
                f"{100 * d['ci95'][0]:+.1f} to {100 * d['ci95'][1]:+.1f})"
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _relative_cell(e: dict) -> str:
    d = e["ptp_minus_this"]
    rel = "–" if e["relative"] is None else f"{100 * e['relative']:.1f} %"
    return rel + ("" if d is None else f" ({100 * d[0]:+.1f} ± {100 * d[1]:.1f})")


def _gflops_note(e: dict) -> str:
    return "" if e.get("prefill_gflops") is None else f", total LLM prefill {e['prefill_gflops']:.4g} GFLOPs"


def _flops_section(data: dict, rs: list[str]) -> list[str]:
    """Total prefill GFLOPs / ratio to all tokens, per method and keep ratio."""
    if data["all_tokens"].get("prefill_gflops") is None:
        return []
    llm = data["meta"]["llm"]
    intro = (
        f"Mean per question, from bench/cost_model.py with this model's own LLM ({llm['layers']} layers, width "
        f"{llm['hidden']}) at each question's token counts: the prefill at the lengths it runs at plus every "
        f"scoring pass — the relevance probe of pre-LLM methods that read instruction attention (LLM layers "
        f"0..{data['meta']['llm_layer'] - 1} over the full prompt + layer {data['meta']['llm_layer']}'s rows), "
        "the full-length layers and recomputed attention rows of in-LLM methods — and selection matmuls on the "
        "projected features (DivPrune's N×N distances). The down-scaled row reads a smaller image whole (its "
        "vision cost, not counted here, differs too). The main plot, `accuracy_vs_prefill_flops.png`, puts "
        "accuracy against these totals.",
        "",
    )
    # a row on fewer scenes: its GFLOPs are of those, its ratio to their all tokens
    return _method_table(
        data,
        rs,
        "## Total LLM prefill GFLOPs / ratio to all tokens",
        lambda e: "–" if e.get("prefill_gflops") is None else f"{e['prefill_gflops']:.4g} / {e['flops_ratio']:.3f}",
        intro,
        show_n=True,
    )


def _latency_section(data: dict, rs: list[str]) -> list[str]:
    """Median end-to-end milliseconds per answer and their ratio to all tokens, plus the prefill's share."""
    full = data["all_tokens"].get("latency_ms")
    if not full:
        return []
    intro = (
        f"All tokens: {full['total']:.1f} ms (prefill {full.get('prefill', 0.0):.1f} ms, encode "
        f"{full.get('encode', 0.0):.1f} ms). Measured one answer at a time, as the node serves them; the "
        "first answers include warm-up.",
        "",
    )

    def cell(e: dict) -> str:
        t = e.get("latency_ms")
        return "–" if not t else f"{t['total']:.1f} / {t['total'] / full['total']:.2f} ({t.get('prefill', 0.0):.1f})"

    heading = (
        f"## Latency per answer on {data['meta'].get('device', 'this device')}: median total ms / ratio "
        "to all tokens (median prefill ms)"
    )
    return _method_table(data, rs, heading, cell, intro)


def _ci_bars(e: dict) -> list[list[float]]:
    """One point's 95 % interval as ``errorbar``'s (below, above) distances, in accuracy points."""
    return [[100 * (e["accuracy"] - e["ci95"][0])], [100 * (e["ci95"][1] - e["accuracy"])]]


def _plotted(data: dict):
    """The plotted rows: every method but the ablations, then the control rows."""
    return [(label, m) for label, m in _rows(data) if m.get("group") != "ablation"]


def _style(row: dict) -> dict:
    """PTP bold, a method plain, a control row thin and dashed (random) or dash-dotted (no visual token)."""
    if "stage" in row:  # a control row
        return {"marker": "x", "lw": 1.0, "ls": "-." if row["selector"] == "no_visual_in_llm" else "--"}
    return {"marker": "o", "lw": 2.5 if row["group"] == "ptp" else 1.2}


def plot_flops(data: dict, ratios: tuple[float, ...], path: Path) -> bool:
    """Accuracy against mean total LLM prefill GFLOPs: one marker line per method and control row across the keep
    ratios (the frontier PTP's default must sit on), the all-tokens point (and the global view only); ``False``
    (nothing written) without FLOPs."""
    full = data["all_tokens"]
    if full.get("prefill_gflops") is None:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rs = [f"{r:g}" for r in ratios if r < 1.0]
    fig, ax = plt.subplots(figsize=(12, 5.5))
    for label, m in _plotted(data):
        cells = [m["ratios"][r] for r in rs if m["ratios"][r].get("prefill_gflops") is not None]
        if not cells:
            continue
        xs = [c["prefill_gflops"] for c in cells]
        acc = [100 * c["accuracy"] for c in cells]
        err = [100 * (c["ci95"][1] - c["ci95"][0]) / 2 for c in cells]
        ax.errorbar(xs, acc, yerr=err, ms=4, capsize=3, label=label, **_style(m))
    ax.errorbar(
        [full["prefill_gflops"]],
        [100 * full["accuracy"]],
        yerr=_ci_bars(full),
        marker="*",
        ms=14,
        color="k",
        ls="none",
        label="all tokens",
    )
    ax.axhline(100 * full["accuracy"], color="k", ls="--", lw=0.8)
    g = data["global_only"]
    if g is not None and g.get("prefill_gflops") is not None:
        ax.errorbar(
            [g["prefill_gflops"]],
            [100 * g["accuracy"]],
            yerr=_ci_bars(g),
            marker="s",
            color="gray",
            ls="none",
            label="global view only",
        )
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel(
        f"total LLM prefill GFLOPs per question (scoring passes included; all tokens: {full['prefill_gflops']:.3g})"
    )
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{data['meta'].get('plot_title', 'Proxy high-resolution VQA')}: accuracy vs total LLM prefill FLOPs")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot(data: dict, ratios: tuple[float, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in ratios if r < 1.0]
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, m in _plotted(data):
        acc = [100 * m["ratios"][f"{r:g}"]["accuracy"] for r in rs]
        err = [100 * (m["ratios"][f"{r:g}"]["ci95"][1] - m["ratios"][f"{r:g}"]["ci95"][0]) / 2 for r in rs]
        ax.errorbar(rs, acc, yerr=err, capsize=3, label=label, **_style(m))
    ax.axhline(100 * data["all_tokens"]["accuracy"], color="k", ls="--", lw=1, label="all tokens")
    g = data["global_only"]
    if g is not None:
        ax.errorbar(
            [g["kept_ratio"]],
            [100 * g["accuracy"]],
            yerr=_ci_bars(g),
            marker="s",
            color="gray",
            ls="none",
            label="global view only",
        )
    ax.set_xscale("log")
    ax.set_xticks(rs, [f"{r:g}" for r in rs])
    ax.set_xticks([], minor=True)  # the log axis's own minor labels would overprint the ratios
    ax.set_xlabel("keep ratio (visual tokens kept)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{data['meta'].get('plot_title', 'Proxy high-resolution VQA')}: accuracy vs keep ratio")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(data: dict, ratios: tuple[float, ...], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    (out / "results.md").write_text(markdown(data, ratios))
    plot_flops(data, ratios, out / "accuracy_vs_prefill_flops.png")  # the main plot
    plot(data, ratios, out / "accuracy_vs_keep_ratio.png")
