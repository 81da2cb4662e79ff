"""The prepared GPU check runs end to end (here on the CPU, on the tiny model): keep-all = stock generate,
then ptp-eval --data on the bundled frames; a model that does not load is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ptp_ros.vlm.defaults import PROXY_QWEN_MODEL
from ptp_ros_bench import equivalence
from ptp_ros_bench.accuracy.dataset import load_items

ROOT = Path(__file__).resolve().parents[1]


def test_bundled_frames_are_a_valid_data_file():
    items = load_items(ROOT / "bench" / "data" / "frames" / "data.jsonl")
    assert len(items) == 28 and {i.qtype for i in items} == {"colour", "presence", "count", "location"}


def test_equivalence_holds_on_the_qwen_proxy_and_reports_each_frame(tmp_path, capsys):
    out = tmp_path / "eq.json"
    assert (
        equivalence.main(
            [
                "--model",
                str(PROXY_QWEN_MODEL),
                "--frames",
                "1",
                "--max-new-tokens",
                "4",
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert report["all_equal"] and len(report["frames"][0]["stock"]) == 4
    assert "keep-all = stock generate on 1 frame(s): yes" in capsys.readouterr().out
    assert equivalence.main(["--model", str(tmp_path / "absent"), "--device", "cpu"]) == 2
    assert "not found" in capsys.readouterr().err


def test_gpu_check_script_runs_through_on_the_cpu(tmp_path):
    env = {
        **os.environ,
        "DEVICE": "cpu",
        "DTYPE": "float32",
        "SKIP_BENCH": "1",
        "RATIOS": "0.111",
        "METHODS": "ptp",
        "LIMIT": "6",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    run = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "tiny", str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "keep-all = stock generate: yes" in run.stdout
    assert json.loads((tmp_path / "out" / "equivalence.json").read_text())["all_equal"]
    results = json.loads((tmp_path / "out" / "eval" / "results.json").read_text())
    assert results["methods"]["ptp"]["ratios"]["0.111"]["n"] == 6
    assert results["all_tokens"]["latency_ms"]["total"] > 0
