"""ptp-eval: its shared-prefix scoring answers exactly what the library's Pipeline answers, its report
is well formed, and the shipped proxy model solves the task with all tokens."""

from __future__ import annotations

import json

import pytest
import torch

from ptp_ros.pipeline import Pipeline, PipelineConfig
from ptp_ros.proxy import make_questions, make_scene, split_seed
from ptp_ros.pruning import ConfiguredSelector as Configured
from ptp_ros_bench.accuracy import main
from ptp_ros_bench.accuracy.methods import comparison_methods, with_controls
from ptp_ros_bench.accuracy.runner import DOWNSCALED, FULL, GLOBAL_ONLY, Evaluator, Results, summarize_ci
from ptp_ros_bench.rows import Row

PEERS = [
    Row("ptp", Configured("ptp")),
    Row("uniform", Configured("uniform_cls")),
    Row("fastv", Configured("fastv")),
    Row("text_attention", Configured("text_attention", reduce="mean")),
    Row("ptp in-LLM", Configured("ptp", prune_in_llm=True)),
    Row("ptp candidates", Configured("ptp", prune_in_llm=False, probe_candidates=3.0)),
    Row("ptp before the LLM", Configured("ptp", prune_in_llm=False)),
]


@pytest.fixture(scope="module")
def scene_and_questions():
    scene = make_scene(split_seed("test", 0))
    return scene, make_questions(scene, per_type=1)


def test_evaluator_answers_what_the_pipeline_answers(tiny_adapter, scene_and_questions):
    scene, questions = scene_and_questions
    results = Results()
    Evaluator(tiny_adapter, PEERS, (1.0, 0.25)).scene(scene, questions, results)
    decode = tiny_adapter.processor.tokenizer.decode
    configs = {m.label: PipelineConfig(selector=m.selector, max_new_tokens=1) for m in PEERS}
    for label, config in configs.items():
        pipeline = Pipeline(tiny_adapter, config)
        # all tokens is one row whatever the selector: checked through the first one's pipeline
        cells = [((label, 0.25), 0.25)] + ([((FULL, 1.0), 1.0)] if label == PEERS[0].label else [])
        for i, q in enumerate(questions):
            for key, ratio in cells:
                expected = pipeline.answer(scene.image, q.text, keep_ratio=ratio).text
                assert decode([results.predicted[key][i]], skip_special_tokens=True).strip() == expected, (label, q)
    assert all(0 < r <= 0.25 + 1e-3 for r in results.kept_ratio[("ptp", 0.25)])
    assert all(0.0 <= r <= 1.0 for r in results.recall[("ptp", 0.25)] if r == r)


@pytest.fixture(scope="module")
def qwen_model_dir(tmp_path_factory):
    from ptp_ros.testing.qwen2_5_vl import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen") / "m", seed=3)


@pytest.fixture(scope="module")
def qwen_adapter(qwen_model_dir):
    from ptp_ros.vlm.loading import LoadOptions, load_adapter

    return load_adapter(qwen_model_dir, LoadOptions(device="cpu"))


def test_in_llm_rows_answer_what_the_pipeline_answers_with_3d_positions(qwen_adapter, scene_and_questions):
    """The evaluator's batched in-LLM continuation (layers < K once, kept rows at their M-RoPE positions)
    gives the answers of the library's hooked generate on Qwen2.5-VL."""
    scene, questions = scene_and_questions
    methods = [Row("fastv", Configured("fastv")), Row("ptp in-LLM", Configured("ptp", prune_in_llm=True))]
    results = Results()
    Evaluator(qwen_adapter, methods, (1.0, 0.25)).scene(scene, questions, results)
    decode = qwen_adapter.processor.tokenizer.decode
    configs = {m.label: PipelineConfig(selector=m.selector, max_new_tokens=1) for m in methods}
    for label, config in configs.items():
        pipeline = Pipeline(qwen_adapter, config)
        for i, q in enumerate(questions):
            expected = pipeline.answer(scene.image, q.text, keep_ratio=0.25).text
            assert decode([results.predicted[(label, 0.25)][i]], skip_special_tokens=True).strip() == expected


def test_shared_prefix_logits_equal_the_models_own_pruned_forward(qwen_adapter, scene_and_questions):
    """The evaluator's prefix/suffix split gives the logits of the stock forward the adapter's pruned
    generation runs: kept tokens at their original 3-D positions, text after them where it was."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from ptp_ros.vlm.stock_adapter import kept_sequence_mask
    from ptp_ros_bench.proxy.data import answer_logits, kept_positions, prefix_embeddings, question_suffix

    scene, questions = scene_and_questions
    adapter, model = qwen_adapter, qwen_adapter.model
    prepared = adapter.prepare(scene.image, questions[0].text)
    visual = adapter.encode(prepared)
    ids = prepared.inputs["input_ids"]
    image_pos = torch.nonzero(ids[0] == adapter.image_token_id).squeeze(1)
    p, n = int(image_pos[0]), int(image_pos.numel())
    kept = torch.randperm(n, generator=torch.Generator().manual_seed(0))[: n // 5].sort().values
    keep = kept_sequence_mask(ids, adapter.image_token_id, kept)
    positions = adapter.rope_positions(prepared)[:, :, keep]
    with torch.no_grad():
        stock = model(
            input_ids=ids[:, keep],
            attention_mask=prepared.inputs["attention_mask"][:, keep],
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=(visual.features[kept],))},
            position_ids=torch.cat([torch.arange(int(keep.sum())).view(1, 1, -1), positions]),
        ).logits[0, -1]
        ours = answer_logits(
            model,
            prefix_embeddings(model, ids[0, :p], visual.features[kept])[None],
            [question_suffix(adapter.processor, questions[0].text)],
            0,
            kept_positions(adapter.rope_positions(prepared), p, n, kept),
        )[0]
        renumbered = answer_logits(
            model,
            prefix_embeddings(model, ids[0, :p], visual.features[kept])[None],
            [question_suffix(adapter.processor, questions[0].text)],
            0,
        )[0]
    assert torch.allclose(ours, stock, atol=1e-4)
    assert not torch.allclose(renumbered, stock, atol=1e-3)  # positions matter: the check can fail


def test_evaluator_on_qwen_answers_what_the_pipeline_and_the_downscaled_model_answer(qwen_adapter, scene_and_questions):
    """Qwen2.5-VL: pruned answers are the pipeline's, and the max_pixels row is the model reading the
    smaller image, at most the budget's tokens."""
    from ptp_ros.pruning import resolve_budget

    adapter = qwen_adapter
    scene, questions = scene_and_questions
    results = Results()
    evaluator = Evaluator(adapter, PEERS[:2], (1.0, 0.111))
    evaluator.scene(scene, questions, results)
    assert evaluator.downscales and (GLOBAL_ONLY, 0.0) not in results.correct
    decode = adapter.processor.tokenizer.decode
    n = adapter.encode(adapter.prepare(scene.image, questions[0].text)).num_tokens
    small = Pipeline(
        adapter.downscaled(resolve_budget(n, keep_ratio=0.111), scene.image.shape[:2]), PipelineConfig(max_new_tokens=1)
    )
    pipeline = Pipeline(adapter, PipelineConfig(max_new_tokens=1))
    answers = {
        label: [decode([t], skip_special_tokens=True).strip() for t in results.predicted[(label, r)]]
        for label, r in ((FULL, 1.0), ("ptp", 0.111), (DOWNSCALED, 0.111))
    }
    # the comparison below can tell rows apart: the rows' answers are not all one token
    assert len({t for key in results.predicted for t in results.predicted[key]}) > 1
    for i, q in enumerate(questions):
        assert answers[FULL][i] == pipeline.answer(scene.image, q.text, keep_ratio=1.0).text
        assert answers["ptp"][i] == pipeline.answer(scene.image, q.text, keep_ratio=0.111).text
        assert answers[DOWNSCALED][i] == small.answer(scene.image, q.text, keep_ratio=1.0).text
    assert all(0.1 < r <= 0.111 + 1e-3 for r in results.kept_ratio[(DOWNSCALED, 0.111)])
    assert all(r != r for r in results.recall[(DOWNSCALED, 0.111)])  # another image's tokens: no recall


def test_wilson_interval():
    acc, lo, hi = summarize_ci([1] * 90 + [0] * 10)
    assert acc == pytest.approx(0.9) and lo == pytest.approx(0.8256, abs=1e-3) and hi == pytest.approx(0.9448, abs=1e-3)


def test_methods_cover_the_issue():
    labels = {m.label for m in with_controls(comparison_methods(), 2)}
    assert {
        "ptp",
        "random",
        "random-after-2",
        "no-visual-after-2",
        "HiRED",
        "FastV (in-LLM, K=2)",
        "DivPrune",
        "GlobalCom2",
        "uniform [CLS] top-k",
        "ptp without region budgets",
        "ptp mean over instruction",
    } <= labels
    assert len({m.key() for m in comparison_methods()}) == len(comparison_methods())


def test_quick_report(tiny_model_dir, tmp_path):
    assert (
        main(
            [
                "--model",
                str(tiny_model_dir),
                "--quick",
                "--scenes",
                "1",
                "--per-type",
                "1",
                "--ratios",
                "1",
                "0.111",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["questions"] == 4 and (tmp_path / "accuracy_vs_keep_ratio.png").stat().st_size > 1000
    entry = data["methods"]["ptp"]["ratios"]["0.111"]
    assert entry["ci95"][0] <= entry["accuracy"] <= entry["ci95"][1]
    assert "| ptp |" in (tmp_path / "results.md").read_text()
    assert set(data["controls"]) >= {"random", "random-after-2", "no-visual-after-2"}  # in every report
    assert entry["gain_over_control"]["control"] == "random-after-2" and data["matched_cost"] is not None


def test_quick_report_on_qwen_has_the_downscaling_row_and_no_global_view(qwen_model_dir, tmp_path):
    assert (
        main(
            [
                "--model",
                str(qwen_model_dir),
                "--quick",
                "--scenes",
                "1",
                "--per-type",
                "1",
                "--ratios",
                "1",
                "0.25",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["global_only"] is None
    row = data["methods"][DOWNSCALED]["ratios"]["0.25"]
    assert row["n"] == data["meta"]["questions"] and 0 < row["kept_ratio"] <= 0.25 and row["target_recall"] is None
    assert row["ptp_minus_this"] is not None  # paired with PTP on the same questions
    text = (tmp_path / "results.md").read_text()
    assert f"| {DOWNSCALED} |" in text and "global view only" not in text
    with pytest.raises(SystemExit):  # the sweep's region scores are those of tiled models
        main(["--model", str(qwen_model_dir), "--sweep", "--scenes", "1", "--out", str(tmp_path / "sweep")])


def _shipped_model_results(
    path, ratios: tuple[float, ...], methods: list[Row] | None = None, scenes: int = 10
) -> Results:
    """A shipped proxy checkpoint scored on the first ``scenes`` test scenes (fast; ptp-eval runs more)."""
    from ptp_ros.vlm.loading import LoadOptions, load_adapter

    if not (path / "config.json").is_file():
        pytest.skip(f"no trained proxy checkpoint is shipped in {path.name} (docs/accuracy/README.md)")
    assert sum(p.stat().st_size for p in path.glob("*.safetensors")) < 25e6
    results = Results()
    methods = methods or [Row("uniform", Configured("uniform_cls"))]
    evaluator = Evaluator(load_adapter(path, LoadOptions(device="cpu")), methods, ratios)
    for k in range(scenes):
        scene = make_scene(split_seed("test", k))
        evaluator.scene(scene, make_questions(scene), results)
    return results


def test_shipped_proxy_model_solves_the_task_and_is_a_valid_instrument():
    """The shipped checkpoint answers the task with all tokens, and what it answers depends on the visual
    tokens that reach its deeper layers: with none after layer 2 (where the default prunes) it falls far
    below (issue 19's validity rule: >= 25 points on validation; measured 85.3 against 25.0 there)."""
    from ptp_ros.vlm.defaults import PROXY_MODEL, default_model_path

    none_after_2 = Row("no-visual-after-2", Configured("no_visual_in_llm", {"k": 2}), group="control")
    results = _shipped_model_results(PROXY_MODEL, (1.0, 0.111), [none_after_2])
    assert default_model_path() == PROXY_MODEL
    full, blind = results.correct[(FULL, 1.0)], results.correct[("no-visual-after-2", 0.111)]
    assert sum(full) / len(full) >= 0.7
    assert sum(blind) / len(blind) <= sum(full) / len(full) - 0.25


def test_shipped_qwen3_proxy_reads_its_visual_tokens_after_layer_2():
    """The shipped proxy Qwen3-VL (DeepStack) answers from the visual tokens its deeper layers read: with none
    after layer 2 it falls far below all tokens (ptp-eval on 40 test scenes: 55.6 % against 29.0 %; it is a
    weak model, at its answer priors on colour and count, docs/accuracy/README.md)."""
    from ptp_ros.vlm.defaults import PROXY_QWEN3_MODEL

    none_after_2 = Row("no-visual-after-2", Configured("no_visual_in_llm", {"k": 2}), group="control")
    results = _shipped_model_results(PROXY_QWEN3_MODEL, (1.0, 0.111), [none_after_2], scenes=5)
    full, blind = results.correct[(FULL, 1.0)], results.correct[("no-visual-after-2", 0.111)]
    assert sum(full) / len(full) >= 0.45
    assert sum(blind) / len(blind) <= sum(full) / len(full) - 0.15


def test_shipped_qwen_proxy_solves_the_task_and_needs_its_resolution():
    """The shipped proxy Qwen2.5-VL answers the task with all tokens, and reading the image at 1/9 of its
    tokens (the max_pixels baseline at 11.1 %) costs it accuracy: the baseline is a real one."""
    from ptp_ros.vlm.defaults import PROXY_QWEN_MODEL

    results = _shipped_model_results(PROXY_QWEN_MODEL, (1.0, 0.111))
    full, small = results.correct[(FULL, 1.0)], results.correct[(DOWNSCALED, 0.111)]
    # ptp-eval on the 600 test scenes: 66.3 % with all tokens, 54–55 % at 1/9 of the tokens (the model is
    # weaker than the LLaVA-NeXT proxy: its vision stage reached a 0.53 token class accuracy, see the docs)
    assert sum(full) / len(full) >= 0.55
    assert sum(small) / len(small) <= sum(full) / len(full) - 0.05
