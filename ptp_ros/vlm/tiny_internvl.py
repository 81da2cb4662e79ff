"""A tiny InternVL checkpoint built from configs, for tests and demos (no weights to download).

InternViT-300M geometry (448-px tiles, 14-px patches, [CLS], pixel shuffle 0.5 → 256 tokens a tile, up to
12 tiles + thumbnail) with toy widths, a Qwen2 LLM, and the stock ``InternVLProcessor``.  Saved to disk and
read back through ``load_adapter`` like a real checkpoint.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from transformers import (
    GotOcr2ImageProcessorPil,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVisionConfig,
    Qwen2Config,
)

from .compat import hide_video_processor
from .tiny import VICUNA_STYLE_TEMPLATE, save_random_checkpoint
from .tokenizer import BASE_WORDS, build_word_tokenizer

#: The tokens ``InternVLProcessor`` reads from its tokenizer (names as in the InternVL-hf tokenizers).
INTERNVL_SPECIAL_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                           "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def tiny_internvl_config(vocab_size: int, image_token_id: int, *, vision_width: int = 64, vision_layers: int = 6,
                         text_width: int = 64, text_layers: int = 4) -> InternVLConfig:
    """An InternVL with InternViT-300M geometry (448 px, patch 14, ratio 0.5) and toy widths."""
    vision = InternVLVisionConfig(hidden_size=vision_width, intermediate_size=2 * vision_width,
                                  num_hidden_layers=vision_layers, num_attention_heads=4, image_size=448, patch_size=14)
    text = Qwen2Config(vocab_size=vocab_size, hidden_size=text_width, intermediate_size=2 * text_width,
                       num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=8192, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=image_token_id, image_seq_length=256,
                          downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default",
                          tie_word_embeddings=False)


def internvl_processor(tokenizer) -> InternVLProcessor:
    """The InternVL-hf processor settings: 448-px tiles, 1–12 tiles + thumbnail, ImageNet mean/std."""
    image_processor = GotOcr2ImageProcessorPil(crop_to_patches=True, min_patches=1, max_patches=12,
                                               size={"height": 448, "width": 448},
                                               image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    chat_template = VICUNA_STYLE_TEMPLATE.replace("<image>", INTERNVL_SPECIAL_TOKENS["context_image_token"])
    return hide_video_processor(InternVLProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                                   image_seq_length=256, chat_template=chat_template)


def build_tiny_internvl(out_dir: str | Path, *, words: Iterable[str] = BASE_WORDS, seed: int = 0,
                        **config_overrides) -> Path:
    """Build a random-weight tiny InternVL (deterministic in ``seed``) and save it with its processor."""
    tokenizer = build_word_tokenizer(words, extra_special=INTERNVL_SPECIAL_TOKENS)
    config = tiny_internvl_config(len(tokenizer), tokenizer.context_image_token_id, **config_overrides)
    return save_random_checkpoint(out_dir, InternVLForConditionalGeneration, config, internvl_processor(tokenizer),
                                  seed)
