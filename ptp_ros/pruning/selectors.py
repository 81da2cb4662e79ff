"""The baselines every informed selector must beat, registered beside their functions.

A selector maps (scores, budget K) to a ``Selection`` of exactly K tokens.  PTP lives in ptp.py, FastV
and the peer methods in peers.py, these two here; each is registered where it is defined, and the
registry (registry.py: ``make_selector``, ``selector_names``) is how everything else reaches them by name.
"""

from __future__ import annotations

import torch

from .budgets import region_quotas
from .ptp import top_k_per_region
from .registry import SelectorSpec, register
from .types import NO_REGION, Selection, TokenScores


def random_select(scores: TokenScores, budget: int, seed: int = 0) -> Selection:
    """K tokens drawn uniformly (seeded, so reproducible): the floor any informed method must beat."""
    candidates = torch.nonzero(scores.region.cpu() != NO_REGION).squeeze(1)
    g = torch.Generator().manual_seed(seed)
    kept = torch.sort(candidates[torch.randperm(candidates.shape[0], generator=g)[:budget]]).values
    return Selection(
        kept=kept,
        total=scores.num_tokens,
        region_sizes=scores.region_sizes(),
        quotas=torch.bincount(scores.region.cpu()[kept], minlength=scores.num_regions),
        method="random",
    )


register(
    SelectorSpec(
        "random",
        random_select,
        label="random",
        description="K tokens drawn uniformly (seeded): the floor any informed method must beat",
    )
)


def uniform_cls_select(scores: TokenScores, budget: int) -> Selection:
    """Per-region [CLS] top-k with size-proportional quotas (FasterVLM / VisionZip-dominant style)."""
    sizes = scores.region_sizes()
    quotas = region_quotas(sizes.double() / sizes.sum(), sizes, budget)
    saliency = scores.saliency.detach().cpu().float()
    kept = top_k_per_region(saliency, scores.region.cpu(), quotas)
    return Selection(kept=kept, total=scores.num_tokens, quotas=quotas, region_sizes=sizes, method="uniform_cls")


register(
    SelectorSpec(
        "uniform_cls",
        uniform_cls_select,
        label="uniform [CLS] top-k",
        description="[CLS] top-k in each region, quotas in proportion to region size (FasterVLM / VisionZip style)",
        saliency_layer="feature",
    )
)
