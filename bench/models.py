"""Random-weight LLaVA-NeXT models of real size, built in memory from the cost model's dimensions.

Random weights do not change timings or memory (same shapes, same kernels), so a model built from the
published dimensions is an honest stand-in for timing when the weights cannot be downloaded.  The
configs come from ``cost_model.MODELS``, so the analytic and the measured figures describe one model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, Qwen2Config

from ptp_ros.testing import TEXT_TOKEN_IDS
from ptp_ros.testing.common import FIXTURES, random_model
from ptp_ros.testing.llava_next import anyres_pinpoints, llava_next_processor
from ptp_ros.testing.tokenizer import build_word_tokenizer
from ptp_ros.vlm.families import DEFAULT_PINPOINTS, FAMILIES
from ptp_ros.vlm.llava_next import LlavaNextAdapter
from ptp_ros.vlm.stock_adapter import StockModelAdapter

from .cost_model import MODELS

_TEXT_CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config}
#: Real-size models that can be built with random weights and run; the rest of ``MODELS`` is analytic only.
MEASURABLE = tuple(name for name, dims in MODELS.items() if dims["architecture"] == "llava_next")
#: The tiny checkpoint of each family: "tiny" (LLaVA-NeXT, the default) and "tiny-<model_type>".
TINY_MODELS = {"tiny": "llava_next", **{f"tiny-{family}": family for family in FAMILIES}}


def llava_next_config(name: str, vocab_size: int | None = None) -> LlavaNextConfig:
    """The transformers config of ``MODELS[name]`` (``vocab_size`` overrides the published one)."""
    dims = MODELS[name]
    v, m = dims["vision"], dims["llm"]
    vision = CLIPVisionConfig(
        hidden_size=v["hidden"],
        intermediate_size=v["ffn"],
        num_hidden_layers=v["layers"],
        num_attention_heads=v["heads"],
        image_size=v["image_size"],
        patch_size=v["patch_size"],
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    text = _TEXT_CONFIGS[m["family"]](
        vocab_size=vocab_size or m["vocab"],
        hidden_size=m["hidden"],
        intermediate_size=m["ffn"],
        num_hidden_layers=m["layers"],
        num_attention_heads=m["heads"],
        num_key_value_heads=m["kv_heads"],
        max_position_embeddings=8192,
        rope_theta=m.get("rope_theta", 10000.0),
        tie_word_embeddings=m["tie_embeddings"],
        **TEXT_TOKEN_IDS,
    )
    return LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=anyres_pinpoints(DEFAULT_PINPOINTS),
        tie_word_embeddings=m["tie_embeddings"],
    )


def random_llava_next(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LlavaNextAdapter:
    """``MODELS[name]`` with random weights, built directly on ``device`` in ``dtype``, as an adapter.

    The processor is the llava-hf one over an offline word tokenizer; its ids are a prefix of the
    published vocabulary, so the LM head keeps its real size.
    """
    tokenizer = build_word_tokenizer()
    config = llava_next_config(name)
    config.image_token_id = tokenizer.image_token_id
    model = random_model(LlavaNextForConditionalGeneration, config, tokenizer, seed, device=device, dtype=dtype)
    return LlavaNextAdapter(model.eval(), llava_next_processor(tokenizer, config.image_grid_pinpoints))


def load_model(model: str, device: torch.device, dtype: torch.dtype, scratch: Path) -> StockModelAdapter:
    """What ``ptp-bench`` and ``ptp-eval --data`` run: a ``TINY_MODELS`` name (that family's tiny checkpoint,
    built into ``scratch`` and loaded like a user's), a ``MEASURABLE`` name (random weights, real size) or a
    checkpoint directory.  A ``ValueError`` for a name the cost model knows but cannot build; ``ModelLoadError``
    for a bad checkpoint."""
    from ptp_ros.vlm.loading import LoadOptions, load_adapter

    options = LoadOptions(device=str(device), dtype=str(dtype).removeprefix("torch."))
    if model in TINY_MODELS:
        family = TINY_MODELS[model]
        return load_adapter(FIXTURES[family].build(scratch / f"tiny-{family.replace('_', '-')}"), options)
    if model in MODELS and model not in MEASURABLE:
        raise ValueError(f"{model} is in the analytic tables only; measurable sizes: {', '.join(MEASURABLE)}")
    if model in MODELS:
        return random_llava_next(model, device, dtype)
    return load_adapter(model, options)
