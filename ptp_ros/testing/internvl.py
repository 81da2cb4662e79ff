"""The tiny InternVL: InternViT-300M geometry (448-px tiles, 14-px patches, [CLS], pixel shuffle 0.5 → 256
tokens a tile, up to 12 tiles + thumbnail) with toy widths, a Qwen2 LLM, and the stock ``InternVLProcessor``."""

from __future__ import annotations

from transformers import (
    GotOcr2ImageProcessorPil,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVisionConfig,
    Qwen2Config,
)

from ..vlm.compat import hide_video_processor
from .common import VICUNA_STYLE_TEMPLATE, TinyFamily, register_fixture, toy_text_config, toy_vision_config

#: The tokens ``InternVLProcessor`` reads from its tokenizer (names as in the InternVL-hf tokenizers).
INTERNVL_SPECIAL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def tiny_internvl_config(
    tokenizer, *, vision_width: int = 64, vision_layers: int = 6, text_width: int = 64, text_layers: int = 4
) -> InternVLConfig:
    """An InternVL with InternViT-300M geometry (448 px, patch 14, ratio 0.5) and toy widths."""
    vision = InternVLVisionConfig(**toy_vision_config(vision_width, vision_layers, image_size=448, patch_size=14))
    text = Qwen2Config(**toy_text_config(len(tokenizer), text_width, text_layers))
    return InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=256,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


def internvl_processor(tokenizer, config=None) -> InternVLProcessor:
    """The InternVL-hf processor settings: 448-px tiles, 1–12 tiles + thumbnail, ImageNet mean/std."""
    image_processor = GotOcr2ImageProcessorPil(
        crop_to_patches=True,
        min_patches=1,
        max_patches=12,
        size={"height": 448, "width": 448},
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    chat_template = VICUNA_STYLE_TEMPLATE.replace("<image>", INTERNVL_SPECIAL_TOKENS["context_image_token"])
    return hide_video_processor(InternVLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=256, chat_template=chat_template
    )


TINY_INTERNVL = register_fixture(
    TinyFamily(
        "internvl",
        InternVLForConditionalGeneration,
        tiny_internvl_config,
        internvl_processor,
        special_tokens=INTERNVL_SPECIAL_TOKENS,
        test_overrides={"vision_layers": 3, "text_layers": 3},
    )
)  # shallow: nine 1025-token tiles stay cheap on a CPU
build_tiny_internvl = TINY_INTERNVL.build
