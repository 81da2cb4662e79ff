"""Pruning inside the LLM (FastV as its code runs it, PTP's in-LLM variant) on the stock tiny models."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaNextForConditionalGeneration

from ptp_ros.pipeline import Pipeline, PipelineConfig
from ptp_ros.pruning import NO_REGION, InLLMPruning, make_selector
from ptp_ros.vlm.common import placeholder_positions
from ptp_ros.vlm.families import FAMILIES
from ptp_ros.vlm.loading import LoadOptions, load_adapter

INSTRUCTION = "what colour is the circle?"


def keep_everything(rows: torch.Tensor) -> torch.Tensor:
    return torch.arange(rows.shape[1])


def top(count: int):
    return lambda rows: torch.sort(torch.topk(rows[-1], count).indices).values


@pytest.fixture(scope="module")
def eager_adapter(tiny_adapter, tiny_model_dir):
    """The tiny LLaVA-NeXT with eager attention: materialised masks, and the attention maps to compare with."""
    model = LlavaNextForConditionalGeneration.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
    return type(tiny_adapter)(model, tiny_adapter.processor, tiny_adapter.options)


@pytest.mark.parametrize("family", [*FAMILIES, "llava_next_eager"])
def test_in_llm_path_is_stock_generate_when_nothing_is_dropped(family, request, tiny_checkpoint, sample_image):
    if family in ("llava_next", "llava_next_eager"):
        adapter = request.getfixturevalue("tiny_adapter" if family == "llava_next" else "eager_adapter")
    else:
        adapter = load_adapter(tiny_checkpoint(family), LoadOptions(device="cpu"))
    prepared = adapter.prepare(sample_image, INSTRUCTION)
    visual = adapter.encode(prepared)
    reference = adapter.generate_reference(prepared, max_new_tokens=10)
    layers = len(adapter.model.model.language_model.layers)
    for k in (layers, layers + 3):  # K past the last layer: no hook at all
        past = adapter.generate(prepared, visual, None, 10, in_llm=(InLLMPruning.fastv(k), top(5)))
        assert past.token_ids == reference.token_ids and past.in_llm_kept is None
    # the hooks run and cut every per-position argument, but keep every token: still token for token
    everything = adapter.generate(prepared, visual, None, 10, in_llm=(InLLMPruning.fastv(1), keep_everything))
    assert everything.token_ids == reference.token_ids
    assert everything.in_llm_kept.numel() == visual.num_tokens
    assert not any(layer._forward_pre_hooks for layer in adapter.model.model.language_model.layers)


def test_fastv_ranks_by_the_last_tokens_attention_at_layer_k_minus_1(tiny_adapter, eager_adapter, sample_image):
    k, budget = 2, 100
    pipeline = Pipeline(tiny_adapter, PipelineConfig(selector="fastv", selector_options={"k": k}, max_new_tokens=3))
    answer = pipeline.answer(sample_image, INSTRUCTION, tokens=budget)
    prepared = eager_adapter.prepare(sample_image, INSTRUCTION)
    visual = eager_adapter.encode(prepared)
    ids = prepared.inputs["input_ids"]
    image_pos = placeholder_positions(ids, eager_adapter.image_token_id)
    embeds = eager_adapter.model.get_input_embeddings()(ids).clone()
    embeds[0, image_pos] = visual.features
    with torch.no_grad():
        attentions = eager_adapter.model.model.language_model(inputs_embeds=embeds, output_attentions=True).attentions
    row = attentions[k - 1][0].mean(0)[-1, image_pos]  # FastV: the last token, heads averaged, layer K − 1
    row[visual.scores.region == NO_REGION] = float("-inf")  # newlines are structural (newline_policy "drop")
    expected = torch.sort(torch.topk(row, budget).indices).values
    assert torch.equal(answer.selection.kept, expected)
    assert answer.to_dict()["visual_tokens_kept"] == budget
    # a later layer's ranking is a different one: the layer is not off by one
    later = attentions[k][0].mean(0)[-1, image_pos]
    later[visual.scores.region == NO_REGION] = float("-inf")
    assert not torch.equal(torch.sort(torch.topk(later, budget).indices).values, expected)


def test_layers_from_k_on_read_only_the_kept_tokens_at_their_own_positions(tiny_adapter, sample_image):
    """The first answer token equals a hand-run decoder: layers < K on everything, then the kept rows only,
    with their original rotary positions."""
    k, budget = 2, 64
    prepared = tiny_adapter.prepare(sample_image, INSTRUCTION)
    visual = tiny_adapter.encode(prepared)
    lm = tiny_adapter.model.model.language_model
    seen = []
    handles = [
        layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
        for layer in lm.layers
    ]
    try:
        out = tiny_adapter.generate(prepared, visual, None, 1, in_llm=(InLLMPruning.fastv(k), top(budget)))
    finally:
        for h in handles:
            h.remove()
    ids = prepared.inputs["input_ids"]
    length, n = ids.shape[1], visual.num_tokens
    assert seen == [length] * k + [length - n + budget] * (len(lm.layers) - k)
    image_pos = placeholder_positions(ids, tiny_adapter.image_token_id)
    embeds = tiny_adapter.model.get_input_embeddings()(ids).clone()
    embeds[0, image_pos] = visual.features
    with torch.no_grad():
        hidden = lm(inputs_embeds=embeds, output_hidden_states=True).hidden_states[k]  # the input of layer K
        keep = torch.ones(length, dtype=torch.bool)
        keep[image_pos] = False
        keep[image_pos[out.in_llm_kept]] = True
        positions = torch.nonzero(keep).squeeze(1)[None]
        h = hidden[:, positions[0]]
        rotary = lm.rotary_emb(h, position_ids=positions)
        for layer in lm.layers[k:]:
            h = layer(h, attention_mask=None, position_embeddings=rotary, position_ids=positions)
        first = int(tiny_adapter.model.lm_head(lm.norm(h))[0, -1].argmax())
    assert out.token_ids == [first]


def test_ptp_in_llm_keeps_what_ptp_before_the_llm_keeps(tiny_adapter, sample_image):
    """Same layer, same rows, same input (layers below it over the whole prompt): the same choice; only where
    the dropping happens differs — and the in-LLM prefill skips the separate probe."""
    before = Pipeline(tiny_adapter, PipelineConfig(max_new_tokens=2, prune_in_llm=False)).answer(
        sample_image, INSTRUCTION, keep_ratio=0.111
    )
    inside = Pipeline(tiny_adapter, PipelineConfig(max_new_tokens=2, prune_in_llm=True)).answer(
        sample_image, INSTRUCTION, keep_ratio=0.111
    )
    assert torch.equal(before.selection.kept, inside.selection.kept)
    assert before.timings_ms["score"] > 0 and inside.prompt_tokens > before.prompt_tokens


def test_fastv_options_are_checked():
    assert make_selector("fastv", k=3).in_llm == InLLMPruning(score_layer=2, prune_layer=3, queries="last")
    with pytest.raises(ValueError, match="K must be >= 1"):
        make_selector("fastv", k=0)
    with pytest.raises(ValueError, match="no option"):
        make_selector("fastv", alpha=0.5)
    with pytest.raises(ValueError, match="score_layer <= prune_layer"):
        InLLMPruning(score_layer=3, prune_layer=2)
