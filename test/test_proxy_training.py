"""The proxy's training script: its attention supervision reads the attention the model really computes,
asks for what the questions need, and the committed script runs end to end into a loadable checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from ptp_ros.proxy import make_questions, make_scene, proxy_words, split_seed
from ptp_ros.testing import BASE_WORDS
from ptp_ros_bench.proxy.attention_aux import COUNT_SHARE, RETRIEVAL_HEAD, AnswerAttentionTap, wanted_attention
from ptp_ros_bench.proxy.data import answer_logits, encode_scene, kept_positions, pad_suffixes, prefix_embeddings
from ptp_ros_bench.proxy.train import (
    FAMILIES,
    LanguageStage,
    SceneLayout,
    build_model,
    features,
    main,
    question_key_ids,
    shown_tokens,
)

WORDS = list(dict.fromkeys([*BASE_WORDS, *proxy_words()]))


@pytest.fixture(scope="module", params=tuple(FAMILIES))
def model_and_item(request):
    """A small model of each family, one validation scene and its layout."""
    model, processor = build_model(
        WORDS, 0, dict(vision_width=32, vision_layers=2, text_width=64, text_layers=3), request.param
    )
    scene = make_scene(split_seed("val", 5))
    item = encode_scene(processor, scene, make_questions(scene, per_type=1), keep_scene=True)
    return model, processor, item, SceneLayout(FAMILIES[request.param].adapter_class(model, processor), item)


def test_answer_attention_equals_eager_attention(model_and_item):
    model, processor, item, layout = model_and_item
    lm = model.model.language_model
    with torch.no_grad():
        shown = shown_tokens(layout, "focus", 0.05, torch.Generator().manual_seed(0))
        feats = features(model, item)[shown]
        prefix = prefix_embeddings(model, item.prefix_ids, feats)[None]
        positions = kept_positions(
            layout.positions, item.prefix_ids.shape[0], shown.shape[0], torch.nonzero(shown).squeeze(1)
        )
        tap = AnswerAttentionTap(lm, 1)
        answer_logits(model, prefix, item.suffix_ids, processor.tokenizer.pad_token_id, positions)
        ids, last = pad_suffixes(item.suffix_ids, processor.tokenizer.pad_token_id)
        ours = tap.answer_attention(last)
        lm.set_attn_implementation("eager")
        try:
            for r, suffix in enumerate(item.suffix_ids):
                embeds = torch.cat([prefix[0], model.get_input_embeddings()(suffix)])[None]
                position_ids = (
                    None
                    if positions is None
                    else torch.cat(
                        [positions[0], (positions[1] + torch.arange(len(suffix))).view(1, 1, -1).expand(3, 1, -1)], 2
                    )
                )
                eager = lm(inputs_embeds=embeds, position_ids=position_ids, output_attentions=True).attentions[1][
                    0, :, -1
                ]  # [H, L]
                assert torch.allclose(ours[r, :, : eager.shape[-1]], eager, atol=1e-5)
                assert ours[r, :, eager.shape[-1] :].sum() == 0  # padding after the answer is masked
        finally:
            lm.set_attn_implementation("sdpa")


def test_side_head_supervises_the_answer_state_below_its_layer_only(model_and_item):
    """The side head's loss (location questions) reaches the layers below ``side_layer`` and none above it,
    and leaves the attention the report's rows read unsupervised (it is a representation loss)."""
    model, processor, item, layout = model_and_item
    assert any(q.qtype == "location" for q in item.questions)
    stage = LanguageStage(model, processor, 0, 1, weight=0.0, side_layer=2, side_weight=1.0)
    with torch.no_grad():
        feats = features(model, item)
    shown = shown_tokens(layout, "all", 0.0, None)
    stage(item, layout, feats, shown, supervise=False)  # fills the taps
    ids, last = pad_suffixes(
        [torch.cat([s, a.view(1)]) for s, a in zip(item.suffix_ids, item.answer_ids)], processor.tokenizer.pad_token_id
    )
    model.zero_grad(set_to_none=True)
    loss = stage._side_loss(item, last - 1)
    assert loss.item() > 0
    loss.backward()
    layers = model.model.language_model.layers
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layers[1].mlp.parameters())
    # the head reads layer 2's attention input (after its input norm): nothing of layer 2's attention or MLP learns
    assert all(p.grad is None for m in (layers[2].self_attn, layers[2].mlp) for p in m.parameters())


def test_wanted_attention_points_at_what_each_question_needs(model_and_item):
    model, processor, item, layout = model_and_item
    shown = torch.ones_like(layout.region, dtype=torch.bool)
    position = item.prefix_ids.shape[0] + torch.arange(layout.region.shape[0])
    ids, _ = pad_suffixes(item.suffix_ids, processor.tokenizer.pad_token_id)
    key_ids = question_key_ids(processor.tokenizer)
    assert len(key_ids) == 15 and processor.tokenizer.unk_token_id not in key_ids  # 5 shapes, 5 plurals, 5 colours
    prefix_len = item.prefix_ids.shape[0] + int(shown.sum())
    hop, wanted = wanted_attention(
        item.questions, item.scene.objects, layout.objects, position, ids, key_ids, prefix_len, 3
    )
    assert torch.allclose(hop.sum(-1), torch.ones(len(item.questions)))
    for r, q in enumerate(item.questions):
        row = wanted[r, RETRIEVAL_HEAD[q.qtype]]
        assert row.sum().item() == pytest.approx(1.0)
        assert wanted[r].sum().item() == pytest.approx(1.0)  # one head per question
        tile, glob = layout.objects[q.targets[0]].tolist() if q.targets else (-1, -1)
        if q.qtype == "colour":
            assert row[position[tile]] == 1.0 and not layout.overview[tile]
        elif q.qtype == "location":  # the global view where there is one, else the object's own token
            where = glob if layout.overview.any() else tile
            assert where >= 0 and row[position[where]] == 1.0 and bool(layout.overview[where]) == (glob >= 0)
        elif q.qtype == "count":
            assert row[0].item() == pytest.approx(1 - COUNT_SHARE * len(q.targets))
        else:
            assert (row[0] == 1.0) == (q.answer == "no")


#: A small model and validation set.  The tests' --max-minutes / --vision-minutes are wall-clock budgets and most
#: of their time: each stage takes at least one step and validates when its budget is spent, so a few seconds do.
SMALL = [
    "--val-scenes",
    "1",
    "--val-every",
    "10",
    "--vision-width",
    "32",
    "--vision-layers",
    "2",
    "--text-width",
    "64",
    "--text-layers",
    "3",
    "--hop-layer",
    "1",
    "--retrieval-layer",
    "2",
    "--per-type",
    "1",
    "--crowd",
    "30",
    "--threads",  # the trainer sets torch's thread count for the whole process: the test worker's one
    "1",
]


def _log(path) -> list[dict]:
    return [json.loads(line) for line in (path / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", tuple(FAMILIES))
def test_training_script_writes_a_loadable_checkpoint(tmp_path, family):
    from ptp_ros.pipeline import Pipeline
    from ptp_ros.vlm.loading import LoadOptions, load_adapter

    main([str(tmp_path), "--family", family, "--max-minutes", "0.1", "--vision-minutes", "0.04", *SMALL])
    records = _log(tmp_path)
    assert any(r.get("event") == "vision done" for r in records)
    assert any(r.get("stage") == "vision" and 0 <= r["side_acc"] <= 1 for r in records)
    assert records[-1]["event"] == "done" and any("val_acc_location" in r for r in records)
    # the global view where the model has one; a model read at any resolution is validated at a low one
    extra = "val_acc_global_only" if FAMILIES[family].has_cls else "val_low_res_acc"
    assert any(extra in r for r in records)
    adapter = load_adapter(tmp_path, LoadOptions(device="cpu"))
    assert adapter.name == family
    scene = make_scene(split_seed("test", 0))
    answer = Pipeline(adapter).answer(scene.image, "what colour is the ring ?", keep_ratio=0.25)
    assert answer.selection.kept.numel() > 0


def test_training_resumes_from_its_checkpoint_and_takes_a_trained_vision_tower(tmp_path):
    """A run stopped anywhere continues where its last checkpoint left it (same step count, log appended),
    and ``--vision-from`` starts the language stage from another checkpoint's frozen vision tower."""
    from ptp_ros.vlm.loading import LoadOptions, load_adapter

    first, second = tmp_path / "first", tmp_path / "second"
    main([str(first), "--max-minutes", "0.1", "--vision-minutes", "0.03", "--checkpoint-every", "2", *SMALL])
    steps = next(r["language_steps"] for r in _log(first) if r.get("event") == "done")
    main(
        [str(first), "--max-minutes", "0.17", "--vision-minutes", "0.03", "--checkpoint-every", "2", "--resume", *SMALL]
    )
    records = _log(first)
    resumed = next(r for r in records if r.get("event") == "resume")
    assert resumed["stage"] == "language" and resumed["step"] == steps
    assert not any(r.get("event") == "vision done" for r in records[records.index(resumed) :])  # stage 1 not rerun
    assert records[-1]["event"] == "done" and records[-1]["language_steps"] > steps

    # on the CPU clock (--clock cpu) the budget counts CPU time over the threads; the log also has the wall time
    main([str(second), "--max-minutes", "0.05", "--vision-from", str(first), "--clock", "cpu", *SMALL])
    records = _log(second)
    assert any(r.get("event") == "vision taken" for r in records) and not any(
        r.get("stage") == "vision" for r in records
    )
    done = records[-1]
    assert done["event"] == "done" and 0.05 * 60 <= done["train_seconds"] and done["wall_s"] > 0
    trained, taken = (load_adapter(d, LoadOptions(device="cpu")).model for d in (first, second))
    tower = trained.model.vision_tower.state_dict()
    assert all(torch.equal(v, taken.model.vision_tower.state_dict()[k]) for k, v in tower.items())
    with pytest.raises(SystemExit):
        main([str(tmp_path / "third"), "--resume", *SMALL])  # nothing to resume from

    # --init-from takes every weight, the LLM's too (at lr 0 the saved model is the one it started from)
    third = tmp_path / "third"
    main([str(third), "--max-minutes", "0.03", "--init-from", str(first), "--lr", "0", *SMALL])
    assert any(r.get("event") == "weights taken" for r in _log(third))
    continued = load_adapter(third, LoadOptions(device="cpu")).model
    assert all(torch.equal(v, continued.state_dict()[k]) for k, v in trained.state_dict().items())


def test_oracle_probe_runs_and_logs_accuracy_per_type(tmp_path):
    from ptp_ros_bench.proxy.oracle_probe import main as probe

    log = tmp_path / "probe.jsonl"
    probe(
        [
            str(log),
            "--steps",
            "4",
            "--val-every",
            "2",
            "--val-scenes",
            "1",
            "--per-type",
            "1",
            "--text-width",
            "64",
            "--text-layers",
            "2",
        ]
    )
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert {"val_acc", "val_acc_colour", "val_acc_count", "train_acc"} <= set(records[-1])
