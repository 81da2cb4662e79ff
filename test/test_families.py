"""What every registered model family must do, on its tiny checkpoint: a new family (docs/models.md, "Adding a
model family") runs these by being registered."""

from __future__ import annotations

import dataclasses

import cv2
import pytest
import torch

from ptp_ros.testing.common import FIXTURES
from ptp_ros.vlm.families import ADAPTERS, FAMILIES
from ptp_ros.vlm.loading import SUPPORTED_FAMILIES, checkpoint_family

pytestmark = pytest.mark.parametrize("family", FAMILIES, indirect=True, scope="module")


def test_the_registries_agree_and_the_loader_dispatches_on_model_type(family, model_dir, adapter):
    assert family in SUPPORTED_FAMILIES and FIXTURES[family].model_type == family
    assert checkpoint_family(model_dir) == family
    assert type(adapter) is ADAPTERS[family] and adapter.name == family
    assert isinstance(adapter.model, ADAPTERS[family].model_class)
    assert adapter.model.config.text_config._attn_implementation == "sdpa"


def test_capabilities_are_declared_and_hold(adapter, prepared, visual, sample_image):
    fields = {f.name for f in dataclasses.fields(adapter.options)}
    assert ("region_score" in fields) == bool(adapter.region_scores)
    for score in adapter.region_scores:
        assert dataclasses.replace(adapter.options, region_score=score).region_score == score
    budget = visual.num_tokens // 4
    if adapter.supports_downscaling:
        smaller = adapter.downscaled(budget)
        assert type(smaller) is type(adapter) and smaller.model is adapter.model
        ids = smaller.prepare(sample_image, prepared.instruction).inputs["input_ids"]
        assert 0 < int((ids == adapter.image_token_id).sum()) <= budget
    else:
        with pytest.raises(NotImplementedError, match=adapter.name):
            adapter.downscaled(budget)


def test_keep_all_is_token_for_token_stock_generate_even_after_a_pruned_run(adapter, prepared, visual):
    reference = adapter.generate_reference(prepared, max_new_tokens=8)
    assert reference.new_tokens == 8
    for kept in (None, torch.arange(visual.num_tokens)):
        ours = adapter.generate(prepared, visual, kept, max_new_tokens=8)
        assert ours.token_ids == reference.token_ids and ours.prompt_tokens == reference.prompt_tokens
    adapter.generate(prepared, visual, torch.arange(0, visual.num_tokens, 7), max_new_tokens=2)  # may leave state
    assert adapter.generate(prepared, visual, None, max_new_tokens=8).token_ids == reference.token_ids
    assert adapter.generate_reference(prepared, max_new_tokens=8).token_ids == reference.token_ids


def test_pruned_features_reach_the_llm_in_order_without_the_pruned_placeholders(adapter, prepared, visual, monkeypatch):
    seen = {}
    original = adapter.model.generate
    monkeypatch.setattr(adapter.model, "generate", lambda **kw: seen.update(kw) or original(**kw))
    n = visual.num_tokens
    kept = torch.tensor([3, 10, n // 3, 2 * n // 3, n - 1])
    adapter.generate(prepared, visual, kept, max_new_tokens=1)
    assert torch.equal(seen["mm_encoder_outputs"]["image"].pooler_output[0], visual.features[kept])
    assert int((seen["input_ids"] == adapter.image_token_id).sum()) == 5
    assert seen["input_ids"].shape[1] == prepared.inputs["input_ids"].shape[1] - (n - 5)


def test_encode_lays_out_every_placeholder_with_its_region_and_box(adapter, prepared, visual):
    placeholders = int((prepared.inputs["input_ids"] == adapter.image_token_id).sum())
    s = visual.scores
    assert visual.num_tokens == placeholders == s.region.shape[0] == s.saliency.shape[0]
    assert visual.token_boxes.shape == (placeholders, 4)
    assert len(visual.region_names) == visual.region_boxes.shape[0] == s.region_saliency.shape[0]
    assert int(s.region.max()) == len(visual.region_names) - 1
    assert s.global_region is None or 0 <= s.global_region < len(visual.region_names)
    assert visual.extras["vision_layer"] == adapter.vision_layer


def test_several_views_go_into_one_prompt_and_keep_all_is_stock_generate(adapter, sample_image):
    """Two camera views in one prompt: one batched encode lays out each view apart (its regions, boxes in its own
    pixels), and with every token kept the answer is token-for-token stock ``generate`` over the same prompt."""
    assert adapter.supports_views
    views = [cv2.resize(sample_image, (224, 168)), cv2.resize(sample_image[:540, :720], (160, 120))]
    prepared = adapter.prepare(views, "what colour is the circle?")
    visual = adapter.encode(prepared)
    assert prepared.image_sizes == ((168, 224), (120, 160)) and len(visual.views) == 2
    assert visual.scores.view_tokens == tuple(v.num_tokens for v in visual.views)
    assert visual.num_tokens == int((prepared.inputs["input_ids"] == adapter.image_token_id).sum())
    for view, (height, width) in zip(visual.views, prepared.image_sizes):
        assert view.image_size == (height, width) and float(view.region_boxes[:, 2].max()) <= width + 1e-3
    reference = adapter.generate_reference(prepared, max_new_tokens=2)
    assert adapter.generate(prepared, visual, None, max_new_tokens=2).token_ids == reference.token_ids
