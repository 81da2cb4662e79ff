"""The accuracy report's control rows are what they say (random tokens, or none, dropped inside the LLM from
layer K exactly as the in-LLM methods drop theirs), every method's gain is paired with the control of its own
stage, and PTP's default meets every peer at matched total cost."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ptp_ros.pipeline import Pipeline
from ptp_ros.proxy import make_questions, make_scene, split_seed
from ptp_ros.pruning import ConfiguredSelector as Configured
from ptp_ros.pruning import make_selector, resolve_budget, selector_names
from ptp_ros_bench.accuracy import main
from ptp_ros_bench.accuracy.methods import (
    comparison_methods,
    control_for,
    control_methods,
    main_rows,
    no_visual_after,
    random_after,
    with_controls,
)
from ptp_ros_bench.accuracy.report import OUTSIDE, _at_cost, build, markdown, paired_difference
from ptp_ros_bench.accuracy.runner import FULL, Evaluator, Results
from ptp_ros_bench.rows import Row

INSTRUCTION = "what colour is the circle?"


def layer_lengths(adapter, answer):
    """``answer()``'s result and the sequence length every LLM decoder layer processes in its prefill."""
    lm = adapter.model.model.language_model
    seen: list[int] = []
    handles = [
        layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
        for layer in lm.layers
    ]
    try:
        result = answer()
    finally:
        for h in handles:
            h.remove()
    return result, seen[: len(lm.layers)]  # the decoding steps after it see one token each


@pytest.mark.parametrize("k", [1, 2])
def test_controls_drop_inside_the_llm_from_layer_k(tiny_adapter, sample_image, k):
    """random-after-K: layers < K read the whole prompt, layers >= K the text and K's count of visual tokens;
    no-visual-after-K: layers >= K the text alone.  Through Pipeline.answer (the in-LLM hooks), decoding on."""
    ratio = 0.25
    prepared = tiny_adapter.prepare(sample_image, INSTRUCTION)
    length, n = prepared.inputs["input_ids"].shape[1], tiny_adapter.encode(prepared).num_tokens
    depth = len(tiny_adapter.model.model.language_model.layers)
    assert k < depth
    budget = resolve_budget(n, keep_ratio=ratio)
    rows = {
        m.label: m
        for m in control_methods([Row("fastv", Configured("fastv", {"k": k}))], tiny_adapter.options.llm_layer)
    }
    for label, kept in ((random_after(k), budget), (no_visual_after(k), 0)):
        pipeline = Pipeline(tiny_adapter, rows[label].pipeline_config(max_new_tokens=3))
        answer, seen = layer_lengths(
            tiny_adapter, lambda p=pipeline: p.answer(sample_image, INSTRUCTION, keep_ratio=ratio)
        )
        assert seen == [length] * k + [length - n + kept] * (depth - k), label
        assert answer.selection.num_kept == kept and answer.prune_layer == k
        assert answer.new_tokens >= 1
    # the random control keeps the random tokens the pre-LLM random row keeps: only where they drop differs
    before = Pipeline(tiny_adapter, rows["random"].pipeline_config(max_new_tokens=1))
    inside = Pipeline(tiny_adapter, rows[random_after(k)].pipeline_config(max_new_tokens=1))
    a, b = (p.answer(sample_image, INSTRUCTION, keep_ratio=ratio) for p in (before, inside))
    assert torch.equal(a.selection.kept, b.selection.kept) and a.prune_layer is None


def test_controls_are_registered_but_not_listed():
    assert {"random_in_llm", "no_visual_in_llm"} <= set(selector_names(controls=True))
    assert not {"random_in_llm", "no_visual_in_llm"} & set(selector_names())  # no CLI choice, no ptp-bench row
    assert make_selector("random_in_llm", k=3).in_llm.prune_layer == 3


def test_each_row_is_paired_with_the_control_of_its_stage():
    methods = {m.label: m for m in comparison_methods()}
    assert control_for(methods["ptp"], 2) == "random-after-2"
    assert control_for(methods["ptp llm_layer=1"], 2) == "random-after-1"
    assert control_for(methods["FastV (in-LLM, K=2)"], 2) == "random-after-2"
    assert control_for(methods["DivPrune"], 2) == "random"
    assert control_for(methods["ptp before the LLM (separate probe; the default before)"], 2) == "random"
    assert control_for(methods["ptp"], 3) == "random-after-3"  # the adapter's relevance layer
    labels = [m.label for m in control_methods(list(methods.values()), 2)]
    assert labels == ["random", "random-after-1", "no-visual-after-1", "random-after-2", "no-visual-after-2"]
    # the controls only an ablation row needs (K = 1 here) run on the ablation scenes with it
    main = {m.label for m in main_rows(with_controls(list(methods.values()), 2), 2)}
    assert {"ptp", "random", "random-after-2", "no-visual-after-2"} <= main
    assert not {"ptp llm_layer=1", "random-after-1", "no-visual-after-1"} & main
    # a control picked by hand is not added twice
    picked = with_controls([methods["ptp"], *control_methods([methods["ptp"]], 2)[:1]], 2)
    assert [m.label for m in picked] == ["ptp", "random", "random-after-2", "no-visual-after-2"]


def test_evaluator_runs_the_controls_as_the_pipeline_does(tiny_adapter):
    """The shared-prefix runner's control rows (in its batched in-LLM continuation) answer what
    Pipeline.answer answers, keep K's count / none, and the in-LLM methods beside them are unchanged."""
    scene = make_scene(split_seed("test", 1))
    questions = make_questions(scene, per_type=1)
    methods = with_controls(
        [Row("ptp", Configured()), Row("fastv", Configured("fastv"))], tiny_adapter.options.llm_layer
    )
    results = Results()
    Evaluator(tiny_adapter, methods, (1.0, 0.111)).scene(scene, questions, results)
    decode = tiny_adapter.processor.tokenizer.decode
    n = results.visual_tokens[0]
    for m in methods:
        pipeline = Pipeline(tiny_adapter, m.pipeline_config(max_new_tokens=1))
        for i, q in enumerate(questions):
            answer = pipeline.answer(scene.image, q.text, keep_ratio=0.111)
            assert decode([results.predicted[(m.label, 0.111)][i]], skip_special_tokens=True).strip() == answer.text
            assert results.kept_ratio[(m.label, 0.111)][i] == pytest.approx(answer.selection.num_kept / n)
    assert set(results.kept_ratio[("no-visual-after-2", 0.111)]) == {0.0}
    assert results.kept_ratio[("random-after-2", 0.111)] == results.kept_ratio[("ptp", 0.111)]


def synthetic(correct: dict[str, list[int]], kept: dict[str, float], questions: int = 40) -> Results:
    """Results of ``questions`` questions with the given correctness per row at keep ratio 0.111 (and 0.5, the
    same) and every row's kept share."""
    results = Results()
    results.qtypes = ["colour"] * questions
    results.scenes = list(range(questions))
    results.text_tokens = [20] * questions
    results.visual_tokens = [1000] * questions
    results.correct[(FULL, 1.0)] = [1] * questions
    results.kept_ratio[(FULL, 1.0)] = [1.0] * questions
    results.recall[(FULL, 1.0)] = [float("nan")] * questions
    for label, values in correct.items():
        for ratio in (0.5, 0.111):
            share = 0.5 if ratio == 0.5 and kept[label] else kept[label]
            results.correct[(label, ratio)] = values
            results.kept_ratio[(label, ratio)] = [share] * len(values)
            results.recall[(label, ratio)] = [float("nan")] * len(values)
    return results


META = {"model": "m", "split": "test", "command": "ptp-eval", "seconds": 1.0}
LLM = {"layers": 12, "hidden": 64, "ffn": 256, "heads": 4, "kv_heads": 4, "vocab": 100, "gated_mlp": True}


def test_report_pairs_each_gain_with_its_own_stages_control_and_says_when_it_is_not_ahead(tmp_path):
    rng = np.random.default_rng(0)
    q = 40
    ptp = [1] * 36 + [0] * 4
    before = [1] * 30 + [0] * 10
    correct = {
        "ptp": ptp,
        "before": before,
        "random": [1] * 20 + [0] * 20,
        "random-after-2": ptp[:],  # as good as PTP: PTP is not ahead of it
        "no-visual-after-2": rng.integers(0, 2, q).tolist(),
    }
    kept = {"ptp": 0.111, "before": 0.111, "random": 0.111, "random-after-2": 0.111, "no-visual-after-2": 0.0}
    methods = with_controls([Row("ptp", Configured(), group="ptp"), Row("before", Configured(prune_in_llm=False))], 2)
    data = build(synthetic(correct, kept, q), methods, (1.0, 0.5, 0.111), {**META, "llm": LLM})
    assert data["meta"]["llm_layers"] == 12
    assert set(data["controls"]) == {"random", "random-after-2", "no-visual-after-2"}
    assert {k: (c["stage"], c["prune_layer"]) for k, c in data["controls"].items()} == {
        "random": ("pre_llm", None),
        "random-after-2": ("in_llm", 2),
        "no-visual-after-2": ("in_llm", 2),
    }
    assert set(data["controls"]["random"]["ratios"]) == {"0.5", "0.111"}
    assert data["controls"]["no-visual-after-2"]["ratios"]["0.111"]["accuracy"] == pytest.approx(
        np.mean(correct["no-visual-after-2"]), abs=1e-4
    )
    gain = data["methods"]["before"]["ratios"]["0.111"]["gain_over_control"]
    diff, half = paired_difference(before, correct["random"])
    assert gain["control"] == "random" and gain["diff"] == pytest.approx(diff, abs=1e-4)
    assert gain["ci95"] == pytest.approx([diff - half, diff + half], abs=1e-4) and gain["ci95"][0] > 0
    gain = data["methods"]["ptp"]["ratios"]["0.111"]["gain_over_control"]
    assert gain == {"control": "random-after-2", "diff": 0.0, "ci95": [0.0, 0.0], "n": q}
    text = markdown(data, (1.0, 0.5, 0.111))
    assert "| ptp (random-after-2) | +0.0 (+0.0 to +0.0) **not ahead**" in text
    assert "| before (random) | +25.0" in text and "before (" not in text.split("Not ahead")[1]
    assert "| no-visual-after-2 (control) |" in text and "Not ahead of their control: ptp (0.5, 0.111)." in text
    json.dumps(data)  # JSON-ready


def test_matched_cost_interpolates_on_the_peers_frontier_and_never_extrapolates():
    """On a 4-layer LLM, PTP inside it at K=2 costs half an unpruned prefill at any ratio, a pre-LLM peer far less
    at the same ratio: the peer is read at the keep ratio of equal total FLOPs, between its two neighbouring
    measured points (keep-all among them), and never beyond them."""
    q = 40
    correct = {"ptp": [1] * 36 + [0] * 4, "peer": [1] * 24 + [0] * 16}
    methods = [Row("ptp", Configured(), group="ptp"), Row("peer", Configured("uniform_cls"))]
    results = synthetic(correct, {"ptp": 0.111, "peer": 0.111}, q)
    data = build(results, methods, (1.0, 0.5, 0.111), {**META, "llm": {**LLM, "layers": 4}})
    matched = data["matched_cost"]["ratios"]["0.111"]
    target = matched["ptp"]["prefill_gflops"]
    cell = matched["peers"]["peer"]
    points = {r: data["methods"]["peer"]["ratios"][r]["prefill_gflops"] for r in ("0.111", "0.5", "1.0")}
    assert points["0.5"] < target < points["1.0"] and cell["between"] == [0.5, 1.0]
    w = (target - points["0.5"]) / (points["1.0"] - points["0.5"])
    assert cell["accuracy"] == pytest.approx((1 - w) * 0.6 + w * 1.0, abs=1e-4)
    assert cell["keep_ratio"] == pytest.approx(0.5 + 0.5 * w, abs=1e-4)
    mixed = (1 - w) * np.asarray(correct["peer"], float) + w * 1.0
    diff, half = paired_difference(correct["ptp"], mixed)
    assert cell["reference_minus_this"]["diff"] == pytest.approx(diff, abs=1e-4)
    assert cell["reference_minus_this"]["ci95"] == pytest.approx([diff - half, diff + half], abs=1e-4)
    assert "## Accuracy at matched total cost" in markdown(data, (1.0, 0.5, 0.111))
    cheaper = _at_cost(results, "peer", data["methods"]["peer"], points["0.111"] / 2, correct["ptp"])
    assert cheaper == {"accuracy": None, "note": OUTSIDE, "measured_gflops": [points["0.111"], points["1.0"]]}


def test_cli_methods_pick_controls_and_every_report_has_them(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    args = ["--model", str(tiny_model_dir), "--quick", "--scenes", "1", "--ratios", "0.111", "--out", str(out)]
    assert main([*args, "--methods", "ptp", "random-after-1", "--split", "validation"]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["split"] == "val" and data["meta"]["llm_layers"] >= 3
    assert list(data["methods"]) == ["ptp"]
    assert list(data["controls"]) == ["random-after-1", "random", "random-after-2", "no-visual-after-2"]
    assert data["methods"]["ptp"]["ratios"]["0.111"]["gain_over_control"]["control"] == "random-after-2"
    assert (out / "accuracy_vs_prefill_flops.png").stat().st_size > 1000
    with pytest.raises(SystemExit):
        main([*args, "--methods", "random-after-7"])
