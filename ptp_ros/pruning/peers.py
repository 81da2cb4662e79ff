"""FastV and the peer methods PTP is compared with, each re-stated on ``TokenScores`` in a page of tensor
code and registered next to its function (registry.py).

They are "-style" re-implementations: the idea of each paper on the signals our adapters expose, not a
port of its code.  Where a paper needs a signal we do not have, the docstring says what stands in.

* ``attention_top_k_select``  one global top-K by text→visual attention: FastV's ranking (ECCV'24).
                        As the "fastv" selector it runs inside the LLM as FastV's code does (last token's
                        attention at layer K − 1, drop from layer K, see vlm/in_llm.py); as "text_attention"
                        it ranks before the LLM by the mean instruction attention at the adapter's LLM layer.
* ``hired_select``      HiRED (AAAI'25): fixed share for the global view, tile budgets from the global
                        view's [CLS] mass on each tile, per-tile [CLS] top-k.
* ``globalcom2_select`` GlobalCom² (2501.05179): global view pruned at the nominal ratio by its own
                        [CLS]; per-crop retention ratios scaled by the thumbnail's saliency over each crop.
* ``divprune_select``   DivPrune (CVPR'25): max–min diversity over the projected features.
"""

from __future__ import annotations

import dataclasses

import torch

from .budgets import region_quotas, region_shares
from .ptp import top_k_per_region
from .registry import SelectorSpec, register
from .types import NO_REGION, InLLMPruning, Selection, TokenScores, check_budget


def _tile_mass_shares(scores: TokenScores, temperature: float) -> torch.Tensor:
    """Budget shares of the tiles (global view: 0) from ``region_saliency``.

    With the LLaVA-NeXT adapter's default ``region_score="cls_mass"`` the tiles' logits are
    ``log(global-view [CLS] mass on the tile's footprint)``, so at temperature 1 a tile's share is
    exactly its fraction of that mass: the thumbnail-guided signal of HiRED and GlobalCom².
    """
    logits = scores.region_saliency.cpu().double().clone()
    if scores.global_region is not None:
        logits[scores.global_region] = float("-inf")
    return region_shares(logits, temperature)


def _split_global(scores: TokenScores, global_budget: int, budget: int, tile_shares: torch.Tensor) -> Selection:
    """Top-k by [CLS] saliency: ``global_budget`` tokens of the global view, the rest split over tiles."""
    sizes = scores.region_sizes()
    quotas = torch.zeros_like(sizes)
    g = scores.global_region
    if g is not None:
        quotas[g] = global_budget
        rest = sizes.clone()
        rest[g] = 0
    else:
        rest = sizes
    quotas = quotas + region_quotas(tile_shares, rest, budget - int(quotas.sum()))
    kept = top_k_per_region(scores.saliency.cpu().float(), scores.region.cpu(), quotas)
    return Selection(kept=kept, total=scores.num_tokens, quotas=quotas, region_sizes=sizes, method="")


def attention_top_k_select(scores: TokenScores, budget: int) -> Selection:
    """The K tokens that receive the most text→visual attention (``relevance``), one global ranking with
    no region budgets: FastV's choice.  Which attention it reads (which rows, which layer, before or
    inside the LLM) is the selector's ``in_llm``/``reduce``: "fastv" and "text_attention" below."""
    check_budget(scores, budget, minimum=0)
    if scores.relevance is None:
        raise ValueError(
            "attention top-k needs TokenScores.relevance (text→visual attention); the pipeline "
            "computes it for selectors that declare needs_relevance"
        )
    region = scores.region.cpu()
    ranked = torch.where(
        region != NO_REGION, scores.relevance.cpu().double(), torch.tensor(float("-inf"), dtype=torch.double)
    )
    kept = torch.sort(torch.argsort(ranked, descending=True, stable=True)[:budget]).values
    return Selection(
        kept=kept,
        total=scores.num_tokens,
        region_sizes=scores.region_sizes(),
        quotas=torch.bincount(region[kept], minlength=scores.num_regions),
        method="attention_top_k",
    )


def fastv_select(scores: TokenScores, budget: int, k: int = 2) -> Selection:
    """FastV: ``attention_top_k_select`` where FastV's code ranks — the last prompt token's attention at LLM
    layer ``k`` − 1, the other tokens dropped from layer ``k`` (its in-LLM plan, ``InLLMPruning.fastv(k)``,
    which the pipeline runs).  ``k`` says which attention ``relevance`` holds; it does not change the ranking."""
    return attention_top_k_select(scores, budget)


# FastV's relevance is one row (the last token's): no reduction to choose
register(
    SelectorSpec(
        "fastv",
        fastv_select,
        label="FastV (in-LLM, K=2)",
        description="FastV inside the LLM: top-K by the last prompt token's attention at layer k-1, the rest "
        "dropped from layer k (option k, default 2)",
        needs_relevance=True,
        reduce="max",
        in_llm=lambda options: InLLMPruning.fastv(options["k"]),
    )
)
register(
    SelectorSpec(
        "text_attention",
        attention_top_k_select,
        label="text attention top-k (FastV-style ranking before the LLM)",
        description="FastV's ranking before the LLM: top-K by the mean instruction attention at the adapter's "
        "LLM layer, then a pruned prefill",
        needs_relevance=True,
        reduce="mean",
    )
)


def hired_select(scores: TokenScores, budget: int, global_share: float = 0.5, temperature: float = 1.0) -> Selection:
    """HiRED-style: ``global_share`` of K to the global view (HiRED's α = 0.5, capped at its size),
    the rest to the tiles in proportion to the global view's [CLS] mass on each, top-k inside each.

    HiRED takes the partition signal from ViT layer 0 and the token score from layer 22; our adapter
    probes one layer, so both read the same [CLS] attention (``saliency`` / ``region_saliency``).
    """
    check_budget(scores, budget, minimum=0)
    if not 0.0 <= global_share <= 1.0:
        raise ValueError(f"global_share must be in [0, 1], got {global_share}")
    sizes = scores.region_sizes()
    g = scores.global_region
    global_budget = 0 if g is None else min(int(budget * global_share), int(sizes[g]))
    global_budget = max(global_budget, budget - int(sizes.sum() - (sizes[g] if g is not None else 0)))
    selection = _split_global(scores, global_budget, budget, _tile_mass_shares(scores, temperature))
    return dataclasses.replace(selection, method="hired")


register(
    SelectorSpec(
        "hired",
        hired_select,
        label="HiRED",
        description="HiRED-style: half the budget to the global view, the tiles' budgets by its [CLS] mass on "
        "them, [CLS] top-k in each",
        saliency_layer="feature",
    )
)


def globalcom2_select(scores: TokenScores, budget: int, temperature: float = 1.0) -> Selection:
    """GlobalCom²-style: the global view keeps the nominal ratio K/N of its tokens by its own [CLS];
    each crop's retention ratio is the nominal one scaled by its share of the thumbnail's saliency
    (``r_i = r · T · share_i``, capped at 1 with the excess passed on), top-k by the crop's [CLS].

    GlobalCom² also blends the thumbnail's attention, interpolated onto each crop, into the crop's
    token scores; ``TokenScores`` carries no geometry, so crops rank by their own [CLS] only.
    """
    selectable = check_budget(scores, budget, minimum=0)
    sizes = scores.region_sizes()
    g = scores.global_region
    global_budget = 0 if g is None or selectable == 0 else round(budget * int(sizes[g]) / selectable)
    if g is not None:
        global_budget = max(global_budget, budget - (selectable - int(sizes[g])))
    tile_sizes = sizes.double().clone()
    if g is not None:
        tile_sizes[g] = 0
    # ratio r_i ∝ share_i means tokens ∝ share_i · size_i
    shares = _tile_mass_shares(scores, temperature) * tile_sizes
    shares = shares / shares.sum() if float(shares.sum()) > 0 else tile_sizes / tile_sizes.sum().clamp(min=1)
    selection = _split_global(scores, global_budget, budget, shares)
    return dataclasses.replace(selection, method="globalcom2")


register(
    SelectorSpec(
        "globalcom2",
        globalcom2_select,
        label="GlobalCom2",
        description="GlobalCom2-style: the global view at the nominal ratio, each crop's ratio scaled by the "
        "thumbnail's saliency on it, [CLS] top-k in each",
        saliency_layer="feature",
    )
)


def divprune_select(scores: TokenScores, budget: int) -> Selection:
    """DivPrune: greedy max–min diversity on cosine distance between projected features.

    First the token whose nearest neighbour is farthest, then repeatedly the token farthest from
    everything kept so far.  Runs on the features' device; O(N²·D) for the distance matrix.
    """
    check_budget(scores, budget, minimum=0)
    if scores.features is None:
        raise ValueError(
            "divprune needs TokenScores.features (the projected visual features); the LLaVA-NeXT "
            "adapter fills them from VisualTokens.features"
        )
    region = scores.region.cpu()
    candidates = torch.nonzero(region != NO_REGION).squeeze(1)
    feats = torch.nn.functional.normalize(scores.features[candidates.to(scores.features.device)].float(), dim=-1)
    distance = 1.0 - feats @ feats.T  # [C, C] cosine distance
    chosen = torch.empty(budget, dtype=torch.long, device=distance.device)
    if budget:
        nearest = distance.fill_diagonal_(float("inf")).min(dim=1).values
        first = int(torch.argmax(nearest))
        distance.fill_diagonal_(0.0)
        chosen[0] = first
        min_dist = distance[first].clone()
        for i in range(1, budget):
            min_dist[chosen[i - 1]] = float("-inf")  # never pick a kept token again
            nxt = torch.argmax(min_dist)
            chosen[i] = nxt
            min_dist = torch.minimum(min_dist, distance[nxt])
    kept = torch.sort(candidates[chosen.cpu()]).values
    return Selection(
        kept=kept,
        total=scores.num_tokens,
        region_sizes=scores.region_sizes(),
        quotas=torch.bincount(region[kept], minlength=scores.num_regions),
        method="divprune",
    )


register(
    SelectorSpec(
        "divprune",
        divprune_select,
        label="DivPrune",
        description="DivPrune: greedy max-min cosine diversity over the projected features",
        needs_features=True,
        distances="all",
    )
)
