"""The parameter table, config/agent.yaml and the node agree; runtime-settable ones are the Settings; a
removed parameter still set by an old params file is named in a warning, not silently ignored."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytest.importorskip("rcl_interfaces", reason="ROS 2 is not installed (pip install -e .[ros])")

from ptp_ros.ros.params import (  # noqa: E402
    BY_NAME,
    PARAMS,
    REMOVED,
    RUNTIME,
    check_choice,
    removed_parameter_warnings,
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


def test_descriptors_carry_ranges_and_choices():
    budget = BY_NAME["latency_budget_ms"].descriptor()
    assert budget.floating_point_range[0].from_value == 1.0 and not budget.read_only
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
