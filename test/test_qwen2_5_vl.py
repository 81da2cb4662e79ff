"""Qwen2.5-VL adapter on the tiny model: received attention = eager, raster mapping = the model's, M-RoPE
positions survive pruning, and the max_pixels baseline hits the same token budget."""

from __future__ import annotations

import dataclasses

import cv2
import pytest
import torch
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
from transformers.vision_utils import get_vision_window_index

from ptp_ros.pipeline import Pipeline, PipelineConfig
from ptp_ros.pruning import ConfiguredSelector
from ptp_ros.vlm.attention import ReceivedAttentionProbe
from ptp_ros.vlm.qwen2_5_vl import Qwen2_5_VLAdapter, max_pixels_for_tokens

FAMILY = "qwen2_5_vl"  # conftest's model_dir / adapter / prepared / visual / eager_model: the tiny Qwen2.5-VL
INSTRUCTION = "what colour is the circle?"
TOTAL = 1222  # 1920×1080 at max_pixels 1280·28² → 52×94 patches → 26×47 tokens


def test_loader_dispatches_and_reads_a_full_attention_block(adapter):
    assert isinstance(adapter, Qwen2_5_VLAdapter) and adapter.name == "qwen2_5_vl"
    assert adapter.vision_layer in adapter.model.model.visual.fullatt_block_indexes
    assert adapter.model.config.vision_config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="full-attention"):
        Qwen2_5_VLAdapter(adapter.model, adapter.processor, dataclasses.replace(adapter.options, vision_layer=0))


def test_received_attention_matches_eager(adapter, sample_image, eager_model, monkeypatch):
    prepared = adapter.prepare(cv2.resize(sample_image, (640, 360)), INSTRUCTION)  # eager maps stay small
    patches = int(prepared.inputs["image_grid_thw"].prod())
    layer = adapter.vision_layer
    target = eager_model.model.visual.blocks[layer].attn
    recorded = []
    stock = modeling_qwen2_5_vl.eager_attention_forward

    def recording(module, *args, **kwargs):
        out, weights = stock(module, *args, **kwargs)
        if module is target:
            recorded.append(weights[0].mean(0).mean(0))  # [keys]: mean over heads and queries
        return out, weights

    monkeypatch.setattr(modeling_qwen2_5_vl, "eager_attention_forward", recording)
    grid = prepared.inputs["image_grid_thw"]
    with torch.no_grad():
        eager_model.model.get_image_features(prepared.inputs["pixel_values"], grid)
        with ReceivedAttentionProbe(adapter.model.model.visual.blocks[layer].attn, chunk=300) as probe:
            adapter.model.model.get_image_features(prepared.inputs["pixel_values"], grid)
    reference = torch.cat(recorded)
    received = probe.received()
    assert received.shape == reference.shape == (patches,)
    assert torch.allclose(received, reference, atol=1e-6, rtol=1e-4)
    assert float(received.sum()) == pytest.approx(1.0, abs=1e-4)


def test_tokens_are_the_models_raster_order(adapter, prepared, visual):
    """Token t = merger(4 window-ordered patches of group argsort(window_index)[t]), at M-RoPE (row, col)."""
    visual_tower = adapter.model.model.visual
    grid = prepared.inputs["image_grid_thw"]
    captured = {}
    handle = visual_tower.merger.register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    try:
        with torch.no_grad():
            adapter.model.model.get_image_features(prepared.inputs["pixel_values"], grid)
    finally:
        handle.remove()
    window_index, _ = get_vision_window_index(grid, 2, visual_tower.window_size, visual_tower.patch_size)
    group = torch.argsort(window_index)
    rows, cols = adapter.token_grid(grid)
    assert (rows, cols) == (26, 47)
    positions = adapter.rope_positions(prepared)[:, 0]  # [3, L]
    image_pos = torch.nonzero(prepared.inputs["input_ids"][0] == adapter.image_token_id).squeeze(1)
    start = positions[1, image_pos[0]]
    for t in [0, 1, 46, 47, 500, TOTAL - 1]:
        g = int(group[t])
        with torch.no_grad():
            merged = visual_tower.merger(captured["x"][4 * g : 4 * g + 4])
        assert torch.allclose(merged[0], visual.features[t], atol=1e-5)
        one_hot = torch.zeros(4 * TOTAL)
        one_hot[4 * g + 1] = 1.0
        saliency = adapter.token_saliency(one_hot, grid)
        assert int(saliency.argmax()) == t and float(saliency.sum()) == 1.0
        r, c = divmod(t, cols)
        assert (int(positions[1, image_pos[t]] - start), int(positions[2, image_pos[t]] - start)) == (r, c)
        box = visual.token_boxes[t]
        assert float(box[0]) == pytest.approx(c * 1920 / cols) and float(box[1]) == pytest.approx(r * 1080 / rows)


def test_fixed_region_grid(visual):
    s = visual.scores
    assert visual.num_tokens == TOTAL and s.global_region is None
    assert visual.region_names == ["cell r0 c0", "cell r0 c1", "cell r1 c0", "cell r1 c1"]
    assert s.region_sizes().tolist() == [13 * 24, 13 * 23, 13 * 24, 13 * 23]
    assert float(s.saliency.sum()) == pytest.approx(1.0, abs=1e-4)  # attention received, summed over the image
    mass = torch.stack([s.saliency[s.region == r].sum() for r in range(4)])
    assert torch.allclose(s.region_saliency.exp(), mass, rtol=1e-4)
    assert torch.allclose(visual.region_boxes[0], torch.tensor([0.0, 0.0, 24 * 1920 / 47, 540.0]))


def test_instruction_attention_matches_eager_llm_with_mrope(adapter, prepared, visual, eager_model):
    rows = adapter.instruction_attention(prepared, visual)
    ids = prepared.inputs["input_ids"][0]
    image_pos = torch.nonzero(ids == adapter.image_token_id).squeeze(1)
    query_pos = torch.arange(int(image_pos.max()) + 1, ids.shape[0])
    embeds = eager_model.get_input_embeddings()(ids)[None].clone()
    embeds[0, image_pos] = visual.features
    with torch.no_grad():
        attn = eager_model.model.language_model(
            inputs_embeds=embeds, position_ids=adapter.rope_positions(prepared), output_attentions=True
        ).attentions
    ref = attn[adapter.options.llm_layer][0].mean(0)[query_pos][:, image_pos]
    assert rows.shape == (len(query_pos), TOTAL)
    assert torch.allclose(rows, ref, atol=1e-5)


def test_pruned_run_keeps_original_mrope_positions(adapter, prepared, visual, monkeypatch):
    seen = {}
    original = adapter.model.generate
    monkeypatch.setattr(adapter.model, "generate", lambda **kw: seen.update(kw) or original(**kw))
    kept = torch.tensor([0, 48, 700, TOTAL - 1])
    adapter.generate(prepared, visual, kept, max_new_tokens=1)
    full = adapter.rope_positions(prepared)[:, 0]
    ids = prepared.inputs["input_ids"][0]
    image_pos = torch.nonzero(ids == adapter.image_token_id).squeeze(1)
    keep = torch.ones(ids.shape[0], dtype=torch.bool)
    keep[image_pos] = False
    keep[image_pos[kept]] = True
    pos = seen["position_ids"][:, 0]
    assert torch.equal(pos[1:], full[:, keep])
    assert torch.equal(pos[0], torch.arange(int(keep.sum())))
    assert torch.equal(seen["mm_encoder_outputs"]["image"].pooler_output[0], visual.features[kept])


def test_pruned_answers_shrink_the_prompt(adapter, prepared, sample_image):
    pipeline = Pipeline(adapter, PipelineConfig(selector=ConfiguredSelector(prune_in_llm=False), max_new_tokens=2))
    full_prompt = prepared.inputs["input_ids"].shape[1]
    for ratio, kept in [(0.25, 306), (0.111, 136)]:
        answer = pipeline.answer(sample_image, INSTRUCTION, keep_ratio=ratio)
        data = answer.result().to_json()
        assert answer.selection.num_kept == kept and answer.prompt_tokens == full_prompt - (TOTAL - kept)
        assert data["visual_tokens_total"] == TOTAL and sum(q["kept"] for q in data["quotas"]) == kept


@pytest.mark.parametrize("kept", [306, 136])
def test_max_pixels_baseline_reaches_the_same_budget(adapter, sample_image, kept):
    options = dataclasses.replace(adapter.options, max_pixels=max_pixels_for_tokens(kept))
    baseline = Qwen2_5_VLAdapter(adapter.model, adapter.processor, options)
    tokens = int((baseline.prepare(sample_image, INSTRUCTION).inputs["input_ids"] == adapter.image_token_id).sum())
    assert 0.8 * kept <= tokens <= kept


@pytest.mark.parametrize("size", [(1080, 1920), (1344, 1008), (672, 2016), (2016, 1008)])
@pytest.mark.parametrize("kept", [306, 136, 70])
def test_fitted_baseline_reads_as_many_tokens_as_the_budget_allows(adapter, sample_image, size, kept):
    """Fitted to the image, the baseline gets the most tokens any resolution cap gives up to the budget
    (never more), at least as many as the image-independent K·28²."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    image = cv2.resize(sample_image, size[::-1])

    def tokens(baseline) -> int:
        return int((baseline.prepare(image, INSTRUCTION).inputs["input_ids"] == adapter.image_token_id).sum())

    def count(max_pixels: int) -> int:
        h, w = smart_resize(*size, factor=28, min_pixels=min(3136, max_pixels), max_pixels=max_pixels)
        return h * w // 28**2

    best = max(c for c in map(count, range(kept * 28**2, 4 * kept * 28**2, 49)) if c <= kept)
    fitted, plain = tokens(adapter.downscaled(kept, size)), tokens(adapter.downscaled(kept))
    assert plain <= fitted == best <= kept
