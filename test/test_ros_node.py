"""The agent node as a separate process over real DDS (own domain, localhost only, SHM profile).

The node's model answers 6 s late (an injected slow stage, after calibration), so that the tests can
act while it is generating: send frames, change parameters, overflow the queue.  Its diagnostics come every
0.2 s (``FAST_DIAGNOSTICS_S``; 1 s by default): the tests wait for them after most steps.
"""

from __future__ import annotations

import os
import time
from collections import Counter

import cv2
import pytest
from ros_helpers import FAST_DIAGNOSTICS_S, NodeProcess, Probe

rclpy = pytest.importorskip("rclpy", reason="ROS 2 rclpy is not installed (pip install -e .[ros])")

NODE = "/ptp_agent"
DELAY_S = 6.0
STARTUP_S = 180.0  # model load + calibration on a busy 2-core box
ANSWER_S = 120.0


def slow_agent(ros, tmp_path_factory, delay_s: float = DELAY_S):
    """A one-slot agent whose generate takes ``delay_s`` longer; stopped cleanly at the end."""
    node = NodeProcess(
        ros,
        tmp_path_factory.mktemp("agent") / "agent.log",
        diagnostics_period_s=FAST_DIAGNOSTICS_S,
        generate_delay_s=delay_s,
        params={
            "mode": "fixed",
            "keep_ratio": 0.1,
            "max_new_tokens": 2,
            "queue_size": 1,
            "calibration_keep_ratios": [0.1],
            "max_frame_age_ms": 0.0,
        },
    )  # frames wait out the slow stage here
    yield node
    code = node.stop()
    assert code == 0, f"agent exited with {code}:\n{node.log()[-3000:]}"


def matched_probe(agent):
    """A probe whose publishers and subscriptions have matched the agent's."""
    p = Probe()
    try:
        p.wait_matched(STARTUP_S)
    except TimeoutError:
        pytest.fail(f"agent never subscribed:\n{agent.log()[-3000:]}")
    yield p
    p.close()


@pytest.fixture(scope="module")
def agent(ros, tmp_path_factory):
    yield from slow_agent(ros, tmp_path_factory)


@pytest.fixture(scope="module")
def probe(ros, agent):
    yield from matched_probe(agent)


@pytest.fixture(scope="module")
def frame(sample_image):
    return cv2.resize(sample_image, (640, 360), interpolation=cv2.INTER_AREA)


def diag(probe: Probe, key: str, timeout: float = 30.0, node: str = NODE):
    return probe.wait_for(lambda: (probe.diag_values(node) or {}).get(key), timeout, f"diagnostics {key}")


def deliver(probe: Probe, rgb, sec: int, **kwargs) -> None:
    """Publish a frame (best effort) until the agent's diagnostics count it."""
    before = int(diag(probe, "frames_received"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        probe.send_frame(rgb, sec, **kwargs)
        try:
            probe.wait_for(lambda: int(probe.diag_values(NODE)["frames_received"]) > before, 3.0, "frame")
            return
        except TimeoutError:
            continue
    raise TimeoutError(f"frame {sec} never reached the agent")


def answer_of(probe: Probe, request_id: str, timeout: float = ANSWER_S) -> dict:
    try:
        return probe.wait_for(lambda: probe.result(request_id), timeout, f"result {request_id}")
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; results so far: {probe.results}; diagnostics: {probe.diag_values(NODE)}") from None


def test_diagnostics_report_the_serving_node(probe):
    values = probe.wait_for(
        lambda: (v := probe.diag_values(NODE)) and v["model_state"] == "serving" and v, 30, "serving diagnostics"
    )
    for key in (
        "device",
        "last_latency_ms",
        "p95_latency_ms",
        "latency_budget_ms",
        "keep_ratio",
        "frames_received",
        "frames_dropped",
        "requests_served",
        "requests_rejected",
        "requests_failed",
        "last_error",
    ):
        assert key in values
    assert values["device"] == "cpu"
    assert values["_level"] == b"\x01" and values["_message"] == "no camera frame received yet"


def test_requests_use_the_newest_frame_and_callbacks_stay_live_during_generate(probe, frame):
    deliver(probe, frame, sec=1001)
    probe.ask(id="r1", text="What is on the table?")
    probe.wait_for(lambda: probe.diag_values(NODE)["busy"] == "True", 30, "the worker to start r1")

    # while r1 generates: a new frame and a parameter change are taken at once
    deliver(probe, frame[::-1].copy(), sec=1002)
    outcome = probe.set_parameters(NODE, {"alpha": 0.3})
    assert outcome[0].successful, outcome[0].reason
    probe.ask(id="r2", text="Where is the cup?")  # waits in the queue (size 1)
    probe.ask(id="r3", text="Anything else?")  # queue full: busy at once
    busy = answer_of(probe, "r3", timeout=DELAY_S)
    assert probe.result("r1") is None, "r1 finished before the checks ran; they proved nothing"
    assert busy["status"] == "busy" and "busy" in busy["error"]

    r1, r2 = answer_of(probe, "r1"), answer_of(probe, "r2")
    assert r1["status"] == "ok", r1
    assert r2["status"] == "ok", r2
    assert r1["stamp"] == {"sec": 1001, "nanosec": 123}  # newest when r1 started
    assert r2["stamp"] == {"sec": 1002, "nanosec": 123}  # arrived during r1, newest when r2 started
    assert r1["frame_id"] == "camera"
    for r in (r1, r2):
        assert isinstance(r["answer"], str) and r["instruction"]
        assert 0 < r["visual_tokens_kept"] < r["visual_tokens_total"]
        assert r["keep_ratio"] == pytest.approx(r["visual_tokens_kept"] / r["visual_tokens_total"], abs=1e-5)
        assert r["keep_ratio"] == pytest.approx(0.1, abs=0.01) and r["mode"] == "fixed"
        assert r["latency_ms"]["total"] >= DELAY_S * 1e3
        assert set(r["latency_ms"]) >= {
            "queue",
            "preprocess",
            "encode",
            "score",
            "select",
            "prefill",
            "decode",
            "total",
        }
        assert r["budget_met"] is False  # 2 s budget, 6 s injected
    assert r2["latency_ms"]["queue"] > 1000  # it waited for r1
    assert probe.get_parameter(NODE, "alpha") == pytest.approx(0.3)

    saliency = probe.wait_for(lambda: len(probe.saliency) >= 2 and probe.saliency, 60, "two saliency images")
    assert {(m.header.stamp.sec, m.header.frame_id) for m in saliency} == {(1001, "camera"), (1002, "camera")}
    assert all((m.width, m.height, m.encoding) == (640, 360, "bgr8") for m in saliency)
    assert probe.answers[:2] == [r1["answer"], r2["answer"]]


def test_bad_parameters_are_rejected_and_the_old_value_kept(probe):
    for params, why in (
        ({"mode": "fast"}, "mode must be one of"),
        ({"keep_ratio": 1.5}, ""),
        ({"max_new_tokens": 0}, ""),
        ({"model_path": "/elsewhere"}, "read-only"),
    ):
        outcome = probe.set_parameters(NODE, params)[0]
        assert not outcome.successful, params
        assert why in outcome.reason and outcome.reason
    assert probe.set_parameters(NODE, {"keep_ratio_max": 0.5})[0].successful
    crossed = probe.set_parameters(NODE, {"keep_ratio_min": 0.9})[0]
    assert not crossed.successful and "exceeds keep_ratio_max" in crossed.reason
    assert probe.get_parameter(NODE, "mode") == "fixed"
    assert probe.get_parameter(NODE, "keep_ratio") == pytest.approx(0.1)
    assert probe.get_parameter(NODE, "keep_ratio_min") == pytest.approx(0.05)


def test_invalid_instructions_get_an_error_result(probe):
    probe.ask(id="bad1", text="hi", keep_raito=0.5)
    probe.ask(id="bad2", text="   ")
    probe.ask(id="bad3", text="x" * 5000)
    for request_id, reason in (("bad1", "unknown field(s) keep_raito"), ("bad2", "empty"), ("bad3", "limit is 2000")):
        result = answer_of(probe, request_id, timeout=30)
        assert result["status"] == "rejected" and reason in result["error"], result


def test_a_malformed_image_is_reported_and_the_next_good_one_served(probe, frame):
    def truncate(msg):
        msg.data = bytes(msg.data[:1000])

    deliver(probe, frame, sec=2001, mutate=truncate)
    probe.ask(id="r4", text="What do you see?")
    broken = answer_of(probe, "r4")
    assert broken["status"] == "error" and "invalid image" in broken["error"] and "needs" in broken["error"]
    assert broken["stamp"]["sec"] == 2001
    assert int(probe.diag_values(NODE)["frames_invalid"]) >= 1

    deliver(probe, frame, sec=2002)
    probe.ask(id="r5", text="What do you see now?")
    good = answer_of(probe, "r5")
    assert good["status"] == "ok" and good["stamp"]["sec"] == 2002, good


def test_deactivate_stops_serving_and_activate_resumes(probe, frame):
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState

    def transition(tid):
        response = probe.call(ChangeState, f"{NODE}/change_state", ChangeState.Request(transition=Transition(id=tid)))
        assert response.success

    # deactivate while a request runs: its slow stage (DELAY_S) stops at once, as on SIGINT and SIGTERM
    deliver(probe, frame, sec=3000)
    probe.ask(id="running", text="What is on the table?")
    probe.wait_for(lambda: probe.diag_values(NODE)["busy"] == "True", 30, "the request to start")
    started = time.monotonic()
    transition(Transition.TRANSITION_DEACTIVATE)
    result = answer_of(probe, "running", timeout=10)
    assert result["status"] == "cancelled", result
    assert time.monotonic() - started < 2.0  # 1 s + DDS on a busy box; the stage had over 4 s left
    probe.ask(id="r6", text="Still there?")
    assert "not serving" in answer_of(probe, "r6", timeout=30)["error"]
    transition(Transition.TRANSITION_ACTIVATE)
    probe.wait_matched(30)
    deliver(probe, frame, sec=3001)
    probe.ask(id="r7", text="And now?")
    assert answer_of(probe, "r7")["status"] == "ok"


def test_every_request_got_exactly_one_result(probe):
    time.sleep(1.0)  # let late duplicates, if any, arrive
    counts = Counter(r["id"] for r in probe.results)
    sent = ["r1", "r2", "r3", "r4", "r5", "running", "r6", "r7", "bad1", "bad2", "bad3"]
    assert {k: counts[k] for k in sent} == {k: 1 for k in sent}
    values = probe.diag_values(NODE)
    assert int(values["requests_served"]) >= 4  # r1 r2 r5 r7 (+ none from calibration)
    assert int(values["requests_rejected"]) >= 5  # r3 r6 bad1-3


def test_a_missing_model_is_reported_and_instructions_rejected(ros, tmp_path):
    node = NodeProcess(
        ros,
        tmp_path / "broken.log",
        diagnostics_period_s=FAST_DIAGNOSTICS_S,
        params={"model_path": "/nonexistent/model"},
        node_name="ptp_broken",
        namespace="/broken",
    )
    probe = Probe(namespace="/broken")
    try:
        values = probe.wait_for(
            lambda: (v := probe.diag_values("/broken/ptp_broken")) and v["model_state"] == "error" and v,
            60,
            "error diagnostics",
        )
        assert values["_level"] == b"\x02" and "not found" in values["_message"]
        probe.wait_for(lambda: probe.instruction_pub.get_subscription_count() > 0, 30, "the broken agent")
        probe.ask(id="m1", text="Are you there?")
        result = answer_of(probe, "m1", timeout=30)
        assert result["status"] == "rejected" and "not serving: model error" in result["error"]
        assert "/nonexistent/model" in result["error"]
    finally:
        probe.close()
        assert node.stop() == 0, node.log()[-3000:]


def test_a_corrupt_model_is_named_in_diagnostics_and_rejections(ros, tmp_path):
    import shutil

    from ptp_ros.vlm.defaults import default_model_path

    broken = tmp_path / "broken-model"
    shutil.copytree(default_model_path(), broken)
    os.truncate(broken / "model.safetensors", 1000)
    node = NodeProcess(
        ros,
        tmp_path / "corrupt.log",
        diagnostics_period_s=FAST_DIAGNOSTICS_S,
        params={"model_path": str(broken)},
        node_name="ptp_corrupt",
        namespace="/corrupt",
    )
    probe = Probe(namespace="/corrupt")
    try:
        values = probe.wait_for(
            lambda: (v := probe.diag_values("/corrupt/ptp_corrupt")) and v["model_state"] == "error" and v,
            60,
            "error diagnostics",
        )
        assert values["_level"] == b"\x02" and "corrupt or truncated safetensors" in values["_message"], values
        assert "corrupt or truncated safetensors" in values["last_error"]
        probe.wait_for(lambda: probe.instruction_pub.get_subscription_count() > 0, 30, "the broken agent")
        probe.ask(id="c1", text="Are you there?")
        assert "corrupt or truncated" in answer_of(probe, "c1", timeout=30)["error"]
    finally:
        probe.close()
        assert node.stop() == 0, node.log()[-3000:]
    assert "configure failed" in node.log() and "corrupt or truncated" in node.log()


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_stopping_cancels_a_running_generate_within_a_second(ros, tmp_path, frame, how):
    """(Deactivation cancels a running request too: test_deactivate_stops_serving_and_activate_resumes, on the
    module's agent.)"""
    import signal

    ns = f"/stop_{how.lower()}"
    node = NodeProcess(
        ros,
        tmp_path / "stop.log",
        diagnostics_period_s=FAST_DIAGNOSTICS_S,
        generate_delay_s=60.0,
        node_name="ptp_stop",
        namespace=ns,
        params={
            "mode": "fixed",
            "keep_ratio": 0.1,
            "max_new_tokens": 2,
            "calibration_keep_ratios": [0.1],
            "max_frame_age_ms": 0.0,
        },
    )
    probe = Probe(namespace=ns)
    fqn = f"{ns}/ptp_stop"
    try:
        probe.wait_matched(STARTUP_S)
        probe.wait_for(lambda: (v := probe.diag_values(fqn)) and v["model_state"] == "serving", 30, "serving")
        probe.wait_for(
            lambda: probe.send_frame(frame, sec=5) and int(probe.diag_values(fqn)["frames_received"]) > 0, 30, "a frame"
        )
        probe.ask(id="long", text="What is on the table?")
        probe.wait_for(lambda: probe.diag_values(fqn)["busy"] == "True", 30, "the request to start")
        started = time.monotonic()
        node.proc.send_signal(getattr(signal, how))
        result = answer_of(probe, "long", timeout=10)
        assert result["status"] == "cancelled", result
        assert time.monotonic() - started < 2.0  # the 60 s stage stopped at once (1 s + DDS on a busy box)
        assert node.proc.wait(10) == 0, node.log()[-3000:]
        assert time.monotonic() - started < 5.0
    finally:
        probe.close()
        assert node.stop() == 0, node.log()[-3000:]


def test_sigint_during_a_long_model_load_ends_the_process_within_two_seconds(ros, tmp_path):
    import signal

    node = NodeProcess(
        ros,
        tmp_path / "loading.log",
        diagnostics_period_s=FAST_DIAGNOSTICS_S,
        params={},
        node_name="ptp_loading",
        namespace="/loading",
        load_delay_s=60.0,
    )
    probe = Probe(namespace="/loading")
    try:
        probe.wait_for(
            lambda: (v := probe.diag_values("/loading/ptp_loading")) and v["model_state"] == "loading",
            60,
            "the model to start loading",
        )
        started = time.monotonic()
        node.proc.send_signal(signal.SIGINT)
        assert node.proc.wait(10) == 0, node.log()[-3000:]
        assert time.monotonic() - started < 2.0
    finally:
        probe.close()
        node.stop()


def test_without_autostart_a_lifecycle_manager_drives_the_node(ros, tmp_path):
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState, GetState

    fqn = "/managed/ptp_managed"
    node = NodeProcess(
        ros,
        tmp_path / "managed.log",
        diagnostics_period_s=FAST_DIAGNOSTICS_S,
        node_name="ptp_managed",
        namespace="/managed",
        params={"autostart": False, "calibration_keep_ratios": [0.1], "image_transport": "compressed"},
        remaps={"image": "/managed_cam/image_raw"},
    )
    probe = Probe(namespace="/managed")
    try:
        values = probe.wait_for(lambda: probe.diag_values(fqn), 60, "diagnostics")
        assert values["model_state"] == "unconfigured"
        time.sleep(2.0)
        assert probe.diag_values(fqn)["model_state"] == "unconfigured"  # it waits for the manager
        for transition in (Transition.TRANSITION_CONFIGURE, Transition.TRANSITION_ACTIVATE):
            response = probe.call(
                ChangeState,
                f"{fqn}/change_state",
                ChangeState.Request(transition=Transition(id=transition)),
                timeout=STARTUP_S,
            )
            assert response.success, node.log()[-3000:]
        assert probe.call(GetState, f"{fqn}/get_state", GetState.Request()).current_state.label == "active"
        # image_transport naming: the remapped image topic + /compressed, without a remap of its own
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import CompressedImage

        camera = probe.node.create_publisher(
            CompressedImage, "/managed_cam/image_raw/compressed", qos_profile_sensor_data
        )
        probe.wait_for(lambda: camera.get_subscription_count() > 0, 30, "the compressed subscription")
    finally:
        probe.close()
        assert node.stop() == 0, node.log()[-3000:]
