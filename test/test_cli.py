"""``ptp-ask`` as a user runs it: answers, JSON, saliency image, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import pytest

from ptp_ros.cli import ask_main

SAMPLE = "ptp_ros/data/sample_scene.jpg"


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)


def test_json_answer_and_saliency(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "saliency.png"
    rc = ask_main(
        [
            SAMPLE,
            "where is the red circle?",
            "--model",
            str(tiny_model_dir),
            "--keep-ratio",
            "0.25",
            "--json",
            "--saliency",
            str(out),
            "--max-new-tokens",
            "3",
        ]
    )
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert data["visual_tokens_total"] == 1948 and data["visual_tokens_kept"] == 487
    assert data["keep_ratio"] == 0.25 and sum(q["kept"] for q in data["quotas"]) == 487
    assert set(data["latency_ms"]) >= {"encode", "score", "select", "prefill", "decode"}
    image = cv2.imread(str(out))
    assert image.shape == (1080, 1920, 3)


def test_camera_views_share_one_budget(tiny_model_dir, tmp_path, capsys):
    """Two ``--image NAME=PATH`` views: one prompt, one budget split equally, one saliency image per view."""
    sample = cv2.imread(SAMPLE)
    for name, frame in {"head": sample[:, :960], "wrist": sample[300:780, 900:1540]}.items():
        cv2.imwrite(str(tmp_path / f"{name}.png"), cv2.resize(frame, (frame.shape[1] // 3, frame.shape[0] // 3)))
    views = [arg for name in ("head", "wrist") for arg in ("--image", f"{name}={tmp_path / name}.png")]
    args = ["what colour?", *views, "--model", str(tiny_model_dir), "--keep-ratio", "0.2", "--view-split", "equal"]
    assert ask_main([*args, "--json", "--max-new-tokens", "1", "--saliency", str(tmp_path / "s.png")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [v["name"] for v in data["views"]] == ["head", "wrist"]
    assert (
        sum(v["kept"] for v in data["views"]) == data["visual_tokens_kept"] == round(0.2 * data["visual_tokens_total"])
    )
    assert abs(data["views"][0]["kept"] - data["views"][1]["kept"]) <= 1
    assert cv2.imread(str(tmp_path / "s.head.png")).shape == (360, 320, 3)
    assert cv2.imread(str(tmp_path / "s.wrist.png")).shape == (160, 213, 3)


def test_token_budget_and_plain_answer(tiny_model_dir, capsys):
    assert (
        ask_main(
            [
                SAMPLE,
                "what is there?",
                "--model",
                str(tiny_model_dir),
                "--tokens",
                "100",
                "--json",
                "--max-new-tokens",
                "2",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["visual_tokens_kept"] == 100
    assert ask_main([SAMPLE, "what is there?", "--model", str(tiny_model_dir), "--max-new-tokens", "2"]) == 0
    text = capsys.readouterr().out
    assert text.strip() and not text.lstrip().startswith("{")


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.jpg", "hi"], "image not found"),
        (["setup.py", "hi"], "cannot read image"),
        ([SAMPLE, "   "], "instruction is empty"),
        ([SAMPLE, "hi", "--keep-ratio", "1.5"], "keep_ratio must be in (0, 1]"),
        ([SAMPLE, "hi", "--keep-ratio", "0.5", "--tokens", "3"], "not allowed with"),
        ([SAMPLE, "hi", "--model", "/no/such/model"], "not found"),
        ([SAMPLE, "hi", "--selector", "magic"], "unknown selector"),
        ([SAMPLE, "hi", "--selector", "fastv", "--alpha", "0.3"], "fastv has no option(s) alpha; known: k"),
        ([SAMPLE, "hi", "--selector", "divprune", "--alpha", "0.5"], "divprune has no option(s) alpha"),
        ([SAMPLE, "hi", "--alpha", "2"], "alpha must be in [0, 1], got 2.0"),
        ([SAMPLE, "hi", "--probe-candidates", "3"], "probe_candidates narrows PTP's relevance probe"),
        ([SAMPLE, "hi", "--saliency", "/no/such/dir/x.png"], "does not exist"),
        ([SAMPLE, "hi", "--image", f"head={SAMPLE}"], "give one image, or camera views"),
        (["hi", "--image", f"head={SAMPLE}", "--image", f"head={SAMPLE}"], "camera names must differ"),
        (["hi", "--image", "head"], "expected NAME=PATH"),
        (["hi", "--image", f"head={SAMPLE}", "--view-split", "uneven"], "invalid choice: 'uneven'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny_model_dir, capsys, args, message):
    if "--model" not in args:
        args = [*args, "--model", str(tiny_model_dir)]
    assert exit_code(args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_an_option_the_selector_does_not_take_is_refused_by_the_configured_selector(capsys):
    """``--alpha 0.5`` is PTP's default value, and still refused for FastV: the configured selector knows the option
    was given.  Refused before any model loads (the model path does not exist)."""
    assert exit_code([SAMPLE, "hi", "--selector", "fastv", "--alpha", "0.5", "--model", "/no/such/model"]) == 2
    err = capsys.readouterr().err
    assert err == "ptp-ask: error: fastv has no option(s) alpha; known: k\n"


def exit_code(args: list[str]) -> int:
    """What the shell would see: argparse leaves by SystemExit, everything else by return value."""
    try:
        return ask_main(args)
    except SystemExit as exc:
        return int(exc.code)


def test_console_script_uses_the_built_in_model(tmp_path):
    """The README's command: no --model and no budget, so the built-in model at 11.1 % of the visual tokens."""
    env = {"PTP_ROS_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ptp_ros.cli",
            SAMPLE,
            "what colour is the circle?",
            "--json",
            "--max-new-tokens",
            "2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["visual_tokens_kept"] == round(0.111 * data["visual_tokens_total"])
    assert done.stderr == ""
