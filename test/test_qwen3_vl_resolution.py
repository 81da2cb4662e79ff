"""The resolution a Qwen model reads an image at (``max_pixels`` / ``min_pixels``): an option of the Qwen
families, a ``ptp-ask`` flag and a read-only node parameter, applied through the processor (the result's
``visual_tokens_total`` shows it), refused in one line when out of range or set for a family without it."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptp_ros.cli import ask_main
from ptp_ros.vlm.qwen2_5_vl import Qwen2_5_VLOptions
from ptp_ros.vlm.qwen3_vl import Qwen3VLAdapter, Qwen3VLOptions

FAMILY = "qwen3_vl"  # conftest's model_dir / adapter: the tiny Qwen3-VL (its own cap: 640 tokens)
SAMPLE = str(pytest.importorskip("conftest").DATA / "sample_scene.jpg")
INSTRUCTION = "what colour is the circle?"
TOKEN = 32 * 32  # pixels of one Qwen3-VL visual token


def visual_tokens(adapter, image: np.ndarray, **options) -> int:
    variant = Qwen3VLAdapter(adapter.model, adapter.processor, Qwen3VLOptions(**options))
    ids = variant.prepare(image, INSTRUCTION).inputs["input_ids"]
    return int((ids == adapter.image_token_id).sum())


def test_the_bounds_reach_the_processor(adapter, sample_image):
    # 1920×1080 capped at 300 tokens: smart_resize floors 1080 / 2.598 and 1920 / 2.598 to 12 and 23 tokens
    assert visual_tokens(adapter, sample_image) == 18 * 33  # the checkpoint's own cap
    assert visual_tokens(adapter, sample_image, max_pixels=300 * TOKEN) == 12 * 23
    small = np.zeros((64, 64, 3), dtype=np.uint8)
    assert visual_tokens(adapter, small) == 64  # the checkpoint's own floor: 64 tokens
    assert visual_tokens(adapter, small, min_pixels=144 * TOKEN) == 144
    # above the checkpoint's own 640-token cap, which follows it up: 45×45 (smart_resize rounds each side up)
    assert visual_tokens(adapter, small, min_pixels=2000 * TOKEN) == 45 * 45


def test_ptp_ask_reads_the_image_at_max_pixels(model_dir, capsys):
    argv = [SAMPLE, INSTRUCTION, "--model", str(model_dir), "--json", "--max-new-tokens", "1", "--device", "cpu"]
    assert ask_main([*argv, "--max-pixels", str(300 * TOKEN), "--keep-ratio", "0.5"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["visual_tokens_total"] == 12 * 23 and result["visual_tokens_kept"] == 138


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--max-pixels", "1000"],
            r"max_pixels must be an integer from 1024 \(one 32x32-px visual token\) to 16777216",
        ),
        (["--min-pixels", str(16385 * TOKEN)], r"min_pixels must be an integer from 1024 .* got 16778240"),
        (["--max-pixels", str(100 * TOKEN), "--min-pixels", str(200 * TOKEN)], "min_pixels 204800 is above max_pixels"),
    ],
)
def test_out_of_range_bounds_are_refused_in_one_line(model_dir, capsys, flags, message):
    assert ask_main([SAMPLE, INSTRUCTION, "--model", str(model_dir), "--device", "cpu", *flags]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err


def test_a_family_without_a_resolution_option_refuses_it(tiny_model_dir, capsys):
    assert ask_main([SAMPLE, INSTRUCTION, "--model", str(tiny_model_dir), "--max-pixels", "500000"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds a 'llava_next' model, which has no max_pixels option; its processor reads images at the " in err
    assert "(its options: llm_layer, region_score, vision_layer)" in err and len(err.splitlines()) == 1


def test_qwen2_5_vl_bounds_count_its_28_px_tokens():
    assert Qwen2_5_VLOptions(max_pixels=784).max_pixels == 784
    with pytest.raises(ValueError, match="from 784 .* to 12845056"):
        Qwen2_5_VLOptions(max_pixels=783)
    with pytest.raises(ValueError, match="got True"):
        Qwen3VLOptions(min_pixels=True)


def test_the_node_reads_its_resolution_parameters(ros, model_dir, tiny_model_dir):
    """Read-only parameters handed to the loader; 0 (the default) leaves the checkpoint's own."""
    rclpy = pytest.importorskip("rclpy")
    from rclpy.context import Context
    from rclpy.parameter import Parameter

    from ptp_ros.ros.node import AgentNode

    context = Context()
    rclpy.init(context=context)
    try:

        def node(path, **values):
            overrides = [Parameter("model_path", value=str(path)), Parameter("device", value="cpu")]
            overrides += [Parameter(name, value=value) for name, value in values.items()]
            return AgentNode(f"ptp_resolution_{len(values)}", context=context, parameter_overrides=overrides)

        capped = node(model_dir, max_pixels=300 * TOKEN, min_pixels=0).load_model()
        assert (capped.options.max_pixels, capped.options.min_pixels) == (300 * TOKEN, None)
        assert node(model_dir).load_model().options.max_pixels is None
        with pytest.raises(ValueError, match="'llava_next' model, which has no max_pixels option"):
            node(tiny_model_dir, max_pixels=500_000).load_model()
    finally:
        rclpy.shutdown(context=context)


@settings(max_examples=100, deadline=None)
@given(
    family=st.sampled_from([Qwen2_5_VLOptions, Qwen3VLOptions]),
    name=st.sampled_from(["max_pixels", "min_pixels"]),
    value=st.one_of(
        st.integers(-(2**40), 2**40),
        st.integers(0, 2 * 16384 * 1024),
        st.floats(allow_nan=True),
        st.text(max_size=8),
        st.booleans(),
        st.none(),
    ),
)
def test_any_value_is_accepted_in_range_or_refused_with_the_range(family, name, value):
    """Whatever a flag, a parameter or a caller hands the options: a bound from one token to 16384 tokens is
    kept as given, anything else is a ValueError that states the range."""
    low, high = family.token_px**2, 16384 * family.token_px**2
    valid = value is None or (type(value) is int and low <= value <= high)
    if valid:
        assert getattr(family(**{name: value}), name) == value
    else:
        with pytest.raises(ValueError, match=f"{name} must be an integer from {low} .* to {high} "):
            family(**{name: value})
