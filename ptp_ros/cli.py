"""``ptp-ask``: ask a vision-language model about an image, with PTP pruning, from the shell.

Bad input ends with one line on stderr and exit code 2 — never a traceback (set PTP_ROS_DEBUG=1 to
see one for unexpected failures).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from textwrap import fill

from .budget import DEFAULT_KEEP_RATIO, keep_ratio_arg
from .pruning import VIEW_SPLITS, ConfiguredSelector, selector_names, selector_specs

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _named_path(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name.strip(), path


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (``--help`` still shows the usage)."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog="ptp-ask",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=fill(
            "Answer an instruction about an image with a vision-language model, keeping only the visual tokens "
            "Pyramid Token Pruning ranks highest."
        ),
        epilog="selectors:\n"
        + "\n".join(
            fill(spec.description, 96, initial_indent=f"  {spec.name:<16}", subsequent_indent=" " * 18)
            for spec in selector_specs()
        ),
    )
    p.add_argument("image", nargs="?", help="image file (any format OpenCV reads); or the views of --image")
    p.add_argument("instruction", help='the question or task, e.g. "what colour is the cup?"')
    p.add_argument(
        "--image",
        dest="views",
        action="append",
        type=_named_path,
        metavar="NAME=PATH",
        help="a camera view, by name (repeat it: the views go into one prompt, in order, under one token budget); "
        "instead of the positional image",
    )
    p.add_argument(
        "--view-split",
        choices=VIEW_SPLITS,
        default=None,
        help="how several views share the budget: shared (default: by the instruction's attention), equal, or "
        "alone (each view its own keep ratio)",
    )
    p.add_argument(
        "--model", help="local checkpoint directory or a repo id in the local HF cache (default: the built-in model)"
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--keep-ratio",
        type=keep_ratio_arg,
        help=f"fraction of visual tokens to keep, in (0, 1] (default {DEFAULT_KEEP_RATIO}: the ratio PTP's defaults "
        "were chosen at; 1 keeps all)",
    )
    budget.add_argument("--tokens", type=_positive_int, help="number of visual tokens to keep")
    p.add_argument(
        "--selector",
        default="ptp",
        metavar="|".join(selector_names()),
        help="token selector (default: ptp; each is described below)",
    )
    p.add_argument(
        "--alpha", type=float, default=None, help="PTP's weight of instruction relevance, in [0, 1] (default 0.5)"
    )
    p.add_argument(
        "--prune-in-llm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="rank and drop inside the LLM at its relevance layer (default) or, with --no-prune-in-llm, "
        "before it after a separate relevance probe",
    )
    p.add_argument(
        "--probe-candidates",
        type=float,
        default=None,
        metavar="M",
        help="with --no-prune-in-llm: probe only PTP's ⌈M × budget⌉ bottom-up best tokens (M >= 1)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=32,
        help="the most tokens the answer may take (default 32); the model's end-of-sequence token ends it sooner",
    )
    p.add_argument(
        "--max-pixels",
        type=_positive_int,
        metavar="N",
        help="read the image at most N pixels large (Qwen2.5-VL, Qwen3-VL; default: the checkpoint's own cap)",
    )
    p.add_argument(
        "--min-pixels",
        type=_positive_int,
        metavar="N",
        help="read the image at least N pixels large (Qwen2.5-VL, Qwen3-VL; default: the checkpoint's own floor)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto | float32 | float16 | bfloat16")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the answer text")
    p.add_argument("--saliency", type=Path, metavar="OUT.png", help="write the saliency / kept-token image here")
    return p


def _read_image(path: str):
    import cv2
    import numpy as np

    if not Path(path).is_file():
        raise CliError(f"image not found: {path}")
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise CliError(f"cannot read image {path}: not an image format OpenCV understands")
    return np.ascontiguousarray(bgr[:, :, ::-1])


def _read_views(args: argparse.Namespace):
    """The positional image, or the ``--image NAME=PATH`` views as a name → image dict (prompt order)."""
    if (args.image is None) == (not args.views):
        raise CliError("give one image, or camera views with --image NAME=PATH (not both)")
    if args.image is not None:
        return _read_image(args.image)
    names = [name for name, _ in args.views]
    if len(set(names)) != len(names):
        raise CliError(f"camera names must differ, got {', '.join(names)}")
    return {name: _read_image(path) for name, path in args.views}


def configured_selector(args: argparse.Namespace) -> ConfiguredSelector:
    """The selector the flags configure, from the flags the user gave (argparse's default ``None``: not given), so
    that the value refuses an option the selector does not take whatever its value (``--selector fastv
    --alpha 0.5``)."""
    given = {
        "prune_in_llm": args.prune_in_llm,
        "probe_candidates": args.probe_candidates,
        "view_split": getattr(args, "view_split", None),
    }
    options = {} if args.alpha is None else {"alpha": args.alpha}
    return ConfiguredSelector(args.selector, options, **{k: v for k, v in given.items() if v is not None})


def run(args: argparse.Namespace) -> int:
    from .pipeline import InvalidRequest, Pipeline, PipelineConfig
    from .vlm.defaults import default_model_path
    from .vlm.loading import LoadOptions, ModelLoadError, load_adapter, quiet_transformers

    quiet_transformers()

    if args.saliency is not None and not args.saliency.parent.is_dir():
        raise CliError(f"cannot write {args.saliency}: folder {args.saliency.parent} does not exist")
    image = _read_views(args)
    try:
        config = PipelineConfig(selector=configured_selector(args), max_new_tokens=args.max_new_tokens)
        resolution = {"max_pixels": args.max_pixels, "min_pixels": args.min_pixels}
        adapter = load_adapter(
            args.model or default_model_path(),
            LoadOptions(device=args.device, dtype=args.dtype),
            **{name: value for name, value in resolution.items() if value is not None},
        )
        pipeline = Pipeline(adapter, config)
        keep_ratio = DEFAULT_KEEP_RATIO if args.keep_ratio is None and args.tokens is None else args.keep_ratio
        answer = pipeline.answer(image, args.instruction, keep_ratio=keep_ratio, tokens=args.tokens)
    except (InvalidRequest, ModelLoadError, ValueError) as exc:
        raise CliError(str(exc)) from exc
    if args.saliency is not None:
        import cv2

        from .overlay import saliency_images

        drawn = saliency_images(image if isinstance(image, dict) else {answer.view_names[0]: image}, answer)
        for name, overlay in drawn.items():
            path = args.saliency if len(drawn) == 1 else args.saliency.with_name(f"{args.saliency.stem}.{name}.png")
            if not cv2.imwrite(str(path), overlay):
                raise CliError(f"cannot write {path}")
    if args.json:
        print(json.dumps(answer.result().to_json()))
    else:
        print(answer.text)
    return 0


def ask_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except CliError as exc:
        print(f"ptp-ask: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:  # noqa: BLE001 - the CLI's promise is one line, not a traceback
        if os.environ.get("PTP_ROS_DEBUG"):
            raise
        print(f"ptp-ask: failed: {type(exc).__name__}: {exc} (PTP_ROS_DEBUG=1 shows the traceback)", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(ask_main())
