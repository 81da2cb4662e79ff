"""Auxiliary objectives that stand in for vision pre-training (stage 1 of ``train.py``); discarded afterwards.

Why: a real LVLM's vision tower arrives pre-trained (CLIP) and already encodes objects; ours starts
from random weights, and a one-word answer per question is too sparse a signal to learn one-patch
shapes within 45 CPU-minutes (docs/accuracy/training.md).  Small heads supply what
pre-training would, from the ground truth the scenes carry:

- token head: every packed visual token (after the projector: what the LLM reads) names the object
  under it (shape × colour) or background: dense, local supervision of the tiles and global view;
- [CLS] head: every tile's [CLS] state at the feature layer predicts which shape × colour pairs the
  tile holds (multi-label), an image-level "caption" objective like CLIP's;
- side head: every global-view token (a model without one, Qwen2.5-VL: every token) says whether it
  lies left or right of the image's middle, so that place is in the features (location questions).

No head is saved; the checkpoint is the stock model.  The [CLS] head (LLaVA-NeXT only: Qwen2.5-VL has
no [CLS]) is why [CLS] attention may become object-centred here, as it is in CLIP; the report says so.
"""

from __future__ import annotations

import torch
from torch import nn

from ptp_ros.proxy import COLOURS, SHAPES, SceneObject

CLASSES = [(s, c) for s in SHAPES for c in COLOURS]


class AuxiliaryHeads(nn.Module):
    def __init__(self, text_width: int, vision_width: int):
        super().__init__()
        self.token = nn.Linear(text_width, 1 + len(CLASSES))
        self.cls = nn.Linear(vision_width, len(CLASSES))
        self.side = nn.Linear(text_width, 2)


def _class_of(o: SceneObject) -> int:
    return CLASSES.index((o.shape, o.colour))


def _holding(boxes: torch.Tensor, o: SceneObject) -> torch.Tensor:
    """[B] bool: which of the image boxes [B, 4] hold the object's centre (half-open, so exactly one of a
    tiling does)."""
    ox, oy = o.centre
    return (boxes[:, 0] <= ox) & (boxes[:, 2] > ox) & (boxes[:, 1] <= oy) & (boxes[:, 3] > oy)


def overlapping(boxes: torch.Tensor, o: SceneObject) -> torch.Tensor:
    """[B] bool: which of the image boxes [B, 4] overlap the object's box."""
    x0, y0, x1, y1 = o.box
    return (boxes[:, 0] < x1) & (boxes[:, 2] > x0) & (boxes[:, 1] < y1) & (boxes[:, 3] > y0)


def object_tokens(
    token_boxes: torch.Tensor, detail: torch.Tensor, overview: torch.Tensor, objects: list[SceneObject]
) -> torch.Tensor:
    """[objects, 2] packed index of the detail token (a tile's) and of the global-view token holding each
    object's centre (−1 where none does: an object cut off by unpadding, or a model without a global
    view); ``detail`` / ``overview`` [N] bool say which tokens are which."""
    index = torch.full((len(objects), 2), -1, dtype=torch.long)
    for k, o in enumerate(objects):
        hold = _holding(token_boxes, o)
        for column, where in enumerate((hold & detail, hold & overview)):
            found = where.nonzero()[:, 0]
            if len(found):
                index[k, column] = found[0]
    return index


def token_targets(
    object_index: torch.Tensor, region: torch.Tensor, objects: list[SceneObject], token_boxes: torch.Tensor
) -> torch.Tensor:
    """[N] class per packed token: 1 + class of the object whose centre it holds (``object_index`` from
    ``object_tokens``), 0 background, −100 structural or unlabelled.  Unlabelled: a token that shows part
    of an object but not its centre (neither that class nor background is true of it; Qwen2.5-VL's
    28-px tokens do not align with the objects, LLaVA-NeXT's global view neither).  In the tiles an
    object sits inside one patch, so there it is exactly one token."""
    target = torch.zeros(region.shape[0], dtype=torch.long)
    target[region < 0] = -100
    for o in objects:
        target[overlapping(token_boxes, o) & (target == 0)] = -100
    for o, idx in zip(objects, object_index):
        target[idx[idx >= 0]] = 1 + _class_of(o)
    return target


def side_targets(token_boxes: torch.Tensor, where: torch.Tensor, width: int) -> torch.Tensor:
    """[N] 1 where a token of ``where`` [N] bool has its centre left of the image's middle, 0 right,
    −100 for the other tokens."""
    target = torch.full((where.shape[0],), -100, dtype=torch.long)
    target[where] = ((token_boxes[where, 0] + token_boxes[where, 2]) / 2 < width / 2).long()
    return target


def tile_targets(region_boxes: torch.Tensor, objects: list[SceneObject]) -> torch.Tensor:
    """[R, classes] multi-hot: the pairs whose centre lies in region r's image box (region 0: all)."""
    target = torch.zeros(region_boxes.shape[0], len(CLASSES))
    for o in objects:
        target[_holding(region_boxes, o), _class_of(o)] = 1.0
    return target


def auxiliary_loss(
    heads: AuxiliaryHeads,
    feats: torch.Tensor,
    cls_states: torch.Tensor | None,
    token_target: torch.Tensor,
    tile_target: torch.Tensor,
    side_target: torch.Tensor,
) -> torch.Tensor:
    """Token CE (object and background tokens weighted equally as groups) + [CLS] multi-label BCE (when the
    model has [CLS] states) + side CE."""
    logits = heads.token(feats)
    per_token = nn.functional.cross_entropy(logits, token_target.clamp(min=0), reduction="none")
    valid = token_target >= 0
    obj, bg = valid & (token_target > 0), valid & (token_target == 0)
    # a crowded scene read at low resolution may have no background token left
    token_loss = sum(per_token[group].mean() for group in (bg, obj) if group.any())
    side_loss = nn.functional.cross_entropy(heads.side(feats), side_target, ignore_index=-100)
    if cls_states is None:
        return token_loss + side_loss
    cls_loss = nn.functional.binary_cross_entropy_with_logits(heads.cls(cls_states), tile_target)
    return token_loss + cls_loss + side_loss
