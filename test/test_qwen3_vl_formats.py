"""Qwen3-VL's near misses, as a user meets them: each refused in one line naming what to load instead, before
any weight file is opened."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from ptp_ros.vlm.loading import LoadOptions, ModelLoadError, load_adapter

#: config.json of the near misses (trimmed to the keys that identify them) and what the refusal must say.
NEAR_MISSES = {
    "qwen3_vl_moe": (
        {"model_type": "qwen3_vl_moe", "architectures": ["Qwen3VLMoeForConditionalGeneration"]},
        r"Qwen3-VL-MoE \(model_type 'qwen3_vl_moe'.*Qwen3VLMoeForConditionalGeneration.*no adapter; "
        r"use Qwen3-VL \(model_type 'qwen3_vl'\), e\.g\. Qwen/Qwen3-VL-8B-Instruct",
    ),
    "qwen3_5": (
        {"model_type": "qwen3_5", "architectures": ["Qwen3_5ForConditionalGeneration"]},
        r"Qwen3\.5 \(model_type 'qwen3_5'\), which has no adapter: .*linear-attention.*use Qwen3-VL",
    ),
    "qwen3_5_moe": (
        {"model_type": "qwen3_5_moe", "architectures": ["Qwen3_5MoeForConditionalGeneration"]},
        r"Qwen3\.5 \(model_type 'qwen3_5_moe'\), which has no adapter: .*use Qwen3-VL",
    ),
}
LONG_PATH = "/home/robot/checkpoints/" + "x" * 60


def refusal(model: Path) -> str:
    with pytest.raises(ModelLoadError) as caught:
        load_adapter(model, LoadOptions(device="cpu"))
    message = str(caught.value)
    assert "\n" not in message and len(message.replace(str(model), LONG_PATH)) < 480  # the node's log line keeps it
    return message


@pytest.mark.parametrize("name", NEAR_MISSES)
def test_near_miss_formats_are_named(tmp_path, name):
    config, expected = NEAR_MISSES[name]
    model = tmp_path / name
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config))
    message = refusal(model)
    assert message.startswith(f"{model} holds ")
    assert re.search(expected, message), message


@pytest.mark.parametrize("settings", [None, {"processor_class": "Qwen3VLProcessor"}])
def test_a_qwen3_vl_checkpoint_without_its_processor_config_is_named(tmp_path, tiny_checkpoint, settings):
    """No preprocessor_config.json and no image_processor entry in processor_config.json (none at all, or the
    older layout's processor_config.json naming only the processor class)."""
    model = Path(shutil.copytree(tiny_checkpoint("qwen3_vl"), tmp_path / "qwen3-vl"))
    (model / "processor_config.json").unlink()
    if settings is not None:
        (model / "processor_config.json").write_text(json.dumps(settings))
    message = refusal(model)
    assert message.startswith(f"{model} holds a 'qwen3_vl' model without its image processor config")
    assert "huggingface.co" not in message
