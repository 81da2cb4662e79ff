"""Analytic cost of a LLaVA-NeXT-style model from its published dimensions (no weights needed).

Counting convention ("exact, 2·MAC"): one multiply-accumulate = 2 FLOPs; every matmul counted
(q, k, v, o projections with their real widths, so grouped-query attention is cheaper; QKᵀ and AV over
the full n×n score matrix, no causal discount; gated MLPs as 3 matmuls, plain MLPs as 2); norms,
softmax, activations, RoPE and biases are not counted; the LM head is counted for the last prompt
token only (prefill produces one token's logits).  Under this convention the unpruned LLaVA-NeXT-7B
prefill at 2880 visual + 60 text tokens is 42.6 TFLOPs, between the published 41.7 (CDPruner,
GlobalCom²) and 43.58 (FasterVLM) — see test/test_cost_model.py.

Scoring is counted too (``total_prefill_flops``): a method's total is every LLM pass its request runs —
the prefill over the kept tokens (or, for in-LLM pruning, the layers below the prune layer over the full
prompt and the rest over the kept tokens), the separate relevance probe of pre-LLM methods that read
instruction attention (layers 0..k−1 over the full prompt + layer k's attention rows), the attention rows
an in-LLM method recomputes at its scoring layer — plus the selection's own matmuls on the projected
visual features (DivPrune's N×N cosine distances), which are counted beside the LLM's.  What each method
runs (``Passes``) comes from one place, ``passes_for``, which reads the library's own configured selector
(``ptp_ros.pruning.ConfiguredSelector``: its needs and its in-LLM plan), so the cost tables, ``ptp-bench`` and
``ptp-eval`` cannot disagree about it.

Models are data (``MODELS``): adding a family is one more entry.  ``architecture`` says which ones
bench/models.py can also build with random weights for timing (LLaVA-NeXT); the others are analytic only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ptp_ros.budget import ratio_tokens
from ptp_ros.pruning import ConfiguredSelector

#: CLIP ViT-L/14 at 336 px, the vision tower of LLaVA-NeXT (24 layers, all run; 577 tokens a tile).
CLIP_VIT_L_336 = {
    "layers": 24,
    "hidden": 1024,
    "ffn": 4096,
    "heads": 16,
    "kv_heads": 16,
    "gated_mlp": False,
    "image_size": 336,
    "patch_size": 14,
    "cls_tokens": 1,
}

#: InternViT-300M at 448 px, InternVL2's tower: 1025 tokens a tile, 2×2 pixel-shuffle → 256 LLM tokens.
INTERNVIT_300M_448 = {
    "layers": 24,
    "hidden": 1024,
    "ffn": 4096,
    "heads": 16,
    "kv_heads": 16,
    "gated_mlp": False,
    "image_size": 448,
    "patch_size": 14,
    "cls_tokens": 1,
    "merge": 2,
}

#: Published dimensions.  ``llm.family`` tells bench/models.py which transformers config to build.
MODELS: dict[str, dict] = {
    "llava-next-7b": {  # llava-hf/llava-v1.6-vicuna-7b-hf: Vicuna-7B (Llama-2 7B)
        "architecture": "llava_next",
        "vision": CLIP_VIT_L_336,
        "llm": {
            "family": "llama",
            "layers": 32,
            "hidden": 4096,
            "ffn": 11008,
            "heads": 32,
            "kv_heads": 32,
            "vocab": 32000,
            "gated_mlp": True,
            "tie_embeddings": False,
        },
        "max_visual_tokens": 2880,  # 5 tiles × 576, the count the published tables use
    },
    "llava-next-13b": {  # llava-hf/llava-v1.6-vicuna-13b-hf: Vicuna-13B (Llama-2 13B)
        "architecture": "llava_next",
        "vision": CLIP_VIT_L_336,
        "llm": {
            "family": "llama",
            "layers": 40,
            "hidden": 5120,
            "ffn": 13824,
            "heads": 40,
            "kv_heads": 40,
            "vocab": 32000,
            "gated_mlp": True,
            "tie_embeddings": False,
        },
        "max_visual_tokens": 2880,
    },
    "cpu-proxy": {  # the real-size CPU proxy: CLIP ViT-L/14-336 + an LM with Qwen2-0.5B dimensions
        "architecture": "llava_next",
        "vision": CLIP_VIT_L_336,
        "llm": {
            "family": "qwen2",
            "layers": 24,
            "hidden": 896,
            "ffn": 4864,
            "heads": 14,
            "kv_heads": 2,
            "vocab": 151936,
            "gated_mlp": True,
            "tie_embeddings": False,
            "rope_theta": 1e6,
        },
        "max_visual_tokens": 2880,
    },
    "internvl2-8b": {  # OpenGVLab/InternVL2-8B: InternViT-300M-448px + InternLM2.5-7B-chat (analytic only)
        "architecture": "internvl",
        "vision": INTERNVIT_300M_448,
        "llm": {
            "family": "internlm2",
            "layers": 32,
            "hidden": 4096,
            "ffn": 14336,
            "heads": 32,
            "kv_heads": 8,
            "vocab": 92553,
            "gated_mlp": True,
            "tie_embeddings": False,
        },
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
    m = _llm(model)
    layer = _layer_flops(tokens, m["hidden"], m["ffn"], m["heads"], m["kv_heads"], m["gated_mlp"], tokens)
    return m["layers"] * layer + 2 * m["hidden"] * m["vocab"]


def decode_flops_per_token(
    model: dict, context: int, prompt_context: int | None = None, prune_layer: int | None = None
) -> float:
    """One decoding step attending to ``context`` cached tokens (plus itself), LM head included; with in-LLM
    pruning the layers below ``prune_layer`` attend to their full-length cache of ``prompt_context`` tokens."""
    m = _llm(model)

    def layer(keys: int) -> float:
        return _layer_flops(1, m["hidden"], m["ffn"], m["heads"], m["kv_heads"], m["gated_mlp"], keys + 1)

    full_layers = 0 if prune_layer is None else min(prune_layer, m["layers"])
    full = layer(context if prompt_context is None else prompt_context)
    return full_layers * full + (m["layers"] - full_layers) * layer(context) + 2 * m["hidden"] * m["vocab"]


def kv_bytes_per_token(model: dict, bytes_per_value: int = 2) -> float:
    """K and V of every layer for one token (fp16 by default, as the published tables)."""
    m = _llm(model)
    return 2 * m["layers"] * m["kv_heads"] * (m["hidden"] // m["heads"]) * bytes_per_value


def _llm(model: dict) -> dict:
    """The LLM dims of a ``MODELS`` entry, or an ``llm`` dict itself."""
    return model["llm"] if "llm" in model else model


def _llm_layer(m: dict, tokens: float) -> float:
    return _layer_flops(tokens, m["hidden"], m["ffn"], m["heads"], m["kv_heads"], m["gated_mlp"], tokens)


def attention_rows_flops(model: dict, tokens: int, query_tokens: int) -> float:
    """One layer's attention rows recomputed for ranking (``ptp_ros.vlm.attention.attention_rows``): q for
    the ``query_tokens`` rows, k for every position up to the last query (the whole prompt: the queries
    end it), the rows of QKᵀ.  No AV and no MLP: the rows are only read."""
    m = _llm(model)
    d, kv_width = m["hidden"], m["kv_heads"] * m["hidden"] / m["heads"]
    return 2 * query_tokens * d * d + 2 * tokens * d * kv_width + 2 * query_tokens * tokens * d


def relevance_flops(model: dict, tokens: int, layer: int, query_tokens: int) -> float:
    """Instruction relevance at LLM layer ``layer``: layers 0..layer−1 over the full prompt, then that
    layer's q/k projections and the instruction rows of QKᵀ (what ``text_to_token_attention`` runs)."""
    m = _llm(model)
    return layer * _llm_layer(m, tokens) + attention_rows_flops(m, tokens, query_tokens)


@dataclass(frozen=True)
class Passes:
    """What a method runs besides the LLM prefill over the kept tokens (``passes_for`` builds it).

    ``probe_layer``: a separate relevance probe before the LLM, over the full prompt, reading layer k's
    attention (PTP with α > 0, text_attention).  ``prune_layer`` / ``score_layer``: in-LLM pruning —
    layers below ``prune_layer`` run over the full prompt, the rest over the kept tokens, and
    ``score_layer``'s attention rows are recomputed to rank (FastV, PTP with ``prune_in_llm``).
    ``queries``: which rows rank — "instruction" (every prompt token after the image) or "last" (one).
    ``diversity``: cosine distances on the projected features, as the selector declares them
    (``BoundSelector.distances``) — "all" (one N×N matrix: DivPrune, PTP's diverse pick without region
    budgets) or "per_region" (one per region: PTP's diverse pick).
    ``probe_candidates``: m > 0 when the probe reads only ⌈m × kept⌉ visual tokens and the text
    (``ConfiguredSelector.probe_candidates``).
    """

    probe_layer: int | None = None
    probe_candidates: float = 0.0
    score_layer: int | None = None
    prune_layer: int | None = None
    queries: str = "instruction"
    diversity: str | None = None

    @property
    def in_llm(self) -> bool:
        return self.prune_layer is not None


def passes_for(selector: ConfiguredSelector | None, llm_layer: int = 2) -> Passes:
    """The passes of a configured selector, with ``llm_layer`` the adapter's relevance layer (default 2), read from
    the library's own value: its bound selector says whether it needs relevance and which feature distances it
    computes, ``ConfiguredSelector.in_llm_plan`` whether and where it prunes inside the LLM.  ``None`` (a row that
    selects nothing): nothing beyond the prefill."""
    if selector is None:
        return Passes()
    bound = selector.bound
    plan = selector.in_llm_plan(llm_layer)
    if plan is not None:
        return Passes(
            score_layer=plan.score_layer, prune_layer=plan.prune_layer, queries=plan.queries, diversity=bound.distances
        )
    probe = llm_layer if bound.needs_relevance else None
    return Passes(
        probe_layer=probe,
        diversity=bound.distances,
        probe_candidates=selector.probe_candidates if probe is not None else 0.0,
    )


def prefill_breakdown(
    model: dict,
    text_tokens: int,
    visual_tokens: int,
    kept: int,
    passes: Passes = Passes(),
    query_tokens: int | None = None,
    regions: int | Sequence[int] = 1,
) -> dict[str, float]:
    """A request's total LLM prefill FLOPs by part: ``prefill`` (every decoder layer at the length it runs
    at, LM head for the last token), ``scoring`` (the relevance probe or the in-LLM attention rows),
    ``selection`` (matmuls on the projected features, counted beside the LLM) and ``total``.

    ``model``: a ``MODELS`` entry or its ``llm`` dict (``llm_dims_from_config`` builds one for any
    checkpoint).  ``text_tokens``: every prompt token that is not visual; ``query_tokens``: the ranking
    rows for ``queries="instruction"`` (the tokens after the image; default ``text_tokens``, a slight
    over-count by the template tokens before the image).  ``regions``: the region sizes (or a count of
    equal regions) the selection's distances run over (``selection_flops``).  Keeping every visual token
    scores nothing (as the pipeline does)."""
    m = _llm(model)
    layers, head = m["layers"], 2 * m["hidden"] * m["vocab"]
    full, pruned = text_tokens + visual_tokens, text_tokens + min(kept, visual_tokens)
    rows = 1 if passes.queries == "last" else (text_tokens if query_tokens is None else query_tokens)
    out = {"prefill": layers * _llm_layer(m, full) + head, "scoring": 0.0, "selection": 0.0}
    if kept >= visual_tokens:
        out["total"] = out["prefill"]
        return out
    if passes.in_llm:
        if passes.prune_layer < layers:  # else the plan installs nothing: the stock, unpruned prefill
            k = passes.prune_layer
            out["prefill"] = k * _llm_layer(m, full) + (layers - k) * _llm_layer(m, pruned) + head
            out["scoring"] = attention_rows_flops(m, full, rows)
    else:
        out["prefill"] = layers * _llm_layer(m, pruned) + head
        if passes.probe_layer is not None:
            probed = (
                text_tokens + min(visual_tokens, math.ceil(passes.probe_candidates * kept))
                if passes.probe_candidates
                else full
            )
            out["scoring"] = relevance_flops(m, probed, passes.probe_layer, rows)
    if passes.diversity is not None:
        out["selection"] = selection_flops(m, passes.diversity, visual_tokens, regions)
    out["total"] = out["prefill"] + out["scoring"] + out["selection"]
    return out


def selection_flops(model: dict, diversity: str, visual_tokens: int, regions: int | Sequence[int] = 1) -> float:
    """The cosine-distance products a diverse selector runs on the D-wide projected features, as its code runs
    them: ``"all"`` one [N, N] product over the selectable tokens (DivPrune; PTP's pick without region
    budgets), 2·N²·D; ``"per_region"`` one batched [R, n, n] product padded to the largest region n
    (``ptp.diverse_per_region``), 2·R·n²·D.  ``regions``: the selectable tokens' region sizes, or a count of
    equal regions over ``visual_tokens``."""
    if diversity not in ("all", "per_region"):
        raise ValueError(f"diversity must be 'all' or 'per_region', got {diversity!r}")
    if isinstance(regions, int):
        sizes = [math.ceil(visual_tokens / max(1, regions))] * max(1, regions)
        selectable = visual_tokens
    else:
        sizes = [int(n) for n in regions if n > 0] or [visual_tokens]
        selectable = sum(sizes)
    hidden = _llm(model)["hidden"]
    if diversity == "all":
        return 2 * selectable**2 * hidden
    return 2 * len(sizes) * max(sizes) ** 2 * hidden


def total_prefill_flops(
    model: dict,
    text_tokens: int,
    visual_tokens: int,
    kept: int,
    passes: Passes = Passes(),
    query_tokens: int | None = None,
    regions: int | Sequence[int] = 1,
) -> float:
    """Total LLM prefill FLOPs of one request, every scoring pass and the selection included
    (``prefill_breakdown``'s ``total``)."""
    return prefill_breakdown(model, text_tokens, visual_tokens, kept, passes, query_tokens, regions)["total"]


def kv_cache_bytes(
    model: dict, prompt_tokens: int, pruned_tokens: int, prune_layer: int | None = None, bytes_per_value: int = 2
) -> float:
    """The KV cache after a prefill: ``pruned_tokens`` a layer, except in-LLM pruning's layers below
    ``prune_layer``, which keep all ``prompt_tokens``."""
    m = _llm(model)
    per_layer = kv_bytes_per_token(m, bytes_per_value) / m["layers"]
    full_layers = 0 if prune_layer is None else min(prune_layer, m["layers"])
    return per_layer * (full_layers * prompt_tokens + (m["layers"] - full_layers) * pruned_tokens)


def llm_dims_from_config(config) -> dict:
    """The ``llm`` dict of a transformers config (a multimodal one's ``text_config``), or of the same as a
    plain dict (config.json): hidden_size, num_hidden_layers, intermediate_size, num_attention_heads,
    num_key_value_heads, vocab_size.  The adapters' LMs (Llama, Qwen2, Qwen2.5-VL's) have gated MLPs."""

    def get(key, default=None):
        return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)

    text = get("text_config")
    if text is not None:
        return llm_dims_from_config(text)
    heads = get("num_attention_heads")
    return {
        "family": get("model_type"),
        "layers": get("num_hidden_layers"),
        "hidden": get("hidden_size"),
        "ffn": get("intermediate_size"),
        "heads": heads,
        "kv_heads": get("num_key_value_heads") or heads,
        "vocab": get("vocab_size"),
        "gated_mlp": True,
        "tie_embeddings": bool(get("tie_word_embeddings", False)),
    }


def llm_dims_from_model_path(path) -> dict:
    """``llm_dims_from_config`` of a checkpoint directory's config.json (no transformers, no weights)."""
    import json
    from pathlib import Path

    return llm_dims_from_config(json.loads((Path(path) / "config.json").read_text()))


#: The methods of the analytic tables, by what they run: (key, description, configured selector; None: unpruned).
ANALYTIC_METHODS = (
    ("unpruned", "unpruned (all tokens)", None),
    (
        "no_instruction",
        "pre-LLM, no instruction (uniform_cls, hired, globalcom2, random, ptp α=0)",
        ConfiguredSelector("uniform_cls"),
    ),
    (
        "ptp",
        "ptp before the LLM (instruction probe at layer 2, then the pruned prefill; text_attention alike)",
        ConfiguredSelector("ptp", prune_in_llm=False),
    ),
    (
        "ptp_in_llm",
        "ptp in-LLM, the library's default (ranked at layer 2, dropped from layer 2; diverse pick: one cosine-distance "
        "product per region)",
        ConfiguredSelector("ptp"),
    ),
    (
        "fastv",
        "fastv in-LLM (K=2: last token's attention at layer 1, dropped from layer 2)",
        ConfiguredSelector("fastv"),
    ),
    ("divprune", "divprune (pre-LLM, N×N cosine distances on the projected features)", ConfiguredSelector("divprune")),
)


def method_totals(
    model: dict, text_tokens: int, visual_tokens: int, kept: int, llm_layer: int = 2, regions: int = 1
) -> dict[str, dict]:
    """``ANALYTIC_METHODS``' total prefill FLOPs (TFLOPs, and ratio to unpruned) at one kept count."""
    base = total_prefill_flops(model, text_tokens, visual_tokens, visual_tokens)
    out = {}
    for key, _, selector in ANALYTIC_METHODS:
        passes = passes_for(selector, llm_layer)
        parts = prefill_breakdown(
            model, text_tokens, visual_tokens, visual_tokens if key == "unpruned" else kept, passes, regions=regions
        )
        out[key] = {
            "total_tflops": parts["total"] / 1e12,
            "ratio": parts["total"] / base,
            "scoring_tflops": parts["scoring"] / 1e12,
            "selection_tflops": parts["selection"] / 1e12,
        }
    return out


def tiles_for(model: dict, visual_tokens_unpruned: int) -> int:
    """Views the vision tower encodes for an image of this many visual tokens (≈ one per 576 for
    LLaVA-NeXT, one per 256 for InternVL)."""
    return max(1, round(visual_tokens_unpruned / tokens_per_tile(model["vision"])))


def costs(model: dict, visual_tokens: int, text_tokens: int, tiles: int, bytes_per_value: int = 2) -> Costs:
    n = visual_tokens + text_tokens
    return Costs(
        visual_tokens=visual_tokens,
        text_tokens=text_tokens,
        vision_flops=vision_flops(model, tiles),
        prefill_flops=prefill_flops(model, n),
        kv_cache_bytes=n * kv_bytes_per_token(model, bytes_per_value),
        decode_flops_per_token=decode_flops_per_token(model, n),
    )


def cost_table(
    name: str,
    keep_ratios: list[float],
    text_tokens: int = 60,
    visual_tokens: int | None = None,
    bytes_per_value: int = 2,
) -> list[dict]:
    """One row per keep ratio: absolute costs and ratios to the unpruned request (the KV cache and a decoding
    step of pre-LLM pruning, and ``*_in_llm`` those of in-LLM pruning at the library's prune layer, whose
    lower layers keep the whole prompt), and under ``totals`` each of ``ANALYTIC_METHODS``' total LLM
    prefill FLOPs (scoring passes included) and its ratio to unpruned."""
    model = MODELS[name]
    total = visual_tokens or model["max_visual_tokens"]
    tiles = tiles_for(model, total)
    base = costs(model, total, text_tokens, tiles, bytes_per_value)
    prune_layer = passes_for(ConfiguredSelector()).prune_layer  # the library's default: PTP's in-LLM plan
    prompt = total + text_tokens
    rows = []
    for r in keep_ratios:
        c = costs(model, ratio_tokens(total, r), text_tokens, tiles, bytes_per_value)
        pruned = c.visual_tokens + text_tokens
        # in-LLM pruning keeps the full prompt in the cache of the layers below the prune layer (none when all
        # tokens are kept: the unpruned path)
        inside = prune_layer if c.visual_tokens < total else None
        rows.append(
            {
                "model": name,
                "keep_ratio": r,
                "visual_tokens": c.visual_tokens,
                "text_tokens": text_tokens,
                "tiles": tiles,
                "vision_tflops": c.vision_flops / 1e12,
                "prefill_tflops": c.prefill_flops / 1e12,
                "prefill_ratio": c.prefill_flops / base.prefill_flops,
                "vision_plus_prefill_ratio": c.total_prefill_flops / base.total_prefill_flops,
                "kv_cache_mib": c.kv_cache_bytes / 2**20,
                "decode_gflops_per_token": c.decode_flops_per_token / 1e9,
                "in_llm_prune_layer": prune_layer,
                "kv_cache_mib_in_llm": kv_cache_bytes(model, prompt, pruned, inside, bytes_per_value) / 2**20,
                "decode_gflops_per_token_in_llm": decode_flops_per_token(model, pruned, prompt, inside) / 1e9,
                "relevance_tflops_layer2": relevance_flops(model, total + text_tokens, 2, text_tokens) / 1e12,
                # per method: total LLM prefill FLOPs, scoring passes and selection included (ANALYTIC_METHODS)
                "totals": method_totals(model, text_tokens, total, c.visual_tokens, regions=tiles),
            }
        )
    return rows
