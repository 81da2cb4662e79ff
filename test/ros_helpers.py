"""Helpers for the ROS tests: an isolated DDS environment, the node as a subprocess, a probe node in
the test process, and an adapter with an injected slow stage.

``wait_future`` is the client's (ptp_ros.ros.client), imported here for the tests that take it from this module.

Run as a script, this file starts the agent node with the slow adapter:
    python test/ros_helpers.py --generate-delay-s 3 --ros-args -p ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ptp_ros.pipeline import Cancelled
from ptp_ros.ros.demo import fastdds_profile_variable

try:
    from ptp_ros.ros.client import AgentClient, AgentStatus, SpinningNode, wait_future
    from ptp_ros.ros.topics import reliable
except ImportError:  # no ROS 2 here: the tests that need these skip themselves (importorskip) before using them
    AgentClient = SpinningNode = object
    AgentStatus = reliable = wait_future = None

ROOT = Path(__file__).resolve().parents[1]
SHM_PROFILE = ROOT / "config" / "fastdds_shm.xml"
#: The agent most ROS tests run: fixed mode, one generated token, a queue of 2, no saliency drawing, calibrated
#: at its one keep ratio: quick to start and to answer.  A test adds what it is about (``AGENT_PARAMS | {...}``).
AGENT_PARAMS: dict[str, Any] = {
    "mode": "fixed",
    "keep_ratio": 0.05,
    "max_new_tokens": 1,
    "queue_size": 2,
    "publish_saliency": False,
    "calibration_keep_ratios": [0.05],
}


#: A diagnostics period for tests that wait for fresh diagnostics again and again (``NodeProcess``); the node's is 1 s.
FAST_DIAGNOSTICS_S = 0.2


class SlowAdapter:
    """Wraps a real adapter; ``generate`` takes ``delay_s + ms_per_token·kept`` longer, charged to prefill
    like any slow model would be.  Everything else is the real model."""

    def __init__(self, inner, delay_s: float = 0.0, ms_per_token: float = 0.0):
        self.inner = inner
        self.delay_s, self.ms_per_token = delay_s, ms_per_token

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def generate(self, prepared, visual, kept, max_new_tokens, cancel=None, in_llm=None):
        def slow_stage(n: int) -> float:
            extra_s = self.delay_s + self.ms_per_token * n / 1e3
            if cancel is None:
                time.sleep(extra_s)
            elif cancel.wait(extra_s):  # a slow model that still honours cancellation
                raise Cancelled("cancelled during the injected slow stage")
            return extra_s

        if in_llm is None:
            extra_s = slow_stage(visual.num_tokens if kept is None else int(kept.numel()))
            out = self.inner.generate(prepared, visual, kept, max_new_tokens, cancel=cancel)
            return dataclasses.replace(out, prefill_ms=out.prefill_ms + extra_s * 1e3)
        plan, choose = in_llm

        def slow_choose(rows):  # pruned inside the LLM: the kept count is known here, within the prefill
            chosen = choose(rows)
            slow_stage(int(chosen.numel()))
            return chosen

        return self.inner.generate(prepared, visual, kept, max_new_tokens, cancel=cancel, in_llm=(plan, slow_choose))


def _domain() -> int:
    """A random ROS domain in 100-230; under pytest-xdist each worker draws from its own share, so that two
    workers' nodes never meet."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    share = 131 // workers
    return 100 + worker * share + random.Random(os.getpid() ^ time.time_ns()).randrange(share)


def ros_env(log_dir: Path) -> dict[str, str]:
    """Environment for one isolated test run: own domain, localhost only, logs in ``log_dir``, SHM profile."""
    env = dict(os.environ)
    env.pop("RMW_IMPLEMENTATION", None)  # any RMW but the installed one kills `import rclpy`
    env[fastdds_profile_variable()] = str(SHM_PROFILE)
    env.update(
        ROS_DOMAIN_ID=str(_domain()),
        ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
        ROS_LOG_DIR=str(log_dir),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def apply_env(env: dict[str, str]) -> None:
    """Make this (test) process use ``env``'s ROS settings too: rclpy reads them at init."""
    for key in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE", "ROS_LOG_DIR", fastdds_profile_variable()):
        os.environ[key] = env[key]


class NodeProcess:
    """The agent node in its own process, as on a robot; output goes to ``log_path``.  ``diagnostics_period_s``
    below the node's 1 s: for tests that wait for the diagnostics after every step (and check no rate)."""

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        params: dict[str, Any],
        generate_delay_s: float = 0.0,
        node_name: str = "ptp_agent",
        namespace: str = "/",
        load_delay_s: float = 0.0,
        remaps: dict[str, str] | None = None,
        diagnostics_period_s: float = 1.0,
    ):
        args = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--generate-delay-s",
            str(generate_delay_s),
            "--load-delay-s",
            str(load_delay_s),
            "--diagnostics-period-s",
            str(diagnostics_period_s),
            "--ros-args",
            "-r",
            f"__node:={node_name}",
            "-r",
            f"__ns:={namespace}",
        ]
        for source, target in (remaps or {}).items():
            args += ["-r", f"{source}:={target}"]
        for key, value in params.items():
            args += ["-p", f"{key}:={json.dumps(value) if isinstance(value, (list, bool)) else value}"]
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class Probe(AgentClient):
    """The tests' planner: the package's client (results, diagnostics, the ask action) with a camera (raw and
    compressed image publishers; ``camera_pub`` for a named camera's), and every result, answer, saliency image
    and agent status kept in order."""

    def __init__(self, namespace: str = "/"):
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import CompressedImage, Image
        from std_msgs.msg import String

        from ptp_ros.ros.topics import ANSWER, IMAGE, SALIENCY

        self.results: list[dict] = []
        self.answers: list[str] = []
        self.saliency: list = []
        self.statuses: list[AgentStatus] = []
        self._camera_pubs: dict[tuple[str, bool], Any] = {}
        super().__init__("probe", namespace, depth=1000)  # deep enough for the tests' bursts on both ends
        self.image_pub = self.node.create_publisher(Image, IMAGE, qos_profile_sensor_data)
        self.compressed_pub = self.node.create_publisher(
            CompressedImage, f"{IMAGE}/compressed", qos_profile_sensor_data
        )
        self.subscribe(String, ANSWER, lambda m: self._keep(self.answers, m.data), reliable(1000))
        self.subscribe(Image, SALIENCY, lambda m: self._keep(self.saliency, m))

    def camera_pub(self, camera: str, compressed: bool = False):
        """The image publisher of the agent's camera ``camera`` (``NAME/image``, or its ``/compressed``)."""
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import CompressedImage, Image

        from ptp_ros.ros.topics import camera_image

        key = (camera, compressed)
        if key not in self._camera_pubs:
            kind, transport = (CompressedImage, "compressed") if compressed else (Image, "raw")
            topic = camera_image(camera, transport)
            self._camera_pubs[key] = self.node.create_publisher(kind, topic, qos_profile_sensor_data)
        return self._camera_pubs[key]

    def _keep(self, bucket: list, item) -> None:
        with self._cond:
            bucket.append(item)

    def on_result(self, result: dict) -> None:
        self._keep(self.results, result)

    def on_status(self, status: AgentStatus) -> None:
        self._keep(self.statuses, status)

    def diag_values(self, node_fqn: str) -> dict[str, Any] | None:
        """The newest diagnostics values of ``node_fqn``, with ``_message`` and ``_level`` as the message carries
        it (a byte: ``b"\\x01"`` is WARN), as the tests compare it."""
        status = self.status(node_fqn)
        return None if status is None else status.to_dict() | {"_level": status.level.to_bytes(1, "little")}

    def results_of(self, request_id: str) -> list[dict]:
        """Every result of ``request_id`` so far (they stay: unlike ``wait_result``, nothing is claimed)."""
        with self._cond:
            return [r for r in self.results if r.get("id") == request_id]

    def result(self, request_id: str) -> dict | None:
        """The first result of ``request_id`` so far."""
        return next(iter(self.results_of(request_id)), None)

    def ask(self, plain: str | None = None, **fields) -> None:
        """``publish`` of ``plain`` text, or of the JSON object of ``fields``: the spelling the older tests use."""
        self.publish(plain if plain is not None else fields)

    def count(self, status: str | None = None) -> int:
        with self._cond:
            return sum(1 for r in self.results if status is None or r.get("status") == status)

    def wait_results(self, count: int, timeout: float, settle_s: float = 0.3) -> list[dict]:
        """Wait until ``count`` results have arrived in all, then ``settle_s`` for extra (duplicate) ones."""
        self.wait_for(lambda: len(self.results) >= count, timeout, f"{count} results (have {len(self.results)})")
        time.sleep(settle_s)
        with self._cond:
            return list(self.results)

    def send_frame(
        self,
        rgb: np.ndarray,
        sec: int,
        frame_id: str = "camera",
        encoding: str = "rgb8",
        mutate: Callable | None = None,
        camera: str | None = None,
    ):
        from std_msgs.msg import Header

        from ptp_ros.ros.conversions import array_to_imgmsg

        msg = array_to_imgmsg(rgb, encoding, Header(frame_id=frame_id))
        msg.header.stamp.sec, msg.header.stamp.nanosec = sec, 123
        if mutate is not None:
            mutate(msg)
        (self.image_pub if camera is None else self.camera_pub(camera)).publish(msg)
        return msg.header

    def wait_matched(self, timeout: float = 30.0) -> None:
        """Discovery: wait until the agent subscribes to our image and instruction topics."""
        self.wait_for(
            lambda: self.image_pub.get_subscription_count() > 0 and self.instruction_pub.get_subscription_count() > 0,
            timeout,
            "the agent's subscriptions",
        )

    def call(self, srv_type, name: str, request, timeout: float = 20.0):
        """A service call that waits in this thread while the probe spins in its own."""
        client = self.node.create_client(srv_type, name)
        try:
            if not client.wait_for_service(timeout_sec=timeout):
                raise TimeoutError(f"service {name} not available")
            return wait_future(client.call_async(request), timeout, f"service {name}")
        finally:
            self.node.destroy_client(client)

    def set_parameters(self, node_fqn: str, params: dict[str, Any], timeout: float = 20.0):
        """Set parameters over the node's service; the list of SetParametersResult."""
        from rcl_interfaces.srv import SetParameters
        from rclpy.parameter import Parameter

        msgs = [Parameter(k, value=v).to_parameter_msg() for k, v in params.items()]
        return self.call(
            SetParameters, f"{node_fqn}/set_parameters", SetParameters.Request(parameters=msgs), timeout
        ).results

    def get_parameter(self, node_fqn: str, name: str, timeout: float = 20.0):
        from rcl_interfaces.srv import GetParameters
        from rclpy.parameter import parameter_value_to_python

        response = self.call(GetParameters, f"{node_fqn}/get_parameters", GetParameters.Request(names=[name]), timeout)
        return parameter_value_to_python(response.values[0])


# -- colcon and the real `ros2 launch` (vendored ros2/launch, ../shared/vendor/ros2-launch) -----------------
VENDOR_LAUNCH = ROOT.parent / "shared" / "vendor" / "ros2-launch"


def colcon_executable() -> str | None:
    """colcon from this venv, else from PATH."""
    import shutil

    return shutil.which("colcon", path=str(Path(sys.executable).parent)) or shutil.which("colcon")


def colcon_build(workspace: Path) -> Path:
    """``colcon build --base-paths <repo>`` of the ``ptp_ros`` package into ``workspace`` (build/, install/,
    log/; nothing written in the repository); returns the install base.  RuntimeError with colcon's output
    on failure.  colcon's crawl stops at the repository root, which is the ptp_ros package; with
    colcon-package-selection installed ``--packages-select ptp_ros`` makes sure of it."""
    import importlib.util

    colcon = colcon_executable()
    if colcon is None:
        raise RuntimeError("colcon is not installed")
    env = dict(os.environ)
    env["AMENT_PREFIX_PATH"] = os.pathsep.join(p for p in (env.get("AMENT_PREFIX_PATH"), sys.prefix) if p)
    install = workspace / "install"
    select = ["--packages-select", "ptp_ros"] if importlib.util.find_spec("colcon_package_selection") else []
    done = subprocess.run(
        [
            colcon,
            "--log-base",
            str(workspace / "log"),
            "build",
            "--base-paths",
            str(ROOT),
            "--build-base",
            str(workspace / "build"),
            "--install-base",
            str(install),
            *select,
        ],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0 or not (install / "ptp_ros" / "share" / "ptp_ros" / "package.xml").is_file():
        raise RuntimeError(f"colcon build failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return install


def launch_env(env: dict[str, str], install: Path, package: str = "ptp_ros") -> dict[str, str]:
    """``env`` plus what sourcing ``install/setup.bash`` would add for ``package``, and the vendored launch."""
    prefix = install / package
    site = prefix / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    out = dict(env)
    out["AMENT_PREFIX_PATH"] = os.pathsep.join([str(prefix), sys.prefix])
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(VENDOR_LAUNCH), str(site), env.get("PYTHONPATH")) if p)
    return out


class LaunchProcess:
    """``ros2 launch TARGET name:=value ...`` (the vendored stand-in, the real LaunchService) in its own
    process group; output goes to ``log_path``."""

    def __init__(
        self, env: dict[str, str], install: Path, log_path: Path, target: list[str], arguments: dict[str, Any]
    ):
        args = [
            sys.executable,
            str(VENDOR_LAUNCH / "ros2_launch.py"),
            *target,
            *(f"{key}:={value}" for key, value in arguments.items()),
        ]
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            args,
            env=launch_env(env, install),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=log_path.parent,
            start_new_session=True,
            # a shell's background job starts with SIGINT ignored, and the launch service hears signals only
            # through Python's own handler, which Python does not install for an ignored signal
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def interrupt(self) -> None:
        """SIGINT to the launch process (``kill -INT``), which forwards it to the node: the stand-in runs
        non-interactive.  (A terminal's Ctrl-C reaches the whole group; an interactive ``ros2 launch`` then
        does not forward it, a non-interactive one does, and the node gets two.)"""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)

    def wait(self, timeout: float) -> int | None:
        """The launch's exit code, or None if it still runs after ``timeout`` s."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        """Make sure nothing of this launch is left running."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self._log.close()


# -- bags ---------------------------------------------------------------------------------------------------
class BagRecorder(SpinningNode):
    """``ros2 bag record`` for tests: subscribes to ``topics`` (name → message class), keeps every message as
    received (serialized CDR, logged at its arrival time) and writes them into a rosbag2 bag with ``rosbags``
    on ``close`` (sqlite3 objects stay in the thread that made them)."""

    def __init__(self, path: Path, topics: dict[str, type], qos=None):
        from rclpy.qos import qos_profile_sensor_data

        self.path = path
        self.topics = {topic: f"{cls.__module__.split('.')[0]}/msg/{cls.__name__}" for topic, cls in topics.items()}
        self._lock = threading.Lock()
        self._messages: list[tuple[str, int, bytes]] = []
        self.counts = dict.fromkeys(topics, 0)
        super().__init__("bag_recorder")
        for topic, cls in topics.items():
            self.node.create_subscription(
                cls, topic, lambda raw, t=topic: self._keep(t, raw), qos or qos_profile_sensor_data, raw=True
            )

    def _keep(self, topic: str, raw: bytes) -> None:
        with self._lock:
            self._messages.append((topic, time.time_ns(), bytes(raw)))
            self.counts[topic] += 1

    def close(self) -> None:
        from rosbags.rosbag2 import StoragePlugin, Writer
        from rosbags.typesys import Stores, get_typestore

        super().close()
        store = get_typestore(Stores.ROS2_KILTED)
        with Writer(self.path, version=9, storage_plugin=StoragePlugin.SQLITE3) as writer:
            connections = {
                topic: writer.add_connection(topic, msgtype, typestore=store) for topic, msgtype in self.topics.items()
            }
            with self._lock:
                for topic, log_ns, raw in self._messages:
                    writer.write(connections[topic], log_ns, raw)


def read_bag(path: Path) -> list[tuple[str, str, int, bytes]]:
    """Every message of a bag in order: (topic, message type, log time ns, serialized bytes)."""
    from rosbags.highlevel import AnyReader

    with AnyReader([path]) as reader:
        return [(c.topic, c.msgtype, t, bytes(raw)) for c, t, raw in reader.messages()]


def _slow_node_main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--generate-delay-s", type=float, default=0.0)
    parser.add_argument("--load-delay-s", type=float, default=0.0)
    parser.add_argument("--diagnostics-period-s", type=float, default=1.0)
    known, ros_args = parser.parse_known_args()

    from rclpy.lifecycle import TransitionCallbackReturn

    from ptp_ros.ros.node import AgentNode, main

    class SlowAgentNode(AgentNode):
        """The real node whose model takes ``--load-delay-s`` longer to load (uninterruptibly, like
        ``from_pretrained``) and ``--generate-delay-s`` longer per answer once calibrated, and which publishes its
        diagnostics every ``--diagnostics-period-s``."""

        def __init__(self):
            super().__init__()
            (timer,) = [t for t in self.timers if t.callback == self._publish_diagnostics]
            timer.timer_period_ns = int(known.diagnostics_period_s * 1e9)

        def load_model(self):
            time.sleep(known.load_delay_s)
            return SlowAdapter(super().load_model())

        def on_configure(self, state):
            outcome = super().on_configure(state)
            if outcome == TransitionCallbackReturn.SUCCESS:
                self.worker.adapter.delay_s = known.generate_delay_s
            return outcome

    main(args=[sys.argv[0], *ros_args], node_class=SlowAgentNode)


if __name__ == "__main__":
    _slow_node_main()
