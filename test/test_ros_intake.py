"""The camera intake over DDS: compressed header bombs at 1 Hz leave the node's memory, diagnostics,
parameters and answers as they were; frames reach the node on its own intake thread.

The node runs in its own process (with the tiny model: the intake is under test), as on a robot; the test
process is the camera and the planner.  The issue's bombs: a valid 640x320 JPEG carrying 3 million empty
APP2 segments (12 MB; Pillow's header walk took 9.8 s and +406 MB on each) and a PNG carrying a million
empty chunks.
"""

from __future__ import annotations

import struct
import threading
import time
import zlib

import cv2
import numpy as np
import pytest
from ros_helpers import AGENT_PARAMS, NodeProcess, Probe

rclpy = pytest.importorskip("rclpy", reason="ROS 2 rclpy is not installed (pip install -e .[ros])")
psutil = pytest.importorskip("psutil")

NAMESPACE = "/intake_test"
FQN = f"{NAMESPACE}/ptp_agent"
PARAMS = AGENT_PARAMS | {"image_transport": "compressed", "max_frame_age_ms": 0.0}
BOMBS = 12  # one a second
RSS_SLACK = 200e6
DIAGNOSTICS_EVERY_S = 2.0


def jpeg_bomb(scene: np.ndarray) -> bytes:
    jpeg = cv2.imencode(".jpg", cv2.cvtColor(scene, cv2.COLOR_RGB2BGR))[1].tobytes()
    return jpeg[:2] + b"\xff\xe2\x00\x02" * 3_000_000 + jpeg[2:]


def png_flood(scene: np.ndarray) -> bytes:
    png = cv2.imencode(".png", cv2.cvtColor(scene, cv2.COLOR_RGB2BGR))[1].tobytes()
    idat = png.index(b"IDAT") - 4
    empty = struct.pack(">I", 0) + b"abCd" + struct.pack(">I", zlib.crc32(b"abCd"))
    return png[:idat] + empty * 1_000_000 + png[idat:]


@pytest.fixture(scope="module")
def agent(ros, tmp_path_factory, tiny_model_dir):
    params = {**PARAMS, "model_path": str(tiny_model_dir)}  # the intake is under test, not the model
    node = NodeProcess(ros, tmp_path_factory.mktemp("intake") / "agent.log", params, namespace=NAMESPACE)
    probe = Probe(namespace=NAMESPACE)
    try:
        probe.wait_for(
            lambda: (v := probe.diag_values(FQN)) and v["model_state"] == "serving" or node.proc.poll() is not None,
            600,
            "the agent serving",
        )
        assert node.proc.poll() is None, node.log()[-3000:]
        probe.wait_for(lambda: probe.compressed_pub.get_subscription_count() > 0, 60, "the intake's subscription")
        yield node, probe
    finally:
        probe.close()
        assert node.stop() == 0, node.log()[-3000:]


def ask(probe: Probe, request_id: str, timeout: float = 300.0) -> dict:
    return probe.wait_result(probe.instruct("what colour is the square ?", request_id=request_id), timeout)


def until_a_request_meets(probe: Probe, data: bytes, tag: str) -> dict:
    """Publish a frame (best effort: resent until a request meets it) and the result of the request that did:
    ``ok`` for a good frame, refused as a flood for a bomb."""
    from sensor_msgs.msg import CompressedImage

    bomb = len(data) > 10_000_000
    for attempt in range(20):
        probe.compressed_pub.publish(CompressedImage(format="jpeg", data=data))
        time.sleep(0.5)
        result = ask(probe, f"{tag}-{attempt}")
        if ("a flood of" in result.get("error", "")) if bomb else result["status"] == "ok":
            return result
    raise AssertionError(f"no request met the {tag} frame: {result}")


def diagnostics_since(probe: Probe, first: int) -> list[dict]:
    """The node's diagnostics from index ``first`` on: its own stamp (when its timer fired) and values."""
    return [{"stamp": s.stamp, **s.values} for s in probe.statuses[first:] if s.node == FQN]


def test_header_bombs_at_1_hz_leave_memory_diagnostics_parameters_and_answers_alone(agent, sample_image):
    from sensor_msgs.msg import CompressedImage

    node, probe = agent
    scene = cv2.resize(sample_image, (640, 320), interpolation=cv2.INTER_AREA)
    good = cv2.imencode(".jpg", cv2.cvtColor(scene, cv2.COLOR_RGB2BGR))[1].tobytes()
    bombs = [jpeg_bomb(scene), png_flood(scene)]
    assert until_a_request_meets(probe, good, "warm")["status"] == "ok"  # the model and allocator warmed up
    # from here on the newest frame is a bomb, whichever of the next ones DDS drops (best effort)
    assert "a flood of" in until_a_request_meets(probe, bombs[0], "first-bomb")["error"]
    process = psutil.Process(node.proc.pid)
    rss_before = process.memory_info().rss
    rss_peak, sampling = rss_before, threading.Event()

    def sample_rss() -> None:
        nonlocal rss_peak
        while not sampling.wait(0.05):
            rss_peak = max(rss_peak, process.memory_info().rss)

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    first_diag = len(probe.statuses)
    parameter_s, ids = [], [f"during-{i}" for i in range(BOMBS)]
    started = time.monotonic()
    try:
        for i, request_id in enumerate(ids):
            probe.compressed_pub.publish(CompressedImage(format="jpeg", data=bombs[i % 2]))
            probe.instruct("what colour is the square ?", request_id=request_id)
            asked = time.monotonic()
            assert probe.get_parameter(FQN, "keep_ratio", timeout=30) == pytest.approx(0.05)
            parameter_s.append(time.monotonic() - asked)
            time.sleep(max(0.0, started + i + 1 - time.monotonic()))
        answers = [probe.wait_for(lambda i=i: probe.result(i), 60, f"result {i}") for i in ids]
    finally:
        sampling.set()
        sampler.join(1.0)
    assert all(a["status"] == "error" and "a flood of" in a["error"] for a in answers), answers
    assert rss_peak - rss_before < RSS_SLACK, f"RSS {rss_before / 1e6:.0f} MB -> peak {rss_peak / 1e6:.0f} MB"
    during = diagnostics_since(probe, first_diag)
    gaps = np.diff([d["stamp"] for d in during])
    assert len(during) >= BOMBS // 2 and gaps.max() <= DIAGNOSTICS_EVERY_S, f"diagnostics gaps {gaps.round(2)}"
    arrived = int(during[-1]["frames_invalid"]) - int(during[0]["frames_invalid"])
    assert arrived >= BOMBS // 2, (during[0], during[-1])  # the bombs reached the node and were counted invalid
    assert int(during[-1]["internal_errors"]) == 0, during[-1]
    print(
        f"\n{BOMBS} bombs at 1 Hz: RSS {rss_before / 1e6:.0f} MB, peak +{(rss_peak - rss_before) / 1e6:.0f} MB; "
        f"parameter get max {max(parameter_s):.2f} s; diagnostics gap max {gaps.max():.2f} s"
    )
    assert until_a_request_meets(probe, good, "after")["status"] == "ok"


def test_the_intake_is_a_hidden_node_on_the_agent_s_resolved_topic(agent):
    _, probe = agent
    names = probe.node.get_node_names_and_namespaces()
    assert ("_ptp_agent_intake", NAMESPACE) in names and ("ptp_agent", NAMESPACE) in names, names
    subscribers = probe.node.get_subscriptions_info_by_topic(f"{NAMESPACE}/image/compressed")
    assert [s.node_name for s in subscribers] == ["_ptp_agent_intake"], subscribers
