"""Property-based fuzzing of the ``ask`` action of the real agent node over DDS: generated goals (every field's
edges), bursts of 200 and 300 goals, duplicate goal UUIDs, cancel storms (one goal, all goals with the zero
UUID, twice), clients that vanish mid-goal, and goals that share their id with topic requests.

Properties, checked for every goal:
- **exactly one terminal outcome**: rclpy answers every goal request; every accepted goal ends once (succeeded
  exactly when the typed result says ``ok``, canceled exactly when its client cancelled it, aborted otherwise)
  with a typed result under the goal's own ``request_id`` (the node's ``<node>-<n>`` when it has none usable),
  and its JSON result goes out once on ``result``; a refused goal's typed result says why;
- **liveness**: the process runs, ``internal_errors`` stays 0, ``/diagnostics`` keeps publishing (no gap over
  3 s), every request the node counts has its JSON result, and a plain goal is answered afterwards.

One node runs the built-in model in fixed mode with a 1.5 s frame age limit: goals asked without a fresh frame
end ``stale`` at once, so most examples never run the model; those that need a running goal send a frame first.
"""

from __future__ import annotations

import itertools
import math
import re
import time
import uuid

import cv2
import pytest
from ros_helpers import AGENT_PARAMS, FAST_DIAGNOSTICS_S, NodeProcess, Probe

rclpy = pytest.importorskip("rclpy", reason="ROS 2 rclpy is not installed (pip install -e .[ros])")
hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install -e .[dev])")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ptp_ros.ros.client import AgentClient, Goal  # noqa: E402
from ptp_ros.ros.requests import MAX_ID_CHARS, MAX_NEW_TOKENS_LIMIT  # noqa: E402

NAMESPACE = "action_fuzz"
FQN = f"/{NAMESPACE}/ptp_agent"
STARTUP_S = 180.0
OUTCOME_S = 120.0
MAX_CHARS = 2000
DIAGNOSTICS_GAP_S = 3.0  # more than this between two diagnostics is a stall
PARAMS = AGENT_PARAMS | {"max_frame_age_ms": 1500.0, "max_instruction_chars": MAX_CHARS}
NODE_ID = re.compile(r"ptp_agent-\d+")
_numbers = itertools.count()


def fuzz(examples: int):
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# -- the node and a probe ---------------------------------------------------------------------------------
class Session:
    """The agent process and a probe (the package's client, with its ``ask`` action client) in the test process."""

    def __init__(self, ros, log_dir, Ask, frame):
        self.Ask, self.frame = Ask, frame
        self.process = NodeProcess(
            ros,
            log_dir / "agent.log",
            params=PARAMS,
            namespace=f"/{NAMESPACE}",
            diagnostics_period_s=FAST_DIAGNOSTICS_S,  # every example waits for counters published after it
        )
        self.probe = Probe(namespace=f"/{NAMESPACE}")
        deadline = time.monotonic() + STARTUP_S
        try:
            if not self.probe.wait_for_action(STARTUP_S):
                pytest.fail(f"the agent serves no ask action:\n{self.process.log()[-3000:]}")
            self.probe.wait_for(
                lambda: self.diag().get("model_state") == "serving", max(1.0, deadline - time.monotonic()), "serving"
            )
        except BaseException:  # no agent process left behind
            self.probe.close()
            self.process.stop()
            raise

    def diag(self) -> dict:
        return self.probe.diag_values(FQN) or {}

    def goal(self, text: str = "what colour is the square ?", request_id: str | None = None, **fields):
        request_id = f"g{next(_numbers)}" if request_id is None else request_id
        return self.Ask.Goal(instruction=text, request_id=request_id, **fields)

    def send_frame(self) -> None:
        def stamp_now(msg) -> None:
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(time.time_ns(), 1_000_000_000)

        self.probe.send_frame(self.frame, sec=0, mutate=stamp_now)

    def fresh_frame(self) -> None:
        """A frame that has just reached the node: one is re-sent (best effort) until the diagnostics (1 Hz)
        count it, then one more goes out, so the goals sent next meet a frame well under max_frame_age_ms."""
        before = int(self.diag().get("frames_received", 0))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            self.send_frame()
            try:
                self.probe.wait_for(lambda: int(self.diag().get("frames_received", 0)) > before, 3.0, "a frame")
                self.send_frame()
                time.sleep(0.05)
                return
            except TimeoutError:
                continue
        raise TimeoutError("no frame reached the agent")

    def close(self) -> None:
        self.probe.close()
        assert self.process.stop() == 0, self.process.log()[-3000:]


@pytest.fixture(scope="module")
def session(ask_interface, ros, tmp_path_factory, sample_image):
    frame = cv2.resize(sample_image, (320, 180), interpolation=cv2.INTER_AREA)
    s = Session(ros, tmp_path_factory.mktemp("action_fuzz"), ask_interface, frame)
    yield s
    s.close()


# -- sending goals and reading their outcomes -----------------------------------------------------------
def send(session: Session, goals: list, goal_uuid=None) -> list[Goal]:
    """Send ``goals`` back to back (no wait in between), as a planner's burst."""
    return [session.probe.send_goal_message(goal, goal_uuid=goal_uuid) for goal in goals]


def outcome(goal: Goal, timeout: float = OUTCOME_S):
    """(GoalStatus, typed result) of an accepted goal."""
    goal.result(timeout)
    return goal.status, goal.typed


def check_outcome(status: int, typed, cancelled_by_client: bool = False) -> None:
    """The goal's final status agrees with its typed result, and a result without an answer says why."""
    from action_msgs.msg import GoalStatus

    assert typed.status in ("ok", "busy", "rejected", "expired", "stale", "cancelled", "error"), typed
    expected = GoalStatus.STATUS_SUCCEEDED if typed.status == "ok" else GoalStatus.STATUS_ABORTED
    if typed.status == "cancelled" and cancelled_by_client:
        expected = GoalStatus.STATUS_CANCELED
    assert status == expected, (status, typed)
    assert (typed.status == "ok") == (typed.error == ""), typed
    assert "internal error" not in typed.error, typed


def json_results(session: Session, request_id: str) -> list[dict]:
    return session.probe.results_of(request_id)


def json_results_once_one_came(session: Session, request_id: str) -> list[dict]:
    """``json_results`` once the first has arrived: the JSON result topic and the action's result service travel
    apart, so a goal's typed result may come first."""
    return session.probe.wait_for(lambda: json_results(session, request_id), 30, f"the JSON result of {request_id}")


def settle(session: Session, timeout: float = 60.0) -> dict:
    """Liveness: the node runs, its counters settle with one JSON result for every request it counted, no
    exception reached a safety net, and its diagnostics never paused."""
    probe = session.probe
    assert session.process.proc.poll() is None, f"the agent exited:\n{session.process.log()[-3000:]}"
    try:
        values = probe.wait_for(
            lambda: (
                (v := session.diag())
                and int(v["requests_received"]) == len(probe.results)
                and v["queue_depth"] == "0"
                and v["busy"] == "False"
                and v
            ),
            timeout,
            "as many JSON results as requests received, and an idle worker",
        )
    except TimeoutError:
        raise AssertionError(f"{len(probe.results)} results for {session.diag()}") from None
    assert values["internal_errors"] == "0", (values, session.process.log()[-3000:])
    assert values["_level"] != b"\x02", values
    stamps = [status.stamp for status in list(probe.statuses) if status.node == FQN]
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    assert max(gaps, default=0.0) <= DIAGNOSTICS_GAP_S, f"diagnostics paused for {max(gaps):.1f} s"
    return values


# -- generated goals --------------------------------------------------------------------------------
id_characters = st.characters(blacklist_categories=("Cs", "Cc"))
request_ids = st.one_of(
    st.just(("own", "")),  # a plain unique id
    st.tuples(st.just("own"), st.text(id_characters, max_size=12)),  # unique prefix + any printable text
    st.tuples(st.just("own"), st.integers(MAX_ID_CHARS - 20, MAX_ID_CHARS + 20).map(lambda n: "x" * n)),  # the limit
    st.tuples(st.just("none"), st.just("")),  # the node numbers it
    st.tuples(st.just("blank"), st.sampled_from([" ", "\t", " \u3000 "])),  # refused, under a node id
)
texts = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40),
    st.integers(MAX_CHARS - 5, MAX_CHARS + 5).map(lambda n: "q" * n),  # around max_instruction_chars
    st.sampled_from(["", "   ", '{"text": "q", "keep_ratio": 0.5}', "\u202eevil", "what colour is the square ?"]),
)
EDGE_FLOATS = [0.0, -0.0, math.nan, math.inf, -math.inf, 5e-324, -1.0, 1.0, 1.0000000000000002, 2.0, 1e308]
keep_ratios = st.one_of(st.sampled_from(EDGE_FLOATS), st.floats(0.0, 1.0, exclude_min=True), st.floats())
budgets = st.one_of(st.sampled_from([*EDGE_FLOATS, 1e-9, 3.6e6, 3.6e6 + 1]), st.floats())
token_counts = st.one_of(
    st.sampled_from([0, 1, MAX_NEW_TOKENS_LIMIT, MAX_NEW_TOKENS_LIMIT + 1, 2**32 - 1]), st.integers(0, 2**32 - 1)
)
camera_lists = st.one_of(
    st.just([]),  # the node's default camera
    st.lists(st.sampled_from(["image", "wrist", "", "Image", "image "]), max_size=3),  # its one camera is "image"
    st.lists(st.text(max_size=6), max_size=18),  # any names, more than 16 of them
)
goal_specs = st.tuples(request_ids, texts, keep_ratios, budgets, token_counts, camera_lists)


def expected_refusal(
    request_id: str, text: str, keep_ratio: float, budget: float, tokens: int, cameras: list[str] = ()
) -> str | None:
    """What the node must name when it refuses such a goal; None when it must take it.  Written from the
    documented rules (docs/ros.md), not from the node's code."""
    if request_id and (not request_id.strip() or len(request_id) > MAX_ID_CHARS):
        return "id must have"
    if not text.strip():
        return "instruction text is empty"
    if len(text.strip()) > MAX_CHARS:
        return "the limit is"
    if tokens and tokens > MAX_NEW_TOKENS_LIMIT:
        return "max_new_tokens must be in"
    if not (math.isnan(budget) or budget == 0.0 or 0.0 < budget <= 3.6e6):
        return "latency_budget_ms must be in"
    if not (math.isnan(keep_ratio) or keep_ratio == 0.0 or 0.0 < keep_ratio <= 1.0):
        return "keep_ratio must be in"
    if "" in cameras:
        return "cameras must be a list of camera names"
    if len(cameras) > 16:
        return "the limit is 16"
    if len(set(cameras)) != len(cameras):
        return "names a camera twice"
    if set(cameras) - {"image"}:
        return "unknown camera(s)"
    return None


@fuzz(40)
@given(specs=st.lists(goal_specs, min_size=1, max_size=12))
def test_every_generated_goal_ends_once_under_its_own_id_with_its_reason(session, specs):
    goals, own = [], []
    for (kind, suffix), text, keep_ratio, budget, tokens, cameras in specs:
        request_id = {"own": f"f{next(_numbers)}-{suffix}", "none": "", "blank": suffix}[kind]
        own.append(kind == "own" and expected_refusal(request_id, "q", 0.0, 0.0, 0) is None)
        goals.append(
            session.goal(
                text,
                request_id,
                keep_ratio=keep_ratio,
                latency_budget_ms=budget,
                max_new_tokens=tokens,
                cameras=cameras,
            )
        )
    sent = send(session, goals)
    for s, is_own in zip(sent, own, strict=True):
        g = s.message
        assert s.wait_accepted(OUTCOME_S), g  # rclpy takes every goal with a new UUID; the node refuses with a result
        status, typed = outcome(s)
        check_outcome(status, typed)
        assert typed.request_id == g.request_id if is_own else NODE_ID.fullmatch(typed.request_id), typed
        why = expected_refusal(
            g.request_id, g.instruction, g.keep_ratio, g.latency_budget_ms, g.max_new_tokens, list(g.cameras)
        )
        if why is None:  # error: no frame received yet; expired: a budget of a few ns
            assert typed.status in ("ok", "busy", "stale", "error", "expired"), typed
        else:
            assert typed.status == "rejected" and why in typed.error, (why, typed)
        if is_own:
            mirrored = session.probe.wait_for(lambda rid=g.request_id: json_results(session, rid), 30, "JSON")
            assert len(mirrored) == 1 and mirrored[0]["status"] == typed.status, mirrored
    settle(session)


@pytest.mark.parametrize("size", [200])
def test_a_burst_of_goals_gets_a_response_and_a_result_for_every_goal(session, size):
    session.fresh_frame()
    sent = send(session, [session.goal(max_new_tokens=1) for _ in range(size)])
    started = time.monotonic()
    accepted = sum(s.wait_accepted(OUTCOME_S) for s in sent)
    assert accepted == size, f"{accepted} of {size} goals accepted"
    outcomes = [outcome(s) for s in sent]
    print(
        f"\nburst of {size} goals: {accepted} accepted, {len(outcomes)} results in {time.monotonic() - started:.1f} s"
    )
    for status, typed in outcomes:
        check_outcome(status, typed)
        assert typed.status in ("ok", "busy", "stale"), typed
    time.sleep(0.5)  # room for duplicates
    for s in sent:
        assert len(json_results_once_one_came(session, s.request_id)) == 1, s.request_id
    settle(session)


@fuzz(8)
@given(copies=st.integers(2, 4))
def test_goals_sharing_one_uuid_run_once(session, copies):
    received = int(settle(session)["requests_received"])
    shared = uuid.uuid4()
    from unique_identifier_msgs.msg import UUID

    goal_uuid = UUID(uuid=list(shared.bytes))
    request_id = f"dup{next(_numbers)}"
    sent = send(session, [session.goal(request_id=request_id) for _ in range(copies)], goal_uuid)
    accepted = [s for s in sent if s.wait_accepted(OUTCOME_S)]
    assert len(accepted) == 1, f"{len(accepted)} of {copies} goals with one UUID accepted"
    status, typed = outcome(accepted[0])
    check_outcome(status, typed)
    values = settle(session)
    assert int(values["requests_received"]) == received + 1
    assert len(json_results(session, request_id)) == 1, json_results(session, request_id)


def cancel_all(session: Session):
    """CancelGoal with the zero UUID and stamp: every goal of every client (any peer may)."""
    from action_msgs.srv import CancelGoal

    return session.probe.call(CancelGoal, f"/{NAMESPACE}/ask/_action/cancel_goal", CancelGoal.Request())


@fuzz(10)
@given(
    plans=st.lists(
        st.tuples(st.sampled_from(["none", "once", "twice"]), st.floats(0.0, 0.3), st.integers(1, 30)),
        min_size=1,
        max_size=6,
    ),
    everything=st.booleans(),
)
def test_cancel_storms_end_every_goal_once(session, plans, everything):
    session.fresh_frame()
    sent = send(session, [session.goal(max_new_tokens=tokens) for _, _, tokens in plans])
    assert all(s.wait_accepted(OUTCOME_S) for s in sent)
    cancelled: list[bool] = []
    for s, (how, delay_s, _) in zip(sent, plans, strict=True):
        time.sleep(delay_s)
        for _ in range({"none": 0, "once": 1, "twice": 2}[how]):
            s.cancel(30)
        cancelled.append(how != "none")
    if everything:
        cancel_all(session)
    for s, by_client in zip(sent, cancelled, strict=True):
        status, typed = outcome(s)
        check_outcome(status, typed, cancelled_by_client=by_client or everything)
        if typed.status == "cancelled":
            assert "its client cancelled it" in typed.error, typed
        assert len(json_results_once_one_came(session, s.request_id)) == 1
    settle(session)


@fuzz(2)
@given(count=st.integers(1, 3))
def test_a_client_that_vanishes_mid_goal_leaves_the_node_serving(session, count):
    with AgentClient("vanishing_planner", f"/{NAMESPACE}") as vanishing:
        assert vanishing.wait_for_action(60)
        session.fresh_frame()
        goals = [vanishing.send_goal_message(session.goal(max_new_tokens=4)) for _ in range(count)]
        assert all(g.wait_accepted(60) for g in goals)  # each asked for its result on acceptance
    # gone while its goals wait or run: no cancel, and nobody to take the results
    for g in goals:
        results = session.probe.wait_for(lambda rid=g.request_id: json_results(session, rid), OUTCOME_S, "JSON")
        assert len(results) == 1 and results[0]["status"] in ("ok", "busy", "stale"), results
    settle(session)
    status, typed = outcome(session.probe.send_goal_message(session.goal(max_new_tokens=1)))  # the next is served
    check_outcome(status, typed)


@fuzz(6)
@given(goal_first=st.booleans(), same_time=st.booleans())
def test_a_goal_and_a_topic_request_with_one_id_get_one_result_each(session, goal_first, same_time):
    request_id = f"shared{next(_numbers)}"

    def topic() -> None:
        session.probe.instruct("what colour is the square ?", request_id=request_id)

    if goal_first:
        sent = session.probe.send_goal_message(session.goal(request_id=request_id))
        if not same_time:
            sent.wait_accepted(OUTCOME_S)
        topic()
    else:
        topic()
        if not same_time:
            session.probe.wait_for(lambda: json_results(session, request_id), 30, "the topic request's result")
        sent = session.probe.send_goal_message(session.goal(request_id=request_id))
    status, typed = outcome(sent)
    check_outcome(status, typed)
    assert typed.request_id == request_id
    results = session.probe.wait_for(
        lambda: len(rs := json_results(session, request_id)) >= 2 and rs, 30, "both JSON results"
    )
    settle(session)
    assert len(json_results(session, request_id)) == 2, results
    assert typed.status in {r["status"] for r in results}


def test_after_the_fuzzing_the_node_answers_a_plain_goal(session):
    deadline = time.monotonic() + OUTCOME_S
    while True:
        session.fresh_frame()
        status, typed = outcome(session.probe.send_goal_message(session.goal(max_new_tokens=1)))
        check_outcome(status, typed)
        if typed.status == "ok" or time.monotonic() > deadline:
            break
    assert typed.status == "ok" and typed.visual_tokens_kept > 0, typed
    settle(session)
