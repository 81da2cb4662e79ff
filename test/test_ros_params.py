"""The parameter table, config/agent.yaml and the node agree; runtime-settable ones are the Settings; a
removed parameter still set by an old params file is named in a warning, not silently ignored.  Over DDS:
rclpy's own use_sim_time and an integer for a float parameter are answered, a burst of changes cannot
flood the log, and a shutdown transition ends the process."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("rcl_interfaces", reason="ROS 2 is not installed (pip install -e .[ros])")

from ptp_ros.ros.params import (  # noqa: E402
    BY_NAME,
    FLOATS,
    PARAMS,
    REMOVED,
    RUNTIME,
    check_choice,
    removed_parameter_warnings,
    widen_integers,
)
from ptp_ros.ros.worker import Settings  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "config" / "agent.yaml"


def test_agent_yaml_documents_every_parameter_with_its_default():
    values = yaml.safe_load(CONFIG.read_text())["/**"]["ros__parameters"]
    assert set(values) == set(BY_NAME)
    for p in PARAMS:
        assert values[p.name] == p.default and type(values[p.name]) is type(p.default), p.name
    text = CONFIG.read_text()
    assert all(f"{name}:" in text for name in BY_NAME)


def test_runtime_parameters_are_exactly_the_settable_ones():
    assert set(RUNTIME) == {p.name for p in PARAMS if not p.read_only}
    assert {"model_path", "device", "dtype"} <= {p.name for p in PARAMS if p.read_only}
    assert Settings(**{name: BY_NAME[name].default for name in RUNTIME}) == Settings()


def test_docs_list_every_parameter_under_its_kind_and_launch_arguments_keep_the_defaults():
    """docs/ros.md's Parameters section names every parameter, read-only ones in its read-only list and the
    runtime-settable ones in the other; a launch argument named like a parameter has that parameter's default."""
    import ast
    import re

    root = Path(__file__).resolve().parents[1]
    section = (root / "docs" / "ros.md").read_text().split("## Parameters\n", 1)[1].split("\n## ", 1)[0]
    read_only_text, rest = section.split("Read-only:", 1)[1].split("Runtime-settable", 1)
    runtime_text = rest.split("At run time", 1)[0]
    names = re.compile(r"`([a-z_]+)`")
    assert set(names.findall(read_only_text)) == {p.name for p in PARAMS if p.read_only}
    assert set(names.findall(runtime_text)) == {p.name for p in PARAMS if not p.read_only}
    launch = (root / "launch" / "agent.launch.py").read_text()
    wired = dict(re.findall(r'DeclareLaunchArgument\(\s*"(\w+)",\s*default_value=("[^"]*")', launch))
    assert {"model_path", "latency_budget_ms", "image_transport", "autostart"} <= set(wired)
    for name, literal in wired.items():
        if name in BY_NAME:
            default = BY_NAME[name].default
            assert ast.literal_eval(literal) == (str(default).lower() if isinstance(default, bool) else str(default))


def test_descriptors_carry_ranges_and_choices():
    budget = BY_NAME["latency_budget_ms"].descriptor()
    assert budget.floating_point_range[0].from_value == 0.0 and not budget.read_only  # 0 itself: Settings.problems
    assert Settings(latency_budget_ms=0.0).problems() and not Settings(latency_budget_ms=0.5).problems()
    assert BY_NAME["max_new_tokens"].descriptor().integer_range[0].to_value == 1024
    assert BY_NAME["model_path"].descriptor().read_only
    assert "budget, fixed" in BY_NAME["mode"].descriptor().additional_constraints
    assert check_choice("mode", "fast") and check_choice("mode", "fixed") is None
    assert Settings(keep_ratio_min=0.9, keep_ratio_max=0.5).problems()


def test_removed_parameters_are_gone_from_the_table_and_the_yaml():
    assert "trust_remote_code" in REMOVED
    assert not set(REMOVED) & set(BY_NAME)
    assert "trust_remote_code" not in CONFIG.read_text()


def test_an_old_params_file_setting_a_removed_parameter_gets_a_warning(ros, tmp_path):
    """What rclpy does with an undeclared parameter: nothing (no error, no value), so the node reads the
    overrides itself; a "/**" file may carry other nodes' parameters, so unknown names stay tolerated."""
    import rclpy
    from rclpy.context import Context
    from rclpy.node import Node

    params = tmp_path / "old.yaml"
    params.write_text("/**:\n  ros__parameters:\n    trust_remote_code: true\n    some_other_nodes_param: 3\n")
    context = Context()
    rclpy.init(context=context, args=["agent", "--ros-args", "--params-file", str(params)])
    try:
        stale = Node("ptp_agent", context=context)
        clean = Node("ptp_agent_clean", context=context, use_global_arguments=False)
        assert not stale.has_parameter("trust_remote_code")
        [warning] = removed_parameter_warnings(stale)
        assert warning.startswith("parameter 'trust_remote_code' is no longer used and is ignored: ")
        assert "internvl_chat" in warning and "\n" not in warning
        assert removed_parameter_warnings(clean) == []
    finally:
        rclpy.shutdown(context=context)


def test_an_integer_for_a_float_parameter_becomes_that_float():
    from rclpy.parameter import Parameter

    [budget, tokens, other] = widen_integers(
        [
            Parameter("latency_budget_ms", value=4000),
            Parameter("max_new_tokens", value=4),
            Parameter("use_sim_time", value=True),
        ]
    )
    assert budget.type_ == Parameter.Type.DOUBLE and budget.value == 4000.0 and isinstance(budget.value, float)
    assert tokens.type_ == Parameter.Type.INTEGER and tokens.value == 4  # an integer parameter stays one
    assert other.type_ == Parameter.Type.BOOL and other.value is True
    assert FLOATS >= {"latency_budget_ms", "keep_ratio", "alpha", "max_frame_age_ms"}
    assert not FLOATS & {"max_new_tokens", "queue_size", "mode"}


def test_parameters_the_node_did_not_declare_are_left_to_rclpy():
    assert check_choice("use_sim_time", True) is None
    assert check_choice("some_plugin.param", "x") is None


# -- over DDS: the agent in its own process, parameters set through its services as `ros2 param set` does -----
NODE = "/params/ptp_params"
STARTUP_S = 180.0  # model load + calibration on a busy 2-core box


@pytest.fixture(scope="module")
def agent(ros, tmp_path_factory):
    from ros_helpers import NodeProcess

    node = NodeProcess(
        ros,
        tmp_path_factory.mktemp("params") / "agent.log",
        node_name="ptp_params",
        namespace="/params",
        params={"mode": "fixed", "keep_ratio": 0.1, "max_new_tokens": 1, "calibration_keep_ratios": [0.1]},
    )
    yield node
    code = node.stop()
    assert code == 0, f"agent exited with {code}:\n{node.log()[-3000:]}"


@pytest.fixture(scope="module")
def probe(ros, agent):
    from ros_helpers import Probe

    p = Probe(namespace="/params")
    try:
        p.wait_for(lambda: (v := p.diag_values(NODE)) and v["model_state"] == "serving", STARTUP_S, "serving")
    except TimeoutError:
        pytest.fail(f"the agent never served:\n{agent.log()[-3000:]}")
    yield p
    p.close()


def test_use_sim_time_is_answered_and_a_parameter_beside_it_applied(probe):
    from rcl_interfaces.srv import SetParameters
    from rclpy.parameter import Parameter

    # one call, two parameters, as `ros2 param load` sends them: one result each
    request = SetParameters.Request(
        parameters=[
            Parameter("use_sim_time", value=True).to_parameter_msg(),
            Parameter("keep_ratio", value=0.2).to_parameter_msg(),
        ]
    )
    results = probe.call(SetParameters, f"{NODE}/set_parameters", request).results
    assert [r.successful for r in results] == [True, True], [r.reason for r in results]
    assert probe.get_parameter(NODE, "use_sim_time") is True
    assert probe.get_parameter(NODE, "keep_ratio") == pytest.approx(0.2)
    [back] = probe.set_parameters(NODE, {"use_sim_time": False})
    assert back.successful, back.reason
    assert probe.get_parameter(NODE, "use_sim_time") is False
    assert probe.diag_values(NODE)["internal_errors"] == "0"


def test_an_integer_latency_budget_is_accepted_as_a_float(probe):
    [outcome] = probe.set_parameters(NODE, {"latency_budget_ms": 4000})  # what `ros2 param set ... 4000` sends
    assert outcome.successful, outcome.reason
    value = probe.get_parameter(NODE, "latency_budget_ms")
    assert value == 4000.0 and isinstance(value, float)
    probe.wait_for(lambda: probe.diag_values(NODE)["latency_budget_ms"] == "4000", 10, "the new budget in use")
    [too_big] = probe.set_parameters(NODE, {"latency_budget_ms": 10**12})  # still range-checked
    assert not too_big.successful
    [wrong] = probe.set_parameters(NODE, {"max_new_tokens": 2.5})  # a float for an integer is still refused
    assert not wrong.successful


def test_a_burst_of_parameter_sets_writes_a_bounded_log(probe, agent):
    from rcl_interfaces.srv import SetParameters
    from rclpy.parameter import Parameter
    from ros_helpers import wait_future

    def changed_lines() -> int:
        return agent.log().count("parameters changed")

    from ptp_ros.ros.node import LOG_THROTTLE_S

    client = probe.node.create_client(SetParameters, f"{NODE}/set_parameters")
    assert client.wait_for_service(timeout_sec=20)
    time.sleep(LOG_THROTTLE_S)  # the tests before set parameters too: their line must not throttle the burst's first
    before, started = changed_lines(), time.monotonic()
    calls = 300
    for i in range(calls):
        msg = Parameter("alpha", value=0.3 + 0.1 * (i % 2)).to_parameter_msg()
        response = wait_future(client.call_async(SetParameters.Request(parameters=[msg])), 20, "set_parameters")
        assert response.results[0].successful
    elapsed = time.monotonic() - started
    probe.node.destroy_client(client)
    time.sleep(0.5)  # let the last line reach the log file
    written = changed_lines() - before
    assert 1 <= written <= 2 + elapsed / 5.0, f"{written} lines for {calls} changes in {elapsed:.1f} s"


def test_a_shutdown_transition_finalizes_the_node_and_ends_the_process(probe, agent):
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState

    request = ChangeState.Request(transition=Transition(id=Transition.TRANSITION_ACTIVE_SHUTDOWN))
    assert probe.call(ChangeState, f"{NODE}/change_state", request).success
    probe.wait_for(lambda: probe.diag_values(NODE)["model_state"] == "finalized", 10, "finalized diagnostics")
    assert "not serving: model finalized" in probe.diag_values(NODE)["_message"]
    assert agent.proc.wait(20) == 0, agent.log()[-3000:]
    assert "shutting down (the shutdown transition)" in agent.log()
