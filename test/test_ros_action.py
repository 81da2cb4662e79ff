"""The ``ask`` action over real DDS: the agent in its own process (the tiny model, an injected slow stage of
DELAY_S in generate), an action client in the test process beside the JSON topics.

Goal → feedback per stage → a typed result equal to the JSON result; cancel of a running and of a queued
goal; goals the topic path would refuse (empty, out of range, queue full) rejected with the reason on
``result``; every accepted goal ends exactly once.
"""

from __future__ import annotations

import math
import time

import cv2
import pytest
from ros_helpers import Probe, wait_future
from test_ros_node import NODE, STARTUP_S, deliver, matched_probe, slow_agent

rclpy = pytest.importorskip("rclpy", reason="ROS 2 rclpy is not installed (pip install -e .[ros])")

from ptp_ros.ros.ask_action import JSON_ONLY, STAGES, goal_message  # noqa: E402

DELAY_S = 4.0
WAIT_S = 120.0


@pytest.fixture(scope="module")
def Ask(ask_interface):
    return ask_interface


@pytest.fixture(scope="module")
def agent(Ask, ros, tmp_path_factory):  # after Ask: the node must find the interface package at start
    yield from slow_agent(ros, tmp_path_factory, DELAY_S)


@pytest.fixture(scope="module")
def probe(ros, agent):
    yield from matched_probe(agent)


@pytest.fixture(scope="module")
def client(Ask, probe, agent):
    from rclpy.action import ActionClient

    action = ActionClient(probe.node, Ask, "ask")
    if not action.wait_for_server(timeout_sec=60):
        pytest.fail(f"the agent serves no ask action:\n{agent.log()[-3000:]}")
    # serving (not only constructed): a goal sent before activation would be rejected as not serving
    probe.wait_for(lambda: (probe.diag_values(NODE) or {}).get("model_state") == "serving", STARTUP_S, "serving")
    yield action
    action.destroy()


@pytest.fixture(scope="module")
def frame(sample_image):
    return cv2.resize(sample_image, (640, 360), interpolation=cv2.INTER_AREA)


def wait(future, timeout: float = WAIT_S, what: str = "the action server"):
    return wait_future(future, timeout, what)


class Sent:
    """One goal: its handle, the feedback it got, and (later) its outcome."""

    def __init__(self, client, goal):
        self.feedback: list[tuple[str, float]] = []
        self.handle = wait(
            client.send_goal_async(
                goal, feedback_callback=lambda m: self.feedback.append((m.feedback.stage, m.feedback.elapsed_ms))
            )
        )
        self._result = self.handle.get_result_async() if self.handle.accepted else None

    def stages(self) -> list[str]:
        return [stage for stage, _ in self.feedback]

    def reached(self, stage: str, timeout: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while stage not in self.stages():
            assert time.monotonic() < deadline, f"no {stage} feedback within {timeout:.0f} s: {self.feedback}"
            time.sleep(0.02)

    def outcome(self, timeout: float = WAIT_S):
        """(the goal's final GoalStatus, the typed result)."""
        response = wait(self._result, timeout, "the goal's result")
        return response.status, response.result


def json_result(probe: Probe, request_id: str, timeout: float = 30.0) -> dict:
    return probe.wait_for(lambda: probe.result(request_id), timeout, f"the JSON result of {request_id}")


def assert_typed_equals_json(typed, result: dict) -> None:
    """Every field of the JSON result has a typed counterpart with the same value, but the library's diagnostic
    ones the action leaves to the JSON result (``JSON_ONLY``)."""
    for key, value in result.items():
        if key in JSON_ONLY:
            assert not hasattr(typed, key), f"{key} is typed now: take it out of JSON_ONLY"
        elif key == "id":
            assert typed.request_id == value
        elif key == "stamp":
            assert (typed.header.stamp.sec, typed.header.stamp.nanosec) == (value["sec"], value["nanosec"])
        elif key == "frame_id":
            assert typed.header.frame_id == value
        elif key == "latency_ms":
            assert {k: getattr(typed.latency_ms, k) for k in value} == value
            assert all(
                math.isnan(getattr(typed.latency_ms, k))
                for k in typed.latency_ms.get_fields_and_field_types()
                if k not in value
            )
        elif value is None:
            assert math.isnan(getattr(typed, key)), key
        else:
            assert getattr(typed, key) == value, key


def test_goal_gets_feedback_per_stage_and_a_typed_result_equal_to_the_json_one(Ask, client, probe, frame):
    from action_msgs.msg import GoalStatus

    deliver(probe, frame, sec=2001)
    sent = Sent(client, goal_message(Ask, "What is on the table?", id="a1", max_new_tokens=2))
    assert sent.handle.accepted
    status, typed = sent.outcome()
    assert status == GoalStatus.STATUS_SUCCEEDED
    assert typed.status == "ok" and typed.error == "" and typed.request_id == "a1"
    sent.reached("decoding", timeout=10.0)  # feedback (a topic) and the result (a service) may arrive in any order
    assert sent.stages() == list(STAGES)  # in order, each once
    elapsed = [ms for _, ms in sent.feedback]
    assert elapsed == sorted(elapsed) and elapsed[-1] >= DELAY_S * 1e3  # decoding starts after the slow prefill

    result = json_result(probe, "a1")  # the JSON topic still carries every result
    assert result["status"] == "ok" and result["stamp"] == {"sec": 2001, "nanosec": 123}
    assert_typed_equals_json(typed, result)
    assert typed.mode == "fixed" and typed.max_new_tokens == 2
    assert 0 < typed.visual_tokens_kept < typed.visual_tokens_total
    assert typed.latency_ms.total >= DELAY_S * 1e3 and math.isnan(typed.predicted_ms)  # fixed mode: no prediction


def test_cancelling_a_running_goal_frees_the_worker_for_the_next(Ask, client, probe, frame):
    from action_msgs.msg import GoalStatus

    deliver(probe, frame, sec=2002)
    running = Sent(client, goal_message(Ask, "Where is the cup?", id="c1"))
    running.reached("prefill")  # inside the injected slow stage
    started = time.monotonic()
    cancel = wait(running.handle.cancel_goal_async())
    assert len(cancel.goals_canceling) == 1
    status, typed = running.outcome()
    assert time.monotonic() - started < DELAY_S, "the cancel waited for the slow stage to end"
    assert status == GoalStatus.STATUS_CANCELED
    assert typed.status == "cancelled" and "its client cancelled it" in typed.error
    assert_typed_equals_json(typed, json_result(probe, "c1"))

    following = Sent(client, goal_message(Ask, "Anything else?", id="c2", keep_ratio=0.2))
    status, typed = following.outcome()
    assert status == GoalStatus.STATUS_SUCCEEDED and typed.status == "ok"
    assert typed.mode == "request" and typed.keep_ratio == pytest.approx(0.2, abs=0.01)


@pytest.mark.parametrize(
    "request_id, goal, reason",
    [
        ("bad-empty", {"text": "   "}, "invalid instruction: instruction text is empty"),
        (
            "bad-ratio",
            {"text": "Is it red?", "keep_ratio": 1.5},
            "invalid instruction: keep_ratio must be in (0, 1], got 1.5",
        ),
        ("bad-tokens", {"text": "Is it red?", "max_new_tokens": 5000}, "max_new_tokens must be in [1, 1024], got 5000"),
    ],
)
def test_invalid_goals_are_rejected_with_the_reason_on_the_result_topic(Ask, client, probe, request_id, goal, reason):
    text = goal.pop("text")
    sent = Sent(client, goal_message(Ask, text, id=request_id, **goal))
    assert not sent.handle.accepted
    result = json_result(probe, request_id)
    assert result["status"] == "rejected" and reason in result["error"]


def test_a_goal_beyond_the_full_queue_is_rejected_busy_and_every_accepted_goal_ends_once(Ask, client, probe, frame):
    from action_msgs.msg import GoalStatus

    deliver(probe, frame, sec=2003)
    running = Sent(client, goal_message(Ask, "What colour is the box?", id="q1"))
    running.reached("converting")
    queued = Sent(client, goal_message(Ask, "How many chairs?", id="q2"))  # queue_size 1: it waits
    over = Sent(client, goal_message(Ask, "Is the door open?", id="q3"))
    assert running.handle.accepted and queued.handle.accepted and not over.handle.accepted
    busy = json_result(probe, "q3")
    assert busy["status"] == "busy" and busy["error"] == "busy: 1 request(s) already waiting"
    assert queued.stages() == ["queued"]

    wait(queued.handle.cancel_goal_async())  # cancelled while queued: answered when its turn comes, not run
    status, typed = running.outcome()
    assert status == GoalStatus.STATUS_SUCCEEDED and typed.status == "ok"
    status, typed = queued.outcome(timeout=30.0)
    assert status == GoalStatus.STATUS_CANCELED and typed.status == "cancelled" and "before it ran" in typed.error
    queued.reached("converting", timeout=10.0)
    assert queued.stages() == ["queued", "converting"]

    time.sleep(1.0)  # room for a duplicate
    for request_id in ("q1", "q2", "q3"):
        assert sum(r.get("id") == request_id for r in probe.results) == 1, request_id
