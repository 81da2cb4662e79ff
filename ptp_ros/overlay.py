"""The picture an engineer looks at to see what the model saw: kept tokens, score heat, region grid.

Kept tokens keep the frame's own pixels, so a red object still looks red; pruned ones are turned grey and
dimmed.  The fused score is drawn as contour lines around the tokens scoring in its top quarter and top tenth
(its rank among the tokens, since the score is heavy-tailed), coloured on a heat scale; a legend in
the top-right corner says which is which.  Tile tokens are drawn where they look; the global view, which
sees the whole image coarsely, is drawn as an inset in the top-left corner.

It reads plain data (the pruning types and per-token boxes), not the model adapters, so that drawing needs
neither transformers nor ``vlm/``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import cv2
import numpy as np
import torch

from .pruning import NO_REGION, Selection, TokenScores, fused_scores
from .pruning.views import view_bounds


class TokenLayout(Protocol):
    """Where each visual token looks and how it scored: what an adapter's ``VisualTokens`` carries."""

    scores: TokenScores
    token_boxes: torch.Tensor  # [N, 4] (x0, y0, x1, y1) in pixels of the original image
    region_boxes: torch.Tensor  # [R, 4] likewise per region

    def view(self, index: int) -> TokenLayout:
        """Camera view ``index``'s own tokens (itself for a single view)."""
        ...


class Answered(Protocol):
    """What ``saliency_images`` reads of a ``pipeline.Answer``."""

    visual: TokenLayout
    selection: Selection
    view_names: tuple[str, ...]


DIM = 0.35  # brightness left on pruned tokens, which are also turned grey
#: heat contours: around the tokens whose score ranks above this share of the others
HEAT_LEVELS = (0.75, 0.9)
#: each level's line colour (BGR), from OpenCV's JET colour map at that level
HEAT_COLOURS = tuple(
    tuple(int(c) for c in cv2.applyColorMap(np.array([[round(level * 255)]], np.uint8), cv2.COLORMAP_JET)[0, 0])
    for level in HEAT_LEVELS
)
KEPT_SWATCH = ((0, 0, 255), (0, 255, 0), (255, 0, 0))  # BGR stripes: kept tokens show their true colours


def _token_maps(shape: tuple[int, int], boxes: np.ndarray, values: np.ndarray, kept: np.ndarray):
    """Per-pixel value and kept flag from per-token boxes (x0, y0, x1, y1) in pixels of ``shape``."""
    height, width = shape
    score = np.zeros((height, width), np.float32)
    keep = np.zeros((height, width), bool)
    for (x0, y0, x1, y1), v, k in zip(boxes.round().astype(int), values, kept):
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
        score[y0:y1, x0:x1] = v
        keep[y0:y1, x0:x1] = k
    return score, keep


def _rank(values: np.ndarray) -> np.ndarray:
    """Each value's rank among ``values`` as a share in [0, 1] (the highest is 1)."""
    if values.size < 2:
        return np.ones_like(values, dtype=np.float32)
    return (values.argsort(kind="stable").argsort() / (values.size - 1)).astype(np.float32)


def _paint(bgr: np.ndarray, rank: np.ndarray, keep: np.ndarray, line: int) -> np.ndarray:
    """Kept pixels as they are, pruned ones grey and dimmed, heat contours of the per-pixel ``rank`` on top."""
    out = bgr.copy()
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    out[~keep] = (grey[~keep, None] * DIM).astype(np.uint8)
    for level, colour in zip(HEAT_LEVELS, HEAT_COLOURS):
        contours, _ = cv2.findContours((rank >= level).astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, colour, line)
    return out


def _text_thickness(scale: float) -> int:
    return max(1, int(round(2 * scale)))


def _label(img: np.ndarray, text: str, org: tuple[int, int], scale: float) -> None:
    thickness = _text_thickness(scale)
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness + 2, cv2.LINE_AA)
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness, cv2.LINE_AA)


def _legend(img: np.ndarray, scale: float, line: int) -> None:
    """What kept, pruned and each heat line look like, in a box at the top-right corner; left out when it
    would cover more than half the image's width or height."""
    rows = ["kept", "pruned", *(f"score top {round((1 - level) * 100)} %" for level in HEAT_LEVELS)]
    sizes = [cv2.getTextSize(row, cv2.FONT_HERSHEY_SIMPLEX, scale, _text_thickness(scale) + 2) for row in rows]
    text_w = max(w for (w, _), _ in sizes)
    text_h = max(h + base for (_, h), base in sizes)
    pad, swatch_w = max(4, text_h // 3), 2 * text_h
    box_w, box_h = 3 * pad + swatch_w + text_w, pad + len(rows) * (text_h + pad)
    height, width = img.shape[:2]
    if 2 * box_w > width or 2 * box_h > height:
        return
    x0, y0 = width - box_w - pad, pad
    cv2.rectangle(img, (x0, y0), (x0 + box_w, y0 + box_h), (96, 96, 96), cv2.FILLED)
    kept = np.array(KEPT_SWATCH, np.uint8)[None]  # 1 x 3 stripes, BGR
    pruned = (cv2.cvtColor(cv2.cvtColor(kept, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR) * DIM).astype(np.uint8)
    sx = x0 + pad
    for i, row in enumerate(rows):
        top = y0 + pad + i * (text_h + pad)
        if i < 2:
            stripes = cv2.resize(kept if i == 0 else pruned, (swatch_w, text_h), interpolation=cv2.INTER_NEAREST)
            img[top : top + text_h, sx : sx + swatch_w] = stripes
        else:
            middle = top + text_h // 2
            cv2.line(img, (sx, middle), (sx + swatch_w - 1, middle), HEAT_COLOURS[i - 2], max(2, line))
        _label(img, row, (sx + swatch_w + pad, top + text_h - max(1, text_h // 5)), scale)


def saliency_image(
    image_rgb: np.ndarray, visual: TokenLayout, selection: Selection, max_side: int | None = None
) -> np.ndarray:
    """BGR uint8 image showing kept tokens, score heat and regions, with a legend: the size of ``image_rgb``, or
    shrunk so that its longer side is at most ``max_side`` (drawing and publishing an 8K overlay costs
    seconds)."""
    scale = min(1.0, max_side / max(image_rgb.shape[:2])) if max_side else 1.0
    if scale < 1.0:
        size = (max(1, round(image_rgb.shape[1] * scale)), max(1, round(image_rgb.shape[0] * scale)))
        image_rgb = cv2.resize(image_rgb, size, interpolation=cv2.INTER_AREA)
    scores = visual.scores
    fused = selection.fused if selection.fused is not None else fused_scores(scores, 0.0)
    fused = fused.detach().cpu().float().numpy()
    region = scores.region.cpu().numpy()
    kept = selection.mask().numpy()
    boxes = visual.token_boxes.cpu().numpy() * scale
    bgr = cv2.cvtColor(np.ascontiguousarray(image_rgb), cv2.COLOR_RGB2BGR)
    height, width = bgr.shape[:2]
    font = max(0.4, width / 2400)
    line = max(1, width // 640)  # region grid
    heat_line = max(1, width // 1280)  # thinner: heat contours are many
    g = scores.global_region

    tile_tokens = (region != NO_REGION) & (region != (g if g is not None else -2))
    rank, keep = _token_maps((height, width), boxes[tile_tokens], _rank(fused[tile_tokens]), kept[tile_tokens])
    out = _paint(bgr, rank, keep, heat_line)

    sizes = scores.region_sizes().numpy()
    counts = np.bincount(region[kept & (region != NO_REGION)], minlength=len(sizes))
    for r, (x0, y0, x1, y1) in enumerate((visual.region_boxes.cpu().numpy() * scale).round().astype(int)):
        if r == g or sizes[r] == 0:
            continue
        cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), (255, 255, 255), line)
        _label(out, f"{counts[r]}/{sizes[r]}", (x0 + 8, y1 - 10), font)

    inset_w, inset_h = width // 5, height // 5
    has_inset = g is not None and sizes[g] > 0
    if has_inset:  # the global view as an inset, top left
        in_g = region == g
        small_boxes = boxes[in_g] * np.array([inset_w / width, inset_h / height] * 2)
        small = cv2.resize(bgr, (inset_w, inset_h), interpolation=cv2.INTER_AREA)
        s_rank, s_keep = _token_maps((inset_h, inset_w), small_boxes, _rank(fused[in_g]), kept[in_g])
        out[:inset_h, :inset_w] = _paint(small, s_rank, s_keep, heat_line)
        cv2.rectangle(out, (0, 0), (inset_w - 1, inset_h - 1), (255, 255, 255), line)
        _label(out, f"global {counts[g]}/{sizes[g]}", (6, inset_h - 8), font * 0.8)

    _label(
        out,
        f"kept {selection.num_kept}/{selection.total} ({selection.keep_ratio:.1%})",
        ((inset_w if has_inset else 0) + 12, int(40 * font)),
        font,
    )
    _legend(out, font * 0.8, heat_line)
    return out


def view_selection(selection: Selection, start: int, end: int) -> Selection:
    """The part of ``selection`` over the tokens [start, end) (one camera view's), indexed from ``start``."""
    kept = selection.kept.cpu()
    kept = kept[(kept >= start) & (kept < end)] - start
    fused = None if selection.fused is None else selection.fused[start:end]
    return Selection(kept=kept, total=end - start, fused=fused, method=selection.method)


def saliency_images(
    images: Mapping[str, np.ndarray], answer: Answered, max_side: int | None = None
) -> dict[str, np.ndarray]:
    """``saliency_image`` of every camera view of ``answer`` (asked about ``images``, camera name → RGB frame, as
    ``Pipeline.answer`` took them), each drawn on its own frame: camera name → BGR uint8 image."""
    if list(images) != list(answer.view_names):
        raise ValueError(f"the answer's views are {list(answer.view_names)}, the images' {list(images)}")
    bounds = view_bounds(answer.visual.scores)
    return {
        name: saliency_image(
            images[name], answer.visual.view(i), view_selection(answer.selection, *bounds[i]), max_side
        )
        for i, name in enumerate(answer.view_names)
    }
