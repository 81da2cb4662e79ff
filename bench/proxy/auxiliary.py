"""Auxiliary objectives that stand in for vision pre-training; trained jointly, discarded afterwards.

Why: a real LVLM's vision tower arrives pre-trained (CLIP) and already encodes objects; ours starts
from random weights, and a one-word answer per question is too sparse a signal to learn 13–20 px
shapes within 45 CPU-minutes (a first run sat at the answer prior for 300+ steps).  Two small heads
supply what pre-training would, from the ground truth the scenes carry:

- token head: every packed visual token (after the projector: what the LLM reads) names the object
  under it (shape × colour) or background: dense, local supervision of the tiles and global view;
- [CLS] head: every tile's [CLS] state at the feature layer predicts which shape × colour pairs the
  tile holds (multi-label), an image-level "caption" objective like CLIP's.

Neither head is saved; the checkpoint is the stock LLaVA-NeXT.  The [CLS] head is why [CLS]
attention may become object-centred here, as it is in CLIP; the report says so.
"""
from __future__ import annotations

import torch
from torch import nn

from ptp_ros.proxy import COLOURS, SHAPES, SceneObject
from ptp_ros.pruning import NO_REGION

CLASSES = [(s, c) for s in SHAPES for c in COLOURS]


class AuxiliaryHeads(nn.Module):
    def __init__(self, text_width: int, vision_width: int):
        super().__init__()
        self.token = nn.Linear(text_width, 1 + len(CLASSES))
        self.cls = nn.Linear(vision_width, len(CLASSES))


def _class_of(o: SceneObject) -> int:
    return CLASSES.index((o.shape, o.colour))


def token_targets(token_boxes: torch.Tensor, region: torch.Tensor, objects: list[SceneObject]) -> torch.Tensor:
    """[N] class per packed token: 1 + class of the object under it, 0 background, −100 structural.

    A tile token is an object's when its centre lies in the object's box; a global-view token (a patch
    larger than the objects) when it holds the object's centre."""
    target = torch.zeros(region.shape[0], dtype=torch.long)
    target[region == NO_REGION] = -100
    cx, cy = (token_boxes[:, 0] + token_boxes[:, 2]) / 2, (token_boxes[:, 1] + token_boxes[:, 3]) / 2
    tile = region > 0
    for o in objects:
        x0, y0, x1, y1 = o.box
        ox, oy = o.centre
        in_tile = tile & (cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1)
        in_global = (region == 0) & (token_boxes[:, 0] <= ox) & (token_boxes[:, 2] > ox) & \
            (token_boxes[:, 1] <= oy) & (token_boxes[:, 3] > oy)
        target[in_tile | in_global] = 1 + _class_of(o)
    return target


def tile_targets(region_boxes: torch.Tensor, objects: list[SceneObject]) -> torch.Tensor:
    """[R, classes] multi-hot: the pairs whose centre lies in region r's image box (region 0: all)."""
    target = torch.zeros(region_boxes.shape[0], len(CLASSES))
    for o in objects:
        ox, oy = o.centre
        inside = (region_boxes[:, 0] <= ox) & (region_boxes[:, 2] > ox) & (region_boxes[:, 1] <= oy) & \
            (region_boxes[:, 3] > oy)
        target[inside, _class_of(o)] = 1.0
    return target


def auxiliary_loss(heads: AuxiliaryHeads, feats: torch.Tensor, cls_states: torch.Tensor, token_target: torch.Tensor,
                   tile_target: torch.Tensor) -> torch.Tensor:
    """Token CE (object and background tokens weighted equally as groups) + [CLS] multi-label BCE."""
    logits = heads.token(feats)
    per_token = nn.functional.cross_entropy(logits, token_target.clamp(min=0), reduction="none")
    valid = token_target >= 0
    obj, bg = valid & (token_target > 0), valid & (token_target == 0)
    token_loss = per_token[bg].mean() + (per_token[obj].mean() if obj.any() else 0.0)
    cls_loss = nn.functional.binary_cross_entropy_with_logits(heads.cls(cls_states), tile_target)
    return token_loss + cls_loss
