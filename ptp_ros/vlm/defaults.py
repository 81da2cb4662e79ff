"""The built-in default model: what ``ptp-ask``, the demo node and ``ptp-eval`` use when no model is given.

That is the proxy LLaVA-NeXT trained on the high-resolution proxy task (``bench/proxy/train.py``),
shipped with the package (safetensors + processor + training log, a few MB).  It answers questions
about coloured shapes in cluttered scenes (see ``ptp_ros.proxy``); on other images its answers mean
nothing, but its whole path (anyres tiles, [CLS] and instruction saliency, pruned generation) is real.

``tiny_model_path`` builds the untrained tiny LLaVA-NeXT into the user's cache instead: deterministic,
~2 MB, for tests that need a model but no trained behaviour.  It is the test fixture of
``ptp_ros.testing.llava_next``: this module is the one place the library depends on ``ptp_ros.testing``
(which ships with the package), and only when the package lacks its proxy checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

PROXY_MODEL = Path(__file__).resolve().parents[1] / "models" / "proxy-llava-next"
#: The same task learned by a proxy Qwen2.5-VL (no tiles, no global view): ``ptp-ask --model`` it, and
#: ``ptp-eval`` compares pruning with lowering its ``max_pixels`` on it.
PROXY_QWEN_MODEL = PROXY_MODEL.parent / "proxy-qwen2_5_vl"
TINY_NAME = "tiny-llava-next-v1"


def cache_dir() -> Path:
    root = os.environ.get("PTP_ROS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "ptp_ros"
    )
    return Path(root)


def default_model_path() -> Path:
    """The shipped proxy checkpoint (falls back to the tiny untrained model if the package lacks it)."""
    if (PROXY_MODEL / "config.json").is_file() and any(PROXY_MODEL.glob("*.safetensors")):
        return PROXY_MODEL
    return tiny_model_path()


def tiny_model_path() -> Path:
    """Path of the tiny random-weight checkpoint, building it on first use (atomically, so racing
    processes never see half a checkpoint)."""
    target = cache_dir() / TINY_NAME
    if (target / "config.json").is_file():
        return target
    from ..testing.llava_next import build_tiny_llava_next

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=TINY_NAME + ".", dir=target.parent))
    try:
        build_tiny_llava_next(staging)
        try:
            staging.rename(target)
        except OSError:  # another process won the race
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
