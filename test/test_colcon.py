"""colcon builds both packages from one clone, as on a robot: the clone in ``src/ptp_ros`` and the one link
``src/ptp_ros_interfaces -> ptp_ros/ptp_ros_interfaces`` that lets colcon's crawl (which never descends into a
package) find the interface package (docs/ros.md).  Here on top of the pip venv's ROS 2 wheels.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COLCON = shutil.which("colcon", path=str(Path(sys.executable).parent)) or shutil.which("colcon")

pytestmark = [
    pytest.mark.skipif(COLCON is None, reason="colcon is not installed (pip install -e .[dev])"),
    pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed"),
    pytest.mark.skipif(
        not (Path(sys.prefix) / "share" / "rosidl_default_generators").is_dir()
        and not os.environ.get("AMENT_PREFIX_PATH"),
        reason="no ROS 2 build tools: neither the pip wheels (pip install -e .[ros]) nor a sourced ROS",
    ),
]


def colcon(workspace: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for key in ("AMENT_PREFIX_PATH", "CMAKE_PREFIX_PATH"):  # the wheels keep share/ and lib/ in the venv
        env[key] = os.pathsep.join(p for p in (env.get(key), sys.prefix) if p)
    return subprocess.run([COLCON, *args], cwd=workspace, env=env, capture_output=True, text=True, timeout=timeout)


#: a workspace `.ci/run` has just built as below (its `colcon build` output in ``colcon_build.log``): the same
#: build, so the checks read it instead of building it again
CI_WORKSPACE = os.environ.get("PTP_CI_COLCON_WORKSPACE")


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> tuple[Path, str]:
    """(a workspace with this checkout as its one clone, built by ``colcon build``; colcon's output)."""
    if CI_WORKSPACE and (Path(CI_WORKSPACE) / "src" / "ptp_ros").resolve() == ROOT:
        ws = Path(CI_WORKSPACE)
        return ws, (ws / "colcon_build.log").read_text()
    ws = tmp_path_factory.mktemp("colcon_ws")
    (ws / "src").mkdir()
    (ws / "src" / "ptp_ros").symlink_to(ROOT)
    (ws / "src" / "ptp_ros_interfaces").symlink_to(Path("ptp_ros") / "ptp_ros_interfaces")
    done = colcon(ws, "build", "--event-handlers", "console_direct-", "--cmake-args", "-DBUILD_TESTING=OFF")
    assert done.returncode == 0, f"colcon build failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return ws, done.stdout


@pytest.fixture(scope="module")
def workspace(build) -> Path:
    return build[0]


def test_colcon_finds_both_packages_and_builds_the_interfaces_first(build):
    started = [line.split(">>>")[1].strip() for line in build[1].splitlines() if line.startswith("Starting >>>")]
    assert started == ["ptp_ros_interfaces", "ptp_ros"], build[1]


def test_the_install_space_has_the_executables_config_and_index(workspace):
    prefix = workspace / "install" / "ptp_ros"
    for name in ("agent", "camera_replay", "planner", "ptp-demo"):  # what `ros2 run ptp_ros NAME` starts
        assert os.access(prefix / "lib" / "ptp_ros" / name, os.X_OK), name
    assert (prefix / "share" / "ptp_ros" / "package.xml").is_file()
    assert (prefix / "share" / "ptp_ros" / "config" / "agent.yaml").is_file()
    assert (prefix / "share" / "ptp_ros" / "launch" / "agent.launch.py").is_file()
    for package in ("ptp_ros", "ptp_ros_interfaces"):
        index = workspace / "install" / package / "share" / "ament_index" / "resource_index" / "packages"
        assert (index / package).is_file()


def test_the_built_action_imports_from_the_install_space_and_serves(workspace):
    """After sourcing install/setup.bash, the Ask action comes from this workspace and its type support loads
    (an action server and client are created on it)."""
    script = (
        "import rclpy, ptp_ros_interfaces\n"
        "from rclpy.action import ActionClient, ActionServer\n"
        "from ptp_ros_interfaces.action import Ask\n"
        "rclpy.init()\n"
        "node = rclpy.create_node('colcon_check')\n"
        "ActionServer(node, Ask, 'ask', lambda handle: Ask.Result())\n"
        "ActionClient(node, Ask, 'ask')\n"
        "print(ptp_ros_interfaces.__file__, Ask.Feedback.STAGE_DECODING, Ask.Result().latency_ms.total)\n"
        "rclpy.shutdown()\n"
    )
    env = {**os.environ, "ROS_LOG_DIR": str(workspace / "ros_log"), "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST"}
    done = subprocess.run(
        ["bash", "-c", f'. install/setup.bash && {sys.executable} -c "$0"', script],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    module, stage, total = done.stdout.split()
    assert Path(module).resolve().is_relative_to((workspace / "install" / "ptp_ros_interfaces").resolve())
    assert stage == "decoding" and total == "0.0"
