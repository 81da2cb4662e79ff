"""Soak the agent node as a robot would run it: a 10 Hz 1080p camera, an instruction every 2 s, a burst of
200 instructions every 5 minutes on the JSON topic and a burst of 50 goals every 3 minutes on the ``ask``
action, for ``--minutes``; then report, for each path, what was sent, answered, refused and lost, the latency,
and the node's memory over time.

    python -m ptp_ros_bench.soak --minutes 32 --out docs/soak      # (bench.soak from a source tree)

The agent and the camera are separate processes over DDS (localhost, shared memory), exactly as
``ptp-demo`` starts them; this process is the planner, and sends its goals through the package's own action
client (``ask_action.client``, as deep as a burst).  On the topic path "lost" means an instruction with no
result by the end and "duplicated" one with more than one.  On the action path every goal should get a goal
response (accepted or rejected) and every accepted goal exactly one typed result: "lost" is a goal with no
goal response, or accepted with no result by the end; "duplicated", one with more than one result, typed or
JSON (the node publishes each goal's result on ``result`` too).  ``--goal-burst 0`` soaks the topic path only.
RSS growth is measured from the end of the warm-up (the first burst has passed and the allocator has seen its
largest frames) to the end.
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


class Ledger:
    """Requests sent (by id, with their kind) and every result received under each id: the bookkeeping both
    paths share.  Thread-safe: results arrive on the executor's thread."""

    def __init__(self):
        self.kinds: dict[str, str] = {}
        self.results: dict[str, list[dict]] = {}
        self._lock = threading.Lock()

    def send(self, request_id: str, kind: str) -> None:
        with self._lock:
            self.kinds[request_id] = kind

    def receive(self, request_id: str, result: dict) -> None:
        with self._lock:
            self.results.setdefault(request_id, []).append(result)

    def ids(self, kind: str | None = None) -> list[str]:
        with self._lock:
            return [i for i, k in self.kinds.items() if kind in (None, k)]

    def copies(self, request_id: str) -> int:
        with self._lock:
            return len(self.results.get(request_id, []))

    def tally(self, kind: str | None = None, answerable: set[str] | None = None) -> dict:
        """Sent, answered, lost (``answerable``, default all, without a result), duplicated, statuses of the
        first result and the latency of those ``ok``, for the requests of ``kind`` (None: all)."""
        ids = self.ids(kind)
        with self._lock:
            got = {i: list(self.results.get(i, [])) for i in ids}
        first = [r[0] for r in got.values() if r]
        return {
            "sent": len(ids),
            "results": len(first),
            "lost": sum(1 for i in ids if not got[i] and (answerable is None or i in answerable)),
            "duplicated": sum(1 for r in got.values() if len(r) > 1),
            "statuses": dict(Counter(r["status"] for r in first)),
            "latency_ms_ok": _percentiles([r["latency_ms"]["total"] for r in first if r["status"] == "ok"]),
        }


class Planner:
    """Publishes instructions and sends goals, records every result and goal response, and the node's
    diagnostics."""

    def __init__(self, namespace: str, goals: bool = False):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from std_msgs.msg import String

        from ptp_ros.ros import ask_action

        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node("soak_planner", namespace=namespace, context=self.context)
        qos = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)  # bursts of 200 leave unharmed
        self.pub = self.node.create_publisher(String, "instruction", qos)
        self.topic = Ledger()  # JSON results of every id, goals' included: a goal's copies count as duplicates
        self.goals = Ledger()  # typed results of the goals
        self.accepted: dict[str, bool] = {}  # goal id → its goal response said accepted
        self.diagnostics: dict = {}
        self.Ask = ask_action.interface() if goals else None
        if goals and self.Ask is None:
            raise RuntimeError(f"goal bursts need the ask action: {ask_action.INTERFACE_HINT}")
        self.action = ask_action.client(self.node, self.Ask) if self.Ask is not None else None
        self.node.create_subscription(String, "result", self._on_result, qos)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, qos)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self.executor.spin, daemon=True)
        self._thread.start()
        self._string = String

    def _on_result(self, msg) -> None:
        result = json.loads(msg.data)
        self.topic.receive(str(result.get("id")), result)

    def _on_diag(self, msg) -> None:
        for status in msg.status:
            if status.name.endswith(": ptp agent"):
                self.diagnostics = {kv.key: kv.value for kv in status.values} | {
                    "_message": status.message,
                    "_level": int.from_bytes(status.level, "little"),
                }

    def ask(self, request_id: str, kind: str, text: str) -> None:
        self.topic.send(request_id, kind)
        self.pub.publish(self._string(data=json.dumps({"id": request_id, "text": text})))

    def send_goals(self, goals: list[tuple[str, str]]) -> None:
        """Send goals (request id, instruction) back to back from the executor's thread, as one burst."""
        self.executor.create_task(self._send_goals, goals)

    def _send_goals(self, goals: list[tuple[str, str]]) -> None:
        from ptp_ros.ros.ask_action import goal_message

        for request_id, text in goals:
            self.goals.send(request_id, "goal")
            sending = self.action.send_goal_async(goal_message(self.Ask, text, id=request_id))
            sending.add_done_callback(lambda future, i=request_id: self._on_goal_response(i, future.result()))

    def _on_goal_response(self, request_id: str, handle) -> None:
        from ptp_ros.ros.ask_action import result_dict

        self.accepted[request_id] = handle.accepted
        if handle.accepted:
            getting = handle.get_result_async()
            getting.add_done_callback(
                lambda future: self.goals.receive(request_id, result_dict(future.result().result))
            )

    def goal_report(self) -> dict:
        """The action path's figures: the shared tally (lost: accepted without a result) plus the goal
        responses; goals with no goal response count as lost, and JSON copies as duplicates."""
        ids = self.goals.ids()
        accepted = {i for i in ids if self.accepted.get(i)}
        report = self.goals.tally(answerable=accepted)
        silent = sum(1 for i in ids if i not in self.accepted)
        report |= {
            "accepted": len(accepted),
            "rejected": sum(1 for i in ids if self.accepted.get(i) is False),
            "no_goal_response": silent,
            "accepted_without_result": report["lost"],
            "lost": report["lost"] + silent,
            "duplicated": sum(1 for i in ids if self.goals.copies(i) > 1 or self.topic.copies(i) > 1),
            "json_results": sum(1 for i in ids if self.topic.copies(i)),
        }
        return report

    def close(self) -> None:
        import rclpy

        self.executor.shutdown()
        if self.action is not None:
            self.action.destroy()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


def run(minutes: float, out: Path, settings: dict) -> dict:
    """Start the agent and the camera, soak for ``minutes`` with ``settings`` (interval_s, burst,
    burst_every_s, goal_burst, goal_burst_every_s), stop them and summarise."""
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
    goal_burst = settings["goal_burst"]
    planner = Planner(namespace, goals=goal_burst > 0)
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
        if planner.action is not None and not planner.action.wait_for_server(timeout_sec=60):
            raise RuntimeError(f"the agent serves no ask action; see {out / 'agent.log'}")
        started = time.monotonic()
        end = started + minutes * 60
        next_ask, next_sample, n = started, started, 0
        next_burst = started + settings["burst_every_s"]
        next_goals = started + settings["goal_burst_every_s"] if goal_burst > 0 else float("inf")
        while (now := time.monotonic()) < end:
            if now >= next_ask:
                planner.ask(f"q{n}", "regular", questions[n % len(questions)])
                n += 1
                next_ask += settings["interval_s"]
            if now >= next_burst:
                for i in range(settings["burst"]):
                    planner.ask(f"b{int(now - started)}-{i}", "burst", questions[i % len(questions)])
                next_burst += settings["burst_every_s"]
            if now >= next_goals:
                planner.send_goals(
                    [(f"g{int(now - started)}-{i}", questions[i % len(questions)]) for i in range(goal_burst)]
                )
                next_goals += settings["goal_burst_every_s"]
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
    return summarise(planner, memory, minutes, settings, final_diagnostics, agent.returncode, commit)


def summarise(
    planner: Planner,
    memory: list[tuple[float, int]],
    minutes: float,
    settings: dict,
    diagnostics: dict,
    exit_code: int | None,
    commit: str | None,
) -> dict:
    report: dict = {"minutes": minutes, "settings": settings, "agent_exit_code": exit_code, "commit": commit}
    for kind in ("regular", "burst", "all"):
        report[kind] = planner.topic.tally(None if kind == "all" else kind)
    report["goals"] = planner.goal_report()
    rss = [r for _, r in memory]
    warm = [r for t, r in memory if t >= min(settings["burst_every_s"] + 60, minutes * 30)]  # after the first burst
    report["rss_mb"] = (
        {
            "first": round(rss[0] / 1e6, 1),
            "last": round(rss[-1] / 1e6, 1),
            "max": round(max(rss) / 1e6, 1),
            "after_warmup_first": round(warm[0] / 1e6, 1),
            "growth_after_warmup_pct": round(100 * (warm[-1] - warm[0]) / warm[0], 2),
        }
        if warm
        else {}
    )
    report["memory_samples"] = memory
    report["final_diagnostics"] = diagnostics
    return report


def _row(name: str, r: dict) -> str:
    lat = r["latency_ms_ok"]
    lat_text = f"{lat['p50']} / {lat['p95']} / {lat['max']}" if lat["count"] else "-"
    statuses = ", ".join(f"{k} {v}" for k, v in sorted(r["statuses"].items()))
    return f"| {name} | {r['sent']} | {r['results']} | {r['lost']} | {r['duplicated']} | {statuses} | {lat_text} |"


def markdown(report: dict) -> str:
    s = report["settings"]
    goals = f", a burst of {s['goal_burst']} goals every {s['goal_burst_every_s']:g} s" if s["goal_burst"] else ""
    header = "| {} | sent | results | lost | duplicated | statuses | ok latency p50 / p95 / max (ms) |"
    lines = [
        f"# Soak: {report['minutes']:g} minutes, 10 Hz 1080p camera, an instruction every {s['interval_s']:g} s, "
        f"a burst of {s['burst']} every {s['burst_every_s']:g} s{goals}",
        "",
        "Topic path (JSON `instruction` → `result`):",
        "",
        header.format("instructions"),
        "|---|---|---|---|---|---|---|",
        *(_row(kind, report[kind]) for kind in ("regular", "burst", "all")),
    ]
    g = report["goals"]
    if g["sent"]:
        lines += [
            "",
            "Action path (`ask` goals through `ask_action.client`; lost: no goal response, or accepted and no "
            "result by the end):",
            "",
            header.format("goals"),
            "|---|---|---|---|---|---|---|",
            _row("goal bursts", g),
            "",
            f"Goal responses: {g['accepted']} accepted, {g['rejected']} rejected, {g['no_goal_response']} none; "
            f"{g['accepted_without_result']} accepted without a result; {g['json_results']} with a JSON result "
            "on `result` too.",
        ]
    m = report["rss_mb"]
    lines += [
        "",
        f"Agent RSS (MB): first {m['first']}, after warm-up {m['after_warmup_first']}, last {m['last']}, "
        f"max {m['max']}; growth after warm-up {m['growth_after_warmup_pct']} %."
        if m
        else "Agent RSS: too short a soak to measure after warm-up.",
        f"Agent exit code after SIGINT: {report['agent_exit_code']}. Code: commit {report['commit']}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=32.0, help="how long to soak, after the agent serves")
    parser.add_argument("--out", type=Path, default=Path("docs/soak"), help="folder for results and agent.log")
    parser.add_argument("--interval-s", type=float, default=2.0, help="seconds between regular instructions")
    parser.add_argument("--burst-every-s", type=float, default=300.0, help="seconds between instruction bursts")
    parser.add_argument("--burst", type=int, default=200, help="instructions per burst")
    parser.add_argument("--goal-burst", type=int, default=50, help="ask goals per goal burst (0: no goals)")
    parser.add_argument("--goal-burst-every-s", type=float, default=180.0, help="seconds between goal bursts")
    args = parser.parse_args(argv)
    settings = {
        "interval_s": args.interval_s,
        "burst": args.burst,
        "burst_every_s": args.burst_every_s,
        "goal_burst": args.goal_burst,
        "goal_burst_every_s": args.goal_burst_every_s,
    }
    report = run(args.minutes, args.out, settings)
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    (args.out / "results.md").write_text(markdown(report))
    print(markdown(report))
    clean = all(report[k]["lost"] == 0 and report[k]["duplicated"] == 0 for k in ("all", "goals"))
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
