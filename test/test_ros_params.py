"""The parameter table, config/agent.yaml and the node agree; runtime-settable ones are the Settings."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytest.importorskip("rcl_interfaces", reason="ROS 2 is not installed (pip install -e .[ros])")

from ptp_ros.ros.params import BY_NAME, PARAMS, RUNTIME, check_choice  # noqa: E402
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
