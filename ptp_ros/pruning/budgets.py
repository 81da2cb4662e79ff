"""Region level of the pyramid: how many of the K kept tokens each region (tile / global view) gets."""

from __future__ import annotations

import torch


def region_shares(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Budget shares that grow with region saliency: ``softmax(logits / temperature)``.

    A high temperature flattens the shares toward uniform, a low one hands the budget to the most
    salient region.  With ``logits = log(mass)`` and temperature 1 the shares are proportional to mass.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.softmax(logits.double() / temperature, dim=0)


def _water_fill(shares: torch.Tensor, capacity: torch.Tensor, amount: float) -> torch.Tensor:
    """Split ``amount`` proportionally to ``shares``; a region full at ``capacity`` passes its excess on."""
    ideal = torch.zeros_like(shares)
    active = capacity > 0
    left = float(amount)
    while left > 1e-9 and bool(active.any()):
        weights = torch.where(active, shares, torch.zeros_like(shares))
        if float(weights.sum()) <= 0:  # only zero-share regions have room left: fill them evenly
            weights = active.double()
        grant = left * weights / weights.sum()
        room = capacity - ideal
        overflow = active & (grant >= room)
        if not bool(overflow.any()):
            ideal = ideal + grant
            break
        ideal = torch.where(overflow, capacity.double(), ideal)
        active = active & ~overflow
        left = float(amount - ideal.sum())
    return ideal


def region_quotas(shares: torch.Tensor, sizes: torch.Tensor, budget: int, min_per_region: int = 0) -> torch.Tensor:
    """Integer quotas that sum exactly to ``budget``, never exceed a region's size, and follow ``shares``.

    Each non-empty region first gets ``min_per_region`` tokens (lowered evenly when the budget cannot
    afford it); the rest is water-filled in proportion to ``shares`` with regions capped at their size,
    and the fractional parts are rounded by largest remainder (ties: larger share, then lower index).
    A more salient region therefore never gets fewer tokens than a less salient one of the same size.
    """
    sizes = sizes.long().cpu()
    shares = shares.double().cpu()
    if shares.shape != sizes.shape:
        raise ValueError("shares and sizes must have one entry per region")
    if not 0 <= budget <= int(sizes.sum()):
        raise ValueError(f"budget {budget} is outside [0, {int(sizes.sum())}]")
    if min_per_region < 0:
        raise ValueError("min_per_region must be >= 0")
    nonempty = int((sizes > 0).sum())
    floor_min = min(min_per_region, budget // nonempty) if nonempty else 0
    base = torch.minimum(sizes, torch.full_like(sizes, floor_min))
    ideal = base.double() + _water_fill(shares, (sizes - base).double(), budget - int(base.sum()))
    quotas = torch.minimum(ideal.floor().long(), sizes)
    leftover = budget - int(quotas.sum())
    if leftover > 0:
        remainder = (ideal - quotas.double()).clamp(min=0)
        remainder[quotas >= sizes] = -1.0
        # lexicographic order: remainder desc, share desc, index asc (stable sorts applied last-key-first)
        order = torch.argsort(shares, descending=True, stable=True)
        order = order[torch.argsort(remainder[order], descending=True, stable=True)]
        quotas[order[:leftover]] += 1
    return quotas
