"""Keep-all = stock generate, on any model the project loads: ``python -m ptp_ros_bench.equivalence``.

The library's promise is that pruning changes only which visual tokens the LLM reads.  With every token
kept, the adapter's generate (the path ``Pipeline`` runs) and the in-LLM hooks that keep every token must
give stock transformers ``generate``'s tokens, one for one.  The tests hold this on the tiny models in fp32;
this command checks it on a real checkpoint or a real-size random-weight model, in the dtype a robot runs
(fp16/bf16), where kernels and the length of the prompt differ.  Exit status 1 when a frame differs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from ptp_ros.pruning import InLLMPruning
from ptp_ros.vlm.loading import ModelLoadError, quiet_transformers, resolve_device, resolve_dtype

from .accuracy.dataset import DataError, load_items, read_image
from .models import load_model

FRAMES = Path(__file__).resolve().parent / "data" / "frames" / "data.jsonl"


def keep_everything(rows: torch.Tensor) -> torch.Tensor:
    return torch.arange(rows.shape[1])


@torch.no_grad()
def check_frame(adapter, image, instruction: str, max_new_tokens: int) -> dict:
    """Stock generate's tokens against the adapter's keep-all generate and its in-LLM hooks keeping all."""
    prepared = adapter.prepare(image, instruction)
    visual = adapter.encode(prepared)
    stock = adapter.generate_reference(prepared, max_new_tokens)
    ours = adapter.generate(prepared, visual, None, max_new_tokens)
    hooked = adapter.generate(
        prepared, visual, None, max_new_tokens, in_llm=(InLLMPruning.fastv(adapter.options.llm_layer), keep_everything)
    )
    return {
        "visual_tokens": visual.num_tokens,
        "stock": stock.token_ids,
        "keep_all": ours.token_ids,
        "in_llm_keep_all": hooked.token_ids,
        "equal": stock.token_ids == ours.token_ids == hooked.token_ids,
        "prefill_ms": {
            "stock": round(stock.prefill_ms, 2),
            "keep_all": round(ours.prefill_ms, 2),
            "in_llm_keep_all": round(hooked.prefill_ms, 2),
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ptp_ros_bench.equivalence", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model",
        default="tiny",
        help="checkpoint directory, 'tiny', or a real-size name from "
        "bench/cost_model.py MODELS built with random weights (e.g. llava-next-7b)",
    )
    ap.add_argument("--data", type=Path, default=FRAMES, help="frames to check (ptp-eval --data's JSONL)")
    ap.add_argument("--frames", type=int, default=3, help="how many items of --data (default 3)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", type=Path, default=None, help="write the per-frame tokens here as JSON")
    args = ap.parse_args(argv)
    quiet_transformers()
    try:
        items = load_items(args.data)[: args.frames]
        device = resolve_device(args.device)
        with tempfile.TemporaryDirectory() as scratch:
            start = time.perf_counter()
            adapter = load_model(args.model, device, resolve_dtype(args.dtype, device), Path(scratch))
            print(
                f"[equivalence] {args.model} on {device} ({adapter.dtype}) ready in "
                f"{time.perf_counter() - start:.1f} s",
                file=sys.stderr,
                flush=True,
            )
            frames = [
                {"id": item.id, **check_frame(adapter, read_image(item.image), item.question, args.max_new_tokens)}
                for item in items
            ]
    except (DataError, ModelLoadError, ValueError) as exc:
        print(f"equivalence: {exc}", file=sys.stderr)
        return 2
    report = {
        "model": args.model,
        "device": str(device),
        "dtype": str(adapter.dtype).removeprefix("torch."),
        "max_new_tokens": args.max_new_tokens,
        "frames": frames,
        "all_equal": all(f["equal"] for f in frames),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    for f in frames:
        print(
            f"[equivalence] {f['id']}: {f['visual_tokens']} visual tokens, {len(f['stock'])} tokens, "
            f"{'equal' if f['equal'] else 'DIFFERENT'} (prefill ms {f['prefill_ms']})"
        )
    print(
        f"[equivalence] keep-all = stock generate on {len(frames)} frame(s): {'yes' if report['all_equal'] else 'NO'}"
    )
    return 0 if report["all_equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
