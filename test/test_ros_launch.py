"""launch/agent.launch.py: read as source here (launch_ros has no PyPI wheel), run where launch_ros exists."""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch" / "agent.launch.py"
REQUIRED = {"model_path", "image_topic", "instruction_topic", "latency_budget_ms", "params_file", "namespace",
            "use_sim_time", "autostart"}


def calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == name]


def configs_in(node: ast.AST) -> set[str]:
    """Names of the LaunchConfiguration("...") substitutions inside ``node``."""
    return {c.args[0].value for c in calls(node, "LaunchConfiguration")}


@pytest.fixture(scope="module")
def tree() -> ast.Module:
    return ast.parse(LAUNCH.read_text())


def test_declares_the_documented_arguments(tree):
    declared = {c.args[0].value for c in calls(tree, "DeclareLaunchArgument")}
    assert REQUIRED <= declared


def test_every_argument_reaches_a_parameter_remapping_or_the_environment(tree):
    from ptp_ros.ros.params import BY_NAME

    declared = {c.args[0].value for c in calls(tree, "DeclareLaunchArgument")}
    (node,) = calls(tree, "LifecycleNode")
    keywords = {k.arg: k.value for k in node.keywords}
    (set_env,) = calls(tree, "SetEnvironmentVariable")
    profile_args = configs_in(set_env.args[1])
    reached = configs_in(keywords["parameters"]) | configs_in(keywords["remappings"]) | configs_in(keywords["namespace"])
    assert declared - reached == {"fastdds_profile"} and "fastdds_profile" in profile_args

    overrides = next(d for d in keywords["parameters"].elts if isinstance(d, ast.Dict))
    for key, value in zip(overrides.keys, overrides.values):
        assert key.value in BY_NAME or key.value == "use_sim_time", key.value
        assert configs_in(value) == {key.value}, f"{key.value} must come from the argument of the same name"
    remapped = {pair.elts[0].value: configs_in(pair.elts[1]) for pair in keywords["remappings"].elts}
    assert remapped == {"image": {"image_topic"}, "instruction": {"instruction_topic"}}
    assert {k.arg: getattr(k.value, "value", None) for k in node.keywords if k.arg in ("package", "executable")} \
        == {"package": "ptp_ros", "executable": "agent"}


def test_launch_description_builds_where_launch_ros_exists(monkeypatch):
    pytest.importorskip("launch_ros", reason="launch_ros has no PyPI wheel; this runs on a ROS 2 install (colcon)")
    import launch
    from launch.actions import DeclareLaunchArgument
    from launch_ros.actions import LifecycleNode

    monkeypatch.setattr("ament_index_python.packages.get_package_share_directory", lambda _pkg: str(ROOT))
    spec = importlib.util.spec_from_file_location("agent_launch", LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    assert isinstance(description, launch.LaunchDescription)
    names = {e.name for e in description.entities if isinstance(e, DeclareLaunchArgument)}
    assert REQUIRED <= names
    assert sum(isinstance(e, LifecycleNode) for e in description.entities) == 1
