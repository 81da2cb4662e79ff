"""Pruning inside the LLM (FastV as its code runs it, PTP's in-LLM variant) on the stock tiny models."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaNextForConditionalGeneration

from ptp_ros.pipeline import Pipeline, PipelineConfig
from ptp_ros.pruning import NO_REGION, InLLMPruning, make_selector
from ptp_ros.pruning import ConfiguredSelector as Configured
from ptp_ros.vlm.families import FAMILIES
from ptp_ros.vlm.in_llm import causal_mask
from ptp_ros.vlm.loading import LoadOptions, load_adapter
from ptp_ros.vlm.stock_adapter import placeholder_positions

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
    pipeline = Pipeline(tiny_adapter, PipelineConfig(selector=Configured("fastv", {"k": k}), max_new_tokens=3))
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
    assert answer.result().to_json()["visual_tokens_kept"] == budget
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
    before = Pipeline(tiny_adapter, PipelineConfig(selector=Configured(prune_in_llm=False), max_new_tokens=2)).answer(
        sample_image, INSTRUCTION, keep_ratio=0.111
    )
    inside = Pipeline(tiny_adapter, PipelineConfig(selector=Configured(prune_in_llm=True), max_new_tokens=2)).answer(
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


def recompute_greedy(
    adapter, prepared, visual, kept: torch.Tensor, prune_layer: int, steps: int
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding with no KV cache: for each new token a full forward over the pruned sequence — layers
    below ``prune_layer`` over the whole prompt and the tokens generated so far, the rest over the kept visual
    tokens, the text and the generated tokens — every token at its original position (new tokens continue
    after the full prompt's last position), causal in every layer.  Returns the tokens and each step's logits."""
    lm = adapter.model.model.language_model
    ids = prepared.inputs["input_ids"]
    length = ids.shape[1]
    image_pos = placeholder_positions(ids, adapter.image_token_id)
    prompt = adapter.model.get_input_embeddings()(ids).clone()
    prompt[0, image_pos] = visual.features.to(prompt.dtype)
    full_positions = adapter.rope_positions(prepared)  # [3, 1, L] M-RoPE, or None: 0..L-1
    dropped = torch.ones(image_pos.numel(), dtype=torch.bool)
    dropped[kept] = False
    survivors = [i for i in range(length) if i not in set(image_pos[dropped].tolist())]
    tokens: list[int] = []
    logits: list[torch.Tensor] = []
    with torch.no_grad():
        for _ in range(steps):
            new = adapter.model.get_input_embeddings()(torch.tensor([tokens], dtype=torch.long))
            hidden = torch.cat([prompt, new], dim=1)
            if full_positions is None:
                positions = torch.arange(length + len(tokens))[None]
            else:
                after = int(full_positions.max()) + 1 + torch.arange(len(tokens))
                positions = torch.cat([full_positions, after.view(1, 1, -1).expand(3, 1, -1)], dim=-1)
            rotary = lm.rotary_emb(hidden, positions)
            for layer in lm.layers[:prune_layer]:
                hidden = layer(
                    hidden, attention_mask=causal_mask(hidden.shape[1], hidden.dtype), position_embeddings=rotary
                )
            rows = torch.tensor(survivors + list(range(length, length + len(tokens))))
            hidden, positions = hidden[:, rows], positions[..., rows]
            rotary = lm.rotary_emb(hidden, positions)
            for layer in lm.layers[prune_layer:]:
                hidden = layer(
                    hidden, attention_mask=causal_mask(hidden.shape[1], hidden.dtype), position_embeddings=rotary
                )
            logits.append(adapter.model.lm_head(lm.norm(hidden))[0, -1])
            tokens.append(int(logits[-1].argmax()))
    return tokens, logits


@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl"])
@pytest.mark.parametrize("selector", ["ptp", "fastv"])
def test_several_tokens_decoded_after_an_in_llm_prune_equal_a_cache_free_recomputation(
    family, selector, tiny_checkpoint, sample_image
):
    """The KV cache after an in-LLM prune (full-length below the prune layer, kept positions above it) and the
    positions of new tokens give, step after step, the tokens a cache-free forward over the pruned sequence
    gives: five decoded tokens, token for token."""
    adapter = load_adapter(tiny_checkpoint(family), LoadOptions(device="cpu"))
    pipeline = Pipeline(adapter, PipelineConfig(selector=Configured(selector, prune_in_llm=True), max_new_tokens=5))
    prepared = adapter.prepare(sample_image, INSTRUCTION)
    visual = pipeline.encode(prepared)
    budget = pipeline.budget(visual, keep_ratio=0.111)
    cached_logits = []  # each step's next-token logits as the cached generate computes them
    hook = adapter.model.lm_head.register_forward_hook(lambda m, a, out: cached_logits.append(out[0, -1].clone()))
    try:
        with torch.no_grad():
            pruned = pipeline.generate(prepared, visual, pipeline.score(prepared, visual, budget), budget, 5)
    finally:
        hook.remove()
    plan = pipeline.in_llm_plan()
    assert pruned.prune_layer == plan.prune_layer < len(adapter.model.model.language_model.layers)
    kept = pruned.selection.kept
    assert 0 < kept.numel() < visual.num_tokens
    decoded = pruned.generation.token_ids
    assert len(decoded) == 5, decoded  # greedy decoding of the tiny model runs to max_new_tokens
    tokens, logits = recompute_greedy(adapter, prepared, visual, kept, plan.prune_layer, len(decoded))
    assert tokens == decoded
    assert len(cached_logits) == len(logits)
    for step, (cached, recomputed) in enumerate(zip(cached_logits, logits)):
        assert torch.allclose(cached, recomputed, atol=1e-4, rtol=1e-4), step


def test_ptp_eval_in_llm_rows_answer_alike_under_eager_and_sdpa_attention(tiny_adapter, eager_adapter):
    """ptp-eval runs the layers from the prune layer on by calling them directly: with an explicit causal mask
    its in-LLM rows' logits do not depend on the attention implementation (with none, eager attention attends
    both ways and they differ by ~2e-2 on the tiny model)."""
    from ptp_ros.proxy import make_questions, make_scene, split_seed
    from ptp_ros_bench.accuracy.runner import Evaluator, Results
    from ptp_ros_bench.rows import Row

    assert eager_adapter.model.config.text_config._attn_implementation == "eager"
    assert tiny_adapter.model.config.text_config._attn_implementation == "sdpa"
    methods = [Row("fastv", Configured("fastv")), Row("ptp in-LLM", Configured("ptp", prune_in_llm=True))]
    scene = make_scene(split_seed("test", 0))
    questions = make_questions(scene, per_type=1)
    runs = []
    for adapter in (tiny_adapter, eager_adapter):
        evaluator = Evaluator(adapter, methods, (1.0, 0.5, 0.111))
        answered = []  # per question: {(method key, ratio): (kept, answer logits)}
        in_llm = evaluator._in_llm_question
        evaluator._in_llm_question = lambda *args, run=in_llm, out=answered: out.append(run(*args)) or out[-1]
        results = Results()
        evaluator.scene(scene, questions, results)
        runs.append((answered, results.predicted))
    (sdpa, sdpa_answers), (eager, eager_answers) = runs
    assert len(sdpa) == len(questions) and sdpa_answers == eager_answers
    for per_sdpa, per_eager in zip(sdpa, eager):
        assert per_sdpa.keys() == per_eager.keys()
        for key, (kept, logits) in per_sdpa.items():
            assert torch.equal(kept, per_eager[key][0])
            assert torch.allclose(logits, per_eager[key][1], atol=1e-5), key
    # and the answers are the library's hooked generate's (whose mask the model's own forward builds)
    decode = eager_adapter.processor.tokenizer.decode
    expected = Pipeline(eager_adapter, PipelineConfig(max_new_tokens=1)).answer(
        scene.image, questions[0].text, keep_ratio=0.111
    )
    assert decode([eager_answers[("ptp in-LLM", 0.111)][0]], skip_special_tokens=True).strip() == expected.text
