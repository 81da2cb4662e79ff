"""The published checkpoints each adapter is built for, checked here without their weights.

For every checkpoint in docs/models.md's table this file writes the checkpoint's own ``config.json``,
``preprocessor_config.json`` and ``processor_config.json`` (the published values; chat templates and the
real tokenizer files left out) into a temporary directory, plus a word-level tokenizer that holds the
checkpoint's special tokens at their published ids, and checks, with nothing downloaded:

* **config**: transformers parses it into the adapter's stock class; built on the ``meta`` device (no
  memory) the model has the published parameter count; ``bench/cost_model.py``'s dimensions agree;
* **processor geometry**: loaded by ``AutoProcessor`` from those files, as ``load_adapter`` loads it, it
  yields the stated number of visual tokens (and tiles / grid) for a 1920×1080 and a 3840×2160 frame;
* **adapter layout**: over a random model with the checkpoint's geometry (vision depth, image / patch
  size, anyres pinpoints, pixel shuffle, merge windows and full-attention blocks, feature layer, token
  ids, vocabulary) but toy widths, ``encode`` passes its layout checks on both frames (its tokens are
  the processor's placeholders), and a 25 % pruned ``generate`` drops exactly the pruned placeholders.

``PTP_SLOW=1`` adds the layout check of a Qwen2.5-VL 3840×2160 frame (10 549 tokens, ~50 s) and the
same checks at 1920×1080 with random weights at real width (vision tower and projector at full size, the
LLM at full width but 3 layers): 1-6 min and 6-13 GB each on 2 CPU cores, so not in CI.  What needs the
weights (answers, the attention layers PTP reads, latency) needs a GPU run; docs/models.md has the table.
"""

from __future__ import annotations

import copy
import gc
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor, PreTrainedTokenizerFast
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

from ptp_ros.testing import BASE_WORDS
from ptp_ros.testing.tokenizer import tokenizer_from_vocab
from ptp_ros.vlm.compat import hide_video_processor
from ptp_ros.vlm.internvl import InternVLAdapter
from ptp_ros.vlm.llava_next import LlavaNextAdapter
from ptp_ros.vlm.loading import unsupported_format
from ptp_ros.vlm.qwen2_5_vl import Qwen2_5_VLAdapter
from ptp_ros.vlm.qwen3_vl import Qwen3VLAdapter
from ptp_ros_bench.cost_model import CLIP_VIT_L_336, INTERNVIT_300M_448, MODELS

FRAMES = {"1080p": (1080, 1920), "4K": (2160, 3840)}
SLOW = os.environ.get("PTP_SLOW") == "1"
slow = pytest.mark.skipif(not SLOW, reason="minutes of CPU: PTP_SLOW=1 runs it")
TOY_WIDTH = 64

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
ANYRES_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

# -- the published files ---------------------------------------------------------------------------------
CLIP_L_336 = {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "image_size": 336,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "patch_size": 14,
    "projection_dim": 768,
    "vocab_size": 32000,
}
LLAVA_NEXT_PREPROCESSOR = {
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_pad": True,
    "do_rescale": True,
    "do_resize": True,
    "image_grid_pinpoints": ANYRES_PINPOINTS,
    "image_mean": CLIP_MEAN,
    "image_processor_type": "LlavaNextImageProcessor",
    "image_std": CLIP_STD,
    "processor_class": "LlavaNextProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}
LLAVA_NEXT_PROCESSOR = {
    "num_additional_image_tokens": 1,
    "patch_size": 14,
    "processor_class": "LlavaNextProcessor",
    "vision_feature_select_strategy": "default",
}


def llava_next_config(text_config: dict) -> dict:
    return {
        "architectures": ["LlavaNextForConditionalGeneration"],
        "ignore_index": -100,
        "image_grid_pinpoints": ANYRES_PINPOINTS,
        "image_token_index": 32000,
        "model_type": "llava_next",
        "projector_hidden_act": "gelu",
        "text_config": text_config,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "use_image_newline_parameter": True,
        "vision_config": CLIP_L_336,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vocab_size": 32064,
    }


INTERNVIT_300M = {
    "model_type": "internvl_vision",
    "architectures": ["InternVisionModel"],
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "image_size": [448, 448],
    "patch_size": [14, 14],
    "attention_bias": True,
    "use_qk_norm": False,
    "hidden_act": "gelu",
    "norm_type": "layer_norm",
    "layer_norm_eps": 1e-06,
    "layer_scale_init_value": 0.1,
    "use_absolute_position_embeddings": True,
    "use_mean_pooling": True,
}
INTERNVL_PREPROCESSOR = {  # as convert_internvl_weights_to_hf.py writes it: crop_to_patches False here, the
    # processor's own default (True) turns tiling on
    "crop_size": None,
    "crop_to_patches": False,
    "data_format": "channels_first",
    "default_to_square": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "GotOcr2ImageProcessorFast",
    "image_std": [0.229, 0.224, 0.225],
    "max_patches": 12,
    "min_patches": 1,
    "processor_class": "InternVLProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 448, "width": 448},
}
INTERNVL_PROCESSOR = {"image_seq_length": 256, "processor_class": "InternVLProcessor"}
INTERNVL_TOKEN_ATTRIBUTES = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",  # (<video>'s id: unchecked)
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}


def internvl_config(text_config: dict, image_token_id: int) -> dict:
    return {
        "architectures": ["InternVLForConditionalGeneration"],
        "downsample_ratio": 0.5,
        "image_seq_length": 256,
        "image_token_id": image_token_id,
        "model_type": "internvl",
        "projector_hidden_act": "gelu",
        "text_config": text_config,
        "torch_dtype": "bfloat16",
        "vision_config": INTERNVIT_300M,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
    }


QWEN_VISION = {
    "depth": 32,
    "hidden_act": "silu",
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "in_chans": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "spatial_patch_size": 14,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
    "temporal_patch_size": 2,
}
QWEN_PREPROCESSOR = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": CLIP_MEAN,
    "image_std": CLIP_STD,
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}
QWEN_TOKENS = {"<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656}
QWEN_TOKEN_ATTRIBUTES = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}


def qwen2_5_vl_config(hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, vocab: int, tied: bool) -> dict:
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": ffn,
        "max_position_embeddings": 128000,
        "max_window_layers": 70 if tied else 28,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {**QWEN_VISION, "out_hidden_size": hidden},
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vocab_size": vocab,
    }


# Qwen3-VL: the published config.json files (Qwen/Qwen3-VL-{2B,4B,8B}-Instruct, written by transformers
# 4.57.0.dev0, the vision config still saying model_type "qwen3_vl") and the preprocessor_config.json the family
# ships (16-px patches, 2×2 merge, mean / std 0.5, 16384·32² max pixels).  No copy of them is in this
# environment's caches; the values are the ones public code embeds verbatim as "the official checkpoint shape"
# (found through the tool library's code search: the 2B config as a whole, the 4B config as a whole, the 8B text
# config and the transformers defaults of Qwen3VLVisionConfig for its tower, whose docstring names these
# checkpoints), and the parameter counts below are what they build.
QWEN3_VL_PREPROCESSOR = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "image_processor_type": "Qwen2VLImageProcessorFast",
}
QWEN3_VL_SMALL_TOWER = {  # 2B and 4B
    "deepstack_visual_indexes": [5, 11, 17],
    "depth": 24,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_size": 1024,
    "in_channels": 3,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "model_type": "qwen3_vl",
    "num_heads": 16,
    "num_position_embeddings": 2304,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}
QWEN3_VL_LARGE_TOWER = {  # 8B
    **QWEN3_VL_SMALL_TOWER,
    "deepstack_visual_indexes": [8, 16, 24],
    "depth": 27,
    "hidden_size": 1152,
    "intermediate_size": 4304,
}


def qwen3_vl_config(hidden: int, ffn: int, layers: int, heads: int, tied: bool, tower: dict) -> dict:
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "image_token_id": 151655,
        "model_type": "qwen3_vl",
        "text_config": {
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": 151643,
            "dtype": "bfloat16",
            "eos_token_id": 151645,
            "head_dim": 128,
            "hidden_act": "silu",
            "hidden_size": hidden,
            "initializer_range": 0.02,
            "intermediate_size": ffn,
            "max_position_embeddings": 262144,
            "model_type": "qwen3_vl_text",
            "num_attention_heads": heads,
            "num_hidden_layers": layers,
            "num_key_value_heads": 8,
            "rms_norm_eps": 1e-06,
            "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
            "rope_theta": 5000000,
            "tie_word_embeddings": tied,
            "use_cache": True,
            "vocab_size": 151936,
        },
        "tie_word_embeddings": tied,
        "transformers_version": "4.57.0.dev0",
        "video_token_id": 151656,
        "vision_config": {**tower, "out_hidden_size": hidden},
        "vision_end_token_id": 151653,
        "vision_start_token_id": 151652,
    }


@dataclass(frozen=True)
class Checkpoint:
    adapter: type
    config: dict
    preprocessor: dict
    processor: dict
    tokens: dict[str, int]  # special tokens at their published ids
    token_attributes: dict[str, str]  # what the processor reads from its tokenizer (tok.image_token, ...)
    billion_params: float  # published size (the hub's safetensors count)
    visual_tokens: dict[str, int]  # per FRAMES entry
    grid: dict[str, tuple[int, int]]  # tiles (rows, cols) or merged-token grid, per FRAMES entry
    toy: dict  # config overrides for the toy-width geometry model
    real_width: dict  # config overrides for the real-width model (the LLM cut to 3 layers)
    cost_model: str | None = None  # the bench/cost_model.py entry with this checkpoint's LLM
    same_geometry_as: str | None = None  # a checkpoint with the same vision side, processor and image token


LLAVA_TOKENS = {"<image>": 32000, "<pad>": 32001}
LLAVA_TOY = {
    "text_config": {
        "hidden_size": TOY_WIDTH,
        "intermediate_size": 2 * TOY_WIDTH,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 3,
    },
    "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "projection_dim": 64},
}
INTERNVL_TOY = {
    "text_config": LLAVA_TOY["text_config"],
    "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4},
}
QWEN_TOY = {
    "hidden_size": TOY_WIDTH,
    "intermediate_size": 2 * TOY_WIDTH,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 3,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},  # head dim 16
    # one head of 16: the 4 full-attention blocks over every patch dominate the tower's time
    "vision_config": {"hidden_size": 16, "intermediate_size": 32, "num_heads": 1, "out_hidden_size": TOY_WIDTH},
}
QWEN3_VL_TOY = {
    "text_config": {
        **LLAVA_TOY["text_config"],
        "head_dim": 16,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [2, 3, 3], "rope_type": "default"},
    },
    # one head of 16, as for Qwen2.5-VL: every block attends over every patch
    "vision_config": {"hidden_size": 16, "intermediate_size": 32, "num_heads": 1, "out_hidden_size": TOY_WIDTH},
}
NESTED_REAL_WIDTH = {"text_config": {"num_hidden_layers": 3}}
QWEN_REAL_WIDTH = {"num_hidden_layers": 3}

# LLaVA-NeXT: a 16:9 frame picks the 672×672 pinpoint (2×2 tiles), whatever its resolution: 576 global +
# the 48×48 grid patches less (48 − 27) // 2 = 10 rows of padding at top and bottom, 28 rows of 48 + a
# newline each = 576 + 28·49
LLAVA_NEXT_TOKENS = {"1080p": 1948, "4K": 1948}
LLAVA_NEXT_GRID = {"1080p": (2, 2), "4K": (2, 2)}
# InternVL: 2 rows × 4 cols of 448-px tiles + thumbnail = 9 × 256 at both sizes (the closest aspect with ≤ 12 tiles)
INTERNVL_TOKENS = {"1080p": 2304, "4K": 2304}
INTERNVL_GRID = {"1080p": (2, 4), "4K": (2, 4)}
# Qwen2.5-VL with the published max_pixels = 12845056 (16384·28²): both frames fit, so smart_resize only
# rounds each side to 28 px: 1092×1932 → 39×69 tokens; 2156×3836 → 77×137 tokens
QWEN_TOKENS_PER_FRAME = {"1080p": 2691, "4K": 10549}
QWEN_GRID = {"1080p": (39, 69), "4K": (77, 137)}
# Qwen3-VL, max_pixels 16777216 (16384·32²): both frames fit, smart_resize rounds each side to 32 px:
# 1088×1920 → 34×60 tokens; 2176×3840 → 68×120 tokens
QWEN3_VL_TOKENS_PER_FRAME = {"1080p": 2040, "4K": 8160}
QWEN3_VL_GRID = {"1080p": (34, 60), "4K": (68, 120)}


def llava_next_checkpoint(text_config: dict, billion_params: float, **kwargs) -> Checkpoint:
    """A llava-hf LLaVA-NeXT with this LLM: processor, special tokens and geometry are the family's."""
    return Checkpoint(
        LlavaNextAdapter,
        llava_next_config(text_config),
        LLAVA_NEXT_PREPROCESSOR,
        LLAVA_NEXT_PROCESSOR,
        LLAVA_TOKENS,
        {"image_token": "<image>"},
        billion_params,
        LLAVA_NEXT_TOKENS,
        LLAVA_NEXT_GRID,
        LLAVA_TOY,
        NESTED_REAL_WIDTH,
        **kwargs,
    )


def internvl_checkpoint(text_config: dict, tokens: dict[str, int], billion_params: float, **kwargs) -> Checkpoint:
    """An InternVL-hf checkpoint with this LLM and these special-token ids; the rest is the family's."""
    return Checkpoint(
        InternVLAdapter,
        internvl_config(text_config, tokens["<IMG_CONTEXT>"]),
        INTERNVL_PREPROCESSOR,
        INTERNVL_PROCESSOR,
        tokens,
        INTERNVL_TOKEN_ATTRIBUTES,
        billion_params,
        INTERNVL_TOKENS,
        INTERNVL_GRID,
        INTERNVL_TOY,
        NESTED_REAL_WIDTH,
        **kwargs,
    )


def qwen2_5_vl_checkpoint(config: dict, billion_params: float, **kwargs) -> Checkpoint:
    """A Qwen2.5-VL checkpoint with this config; processor, special tokens and geometry are the family's."""
    return Checkpoint(
        Qwen2_5_VLAdapter,
        config,
        QWEN_PREPROCESSOR,
        {"processor_class": "Qwen2_5_VLProcessor"},
        QWEN_TOKENS,
        QWEN_TOKEN_ATTRIBUTES,
        billion_params,
        QWEN_TOKENS_PER_FRAME,
        QWEN_GRID,
        QWEN_TOY,
        QWEN_REAL_WIDTH,
        **kwargs,
    )


def qwen3_vl_checkpoint(config: dict, billion_params: float, **kwargs) -> Checkpoint:
    """A Qwen3-VL checkpoint with this config; processor, special tokens and geometry are the family's."""
    return Checkpoint(
        Qwen3VLAdapter,
        config,
        QWEN3_VL_PREPROCESSOR,
        {"processor_class": "Qwen3VLProcessor"},
        QWEN_TOKENS,
        QWEN_TOKEN_ATTRIBUTES,
        billion_params,
        QWEN3_VL_TOKENS_PER_FRAME,
        QWEN3_VL_GRID,
        QWEN3_VL_TOY,
        NESTED_REAL_WIDTH,
        **kwargs,
    )


CHECKPOINTS: dict[str, Checkpoint] = {
    "llava-hf/llava-v1.6-vicuna-7b-hf": llava_next_checkpoint(
        {
            "_name_or_path": "lmsys/vicuna-7b-v1.5",
            "architectures": ["LlamaForCausalLM"],
            "max_position_embeddings": 4096,
            "model_type": "llama",
            "pad_token_id": 0,
            "rms_norm_eps": 1e-05,
            "torch_dtype": "float16",
            "vocab_size": 32064,
        },
        7.06,
        cost_model="llava-next-7b",
    ),
    "llava-hf/llava-v1.6-vicuna-13b-hf": llava_next_checkpoint(
        {
            "_name_or_path": "lmsys/vicuna-13b-v1.5",
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 5120,
            "intermediate_size": 13824,
            "max_position_embeddings": 4096,
            "model_type": "llama",
            "num_attention_heads": 40,
            "num_hidden_layers": 40,
            "num_key_value_heads": 40,
            "pad_token_id": 0,
            "rms_norm_eps": 1e-05,
            "torch_dtype": "float16",
            "vocab_size": 32064,
        },
        13.35,
        cost_model="llava-next-13b",
        same_geometry_as="llava-hf/llava-v1.6-vicuna-7b-hf",
    ),
    "llava-hf/llava-v1.6-mistral-7b-hf": llava_next_checkpoint(
        {
            "_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2",
            "architectures": ["MistralForCausalLM"],
            "intermediate_size": 14336,
            "max_position_embeddings": 32768,
            "model_type": "mistral",
            "num_key_value_heads": 8,
            "rms_norm_eps": 1e-05,
            "rope_theta": 1000000.0,
            "sliding_window": None,
            "torch_dtype": "bfloat16",
            "vocab_size": 32064,
        },
        7.57,
        same_geometry_as="llava-hf/llava-v1.6-vicuna-7b-hf",
    ),
    "OpenGVLab/InternVL2_5-8B-MPO-hf": internvl_checkpoint(  # InternLM2.5-7B-chat, converted to Llama
        {
            "architectures": ["LlamaForCausalLM"],
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 2,
            "hidden_act": "silu",
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "max_position_embeddings": 32768,
            "model_type": "llama",
            "num_attention_heads": 32,
            "num_hidden_layers": 32,
            "num_key_value_heads": 8,
            "rms_norm_eps": 1e-05,
            "rope_scaling": {"factor": 2.0, "rope_type": "dynamic"},
            "rope_theta": 1000000,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "vocab_size": 92553,
        },
        {"<img>": 92544, "</img>": 92545, "<IMG_CONTEXT>": 92546, "<video>": 92547},
        8.08,
        cost_model="internvl2-8b",
    ),  # the cost model's InternVL2-8B has this LLM
    "OpenGVLab/InternVL3-8B-hf": internvl_checkpoint(  # Qwen2.5-7B
        {
            "architectures": ["Qwen2ForCausalLM"],
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "hidden_act": "silu",
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "max_position_embeddings": 32768,
            "max_window_layers": 70,
            "model_type": "qwen2",
            "num_attention_heads": 28,
            "num_hidden_layers": 28,
            "num_key_value_heads": 4,
            "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0,
            "sliding_window": None,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "use_sliding_window": False,
            "vocab_size": 151674,
        },
        {"<img>": 151665, "</img>": 151666, "<IMG_CONTEXT>": 151667, "<video>": 151668},
        7.94,
    ),
    "Qwen/Qwen2.5-VL-3B-Instruct": qwen2_5_vl_checkpoint(
        qwen2_5_vl_config(2048, 11008, 36, 16, 2, 151936, tied=True),
        3.75,
    ),
    "Qwen/Qwen2.5-VL-7B-Instruct": qwen2_5_vl_checkpoint(
        qwen2_5_vl_config(3584, 18944, 28, 28, 4, 152064, tied=False),
        8.29,
        same_geometry_as="Qwen/Qwen2.5-VL-3B-Instruct",
    ),
    "Qwen/Qwen3-VL-2B-Instruct": qwen3_vl_checkpoint(
        qwen3_vl_config(2048, 6144, 28, 16, tied=True, tower=QWEN3_VL_SMALL_TOWER), 2.13
    ),
    "Qwen/Qwen3-VL-4B-Instruct": qwen3_vl_checkpoint(
        qwen3_vl_config(2560, 9728, 36, 32, tied=True, tower=QWEN3_VL_SMALL_TOWER),
        4.44,
        same_geometry_as="Qwen/Qwen3-VL-2B-Instruct",
    ),
    "Qwen/Qwen3-VL-8B-Instruct": qwen3_vl_checkpoint(
        qwen3_vl_config(4096, 12288, 36, 32, tied=False, tower=QWEN3_VL_LARGE_TOWER), 8.77
    ),
}


# -- building them ---------------------------------------------------------------------------------------
def tokenizer_with_ids(tokens: dict[str, int], attributes: dict[str, str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (the offline one's words) holding ``tokens`` at their published ids."""
    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", "<s>", "</s>", *BASE_WORDS])}
    vocab.update(tokens)
    return tokenizer_from_vocab(vocab, attributes, tokens, model_max_length=131072)


def merged(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` applied key by key (nested dicts merged, ``rope_scaling`` replaced)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        out[key] = merged(out.get(key) or {}, value) if isinstance(value, dict) and key != "rope_scaling" else value
    return out


def write_checkpoint(directory: Path, checkpoint: Checkpoint, config: dict | None = None) -> Path:
    """config.json (``config`` or the published one), the processor files and the tokenizer; no weights."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config or checkpoint.config))
    (directory / "preprocessor_config.json").write_text(json.dumps(checkpoint.preprocessor))
    (directory / "processor_config.json").write_text(json.dumps(checkpoint.processor))
    tokenizer_with_ids(checkpoint.tokens, checkpoint.token_attributes).save_pretrained(directory)
    return directory


def load_processor(directory: Path, adapter: type):
    """As ``StockModelAdapter.from_checkpoint`` loads it."""
    if adapter.processor_needing_shim is not None:
        hide_video_processor(adapter.processor_needing_shim)
    return AutoProcessor.from_pretrained(directory, local_files_only=True, trust_remote_code=False)


def in_float32(config: dict) -> dict:
    """``config`` saying float32 throughout, as ``load_adapter`` loads on a CPU (a random model built
    from a float16 config would make some parameters, e.g. LLaVA-NeXT's image_newline, float16)."""
    return {
        key: in_float32(value) if isinstance(value, dict) else "float32" if key in ("torch_dtype", "dtype") else value
        for key, value in config.items()
    }


def random_adapter(directory: Path, checkpoint: Checkpoint, overrides: dict):
    """The adapter over a random float32 model of the checkpoint's config with ``overrides`` (widths, depths)."""
    written = write_checkpoint(directory, checkpoint, in_float32(merged(checkpoint.config, overrides)))
    config = AutoConfig.from_pretrained(written)
    torch.manual_seed(0)
    model = checkpoint.adapter.model_class(config).eval()
    return checkpoint.adapter(model, load_processor(written, checkpoint.adapter))


def billions_loaded(model, config) -> float:
    """Parameters of ``model`` as ``from_pretrained`` loads the checkpoint, in billions.

    The InternVL-hf configs leave the top-level ``tie_word_embeddings`` at its default (True), so a model
    built from them ties the LM head to the embeddings; their text config says untied and the checkpoint
    holds both, so ``from_pretrained`` unties them (``test_an_untied_lm_head_is_loaded_untied``)."""
    count = sum(p.numel() for p in model.parameters())
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is embeddings.weight and not getattr(config.get_text_config(), "tie_word_embeddings", True):
        count += head.weight.numel()
    return count / 1e9


def frame(size: tuple[int, int]) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)


def image_token_id(checkpoint: Checkpoint) -> int:
    config = checkpoint.config
    return config.get("image_token_id", config.get("image_token_index"))


def processor_grid(checkpoint: Checkpoint, inputs, size: tuple[int, int]) -> tuple[int, int]:
    """Tiles (rows, cols) or the merged token grid, read from the processor's own outputs."""
    if checkpoint.adapter is LlavaNextAdapter:
        rows, cols = get_anyres_image_grid_shape(inputs["image_sizes"][0].tolist(), ANYRES_PINPOINTS, 336)
        assert inputs["pixel_values"].shape[1] == rows * cols + 1  # the tiles and the global view
        return int(rows), int(cols)
    if checkpoint.adapter is InternVLAdapter:
        cols, rows = get_optimal_tiled_canvas(size, (448, 448), 1, 12)
        assert inputs["pixel_values"].shape[0] == rows * cols + int(rows * cols > 1)  # the tiles and the thumbnail
        return int(rows), int(cols)
    t, h, w = (int(v) for v in inputs["image_grid_thw"][0])
    assert t == 1
    return h // 2, w // 2


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("published")
    return {name: write_checkpoint(root / name.replace("/", "--"), c) for name, c in CHECKPOINTS.items()}


# -- config ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_config_builds_the_published_model(published, name):
    """The stock class from the published config.json, on the meta device: the hub's parameter count."""
    checkpoint = CHECKPOINTS[name]
    assert unsupported_format(published[name], checkpoint.config) is None
    config = AutoConfig.from_pretrained(published[name])
    with torch.device("meta"):
        model = checkpoint.adapter.model_class(config)
    assert billions_loaded(model, config) == pytest.approx(checkpoint.billion_params, abs=0.01)
    assert config.image_token_id == image_token_id(checkpoint) < config.get_text_config().vocab_size
    assert image_token_id(checkpoint) in checkpoint.tokens.values()


@pytest.mark.parametrize("name", [n for n, c in CHECKPOINTS.items() if c.cost_model])
def test_cost_model_dimensions_are_the_checkpoints(name):
    checkpoint = CHECKPOINTS[name]
    entry = MODELS[checkpoint.cost_model]
    text = dict(checkpoint.config["text_config"])
    text_config = AutoConfig.for_model(text.pop("model_type"), **text)
    llm = entry["llm"]
    assert (llm["layers"], llm["hidden"], llm["ffn"], llm["heads"], llm["kv_heads"]) == (
        text_config.num_hidden_layers,
        text_config.hidden_size,
        text_config.intermediate_size,
        text_config.num_attention_heads,
        text_config.num_key_value_heads,
    )
    # the LM head counts for one token per prefill: the 64 padding rows the llava-hf checkpoints add change nothing
    assert llm["vocab"] == pytest.approx(text_config.vocab_size, rel=0.01)
    vision = checkpoint.config["vision_config"]
    tower = CLIP_VIT_L_336 if checkpoint.adapter is LlavaNextAdapter else INTERNVIT_300M_448
    size, patch = (v[0] if isinstance(v, list) else v for v in (vision["image_size"], vision["patch_size"]))
    assert (
        tower["layers"],
        tower["hidden"],
        tower["ffn"],
        tower["heads"],
        tower["image_size"],
        tower["patch_size"],
    ) == (
        vision["num_hidden_layers"],
        vision["hidden_size"],
        vision["intermediate_size"],
        vision["num_attention_heads"],
        size,
        patch,
    )


@pytest.mark.parametrize("name", [n for n, c in CHECKPOINTS.items() if c.same_geometry_as])
def test_checkpoints_sharing_a_geometry_share_every_input_of_it(name):
    """What lets one geometry model stand for several checkpoints in the layout tests."""
    checkpoint, other = CHECKPOINTS[name], CHECKPOINTS[CHECKPOINTS[name].same_geometry_as]
    assert checkpoint.adapter is other.adapter
    geometry_keys = (
        "vision_config",
        "image_grid_pinpoints",
        "vision_feature_layer",
        "vision_feature_select_strategy",
        "downsample_ratio",
        "image_token_index",
        "image_token_id",
    )
    for key in geometry_keys:
        mine, theirs = checkpoint.config.get(key), other.config.get(key)
        if key == "vision_config" and issubclass(
            checkpoint.adapter, Qwen2_5_VLAdapter
        ):  # projector ends at the LLM width
            mine, theirs = ({k: v for k, v in c.items() if k != "out_hidden_size"} for c in (mine, theirs))
        assert mine == theirs, key
    assert (checkpoint.preprocessor, checkpoint.processor, checkpoint.tokens) == (
        other.preprocessor,
        other.processor,
        other.tokens,
    )


# -- processor geometry ------------------------------------------------------------------------------------
@pytest.mark.parametrize("frame_name", FRAMES)
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_published_processor_geometry(published, name, frame_name):
    """Visual tokens and tiles / grid for a 1920×1080 and a 3840×2160 frame, from the published processor files."""
    checkpoint, size = CHECKPOINTS[name], FRAMES[frame_name]
    processor = load_processor(published[name], checkpoint.adapter)
    text = f"{processor.image_token} what colour is the circle?"
    inputs = processor(images=Image.fromarray(frame(size)), text=text, return_tensors="pt")
    assert int((inputs["input_ids"] == image_token_id(checkpoint)).sum()) == checkpoint.visual_tokens[frame_name]
    assert processor_grid(checkpoint, inputs, size) == checkpoint.grid[frame_name]


# -- the adapter over the real geometry --------------------------------------------------------------------
#: Layout runs that take too long for CI: the 4K frames of the Qwen families, and the 8B Qwen3-VL (its 27-block
#: tower over 8160 patches at 1080p: ~25 s on 2 busy cores; the 2B's 24 blocks run in CI)
SLOW_GEOMETRY = {"Qwen/Qwen3-VL-8B-Instruct"}
GEOMETRY_RUNS = [
    pytest.param(name, frame_name, marks=slow)
    if issubclass(CHECKPOINTS[name].adapter, Qwen2_5_VLAdapter) and frame_name == "4K" or name in SLOW_GEOMETRY
    else (name, frame_name)
    for name, c in CHECKPOINTS.items()
    if not c.same_geometry_as
    for frame_name in FRAMES
]


@pytest.fixture(scope="module")
def toy_adapters(tmp_path_factory):
    """The toy-width adapter of a checkpoint, built on first use (one kept at a time)."""
    root, built = tmp_path_factory.mktemp("toy"), {}

    def get(name: str):
        if name not in built:
            built.clear()
            gc.collect()
            built[name] = random_adapter(root / name.replace("/", "--"), CHECKPOINTS[name], CHECKPOINTS[name].toy)
        return built[name]

    return get


def check_layout_and_pruning(adapter, checkpoint: Checkpoint, frame_name: str, prune: bool) -> None:
    """``encode`` lays out exactly the processor's placeholders (it raises itself when its layout and the
    model's features disagree); a 25 % pruned ``generate`` drops exactly the pruned placeholders."""
    prepared = adapter.prepare(frame(FRAMES[frame_name]), "what colour is the circle?")
    total = int((prepared.inputs["input_ids"] == adapter.image_token_id).sum())
    assert total == checkpoint.visual_tokens[frame_name]
    visual = adapter.encode(prepared)
    assert visual.num_tokens == total and visual.features.shape[0] == total
    assert visual.token_boxes.shape == (total, 4) and torch.isfinite(visual.scores.saliency).all()
    grid = (
        adapter.token_grid(prepared.inputs["image_grid_thw"])
        if isinstance(adapter, Qwen2_5_VLAdapter)
        else tuple(visual.extras["grid"])
    )
    assert grid == checkpoint.grid[frame_name]
    if prune:
        kept = torch.arange(0, total, 4)
        relevance = adapter.instruction_attention(prepared, visual)
        assert relevance.shape[1] == total
        out = adapter.generate(prepared, visual, kept, max_new_tokens=1)
        assert out.prompt_tokens == prepared.inputs["input_ids"].shape[1] - (total - kept.numel())


@pytest.mark.parametrize("name, frame_name", GEOMETRY_RUNS)
def test_encode_lays_out_the_processors_tokens(toy_adapters, name, frame_name):
    """Toy widths, the checkpoint's geometry: layout at both frame sizes, pruning at 1920×1080."""
    checkpoint, adapter = CHECKPOINTS[name], toy_adapters(name)
    assert len(adapter.model.model.language_model.layers) == 3  # the overrides reached the model
    check_layout_and_pruning(adapter, checkpoint, frame_name, prune=frame_name == "1080p")


@slow
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_random_weights_at_real_width(tmp_path, name):
    """The checkpoint's vision tower and projector at full size, its LLM at full width with 3 layers, random
    weights: the same checks at 1920×1080 (the probes at the real head counts, grouped-query attention)."""
    checkpoint = CHECKPOINTS[name]
    gc.collect()
    adapter = random_adapter(tmp_path / "model", checkpoint, checkpoint.real_width)
    text = adapter.model.config.get_text_config()
    published = AutoConfig.from_pretrained(write_checkpoint(tmp_path / "published", checkpoint)).get_text_config()
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads) == (
        published.hidden_size,
        published.num_attention_heads,
        published.num_key_value_heads,
    )
    check_layout_and_pruning(adapter, checkpoint, "1080p", prune=True)


# -- loading -------------------------------------------------------------------------------------------------
def test_an_untied_lm_head_is_loaded_untied(tmp_path):
    """The InternVL-hf config.json leaves the top-level tie_word_embeddings out (default True) while its
    text config says False; transformers then finds both tensors in the checkpoint and keeps them apart.
    A tied head would answer nonsense without an error, so it is checked through ``load_adapter``."""
    from safetensors.torch import load_file

    from ptp_ros.testing.internvl import build_tiny_internvl
    from ptp_ros.vlm.loading import LoadOptions, load_adapter

    path = build_tiny_internvl(tmp_path / "tiny-internvl")
    config = json.loads((path / "config.json").read_text())
    config.pop("tie_word_embeddings", None)
    config["text_config"]["tie_word_embeddings"] = False
    (path / "config.json").write_text(json.dumps(config))
    saved = load_file(path / "model.safetensors")
    [head] = [tensor for key, tensor in saved.items() if key.endswith("lm_head.weight")]
    [embeddings] = [tensor for key, tensor in saved.items() if key.endswith("embed_tokens.weight")]
    assert not torch.equal(head, embeddings)
    model = load_adapter(path, LoadOptions(device="cpu")).model
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    assert torch.equal(model.lm_head.weight, head) and torch.equal(model.get_input_embeddings().weight, embeddings)
