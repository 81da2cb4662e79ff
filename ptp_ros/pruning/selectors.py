"""Every selector behind one signature, so benchmarks and the node can swap them by name.

A selector maps (scores, budget K) to a ``Selection`` of exactly K tokens.  PTP lives in ptp.py;
the peer methods it is compared with live here, each as small as the idea it copies.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .budgets import region_quotas
from .peers import attention_top_k_select, divprune_select, globalcom2_select, hired_select
from .ptp import PTPConfig, ptp_select, top_k_per_region
from .types import NO_REGION, InLLMPruning, Selection, TokenScores



def random_select(scores: TokenScores, budget: int, seed: int = 0) -> Selection:
    """K tokens drawn uniformly (seeded, so reproducible): the floor any informed method must beat."""
    candidates = torch.nonzero(scores.region.cpu() != NO_REGION).squeeze(1)
    g = torch.Generator().manual_seed(seed)
    kept = torch.sort(candidates[torch.randperm(candidates.shape[0], generator=g)[:budget]]).values
    return Selection(kept=kept, total=scores.num_tokens, region_sizes=scores.region_sizes(),
                     quotas=torch.bincount(scores.region.cpu()[kept], minlength=scores.num_regions),
                     method="random")


def uniform_cls_select(scores: TokenScores, budget: int) -> Selection:
    """Per-region [CLS] top-k with size-proportional quotas (FasterVLM / VisionZip-dominant style)."""
    sizes = scores.region_sizes()
    quotas = region_quotas(sizes.double() / sizes.sum(), sizes, budget)
    saliency = scores.saliency.detach().cpu().float()
    kept = top_k_per_region(saliency, scores.region.cpu(), quotas)
    return Selection(kept=kept, total=scores.num_tokens, quotas=quotas, region_sizes=sizes,
                     method="uniform_cls")


@dataclass(frozen=True)
class BoundSelector:
    """A selector with its configuration, and what the pipeline must compute for it.

    ``reduce``: how its relevance is reduced over the instruction rows ("max", "mean"; ``None``: the
    pipeline's ``instruction_reduce``).  ``in_llm``: where inside the LLM it ranks and drops tokens
    (``None``: before the LLM, from a separate relevance probe).
    """

    name: str
    fn: Callable[..., Selection]
    options: dict
    needs_relevance: bool
    reduce: str | None = None
    in_llm: InLLMPruning | None = None

    def __call__(self, scores: TokenScores, budget: int) -> Selection:
        return dataclasses.replace(self.fn(scores, budget, **self.options), method=self.name)


def make_selector(name: str, **options) -> BoundSelector:
    """A selector by name; ``options`` are its configuration (for "ptp": PTPConfig fields; for "fastv":
    ``k``, the layer from which it drops tokens, FastV's default 2)."""
    if name == "ptp":
        config = PTPConfig(**options)
        return BoundSelector("ptp", ptp_select, {"config": config}, needs_relevance=config.alpha > 0)
    if name == "fastv":
        # FastV ranks by the last prompt token's attention at layer K − 1, inside the LLM (one row: no reduction)
        return BoundSelector("fastv", attention_top_k_select, {}, needs_relevance=True, reduce="max",
                             in_llm=InLLMPruning.fastv(options.pop("k", 2)), **_no_options(name, options))
    if name not in PEER_SELECTORS:
        raise ValueError(f"unknown selector {name!r}; known: {', '.join(selector_names())}")
    return BoundSelector(name, PEER_SELECTORS[name], options, needs_relevance=name in RELEVANCE_SELECTORS,
                         reduce="mean" if name == "text_attention" else None)


def _no_options(name: str, options: dict) -> dict:
    if options:
        raise ValueError(f"{name} has no option(s) {', '.join(sorted(options))}")
    return {}


#: Peer selectors by name: fn(scores, budget, **options) -> Selection.
PEER_SELECTORS: dict[str, Callable[..., Selection]] = {
    "random": random_select,
    "uniform_cls": uniform_cls_select,
    "hired": hired_select,
    "text_attention": attention_top_k_select,
    "globalcom2": globalcom2_select,
    "divprune": divprune_select,
}
#: Peers that read ``TokenScores.relevance`` (the pipeline computes it only for these and for PTP, α > 0).
RELEVANCE_SELECTORS: set[str] = {"text_attention"}


def selector_names() -> list[str]:
    return ["ptp", "fastv", *PEER_SELECTORS]
