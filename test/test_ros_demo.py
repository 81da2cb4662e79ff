"""ptp-demo end to end: agent, camera and planner as three processes over DDS, as the README runs it."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from ros_helpers import ros_env

pytest.importorskip("rclpy", reason="ROS 2 rclpy is not installed (pip install -e .[ros])")


def _tiny_checkpoint(family: str, root) -> list[str]:
    """``--model-path`` arguments for a tiny checkpoint of ``family`` (none: the built-in default)."""
    if family == "built-in":
        return []
    from ptp_ros.testing.common import FIXTURES

    fixture = FIXTURES[family]
    return ["--model-path", str(fixture.build(root / family, **fixture.test_overrides))]


#: The built-in model (a trained LLaVA-NeXT) and one family of another kind (no [CLS], M-RoPE): the node knows
#: nothing of model internals, so two kinds show that only ``model_path`` changes; every family's pipeline is
#: tested in-process (test_families.py, test_in_llm.py), each demo run here costs three processes.
DEMO_MODELS = ["built-in", "qwen2_5_vl"]
#: ``--scene`` per model: the built-in model picks a proxy scene itself (``auto``); one tiny family is shown a
#: proxy scene by ``--scene proxy``, the others the sample clip (``auto`` with a ``--model-path``).
SCENES = {"built-in": "auto", "qwen2_5_vl": "proxy"}


@pytest.mark.parametrize("family", DEMO_MODELS)
def test_demo_runs_to_completion(tmp_path, family):
    """The same node serves another model family; only its ``model_path`` parameter changes.  On a proxy scene
    (the built-in model's own choice, or ``--scene proxy``) the planner asks that scene's questions and prints
    the expected answers.  One demo run per model: each starts an agent, a camera and a planner."""
    env = ros_env(tmp_path / "ros_log")
    out = tmp_path / "saliency"
    scene = SCENES.get(family, "auto")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ptp_ros.ros.demo",
            "--questions",
            "2",
            "--scene",
            scene,
            "--out",
            str(out),
            "--agent-log",
            str(tmp_path / "agent.log"),
            *_tiny_checkpoint(family, tmp_path),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=420,
    )
    log = (tmp_path / "agent.log").read_text(errors="replace")
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{log[-3000:]}"
    answered = re.findall(r"^\[q(\d)\] ([\d.]+) s \(budget .*\) keep ([\d.]+)%", proc.stdout, re.M)
    assert [q for q, _, _ in answered] == ["1", "2"], proc.stdout
    assert "2/2 answered" in proc.stdout
    images = sorted(out.glob("saliency_*.jpg"))
    assert images and all(f"saliency: {p}" in proc.stdout for p in images)
    assert "calibrated in" in log
    for problem in ("Traceback", "terminate called", "Fatal Python error"):
        assert problem not in proc.stderr + log, proc.stderr + log[-3000:]
    from ptp_ros.ros.planner import proxy_questions

    expected = [
        f"Q: {q['text']}" in proc.stdout and f"(expected {q['expected']!r})" in proc.stdout
        for q in proxy_questions(0)[:2]
    ]
    assert expected == ([True, True] if family in SCENES else [False, False]), proc.stdout
