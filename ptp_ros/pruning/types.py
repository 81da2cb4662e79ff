"""The data every selector reads and writes: plain tensors, no model or ROS types."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

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
    """

    region: torch.Tensor  # [N] long
    saliency: torch.Tensor  # [N] float
    region_saliency: torch.Tensor  # [R] float, logits
    relevance: torch.Tensor | None = None  # [N] float
    global_region: int | None = None
    features: torch.Tensor | None = None  # [N, D] projected features, for diversity-based peers

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

    def region_sizes(self) -> torch.Tensor:
        """Selectable tokens per region ([R] long); structural tokens are not counted."""
        selectable = self.region[self.region != NO_REGION]
        return torch.bincount(selectable, minlength=self.num_regions)


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
    """Turn a budget given as a ratio in (0, 1] or as a token count into a token count in [1, total]."""
    if (keep_ratio is None) == (tokens is None):
        raise ValueError("give exactly one of keep_ratio and tokens")
    if keep_ratio is not None:
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        return max(1, min(total, round(keep_ratio * total)))
    if tokens < 1:
        raise ValueError(f"tokens must be at least 1, got {tokens}")
    return min(total, int(tokens))
