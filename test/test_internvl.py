"""InternVL adapter on the tiny model: probe = eager attention, pooling = pixel_shuffle, pruning is exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import InternVLVisionConfig, InternVLVisionModel

from ptp_ros.pipeline import Pipeline, PipelineConfig
from ptp_ros.pruning import ConfiguredSelector
from ptp_ros.vlm.attention import ClsAttentionProbe, text_to_token_attention
from ptp_ros.vlm.internvl import InternVLAdapter
from ptp_ros.vlm.stock_adapter import paper_vision_layer

FAMILY = "internvl"  # conftest's model_dir / adapter / prepared / visual / eager_model: the tiny InternVL
INSTRUCTION = "what colour is the circle?"
TOTAL = 2304  # 1920×1080 → 2×4 tiles of 448 px + thumbnail, 256 tokens each


def test_loader_dispatches_on_model_type(adapter):
    assert isinstance(adapter, InternVLAdapter) and adapter.name == "internvl"
    assert adapter.vision_layer == paper_vision_layer(len(adapter.model.model.vision_tower.encoder.layer))
    assert adapter.model.config.vision_config._attn_implementation == "sdpa"


def test_cls_probe_matches_eager_attention(adapter, prepared, eager_model):
    layer = adapter.vision_layer
    pv = prepared.inputs["pixel_values"][[0, -1]]  # a tile and the thumbnail
    tower = eager_model.model.vision_tower
    with torch.no_grad():
        ref = tower(pv, output_attentions=True).attentions[layer]  # [tiles, H, T, T]
        with ClsAttentionProbe(tower.encoder.layer[layer].attention, query="q_norm", key="k_norm") as probe:
            tower(pv)
    assert torch.allclose(probe.cls_attention(), ref[:, :, 0, 1:].mean(1), atol=1e-6)


def test_probe_reads_queries_after_qk_norm():
    """InternViT-6B normalises q and k after the projections: only the q_norm/k_norm outputs are exact."""
    config = InternVLVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=56,
        patch_size=14,
        use_qk_norm=True,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    tower = InternVLVisionModel(config).eval()
    attention = tower.encoder.layer[1].attention
    torch.nn.init.normal_(attention.q_norm.weight, 1.0, 0.5)
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref = tower(pixels, output_attentions=True).attentions[1][:, :, 0, 1:].mean(1)
        with ClsAttentionProbe(attention, query="q_norm", key="k_norm") as normed, ClsAttentionProbe(attention) as raw:
            tower(pixels)
    assert torch.allclose(normed.cls_attention(), ref, atol=1e-6)
    assert not torch.allclose(raw.cls_attention(), ref, atol=1e-4)


def test_token_groups_are_the_models_pixel_shuffle(adapter, prepared):
    """Token t of a tile is the 2×2 patch group the model itself concatenates before the projector."""
    model = adapter.model.model
    captured = {}
    handle = model.multi_modal_projector.register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    try:
        with torch.no_grad():
            patches = model.vision_tower(prepared.inputs["pixel_values"]).last_hidden_state[:, 1:]  # [tiles, 1024, D]
            model.get_image_features(pixel_values=prepared.inputs["pixel_values"])
    finally:
        handle.remove()
    tiles, _, width = patches.shape
    merged = captured["x"].view(tiles, 256, 4, width)  # the projector's input: 4 patch vectors per token
    scores = torch.rand(tiles, 1024)
    pooled, token_rc = adapter.pooled_patch_scores(scores)
    assert pooled.shape == (tiles, 256)
    for t in [0, 1, 17, 100, 255]:
        r, c = (int(v) for v in token_rc[0, t])
        assert (r, c) == divmod(t, 16)
        group = [(2 * r + dr) * 32 + 2 * c + dc for dr in (0, 1) for dc in (0, 1)]
        for tile in (0, tiles - 1):
            found = {p for p in group for k in range(4) if torch.equal(merged[tile, t, k], patches[tile, p])}
            assert found == set(group)
            assert float(pooled[tile, t]) == pytest.approx(float(scores[tile, group].sum()), rel=1e-5)


def test_token_layout_regions_and_boxes(adapter, visual, sample_image):
    s = visual.scores
    assert visual.num_tokens == TOTAL
    assert visual.extras["grid"] == (2, 4)
    assert s.region_sizes().tolist() == [256] * 9
    assert s.global_region == 8 and visual.region_names[-1] == "thumbnail"
    height, width = sample_image.shape[:2]
    boxes = visual.token_boxes
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width + 1e-3).all() and (boxes[:, 3] <= height + 1e-3).all()
    for r in range(9):  # each region's tokens tile its box exactly
        rb, tb = visual.region_boxes[r], boxes[s.region == r]
        assert (tb[:, 0] >= rb[0] - 1e-3).all() and (tb[:, 2] <= rb[2] + 1e-3).all()
        area = float(((tb[:, 2] - tb[:, 0]) * (tb[:, 3] - tb[:, 1])).sum())
        assert area == pytest.approx(float((rb[2] - rb[0]) * (rb[3] - rb[1])), rel=1e-4)
    for r in range(9):  # [CLS] attention mass over a tile's patches: in (0, 1]
        assert 0.0 < float(s.saliency[s.region == r].sum()) <= 1.0 + 1e-6
    assert s.region_saliency.shape == (9,) and torch.isfinite(s.region_saliency).all()


def test_instruction_attention_matches_eager_llm(adapter, prepared, visual, eager_model):
    rows = adapter.instruction_attention(prepared, visual)
    ids = prepared.inputs["input_ids"][0]
    image_pos = torch.nonzero(ids == adapter.image_token_id).squeeze(1)
    query_pos = torch.arange(int(image_pos.max()) + 1, ids.shape[0])
    assert rows.shape == (len(query_pos), TOTAL)
    embeds = eager_model.get_input_embeddings()(ids)[None].clone()
    embeds[0, image_pos] = visual.features
    with torch.no_grad():
        attn = eager_model.model.language_model(inputs_embeds=embeds, output_attentions=True).attentions
    ref = attn[adapter.options.llm_layer][0].mean(0)[query_pos][:, image_pos]
    assert torch.allclose(rows, ref, atol=1e-5)
    again = text_to_token_attention(
        adapter.model.model.language_model, embeds, adapter.options.llm_layer, query_pos, image_pos
    )
    assert torch.equal(again, rows)


def test_features_fed_back_give_the_models_own_prefill(adapter, prepared, visual):
    """(Keep-all = stock ``generate`` token for token: test_families.py.)"""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    inputs = prepared.inputs
    with torch.no_grad():
        stock = adapter.model(**inputs).logits[:, -1]
        ours = adapter.model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=visual.features[None])},
        ).logits[:, -1]
    assert torch.allclose(stock, ours, atol=1e-5)


def test_pruned_answers_shrink_the_prompt(adapter, prepared, sample_image):
    pipeline = Pipeline(adapter, PipelineConfig(selector=ConfiguredSelector(prune_in_llm=False), max_new_tokens=2))
    full_prompt = prepared.inputs["input_ids"].shape[1]
    for ratio, kept in [(0.25, 576), (0.111, 256)]:
        answer = pipeline.answer(sample_image, INSTRUCTION, keep_ratio=ratio)
        assert answer.selection.num_kept == kept
        assert answer.prompt_tokens == full_prompt - (TOTAL - kept)
        data = answer.result().to_json()
        assert data["visual_tokens_total"] == TOTAL and data["visual_tokens_kept"] == kept
        assert sum(q["kept"] for q in data["quotas"]) == kept and len(data["quotas"]) == 9


def test_single_tile_image_has_no_thumbnail(adapter):
    image = np.random.default_rng(0).integers(0, 255, (448, 448, 3), dtype=np.uint8)
    answer = Pipeline(adapter, PipelineConfig(max_new_tokens=2)).answer(image, INSTRUCTION, keep_ratio=0.25)
    assert answer.selection.total == 256 and answer.selection.num_kept == 64
    assert answer.visual.scores.global_region is None and answer.visual.region_names == ["tile r0 c0"]
