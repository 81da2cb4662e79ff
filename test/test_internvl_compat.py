"""The torchvision-less processor shim (ptp_ros/vlm/compat.py): it works, and it is still needed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from transformers import AutoProcessor, InternVLProcessor, LlavaNextProcessor, Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin

from ptp_ros.testing.common import FIXTURES
from ptp_ros.vlm.compat import hide_video_processor, video_processors_unavailable
from ptp_ros.vlm.families import ADAPTERS, FAMILIES

STOCK_BUILD = textwrap.dedent("""
    from transformers import GotOcr2ImageProcessorPil, InternVLProcessor, Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil
    from ptp_ros.testing.internvl import INTERNVL_SPECIAL_TOKENS
    from ptp_ros.testing.qwen2_5_vl import QWEN_SPECIAL_TOKENS
    from ptp_ros.testing.tokenizer import build_word_tokenizer
    failures = 0
    for cls, ip, special in [(InternVLProcessor, GotOcr2ImageProcessorPil(), INTERNVL_SPECIAL_TOKENS),
                             (Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil(), QWEN_SPECIAL_TOKENS)]:
        try:
            cls(image_processor=ip, tokenizer=build_word_tokenizer(extra_special=special), video_processor=None)
        except Exception as exc:
            failures += 1
            print(cls.__name__, type(exc).__name__, exc)
    raise SystemExit(failures)
""")


@pytest.mark.skipif(not video_processors_unavailable(), reason="torchvision present: the shim is not applied")
def test_stock_processor_still_needs_the_shim():
    """Fails once transformers builds these processors without torchvision: then delete compat.py."""
    result = subprocess.run([sys.executable, "-c", STOCK_BUILD], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, (
        "the stock InternVL/Qwen2.5-VL processors now build without a video processor; remove "
        f"ptp_ros/vlm/compat.py and its calls.\nstdout: {result.stdout}\nstderr: {result.stderr[-2000:]}"
    )
    assert "VIDEO_PROCESSOR_MAPPING" in result.stdout


@pytest.mark.parametrize("family", [f for f in FAMILIES if ADAPTERS[f].processor_needing_shim is not None])
def test_shimmed_processor_saves_loads_and_processes(tmp_path, family):
    from PIL import Image

    _, _, built = FIXTURES[family].parts()
    built.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is type(built)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8))
    prompt = built.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}], add_generation_prompt=True
    )
    a, b = built(images=image, text=prompt, return_tensors="pt"), loaded(images=image, text=prompt, return_tensors="pt")
    assert a["input_ids"].tolist() == b["input_ids"].tolist() and (a["pixel_values"] == b["pixel_values"]).all()


@pytest.mark.skipif(not video_processors_unavailable(), reason="torchvision present: the shim is not applied")
def test_shim_touches_only_the_classes_it_was_given():
    for cls in (InternVLProcessor, Qwen2_5_VLProcessor):
        assert hide_video_processor(hide_video_processor(cls)) is cls  # idempotent
        assert cls.get_attributes() == ["image_processor", "tokenizer"]
    assert "video_processor" in ProcessorMixin.get_attributes.__func__(InternVLProcessor)  # stock list unchanged
    assert LlavaNextProcessor.get_attributes() == ["image_processor", "tokenizer"]
