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
from .types import NO_REGION, InLLMPruning, Selection, TokenScores


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


# The accuracy report's controls for methods that drop tokens inside the LLM (FastV, PTP's default): the same
# plan (layers < k read every token, kept ones keep their positions), with random tokens or none at all.
# Ranked at layer k itself, one row, so the hooks compute the least they can; the rows are not read.


def _dropped_from(options: dict) -> InLLMPruning:
    return InLLMPruning(score_layer=options["k"], prune_layer=options["k"], queries="last")


def random_in_llm_select(scores: TokenScores, budget: int, k: int = 2, seed: int = 0) -> Selection:
    """``random_select`` dropped inside the LLM from layer ``k`` on: what an in-LLM method's choice must beat
    once layers < ``k`` have read every token (``k`` says where, not what is kept)."""
    return random_select(scores, budget, seed)


def no_visual_select(scores: TokenScores, budget: int, k: int = 2) -> Selection:
    """No visual token at all from LLM layer ``k`` on, whatever the budget: how much of the answer layers < ``k``
    have already moved into the text positions (a control; with ``newline_policy="drop"`` no row newline stays
    either)."""
    empty = torch.zeros(0, dtype=torch.long)
    return Selection(
        kept=empty,
        total=scores.num_tokens,
        region_sizes=scores.region_sizes(),
        quotas=torch.zeros(scores.num_regions, dtype=torch.long),
        method="no_visual",
    )


register(
    SelectorSpec(
        "random_in_llm",
        random_in_llm_select,
        label="random (in-LLM, K=2)",
        description="control: K tokens drawn uniformly (seeded), dropped inside the LLM from layer k (default 2)",
        in_llm=_dropped_from,
        control=True,
    )
)
register(
    SelectorSpec(
        "no_visual_in_llm",
        no_visual_select,
        label="no visual token (in-LLM, K=2)",
        description="control: every visual token dropped inside the LLM from layer k (default 2)",
        in_llm=_dropped_from,
        control=True,
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
