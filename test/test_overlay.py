"""The saliency image: same size as the frame, kept tokens in their own colours, pruned ones grey and dimmed,
heat as contour lines, one box per tile, and a legend that says which is which."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
import torch

from ptp_ros.overlay import DIM, HEAT_COLOURS, KEPT_SWATCH, saliency_image
from ptp_ros.pipeline import Pipeline, PipelineConfig
from ptp_ros.pruning import NO_REGION, Selection

SQUARE = (700, 300, 1000, 600)  # x0, y0, x1, y1 of a red square on grey, clear of the inset and the legend


@pytest.fixture(scope="module")
def answer(tiny_adapter, sample_image):
    return Pipeline(tiny_adapter, PipelineConfig(max_new_tokens=1)).answer(
        sample_image, "where is it?", keep_ratio=0.25
    )


@pytest.fixture(scope="module")
def red_square():
    image = np.full((720, 1280, 3), 128, np.uint8)
    x0, y0, x1, y1 = SQUARE
    image[y0:y1, x0:x1] = (255, 0, 0)  # RGB
    return image


@pytest.fixture(scope="module")
def square_answer(tiny_adapter, red_square):
    return Pipeline(tiny_adapter, PipelineConfig(max_new_tokens=1)).answer(red_square, "what colour?", keep_ratio=0.25)


def _mean_brightness(image, boxes):
    values = [image[int(y0) : int(y1), int(x0) : int(x1)].mean() for x0, y0, x1, y1 in boxes]
    return float(np.mean(values))


def _pixels(image, boxes, margin: int = 3) -> np.ndarray:
    """The pixels inside ``boxes`` (shrunk by ``margin``, clear of their edges), as N x 3."""
    parts = [
        image[int(y0) + margin : int(y1) - margin, int(x0) + margin : int(x1) - margin].reshape(-1, 3)
        for x0, y0, x1, y1 in boxes
    ]
    return np.concatenate(parts)


def test_pruned_tokens_are_dimmed(answer, sample_image):
    out = saliency_image(sample_image, answer.visual, answer.selection)
    assert out.shape == sample_image.shape and out.dtype == np.uint8
    region = answer.visual.scores.region
    kept = answer.selection.mask()
    tiles = (region > 0) & (region != NO_REGION)  # tile tokens; region 0 is the global view (an inset)
    boxes = answer.visual.token_boxes
    # stay clear of the inset (top-left fifth) and the labels
    clear = (boxes[:, 0] > sample_image.shape[1] / 5) | (boxes[:, 1] > sample_image.shape[0] / 5)
    kept_boxes = boxes[tiles & kept & clear].numpy()
    pruned_boxes = boxes[tiles & ~kept & clear].numpy()
    assert _mean_brightness(out, kept_boxes) > 1.5 * _mean_brightness(out, pruned_boxes)


def test_kept_tokens_keep_their_colour_and_pruned_ones_turn_grey(square_answer, red_square):
    """A red square stays red where its tokens are kept (no heat tint turning it orange); where they are
    pruned it is grey and dim."""
    visual = square_answer.visual
    region, boxes = visual.scores.region, visual.token_boxes
    tiles = ((region > 0) & (region != NO_REGION)).numpy()
    x0, y0, x1, y1 = SQUARE
    middle = (x0 + x1) / 2
    inside = ((boxes[:, 0] >= x0) & (boxes[:, 1] >= y0) & (boxes[:, 2] <= x1) & (boxes[:, 3] <= y1)).numpy()
    left, right = inside & tiles & (boxes[:, 2] <= middle).numpy(), inside & tiles & (boxes[:, 0] >= middle).numpy()
    assert left.sum() >= 4 and right.sum() >= 4, "the test needs tile tokens on both halves of the square"
    selection = Selection(
        kept=torch.from_numpy(np.flatnonzero(left)), total=visual.num_tokens, fused=square_answer.selection.fused
    )
    out = saliency_image(red_square, visual, selection)
    bgr_in = cv2.cvtColor(red_square, cv2.COLOR_RGB2BGR)

    kept_out, kept_in = _pixels(out, boxes[left].numpy()), _pixels(bgr_in, boxes[left].numpy())
    unchanged = (kept_out == kept_in).all(axis=1).mean()
    assert unchanged >= 0.9, f"only {unchanged:.0%} of the kept square's pixels keep their colour"
    hsv = cv2.cvtColor(kept_out[None], cv2.COLOR_BGR2HSV)[0]
    hue, saturation = np.median(hsv[:, 0]), np.median(hsv[:, 1])
    assert (hue <= 5 or hue >= 175) and saturation >= 250, (hue, saturation)  # red, not orange

    pruned = cv2.cvtColor(_pixels(out, boxes[right].numpy())[None], cv2.COLOR_BGR2HSV)[0]
    assert np.median(pruned[:, 1]) == 0 and np.median(pruned[:, 2]) <= 255 * DIM + 1


def test_the_legend_shows_kept_pruned_and_the_heat_lines(square_answer, red_square):
    out = saliency_image(red_square, square_answer.visual, square_answer.selection)
    height, width = out.shape[:2]
    corner = out[: height // 4, width * 3 // 4 :].reshape(-1, 3)  # top right: grey background only, but for it
    colours = {tuple(int(c) for c in pixel) for pixel in np.unique(corner, axis=0)}
    assert set(KEPT_SWATCH) <= colours and set(HEAT_COLOURS) <= colours
    plain = cv2.cvtColor(red_square, cv2.COLOR_RGB2BGR)[: height // 4, width * 3 // 4 :].reshape(-1, 3)
    assert not {tuple(int(c) for c in p) for p in np.unique(plain, axis=0)} & set(KEPT_SWATCH)
    small = saliency_image(red_square, square_answer.visual, square_answer.selection, max_side=96)
    assert small.shape == (54, 96, 3)  # too small for a legend: drawn without one


def test_models_without_a_global_view_are_drawn_too(answer, sample_image):
    scores = dataclasses.replace(answer.visual.scores, global_region=None)
    visual = dataclasses.replace(answer.visual, scores=scores)
    out = saliency_image(sample_image, visual, answer.selection)
    assert out.shape == sample_image.shape
