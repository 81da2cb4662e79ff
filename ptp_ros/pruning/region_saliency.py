"""Region-level saliency signals: the logits that decide each region's share of the budget.

Both are bottom-up and computed before any token is chosen.  Tiles' own [CLS] attention sums to one
inside every tile, so it cannot rank tiles against each other; these signals can.
"""

from __future__ import annotations

import torch

_EPS = 1e-8


def footprint_mass(global_attention: torch.Tensor, region_boxes: torch.Tensor) -> torch.Tensor:
    """[CLS] attention mass of the global view that falls on each region's footprint (HiRED-style).

    ``global_attention`` is the global view's [CLS]→patch attention as an [h, w] map over the whole
    image; ``region_boxes`` are [R, 4] (x0, y0, x1, y1) in normalised image coordinates [0, 1].
    A patch counts for every region that contains its centre.  Returns [R] masses.
    """
    h, w = global_attention.shape
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    boxes = region_boxes.double()
    inside_y = (ys[None, :] >= boxes[:, 1:2]) & (ys[None, :] < boxes[:, 3:4])  # [R, h]
    inside_x = (xs[None, :] >= boxes[:, 0:1]) & (xs[None, :] < boxes[:, 2:3])  # [R, w]
    inside = inside_y[:, :, None] & inside_x[:, None, :]
    return (inside * global_attention.double()[None]).sum(dim=(1, 2))


def mass_logits(tile_mass: torch.Tensor) -> torch.Tensor:
    """Logits proportional to mass at temperature 1 (``log mass``); mass 0 gets a finite floor."""
    return torch.log(tile_mass.double().clamp(min=_EPS))


def similarity_logits(tile_cls: torch.Tensor, global_cls: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each tile's [CLS] state to the global view's (GSWA / HERO-style)."""
    return torch.nn.functional.cosine_similarity(tile_cls.double(), global_cls.double()[None], dim=-1)
