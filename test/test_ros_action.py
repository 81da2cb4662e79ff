"""The ``ask`` action over real DDS: the agent in its own process (the tiny model, an injected slow stage of
DELAY_S in generate), an action client in the test process beside the JSON topics.

Goal → feedback per stage → a typed result equal to the JSON result; cancel of a running and of a queued
goal (whose place in the queue is free at once); goals the topic path would refuse (empty, out of range, ±inf,
too long, queue full) accepted and aborted with the reason in the typed result, under their own request id;
every goal ends exactly once.  Bursts, duplicate goal ids, cancel storms and vanished clients are fuzzed in
test_ros_action_fuzz.py.
"""

from __future__ import annotations

import math
import time

import cv2
import pytest
from ros_helpers import NodeProcess, Probe, wait_future
from test_ros_node import NODE, STARTUP_S, deliver, matched_probe, slow_agent

rclpy = pytest.importorskip("rclpy", reason="ROS 2 rclpy is not installed (pip install -e .[ros])")

from ptp_ros.ros.ask_action import STAGES, frames_dict, goal_message  # noqa: E402
from ptp_ros.ros.ask_action import client as ask_client  # noqa: E402

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
    action = ask_client(probe.node, Ask)
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
    """Every field of the JSON result that the typed result declares has the same value there (the others are the
    JSON-only ones, test_result_fields_reach_the_json_the_action_and_the_docs)."""
    declared = typed.get_fields_and_field_types()
    for key, value in result.items():
        if key == "id":
            assert typed.request_id == value
        elif key == "stamp":
            assert (typed.header.stamp.sec, typed.header.stamp.nanosec) == (value["sec"], value["nanosec"])
        elif key == "frame_id":
            assert typed.header.frame_id == value
        elif key == "frames":
            assert frames_dict(typed.frames) == value
        elif key == "latency_ms":
            assert {k: getattr(typed.latency_ms, k) for k in value} == value
            assert all(
                math.isnan(getattr(typed.latency_ms, k))
                for k in typed.latency_ms.get_fields_and_field_types()
                if k not in value
            )
        elif key not in declared:
            continue
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
        ("bad-inf-ratio", {"text": "Is it red?", "keep_ratio": math.inf}, "keep_ratio must be in (0, 1], got inf"),
        (
            "bad-inf-budget",
            {"text": "Is it red?", "latency_budget_ms": -math.inf},
            "latency_budget_ms must be in (0.0, 3600000.0], got -inf",
        ),
        ("bad-tokens", {"text": "Is it red?", "max_new_tokens": 5000}, "max_new_tokens must be in [1, 1024], got 5000"),
        ("bad-long", {"text": "x" * 2001}, "instruction has 2001 characters; the limit is 2000"),
    ],
)
def test_invalid_goals_are_aborted_with_the_reason_in_the_typed_result_under_their_id(
    Ask, client, probe, request_id, goal, reason
):
    from action_msgs.msg import GoalStatus

    text = goal.pop("text")
    sent = Sent(client, goal_message(Ask, text, id=request_id, **goal))
    assert sent.handle.accepted  # a goal response has no room for a reason: accepted, then aborted with it
    status, typed = sent.outcome(timeout=30.0)
    assert status == GoalStatus.STATUS_ABORTED
    assert typed.request_id == request_id and typed.status == "rejected" and reason in typed.error, typed
    assert typed.mode == "" and math.isnan(typed.keep_ratio)  # it never ran
    assert sent.feedback == []  # it was never queued
    result = json_result(probe, request_id)
    assert result["status"] == "rejected" and result["error"] == typed.error


def test_a_goal_beyond_the_full_queue_is_aborted_busy_and_a_cancelled_queued_goal_frees_its_place(
    Ask, client, probe, frame
):
    from action_msgs.msg import GoalStatus

    deliver(probe, frame, sec=2003)
    received = int(probe.diag_values(NODE)["requests_received"])
    running = Sent(client, goal_message(Ask, "What colour is the box?", id="q1"))
    running.reached("converting")
    queued = Sent(client, goal_message(Ask, "How many chairs?", id="q2"))  # queue_size 1: it waits
    over = Sent(client, goal_message(Ask, "Is the door open?", id="q3"))
    assert running.handle.accepted and queued.handle.accepted and over.handle.accepted
    status, typed = over.outcome(timeout=30.0)
    assert status == GoalStatus.STATUS_ABORTED and typed.request_id == "q3"
    assert typed.status == "busy" and typed.error == "busy: 1 request(s) already waiting"
    assert json_result(probe, "q3")["error"] == typed.error
    assert over.feedback == [] and queued.stages() == ["queued"]

    wait(queued.handle.cancel_goal_async())  # cancelled while queued: answered at once, its place freed
    status, typed = queued.outcome(timeout=30.0)
    assert probe.result("q1") is None, "q1 finished before the checks ran; they proved nothing"
    assert status == GoalStatus.STATUS_CANCELED and typed.status == "cancelled" and "before it ran" in typed.error
    following = Sent(client, goal_message(Ask, "Is the window open?", id="q4"))  # takes the freed place
    following.reached("queued", timeout=10.0)
    assert probe.result("q4") is None, "q4 was answered at once: the cancelled goal kept its place"

    status, typed = running.outcome()
    assert status == GoalStatus.STATUS_SUCCEEDED and typed.status == "ok"
    status, typed = following.outcome()
    assert status == GoalStatus.STATUS_SUCCEEDED and typed.status == "ok", typed
    assert queued.stages() == ["queued"]  # never "converting": it never left the queue

    time.sleep(1.0)  # room for a duplicate
    for request_id in ("q1", "q2", "q3", "q4"):
        assert sum(r.get("id") == request_id for r in probe.results) == 1, request_id
    values = probe.wait_for(
        lambda: (v := probe.diag_values(NODE)) and int(v["requests_received"]) >= received + 4 and v, 10, "counted"
    )
    assert int(values["requests_received"]) == received + 4  # goals count as received requests


@pytest.fixture(scope="module")
def planner_agent(Ask, ros, tmp_path_factory):
    """An agent in budget mode that draws saliency at 1080p: calibrated with 2 new tokens a request, then
    set to 256 (its default for requests that name none), so that it predicts a whole request at far more
    than a goal asking for 1 token takes."""
    node = NodeProcess(
        ros,
        tmp_path_factory.mktemp("planner_agent") / "agent.log",
        namespace="/back_to_back",
        params={
            "mode": "budget",
            "latency_budget_ms": 10_000.0,
            "max_new_tokens": 2,
            "queue_size": 1,
            "publish_saliency": True,
            "saliency_max_side": 1920,
            "calibration_keep_ratios": [0.05, 0.2],
            "max_frame_age_ms": 0.0,
        },
    )
    probe = Probe(namespace="/back_to_back")
    action = ask_client(probe.node, Ask)
    try:
        if not action.wait_for_server(timeout_sec=STARTUP_S):
            pytest.fail(f"the agent serves no ask action:\n{node.log()[-3000:]}")
        fqn = "/back_to_back/ptp_agent"
        probe.wait_for(lambda: (probe.diag_values(fqn) or {}).get("model_state") == "serving", STARTUP_S, "serving")
        assert probe.set_parameters(fqn, {"max_new_tokens": 256})[0].successful
        yield probe, action
    finally:
        action.destroy()
        probe.close()
        assert node.stop() == 0, node.log()[-3000:]


def test_a_planner_sending_each_goal_when_the_last_result_arrives_is_never_refused(Ask, planner_agent, sample_image):
    probe, action = planner_agent
    frame = sample_image  # 1920x1080: the saliency image takes a while to draw after the result is out
    probe.send_frame(frame, sec=int(time.time()))
    probe.wait_for(lambda: int(probe.diag_values("/back_to_back/ptp_agent")["frames_received"]), 30, "a frame")
    outcomes = []
    for i in range(20):
        _, typed = Sent(action, goal_message(Ask, "What is on the table?", id=f"bb{i}", max_new_tokens=1)).outcome()
        outcomes.append((typed.status, typed.error))
    print(f"\nback to back: {sum(s == 'ok' for s, _ in outcomes)} of 20 answered")
    assert [s for s, _ in outcomes] == ["ok"] * 20, outcomes
    assert len(probe.saliency) >= 10  # saliency was on and drawn


# -- one typed result: the rules no type enforces ----------------------------------------------------------
def full_result():
    """A ``RequestResult`` with every field set, each from its declared type (a field of a new type makes this
    fail until it is given a value here)."""
    import dataclasses
    import typing

    from ptp_ros.result import AnswerResult, CameraFrame, RegionQuota, RequestResult, ViewTokens
    from ptp_ros.timing import STAGES as PIPELINE_STAGES

    def value(cls, field):
        kind = typing.get_type_hints(cls)[field.name]
        examples = {
            str: f"<{field.name}>",
            float: 1.5,
            int: 7,
            bool: True,
            dict[str, int]: {"sec": 3, "nanosec": 4},
            dict[str, float]: {stage: 2.5 for stage in (*PIPELINE_STAGES, "total")},
            tuple[RegionQuota, ...]: (RegionQuota(0, "global", 5, 40), RegionQuota(1, "tile 0", 6, 50)),
            dict[str, CameraFrame]: {
                "head": CameraFrame({"sec": 3, "nanosec": 4}, "head_optical", 3, 40),
                "wrist": CameraFrame({"sec": 3, "nanosec": 9}, "wrist_optical", 4, 50),
            },
            tuple[ViewTokens, ...]: (ViewTokens("head", 3, 40), ViewTokens("wrist", 4, 50)),
        }
        return next(v for t, v in examples.items() if kind == t or kind == t | None)

    answer = AnswerResult(**{f.name: value(AnswerResult, f) for f in dataclasses.fields(AnswerResult)})
    fields = {f.name: value(RequestResult, f) for f in dataclasses.fields(RequestResult) if f.name != "answer"}
    return RequestResult(**fields, answer=answer), answer


def test_result_fields_reach_the_json_the_action_and_the_docs(Ask):
    """Every field of the one typed result is in the JSON result (``ptp-ask --json`` prints the answer's); every
    field of the action's typed result is filled from the JSON key of its name, and reads back equal; every JSON
    key is documented in docs/ros.md, the JSON-only ones among them as such."""
    import dataclasses
    import re
    from pathlib import Path

    from ptp_ros.result import AnswerResult, RequestResult
    from ptp_ros.ros.ask_action import FROM_JSON_APART, result_dict, result_message

    result, answer = full_result()
    data = result.to_json()
    names = {f.name for f in dataclasses.fields(RequestResult)} | {f.name for f in dataclasses.fields(AnswerResult)}
    assert set(data) == names and answer.to_json().keys() <= data.keys()
    assert data["latency_ms"] == result.latency_ms  # the node's times, not the pipeline's
    typed = result_message(Ask, data)
    declared = set(typed.get_fields_and_field_types())
    assert declared - set(FROM_JSON_APART) <= set(data), "a typed field that no JSON key fills"
    assert_typed_equals_json(typed, data)
    assert result_dict(typed) == {k: v for k, v in data.items() if k in declared | {"id", "stamp", "frame_id"}}
    docs = Path(__file__).resolve().parents[1] / "docs" / "ros.md"
    section = docs.read_text().split("### Result\n", 1)[1].split("\n### ", 1)[0]
    documented = set(re.findall(r"`([a-z_]+)`", section))
    assert set(data) <= documented, f"result fields missing from docs/ros.md: {sorted(set(data) - documented)}"
    json_only = set(data) - declared - {"id", "stamp", "frame_id"}
    line = next(line for line in section.splitlines() if line.startswith("JSON only"))
    assert set(re.findall(r"`([a-z_]+)`", line)) == json_only


def test_every_stage_of_a_request_reports_one_feedback_stage_in_order():
    """The worker's "convert" and every pipeline stage (``timing.STAGES``) map to a feedback stage of the action,
    in the action's order: a new pipeline stage cannot go unreported, nor report out of order."""
    from ptp_ros.ros.ask_action import FEEDBACK
    from ptp_ros.timing import STAGES as PIPELINE_STAGES

    assert list(FEEDBACK) == ["convert", *PIPELINE_STAGES]
    order = [STAGES.index(stage) for stage in FEEDBACK.values()]
    assert order == sorted(order) and set(FEEDBACK.values()) == set(STAGES) - {"queued"}


def test_the_pipeline_tells_each_stage_as_it_begins_and_none_after_a_cancel(tiny_adapter, sample_image):
    import threading

    from ptp_ros.pipeline import Cancelled, Pipeline, PipelineConfig
    from ptp_ros.pruning import ConfiguredSelector

    for selector, expected in (
        (ConfiguredSelector(), ["preprocess", "encode", "score", "prefill", "decode"]),  # select inside the prefill
        (ConfiguredSelector(prune_in_llm=False), ["preprocess", "encode", "score", "select", "prefill", "decode"]),
    ):
        told: list[str] = []
        Pipeline(tiny_adapter, PipelineConfig(selector=selector, max_new_tokens=3)).answer(
            sample_image, "what is there?", keep_ratio=0.25, on_stage=told.append
        )
        assert told == expected, selector
    cancel, told = threading.Event(), []

    def stop_at_score(stage: str) -> None:
        told.append(stage)
        if stage == "score":
            cancel.set()

    with pytest.raises(Cancelled):
        Pipeline(tiny_adapter, PipelineConfig(max_new_tokens=3)).answer(
            sample_image, "what is there?", keep_ratio=0.25, cancel=cancel, on_stage=stop_at_score
        )
    assert told == ["preprocess", "encode", "score"]


def test_the_action_client_has_its_lock_before_a_spinning_node_can_see_it(Ask):
    """rclpy's ``ActionClient`` joins the node's waitables before it makes its lock; an executor spinning that node
    in another thread (every ``AgentClient``'s) then dies on ``AttributeError``. Ours has the lock first."""
    from ptp_ros.ros.client import SpinningNode

    with SpinningNode("lock_order_check") as spinning:
        seen = []
        add_waitable = spinning.node.add_waitable

        def spy(waitable):
            seen.append(hasattr(waitable, "_lock"))
            add_waitable(waitable)

        spinning.node.add_waitable = spy
        action = ask_client(spinning.node, Ask)
        assert seen == [True]
        action.destroy()
