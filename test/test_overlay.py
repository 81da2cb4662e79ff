"""The saliency image: same size as the frame, pruned areas dimmed, one box per tile."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ptp_ros.overlay import saliency_image
from ptp_ros.pipeline import Pipeline, PipelineConfig
from ptp_ros.pruning import NO_REGION


@pytest.fixture(scope="module")
def answer(tiny_adapter, sample_image):
    return Pipeline(tiny_adapter, PipelineConfig(max_new_tokens=1)).answer(
        sample_image, "where is it?", keep_ratio=0.25
    )


def _mean_brightness(image, boxes):
    values = [image[int(y0) : int(y1), int(x0) : int(x1)].mean() for x0, y0, x1, y1 in boxes]
    return float(np.mean(values))


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


def test_models_without_a_global_view_are_drawn_too(answer, sample_image):
    scores = dataclasses.replace(answer.visual.scores, global_region=None)
    visual = dataclasses.replace(answer.visual, scores=scores)
    out = saliency_image(sample_image, visual, answer.selection)
    assert out.shape == sample_image.shape
