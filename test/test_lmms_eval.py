"""``lmms-eval --model ptp_ros``: the real lmms-eval CLI, offline, on proxy frames through the local
``ptp_frames`` task, scores each question as ``ptp-eval --data`` does and reports the kept tokens and
timings beside the score; bad model_args and bad data are one line.

lmms-eval is installed by ``bash bench/lmms/install.sh`` (CI runs it); without it these tests skip.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ptp_ros.proxy.demo import write_jsonl
from ptp_ros.vlm.defaults import PROXY_MODEL

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("lmms_eval") is None,
    reason="lmms-eval is not installed (bash bench/lmms/install.sh; CI installs it)",
)

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "bench" / "lmms_tasks"
RATIO = 0.111


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> Path:
    """One proxy scene, one question of each type: PNG frames and data.jsonl (ptp-eval --data's format).  (Each
    question is answered twice per model, by lmms-eval and by the reference, one encode each.)"""
    return write_jsonl(tmp_path_factory.mktemp("frames"), count=1, per_type=1)


def lmms_eval(args: list[str], cwd: Path, env: dict | None = None, tasks: Path = TASKS) -> subprocess.CompletedProcess:
    """The lmms-eval CLI as a user runs it, offline, with ``tasks`` (default: ``ptp_frames``'s folder) on the
    task path."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PTP_FRAMES_")},
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(cwd / "hf-datasets"),
        **(env or {}),
    }
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "lmms_eval",
            "--model",
            "ptp_ros",
            "--include_path",
            str(tasks),
            "--verbosity",
            "INFO",
            *args,
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def ptp_eval_data(model: Path, data: Path, out: Path) -> tuple[float, dict[str, dict]]:
    """The reference: ``ptp-eval --data``'s PTP row at RATIO, its accuracy and each item's answer."""
    from ptp_ros_bench.accuracy import main

    assert (
        main(
            [
                "--data",
                str(data),
                "--model",
                str(model),
                "--methods",
                "ptp",
                "--ratios",
                str(RATIO),
                "--max-new-tokens",
                "1",
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    return (
        results["methods"]["ptp"]["ratios"][f"{RATIO:g}"]["accuracy"],
        {a["item"]: a for a in answers if a["row"] == "ptp" and a["keep_ratio"] == RATIO},
    )


def only(pattern: str, folder: Path) -> Path:
    (found,) = folder.rglob(pattern)
    return found


def test_lmms_eval_scores_frames_as_ptp_eval_data(frames, tmp_path):
    """Through the real CLI and the entry point: the same answer, right or wrong, and the same kept tokens
    for every question as ``ptp-eval --data``, hence the same accuracy; ~11.1 % kept, reported per sample
    (``--log_samples``), as means in the results' ``throughput`` block, in the stats file and in the log.
    The data file is named in a task YAML of the user's own (``include``; PTP_FRAMES_DATA, the other spelling,
    goes through the real CLI in test_cli_bad_model_arg_is_one_line).  One family: the plugin hands frames to
    ``Pipeline.answer`` and knows no model internals, and ``ptp-eval --data`` equals ``ptp-eval`` for each
    family (test_eval_data.py)."""
    model = PROXY_MODEL
    items = [json.loads(line) for line in frames.read_text().splitlines()]
    out = tmp_path / "lmms"
    stats = tmp_path / "stats.jsonl"
    model_args = f"pretrained={model},selector=ptp,keep_ratio={RATIO},max_new_tokens=1,device=cpu,stats_file={stats}"
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "my_frames.yaml").write_text(
        f"include: {TASKS / 'ptp_frames' / 'ptp_frames.yaml'}\n"
        f"task: my_frames\ndataset_kwargs:\n  data_files: {frames}\n"
    )
    task = "my_frames"  # only the user's folder on the task path
    run = lmms_eval(
        ["--model_args", model_args, "--tasks", task, "--output_path", str(out), "--log_samples"], tmp_path, {}, tasks
    )
    log = run.stdout + run.stderr
    assert run.returncode == 0 and "Error during evaluation" not in log, log[-4000:]
    results = json.loads(only("*_results.json", out).read_text())
    samples = sorted(
        (json.loads(line) for line in only(f"*_samples_{task}.jsonl", out).read_text().splitlines()),
        key=lambda s: s["doc_id"],
    )
    assert len(samples) == len(items)

    accuracy, reference = ptp_eval_data(model, frames, tmp_path / "ptp-eval")
    for sample in samples:
        item = items[sample["doc_id"]]
        ref = reference[item["id"]]
        assert sample["filtered_resps"] in (ref["prediction"], [ref["prediction"]]), (item, sample, ref)
        assert sample["accuracy"] == float(ref["correct"]), (item, sample, ref)
        (counts,) = sample["token_counts"]
        assert counts["visual_tokens_kept"] == ref["kept"], (item, counts, ref)
        assert counts["keep_ratio"] == pytest.approx(RATIO, abs=0.01) and counts["latency_ms"]["total"] > 0
    score = results["results"][task]["accuracy,none"]
    assert score == pytest.approx(sum(float(reference[i["id"]]["correct"]) for i in items) / len(items))
    assert score == pytest.approx(accuracy, abs=1e-4)
    assert score > 0.3  # answers, not noise

    throughput = results["throughput"]
    assert throughput["avg_keep_ratio"] == pytest.approx(RATIO, abs=0.01)
    assert 0 < throughput["avg_visual_tokens_kept"] < throughput["avg_visual_tokens_total"]
    assert throughput["avg_prefill_ms"] > 0 and throughput["avg_total_ms"] > 0
    lines = sorted((json.loads(line) for line in stats.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in lines] == list(range(len(items)))
    for line, sample in zip(lines, samples):
        assert line["task"] == task and sample["filtered_resps"] in (line["answer"], [line["answer"]])
        assert line["visual_tokens_total"] > line["visual_tokens_kept"] > 0 and line["latency_ms"]["encode"] > 0
    assert any(
        f"ptp_ros: {len(items)} answers, ptp kept" in line and "(11.1 %)" in line and "prefill" in line
        for line in log.splitlines()
    ), log[-4000:]


def test_cli_bad_model_arg_is_one_line(frames, tmp_path):
    """lmms-eval prints the exception it caught; ours is one line, named, before any model loads."""
    run = lmms_eval(
        [
            "--model_args",
            f"pretrained={PROXY_MODEL},selector=ptpp",
            "--tasks",
            "ptp_frames",
            "--output_path",
            str(tmp_path / "out"),
        ],
        tmp_path,
        {"PTP_FRAMES_DATA": str(frames)},
    )
    lines = [line for line in (run.stdout + run.stderr).splitlines() if "Error during evaluation" in line]
    assert len(lines) == 1 and "ptp_ros: unknown selector 'ptpp'; known: ptp, " in lines[0], run.stderr[-3000:]
    assert not list((tmp_path / "out").rglob("*_results.json"))


@pytest.fixture(scope="module")
def plugin():
    from ptp_ros.integrations import lmms

    return lmms


@pytest.mark.parametrize(
    "args, message",
    [
        ({"selector": "nope"}, "unknown selector 'nope'; known: ptp, "),
        ({"keep_ratio": 0}, "keep_ratio must be in (0, 1], got 0"),
        ({"keep_ratio": 1.5}, "keep_ratio must be in (0, 1], got 1.5"),
        ({"keep_ratio": "half"}, "keep_ratio must be a number, got 'half'"),
        ({"keep_ratio": 0.5, "tokens": 64}, "give keep_ratio or tokens, not both"),
        ({"tokens": 0}, "tokens must be a whole number >= 1, got 0"),
        ({"alpha": 2.0}, "alpha must be in [0, 1], got 2.0"),
        ({"alpha": 0.5, "selector": "divprune"}, "divprune has no option(s) alpha"),
        ({"probe_candidates": 3}, "probe_candidates narrows PTP's relevance probe before the LLM"),
        ({"prune_in_llm": "maybe"}, "prune_in_llm must be true or false, got 'maybe'"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1, got 0"),
        ({"temperature": 0.7}, "unknown model_args temperature; known: pretrained, selector"),
        ({"pretrained": "/nonexistent/ckpt"}, "model '/nonexistent/ckpt' not found"),
        ({"dtype": "float13"}, "unknown dtype 'float13'"),
    ],
)
def test_bad_model_args_are_one_line(plugin, args, message):
    with pytest.raises(plugin.PTPRosError) as error:
        plugin.PTPRos(**{"pretrained": str(PROXY_MODEL), "device": "cpu", **args})
    text = str(error.value)
    assert text.startswith("ptp_ros: ") and message in text and "\n" not in text, text


def test_no_budget_is_ptp_asks_default(plugin):
    """``--model_args pretrained=DIR`` alone prunes as ``ptp-ask`` does: 11.1 % of the visual tokens."""
    assert plugin.PTPRos(pretrained=str(PROXY_MODEL), device="cpu").keep_ratio == pytest.approx(0.111)
    assert plugin.PTPRos(pretrained=str(PROXY_MODEL), device="cpu", tokens=64).keep_ratio is None


def test_missing_model_dir_is_one_line(plugin, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(plugin.PTPRosError, match=r"^ptp_ros: .*empty has no config.json") as error:
        plugin.PTPRos(pretrained=str(tmp_path / "empty"))
    assert "\n" not in str(error.value)


def test_requests_need_one_image(plugin):
    import numpy as np
    from PIL import Image

    rgba = Image.new("RGBA", (32, 20), (10, 20, 30, 40))
    image = plugin._image([rgba], "t document 0")
    assert image.dtype == np.uint8 and image.shape == (20, 32, 3) and tuple(image[0, 0]) == (10, 20, 30)
    for visuals, message in [
        ([], "t document 0 has no image (a text-only document)"),
        (None, "t document 0 has no image"),
        ([rgba, rgba], "t document 0 has 2 images or frames"),
        (["clip.mp4"], "t document 0 gives a file path ('clip.mp4'"),
        ([3], "t document 0 gives a int, not an image"),
    ]:
        with pytest.raises(plugin.PTPRosError, match=message.replace("(", r"\(").replace(")", r"\)")):
            plugin._image(visuals, "t document 0")
    assert plugin._cut_at("red\n\nblue", ["\n\n"]) == "red" and plugin._cut_at("red", None) == "red"


def test_generate_until_with_a_token_budget(plugin, frames, tmp_path):
    """In process, as lmms-eval calls it: ``tokens`` keeps that many, the task's max_new_tokens wins over the
    model_arg, ``until`` cuts the text, sampling settings are ignored with one warning; a document that is not
    one image stops the run, or with ``skip_unsupported`` gets an empty answer."""
    from types import SimpleNamespace

    from PIL import Image

    item = json.loads(frames.read_text().splitlines()[0])
    stats = tmp_path / "stats" / "s.jsonl"
    model = plugin.PTPRos(
        pretrained=str(PROXY_MODEL),
        device="cpu",
        tokens=256,
        max_new_tokens=8,
        skip_unsupported="true",
        stats_file=str(stats),
    )
    model.task_dict = {"t": {"test": [item, {**item, "image": [item["image"]] * 2}]}}

    def visual(doc):
        images = doc["image"] if isinstance(doc["image"], list) else [doc["image"]]
        return [Image.open(frames.parent / image) for image in images]

    gen = {"max_new_tokens": 1, "until": ["\n\n"], "temperature": 0.7, "do_sample": True}
    requests = [SimpleNamespace(args=(item["question"], gen, visual, doc, "t", "test")) for doc in (0, 1)]
    result, skipped = model.generate_until(requests)
    assert result.text == item["answers"][0] and result.token_counts.output_tokens == 1
    counts = result.token_counts.to_dict()
    assert counts["visual_tokens_kept"] == 256 < counts["visual_tokens_total"] and counts["latency_ms"]["total"] > 0
    assert counts["input_tokens"] > counts["visual_tokens_kept"]
    assert skipped.text == "" and skipped.token_counts is None
    assert model._warned == {"decoding", "skip"}
    first, second = (json.loads(line) for line in stats.read_text().splitlines())
    assert first["visual_tokens_kept"] == 256 and first["answer"] == result.text
    assert second["doc_id"] == 1 and "t document 1 has 2 images or frames" in second["skipped"]
    model.skip_unsupported = False
    with pytest.raises(plugin.PTPRosError, match="^ptp_ros: t document 1 has 2 images or frames; ptp_ros answers"):
        model.generate_until(requests[1:])
    with pytest.raises(plugin.PTPRosError, match="loglikelihood .* is not supported"):
        model.loglikelihood(requests)


def test_task_data_faults_are_one_line(frames, tmp_path, monkeypatch):
    """The task reads its items with ptp-eval --data's loader: its faults are one line; a task YAML of the
    user's own names the file relative to itself and sets the prompt; with no file named, the bundled frames."""
    spec = importlib.util.spec_from_file_location("ptp_frames_utils", TASKS / "ptp_frames" / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    monkeypatch.delenv("PTP_FRAMES_DATA", raising=False)
    assert utils.data_file({}) == REPO / "bench" / "data" / "frames" / "data.jsonl"
    assert len(utils.frames_dataset()["test"]) == 28
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "nope.png", "question": "q ?", "answers": ["a"]}\n')
    monkeypatch.setenv("PTP_FRAMES_DATA", str(bad))
    with pytest.raises(utils.FramesTaskError, match=r"^ptp_frames: .*bad.jsonl:1: image 'nope.png' not found"):
        utils.frames_dataset()
    (tmp_path / "garbage.png").write_bytes(b"not an image")
    with pytest.raises(utils.FramesTaskError, match="garbage.png: not an image OpenCV can read"):
        utils.doc_to_visual({"image": str(tmp_path / "garbage.png")})
    monkeypatch.setenv("PTP_FRAMES_MATCH", "fuzzy")
    with pytest.raises(utils.FramesTaskError, match="PTP_FRAMES_MATCH='fuzzy'; use one of exact, normalised"):
        utils.frames_dataset({"data_files": str(frames)})
    monkeypatch.delenv("PTP_FRAMES_MATCH")
    for prompt in ("Answer briefly.", "{question} {0}", 3):
        with pytest.raises(utils.FramesTaskError, match="ptp_frames: prompt .* is not a template of {question}"):
            utils.check_prompt(prompt)

    from lmms_eval.utils import load_yaml_config

    (frames.parent / "mine.yaml").write_text(
        f"include: {TASKS / 'ptp_frames' / 'ptp_frames.yaml'}\ntask: mine\ndataset_kwargs: {{data_files: data.jsonl}}\n"
        "lmms_eval_specific_kwargs: {default: {prompt: '{question} Answer in one word.'}}\n"
    )
    config = load_yaml_config(str(frames.parent / "mine.yaml"))
    docs = utils.frames_dataset(config["dataset_kwargs"])["test"]  # the YAML's file wins over the variable
    assert [d["id"] for d in docs] == [json.loads(line)["id"] for line in frames.read_text().splitlines()]
    assert Path(docs[0]["image"]).is_absolute() and utils.doc_to_visual(docs[0])[0].mode == "RGB"
    assert utils.doc_to_text(docs[0]) == docs[0]["question"]
    kwargs = config["lmms_eval_specific_kwargs"]["default"]
    assert utils.doc_to_text(docs[0], kwargs) == docs[0]["question"] + " Answer in one word."
    assert utils.process_results(docs[0], [f" {docs[0]['answers'][0].upper()}."]) == {"accuracy": 1.0}
    assert utils.process_results(docs[0], ["no idea"]) == {"accuracy": 0.0}


def test_importing_ptp_ros_never_imports_lmms_eval():
    code = (
        "import sys, ptp_ros, ptp_ros.pipeline, ptp_ros.integrations, ptp_ros.integrations.lmms_manifest; "
        "assert 'lmms_eval' not in sys.modules, 'lmms_eval imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
