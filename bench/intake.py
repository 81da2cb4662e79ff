"""Intake cost: what the agent node spends on camera frames that no request asks about.

    python -m bench.intake --seconds 30                    # idle, 1080p@10, 1080p@30 and 4K@30
    python -m bench.intake --cases 540p@10 4k@30 --json out.json

Three processes over DDS (localhost, the shared-memory profile config/fastdds_shm.xml), as on a robot: a
camera that publishes one pre-built raw rgb8 frame at the case's rate (best effort, sensor-data QoS), the
agent node (built-in model, no requests), and the baseline: a bare rclpy node whose one subscription on a
SingleThreadedExecutor only counts frames, the least a Python node can pay for the same frames.  Both
subscribe to the same camera at the same time, so they see the same frames under the same load.

Over each case's window the bench reads every process's CPU time (utime + stime of all its threads, from
/proc/<pid>/stat; in % of one core) and the rate of frames that reached it (the node's ``frames_received``
on /diagnostics, the baseline's own count, the camera's published count).  The load average before and
after each case says how contended the machine was; other processes' CPU use is not subtracted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ptp_ros.ros.demo import stop_process

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "/intake"
SIZES = {"540p": (960, 540), "720p": (1280, 720), "1080p": (1920, 1080), "4k": (3840, 2160)}
DEFAULT_CASES = ("idle", "1080p@10", "1080p@30", "4k@30")
REPORT_S = 0.5  # how often the camera and the baseline print their counts
SUBSCRIBERS = 2  # the node and the baseline: the camera starts once both are matched
CLK_TCK = os.sysconf("SC_CLK_TCK")


def parse_case(case: str) -> tuple[int, int, float] | None:
    """``1080p@10`` → (1920, 1080, 10.0); ``idle`` (no camera) → None."""
    if case == "idle":
        return None
    size, _, rate = case.lower().partition("@")
    if size not in SIZES or not rate:
        raise argparse.ArgumentTypeError(f"case {case!r}: expected idle or SIZE@HZ with SIZE in {', '.join(SIZES)}")
    return (*SIZES[size], float(rate))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of every thread of ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5), after pid and comm


# -- the two helper processes (run as ``python -m bench.intake --camera/--baseline``) -----------------------
def report_counts(label: str, count) -> None:
    """Print ``label <monotonic s> <count>`` every REPORT_S (CLOCK_MONOTONIC is the same in every process)."""
    while True:
        print(f"{label} {time.monotonic():.4f} {count()}", flush=True)
        time.sleep(REPORT_S)


def run_camera(width: int, height: int, rate: float) -> None:
    """Publish one random rgb8 frame, stamped anew each time, at ``rate`` once both subscribers matched.
    A late publish is not caught up with a burst: the schedule restarts from now."""
    import numpy as np
    import rclpy
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    from ptp_ros.ros.conversions import array_to_imgmsg

    rclpy.init()
    node = rclpy.create_node("intake_camera", namespace=NAMESPACE)
    pub = node.create_publisher(Image, "image", qos_profile_sensor_data)
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    msg = array_to_imgmsg(pixels, "rgb8")
    msg.header.frame_id = "camera"
    while rclpy.ok() and pub.get_subscription_count() < SUBSCRIBERS:
        time.sleep(0.05)
    published = 0
    threading.Thread(target=report_counts, args=("published", lambda: published), daemon=True).start()
    period, due = 1.0 / rate, time.monotonic()
    try:
        while rclpy.ok():
            msg.header.stamp = node.get_clock().now().to_msg()
            pub.publish(msg)
            published += 1
            due += period
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
            else:
                due = time.monotonic()
    except KeyboardInterrupt:
        pass
    finally:
        rclpy.try_shutdown()


def run_baseline() -> None:
    """A bare rclpy subscriber: one sensor-data subscription on a SingleThreadedExecutor that counts."""
    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    rclpy.init()
    node = rclpy.create_node("intake_baseline", namespace=NAMESPACE)
    received = 0

    def count(_msg: Image) -> None:
        nonlocal received
        received += 1

    node.create_subscription(Image, "image", count, qos_profile_sensor_data)
    threading.Thread(target=report_counts, args=("received", lambda: received), daemon=True).start()
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        rclpy.try_shutdown()


# -- the measurement ---------------------------------------------------------------------------------------
class Series:
    """(monotonic s, count) samples, appended from a reader thread."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int]] = []
        self._lock = threading.Lock()

    def add(self, t: float, count: int) -> None:
        with self._lock:
            self.samples.append((t, count))

    def rate(self, start: float, end: float) -> float | None:
        """Counts per second between the first sample at or after ``start`` and the last at or before ``end``."""
        with self._lock:
            inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return None
        (t0, c0), (t1, c1) = inside[0], inside[-1]
        return (c1 - c0) / (t1 - t0)


class Child:
    """A process of this module in another role, its ``label t count`` lines read into a Series."""

    def __init__(self, role: list[str], env: dict[str, str]):
        self.series = Series()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", __spec__.name, *role],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            parts = line.split()
            if len(parts) == 3 and parts[0] in ("published", "received"):
                self.series.add(float(parts[1]), int(parts[2]))

    def stop(self) -> None:
        stop_process(self.proc)


class Diagnostics:
    """The node's ``frames_received`` and ``model_state`` from /diagnostics, as they arrive."""

    def __init__(self, node_fqn: str):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, ReliabilityPolicy

        self.frames = Series()
        self.state = ""
        self._prefix = node_fqn + ":"
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node("intake_monitor", context=self.context)
        qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, qos)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self.executor.spin, daemon=True)
        self._thread.start()

    def _on_diagnostics(self, msg) -> None:
        for status in msg.status:
            if status.name.startswith(self._prefix):
                values = {kv.key: kv.value for kv in status.values}
                self.state = values.get("model_state", "")
                self.frames.add(time.monotonic(), int(values.get("frames_received", 0)))

    def close(self) -> None:
        import rclpy

        self.executor.shutdown()
        self._thread.join(5.0)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


@dataclass
class Row:
    case: str
    seconds: float
    load_before: float
    load_after: float
    published_hz: float | None
    node_hz: float | None
    node_cpu: float
    baseline_hz: float | None
    baseline_cpu: float
    camera_cpu: float | None


def measure(case: str, seconds: float, warmup_s: float, env, agent, baseline: Child, diagnostics) -> Row:
    size = parse_case(case)
    camera = None
    load_before = os.getloadavg()[0]
    try:
        if size is not None:
            width, height, rate = size
            camera = Child(["--camera", str(width), str(height), str(rate)], env)
            deadline = time.monotonic() + 60
            while not camera.series.samples:  # the camera reports once both subscribers matched
                if time.monotonic() > deadline or camera.proc.poll() is not None:
                    raise RuntimeError(f"{case}: the camera never matched the node and the baseline")
                time.sleep(0.1)
        time.sleep(warmup_s)
        pids = {"node": agent.pid, "baseline": baseline.proc.pid} | ({"camera": camera.proc.pid} if camera else {})
        start, cpu0 = time.monotonic(), {k: cpu_seconds(p) for k, p in pids.items()}
        time.sleep(seconds)
        end, cpu1 = time.monotonic(), {k: cpu_seconds(p) for k, p in pids.items()}
        time.sleep(1.5 * REPORT_S + 1.0)  # the samples that close the window (diagnostics: 1 Hz)
    finally:
        if camera is not None:
            camera.stop()
    share = {k: round(100 * (cpu1[k] - cpu0[k]) / (end - start), 1) for k in pids}
    margin = 1.5  # a sample printed just before the window's edge may arrive just after it
    return Row(
        case=case,
        seconds=round(end - start, 1),
        load_before=round(load_before, 2),
        load_after=round(os.getloadavg()[0], 2),
        published_hz=_round(camera.series.rate(start - margin, end + margin)) if camera else None,
        node_hz=_round(diagnostics.frames.rate(start - margin, end + margin)),
        node_cpu=share["node"],
        baseline_hz=_round(baseline.series.rate(start - margin, end + margin)),
        baseline_cpu=share["baseline"],
        camera_cpu=share.get("camera"),
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def per_frame(cpu_percent: float, hz: float | None) -> float | None:
    """CPU ms per received frame: comparable between processes that received different rates."""
    return round(10 * cpu_percent / hz, 1) if hz else None


def table(rows: list[Row]) -> str:
    def fmt(value, unit=""):
        return "–" if value is None else f"{value:g}{unit}"

    lines = [
        "| case | camera (Hz) | node: frames (Hz) | node: CPU (% core) | node: CPU per frame (ms) "
        "| baseline: frames (Hz) | baseline: CPU (% core) | baseline: CPU per frame (ms) | node / baseline CPU "
        "| load 1 min (before → after) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r.node_cpu / r.baseline_cpu:.1f}×" if r.baseline_cpu > 0.5 else "–"
        lines.append(
            f"| {r.case} | {fmt(r.published_hz)} | {fmt(r.node_hz)} | {fmt(r.node_cpu)} "
            f"| {fmt(per_frame(r.node_cpu, r.node_hz))} | {fmt(r.baseline_hz)} | {fmt(r.baseline_cpu)} "
            f"| {fmt(per_frame(r.baseline_cpu, r.baseline_hz))} | {ratio} | {r.load_before:g} → {r.load_after:g} |"
        )
    return "\n".join(lines)


def run(cases: list[str], seconds: float, warmup_s: float, agent_log: Path) -> list[Row]:
    from ptp_ros.ros.demo import demo_environment

    env = demo_environment()
    os.environ.update({k: v for k, v in env.items() if k.startswith(("ROS_", "FASTDDS", "FASTRTPS"))})
    params = {"calibration_keep_ratios": "[0.05]", "max_new_tokens": "1", "publish_saliency": "false"}
    agent_cmd = [sys.executable, "-m", "ptp_ros.ros.node", "--ros-args", "-r", f"__ns:={NAMESPACE}"]
    for key, value in params.items():
        agent_cmd += ["-p", f"{key}:={value}"]
    with open(agent_log, "wb") as log:
        agent = subprocess.Popen(agent_cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    baseline = Child(["--baseline"], env)
    diagnostics = Diagnostics(f"{NAMESPACE}/ptp_agent")
    rows = []
    try:
        deadline = time.monotonic() + 600
        while diagnostics.state != "serving":
            if time.monotonic() > deadline or agent.poll() is not None:
                raise RuntimeError(f"the agent never served; see {agent_log}")
            time.sleep(0.5)
        for case in cases:
            rows.append(measure(case, seconds, warmup_s, env, agent, baseline, diagnostics))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    finally:
        stop_process(agent)
        baseline.stop()
        diagnostics.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), help="idle or SIZE@HZ, e.g. 1080p@10")
    parser.add_argument("--seconds", type=float, default=30.0, help="measurement window per case")
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--agent-log", type=Path, default=Path("/tmp/intake_agent.log"))
    parser.add_argument("--camera", nargs=3, metavar=("WIDTH", "HEIGHT", "HZ"), help=argparse.SUPPRESS)
    parser.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.camera:
        run_camera(int(args.camera[0]), int(args.camera[1]), float(args.camera[2]))
        return 0
    if args.baseline:
        run_baseline()
        return 0
    for case in args.cases:
        parse_case(case)
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}", flush=True)
    rows = run(args.cases, args.seconds, args.warmup_s, args.agent_log)
    print(f"\n{table(rows)}")
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
