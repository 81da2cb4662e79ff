"""ptp-demo end to end: agent, camera and planner as three processes over DDS, as the README runs it."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from ros_helpers import ros_env

pytest.importorskip("rclpy", reason="ROS 2 rclpy is not installed (pip install -e .[ros])")


def test_demo_runs_to_completion(tmp_path):
    env = ros_env(tmp_path / "ros_log")
    out = tmp_path / "saliency"
    proc = subprocess.run([sys.executable, "-m", "ptp_ros.ros.demo", "--questions", "2", "--out", str(out),
                           "--agent-log", str(tmp_path / "agent.log")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=420)
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
