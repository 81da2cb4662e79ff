"""Analytic cost of a LLaVA-NeXT-style model from its published dimensions (no weights needed).

Counting convention ("exact, 2·MAC"): one multiply-accumulate = 2 FLOPs; every matmul counted
(q, k, v, o projections with their real widths, so grouped-query attention is cheaper; QKᵀ and AV over
the full n×n score matrix, no causal discount; gated MLPs as 3 matmuls, plain MLPs as 2); norms,
softmax, activations, RoPE and biases are not counted; the LM head is counted for the last prompt
token only (prefill produces one token's logits).  Under this convention the unpruned LLaVA-NeXT-7B
prefill at 2880 visual + 60 text tokens is 42.6 TFLOPs, between the published 41.7 (CDPruner,
GlobalCom²) and 43.58 (FasterVLM) — see test/test_cost_model.py.

Models are data (``MODELS``): adding a family is one more entry.  ``architecture`` says which ones
bench/models.py can also build with random weights for timing (LLaVA-NeXT); the others are analytic only.
"""
from __future__ import annotations

from dataclasses import dataclass

#: CLIP ViT-L/14 at 336 px, the vision tower of LLaVA-NeXT (24 layers, all run; 577 tokens a tile).
CLIP_VIT_L_336 = {"layers": 24, "hidden": 1024, "ffn": 4096, "heads": 16, "kv_heads": 16, "gated_mlp": False,
                  "image_size": 336, "patch_size": 14, "cls_tokens": 1}

#: InternViT-300M at 448 px, InternVL2's tower: 1025 tokens a tile, 2×2 pixel-shuffle → 256 LLM tokens.
INTERNVIT_300M_448 = {"layers": 24, "hidden": 1024, "ffn": 4096, "heads": 16, "kv_heads": 16, "gated_mlp": False,
                      "image_size": 448, "patch_size": 14, "cls_tokens": 1, "merge": 2}

#: Published dimensions.  ``llm.family`` tells bench/models.py which transformers config to build.
MODELS: dict[str, dict] = {
    "llava-next-7b": {  # llava-hf/llava-v1.6-vicuna-7b-hf: Vicuna-7B (Llama-2 7B)
        "architecture": "llava_next",
        "vision": CLIP_VIT_L_336,
        "llm": {"family": "llama", "layers": 32, "hidden": 4096, "ffn": 11008, "heads": 32, "kv_heads": 32,
                "vocab": 32000, "gated_mlp": True, "tie_embeddings": False},
        "max_visual_tokens": 2880,  # 5 tiles × 576, the count the published tables use
    },
    "llava-next-13b": {  # llava-hf/llava-v1.6-vicuna-13b-hf: Vicuna-13B (Llama-2 13B)
        "architecture": "llava_next",
        "vision": CLIP_VIT_L_336,
        "llm": {"family": "llama", "layers": 40, "hidden": 5120, "ffn": 13824, "heads": 40, "kv_heads": 40,
                "vocab": 32000, "gated_mlp": True, "tie_embeddings": False},
        "max_visual_tokens": 2880,
    },
    "cpu-proxy": {  # the real-size CPU proxy: CLIP ViT-L/14-336 + an LM with Qwen2-0.5B dimensions
        "architecture": "llava_next",
        "vision": CLIP_VIT_L_336,
        "llm": {"family": "qwen2", "layers": 24, "hidden": 896, "ffn": 4864, "heads": 14, "kv_heads": 2,
                "vocab": 151936, "gated_mlp": True, "tie_embeddings": False, "rope_theta": 1e6},
        "max_visual_tokens": 2880,
    },
    "internvl2-8b": {  # OpenGVLab/InternVL2-8B: InternViT-300M-448px + InternLM2.5-7B-chat (analytic only)
        "architecture": "internvl",
        "vision": INTERNVIT_300M_448,
        "llm": {"family": "internlm2", "layers": 32, "hidden": 4096, "ffn": 14336, "heads": 32, "kv_heads": 8,
                "vocab": 92553, "gated_mlp": True, "tie_embeddings": False},
        "max_visual_tokens": 3328,  # 12 tiles + the thumbnail, 256 tokens each
    },
}


@dataclass(frozen=True)
class Costs:
    """Cost of one request with ``visual_tokens`` kept and ``text_tokens`` of prompt text."""

    visual_tokens: int
    text_tokens: int
    vision_flops: float  # vision tower + projector, all tiles (does not shrink with pruning)
    prefill_flops: float  # LLM prefill over the pruned prompt
    kv_cache_bytes: float  # after prefill
    decode_flops_per_token: float  # one new token with the prefill's cache

    @property
    def total_prefill_flops(self) -> float:
        return self.vision_flops + self.prefill_flops


def _layer_flops(n: float, d: int, ffn: int, heads: int, kv_heads: int, gated: bool, context: float) -> float:
    """One transformer layer over ``n`` query tokens attending to ``context`` keys."""
    head_dim = d / heads
    kv_width = kv_heads * head_dim
    projections = 2 * n * d * (2 * d + 2 * kv_width)  # q, o: d→d; k, v: d→kv_width
    attention = 2 * 2 * n * context * d  # QKᵀ and AV over all heads
    mlp = 2 * n * d * ffn * (3 if gated else 2)
    return projections + attention + mlp


def tokens_per_tile(vision: dict) -> int:
    """LLM tokens one view yields: its patches, merged ``merge``×``merge`` (InternVL's pixel shuffle)."""
    return (vision["image_size"] // vision["patch_size"]) ** 2 // vision.get("merge", 1) ** 2


def vision_flops(model: dict, tiles: int) -> float:
    """Patch embedding + every ViT layer + the 2-layer projector, for ``tiles`` views.

    The projector reads ``merge``² patches concatenated per LLM token (width hidden·merge²)."""
    v, llm = model["vision"], model["llm"]
    patches = (v["image_size"] // v["patch_size"]) ** 2
    seq = patches + v["cls_tokens"]
    embed = 2 * patches * 3 * v["patch_size"] ** 2 * v["hidden"]
    layers = v["layers"] * _layer_flops(seq, v["hidden"], v["ffn"], v["heads"], v["kv_heads"], v["gated_mlp"], seq)
    projector_in = v["hidden"] * v.get("merge", 1) ** 2
    projector = 2 * tokens_per_tile(v) * (projector_in * llm["hidden"] + llm["hidden"] * llm["hidden"])
    return tiles * (embed + layers + projector)


def prefill_flops(model: dict, tokens: int) -> float:
    """LLM prefill over ``tokens`` prompt tokens (visual + text), LM head for the last one."""
    m = model["llm"]
    layer = _layer_flops(tokens, m["hidden"], m["ffn"], m["heads"], m["kv_heads"], m["gated_mlp"], tokens)
    return m["layers"] * layer + 2 * m["hidden"] * m["vocab"]


def decode_flops_per_token(model: dict, context: int) -> float:
    """One decoding step attending to ``context`` cached tokens (plus itself), LM head included."""
    m = model["llm"]
    layer = _layer_flops(1, m["hidden"], m["ffn"], m["heads"], m["kv_heads"], m["gated_mlp"], context + 1)
    return m["layers"] * layer + 2 * m["hidden"] * m["vocab"]


def kv_bytes_per_token(model: dict, bytes_per_value: int = 2) -> float:
    """K and V of every layer for one token (fp16 by default, as the published tables)."""
    m = model["llm"]
    return 2 * m["layers"] * m["kv_heads"] * (m["hidden"] // m["heads"]) * bytes_per_value


def relevance_flops(model: dict, tokens: int, layer: int, query_tokens: int) -> float:
    """Instruction relevance at LLM layer ``layer``: layers 0..layer−1 over the full prompt, then that
    layer's q/k projections and the instruction rows of QKᵀ (what ``text_to_token_attention`` runs)."""
    m = model["llm"]
    d, kv_width = m["hidden"], m["kv_heads"] * m["hidden"] / m["heads"]
    full = layer * _layer_flops(tokens, d, m["ffn"], m["heads"], m["kv_heads"], m["gated_mlp"], tokens)
    rows = 2 * query_tokens * d * d + 2 * tokens * d * kv_width + 2 * query_tokens * tokens * d
    return full + rows


def tiles_for(model: dict, visual_tokens_unpruned: int) -> int:
    """Views the vision tower encodes for an image of this many visual tokens (≈ one per 576 for
    LLaVA-NeXT, one per 256 for InternVL)."""
    return max(1, round(visual_tokens_unpruned / tokens_per_tile(model["vision"])))


def costs(model: dict, visual_tokens: int, text_tokens: int, tiles: int, bytes_per_value: int = 2) -> Costs:
    n = visual_tokens + text_tokens
    return Costs(visual_tokens=visual_tokens, text_tokens=text_tokens, vision_flops=vision_flops(model, tiles),
                 prefill_flops=prefill_flops(model, n), kv_cache_bytes=n * kv_bytes_per_token(model, bytes_per_value),
                 decode_flops_per_token=decode_flops_per_token(model, n))


def kept_tokens(total: int, keep_ratio: float) -> int:
    """The kept count for a keep ratio, rounded as ``ptp_ros.pruning.resolve_budget`` rounds it."""
    return max(1, min(total, round(keep_ratio * total)))


def cost_table(name: str, keep_ratios: list[float], text_tokens: int = 60, visual_tokens: int | None = None,
               bytes_per_value: int = 2) -> list[dict]:
    """One row per keep ratio: absolute costs and ratios to the unpruned request."""
    model = MODELS[name]
    total = visual_tokens or model["max_visual_tokens"]
    tiles = tiles_for(model, total)
    base = costs(model, total, text_tokens, tiles, bytes_per_value)
    rows = []
    for r in keep_ratios:
        c = costs(model, kept_tokens(total, r), text_tokens, tiles, bytes_per_value)
        rows.append({
            "model": name, "keep_ratio": r, "visual_tokens": c.visual_tokens, "text_tokens": text_tokens,
            "tiles": tiles, "vision_tflops": c.vision_flops / 1e12, "prefill_tflops": c.prefill_flops / 1e12,
            "prefill_ratio": c.prefill_flops / base.prefill_flops,
            "vision_plus_prefill_ratio": c.total_prefill_flops / base.total_prefill_flops,
            "kv_cache_mib": c.kv_cache_bytes / 2**20, "decode_gflops_per_token": c.decode_flops_per_token / 1e9,
            "relevance_tflops_layer2": relevance_flops(model, total + text_tokens, 2, text_tokens) / 1e12,
        })
    return rows
