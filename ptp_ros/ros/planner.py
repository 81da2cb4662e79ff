"""A scripted planner: waits for the agent to serve and to hold a camera frame, asks its questions one at a
time, prints each answer with its latency and keep ratio, and saves the saliency images it receives.  It asks
over the agent's ``ask`` action when ptp_ros_interfaces is importable and the agent serves it, else on the JSON
``instruction`` topic.

    python -m ptp_ros.ros.planner --out saliency/ --ros-args -r __ns:=/robot
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path
from typing import Any

import cv2
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from std_msgs.msg import String

from . import ask_action
from .conversions import imgmsg_to_array

RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
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


class Planner:
    def __init__(self, node, out_dir: Path):
        self.node, self.out_dir = node, out_dir
        self._cond = threading.Condition()
        self.results: dict[str, dict] = {}
        self.saliency_files: dict[tuple[int, int], Path] = {}
        self.ready = False
        self._pub = node.create_publisher(String, "instruction", RELIABLE)
        node.create_subscription(String, "result", self._on_result, RELIABLE)
        node.create_subscription(Image, "saliency", self._on_saliency, RELIABLE)
        node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, RELIABLE)
        self.Ask = ask_action.interface()
        self._action = None
        if self.Ask is not None:
            self._action = ask_action.client(node, self.Ask)

    def use_action(self, timeout: float) -> bool:
        """Whether questions go over the ask action: the interface is importable and the agent serves it."""
        if self._action is not None and not self._action.wait_for_server(timeout_sec=timeout):
            self._action.destroy()
            self._action = None
        return self._action is not None

    def _notify(self, update) -> None:
        with self._cond:
            update()
            self._cond.notify_all()

    def _on_result(self, msg: String) -> None:
        result = json.loads(msg.data)
        self._notify(lambda: self.results.__setitem__(result["id"], result))

    def _on_saliency(self, msg: Image) -> None:
        path = self.out_dir / f"saliency_{msg.header.stamp.sec}_{msg.header.stamp.nanosec:09d}.jpg"
        cv2.imwrite(str(path), imgmsg_to_array(msg), [cv2.IMWRITE_JPEG_QUALITY, 90])
        self._notify(lambda: self.saliency_files.__setitem__((msg.header.stamp.sec, msg.header.stamp.nanosec), path))

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            values = {kv.key: kv.value for kv in status.values}
            # Serving alone is not enough: a question asked before the first frame arrives is answered
            # "no image received yet", so wait until the agent has seen the camera too.
            ready = values.get("model_state") == "serving" and int(values.get("frames_received") or 0) > 0
            if ready and not self.ready:
                self._notify(lambda: setattr(self, "ready", True))

    def wait(self, predicate, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def ask(self, request: dict, timeout: float) -> dict | None:
        """The result of ``request`` (a JSON instruction with an ``id``) as a dict, or None after ``timeout``."""
        if self._action is not None:
            return self._ask_action(request, timeout)
        self._pub.publish(String(data=json.dumps(request)))
        if not self.wait(lambda: request["id"] in self.results, timeout):
            return None
        return self.results[request["id"]]

    def _ask_action(self, request: dict, timeout: float) -> dict | None:
        def done(future) -> bool:
            return self.wait(lambda: future.done(), timeout)

        fields = {k: v for k, v in request.items() if k != "text"}
        sending = self._action.send_goal_async(ask_action.goal_message(self.Ask, request["text"], **fields))
        sending.add_done_callback(lambda _: self._notify(lambda: None))
        if not done(sending):
            return None
        handle = sending.result()
        if not handle.accepted:  # rclpy rejects only a goal whose UUID is in use; the node aborts with a reason
            return None
        result = handle.get_result_async()
        result.add_done_callback(lambda _: self._notify(lambda: None))
        return ask_action.result_dict(result.result().result) if done(result) else None


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
    rclpy.init(args=argv)
    node = rclpy.create_node("scripted_planner")
    planner = Planner(node, args.out)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    failures = 0
    try:
        print(
            f"waiting for the agent (up to {args.startup_timeout:.0f} s: model load, calibration, first camera "
            "frame)...",
            flush=True,
        )
        if not planner.wait(lambda: planner.ready, args.startup_timeout):
            print("the agent never reported serving with a camera frame on /diagnostics", file=sys.stderr)
            return 2
        script = proxy_questions(args.proxy_scene) if args.proxy_scene >= 0 else QUESTIONS
        print(
            "asking over the ask action"
            if planner.use_action(10.0)
            else "asking on the instruction topic (the ask action is not available)",
            flush=True,
        )
        for i, question in enumerate((script * args.questions)[: args.questions], 1):
            expected = question.get("expected")
            request = {"id": f"q{i}", **{k: v for k, v in question.items() if k != "expected"}}
            result = planner.ask(request, args.answer_timeout)
            if result is None:
                print(f"[q{i}] no result within {args.answer_timeout:.0f} s", file=sys.stderr)
                failures += 1
                continue
            stamp = (result["stamp"]["sec"], result["stamp"]["nanosec"]) if "stamp" in result else None
            if result.get("status") == "ok":
                planner.wait(lambda stamp=stamp: stamp in planner.saliency_files, 10.0)
            else:
                failures += 1
            print(describe(result, planner.saliency_files.get(stamp), expected), flush=True)
        print(
            f"{args.questions - failures}/{args.questions} answered; {len(planner.saliency_files)} saliency "
            f"image(s) in {args.out}/",
            flush=True,
        )
    except KeyboardInterrupt:
        return 130
    finally:
        executor.shutdown()
        spinner.join(5.0)  # a spin thread still inside rcl at exit aborts the process
        node.destroy_node()
        rclpy.try_shutdown()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
