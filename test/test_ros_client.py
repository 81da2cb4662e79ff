"""The package's client (``ptp_ros/ros/client.py``) against the real agent over DDS: the example docs/ros.md
shows, run as the page has it; a query that runs out of time cancels its goal; the client's own context and
spin thread end with it.  And its diagnostics parsing, without DDS."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from contextlib import suppress

import cv2
import pytest
from ros_helpers import AGENT_PARAMS, ROOT, NodeProcess, Probe

rclpy = pytest.importorskip("rclpy", reason="ROS 2 rclpy is not installed (pip install -e .[ros])")

from ptp_ros.ros.ask_action import STAGES  # noqa: E402
from ptp_ros.ros.client import AgentClient, AgentStatus  # noqa: E402

DELAY_S = 4.0  # each answer takes this much longer: a goal cancelled at once is still running (2 s was not
# always enough on two loaded cores: a CI run saw the cancel land after the answer)
STARTUP_S = 300.0
NODE = "/ptp_agent"


def doc_example() -> str:
    """The Python block of docs/ros.md's section "A client for your planner"."""
    section = (ROOT / "docs" / "ros.md").read_text().split("## A client for your planner\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def agent(ask_interface, ros, tmp_path_factory):  # after ask_interface: the node must find the action's package
    params = AGENT_PARAMS | {"max_new_tokens": 4, "max_frame_age_ms": 0.0}
    node = NodeProcess(ros, tmp_path_factory.mktemp("client") / "agent.log", params, generate_delay_s=DELAY_S)
    yield node
    assert node.stop() == 0, node.log()[-3000:]


@pytest.fixture(scope="module")
def camera(agent, sample_image):
    """A probe that has given the agent one camera frame (kept: max_frame_age_ms 0): the agent is ready."""
    probe = Probe()
    frame = cv2.resize(sample_image, (640, 360), interpolation=cv2.INTER_AREA)
    try:
        probe.wait_for(lambda: (s := probe.status(NODE)) and s.values["model_state"] == "serving", STARTUP_S, "serving")
        for _ in range(60):  # best effort: resent until the agent counts one
            probe.send_frame(frame, sec=int(time.time()))
            with suppress(TimeoutError):
                probe.wait_ready(3.0, NODE)
                break
        yield probe
    finally:
        probe.close()


def test_the_documented_example_runs_against_the_agent(camera):
    done = subprocess.run(
        [sys.executable, "-c", doc_example()], env=dict(os.environ), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    feedback = [line.split()[0] for line in lines if line.startswith("  ")]  # printed on the spin thread
    assert feedback == list(STAGES), lines
    status, query, first_goal, second_goal, topic = [line for line in lines if not line.startswith("  ")]
    assert status.startswith(f"{NODE}: "), lines
    assert re.fullmatch(r"ok .+ \d+ ms", query), lines
    assert first_goal.startswith(("'", '"')) and topic.startswith(("'", '"')), lines  # the answers' repr
    assert second_goal == "cancelled", lines  # cancelled while it ran


def test_a_query_out_of_time_raises_and_cancels_its_goal(camera):
    assert camera.wait_for_action(30)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="no result for goal 'late'"):
        camera.query("What is on the table?", timeout=0.5, request_id="late")
    assert time.monotonic() - started < 5.0
    result = camera.wait_for(lambda: camera.result("late"), 60, "the late goal's JSON result")
    assert result["status"] == "cancelled" and "its client cancelled it" in result["error"], result


def test_the_client_ends_its_spin_thread_and_context(ros):
    with AgentClient("short_lived") as client:
        with pytest.raises(TimeoutError, match="waiting for nothing"):
            client.wait_for(lambda: False, 0.3, "nothing")
    assert not client._spinner.is_alive() and not client.context.ok()
    client.close()  # twice is harmless


def test_diagnostics_are_parsed_for_agents_only():
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

    def status(name: str, level: bytes, **values: str) -> DiagnosticStatus:
        return DiagnosticStatus(
            name=name, level=level, message="m", values=[KeyValue(key=k, value=v) for k, v in values.items()]
        )

    array = DiagnosticArray(
        status=[
            status("/robot/ptp_agent: ptp agent", DiagnosticStatus.WARN, model_state="serving", frames_received="0"),
            status("/robot/camera: driver", DiagnosticStatus.ERROR),
        ]
    )
    array.header.stamp.sec, array.header.stamp.nanosec = 12, 500_000_000
    (parsed,) = AgentStatus.parse(array)
    assert (parsed.node, parsed.level, parsed.stamp) == ("/robot/ptp_agent", 1, 12.5)
    assert not parsed.ready  # serving, but no camera frame yet
    assert parsed.to_dict() == {"model_state": "serving", "frames_received": "0", "_level": 1, "_message": "m"}
