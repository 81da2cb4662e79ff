"""Shared fixtures: offline hub, the tiny LLaVA-NeXT on disk, the bundled sample image."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "ptp_ros" / "data"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random-weight LLaVA-NeXT saved to disk, as a user's checkpoint would be."""
    from ptp_ros.vlm.tiny import build_tiny_llava_next

    return build_tiny_llava_next(tmp_path_factory.mktemp("models") / "tiny-llava-next")


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model_dir):
    from ptp_ros.vlm.loading import LoadOptions, load_adapter

    return load_adapter(tiny_model_dir, LoadOptions(device="cpu"))


@pytest.fixture(scope="session")
def sample_image() -> np.ndarray:
    """The bundled 1920×1080 scene, RGB uint8."""
    return cv2.cvtColor(cv2.imread(str(DATA / "sample_scene.jpg")), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def ros(tmp_path_factory):
    """One isolated ROS domain for a test module, also applied to the test process."""
    from ros_helpers import apply_env, ros_env

    saved = dict(os.environ)
    env = ros_env(tmp_path_factory.mktemp("ros_log"))
    apply_env(env)
    yield env
    os.environ.clear()
    os.environ.update(saved)
