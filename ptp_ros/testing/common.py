"""What every tiny fixture shares: the family registry, the random initialisation, the toy text config and
the chat template."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..vlm.families import FamilyRegistry
from . import BASE_WORDS, TEXT_TOKEN_IDS
from .tokenizer import build_word_tokenizer

#: The LLaVA-1.6 Vicuna prompt shape ("USER: <image>\n... ASSISTANT:"), as a processor chat template; other
#: families replace ``<image>`` by their own placeholder.
VICUNA_STYLE_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}</s>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def toy_text_config(vocab_size: int, width: int, layers: int) -> dict:
    """The toy LLM every tiny family uses (Qwen2-style: 4 heads, 2 KV heads, FFN 2× wide), as config kwargs."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        **TEXT_TOKEN_IDS,
    )


def toy_vision_config(width: int, layers: int, image_size: int, patch_size: int) -> dict:
    """The toy ViT of the tiled families (4 heads, FFN 2× wide) at the real tile and patch size, as config
    kwargs of their CLIP-style vision configs."""
    return dict(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )


def random_model(
    model_class: type,
    config,
    tokenizer,
    seed: int,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
):
    """``model_class(config)`` initialised deterministically from ``seed`` (built directly on ``device`` in
    ``dtype`` when given), generating with the tokenizer's pad and end tokens: what the tiny builders
    save, the proxy trainer trains and the benchmark times."""
    torch.manual_seed(seed)
    with ExitStack() as stack:
        if dtype is not None:
            previous = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            stack.callback(torch.set_default_dtype, previous)
        if device is not None:
            stack.enter_context(torch.device(device))
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


@dataclass(frozen=True)
class TinyFamily:
    """How to build a tiny random-weight checkpoint of one model family.

    ``config(tokenizer, **overrides)``: the model's config with the real geometry and toy widths (the
    overrides every family takes: ``vision_width``, ``vision_layers``, ``text_width``, ``text_layers``);
    ``processor(tokenizer, config)``: its processor as the published checkpoints set it up.
    """

    model_type: str
    model_class: type
    config: Callable
    processor: Callable
    special_tokens: Mapping[str, str] = field(default_factory=dict)  # tokens the processor reads from its tokenizer
    test_overrides: Mapping[str, object] = field(default_factory=dict)  # what the test suite builds it with

    def tokenizer(self, words: Iterable[str] = BASE_WORDS):
        return build_word_tokenizer(words, extra_special=self.special_tokens)

    def parts(self, words: Iterable[str] = BASE_WORDS, **overrides) -> tuple[type, object, object]:
        """(model class, config, processor) over a word tokenizer of ``words``; no weights yet."""
        tokenizer = self.tokenizer(words)
        config = self.config(tokenizer, **overrides)
        return self.model_class, config, self.processor(tokenizer, config)

    def build(self, out_dir: str | Path, *, words: Iterable[str] = BASE_WORDS, seed: int = 0, **overrides) -> Path:
        """Build the random-weight model (deterministic in ``seed``) and save it with its processor."""
        return save_random_checkpoint(out_dir, *self.parts(words, **overrides), seed)


#: ``model_type`` → its ``TinyFamily`` (``ptp_ros/testing/<model_type>.py``).
FIXTURES: FamilyRegistry[TinyFamily] = FamilyRegistry("ptp_ros.testing", "tiny fixture")


def register_fixture(family: TinyFamily) -> TinyFamily:
    return FIXTURES.register(family.model_type, family)
