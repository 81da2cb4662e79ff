"""``ptp-eval``: accuracy of PTP, its ablations and peer selectors on the proxy high-resolution VQA task.

ptp-eval                      # test split, all methods, writes docs/accuracy/
ptp-eval --sweep              # validation split, candidate PTP defaults, writes docs/accuracy/sweep/
ptp-eval --fusion-sweep       # validation split, candidate fusions, writes docs/accuracy/fusion_sweep/
ptp-eval --diversity-sweep    # validation split, within-region selection, writes docs/accuracy/diversity_sweep/
ptp-eval --quick              # two scenes, for CI (< 2 min), writes to a temporary folder
ptp-eval --model ptp_ros/models/proxy-qwen2_5_vl --out docs/accuracy/qwen2_5_vl
                              # Qwen2.5-VL, with the max_pixels down-scaling baseline at every ratio
ptp-eval --multicamera        # two-camera proxy scenes, one shared budget: the camera splits' target recall,
                              # writes docs/accuracy/multicamera/
ptp-eval --retrieval-probe    # layer by layer: does the instruction's attention prefer the asked object over
                              # other objects? (the premise of PTP's instruction and camera levels)
ptp-eval --data frames/data.jsonl --model CHECKPOINT --device cuda --out results/
                              # your own labelled frames and checkpoint (bench/accuracy/dataset.py);
                              # resumable: answers are cached in OUT/cache.jsonl as they come
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from ptp_ros.budget import keep_ratio_arg

from .matching import MATCHERS

RATIOS = (1.0, 0.5, 0.25, 0.111, 0.056)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(prog="ptp-eval", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the built-in proxy model)")
    ap.add_argument(
        "--split",
        default=None,
        choices=("train", "val", "validation", "test"),
        help="val (or validation): where defaults are chosen, the default of every sweep; test: the report, run "
        "once after the defaults are fixed (the default without a sweep)",
    )
    ap.add_argument(
        "--scenes",
        type=int,
        default=None,
        help="default: 600, ~4 300 questions, so that a 95 %% interval is under ±1.5 "
        "points even at 50 %% accuracy (40 with --sweep, 2 with --quick)",
    )
    ap.add_argument(
        "--per-type", type=int, default=None, help="questions of each type per scene (default: 2, 1 with --quick)"
    )
    ap.add_argument(
        "--ablation-scenes",
        type=int,
        default=100,
        help="run the PTP ablations on the first N scenes only (default: 100; 0: all)",
    )
    ap.add_argument(
        "--ratios",
        type=keep_ratio_arg,
        nargs="+",
        default=list(RATIOS),
        help="keep ratios (default: %(default)s). The matched-cost table reads each peer at PTP's total cost "
        "between its two neighbouring measured ratios (keep-all included) and never extrapolates: add ratios "
        "until every peer's are close around PTP's cost",
    )
    ap.add_argument("--sweep", action="store_true", help="compare candidate PTP defaults instead of the peers")
    ap.add_argument(
        "--fusion-sweep",
        action="store_true",
        help="compare candidate fusions of saliency and relevance (validation split)",
    )
    ap.add_argument(
        "--diversity-sweep",
        action="store_true",
        help="compare PTP's diverse within-region selection with top-k and DivPrune (validation split)",
    )
    ap.add_argument(
        "--stage-sweep",
        action="store_true",
        help="choose the defaults: where PTP's instruction stage runs (inside the LLM at K=2/4, before it, over "
        "candidates), top-k vs the diverse pick, fusion and alpha, beside the peers and controls (validation split)",
    )
    ap.add_argument("--quick", action="store_true", help="a few scenes, for CI")
    ap.add_argument(
        "--multicamera",
        action="store_true",
        help="two-camera proxy scenes under one budget: target recall of PTP's camera splits (view_split shared, "
        "equal, alone), and single-camera requests through the camera mapping vs the bare image (--scenes: "
        "two-camera scenes, default 120)",
    )
    ap.add_argument(
        "--retrieval-probe",
        action="store_true",
        help="layer by layer on the two-camera proxy scenes: does the instruction's attention prefer the asked "
        "object over the other objects of its view and of the other camera (validation split; --scenes: "
        "two-camera scenes, default 30); writes docs/accuracy/retrieval/",
    )
    ap.add_argument(
        "--methods",
        nargs="+",
        default=None,
        metavar="NAME",
        help="only these rows, by label or selector name (default: all of the mode's rows; with "
        "--data: PTP and the peers, no ablations). The control rows (random before the LLM; random-after-K and "
        "no-visual-after-K for every layer K a row prunes inside the LLM at) are added to any choice and can be "
        "named too, e.g. --methods ptp random-after-1",
    )
    ap.add_argument(
        "--data",
        type=Path,
        default=None,
        metavar="FILE.jsonl",
        help="score your own labelled frames instead of the proxy task: one JSON object a line with "
        "image (relative to the file), question, answers; optional id, type",
    )
    ap.add_argument(
        "--limit",
        type=int,
        default=None,
        metavar="N",
        help="with --data: the first N items only (a smoke run before a long one; cached answers carry over)",
    )
    ap.add_argument(
        "--match",
        default="normalised",
        choices=MATCHERS,
        help="with --data: how an answer matches the references (default: normalised, VQA-style)",
    )
    ap.add_argument(
        "--max-new-tokens",
        type=int,
        default=16,
        help="with --data: the most tokens an answer may take (default 16; the model's end-of-sequence token "
        "ends it sooner: the proxy models' after one word)",
    )
    ap.add_argument(
        "--prompt",
        default="{question}",
        metavar="TEMPLATE",
        help='with --data: the instruction sent for each item, e.g. "{question} Answer the question '
        'using a single word or phrase." (default: the question alone)',
    )
    ap.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: cpu; auto with --data)")
    ap.add_argument("--dtype", default="auto", help="auto | float32 | float16 | bfloat16 (default: auto)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data is not None:
        return _data_main(ap, args, argv)
    if args.retrieval_probe:
        from . import retrieval

        return retrieval.main(args, argv)
    if args.multicamera:
        from . import multicamera

        given = args.ratios != list(RATIOS)  # the parser's default is the single-camera report's
        return multicamera.main(args, argv, tuple(args.ratios) if given else multicamera.RATIOS)

    from ptp_ros.proxy import make_questions, make_scene, split_seed
    from ptp_ros.vlm.defaults import default_model_path
    from ptp_ros.vlm.loading import LoadOptions, load_adapter

    from ..rows import Row
    from . import report
    from .methods import (
        comparison_methods,
        control_methods,
        diversity_methods,
        fusion_methods,
        main_rows,
        stage_methods,
        sweep_methods,
        with_controls,
    )
    from .runner import DOWNSCALED, Evaluator, Results

    sweep = args.sweep or args.fusion_sweep or args.diversity_sweep or args.stage_sweep
    split = {"validation": "val"}.get(args.split, args.split) or ("val" if sweep else "test")
    scenes = args.scenes or (2 if args.quick else 40 if sweep else 600)
    per_type = args.per_type or (1 if args.quick else 2)
    out = args.out or (
        Path(tempfile.mkdtemp(prefix="ptp-eval-"))
        if args.quick
        else Path("docs/accuracy/fusion_sweep")
        if args.fusion_sweep
        else Path("docs/accuracy/diversity_sweep")
        if args.diversity_sweep
        else Path("docs/accuracy/stage_sweep")
        if args.stage_sweep
        else Path("docs/accuracy/sweep")
        if args.sweep
        else Path("docs/accuracy")
    )
    ratios = tuple(sorted(set(args.ratios) | {1.0}, reverse=True))
    model = Path(args.model) if args.model else default_model_path()
    adapter = load_adapter(model, LoadOptions(device=args.device or "cpu", dtype=args.dtype))
    if args.sweep and not adapter.region_scores:
        ap.error(f"--sweep compares the region scores of tiled models; {adapter.name} has none")
    methods = (
        sweep_methods()
        if args.sweep
        else fusion_methods()
        if args.fusion_sweep
        else diversity_methods()
        if args.diversity_sweep
        else stage_methods()
        if args.stage_sweep
        else comparison_methods()
    )
    llm_layer = adapter.options.llm_layer
    if args.methods:
        methods = _picked(ap, methods + control_methods(methods, llm_layer), args.methods)
    methods = with_controls(methods, llm_layer)
    main_methods = main_rows(methods, llm_layer)
    evaluator = Evaluator(adapter, methods, ratios)
    results = Results()
    start = time.perf_counter()
    for k in range(scenes):
        scene = make_scene(split_seed(split, k))
        chosen = methods if args.ablation_scenes == 0 or k < args.ablation_scenes else main_methods
        evaluator.scene(scene, make_questions(scene, per_type), results, chosen)
        if (k + 1) % 10 == 0 or k + 1 == scenes:
            print(
                f"[ptp-eval] {k + 1}/{scenes} scenes, {len(results.qtypes)} questions, "
                f"{time.perf_counter() - start:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    meta = {
        "split": split,
        "model": _shown(model),
        "command": _command(argv),
        "seconds": time.perf_counter() - start,
        "ratios": list(ratios),
        "per_type": per_type,
        "ablation_scenes": args.ablation_scenes,
        "llm_layer": llm_layer,
        "llm_layers": adapter.model.config.text_config.num_hidden_layers,
    }
    rows = methods + ([Row(DOWNSCALED, None)] if evaluator.downscales else [])
    data = report.build(results, rows, ratios, meta)
    report.write(data, ratios, out)
    glob = "" if data["global_only"] is None else f", global only {data['global_only']['accuracy']:.3f}"
    print(
        f"[ptp-eval] all tokens {data['all_tokens']['accuracy']:.3f}{glob}; wrote {out}/results.json, "
        "results.md, accuracy_vs_keep_ratio.png"
    )
    return 0


def _data_main(ap: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None) -> int:
    """``--data``: every chosen row × ratio on the user's frames through ``Pipeline.answer``, resumable."""
    from ptp_ros.vlm.defaults import default_model_path
    from ptp_ros.vlm.loading import ModelLoadError, quiet_transformers, resolve_device, resolve_dtype
    from ptp_ros.vlm.stock_adapter import TiledModelOptions

    from ..cost_model import MODELS, llm_dims_from_config
    from ..models import load_model
    from ..rows import Row
    from . import report
    from .data_runner import AnswerCache, DataEvaluator, progress_printer
    from .dataset import DataError, load_items
    from .methods import comparison_methods, control_methods, with_controls
    from .runner import DOWNSCALED, Results

    if args.max_new_tokens < 1:
        ap.error("--max-new-tokens must be >= 1")
    if args.limit is not None and args.limit < 1:
        ap.error("--limit must be >= 1")
    try:
        if "{question}" not in args.prompt or args.prompt.format(question="q") is None:
            raise ValueError("it has no {question}")
    except (ValueError, KeyError, IndexError) as exc:
        ap.error(f"--prompt {args.prompt!r} is not a template of {{question}}: {exc}")
    pool = comparison_methods()
    # names are checked before the model loads, so the controls on offer are those of the default LLM layer
    offered = pool + control_methods(pool, TiledModelOptions.llm_layer)
    methods = _picked(ap, offered, args.methods) if args.methods else [m for m in pool if m.group != "ablation"]
    try:
        items = load_items(args.data)[: args.limit]
    except DataError as exc:
        print(f"ptp-eval: {exc}", file=sys.stderr)
        return 2
    quiet_transformers()
    scratch = tempfile.TemporaryDirectory(prefix="ptp-eval-")  # for --model tiny, built like a user's checkpoint
    try:
        device = resolve_device(args.device or "auto")
        model = args.model or str(default_model_path())
        adapter = load_model(model, device, resolve_dtype(args.dtype, device), Path(scratch.name))
    except (ModelLoadError, ValueError) as exc:
        print(f"ptp-eval: {exc}", file=sys.stderr)
        return 2
    methods = with_controls(methods, adapter.options.llm_layer)
    named = model == "tiny" or model in MODELS  # built here, not a checkpoint directory
    ratios = tuple(sorted(set(args.ratios) | {1.0}, reverse=True))
    out = args.out or Path(tempfile.mkdtemp(prefix="ptp-eval-data-"))
    settings = {
        "model": model if named else str(Path(model).resolve()),
        "device": str(adapter.device),
        "dtype": str(adapter.dtype),
        "max_new_tokens": args.max_new_tokens,
        "prompt": args.prompt,
    }
    cache = AnswerCache(out / "cache.jsonl", settings)
    evaluator = DataEvaluator(adapter, methods, ratios, cache, args.max_new_tokens, args.match, args.prompt)
    cells = len(evaluator.cells())
    print(
        f"[ptp-eval] {len(items)} items × {cells} cells on {adapter.name} ({settings['device']}, "
        f"{settings['dtype']}); {len(cache.entries)} answers already in {cache.path}",
        file=sys.stderr,
        flush=True,
    )
    results = Results()
    start = time.perf_counter()
    try:
        fresh = evaluator.run(items, results, progress_printer())
    except DataError as exc:
        print(f"ptp-eval: {exc}", file=sys.stderr)
        return 2
    finally:
        cache.close()
    meta = {
        "split": "data",
        "task": f"`{_shown(args.data)}` ({len(items)} questions)",
        "model": model if named else _shown(model),
        "image_word": "images",
        "plot_title": args.data.name,
        "command": _command(argv),
        "seconds": time.perf_counter() - start,
        "ratios": list(ratios),
        "match": args.match,
        "max_new_tokens": args.max_new_tokens,
        "prompt": args.prompt,
        "device": settings["device"],
        "dtype": settings["dtype"].removeprefix("torch."),
        "computed_answers": fresh,
        "llm_layer": adapter.options.llm_layer,
        "llm_layers": adapter.model.config.text_config.num_hidden_layers,
        "llm": llm_dims_from_config(adapter.model.config.text_config) if named else None,
    }
    scratch.cleanup()
    rows = methods + ([Row(DOWNSCALED, None)] if evaluator.downscales else [])
    data = report.build(results, rows, ratios, meta)
    report.write(data, ratios, out)
    (out / "answers.jsonl").write_text("".join(json.dumps(a, ensure_ascii=False) + "\n" for a in evaluator.answers))
    print(
        f"[ptp-eval] all tokens {data['all_tokens']['accuracy']:.3f} on {len(items)} questions ({fresh} answers "
        f"computed, {len(items) * cells - fresh} from the cache); wrote {out}/results.json, results.md, "
        "answers.jsonl"
    )
    return 0


def _picked(ap: argparse.ArgumentParser, methods: list, names: list[str]) -> list:
    from .methods import pick_methods

    try:
        return pick_methods(methods, names)
    except ValueError as exc:
        ap.error(str(exc))


def _shown(path: Path | str) -> str:
    path = Path(path)
    return os.path.relpath(path) if path.resolve().is_relative_to(Path.cwd()) else str(path)


def _command(argv: list[str] | None) -> str:
    return ("ptp-eval " + " ".join(argv if argv is not None else sys.argv[1:])).strip()


if __name__ == "__main__":
    raise SystemExit(main())
