"""The tiny LLaVA-NeXT: CLIP-336/14 geometry (576 patches a tile, anyres pinpoints) with toy widths, the
llava-hf processor settings."""

from __future__ import annotations

from transformers import (
    CLIPVisionConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    Qwen2Config,
)

from ..vlm.families import DEFAULT_PINPOINTS
from .common import VICUNA_STYLE_TEMPLATE, TinyFamily, register_fixture, toy_text_config, toy_vision_config


def anyres_pinpoints(pinpoints=DEFAULT_PINPOINTS) -> list[list[int]]:
    """Pinpoints as LLaVA-NeXT's config and processor take them (a list of [height, width] lists)."""
    return [list(p) for p in pinpoints]


def tiny_llava_next_config(
    tokenizer,
    *,
    vision_width: int = 64,
    vision_layers: int = 6,
    text_width: int = 64,
    text_layers: int = 4,
    pinpoints=DEFAULT_PINPOINTS,
) -> LlavaNextConfig:
    """A LLaVA-NeXT with CLIP-336/14 geometry (576 patches a tile) and toy widths."""
    vision = CLIPVisionConfig(
        **toy_vision_config(vision_width, vision_layers, image_size=336, patch_size=14), projection_dim=vision_width
    )
    text = Qwen2Config(**toy_text_config(len(tokenizer), text_width, text_layers))
    return LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=anyres_pinpoints(pinpoints),
        tie_word_embeddings=False,
    )


def llava_next_processor(tokenizer, pinpoints=DEFAULT_PINPOINTS) -> LlavaNextProcessor:
    """The processor settings of the llava-hf checkpoints (CLIP mean/std, 336 px tiles, 1 extra [CLS])."""
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=anyres_pinpoints(pinpoints),
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=VICUNA_STYLE_TEMPLATE,
    )


TINY_LLAVA_NEXT = register_fixture(
    TinyFamily(
        "llava_next",
        LlavaNextForConditionalGeneration,
        tiny_llava_next_config,
        lambda tokenizer, config: llava_next_processor(tokenizer, config.image_grid_pinpoints),
    )
)
build_tiny_llava_next = TINY_LLAVA_NEXT.build
