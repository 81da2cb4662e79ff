"""``ptp-eval --data``: a user's labelled frames scored through ``Pipeline.answer`` give, question for
question, what ``ptp-eval`` scores on the same proxy scenes; the run resumes from its cache; bad input is
one clear line."""

from __future__ import annotations

import json

import pytest

from ptp_ros.proxy import make_questions, make_scene, split_seed
from ptp_ros.proxy.demo import write_jsonl
from ptp_ros.vlm.defaults import PROXY_MODEL, PROXY_QWEN_MODEL
from ptp_ros.vlm.loading import LoadOptions, load_adapter
from ptp_ros_bench.accuracy import main
from ptp_ros_bench.accuracy.data_runner import AnswerCache, DataEvaluator
from ptp_ros_bench.accuracy.dataset import DataError, load_items
from ptp_ros_bench.accuracy.matching import matches, normalise
from ptp_ros_bench.accuracy.methods import comparison_methods, pick_methods, with_controls
from ptp_ros_bench.accuracy.runner import Evaluator, Results

SCENES = 1  # one question of each type; every answer of --data encodes its frame again (0.8 s on Qwen2.5-VL)
#: (model, rows, ratios, questions): LLaVA-NeXT runs every peer at two ratios on every question; Qwen2.5-VL (its
#: encodes are 3× dearer) the family's own rows — PTP, the controls, the max_pixels row — at one ratio on the
#: first three questions: the runner's peers are family-blind, its rows are not.
CASES = {
    "llava_next": (PROXY_MODEL, ["ptp", "fastv", "divprune", "hired"], (1.0, 0.111, 0.056), None),
    "qwen2_5_vl": (PROXY_QWEN_MODEL, ["ptp"], (1.0, 0.111), 3),
}


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("frames"), count=SCENES, per_type=1)


@pytest.mark.parametrize("case", CASES)
def test_data_mode_scores_each_question_as_ptp_eval_does(case, frames, tmp_path):
    """Exported PNG frames through Pipeline.answer (one answer at a time, as the node) against ptp-eval's
    shared-prefix batches on the scenes themselves: the same right and wrong answers and kept shares in every
    cell, the max_pixels row of Qwen2.5-VL and the control rows (random before the LLM, random / no visual token
    after layer 2) included."""
    model, names, ratios, questions = CASES[case]
    adapter = load_adapter(model, LoadOptions(device="cpu"))
    methods = with_controls(pick_methods(comparison_methods(), names), 2)
    assert {m.label for m in methods} >= {"random", "random-after-2", "no-visual-after-2"}
    proxy = Results()
    evaluator = Evaluator(adapter, methods, ratios)
    for k in range(SCENES):
        scene = make_scene(split_seed("test", k))
        evaluator.scene(scene, make_questions(scene, 1)[:questions], proxy)
    mine = Results()
    data = DataEvaluator(adapter, methods, ratios, AnswerCache(tmp_path / "cache.jsonl", {}), 1, "normalised")
    data.run(load_items(frames)[:questions], mine, lambda *_: None)
    assert mine.qtypes == proxy.qtypes
    keys = [key for key in proxy.correct if key[1] > 0]  # not the global view only: no such row in --data
    assert len(keys) == 1 + len(ratios[1:]) * (len(methods) + evaluator.downscales)
    for key in keys:
        assert mine.correct[key] == proxy.correct[key], key
        assert mine.kept_ratio[key] == pytest.approx(proxy.kept_ratio[key]), key
    assert 0.3 < sum(mine.correct[("ptp", 0.111)]) / len(mine.qtypes)  # answers, not noise


def test_cli_resumes_from_its_cache_and_rematches_without_rerunning(frames, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--data", str(frames), "--methods", "ptp", "divprune", "--max-new-tokens", "1", "--out", str(out)]
    assert main(base + ["--ratios", "0.111"]) == 0
    items = len(load_items(frames))
    # all tokens, the two methods and the three controls they need: random before the LLM (DivPrune's), random
    # and no visual token after layer 2 (PTP's default)
    assert f"({6 * items} answers computed, 0 from the cache)" in capsys.readouterr().out
    first = json.loads((out / "results.json").read_text())
    # an interrupted run leaves a cut last line: skipped with a warning, that answer is computed again
    cache = out / "cache.jsonl"
    cache.write_text(cache.read_text() + '{"settings": "cut')
    assert main(base + ["--ratios", "0.111", "0.25"]) == 0
    captured = capsys.readouterr()
    assert "unreadable cache line skipped" in captured.err
    assert f"({5 * items} answers computed, {6 * items} from the cache)" in captured.out  # only the new ratio
    second = json.loads((out / "results.json").read_text())
    assert second["methods"]["ptp"]["ratios"]["0.111"] == first["methods"]["ptp"]["ratios"]["0.111"]
    assert set(second["methods"]["ptp"]["ratios"]) == {"1.0", "0.25", "0.111"}
    assert second["all_tokens"]["latency_ms"]["total"] > 0
    assert "## Latency per answer on cpu" in (out / "results.md").read_text()
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    rows = {"all tokens", "ptp", "DivPrune", "random", "random-after-2", "no-visual-after-2"}
    assert len(answers) == 11 * items and {a["row"] for a in answers} == rows
    assert set(second["controls"]) == rows - {"all tokens", "ptp", "DivPrune"}
    assert second["methods"]["DivPrune"]["ratios"]["0.25"]["gain_over_control"]["control"] == "random"
    # another matching rule re-scores the cached answers: nothing is computed
    assert main(base + ["--ratios", "0.111", "0.25", "--match", "exact"]) == 0
    assert f"(0 answers computed, {11 * items} from the cache)" in capsys.readouterr().out


def test_cli_data_faults_are_one_line(frames, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    image = frames.parent / "images" / "proxy_test_0000.png"
    cases = {
        '{"image": "nope.png", "question": "q ?", "answers": ["a"]}\n': "bad.jsonl:1: image 'nope.png' not found",
        f'{{"image": "{image}", "question": "q ?", "answers": ["a"]}}\n{{"image": \n': "bad.jsonl:2: not a JSON object",
        f'{{"image": "{image}", "question": "", "answers": ["a"]}}\n': "bad.jsonl:1: 'question' must be",
        f'{{"image": "{image}", "question": "q ?", "answers": []}}\n': "bad.jsonl:1: 'answers' must be",
        f'{{"id": 1, "image": "{image}", "question": "q", "answers": ["a"]}}\n'
        f'{{"id": 1, "image": "{image}", "question": "q", "answers": ["a"]}}\n': "bad.jsonl:2: id '1' repeats line 1",
        "\n\n": "bad.jsonl: no items",
    }
    for text, message in cases.items():
        bad.write_text(text)
        assert main(["--data", str(bad), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image")
    bad.write_text(json.dumps({"image": "garbage.png", "question": "q ?", "answers": ["a"]}) + "\n")
    assert (
        main(
            [
                "--data",
                str(bad),
                "--methods",
                "ptp",
                "--ratios",
                "0.5",
                "--max-new-tokens",
                "1",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "garbage.png: not an image OpenCV can read" in capsys.readouterr().err
    assert main(["--data", str(frames), "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not found" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as exit_:
        main(["--data", str(frames), "--methods", "ptp", "tokenmerge"])
    assert exit_.value.code == 2 and "unknown method(s) 'tokenmerge'; known:" in capsys.readouterr().err


def test_answer_matching_rules():
    assert normalise("The answer is Two.") == "answer is 2" and normalise("3.5 cm!") == "3.5 cm"
    assert matches("Red.", ["red"]) and matches("a circle", ["circle"]) and not matches("Red.", ["red"], "exact")
    assert matches(" red ", ["red"], "exact") and not matches("red circle", ["red"])
    assert matches("the circle is red", ["blue", "red"], "contains") and not matches("reddish", ["red"], "contains")
    with pytest.raises(ValueError, match="unknown answer matching"):
        matches("a", ["a"], "fuzzy")


def test_items_default_their_id_and_type(tmp_path):
    image = tmp_path / "f.png"
    import cv2
    import numpy as np

    cv2.imwrite(str(image), np.zeros((20, 20, 3), np.uint8))
    (tmp_path / "d.jsonl").write_text('{"image": "f.png", "question": " q ? ", "answers": "yes"}\n')
    (item,) = load_items(tmp_path / "d.jsonl")
    assert (item.id, item.question, item.answers, item.qtype) == ("1", "q ?", ("yes",), "all")
    with pytest.raises(DataError, match="cannot read"):
        load_items(tmp_path / "absent.jsonl")


def test_ptp_eval_feeds_qwen3_vl_deepstack_as_pipeline_answer_does(tiny_checkpoint, frames, tmp_path):
    """Qwen3-VL's DeepStack on every row of ptp-eval's shared-prefix runner: with all tokens, pruned before the
    LLM (the kept tokens' rows only), inside it and in the controls (every token's rows below layer K, the kept
    ones' from K on) and down-scaled, each question's predicted token and kept share are those of
    ``Pipeline.answer`` (``--data``), which feeds DeepStack through the adapter's own generate."""
    # in-LLM rows prune at layer 1 of 3, so that a layer reads the DeepStack rows added from K on (at K = 2 only the
    # last layer's output would hold them, which the answer never reads)
    adapter = load_adapter(
        tiny_checkpoint("qwen3_vl"), LoadOptions(device="cpu"), max_pixels=128 * 32 * 32, llm_layer=1
    )
    picked = ["ptp", "ptp before the LLM (separate probe; the default before)", "divprune"]
    methods = with_controls(pick_methods(comparison_methods(), picked), adapter.options.llm_layer)
    assert {m.label for m in methods} >= {"random", "random-after-1", "no-visual-after-1"}
    ratios = (1.0, 0.25, 0.5)
    scene = make_scene(split_seed("test", 0))  # the scene of ``frames``, its questions in the same order
    proxy = Results()
    Evaluator(adapter, methods, ratios).scene(scene, make_questions(scene, 1), proxy)
    data = DataEvaluator(adapter, methods, ratios, AnswerCache(tmp_path / "cache.jsonl", {}), 1, "exact")
    data.run(load_items(frames), Results(), lambda *_: None)
    decode = adapter.processor.tokenizer.decode
    answered = {(a["row"], a["keep_ratio"]): [] for a in data.answers}
    for a in data.answers:
        answered[(a["row"], a["keep_ratio"])].append((a["prediction"], a["kept"]))
    assert set(answered) == set(proxy.predicted) and len(answered) == 1 + 2 * (len(methods) + 1)  # + max_pixels
    n = proxy.visual_tokens[0]
    for key, expected in answered.items():
        predicted = [decode([t], skip_special_tokens=True).strip() for t in proxy.predicted[key]]
        assert predicted == [text for text, _ in expected], key
        assert proxy.kept_ratio[key] == pytest.approx([kept / n for _, kept in expected]), key
    # the comparison can tell rows apart: the answers are not all one token
    assert len({t for ids in proxy.predicted.values() for t in ids}) > 1
