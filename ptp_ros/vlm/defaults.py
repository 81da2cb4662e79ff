"""The built-in default model: what ``ptp-ask``, the demo node and ``ptp-eval`` use when no model is given.

That is the proxy LLaVA-NeXT trained on the high-resolution proxy task (``bench/proxy/train.py``),
shipped with the package (safetensors + processor + training log, a few MB).  It answers questions
about coloured shapes in cluttered scenes (see ``ptp_ros.proxy``); on other images its answers mean
nothing, but its whole path (anyres tiles, [CLS] and instruction saliency, pruned generation) is real.

A package without it is a broken install: ``load_adapter`` refuses the path with the reason (no
``config.json``, no weights).  The untrained tiny models are test fixtures (``ptp_ros.testing``), never a
stand-in here.
"""

from __future__ import annotations

from pathlib import Path

PROXY_MODEL = Path(__file__).resolve().parents[1] / "models" / "proxy-llava-next"
#: The same task learned by a proxy Qwen2.5-VL (no tiles, no global view): ``ptp-ask --model`` it, and
#: ``ptp-eval`` compares pruning with lowering its ``max_pixels`` on it.
PROXY_QWEN_MODEL = PROXY_MODEL.parent / "proxy-qwen2_5_vl"
#: And by a proxy Qwen3-VL (DeepStack, 32-px merged tokens), trained with the 12-layer recipe.
PROXY_QWEN3_MODEL = PROXY_MODEL.parent / "proxy-qwen3_vl"


def default_model_path() -> Path:
    """The shipped proxy checkpoint, which every entry point loads when not given a model."""
    return PROXY_MODEL
