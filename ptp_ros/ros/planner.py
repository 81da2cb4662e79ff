"""A scripted planner: waits for the agent to serve and to hold a camera frame, asks its questions one at a
time, prints each answer with its latency and keep ratio, and saves the saliency images it receives.  It asks
over the agent's ``ask`` action when ptp_ros_interfaces is importable and the agent serves it, else on the JSON
``instruction`` topic.

    python -m ptp_ros.ros.planner --out saliency/ --ros-args -r __ns:=/robot
"""

from __future__ import annotations

import argparse
import sys
from contextlib import suppress
from pathlib import Path
from typing import Any

import cv2
import rclpy
from sensor_msgs.msg import Image

from .client import AgentClient
from .conversions import imgmsg_to_array
from .topics import SALIENCY

# What a robot might ask while it looks around; the budgets show the controller trading tokens for time.
QUESTIONS: list[dict[str, Any]] = [
    {"text": "What objects are on the table?"},
    {"text": "Is there a person in the scene?", "latency_budget_ms": 4000},
    {"text": "What colour is the largest object?", "latency_budget_ms": 1500},
    {"text": "Where could the robot put a cup down?", "keep_ratio": 0.1},
]


def proxy_questions(index: int) -> list[dict[str, Any]]:
    """The questions of proxy test scene ``index`` (one of each type, with the expected answer), asked with
    the same budgets as the scripted ones."""
    from ..proxy import make_questions, make_scene, split_seed

    scene = make_scene(split_seed("test", index))
    options = [{k: v for k, v in q.items() if k != "text"} for q in QUESTIONS]
    return [
        {"text": q.text, "expected": q.answer, **options[i % len(options)]}
        for i, q in enumerate(make_questions(scene, per_type=1))
    ]


class SaliencySaver:
    """Saves each saliency image the agent publishes as a JPEG named by its frame's stamp."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.files: dict[tuple[int, int], Path] = {}  # frame stamp (sec, nanosec) → its image

    def __call__(self, msg: Image) -> None:
        stamp = (msg.header.stamp.sec, msg.header.stamp.nanosec)
        path = self.out_dir / f"saliency_{stamp[0]}_{stamp[1]:09d}.jpg"
        cv2.imwrite(str(path), imgmsg_to_array(msg), [cv2.IMWRITE_JPEG_QUALITY, 90])
        self.files[stamp] = path


def describe(result: dict, saliency: Path | None, expected: str | None = None) -> str:
    if result.get("status") != "ok":
        return f"[{result['id']}] {result.get('status')}: {result.get('error')}"
    latency = result["latency_ms"]["total"] / 1e3
    budget = result["latency_budget_ms"] / 1e3
    line = (
        f"[{result['id']}] {latency:.2f} s (budget {budget:.1f} s, {'met' if result['budget_met'] else 'missed'}, "
        f"{result['mode']}) keep {result['keep_ratio']:.1%} ({result['visual_tokens_kept']}/"
        f"{result['visual_tokens_total']} tokens), frame age {result['frame_age_ms']:.0f} ms\n"
        f"    Q: {result['instruction']}\n    A: {result['answer']!r}"
        + (f" (expected {expected!r})" if expected else "")
    )
    return line + (f"\n    saliency: {saliency}" if saliency else "")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="planner", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("ptp_demo_saliency"), help="folder for saliency images")
    parser.add_argument("--questions", type=int, default=len(QUESTIONS), help="how many of the scripted questions")
    parser.add_argument(
        "--proxy-scene",
        type=int,
        default=-1,
        help="ask the questions of this proxy test scene (the camera must show it)",
    )
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for the agent to serve")
    parser.add_argument("--answer-timeout", type=float, default=300.0)
    args = parser.parse_args(rclpy.utilities.remove_ros_args(argv)[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    saliency = SaliencySaver(args.out)
    with AgentClient("scripted_planner", args=argv) as agent:
        agent.subscribe(Image, SALIENCY, saliency)
        try:
            return ask_script(agent, args, saliency)
        except KeyboardInterrupt:
            return 130


def ask_script(agent: AgentClient, args: argparse.Namespace, saliency: SaliencySaver) -> int:
    """Wait for the agent, ask the script's questions one at a time and print each result; the exit code."""
    print(
        f"waiting for the agent (up to {args.startup_timeout:.0f} s: model load, calibration, first camera frame)...",
        flush=True,
    )
    try:
        agent.wait_ready(args.startup_timeout)
    except TimeoutError:
        print("the agent never reported serving with a camera frame on /diagnostics", file=sys.stderr)
        return 2
    script = proxy_questions(args.proxy_scene) if args.proxy_scene >= 0 else QUESTIONS
    print(
        "asking over the ask action"
        if agent.wait_for_action(10.0)
        else "asking on the instruction topic (the ask action is not available)",
        flush=True,
    )
    failures = 0
    for i, question in enumerate((script * args.questions)[: args.questions], 1):
        fields = {k: v for k, v in question.items() if k not in ("text", "expected")}
        try:
            result = agent.query(question["text"], timeout=args.answer_timeout, request_id=f"q{i}", **fields)
        except TimeoutError:
            print(f"[q{i}] no result within {args.answer_timeout:.0f} s", file=sys.stderr)
            failures += 1
            continue
        stamp = (result["stamp"]["sec"], result["stamp"]["nanosec"]) if "stamp" in result else None
        if result.get("status") == "ok":
            with suppress(TimeoutError):  # saliency is off, or its image is slow: the answer still counts
                agent.wait_for(lambda stamp=stamp: stamp in saliency.files, 10.0, "the saliency image")
        else:
            failures += 1
        print(describe(result, saliency.files.get(stamp), question.get("expected")), flush=True)
    print(
        f"{args.questions - failures}/{args.questions} answered; {len(saliency.files)} saliency "
        f"image(s) in {args.out}/",
        flush=True,
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
