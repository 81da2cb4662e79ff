"""Qwen3-VL adapter on the tiny model: the token order and received attention are the model's own, and DeepStack
follows the kept tokens — pruned before the LLM and inside it, the answer is the one a model gives that never saw
the dropped tokens nor their DeepStack rows."""

from __future__ import annotations

import cv2
import torch
from transformers.models.qwen3_vl import modeling_qwen3_vl

from ptp_ros.pruning import InLLMPruning
from ptp_ros.vlm.attention import ReceivedAttentionProbe
from ptp_ros.vlm.in_llm import causal_mask
from ptp_ros.vlm.qwen3_vl import Qwen3VLAdapter
from ptp_ros.vlm.stock_adapter import placeholder_positions

FAMILY = "qwen3_vl"  # conftest's model_dir / adapter / prepared / visual / eager_model: the tiny Qwen3-VL
INSTRUCTION = "what colour is the circle?"
ROWS, COLS = 18, 33  # 1920×1080 at the fixture's 640-token cap → 36×66 patches of 16 px → 18×33 tokens
STEPS = 4


def test_loader_dispatches_and_any_block_is_a_vision_layer(adapter):
    assert isinstance(adapter, Qwen3VLAdapter) and adapter.name == "qwen3_vl"
    assert adapter.model.config.vision_config._attn_implementation == "sdpa"
    assert adapter.vision_layer == 1  # the paper's "11 of 24" in a 4-block tower
    assert len(adapter.model.model.visual.deepstack_visual_indexes) == 3


def test_tokens_are_the_models_raster_order(adapter, prepared, visual):
    """Token t = merger(patches 4t..4t+3), at M-RoPE (row, col) = divmod(t, cols), its DeepStack rows alike."""
    tower = adapter.model.model.visual
    grid = prepared.inputs["image_grid_thw"]
    captured = {}
    handle = tower.merger.register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    try:
        with torch.no_grad():
            adapter.model.model.get_image_features(prepared.inputs["pixel_values"], grid)
    finally:
        handle.remove()
    assert adapter.token_grid(grid) == (ROWS, COLS) and visual.num_tokens == ROWS * COLS
    positions = adapter.rope_positions(prepared)[:, 0]  # [3, L]
    image_pos = placeholder_positions(prepared.inputs["input_ids"], adapter.image_token_id)
    start = positions[1, image_pos[0]]
    for t in [0, 1, COLS - 1, COLS, 300, ROWS * COLS - 1]:
        with torch.no_grad():
            merged = tower.merger(captured["x"][4 * t : 4 * t + 4])
        assert torch.allclose(merged[0], visual.features[t], atol=1e-5)
        r, c = divmod(t, COLS)
        assert (int(positions[1, image_pos[t]] - start), int(positions[2, image_pos[t]] - start)) == (r, c)
    assert [level.shape for level in visual.extras["deepstack"]] == [visual.features.shape] * 3


def test_saliency_is_attention_received_as_eager_computes_it(adapter, sample_image, eager_model, monkeypatch):
    prepared = adapter.prepare(cv2.resize(sample_image, (640, 360)), INSTRUCTION)  # eager maps stay small
    target = eager_model.model.visual.blocks[adapter.vision_layer].attn
    recorded = []
    stock = modeling_qwen3_vl.eager_attention_forward

    def recording(module, *args, **kwargs):
        out, weights = stock(module, *args, **kwargs)
        if module is target:
            recorded.append(weights[0].mean(0).mean(0))  # [keys]: mean over heads and queries
        return out, weights

    monkeypatch.setattr(modeling_qwen3_vl, "eager_attention_forward", recording)
    grid = prepared.inputs["image_grid_thw"]
    with torch.no_grad():
        eager_model.model.get_image_features(prepared.inputs["pixel_values"], grid)
        with ReceivedAttentionProbe(adapter.model.model.visual.blocks[adapter.vision_layer].attn) as probe:
            adapter.model.model.get_image_features(prepared.inputs["pixel_values"], grid)
    (reference,) = recorded
    received = probe.received()
    assert torch.allclose(received, reference, atol=1e-6, rtol=1e-4)
    per_token = adapter.token_saliency(received, grid)
    assert torch.allclose(per_token, reference.view(-1, 4).sum(1), atol=1e-6, rtol=1e-4)  # 2×2 merge groups


def deepstack_inputs(adapter, ids: torch.Tensor, visual, kept: torch.Tensor) -> dict:
    """The stock decoder's DeepStack arguments for a prompt ``ids`` holding only the ``kept`` visual tokens."""
    return {
        "visual_pos_masks": ids == adapter.image_token_id,
        "deepstack_visual_embeds": [level[kept] for level in visual.extras["deepstack"]],
    }


def test_instruction_attention_is_the_stock_decoders_with_deepstack(adapter, prepared, visual, eager_model):
    """At llm_layer 2 the hidden states hold the DeepStack additions of layers 0 and 1: the probe sees them."""
    ids = prepared.inputs["input_ids"]
    image_pos = placeholder_positions(ids, adapter.image_token_id)
    query_pos = torch.arange(int(image_pos.max()) + 1, ids.shape[1])
    embeds = eager_model.get_input_embeddings()(ids).clone()
    embeds[0, image_pos] = visual.features
    everything = torch.arange(visual.num_tokens)

    def eager_rows(**deepstack) -> torch.Tensor:
        with torch.no_grad():
            attn = eager_model.model.language_model(
                inputs_embeds=embeds, position_ids=adapter.rope_positions(prepared), output_attentions=True, **deepstack
            ).attentions
        return attn[adapter.options.llm_layer][0].mean(0)[query_pos][:, image_pos]

    rows = adapter.instruction_attention(prepared, visual)
    assert torch.allclose(rows, eager_rows(**deepstack_inputs(adapter, ids, visual, everything)), atol=1e-5)
    assert not torch.allclose(rows, eager_rows(), atol=1e-3)  # without DeepStack the rows differ: it is read


def greedy_reference(adapter, prepared, visual, kept: torch.Tensor, prune_layer: int, steps: int, deepstack=True):
    """Greedy decoding with no KV cache and no pruning code: layers below ``prune_layer`` run over the whole
    prompt (every visual token, DeepStack added at every visual position), layers from ``prune_layer`` on over
    a sequence in which the dropped visual tokens and their DeepStack rows never existed; every token at its
    original M-RoPE position, new tokens after the prompt's last.  ``prune_layer`` 0: pruned before the LLM.
    ``deepstack=False``: the control, a model that never adds DeepStack."""
    lm = adapter.model.model.language_model
    ids = prepared.inputs["input_ids"]
    length = ids.shape[1]
    image_pos = placeholder_positions(ids, adapter.image_token_id)
    survivors = torch.ones(length, dtype=torch.bool)
    survivors[image_pos] = False
    survivors[image_pos[kept]] = True
    is_visual = torch.zeros(length, dtype=torch.bool)
    is_visual[image_pos] = True
    prompt = adapter.model.get_input_embeddings()(ids).clone()
    prompt[0, image_pos] = visual.features
    full_positions = adapter.rope_positions(prepared)
    levels = visual.extras["deepstack"] if deepstack else []
    tokens, logits = [], []
    with torch.no_grad():
        for _ in range(steps):
            new = torch.ones(len(tokens), dtype=torch.bool)
            generated = adapter.model.get_input_embeddings()(torch.tensor([tokens], dtype=torch.long))
            hidden = torch.cat([prompt, generated], dim=1)
            after = int(full_positions.max()) + 1 + torch.arange(len(tokens))
            positions = torch.cat([full_positions, after.view(1, 1, -1).expand(3, 1, -1)], dim=-1)
            rows, visual_rows = torch.cat([torch.ones(length, dtype=torch.bool), new]), torch.arange(visual.num_tokens)
            visual_at = torch.cat([is_visual, ~new])  # the generated tokens are text
            for index, layer in enumerate(lm.layers):
                if index == prune_layer:  # from here on the dropped tokens never existed
                    rows, visual_rows = torch.cat([survivors, new]), kept
                    hidden = hidden[:, rows]
                rotary = lm.rotary_emb(hidden, positions[..., rows])
                hidden = layer(
                    hidden, attention_mask=causal_mask(hidden.shape[1], hidden.dtype), position_embeddings=rotary
                )
                if index < len(levels):
                    hidden = hidden.clone()
                    hidden[0, visual_at[rows]] += levels[index][visual_rows]
            logits.append(adapter.model.lm_head(lm.norm(hidden))[0, -1])
            tokens.append(int(logits[-1].argmax()))
    return tokens, logits


def cached_run(adapter, run) -> tuple[list[int], list[torch.Tensor]]:
    """``run()``'s generated tokens and each step's next-token logits, as the cached ``generate`` computed them."""
    logits = []
    hook = adapter.model.lm_head.register_forward_hook(lambda m, a, out: logits.append(out[0, -1].clone()))
    try:
        generation = run()
    finally:
        hook.remove()
    return generation, logits


def assert_same_greedy_run(cached, reference) -> None:
    (generation, cached_logits), (tokens, logits) = cached, reference
    assert generation.token_ids == tokens and len(cached_logits) == len(logits) == STEPS
    for step, (ours, theirs) in enumerate(zip(cached_logits, logits)):
        assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4), step


def test_pruned_before_the_llm_is_the_model_that_never_saw_the_dropped_tokens(adapter, prepared, visual):
    kept = torch.arange(0, visual.num_tokens, 5)
    cached = cached_run(adapter, lambda: adapter.generate(prepared, visual, kept, STEPS))
    assert_same_greedy_run(cached, greedy_reference(adapter, prepared, visual, kept, 0, STEPS))
    control = greedy_reference(adapter, prepared, visual, kept, 0, 1, deepstack=False)
    assert not torch.allclose(cached[1][0], control[1][0], atol=1e-2)  # DeepStack changes the answer's logits


def test_pruned_inside_the_llm_adds_deepstack_at_the_kept_positions_only(adapter, prepared, visual):
    """Pruned at layer 1: DeepStack level 0 reaches every visual token, levels 1 and 2 only the kept ones."""
    budget = visual.num_tokens // 6

    def top(rows: torch.Tensor) -> torch.Tensor:
        return torch.sort(torch.topk(rows[-1], budget).indices).values

    cached = cached_run(
        adapter, lambda: adapter.generate(prepared, visual, None, STEPS, in_llm=(InLLMPruning.fastv(1), top))
    )
    kept = cached[0].in_llm_kept
    assert kept.numel() == budget
    assert_same_greedy_run(cached, greedy_reference(adapter, prepared, visual, kept, 1, STEPS))
    assert "_deepstack_process" not in vars(adapter.model.model.language_model)  # the stock addition is back


def test_the_proxy_trainer_feeds_deepstack_as_the_model_does():
    """Training's shared-prefix answer pass (``answer_logits``) on a Qwen3-VL equals the model's own forward
    over the whole prompt only with the DeepStack inputs: without them the logits differ."""
    from ptp_ros.proxy import make_questions, make_scene, proxy_words, split_seed
    from ptp_ros.testing import BASE_WORDS
    from ptp_ros.vlm.qwen2_5_vl import resolution_kwargs
    from ptp_ros_bench.proxy.data import (
        answer_logits,
        deepstack_prefix_inputs,
        encode_scene,
        kept_positions,
        prefix_embeddings,
    )
    from ptp_ros_bench.proxy.train import SceneLayout, build_model, image_features

    words = list(dict.fromkeys([*BASE_WORDS, *proxy_words()]))
    widths = dict(vision_width=32, vision_layers=4, text_width=64, text_layers=3)
    model, processor = build_model(words, 0, widths, "qwen3_vl")
    scene = make_scene(split_seed("val", 5))
    small = resolution_kwargs(processor.image_processor, 128 * 32 * 32)  # 128 tokens keep it quick
    item = encode_scene(processor, scene, make_questions(scene, per_type=1)[:1], keep_scene=True, **small)
    layout = SceneLayout(Qwen3VLAdapter(model, processor), item)
    with torch.no_grad():
        feats, deepstack = image_features(model, item)
        everything = torch.arange(feats.shape[0])
        prefix_len = item.prefix_ids.shape[0]
        prefix = prefix_embeddings(model, item.prefix_ids, feats)[None]
        positions = kept_positions(layout.positions, prefix_len, feats.shape[0], everything)
        pad = processor.tokenizer.pad_token_id

        def ours(**visual_inputs):
            return answer_logits(model, prefix, item.suffix_ids, pad, positions, **visual_inputs)[0]

        stock = model(**item.inputs).logits[0, -1]
        with_deepstack = ours(visual_inputs=deepstack_prefix_inputs(deepstack, prefix_len, [everything]))
    assert len(deepstack) == 3
    assert torch.allclose(with_deepstack, stock, atol=1e-4)
    assert not torch.allclose(ours(), stock, atol=1e-3)


def test_the_proxy_trainer_reads_qwen3_vl_scenes_at_the_cap_it_is_given():
    """``--max-tokens 1280``: a proxy scene is read as the Qwen2.5-VL proxy reads it (~1 250 tokens), and the cap
    is saved with the processor; without it, the tiny fixture's 640."""
    from ptp_ros.proxy import make_scene, proxy_words, split_seed
    from ptp_ros.testing import BASE_WORDS
    from ptp_ros_bench.proxy.data import encode_scene
    from ptp_ros_bench.proxy.train import FAMILIES

    words = list(dict.fromkeys([*BASE_WORDS, *proxy_words()]))
    widths = dict(vision_width=32, vision_layers=2, text_width=64, text_layers=3)
    scene = make_scene(split_seed("val", 0))  # 1344×1344
    for cap, tokens in ((1280, 35 * 35), (None, 25 * 25)):
        _, _, processor = FAMILIES["qwen3_vl"].configure(words, widths, cap)
        assert processor.image_processor.size["longest_edge"] == (cap or 640) * 32 * 32
        grid = encode_scene(processor, scene, []).inputs["image_grid_thw"][0]
        assert int(grid.prod()) // 4 == tokens
