"""``ptp-bench``: what pruning buys — FLOPs, latency, memory — for every selector, side by side.

    ptp-bench --out docs/benchmarks                       # real-size CPU proxy, fp32 (≈20–40 min on 2 cores)
    ptp-bench --out /tmp/gpu --model llava-next-7b --merge  # 7B-size random weights, fp16, on CUDA
    ptp-bench --out /tmp/quick --quick                    # tiny model, < 1 min: checks the benchmark itself
    ptp-bench --out docs/benchmarks/sequence --sequence --threads 1   # reusing the vision encoding on a camera
    ptp-bench --out docs/benchmarks --views 2 --threads 1  # 2 camera views: one batched encode vs 2 single ones

Writes ``results.json`` (every raw figure, machine, versions), ``README.md`` (tables, targets) and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ptp_ros.budget import check_keep_ratio

from .cost_model import MODELS, cost_table, llm_dims_from_config
from .machine import describe, load_snapshot
from .measure import DEFAULT_SELECTORS, measure
from .models import MEASURABLE, TINY_MODELS, load_model
from .report import add_flops, markdown, plots, summarize, targets, upgrade_run

SAMPLE_IMAGE = Path(__file__).resolve().parents[1] / "ptp_ros" / "data" / "sample_scene.jpg"
INSTRUCTION = (
    "what is on the table to the left of the robot ? describe the colour , shape and size of every "
    "object you can see in the scene , and count the objects near the door ."
)
KEEP_RATIOS = [1.0, 0.5, 0.25, 0.111, 0.056]
QUICK_KEEP_RATIOS = [1.0, 0.25, 0.111]
ANALYTIC_MODELS = ("llava-next-7b", "llava-next-13b", "cpu-proxy", "internvl2-8b")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ptp-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="folder for results.json, README.md and the plots")
    p.add_argument(
        "--quick", action="store_true", help="tiny model, 2 repetitions, 3 ratios, 4 new tokens: checks the benchmark"
    )
    p.add_argument(
        "--model",
        default=None,
        help=f"a tiny checkpoint ({', '.join(TINY_MODELS)}: 'tiny' is LLaVA-NeXT's), one of "
        f"{', '.join(MEASURABLE)} (random weights, real size) or a checkpoint directory "
        "(default: cpu-proxy; tiny with --quick)",
    )
    p.add_argument("--device", default=None, help="cpu | cuda[:N] (default: cuda for the 7B/13B sizes, else cpu)")
    p.add_argument("--repetitions", type=int, default=None, help="runs per cell (default 3; 2 with --quick)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generated tokens, fixed (default 8; 4 --quick)")
    p.add_argument(
        "--keep-ratios", default=None, help=f"comma-separated (default {KEEP_RATIOS}; {QUICK_KEEP_RATIOS} with --quick)"
    )
    p.add_argument(
        "--selectors",
        default=",".join(s.label for s in DEFAULT_SELECTORS),
        metavar="ROW,...",
        help="comma-separated rows, of (default: all) PTP three ways, every other registered selector "
        f"and the oracle: {', '.join(s.label for s in DEFAULT_SELECTORS)}",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's choice). On a CPU shared with other busy processes "
        "1 thread avoids the stalls of threads waiting for each other, which hit short prompts most",
    )
    p.add_argument("--image", type=Path, default=SAMPLE_IMAGE)
    p.add_argument("--instruction", default=INSTRUCTION)
    p.add_argument(
        "--report-only",
        action="store_true",
        help="measure nothing: rebuild README.md and the plots from OUT/results.json",
    )
    p.add_argument(
        "--sequence",
        action="store_true",
        help="camera-sequence mode (bench/sequence.py): end-to-end time per request with and without reusing the "
        "vision encoding, for 1/2/4 questions per frame and four camera sequences, and the answers' agreement with "
        "encoding from scratch on the trained proxy model",
    )
    p.add_argument("--sequence-questions", type=int, default=3, help="questions per sequence (--sequence; default 3)")
    p.add_argument(
        "--sequence-scenes", type=int, default=4, help="scenes per sequence for the answers (--sequence; default 4)"
    )
    p.add_argument(
        "--reuse-threshold",
        type=float,
        default=0.02,
        help="encode_reuse_threshold of the reusing pipeline (--sequence; default 0.02)",
    )
    p.add_argument(
        "--views",
        type=int,
        default=None,
        metavar="N",
        help="measure only the vision encode of N camera views in one batch against N single encodes (writes "
        "OUT/views.json and OUT/views.md; see bench/views.py)",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the runs of other models/devices already in OUT/results.json (e.g. add a GPU run)",
    )
    return p


def run(args: argparse.Namespace, log=sys.stderr) -> dict:
    model = args.model or ("tiny" if args.quick else "cpu-proxy")
    device = torch.device(args.device or ("cuda" if model in ("llava-next-7b", "llava-next-13b") else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"ptp-bench: {model} on {device} needs a GPU and none is available here "
            "(the 7B size needs ~27 GB in fp32 and bf16/fp16 are slow on CPUs)"
        )
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    repetitions = args.repetitions or (2 if args.quick else 3)
    max_new_tokens = args.max_new_tokens or (4 if args.quick else 8)
    try:
        ratios = (
            [check_keep_ratio(float(r)) for r in args.keep_ratios.split(",")]
            if args.keep_ratios
            else (QUICK_KEEP_RATIOS if args.quick else KEEP_RATIOS)
        )
    except ValueError as exc:
        raise SystemExit(f"ptp-bench: --keep-ratios: {exc}") from None
    by_name = {s.label: s for s in DEFAULT_SELECTORS}
    unknown = [n for n in args.selectors.split(",") if n not in by_name]
    if unknown:
        raise SystemExit(f"ptp-bench: unknown selector row(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
    selectors = tuple(by_name[n] for n in args.selectors.split(","))
    image = np.asarray(Image.open(args.image).convert("RGB"))

    if args.threads:
        torch.set_num_threads(args.threads)
    before = load_snapshot()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        try:
            adapter = load_model(model, device, dtype, Path(scratch))
        except ValueError as exc:
            raise SystemExit(f"ptp-bench: {exc}") from exc
        build_s = time.perf_counter() - start
        print(f"ptp-bench: {model} on {device} ({dtype}) ready in {build_s:.1f} s", file=log, flush=True)
        records = measure(adapter, image, args.instruction, ratios, selectors, repetitions, max_new_tokens, log=log)
        text_config = adapter.model.config.text_config
        prepared = adapter.prepare(image, args.instruction)
        pixels = prepared.inputs["pixel_values"]
        query_tokens = _query_tokens(adapter, prepared)
        # views encoded: [1, tiles, 3, H, W] (LLaVA-NeXT), [tiles, 3, H, W] (InternVL); none for patch lists (Qwen)
        tiles = {5: int(pixels.shape[1]), 4: int(pixels.shape[0])}.get(pixels.dim())
    wall_s = time.perf_counter() - start
    unpruned = next(r for r in records if r["selector"] == "unpruned")
    return {
        "model": model if model in TINY_MODELS or model in MODELS else Path(model).name,
        "machine": describe(device),
        "build_s": build_s,
        "wall_s": wall_s,
        "settings": {
            "dtype": str(dtype).removeprefix("torch."),
            "image": args.image.name,
            "tiles": tiles,
            "visual_tokens": unpruned["visual_tokens"],
            "text_tokens": unpruned["prompt_tokens"] - unpruned["visual_tokens"],
            "instruction": args.instruction,
            "keep_ratios": ratios,
            "repetitions": repetitions,
            "max_new_tokens": max_new_tokens,
            "selectors": [s.record() for s in selectors],
            "llm_layers": text_config.num_hidden_layers,
            "quick": args.quick,
            # for the total-FLOPs column (bench/cost_model.py): the LLM's dims, the relevance layer,
            # the instruction rows that rank
            "llm": llm_dims_from_config(text_config),
            "llm_layer": adapter.options.llm_layer,
            "query_tokens": query_tokens,
        },
        "load": {"before": before, "after": load_snapshot()},
        "records": records,
    }


def _query_tokens(adapter, prepared) -> int | None:
    """The prompt tokens after the image: the rows that rank visual tokens by instruction attention."""
    from ptp_ros.vlm.stock_adapter import instruction_query_positions

    try:
        return int(instruction_query_positions(prepared.inputs["input_ids"], adapter.image_token_id).numel())
    except (AttributeError, KeyError, ValueError):
        return None


def analytic(runs: list[dict], ratios: list[float]) -> dict[str, list[dict]]:
    """Cost-model tables: the published models at 2880 + 60 tokens, the proxy at its measured counts."""
    tables = {}
    for name in ANALYTIC_MODELS:
        measured = next((r for r in runs if r["model"] == name), None)
        if measured:
            s = measured["settings"]
            tables[name] = cost_table(name, ratios, text_tokens=s["text_tokens"], visual_tokens=s["visual_tokens"])
        else:
            tables[name] = cost_table(name, ratios)
    return tables


def _run_key(run_: dict) -> tuple:
    """One run per (model, device, threads): a new run replaces its namesake under --merge."""
    return run_["model"], run_["machine"]["device"], run_["machine"]["torch_threads"]


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = _parser().parse_args(argv)
    if args.sequence:
        from . import sequence

        args.argv = sys.argv[1:] if argv is None else list(argv)
        return sequence.main(args)
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    if args.views is not None:
        return views_main(args, argv)
    if args.report_only:
        runs = [upgrade_run(r) for r in json.loads(results_path.read_text())["runs"]]
    else:
        new_run = run(args)
        (args.out / f"raw-{new_run['model']}.json").write_text(json.dumps(new_run))  # safe before any reporting
        runs = [new_run]
        if args.merge and results_path.is_file():
            old = [upgrade_run(r) for r in json.loads(results_path.read_text())["runs"]]
            runs = [r for r in old if _run_key(r) != _run_key(new_run)] + runs
    runs = sorted(runs, key=_run_key)
    ratios = sorted({r for run_ in runs for r in run_["settings"]["keep_ratios"]}, reverse=True)
    results = {"schema": 2, "generated_by": "ptp-bench", "runs": runs, "analytic": analytic(runs, ratios)}
    for r in runs:  # summaries and targets always from the raw records, so report changes apply to old runs
        r["summary"] = summarize(r["records"])
        add_flops(r)
        r["targets"] = targets(r["records"], r["summary"], results["analytic"])
    results_path.write_text(json.dumps(results, indent=1))
    for raw in args.out.glob("raw-*.json"):  # now part of results.json
        raw.unlink()
    (args.out / "README.md").write_text(markdown(results))
    files = plots(results, args.out)
    print(f"ptp-bench: wrote {results_path}, README.md, {', '.join(files)} to {args.out}", file=sys.stderr)
    return 0


def views_main(args: argparse.Namespace, argv: list[str] | None) -> int:
    """``--views N``: batched against single encodes of N views (bench/views.py)."""
    from .views import measure_views, write_views

    if args.views < 1:
        raise SystemExit("ptp-bench: --views must be >= 1")
    model = args.model or ("tiny" if args.quick else "cpu-proxy")
    device = torch.device(args.device or ("cuda" if model in ("llava-next-7b", "llava-next-13b") else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    before = load_snapshot()
    with tempfile.TemporaryDirectory() as scratch:
        try:
            adapter = load_model(model, device, dtype, Path(scratch))
        except ValueError as exc:
            raise SystemExit(f"ptp-bench: {exc}") from exc
        image = np.asarray(Image.open(args.image).convert("RGB"))
        result = measure_views(adapter, image, args.instruction, args.views, args.repetitions or 3)
    after = load_snapshot()
    command = "ptp-bench " + " ".join(sys.argv[1:] if argv is None else argv)
    conditions = (
        f"1-min load average {before['load_avg_1m']:.1f} before and {after['load_avg_1m']:.1f} after, on "
        f"{describe(device)['logical_cpus']} logical CPUs shared with other work."
    )
    write_views(
        {
            "command": command,
            "model": model,
            "real_size": model in MODELS,
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "machine": describe(device),
            "load": {"before": before, "after": after},
            "conditions": conditions,
            "result": result,
        },
        args.out,
    )
    print(
        f"ptp-bench: {args.views} views: batched {result['batched_median_ms']:.0f} ms, single "
        f"{result['single_median_ms']:.0f} ms ({result['speedup']:.2f}x); wrote {args.out}/views.json, views.md",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
