"""LLaVA-NeXT adapter end to end on the tiny model: probes match eager attention, pruning is exact."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from ptp_ros.pipeline import InvalidRequest, Pipeline, PipelineConfig
from ptp_ros.pruning import NO_REGION, ConfiguredSelector
from ptp_ros.vlm.attention import ClsAttentionProbe, text_to_token_attention
from ptp_ros.vlm.llava_next import LlavaNextAdapter, paper_vision_layer
from ptp_ros.vlm.loading import LoadOptions, ModelLoadError, load_adapter

FAMILY = "llava_next"  # conftest's prepared / visual / eager_model: the tiny LLaVA-NeXT (tiny_adapter)
INSTRUCTION = "what colour is the circle?"


def test_cls_probe_matches_eager_attention(tiny_adapter, prepared, eager_model):
    layer = tiny_adapter.vision_layer
    assert layer == paper_vision_layer(len(eager_model.model.vision_tower.encoder.layers))
    pv = prepared.inputs["pixel_values"][0]
    with torch.no_grad():
        ref = eager_model.model.vision_tower(pv, output_attentions=True).attentions[layer]  # [tiles, H, T, T]
        with ClsAttentionProbe(eager_model.model.vision_tower.encoder.layers[layer].self_attn) as probe:
            eager_model.model.vision_tower(pv)
    assert torch.allclose(probe.cls_attention(), ref[:, :, 0, 1:].mean(1), atol=1e-6)


def test_encode_leaves_sdpa_on_and_hooks_off(tiny_adapter, visual):
    model = tiny_adapter.model
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert model.config.text_config._attn_implementation == "sdpa"
    attn = model.model.vision_tower.encoder.layers[tiny_adapter.vision_layer].self_attn
    assert not attn.q_proj._forward_hooks and not attn.k_proj._forward_hooks


def test_token_layout_follows_the_models_packing(tiny_adapter, visual, sample_image):
    s = visual.scores
    # 1920×1080 on default pinpoints: 2×2 grid of 336-px tiles + global view, unpadded to 28 rows × 48
    assert visual.num_tokens == 1948
    assert s.region_sizes().tolist() == [576, 336, 336, 336, 336]
    assert int((s.region == NO_REGION).sum()) == 28  # one newline per unpadded row
    assert visual.extras["grid"] == (2, 2)
    height, width = sample_image.shape[:2]
    boxes = visual.token_boxes[s.region != NO_REGION]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    assert torch.isnan(visual.token_boxes[s.region == NO_REGION]).all()
    # the global view's 576 tokens tile the whole image
    glob = visual.token_boxes[s.region == 0]
    assert float(((glob[:, 2] - glob[:, 0]) * (glob[:, 3] - glob[:, 1])).sum()) == pytest.approx(width * height)
    # each tile token lies inside its region's box
    for r in range(1, 5):
        rb = visual.region_boxes[r]
        tb = visual.token_boxes[s.region == r]
        assert (tb[:, 0] >= rb[0] - 1e-3).all() and (tb[:, 2] <= rb[2] + 1e-3).all()
    # saliency is the [CLS] attention: a probability mass of < 1 per tile
    assert 0.0 < float(s.saliency[s.region == 0].sum()) <= 1.0


def test_instruction_attention_matches_eager_llm(tiny_adapter, prepared, visual, eager_model):
    rows = tiny_adapter.instruction_attention(prepared, visual)
    ids = prepared.inputs["input_ids"][0]
    image_pos = torch.nonzero(ids == tiny_adapter.image_token_id).squeeze(1)
    query_pos = torch.arange(int(image_pos.max()) + 1, ids.shape[0])
    assert rows.shape == (len(query_pos), visual.num_tokens)
    embeds = eager_model.get_input_embeddings()(ids)[None].clone()
    embeds[0, image_pos] = visual.features
    with torch.no_grad():
        attn = eager_model.model.language_model(inputs_embeds=embeds, output_attentions=True).attentions
    layer = tiny_adapter.options.llm_layer
    ref = attn[layer][0].mean(0)[query_pos][:, image_pos]
    assert torch.allclose(rows, ref, atol=1e-5)
    # the probe itself never changes the model's outputs
    again = text_to_token_attention(tiny_adapter.model.model.language_model, embeds, layer, query_pos, image_pos)
    assert torch.equal(again, rows)
    # every layer from one forward (ptp-eval --retrieval-probe): each is the eager model's
    stacked = tiny_adapter.instruction_attention(prepared, visual, layers=range(len(attn)))
    assert stacked.shape == (len(attn), *rows.shape)
    for i, layer_attn in enumerate(attn):
        assert torch.allclose(stacked[i], layer_attn[0].mean(0)[query_pos][:, image_pos], atol=1e-5)


@pytest.mark.parametrize("ratio", [0.25, 0.111])
def test_pruned_answers_shrink_the_prompt(tiny_adapter, sample_image, ratio):
    pipeline = Pipeline(tiny_adapter, PipelineConfig(selector=ConfiguredSelector(prune_in_llm=False), max_new_tokens=4))
    full = pipeline.answer(sample_image, INSTRUCTION, keep_ratio=1.0)
    answer = pipeline.answer(sample_image, INSTRUCTION, keep_ratio=ratio)
    kept = round(ratio * 1948)
    assert answer.selection.num_kept == kept
    assert answer.prompt_tokens == full.prompt_tokens - (1948 - kept)
    assert answer.result().to_json()["prune_layer"] is None
    # the default prunes inside the LLM: the whole prompt goes in, layers from 2 on read the kept tokens
    inside = Pipeline(tiny_adapter, PipelineConfig(max_new_tokens=4)).answer(
        sample_image, INSTRUCTION, keep_ratio=ratio
    )
    assert inside.selection.num_kept == kept and inside.prompt_tokens == full.prompt_tokens
    assert inside.result().to_json()["prune_layer"] == tiny_adapter.options.llm_layer
    data = answer.result().to_json()
    assert {"answer", "visual_tokens_total", "visual_tokens_kept", "keep_ratio", "quotas", "latency_ms"} <= set(data)
    assert data["visual_tokens_total"] == 1948 and data["visual_tokens_kept"] == kept
    assert data["keep_ratio"] == pytest.approx(kept / 1948, abs=1e-6)
    assert sum(q["kept"] for q in data["quotas"]) == kept
    assert all(0 <= q["kept"] <= q["size"] for q in data["quotas"])
    assert {"encode", "score", "select", "prefill", "decode", "total"} <= set(data["latency_ms"])
    assert all(v >= 0 for v in data["latency_ms"].values())
    assert data["new_tokens"] == len(answer.text.split()) or answer.text == ""


def test_newline_policy_keep_counts_newlines_in_the_budget(tiny_adapter, sample_image):
    pipeline = Pipeline(tiny_adapter, PipelineConfig(newline_policy="keep", max_new_tokens=1))
    answer = pipeline.answer(sample_image, INSTRUCTION, tokens=300)
    region = answer.visual.scores.region
    assert answer.selection.num_kept == 300
    assert int((region[answer.selection.kept] == NO_REGION).sum()) == 28


def test_ablations_run_through_the_pipeline(tiny_adapter, sample_image):
    for config in (
        PipelineConfig(selector=ConfiguredSelector("ptp", {"alpha": 0.0})),
        PipelineConfig(selector=ConfiguredSelector("ptp", {"alpha": 1.0})),
        PipelineConfig(selector=ConfiguredSelector(reduce="mean")),
        PipelineConfig(selector=ConfiguredSelector("uniform_cls")),
    ):
        answer = Pipeline(tiny_adapter, dataclasses.replace(config, max_new_tokens=1)).answer(
            sample_image, INSTRUCTION, keep_ratio=0.1
        )
        assert answer.selection.num_kept == round(0.1 * 1948)
    # α = 0 skips the LLM-side scoring entirely
    assert ConfiguredSelector("ptp", {"alpha": 0.0}).bound.needs_relevance is False


def test_global_similarity_region_score(tiny_model_dir, sample_image):
    adapter = load_adapter(
        tiny_model_dir, LoadOptions(device="cpu"), region_score="global_similarity", vision_layer="feature"
    )
    visual = adapter.encode(adapter.prepare(sample_image, INSTRUCTION))
    assert adapter.vision_layer == len(adapter.model.model.vision_tower.encoder.layers) - 2
    logits = visual.scores.region_saliency
    assert logits.shape == (5,) and (logits.abs() <= 1.0 + 1e-6).all()  # cosines


def test_bad_requests_are_refused_clearly(tiny_adapter, sample_image):
    pipeline = Pipeline(tiny_adapter)
    with pytest.raises(InvalidRequest, match="empty"):
        pipeline.answer(sample_image, "   ")
    with pytest.raises(InvalidRequest, match="limit"):
        pipeline.answer(sample_image, "why " * 1000)
    with pytest.raises(InvalidRequest, match="RGB"):
        pipeline.answer(sample_image[:, :, 0], INSTRUCTION)
    with pytest.raises(InvalidRequest, match="uint8"):
        pipeline.answer(sample_image.astype(np.float32), INSTRUCTION)
    with pytest.raises(InvalidRequest, match="too small"):
        pipeline.answer(sample_image[:5, :5], INSTRUCTION)
    with pytest.raises(InvalidRequest, match="keep_ratio"):
        pipeline.answer(sample_image, INSTRUCTION, keep_ratio=0.0)


def test_loading_errors_name_the_path(tmp_path, tiny_model_dir):
    with pytest.raises(ModelLoadError, match="not found"):
        load_adapter(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_adapter(tmp_path / "empty")
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ModelLoadError, match="'bert' model"):
        load_adapter(other)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in ("config.json", "processor_config.json", "preprocessor_config.json"):  # all but the weights
        if (tiny_model_dir / name).is_file():
            (pickled / name).write_text((tiny_model_dir / name).read_text())
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_adapter(pickled)
    with pytest.raises(ModelLoadError, match="dtype"):
        load_adapter(tiny_model_dir, LoadOptions(dtype="int8"))


def test_adapter_rejects_layers_the_model_lacks(tiny_adapter):
    with pytest.raises(ValueError, match="llm_layer"):
        LlavaNextAdapter(
            copy.copy(tiny_adapter.model), tiny_adapter.processor, type(tiny_adapter.options)(llm_layer=99)
        )
    with pytest.raises(ValueError, match="vision_layer"):
        type(tiny_adapter.options)(vision_layer="middle")
