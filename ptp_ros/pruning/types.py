"""The data every selector reads and writes: plain tensors, no model or ROS types."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import torch

from ..budget import ratio_tokens

#: Region id given to structural tokens (LLaVA-NeXT's row newlines) that belong to no region.
NO_REGION = -1


@dataclass(frozen=True)
class TokenScores:
    """Scores of the visual tokens of one image, in the order the LLM reads them.

    ``region[i]`` is the region (tile or global view) of token i, or ``NO_REGION`` for a structural
    token.  ``saliency`` is bottom-up ([CLS]→patch attention), ``relevance`` top-down (instruction →
    token attention in the LLM) or ``None`` when it was not computed.  ``region_saliency[r]`` is the
    logit that decides region r's share of the budget (higher = more tokens).
    ``global_region`` names the downscaled global view, if the model has one.

    Several camera views in one prompt are one ``TokenScores`` over all their tokens (views one after the
    other, regions numbered on across views, ``global_region`` None) whose ``parts`` hold each view's own
    scores (``views.concat_views``); a single view has no parts.
    """

    region: torch.Tensor  # [N] long
    saliency: torch.Tensor  # [N] float
    region_saliency: torch.Tensor  # [R] float, logits
    relevance: torch.Tensor | None = None  # [N] float
    global_region: int | None = None
    features: torch.Tensor | None = None  # [N, D] projected features, for diversity-based peers
    parts: tuple[TokenScores, ...] = ()  # each view's own scores, when these concatenate several views

    def __post_init__(self) -> None:
        n = self.region.shape[0]
        if self.saliency.shape != (n,):
            raise ValueError(f"saliency has shape {tuple(self.saliency.shape)}, expected ({n},)")
        if self.relevance is not None and self.relevance.shape != (n,):
            raise ValueError(f"relevance has shape {tuple(self.relevance.shape)}, expected ({n},)")
        if n and int(self.region.max()) >= self.region_saliency.shape[0]:
            raise ValueError("a token names a region beyond region_saliency")

    @property
    def num_tokens(self) -> int:
        return int(self.region.shape[0])

    @property
    def num_regions(self) -> int:
        return int(self.region_saliency.shape[0])

    @property
    def view_tokens(self) -> tuple[int, ...]:
        """Tokens per camera view, in prompt order (one entry for a single view)."""
        return tuple(p.num_tokens for p in self.parts) if self.parts else (self.num_tokens,)

    def region_sizes(self) -> torch.Tensor:
        """Selectable tokens per region ([R] long); structural tokens are not counted."""
        selectable = self.region[self.region != NO_REGION]
        return torch.bincount(selectable, minlength=self.num_regions)


#: Which prompt rows rank the visual tokens: the last prompt token (FastV) or every token after the image (PTP).
QUERIES = ("last", "instruction")


@dataclass(frozen=True)
class InLLMPruning:
    """Where inside the LLM the visual tokens are ranked and dropped.

    ``score_layer``: the decoder layer whose attention ranks them (FastV: K − 1).  ``prune_layer``: the
    first layer that sees only the kept tokens (FastV: K); layers below it run on the whole prompt.
    ``queries``: one of ``QUERIES``.
    """

    score_layer: int
    prune_layer: int
    queries: str = "last"

    def __post_init__(self) -> None:
        if self.queries not in QUERIES:
            raise ValueError(f"queries must be one of {QUERIES}, got {self.queries!r}")
        if not 0 <= self.score_layer <= self.prune_layer:
            raise ValueError(f"need 0 <= score_layer <= prune_layer, got {self.score_layer} and {self.prune_layer}")

    @classmethod
    def fastv(cls, k: int) -> InLLMPruning:
        """FastV's K: rank by layer K − 1's last-token attention, drop from layer K."""
        if k < 1:
            raise ValueError(f"FastV's K must be >= 1, got {k}")
        return cls(score_layer=k - 1, prune_layer=k, queries="last")

    def query_positions(self, image_positions: torch.Tensor, prompt_len: int) -> torch.Tensor:
        start = prompt_len - 1 if self.queries == "last" else int(image_positions.max()) + 1
        if start >= prompt_len:
            raise ValueError("the prompt has no tokens after the image to rank the visual tokens with")
        return torch.arange(start, prompt_len, device=image_positions.device)


@dataclass(frozen=True)
class Selection:
    """Which visual tokens survive: ``kept`` holds indices into the original order, ascending."""

    kept: torch.Tensor  # [K] long, sorted
    total: int
    quotas: torch.Tensor | None = None  # [R] long, tokens kept per region
    region_sizes: torch.Tensor | None = None  # [R] long
    fused: torch.Tensor | None = None  # [N] float in [0, 1], the score the choice was made on
    method: str = "ptp"
    extras: dict = field(default_factory=dict)

    @property
    def num_kept(self) -> int:
        return int(self.kept.shape[0])

    @property
    def keep_ratio(self) -> float:
        return self.num_kept / self.total if self.total else 1.0

    def mask(self) -> torch.Tensor:
        """Boolean [total] mask of the kept tokens."""
        m = torch.zeros(self.total, dtype=torch.bool)
        m[self.kept.cpu()] = True
        return m


def resolve_budget(total: int, keep_ratio: float | None = None, tokens: int | None = None) -> int:
    """A budget given as a keep ratio or as a token count, as a token count in [1, total] (``budget.ratio_tokens``
    for a ratio); both are taken as checked where they entered (``budget.check_keep_ratio``, ``check_tokens``).
    ``selectable_budget`` caps it at the tokens a selector may pick."""
    if (keep_ratio is None) == (tokens is None):
        raise ValueError("give exactly one of keep_ratio and tokens")
    if keep_ratio is not None:
        return ratio_tokens(total, keep_ratio)
    return max(1, min(total, tokens))


def selectable_budget(scores: TokenScores, keep_ratio: float | None = None, tokens: int | None = None) -> int:
    """The budget a selector gets: ``resolve_budget`` over all the visual tokens, capped at the selectable ones
    (structural tokens such as row newlines are never selected)."""
    return min(
        resolve_budget(scores.num_tokens, keep_ratio=keep_ratio, tokens=tokens),
        max(1, int(scores.region_sizes().sum())),
    )


def check_budget(scores: TokenScores, budget: int, minimum: int = 1) -> int:
    """The selectable token count (structural tokens are not selectable), or a ``ValueError`` when ``budget``
    is not an integer in [``minimum``, selectable]: the one budget check every selector shares."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral):
        raise ValueError(f"budget must be an integer token count, got {budget!r}")
    selectable = int(scores.region_sizes().sum())
    if not minimum <= budget <= selectable:
        raise ValueError(f"budget {budget} is outside [{minimum}, {selectable}] selectable tokens")
    return selectable
