"""Soak the agent node as a robot would run it: a 10 Hz 1080p camera, an instruction every 2 s, and a
burst of 200 instructions every 5 minutes, for ``--minutes``; then report what was sent, answered, refused
and lost, the latency, and the node's memory over time.

    python -m ptp_ros_bench.soak --minutes 32 --out docs/soak      # (bench.soak from a source tree)

The agent and the camera are separate processes over DDS (localhost, shared memory), exactly as
``ptp-demo`` starts them; this process is the planner.  "Lost" means an instruction with no result by the
end; "duplicated", one with more than one.  RSS growth is measured from the end of the warm-up (the first
burst has passed and the allocator has seen its largest frames) to the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ("What is on the table?", "Is the door open?", "How many chairs are there?", "What colour is the cup?")


def current_commit() -> str | None:
    """The checkout's commit (None outside a git checkout or without git): the code a soak runs."""
    try:
        found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return None
    return found.stdout.strip() or None


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"count": 0}
    arr = np.asarray(values, float)
    return {
        "count": len(values),
        "p50": round(float(np.percentile(arr, 50)), 1),
        "p95": round(float(np.percentile(arr, 95)), 1),
        "max": round(float(arr.max()), 1),
    }


class Planner:
    """Publishes instructions, records every result and the node's diagnostics."""

    def __init__(self, namespace: str):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from std_msgs.msg import String

        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node("soak_planner", namespace=namespace, context=self.context)
        qos = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)  # bursts of 200 leave unharmed
        self.pub = self.node.create_publisher(String, "instruction", qos)
        self.results: dict[str, list[dict]] = {}
        self.sent: dict[str, dict] = {}
        self.diagnostics: dict = {}
        self._lock = threading.Lock()
        self.node.create_subscription(String, "result", self._on_result, qos)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, qos)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self.executor.spin, daemon=True)
        self._thread.start()
        self._string = String

    def _on_result(self, msg) -> None:
        result = json.loads(msg.data)
        with self._lock:
            self.results.setdefault(str(result.get("id")), []).append(result)

    def _on_diag(self, msg) -> None:
        for status in msg.status:
            if status.name.endswith(": ptp agent"):
                self.diagnostics = {kv.key: kv.value for kv in status.values} | {
                    "_message": status.message,
                    "_level": int.from_bytes(status.level, "little"),
                }

    def ask(self, request_id: str, kind: str, text: str) -> None:
        with self._lock:
            self.sent[request_id] = {"kind": kind, "at": time.monotonic()}
        self.pub.publish(self._string(data=json.dumps({"id": request_id, "text": text})))

    def close(self) -> None:
        import rclpy

        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


def run(minutes: float, out: Path, interval_s: float, burst_every_s: float, burst: int) -> dict:
    import psutil

    from ptp_ros.ros.demo import demo_environment

    commit = current_commit()  # read when the run starts: later commits are not what it ran
    env = demo_environment()
    out.mkdir(parents=True, exist_ok=True)
    namespace = "/soak"
    agent_log = open(out / "agent.log", "wb")
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ptp_ros.ros.node",
            "--ros-args",
            "-r",
            f"__ns:={namespace}",
            "--params-file",
            str(ROOT / "config" / "agent.yaml"),
            "-p",
            "max_new_tokens:=1",
        ],
        env=env,
        stdout=agent_log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    camera = subprocess.Popen(
        [sys.executable, "-m", "ptp_ros.ros.camera_replay", "--rate", "10", "--ros-args", "-r", f"__ns:={namespace}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    os.environ.update({k: v for k, v in env.items() if k.startswith(("ROS_", "FASTDDS", "FASTRTPS"))})
    planner = Planner(namespace)
    questions = QUESTIONS
    proc = psutil.Process(agent.pid)
    memory: list[tuple[float, int]] = []
    try:
        deadline = time.monotonic() + 600
        while (
            planner.diagnostics.get("model_state") != "serving"
            or int(planner.diagnostics.get("frames_received") or 0) == 0
        ):
            if time.monotonic() > deadline or agent.poll() is not None:
                raise RuntimeError(f"the agent never served; see {out / 'agent.log'}")
            time.sleep(0.5)
        started = time.monotonic()
        end = started + minutes * 60
        next_ask, next_burst, next_sample, n = started, started + burst_every_s, started, 0
        while (now := time.monotonic()) < end:
            if now >= next_ask:
                planner.ask(f"q{n}", "regular", questions[n % len(questions)])
                n += 1
                next_ask += interval_s
            if now >= next_burst:
                for i in range(burst):
                    planner.ask(f"b{int(now - started)}-{i}", "burst", questions[i % len(questions)])
                next_burst += burst_every_s
            if now >= next_sample:
                memory.append((round(now - started, 1), proc.memory_info().rss))
                next_sample += 5.0
            if agent.poll() is not None:
                raise RuntimeError(f"the agent exited with {agent.returncode}; see {out / 'agent.log'}")
            time.sleep(0.02)
        time.sleep(30)  # stragglers
        final_diagnostics = dict(planner.diagnostics)
    finally:
        for p in (camera, agent):
            p.send_signal(signal.SIGINT)
        for p in (camera, agent):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        planner.close()
        agent_log.close()
    return summarise(planner, memory, minutes, burst_every_s, final_diagnostics, agent.returncode, commit)


def summarise(
    planner: Planner,
    memory: list[tuple[float, int]],
    minutes: float,
    burst_every_s: float,
    diagnostics: dict,
    exit_code: int | None,
    commit: str | None,
) -> dict:
    report: dict = {"minutes": minutes, "agent_exit_code": exit_code, "commit": commit}
    for kind in ("regular", "burst", "all"):
        ids = [i for i, s in planner.sent.items() if kind == "all" or s["kind"] == kind]
        statuses = Counter(planner.results[i][0]["status"] for i in ids if i in planner.results)
        ok_latency = [
            planner.results[i][0]["latency_ms"]["total"]
            for i in ids
            if i in planner.results and planner.results[i][0]["status"] == "ok"
        ]
        report[kind] = {
            "sent": len(ids),
            "results": sum(1 for i in ids if i in planner.results),
            "lost": sum(1 for i in ids if i not in planner.results),
            "duplicated": sum(1 for i in ids if len(planner.results.get(i, [])) > 1),
            "statuses": dict(statuses),
            "latency_ms_ok": _percentiles(ok_latency),
        }
    rss = [r for _, r in memory]
    warm = [r for t, r in memory if t >= min(burst_every_s + 60, minutes * 30)]  # after the first burst
    report["rss_mb"] = (
        {
            "first": round(rss[0] / 1e6, 1),
            "last": round(rss[-1] / 1e6, 1),
            "max": round(max(rss) / 1e6, 1),
            "after_warmup_first": round(warm[0] / 1e6, 1),
            "growth_after_warmup_pct": round(100 * (warm[-1] - warm[0]) / warm[0], 2),
        }
        if rss
        else {}
    )
    report["memory_samples"] = memory
    report["final_diagnostics"] = diagnostics
    return report


def markdown(report: dict) -> str:
    lines = [
        f"# Soak: {report['minutes']:g} minutes, 10 Hz 1080p camera, an instruction every 2 s, "
        "a burst of 200 every 5 minutes",
        "",
        "| instructions | sent | results | lost | duplicated | statuses | ok latency p50 / p95 / max (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind in ("regular", "burst", "all"):
        r = report[kind]
        lat = r["latency_ms_ok"]
        lat_text = f"{lat['p50']} / {lat['p95']} / {lat['max']}" if lat["count"] else "-"
        statuses = ", ".join(f"{k} {v}" for k, v in sorted(r["statuses"].items()))
        lines.append(
            f"| {kind} | {r['sent']} | {r['results']} | {r['lost']} | {r['duplicated']} | {statuses} | {lat_text} |"
        )
    m = report["rss_mb"]
    lines += [
        "",
        f"Agent RSS (MB): first {m['first']}, after warm-up {m['after_warmup_first']}, last {m['last']}, "
        f"max {m['max']}; growth after warm-up {m['growth_after_warmup_pct']} %.",
        f"Agent exit code after SIGINT: {report['agent_exit_code']}. Code: commit {report['commit']}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=32.0)
    parser.add_argument("--out", type=Path, default=Path("docs/soak"))
    parser.add_argument("--interval-s", type=float, default=2.0)
    parser.add_argument("--burst-every-s", type=float, default=300.0)
    parser.add_argument("--burst", type=int, default=200)
    args = parser.parse_args(argv)
    report = run(args.minutes, args.out, args.interval_s, args.burst_every_s, args.burst)
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    (args.out / "results.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if report["all"]["lost"] == 0 and report["all"]["duplicated"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
