"""Tiny LLaVA-NeXT checkpoints built from configs, for tests and demos (no weights to download).

They are saved to disk and read back through ``load_adapter`` exactly like a real checkpoint, so the
loading code the tests exercise is the code users run.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    Qwen2Config,
)

from .tokenizer import BASE_WORDS, build_word_tokenizer

#: The LLaVA-1.6 Vicuna prompt shape ("USER: <image>\n... ASSISTANT:"), as a processor chat template.
VICUNA_STYLE_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}</s>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

#: LLaVA-NeXT's default anyres pinpoints (2, 3 or 4 tiles of 336 px plus the global view).
DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def tiny_llava_next_config(vocab_size: int, image_token_id: int, *, vision_width: int = 64, vision_layers: int = 6,
                           text_width: int = 64, text_layers: int = 4, pinpoints=DEFAULT_PINPOINTS) -> LlavaNextConfig:
    """A LLaVA-NeXT with CLIP-336/14 geometry (576 patches a tile) and toy widths."""
    vision = CLIPVisionConfig(hidden_size=vision_width, intermediate_size=2 * vision_width,
                              num_hidden_layers=vision_layers, num_attention_heads=4, image_size=336, patch_size=14,
                              projection_dim=vision_width)
    text = Qwen2Config(vocab_size=vocab_size, hidden_size=text_width, intermediate_size=2 * text_width,
                       num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=8192, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    return LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                           vision_feature_layer=-2, vision_feature_select_strategy="default",
                           image_grid_pinpoints=pinpoints, tie_word_embeddings=False)


def llava_next_processor(tokenizer, pinpoints=DEFAULT_PINPOINTS) -> LlavaNextProcessor:
    """The processor settings of the llava-hf checkpoints (CLIP mean/std, 336 px tiles, 1 extra [CLS])."""
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=pinpoints,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=VICUNA_STYLE_TEMPLATE)


def random_model(model_class: type, config, tokenizer, seed: int):
    """``model_class(config)`` initialised deterministically from ``seed``, generating with the
    tokenizer's pad and end tokens (the tiny builders save it; the proxy trainer trains it)."""
    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_random_checkpoint(out_dir: str | Path, model_class: type, config, processor, seed: int) -> Path:
    """Initialise ``model_class(config)`` deterministically from ``seed`` and save it with ``processor``,
    as a user's checkpoint directory (safetensors) — every tiny builder ends here."""
    out = Path(out_dir)
    model = random_model(model_class, config, processor.tokenizer, seed).eval()
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


def build_tiny_llava_next(out_dir: str | Path, *, words: Iterable[str] = BASE_WORDS, seed: int = 0,
                          **config_overrides) -> Path:
    """Build a random-weight tiny LLaVA-NeXT (deterministic in ``seed``) and save it with its processor."""
    tokenizer = build_word_tokenizer(words)
    config = tiny_llava_next_config(len(tokenizer), tokenizer.image_token_id, **config_overrides)
    return save_random_checkpoint(out_dir, LlavaNextForConditionalGeneration, config,
                                  llava_next_processor(tokenizer, config.image_grid_pinpoints), seed)
