"""The built-in default model: what ``ptp-ask`` and the demo use when no model is given.

Until the trained proxy exists this is the tiny random-weight LLaVA-NeXT, built once from its config
into the user's cache (deterministic, ~2 MB) and then loaded like any real checkpoint.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

TINY_NAME = "tiny-llava-next-v1"


def cache_dir() -> Path:
    root = os.environ.get("PTP_ROS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "ptp_ros")
    return Path(root)


def default_model_path() -> Path:
    """Path of the built-in default checkpoint, building it on first use (atomically, so racing
    processes never see half a checkpoint)."""
    target = cache_dir() / TINY_NAME
    if (target / "config.json").is_file():
        return target
    from .tiny import build_tiny_llava_next

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
