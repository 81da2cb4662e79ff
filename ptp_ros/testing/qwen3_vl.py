"""The tiny Qwen3-VL: the real geometry (16-px patches, 2×2 merge, every ViT block over the whole image, a
learned 48×48 position grid, three DeepStack levels added after the first three LLM layers, interleaved 3-D
M-RoPE with QK-norm in the LLM, the stock ``Qwen3VLProcessor`` with the published checkpoints' image mean
and std) with toy widths, and a lower resolution cap than the published 16384 tokens so that tests stay cheap."""

from __future__ import annotations

from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ..vlm.compat import hide_video_processor
from .common import VICUNA_STYLE_TEMPLATE, TinyFamily, register_fixture, toy_text_config
from .qwen2_5_vl import QWEN_IMAGE_PLACEHOLDER, QWEN_SPECIAL_TOKENS, qwen_token_ids, qwen_toy_geometry

#: The merged-token side (16-px patches, 2×2 merge) and the fixture's cap, in tokens (the published
#: preprocessor allows 16384): a 1920×1080 frame becomes 18×33 = 594 tokens.
TOKEN_PX = 32
TINY_MAX_TOKENS = 640


def tiny_qwen3_vl_config(
    tokenizer,
    *,
    vision_width: int = 32,
    vision_layers: int = 4,
    deepstack_blocks=None,
    text_width: int = 64,
    text_layers: int = 3,
) -> Qwen3VLConfig:
    """A Qwen3-VL with the real patch / merge / DeepStack geometry and toy widths (head dims 8 and 16); its
    DeepStack levels (three, as published) come from ``deepstack_blocks``, by default the first blocks."""
    vision, section = qwen_toy_geometry(vision_width, vision_layers, text_width, patch_size=16)
    vision |= dict(
        num_position_embeddings=2304,
        deepstack_visual_indexes=list(range(min(3, vision_layers)) if deepstack_blocks is None else deepstack_blocks),
    )
    text = dict(
        **toy_text_config(len(tokenizer), text_width, text_layers),
        head_dim=text_width // vision["num_heads"],
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5e6,
            "mrope_section": section,
            "mrope_interleaved": True,
        },
    )
    return Qwen3VLConfig(
        vision_config=vision,
        text_config=text,
        **qwen_token_ids(tokenizer),
        tie_word_embeddings=False,
    )


def qwen3_vl_processor(tokenizer, config=None) -> Qwen3VLProcessor:
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": 64 * TOKEN_PX**2, "longest_edge": TINY_MAX_TOKENS * TOKEN_PX**2},
    )
    return hide_video_processor(Qwen3VLProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=VICUNA_STYLE_TEMPLATE.replace("<image>", QWEN_IMAGE_PLACEHOLDER),
    )


TINY_QWEN3_VL = register_fixture(
    TinyFamily(
        "qwen3_vl",
        Qwen3VLForConditionalGeneration,
        tiny_qwen3_vl_config,
        qwen3_vl_processor,
        special_tokens=QWEN_SPECIAL_TOKENS,
    )
)
build_tiny_qwen3_vl = TINY_QWEN3_VL.build
