"""Turn ``Results`` into results.json, a markdown report and a plot of accuracy against keep ratio."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ptp_ros.proxy import QUESTION_TYPES

from .methods import Method
from .runner import FULL, GLOBAL_ONLY, Results, summarize_ci


def _nanmean(values: list[float]) -> float | None:
    arr = np.asarray(values, dtype=float)
    return None if np.all(np.isnan(arr)) else round(float(np.nanmean(arr)), 4)


def paired_difference(a: list[int], b: list[int]) -> tuple[float, float]:
    """Mean of a − b over the same questions and its 95 % half-width (normal approximation)."""
    d = np.asarray(a, float) - np.asarray(b, float)
    return float(d.mean()), float(1.96 * d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")


def build(results: Results, methods: list[Method], ratios: tuple[float, ...], meta: dict) -> dict:
    """Everything the report shows, as JSON-ready data (accuracy, CI, relative accuracy, recall, per type)."""
    full = results.correct[(FULL, 1.0)]
    full_acc = float(np.mean(full))
    qtypes = np.asarray(results.qtypes)

    def entry(label: str, ratio: float) -> dict:
        correct = results.correct[(label, ratio)]
        acc, lo, hi = summarize_ci(correct)
        types = qtypes[: len(correct)]
        by_type = {t: round(float(np.mean(np.asarray(correct)[types == t])), 4) for t in QUESTION_TYPES
                   if np.any(types == t)}
        ptp = results.correct.get(("ptp", ratio)) if ratio < 1.0 else None
        # methods run on fewer scenes (ablations) are compared on the questions both have: the first ones
        diff, half = (paired_difference(ptp[: len(correct)], correct) if ptp is not None and label != "ptp"
                      else (None, None))
        return {"n": len(correct), "accuracy": round(acc, 4), "ci95": [round(lo, 4), round(hi, 4)],
                "relative": round(acc / full_acc, 4) if full_acc else None, "by_type": by_type,
                "target_recall": _nanmean(results.recall[(label, ratio)]),
                "kept_ratio": round(float(np.mean(results.kept_ratio[(label, ratio)])), 4),
                "ptp_minus_this": None if diff is None else [round(diff, 4), round(half, 4)]}

    methods_out = {}
    for m in methods:
        per_ratio = {"1.0": entry(FULL, 1.0)}
        per_ratio.update({f"{r:g}": entry(m.label, r) for r in ratios if r < 1.0})
        methods_out[m.label] = {"group": m.group, "selector": m.selector, "options": m.options, "reduce": m.reduce,
                                "adapter": dict(m.adapter),
                                "ratios": per_ratio}
    return {"meta": {**meta, "questions": len(full), "scenes": len(set(results.scenes)),
                     "question_types": {t: int(np.sum(qtypes == t)) for t in QUESTION_TYPES}},
            "all_tokens": entry(FULL, 1.0),
            "global_only": entry(GLOBAL_ONLY, 0.0) if (GLOBAL_ONLY, 0.0) in results.correct else None,
            "methods": methods_out}


def _cell(e: dict) -> str:
    return f"{100 * e['accuracy']:.1f} ± {100 * (e['ci95'][1] - e['ci95'][0]) / 2:.1f}"


def markdown(data: dict, ratios: tuple[float, ...]) -> str:
    meta = data["meta"]
    rs = [f"{r:g}" for r in ratios if r < 1.0]
    lines = [f"# Accuracy under pruning: the proxy high-resolution VQA task ({meta['split']} split)", "",
             f"Model `{meta['model']}`; {meta['questions']} questions on {meta['scenes']} scenes "
             f"({', '.join(f'{k}: {v}' for k, v in meta['question_types'].items())}). "
             f"Accuracy in % with 95 % Wilson intervals; written by `{meta['command']}` "
             f"in {meta['seconds']:.0f} s.", "",
             f"* all tokens: **{_cell(data['all_tokens'])}**"]
    glob = data["global_only"]
    if glob is not None:
        lines.append(f"* global view only (kept ratio {glob['kept_ratio']:.3f}): **{_cell(glob)}**")
    lines += ["", "## Accuracy by keep ratio", "",
              "| method | " + " | ".join(rs) + " |", "|---|" + "---|" * len(rs)]
    for label, m in data["methods"].items():
        n = m["ratios"][rs[0]]["n"]
        lines.append(f"| {label}{'' if n == meta['questions'] else f' (n={n})'} | "
                     + " | ".join(_cell(m["ratios"][r]) for r in rs) + " |")
    lines += ["", "## Relative accuracy (pruned / all tokens) and PTP − method (paired, 95 %)", "",
              "| method | " + " | ".join(rs) + " |", "|---|" + "---|" * len(rs)]
    for label, m in data["methods"].items():
        cells = []
        for r in rs:
            e = m["ratios"][r]
            d = e["ptp_minus_this"]
            rel = "–" if e["relative"] is None else f"{100 * e['relative']:.1f} %"
            cells.append(rel + ("" if d is None else f" ({100 * d[0]:+.1f} ± {100 * d[1]:.1f})"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Target-object token recall (share of the tile tokens over the asked-about objects that are kept)",
              "", "| method | " + " | ".join(rs) + " |", "|---|" + "---|" * len(rs)]
    for label, m in data["methods"].items():
        lines.append(f"| {label} | " + " | ".join(
            "–" if m["ratios"][r]["target_recall"] is None else f"{100 * m['ratios'][r]['target_recall']:.1f}"
            for r in rs) + " |")
    pick = rs[len(rs) // 2] if "0.111" not in rs else "0.111"
    types = list(data["all_tokens"]["by_type"])
    lines += ["", f"## Accuracy by question type at keep ratio {pick}", "",
              "| method | " + " | ".join(types) + " |", "|---|" + "---|" * len(types),
              "| all tokens | " + " | ".join(f"{100 * data['all_tokens']['by_type'][t]:.1f}" for t in types) + " |"]
    if glob is not None:
        lines.append("| global view only | " + " | ".join(f"{100 * glob['by_type'][t]:.1f}" for t in types) + " |")
    for label, m in data["methods"].items():
        lines.append(f"| {label} | " + " | ".join(f"{100 * m['ratios'][pick]['by_type'][t]:.1f}" for t in types) + " |")
    return "\n".join(lines) + "\n"


def plot(data: dict, ratios: tuple[float, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in ratios if r < 1.0]
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, m in data["methods"].items():
        if m["group"] == "ablation":
            continue
        acc = [100 * m["ratios"][f"{r:g}"]["accuracy"] for r in rs]
        err = [100 * (m["ratios"][f"{r:g}"]["ci95"][1] - m["ratios"][f"{r:g}"]["ci95"][0]) / 2 for r in rs]
        ax.errorbar(rs, acc, yerr=err, marker="o", capsize=3, lw=2.5 if m["group"] == "ptp" else 1.2, label=label)
    ax.axhline(100 * data["all_tokens"]["accuracy"], color="k", ls="--", lw=1, label="all tokens")
    g = data["global_only"]
    if g is not None:
        ax.errorbar([g["kept_ratio"]], [100 * g["accuracy"]], yerr=[[100 * (g["accuracy"] - g["ci95"][0])],
                    [100 * (g["ci95"][1] - g["accuracy"])]], marker="s", color="gray", ls="none",
                    label="global view only")
    ax.set_xscale("log")
    ax.set_xticks(rs, [f"{r:g}" for r in rs])
    ax.set_xticks([], minor=True)  # the log axis's own minor labels would overprint the ratios
    ax.set_xlabel("keep ratio (visual tokens kept)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Proxy high-resolution VQA: accuracy vs keep ratio")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(data: dict, ratios: tuple[float, ...], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    (out / "results.md").write_text(markdown(data, ratios))
    plot(data, ratios, out / "accuracy_vs_keep_ratio.png")
