"""The tiny Qwen2.5-VL: the real patch / merge / window geometry (14-px patches, 2×2 merge, 112-px attention
windows with some full-attention blocks, 3-D M-RoPE in the LLM, the stock ``Qwen2_5_VLProcessor`` with its
default 1280·28² max_pixels) with toy widths."""

from __future__ import annotations

from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ..vlm.compat import hide_video_processor
from .common import VICUNA_STYLE_TEMPLATE, TinyFamily, register_fixture, toy_text_config

#: The tokens ``Qwen2_5_VLProcessor`` and the model's config refer to.
QWEN_SPECIAL_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}


def qwen_token_ids(tokenizer) -> dict[str, int]:
    """The Qwen-VL configs' special-token id arguments, for ``tokenizer``."""
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in QWEN_SPECIAL_TOKENS.items()}
    return {
        f"{name}_id": ids[name] for name in ("image_token", "video_token", "vision_start_token", "vision_end_token")
    }


#: What the chat template's image slot becomes in a Qwen-VL prompt.
QWEN_IMAGE_PLACEHOLDER = (
    QWEN_SPECIAL_TOKENS["vision_start_token"]
    + QWEN_SPECIAL_TOKENS["image_token"]
    + QWEN_SPECIAL_TOKENS["vision_end_token"]
)


def qwen_toy_geometry(vision_width: int, vision_layers: int, text_width: int, patch_size: int) -> tuple[dict, list]:
    """(the vision config's sizes, the M-RoPE section) both Qwen-VL fixtures share: 4 heads, 2×2 merge, the
    text head dim split over (t, h, w) as the published configs split theirs."""
    heads = 4
    text_head_dim = text_width // heads
    section = [text_head_dim // 2 - 2 * (text_head_dim // 6), text_head_dim // 6, text_head_dim // 6]  # t, h, w
    vision = dict(
        depth=vision_layers,
        hidden_size=vision_width,
        intermediate_size=2 * vision_width,
        num_heads=heads,
        out_hidden_size=text_width,
        patch_size=patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    return vision, section


def tiny_qwen2_5_vl_config(
    tokenizer,
    *,
    vision_width: int = 32,
    vision_layers: int = 4,
    full_attention=(1, 3),
    text_width: int = 64,
    text_layers: int = 3,
) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL with the real patch / merge / window geometry and toy widths (head dims 8 and 16)."""
    vision, section = qwen_toy_geometry(vision_width, vision_layers, text_width, patch_size=14)
    vision |= dict(window_size=112, fullatt_block_indexes=list(full_attention))
    text = dict(
        **toy_text_config(len(tokenizer), text_width, text_layers),
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section},
    )
    return Qwen2_5_VLConfig(
        vision_config=vision,
        text_config=text,
        **qwen_token_ids(tokenizer),
        tie_word_embeddings=False,
    )


def qwen2_5_vl_processor(tokenizer, config=None) -> Qwen2_5_VLProcessor:
    return hide_video_processor(Qwen2_5_VLProcessor)(
        image_processor=Qwen2VLImageProcessorPil(),
        tokenizer=tokenizer,
        chat_template=VICUNA_STYLE_TEMPLATE.replace("<image>", QWEN_IMAGE_PLACEHOLDER),
    )


TINY_QWEN2_5_VL = register_fixture(
    TinyFamily(
        "qwen2_5_vl",
        Qwen2_5_VLForConditionalGeneration,
        tiny_qwen2_5_vl_config,
        qwen2_5_vl_processor,
        special_tokens=QWEN_SPECIAL_TOKENS,
    )
)
build_tiny_qwen2_5_vl = TINY_QWEN2_5_VL.build
