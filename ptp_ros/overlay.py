"""The picture an engineer looks at to see what the model saw: fused-score heatmap, region grid, kept tokens.

Tile tokens are painted over the image where they look (pruned ones dimmed); the global view, which
sees the whole image coarsely, is drawn as an inset in the top-left corner.
"""

from __future__ import annotations

import cv2
import numpy as np

from .pruning import NO_REGION, Selection, fused_scores
from .vlm.base import VisualTokens

_DIM = 0.35  # brightness left on pruned areas
_HEAT = 0.45  # heatmap opacity


def _token_maps(shape: tuple[int, int], boxes: np.ndarray, values: np.ndarray, kept: np.ndarray):
    """Per-pixel score and kept flag from per-token boxes (x0, y0, x1, y1) in pixels of ``shape``."""
    height, width = shape
    score = np.zeros((height, width), np.float32)
    keep = np.zeros((height, width), bool)
    for (x0, y0, x1, y1), v, k in zip(boxes.round().astype(int), values, kept):
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
        score[y0:y1, x0:x1] = v
        keep[y0:y1, x0:x1] = k
    return score, keep


def _paint(bgr: np.ndarray, score: np.ndarray, keep: np.ndarray) -> np.ndarray:
    heat = cv2.applyColorMap((np.clip(score, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    out = cv2.addWeighted(bgr, 1 - _HEAT, heat, _HEAT, 0)
    out[~keep] = (out[~keep] * _DIM).astype(np.uint8)
    return out


def _label(img: np.ndarray, text: str, org: tuple[int, int], scale: float) -> None:
    thickness = max(1, int(round(2 * scale)))
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness + 2, cv2.LINE_AA)
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness, cv2.LINE_AA)


def saliency_image(
    image_rgb: np.ndarray, visual: VisualTokens, selection: Selection, max_side: int | None = None
) -> np.ndarray:
    """BGR uint8 image showing scores, regions and kept tokens: the size of ``image_rgb``, or shrunk so that
    its longer side is at most ``max_side`` (drawing and publishing an 8K overlay costs seconds)."""
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
    g = scores.global_region

    tile_tokens = (region != NO_REGION) & (region != (g if g is not None else -2))
    score, keep = _token_maps((height, width), boxes[tile_tokens], fused[tile_tokens], kept[tile_tokens])
    out = _paint(bgr, score, keep)

    sizes = scores.region_sizes().numpy()
    counts = np.bincount(region[kept & (region != NO_REGION)], minlength=len(sizes))
    for r, (x0, y0, x1, y1) in enumerate((visual.region_boxes.cpu().numpy() * scale).round().astype(int)):
        if r == g or sizes[r] == 0:
            continue
        cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), (255, 255, 255), max(1, width // 640))
        _label(out, f"{counts[r]}/{sizes[r]}", (x0 + 8, y1 - 10), font)

    inset_w, inset_h = width // 5, height // 5
    has_inset = g is not None and sizes[g] > 0
    if has_inset:  # the global view as an inset, top left
        in_g = region == g
        small_boxes = boxes[in_g] * np.array([inset_w / width, inset_h / height] * 2)
        small = cv2.resize(bgr, (inset_w, inset_h), interpolation=cv2.INTER_AREA)
        s_score, s_keep = _token_maps((inset_h, inset_w), small_boxes, fused[in_g], kept[in_g])
        out[:inset_h, :inset_w] = _paint(small, s_score, s_keep)
        cv2.rectangle(out, (0, 0), (inset_w - 1, inset_h - 1), (255, 255, 255), max(1, width // 640))
        _label(out, f"global {counts[g]}/{sizes[g]}", (6, inset_h - 8), font * 0.8)

    _label(
        out,
        f"kept {selection.num_kept}/{selection.total} ({selection.keep_ratio:.1%})",
        ((inset_w if has_inset else 0) + 12, int(40 * font)),
        font,
    )
    return out
