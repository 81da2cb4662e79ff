"""Camera level of the pyramid: one token budget for several views in one prompt, split camera → region → token.

The views' tokens are one ``TokenScores`` (``concat_views``) whose ``parts`` are each view's own scores.
``view_quotas`` splits the budget across the views; ``select_views`` then runs any single-view selection on
every view with its quota (regions, then tokens, inside the view) and merges the picks.

How the camera split is decided (``VIEW_SPLITS``):

* ``"shared"`` (default): a view's share is ``(1 − α) · its share of the tokens + α · w``, with ``w`` its share
  of the tokens re-weighted by ``exp(evidence / EVIDENCE_TEMPERATURE)``; a view's evidence is how sharply the
  instruction's attention singles out a few of its tokens: the mean of its ``EVIDENCE_TOKENS`` highest values of
  PTP's own top-down term (``ptp.concentration_per_region``: a token's share of its region's relevance against a
  uniform share, log scale, in [0, 1]).  Bottom-up [CLS] saliency is a softmax inside each image (the region logits
  are log shares of that view's own mass), so it ranks regions within a view but cannot say which view matters.
  Nor can the raw attention mass, which leans on an image's position in the prompt (docs/method.md).  Without
  relevance (α = 0, or a selector that reads none) it is the size split.  The evidence can only be as good as the
  model's attention at the relevance layer: ``ptp-eval --retrieval-probe`` measures whether it prefers the asked
  object at all.
* ``"equal"``: the same number of tokens per view (a view smaller than its part passes the rest on).
* ``"alone"``: each view keeps the request's keep ratio of its own tokens, as if it were asked alone (equal to
  ``"equal"`` when the views have the same number of tokens).

Pure torch (see DESIGN.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from .budgets import region_quotas
from .ptp import concentration_per_region
from .types import NO_REGION, Selection, TokenScores

VIEW_SPLITS = ("shared", "equal", "alone")
#: a view's evidence is the mean concentration of its this many most-attended tokens
EVIDENCE_TOKENS = 10
#: how far evidence moves the budget: 0.1 more evidence multiplies a view's weight by e (ours; on validation
#: a sharper 0.05 moved budget to the wrong camera often enough to cost target recall at 1.4 % kept)
EVIDENCE_TEMPERATURE = 0.1


def check_view_split(split: str) -> str:
    if split not in VIEW_SPLITS:
        raise ValueError(f"view_split must be one of {', '.join(VIEW_SPLITS)}, got {split!r}")
    return split


def concat_views(parts: Sequence[TokenScores]) -> TokenScores:
    """One ``TokenScores`` over several views' tokens, in prompt order: regions numbered on across views, relevance
    and features concatenated where every view has them; one view is returned as it is."""
    if not parts:
        raise ValueError("no view to concatenate")
    if len(parts) == 1:
        return parts[0]
    offsets = torch.cumsum(torch.tensor([0, *(p.num_regions for p in parts[:-1])]), 0)
    region = torch.cat(
        [
            torch.where(p.region.cpu() == NO_REGION, p.region.cpu(), p.region.cpu() + int(o))
            for p, o in zip(parts, offsets)
        ]
    )

    def joined(name: str):
        values = [getattr(p, name) for p in parts]
        return None if any(v is None for v in values) else torch.cat([v.to(values[0].device) for v in values])

    return TokenScores(
        region=region,
        saliency=torch.cat([p.saliency.cpu() for p in parts]),
        region_saliency=torch.cat([p.region_saliency.cpu() for p in parts]),
        relevance=joined("relevance"),
        global_region=None,
        features=joined("features"),
        parts=tuple(dataclasses.replace(p, relevance=None, features=None) for p in parts),
    )


def _shifted(region: torch.Tensor, offset: int) -> torch.Tensor:
    return torch.where(region == NO_REGION, region, region + offset)


def view_bounds(scores: TokenScores) -> list[tuple[int, int]]:
    """[start, end) of every view's tokens in ``scores``' order."""
    ends = torch.cumsum(torch.tensor(scores.view_tokens), 0).tolist()
    return list(zip([0, *ends[:-1]], ends))


def view_parts(scores: TokenScores) -> list[TokenScores]:
    """Each view's scores, with the relevance and features ``scores`` holds now (added after ``concat_views``)."""
    if not scores.parts:
        return [scores]
    out = []
    for part, (start, end) in zip(scores.parts, view_bounds(scores)):
        relevance = None if scores.relevance is None else scores.relevance[start:end]
        features = None if scores.features is None else scores.features[start:end]
        out.append(dataclasses.replace(part, relevance=relevance, features=features))
    return out


def view_quotas(
    scores: TokenScores,
    budget: int,
    split: str = "shared",
    alpha: float = 0.5,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """[V] long: how many of ``budget`` tokens each view keeps (summing to ``budget``, each at most its selectable
    tokens), by ``split`` (module docstring); ``alpha`` weighs the instruction's attention in ``"shared"``.
    ``weights`` ([V], summing to 1) stand in for the views' evidence-weighted shares in ``"shared"``:
    ``ptp-eval --multicamera`` gives it the asked camera's one-hot, what a perfect camera signal would buy."""
    check_view_split(split)
    parts = view_parts(scores)
    sizes = torch.stack([p.region_sizes().sum() for p in parts]).long()
    if not 0 <= budget <= int(sizes.sum()):
        raise ValueError(f"budget {budget} is outside [0, {int(sizes.sum())}] selectable tokens")
    size_share = sizes.double() / sizes.sum().clamp(min=1)
    if split == "equal":
        return region_quotas(torch.ones(len(parts), dtype=torch.double), sizes, budget)
    if split == "alone" or alpha == 0.0 or budget == 0 or (weights is None and scores.relevance is None):
        return region_quotas(size_share, sizes, budget)
    if weights is None:
        evidence = torch.tensor([view_evidence(p) for p in parts], dtype=torch.double)
        weights = torch.softmax(torch.log(size_share.clamp(min=1e-12)) + evidence / EVIDENCE_TEMPERATURE, dim=0)
    return region_quotas((1.0 - alpha) * size_share + alpha * weights.double(), sizes, budget)


def view_evidence(part: TokenScores) -> float:
    """How sharply the instruction's attention singles out a few of one view's selectable tokens, in [0, 1]: the
    mean of its ``EVIDENCE_TOKENS`` highest concentrations (``ptp.concentration_per_region``), which do not move
    when the whole view draws more or less attention."""
    selectable = part.region != NO_REGION
    concentration = concentration_per_region(part.relevance.cpu(), part.region.cpu(), part.num_regions)[selectable]
    if concentration.numel() == 0:
        return 0.0
    return float(concentration.topk(min(EVIDENCE_TOKENS, concentration.numel())).values.mean())


def select_views(
    select: Callable[[TokenScores, int], Selection],
    scores: TokenScores,
    quotas: torch.Tensor,
) -> Selection:
    """``select(view's scores, its quota)`` on every view, merged into one ``Selection`` over all tokens (kept
    indices, quotas, region sizes and fused scores in ``scores``' order); a view with quota 0 keeps nothing."""
    picks: list[Selection] = []
    for part, quota in zip(view_parts(scores), quotas.tolist()):
        if quota > 0:
            picks.append(select(part, int(quota)))
        else:
            empty = torch.zeros(part.num_regions, dtype=torch.long)
            picks.append(
                Selection(torch.empty(0, dtype=torch.long), part.num_tokens, empty, part.region_sizes(), None, "none")
            )
    starts = [start for start, _ in view_bounds(scores)]
    fused = [p.fused.cpu().float() if p.fused is not None else torch.zeros(p.total, dtype=torch.float32) for p in picks]
    method = next((p.method for p in picks if p.method != "none"), "none")
    return Selection(
        kept=torch.cat([p.kept.cpu() + s for p, s in zip(picks, starts)]),
        total=scores.num_tokens,
        quotas=_joined([p.quotas for p in picks]),
        region_sizes=_joined([p.region_sizes for p in picks]),
        fused=torch.cat(fused),
        method=method,
        extras={"view_quotas": [int(q) for q in quotas]},
    )


def _joined(values: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if any(v is None for v in values) else torch.cat([v.cpu().long() for v in values])
