"""The soak's bookkeeping over real DDS: its planner against a stand-in agent (an ``ask`` action server and the
JSON topics, in this process) that answers each request as the test scripts it, so every figure of the report
is known in advance: goals rejected, answered with each status, accepted and never answered (lost), answered
twice on ``result`` (duplicated), and topic instructions answered beside them."""

from __future__ import annotations

import json
import time

import pytest

rclpy = pytest.importorskip("rclpy", reason="ROS 2 rclpy is not installed (pip install -e .[ros])")

from ptp_ros.ros import ask_action  # noqa: E402
from ptp_ros.ros.client import SpinningNode  # noqa: E402
from ptp_ros.ros.topics import INSTRUCTION, RESULT, reliable  # noqa: E402
from ptp_ros_bench import soak  # noqa: E402

NAMESPACE = "/soak_test"
WAIT_S = 60.0  # DDS discovery on a loaded machine
STATUSES = ("ok", "busy", "stale", "ok")  # the answered goals' statuses, by index
SETTINGS = {"interval_s": 2.0, "burst": 200, "burst_every_s": 300.0, "goal_burst": 44, "goal_burst_every_s": 60.0}


class StandIn(SpinningNode):
    """The agent's interfaces, scripted by request id: ``rej-*`` goals are rejected, ``hold`` is accepted and
    never executed, ``dup`` gets its JSON result twice, ``g-<i>`` ends with ``STATUSES[i % 4]``; every
    instruction is answered ``ok``."""

    def __init__(self, Ask):
        from rclpy.action import ActionServer, GoalResponse
        from std_msgs.msg import String

        self.Ask, self.String = Ask, String
        super().__init__("stand_in_agent", NAMESPACE)
        self.pub = self.node.create_publisher(String, RESULT, reliable(1000))
        self.node.create_subscription(String, INSTRUCTION, self._on_instruction, reliable(1000))
        self.server = ActionServer(
            self.node,
            Ask,
            ask_action.ACTION_NAME,
            self._execute,
            goal_callback=lambda goal: (
                GoalResponse.REJECT if goal.request_id.startswith("rej") else GoalResponse.ACCEPT
            ),
            handle_accepted_callback=lambda handle: None if handle.request.request_id == "hold" else handle.execute(),
            **ask_action.action_qos(1000),
        )

    def _publish(self, result: dict) -> None:
        self.pub.publish(self.String(data=json.dumps(result)))

    def _on_instruction(self, msg) -> None:
        self._publish({"id": json.loads(msg.data)["id"], "status": "ok", "latency_ms": {"total": 5.0}})

    def _execute(self, handle):
        request_id = handle.request.request_id
        status = STATUSES[int(request_id.split("-")[1]) % len(STATUSES)] if request_id.startswith("g-") else "ok"
        result = {"id": request_id, "status": status} | ({"latency_ms": {"total": 10.0}} if status == "ok" else {})
        for _ in range(2 if request_id == "dup" else 1):
            self._publish(result)
        handle.succeed() if status == "ok" else handle.abort()
        return ask_action.result_message(self.Ask, result)

    def destroy_entities(self) -> None:
        self.server.destroy()


def wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"{what} within {WAIT_S:.0f} s"
        time.sleep(0.05)


@pytest.fixture
def planner_and_agent(ros, ask_interface):
    agent = StandIn(ask_interface)
    planner = soak.Planner(NAMESPACE, goals=True)
    yield planner, agent
    planner.close()
    agent.close()


def test_the_report_counts_each_goal_and_instruction_as_it_was_answered(planner_and_agent):
    planner, agent = planner_and_agent
    assert planner.wait_for_action(WAIT_S), "the stand-in's ask action never appeared"
    wait_until(
        lambda: planner.instruction_pub.get_subscription_count() and agent.pub.get_subscription_count(),
        "the topics matched",
    )
    for i in range(3):
        planner.send_instruction(f"q{i}", "regular", "Is the door open?")
    goals = [f"g-{i}" for i in range(40)] + ["rej-0", "rej-1", "hold", "dup"]
    planner.send_goals([(request_id, "What is on the table?") for request_id in goals])
    sent = planner.goals.values()
    wait_until(lambda: all(g.accepted is not None for g in sent), "a goal response for every goal")
    wait_until(lambda: sum(g.outcome is not None for g in sent) == len(goals) - 3, "a result for every executed goal")
    wait_until(lambda: planner.topic.copies("dup") == 2 and len(planner.topic.results) >= 44, "the JSON results")

    report = soak.summarise(planner, [], 1.0, SETTINGS, {}, 0, None)
    goals_report = report["goals"]
    assert {k: goals_report[k] for k in ("sent", "accepted", "rejected", "no_goal_response", "results")} == {
        "sent": 44,
        "accepted": 42,
        "rejected": 2,
        "no_goal_response": 0,
        "results": 41,
    }
    assert goals_report["accepted_without_result"] == goals_report["lost"] == 1  # "hold"
    assert goals_report["duplicated"] == 1  # "dup", twice on the JSON topic
    assert goals_report["statuses"] == {"ok": 21, "busy": 10, "stale": 10}
    assert goals_report["latency_ms_ok"]["count"] == 21 and goals_report["latency_ms_ok"]["p50"] == 10.0
    assert goals_report["json_results"] == 41
    assert report["regular"] | {"latency_ms_ok": None} == {
        "sent": 3,
        "results": 3,
        "lost": 0,
        "duplicated": 0,
        "statuses": {"ok": 3},
        "latency_ms_ok": None,
    }
    assert report["all"]["sent"] == 3, "goals are not counted as instructions"
    text = soak.markdown(report)
    assert "| goal bursts | 44 | 41 | 1 | 1 | busy 10, ok 21, stale 10 | 10.0 / 10.0 / 10.0 |" in text
    assert "42 accepted, 2 rejected, 0 none; 1 accepted without a result" in text


def test_help_prints_the_whole_docstring(capsys):
    with pytest.raises(SystemExit) as exited:
        soak.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert soak.__doc__.strip().splitlines()[-1] in out
    assert "--goal-burst-every-s" in out
