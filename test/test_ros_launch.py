"""launch/agent.launch.py: its wiring read from the source, and the file run for real.

launch_ros has no PyPI wheel: the real run builds the package with colcon into a temporary workspace and
starts ``ros2 launch ptp_ros agent.launch.py ...`` through the vendored ros2/launch (../shared/vendor/
ros2-launch, the real LaunchService); it skips where that folder is absent (a user's clone).  The same
check run on broken copies of the launch file or a missing params file must fail: that proves it checks.
"""

from __future__ import annotations

import ast
import importlib.util
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch" / "agent.launch.py"
REQUIRED = {
    "model_path",
    "image_topic",
    "instruction_topic",
    "latency_budget_ms",
    "params_file",
    "namespace",
    "use_sim_time",
    "autostart",
    "cameras",
    "rviz",
}


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
    reached = (
        configs_in(keywords["parameters"]) | configs_in(keywords["remappings"]) | configs_in(keywords["namespace"])
    )
    assert declared - reached == {"fastdds_profile", "rviz"} and "fastdds_profile" in profile_args
    # rviz reaches start_rviz (test_rviz_true_starts_rviz2_on_the_cameras_config_or_says_it_is_not_installed)
    functions = {k.value.id for c in calls(tree, "OpaqueFunction") for k in c.keywords if k.arg == "function"}
    assert "start_rviz" in functions

    overrides = next(d for d in keywords["parameters"].elts if isinstance(d, ast.Dict))
    for key, value in zip(overrides.keys, overrides.values):
        assert key.value in BY_NAME or key.value == "use_sim_time", key.value
        assert configs_in(value) == {key.value}, f"{key.value} must come from the argument of the same name"
    remapped = {pair.elts[0].value: configs_in(pair.elts[1]) for pair in keywords["remappings"].elts}
    assert remapped == {"image": {"image_topic"}, "instruction": {"instruction_topic"}}
    assert {k.arg: getattr(k.value, "value", None) for k in node.keywords if k.arg in ("package", "executable")} == {
        "package": "ptp_ros",
        "executable": "agent",
    }


def test_launch_description_builds_where_launch_ros_exists(monkeypatch):
    from ros_helpers import VENDOR_LAUNCH

    if VENDOR_LAUNCH.is_dir():  # the vendored ros2/launch sources, where no ROS install provides them
        monkeypatch.syspath_prepend(str(VENDOR_LAUNCH))
    pytest.importorskip("launch_ros", reason="launch_ros has no PyPI wheel; this runs on a ROS 2 install (colcon)")
    from launch.actions import DeclareLaunchArgument
    from launch_ros.actions import LifecycleNode

    import launch

    monkeypatch.setattr("ament_index_python.packages.get_package_share_directory", lambda _pkg: str(ROOT))
    spec = importlib.util.spec_from_file_location("agent_launch", LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    assert isinstance(description, launch.LaunchDescription)
    names = {e.name for e in description.entities if isinstance(e, DeclareLaunchArgument)}
    assert REQUIRED <= names
    assert sum(isinstance(e, LifecycleNode) for e in description.entities) == 1


def test_rviz_true_starts_rviz2_on_the_cameras_config_or_says_it_is_not_installed(monkeypatch, tmp_path):
    from ros_helpers import VENDOR_LAUNCH

    if VENDOR_LAUNCH.is_dir():
        monkeypatch.syspath_prepend(str(VENDOR_LAUNCH))
    pytest.importorskip("launch_ros", reason="launch_ros has no PyPI wheel; this runs on a ROS 2 install (colcon)")
    import yaml
    from ament_index_python.packages import PackageNotFoundError
    from launch.actions import LogInfo
    from launch_ros.actions import Node

    from ptp_ros.ros.rviz import displayed_topics

    installed = {"ptp_ros": str(ROOT)}

    def share(package: str) -> str:
        if package not in installed:
            raise PackageNotFoundError(package)
        return installed[package]

    monkeypatch.setattr("ament_index_python.packages.get_package_share_directory", share)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    spec = importlib.util.spec_from_file_location("agent_launch", LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    class Context:
        launch_configurations = {"rviz": "true", "cameras": "[head, wrist]", "namespace": "/robot"}

    (missing,) = module.start_rviz(Context())
    assert isinstance(missing, LogInfo) and "rviz2 is not installed" in "".join(s.text for s in missing.msg)
    installed["rviz2"] = "/opt/ros/share/rviz2"
    (rviz,) = module.start_rviz(Context())
    assert isinstance(rviz, Node)
    (config,) = tmp_path.glob("ptp_ros_*.rviz")
    assert set(displayed_topics(yaml.safe_load(config.read_text()))) == {
        "/robot/head/image",
        "/robot/saliency/head",
        "/robot/wrist/image",
        "/robot/saliency/wrist",
    }
    Context.launch_configurations["rviz"] = "false"
    assert module.start_rviz(Context()) == []


# -- the real launch ---------------------------------------------------------------------------------------
STARTUP_S = 180.0  # model load + calibration on a busy 2-core box
ANSWER_S = 120.0
STOP_S = 20.0


class LaunchCheckFailed(AssertionError):
    """The launch did not serve one answer and exit cleanly; the message says which step failed."""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``colcon build --packages-select ptp_ros`` of this checkout into a temporary workspace."""
    from ros_helpers import VENDOR_LAUNCH, colcon_build, colcon_executable

    if not VENDOR_LAUNCH.is_dir():
        pytest.skip(f"{VENDOR_LAUNCH} is absent (a user's clone): no ros2/launch sources to run the launch file")
    pytest.importorskip("rclpy", reason="ROS 2 rclpy is not installed (pip install -e .[ros])")
    pytest.importorskip(
        "osrf_pycommon", reason="osrf-pycommon (needed by ros2/launch) is not installed: pip install -e .[ros]"
    )
    if colcon_executable() is None:
        pytest.skip("colcon is not installed (pip install colcon-core colcon-ros colcon-package-selection)")
    return colcon_build(tmp_path_factory.mktemp("colcon_ws"))


@pytest.fixture(scope="module")
def params_file(installed, tmp_path_factory) -> Path:
    """The installed config/agent.yaml with a small calibration, fixed mode and short answers."""
    import yaml

    config = yaml.safe_load((installed / "ptp_ros" / "share" / "ptp_ros" / "config" / "agent.yaml").read_text())
    config["/**"]["ros__parameters"].update(
        mode="fixed", keep_ratio=0.1, max_new_tokens=2, calibration_keep_ratios=[0.1], max_frame_age_ms=0.0
    )
    path = tmp_path_factory.mktemp("params") / "agent_test.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def small_frame(sample_image):
    import cv2

    return cv2.resize(sample_image, (640, 360), interpolation=cv2.INTER_AREA)


def launch_and_ask(
    ros, installed: Path, workdir: Path, target: list[str], arguments: dict, namespace: str, frame
) -> dict:
    """Start the launch, wait until the node serves, ask one question over the JSON topics, SIGINT the launch
    and check that launch and node exit cleanly.  Returns the result; LaunchCheckFailed names the first
    step that went wrong, with the launch's output."""
    from ros_helpers import LaunchProcess, Probe

    launch = LaunchProcess(ros, installed, workdir / "launch.log", target, arguments)
    probe = Probe(namespace=namespace)
    fqn = f"{namespace}/ptp_agent"

    def fail(what: str):
        raise LaunchCheckFailed(f"{what}\n--- launch output ---\n{launch.log()[-4000:]}")

    def wait(predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while not (value := predicate()):
            if (code := launch.proc.poll()) is not None:
                fail(f"the launch exited with {code} while waiting for {what}")
            if "process has died" in launch.log():
                fail(f"the node died while waiting for {what}")
            if time.monotonic() > deadline:
                fail(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.1)
        return value

    try:
        wait(lambda: (v := probe.diag_values(fqn)) and v["model_state"] == "serving", STARTUP_S, "serving")
        wait(
            lambda: probe.image_pub.get_subscription_count() and probe.instruction_pub.get_subscription_count(),
            30,
            "the node's image and instruction subscriptions",
        )
        budget = probe.get_parameter(fqn, "latency_budget_ms")
        if not (isinstance(budget, float) and budget == float(arguments["latency_budget_ms"])):
            fail(f"latency_budget_ms is {budget!r}, the launch argument said {arguments['latency_budget_ms']}")
        if "cameras" in arguments:
            import yaml

            cameras = probe.get_parameter(fqn, "cameras")
            if list(cameras or []) != yaml.safe_load(arguments["cameras"]):
                fail(f"cameras is {cameras!r}, the launch argument said {arguments['cameras']}")
        # best effort: publish until the node counts the frame
        before = int(probe.diag_values(fqn)["frames_received"])
        for attempt in range(20):
            header = probe.send_frame(frame, sec=4200 + attempt, frame_id="launch_camera")
            try:
                probe.wait_for(lambda: int(probe.diag_values(fqn)["frames_received"]) > before, 3.0, "a frame")
                break
            except TimeoutError:
                continue
        else:
            fail("the node never received a camera frame")
        probe.ask(id="launch-1", text="What is on the table?")
        result = wait(lambda: probe.result("launch-1"), ANSWER_S, "the result")
        expected = {
            "status": "ok",
            "stamp": {"sec": header.stamp.sec, "nanosec": header.stamp.nanosec},
            "frame_id": "launch_camera",
            "mode": "fixed",
        }  # the stamp of the frame sent, the params file's mode
        if {k: result.get(k) for k in expected} != expected or abs(result["keep_ratio"] - 0.1) > 0.01:
            fail(f"unexpected result {result}")

        launch.interrupt()
        code = launch.wait(STOP_S)
        if code is None:
            fail(f"the launch still ran {STOP_S:.0f} s after SIGINT")
        log = launch.log()
        if code != 0:
            fail(f"the launch exited with {code} after SIGINT")
        if "process has finished cleanly" not in log or "process has died" in log or "Traceback" in log:
            fail("the node did not exit cleanly after SIGINT")
        return result
    finally:
        probe.close()
        launch.close()


def test_ros2_launch_serves_an_answer_and_exits_cleanly_on_sigint(
    ros, installed, params_file, tiny_model_dir, small_frame, tmp_path
):
    started = time.monotonic()
    result = launch_and_ask(
        ros,
        installed,
        tmp_path,
        ["ptp_ros", "agent.launch.py"],
        {
            "model_path": tiny_model_dir,
            "params_file": params_file,
            "namespace": "/launch_ok",
            "image_topic": "/launch_ok/image",
            "latency_budget_ms": "1500.0",
            "cameras": "[image]",  # a list through launch_ros: the one camera, by its name
        },
        "/launch_ok",
        small_frame,
    )
    assert isinstance(result["answer"], str) and result["visual_tokens_kept"] > 0
    log = (tmp_path / "launch.log").read_text()
    assert f"loading model {tiny_model_dir}" in log  # model_path reached the node
    print(f"real launch: served and stopped in {time.monotonic() - started:.1f} s")


def _mutate(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"the mutation's anchor {old!r} is not (once) in the launch file"
    return text.replace(old, new)


MUTANTS = {
    # a float parameter's argument coerced to int
    "value_type_int_for_a_float": (
        lambda t: _mutate(
            t,
            'LaunchConfiguration("latency_budget_ms"), value_type=float',
            'LaunchConfiguration("latency_budget_ms"), value_type=int',
        ),
        {},
        "invalid literal for int()",
    ),
    # an argument's default outside its choices
    "default_not_in_choices": (
        lambda t: _mutate(
            t, 'default_value="raw",\n            choices=', 'default_value="jpeg",\n            choices='
        ),
        {},
        'default_value "jpeg" is not in provided choices',
    ),
    # an import error in the launch file
    "import_error": (
        lambda t: "import ptp_ros_launch_no_such_module\n" + t,
        {},
        "No module named 'ptp_ros_launch_no_such_module'",
    ),
    # a params file that does not exist
    "missing_params_file": (
        lambda t: t,
        {"params_file": "/nonexistent/ptp_agent.yaml"},
        "params_file: '/nonexistent/ptp_agent.yaml' is not a file",
    ),
}


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_the_launch_check_fails_for_a_broken_launch(
    ros, installed, params_file, tiny_model_dir, small_frame, tmp_path, mutant
):
    mutate, overrides, cause = MUTANTS[mutant]
    launch_file = installed / "ptp_ros" / "share" / "ptp_ros" / "launch" / "agent.launch.py"
    broken = tmp_path / "agent.launch.py"
    broken.write_text(mutate(launch_file.read_text()))
    namespace = f"/launch_{mutant}"
    arguments = {
        "model_path": tiny_model_dir,
        "params_file": params_file,
        "namespace": namespace,
        "image_topic": f"{namespace}/image",
        "latency_budget_ms": "1500.0",
    } | overrides
    started = time.monotonic()
    with pytest.raises(LaunchCheckFailed) as failure:
        launch_and_ask(ros, installed, tmp_path, [str(broken)], arguments, namespace, small_frame)
    assert cause in str(failure.value), str(failure.value)
    assert time.monotonic() - started < 60, "the broken launch should fail at start, not time out"
