"""Soak the agent node as a robot would run it: a 10 Hz 1080p camera, an instruction every 2 s, a burst of
200 instructions every 5 minutes on the JSON topic and a burst of 50 goals every 3 minutes on the ``ask``
action, for ``--minutes``; then report, for each path, what was sent, answered, refused and lost, the latency,
and the node's memory over time.

    python -m ptp_ros_bench.soak --minutes 32 --out docs/soak      # (bench.soak from a source tree)

The agent and the camera are separate processes over DDS (localhost, shared memory), exactly as
``ptp-demo`` starts them; this process is the planner, built on the package's client (``ptp_ros.ros.client``,
its topics and action client as deep as a burst).  On the topic path "lost" means an instruction with no
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
from contextlib import suppress
from pathlib import Path

import numpy as np

from ptp_ros.ros.ask_action import INTERFACE_HINT
from ptp_ros.ros.client import AgentClient, Goal

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


class Planner(AgentClient):
    """The package's client that publishes instructions and sends goals as the soak schedules them, and counts
    every JSON result by id (``topic``) and every goal it sent (``goals``)."""

    def __init__(self, namespace: str, goals: bool = False):
        self.topic = Ledger()  # JSON results of every id, goals' included: a goal's copies count as duplicates
        self.goals: dict[str, Goal] = {}
        super().__init__("soak_planner", namespace)  # depth CLIENT_DEPTH: bursts of 200 leave unharmed
        if goals and self.Ask is None:
            self.close()
            raise RuntimeError(f"goal bursts need the ask action: {INTERFACE_HINT}")

    def on_result(self, result: dict) -> None:
        self.topic.receive(str(result.get("id")), result)

    def send_instruction(self, request_id: str, kind: str, text: str) -> None:
        self.topic.send(request_id, kind)
        self.instruct(text, request_id=request_id)

    def send_goals(self, goals: list[tuple[str, str]]) -> None:
        """Send goals (request id, instruction) back to back, as one burst."""
        for request_id, text in goals:
            self.goals[request_id] = self.send_goal(text, request_id=request_id)

    def goal_report(self) -> dict:
        """The action path's figures: the shared tally (lost: accepted without a result) plus the goal
        responses; goals with no goal response count as lost, and JSON copies as duplicates."""
        ledger = Ledger()
        for request_id, goal in list(self.goals.items()):
            ledger.send(request_id, "goal")
            if goal.outcome is not None:
                ledger.receive(request_id, goal.outcome)
        responses = {request_id: goal.accepted for request_id, goal in self.goals.items()}
        accepted = {i for i, ok in responses.items() if ok}
        report = ledger.tally(answerable=accepted)
        silent = sum(1 for ok in responses.values() if ok is None)
        report |= {
            "accepted": len(accepted),
            "rejected": sum(1 for ok in responses.values() if ok is False),
            "no_goal_response": silent,
            "accepted_without_result": report["lost"],
            "lost": report["lost"] + silent,
            "duplicated": sum(1 for i in responses if self.topic.copies(i) > 1),  # one typed result per goal
            "json_results": sum(1 for i in responses if self.topic.copies(i)),
        }
        return report


def ready(planner: Planner) -> bool:
    """Whether the agent serves and has seen the camera."""
    return (status := planner.status()) is not None and status.ready


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
        with suppress(TimeoutError):
            planner.wait_for(lambda: agent.poll() is not None or ready(planner), 600, "the agent serving")
        if not ready(planner):
            raise RuntimeError(f"the agent never served; see {out / 'agent.log'}")
        if goal_burst > 0 and not planner.wait_for_action(60):
            raise RuntimeError(f"the agent serves no ask action; see {out / 'agent.log'}")
        started = time.monotonic()
        end = started + minutes * 60
        next_ask, next_sample, n = started, started, 0
        next_burst = started + settings["burst_every_s"]
        next_goals = started + settings["goal_burst_every_s"] if goal_burst > 0 else float("inf")
        while (now := time.monotonic()) < end:
            if now >= next_ask:
                planner.send_instruction(f"q{n}", "regular", questions[n % len(questions)])
                n += 1
                next_ask += settings["interval_s"]
            if now >= next_burst:
                for i in range(settings["burst"]):
                    planner.send_instruction(f"b{int(now - started)}-{i}", "burst", questions[i % len(questions)])
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
        final_diagnostics = status.to_dict() if (status := planner.status()) is not None else {}
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
        _reuse_line(report.get("final_diagnostics") or {}),
        "",
    ]
    return "\n".join(lines)


def _reuse_line(diagnostics: dict) -> str:
    """The encode cache's reuse rate as the node's /diagnostics reported it at the end (vlm/encode_cache.py)."""
    rate = diagnostics.get("encode_reuse_rate")
    if not rate:
        return "Vision encoding reused: not reported (no encode cache, or no request answered)."
    return (
        f"Vision encoding reused: {100 * float(rate):.1f} % of the views of the frames asked about "
        f"({diagnostics.get('encode_frame_hits')} requests found their frame already encoded)."
    )


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
