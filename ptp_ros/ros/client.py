"""A planner's client of the agent node: ask over the ``ask`` action or the JSON topics, read its diagnostics.

    from ptp_ros.ros.client import AgentClient

    with AgentClient("my_planner") as agent:
        agent.wait_ready(timeout=300)
        print(agent.query("What is on the table?", timeout=60)["answer"])

The client has a ROS context, node, executor and spin thread of its own, so a script, a behaviour tree or a
test can use it from any thread, beside the robot's own rclpy nodes; ``close`` (or the end of the ``with``)
stops them.  Every wait takes a timeout and raises TimeoutError when it runs out.  Its topics and QoS are the
node's own (``topics.py``), its action client the one ``ask_action.client`` builds: deep enough for bursts of
``CLIENT_DEPTH`` requests.  docs/ros.md, "A client for your planner", shows it at work.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.executors import SingleThreadedExecutor
from std_msgs.msg import String

from . import ask_action
from .topics import CAMERA_STATUS, DIAGNOSTICS, INSTRUCTION, RELIABLE, RESULT, STATUS_SUFFIX, reliable

POLL_S = 0.25  # a wait re-checks its condition this often even when no message arrives (e.g. subscription counts)


def wait_future(future, timeout: float, what: str):
    """The result of an rclpy future that an executor completes on another thread; TimeoutError naming ``what``
    after ``timeout`` s."""
    if not future.done():
        done = threading.Event()
        future.add_done_callback(lambda _: done.set())
        if not done.wait(timeout) and not future.done():
            raise TimeoutError(f"no answer from {what} within {timeout:g} s")
    return future.result()


class SpinningNode:
    """A node in a ROS context of its own, spun by an executor on a thread of its own until ``close``: what a
    client in a script or a test needs and rclpy leaves to each caller.  ``args`` are the command line's
    (``--ros-args -r __ns:=/robot`` remaps apply to the node); the process's signal handlers are left alone."""

    def __init__(self, node_name: str, namespace: str | None = None, args: list[str] | None = None):
        self.context = rclpy.Context()
        rclpy.init(args=args, context=self.context)
        try:
            self.node = rclpy.create_node(node_name, namespace=namespace, context=self.context)
            self.executor = SingleThreadedExecutor(context=self.context)
            self.executor.add_node(self.node)
        except BaseException:
            rclpy.try_shutdown(context=self.context)
            raise
        self._spinner = threading.Thread(target=self.executor.spin, name=f"{node_name} spin", daemon=True)
        self._spinner.start()
        self._closed = False

    def close(self) -> None:
        """Stop spinning and free the node and the context; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        self.executor.shutdown()
        self._spinner.join(5.0)  # a spin thread still inside rcl when the process exits aborts it
        self.destroy_entities()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)

    def destroy_entities(self) -> None:
        """Destroy, once nothing spins, what ``destroy_node`` leaves behind (an action client); nothing here."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


@dataclass(frozen=True)
class AgentStatus:
    """One ``/diagnostics`` status of an agent node, parsed (docs/ros.md lists the values)."""

    node: str  # the node's full name, e.g. /robot/ptp_agent
    level: int  # diagnostic_msgs/DiagnosticStatus: OK 0, WARN 1, ERROR 2, STALE 3
    message: str  # why the level: "serving", "no camera frame for 3.2 s", "model not loaded: ..."
    values: dict[str, str]  # model_state, frames_received, p95_latency_ms, requests_served, ...
    stamp: float  # when the node published it, s on the node's clock

    @classmethod
    def parse(cls, array) -> list[AgentStatus]:
        """The agent statuses of a ``DiagnosticArray`` (other nodes' statuses are left out)."""
        stamp = array.header.stamp.sec + array.header.stamp.nanosec / 1e9
        return [
            cls(
                node=status.name[: -len(STATUS_SUFFIX)],
                level=int.from_bytes(status.level, "little") if isinstance(status.level, bytes) else int(status.level),
                message=status.message,
                values={kv.key: kv.value for kv in status.values},
                stamp=stamp,
            )
            for status in array.status
            if status.name.endswith(STATUS_SUFFIX)
        ]

    @property
    def ready(self) -> bool:
        """Serving and has seen the camera: a question asked before the first frame is answered "no image
        received yet"."""
        return self.values.get("model_state") == "serving" and int(self.values.get("frames_received") or 0) > 0

    def to_dict(self) -> dict[str, Any]:
        """The values with the level and message beside them (``_level``, ``_message``), as reports keep them."""
        return self.values | {"_level": self.level, "_message": self.message}


@dataclass(frozen=True)
class CameraStatus:
    """One camera's ``/diagnostics`` status on an agent node: WARN while that camera is silent."""

    node: str  # the agent's full name
    camera: str
    level: int
    message: str  # "receiving", "camera wrist silent: no frame for 3.2 s on /wrist/image", ...
    values: dict[str, str]  # camera, topic, frames_received, frames_dropped, last_frame_age_s

    @classmethod
    def parse(cls, array) -> list[CameraStatus]:
        """The camera statuses of a ``DiagnosticArray``."""
        return [
            cls(
                node=status.name.split(CAMERA_STATUS, 1)[0],
                camera=status.name.split(CAMERA_STATUS, 1)[1],
                level=int.from_bytes(status.level, "little") if isinstance(status.level, bytes) else int(status.level),
                message=status.message,
                values={kv.key: kv.value for kv in status.values},
            )
            for status in array.status
            if CAMERA_STATUS in status.name
        ]


class GoalRejected(RuntimeError):
    """rclpy rejected the goal: its UUID was in use.  (The node takes every other goal, and ends one it refuses
    at once with a result that says why.)"""


class Goal:
    """One goal sent on the ``ask`` action: its feedback as it comes, then its final status and result.
    Everything is filled in on the client's spin thread; ``wait_accepted``, ``result`` and ``cancel`` wait."""

    def __init__(self, action, message, feedback: Callable[[str, float], None] | None = None, goal_uuid=None):
        self.message, self.request_id = message, message.request_id
        self.feedback: list[tuple[str, float]] = []  # (stage, ms since the node received the goal), in order
        self.frames: dict = {}  # each camera's frame and token split (JSON ``frames`` shape), once a feedback had it
        self.handle = None  # rclpy's ClientGoalHandle, once the goal response came
        self.status: int | None = None  # action_msgs/GoalStatus once it ended: SUCCEEDED, CANCELED or ABORTED
        self.typed = None  # the typed Ask.Result
        self.outcome: dict | None = None  # the same in the JSON result's shape
        self._on_feedback = feedback
        self._responded, self._ended = threading.Event(), threading.Event()
        sending = action.send_goal_async(message, feedback_callback=self._feedback, goal_uuid=goal_uuid)
        sending.add_done_callback(self._on_response)

    @property
    def accepted(self) -> bool | None:
        """Whether rclpy accepted the goal; None until the goal response came."""
        return None if self.handle is None else bool(self.handle.accepted)

    def _feedback(self, msg) -> None:
        stage, elapsed_ms = msg.feedback.stage, msg.feedback.elapsed_ms
        self.feedback.append((stage, elapsed_ms))
        if msg.feedback.frames:
            self.frames = ask_action.frames_dict(msg.feedback.frames)
        if self._on_feedback is not None:
            self._on_feedback(stage, elapsed_ms)

    def _on_response(self, future) -> None:
        self.handle = future.result()
        if self.handle.accepted:
            self.handle.get_result_async().add_done_callback(self._on_result)
        else:
            self._ended.set()
        self._responded.set()

    def _on_result(self, future) -> None:
        response = future.result()
        self.status, self.typed = response.status, response.result
        self.outcome = ask_action.result_dict(response.result)
        self._ended.set()

    def wait_accepted(self, timeout: float) -> bool:
        """Whether rclpy accepted the goal, once its goal response came (TimeoutError after ``timeout`` s)."""
        if not self._responded.wait(timeout):
            raise TimeoutError(f"no goal response for {self.request_id!r} within {timeout:g} s")
        return bool(self.handle.accepted)

    def result(self, timeout: float) -> dict:
        """The goal's result in the JSON result's shape (``status`` ok, busy, stale, cancelled, ... and why in
        ``error``); TimeoutError after ``timeout`` s, GoalRejected if rclpy rejected it."""
        if not self._ended.wait(timeout):
            raise TimeoutError(f"no result for goal {self.request_id!r} within {timeout:g} s")
        if self.outcome is None:
            raise GoalRejected(f"goal {self.request_id!r} was rejected: its UUID is in use")
        return self.outcome

    def cancel(self, timeout: float) -> bool:
        """Ask the agent to cancel the goal: a running one stops at its next stage or token, a queued one is
        answered ``cancelled`` at once; its result follows either way.  False when it had already ended."""
        if not self.wait_accepted(timeout):
            return False
        return bool(wait_future(self.handle.cancel_goal_async(), timeout, "the cancel request").goals_canceling)


class AgentClient(SpinningNode):
    """The agent's client: ``query`` asks and waits (the ``ask`` action when the agent serves it, else the JSON
    topics); ``send_goal`` and ``instruct`` are the two paths on their own; ``status`` and ``wait_ready`` read
    ``/diagnostics``.  Subclasses may override ``on_result`` and ``on_status`` to see every result and status.

    ``depth``: the instruction and result topics and the action's services hold bursts of this many messages
    (the node's ``instruction_history_depth`` is 1000 too); the newest ``depth`` results nobody has claimed yet
    are kept for ``wait_result``."""

    def __init__(
        self,
        node_name: str = "ptp_client",
        namespace: str | None = None,
        *,
        args: list[str] | None = None,
        depth: int = ask_action.CLIENT_DEPTH,
    ):
        self._cond = threading.Condition()  # guards the results and statuses; notified after every message
        self._results: OrderedDict[str, dict] = OrderedDict()  # request id → its first result, until claimed
        self._statuses: dict[str, AgentStatus] = {}  # node → its newest status, the most recent last
        self._camera_statuses: dict[tuple[str, str], CameraStatus] = {}  # (node, camera) → its newest status
        self._depth = depth
        self._numbers = itertools.count(1)
        self._tag = uuid.uuid4().hex[:8]  # ids of this client's requests differ from another run's
        super().__init__(node_name, namespace, args)
        try:
            self.instruction_pub = self.node.create_publisher(String, INSTRUCTION, reliable(depth))
            self.subscribe(String, RESULT, self._on_result_message, reliable(depth))
            self.subscribe(DiagnosticArray, DIAGNOSTICS, self._on_diagnostics)
            self.Ask = ask_action.interface()  # None without ptp_ros_interfaces: the topics only
            self.action = None if self.Ask is None else ask_action.client(self.node, self.Ask, depth)
        except BaseException:
            self.close()
            raise

    def destroy_entities(self) -> None:
        if getattr(self, "action", None) is not None:
            self.action.destroy()

    # -- waiting ---------------------------------------------------------------------------------------
    def subscribe(self, msg_type, topic: str, callback: Callable[[Any], None], qos=RELIABLE):
        """Subscribe ``callback`` (run on the spin thread) to ``topic``, relative to the namespace; waits
        (``wait_for``) re-check after each message."""

        def deliver(msg) -> None:
            try:
                callback(msg)
            finally:
                self.notify()

        return self.node.create_subscription(msg_type, topic, deliver, qos)

    def notify(self) -> None:
        """Wake the waits: something they may be waiting for changed."""
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        """The first true value of ``predicate`` (checked under the client's lock after every message, and every
        ``POLL_S``); TimeoutError naming ``what`` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not (value := predicate()):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
                self._cond.wait(min(left, POLL_S))
        return value

    # -- diagnostics -----------------------------------------------------------------------------------
    def _on_diagnostics(self, array) -> None:
        with self._cond:
            self._camera_statuses.update({(c.node, c.camera): c for c in CameraStatus.parse(array)})
        for status in AgentStatus.parse(array):
            with self._cond:
                self._statuses.pop(status.node, None)
                self._statuses[status.node] = status
            self.on_status(status)

    def on_status(self, status: AgentStatus) -> None:
        """Called on the spin thread with every agent status (about 1 Hz per agent); does nothing here."""

    def status(self, node: str | None = None) -> AgentStatus | None:
        """The newest status of the agent ``node`` (its full name), or of whichever agent reported last."""
        with self._cond:
            if node is not None:
                return self._statuses.get(node)
            return next(reversed(self._statuses.values()), None)

    def camera_status(self, node: str, camera: str) -> CameraStatus | None:
        """The newest status of ``camera`` on the agent ``node`` (its full name)."""
        with self._cond:
            return self._camera_statuses.get((node, camera))

    def wait_ready(self, timeout: float, node: str | None = None) -> AgentStatus:
        """Wait until the agent (``node``, or any) reports serving with a camera frame; its status."""
        return self.wait_for(
            lambda: (status := self.status(node)) is not None and status.ready and status,
            timeout,
            f"{node or 'an agent'} serving with a camera frame",
        )

    # -- the topic path --------------------------------------------------------------------------------
    def _on_result_message(self, msg) -> None:
        try:
            result = json.loads(msg.data)
        except ValueError:
            self.node.get_logger().warning(f"a result that is not JSON: {msg.data[:200]!r}")
            return
        if not isinstance(result, dict):
            return
        with self._cond:
            self._results.setdefault(str(result.get("id")), result)
            while len(self._results) > self._depth:
                self._results.popitem(last=False)
        self.on_result(result)

    def on_result(self, result: dict) -> None:
        """Called on the spin thread with every JSON result on ``result``, whoever asked (goals' results go out
        there too); does nothing here."""

    def new_id(self) -> str:
        """A request id no other request of this client, or of another run of it, carries."""
        return f"{self.node.get_name()}-{self._tag}-{next(self._numbers)}"

    def publish(self, data: str | dict) -> None:
        """Publish one instruction message as it is: plain text (the node gives it an id), or a dict as JSON."""
        self.instruction_pub.publish(String(data=data if isinstance(data, str) else json.dumps(data)))

    def instruct(self, text: str, *, request_id: str | None = None, **fields: Any) -> str:
        """Publish a JSON instruction (``fields``: keep_ratio, latency_budget_ms, max_new_tokens, cameras — a list
        of camera names); its id (a new one unless given), which its result will carry."""
        request_id = request_id or self.new_id()
        self.publish({"id": request_id, "text": text, **fields})
        return request_id

    def wait_result(self, request_id: str, timeout: float) -> dict:
        """The JSON result of ``request_id``, claimed (another call waits for another one); TimeoutError after
        ``timeout`` s."""
        return self.wait_for(lambda: self._results.pop(request_id, None), timeout, f"the result of {request_id!r}")

    # -- the action path -------------------------------------------------------------------------------
    def wait_for_action(self, timeout: float) -> bool:
        """Whether the agent serves the ``ask`` action (waiting up to ``timeout`` s for it) and this side has
        ptp_ros_interfaces."""
        return self.action is not None and self.action.wait_for_server(timeout_sec=timeout)

    def send_goal(
        self,
        text: str,
        *,
        request_id: str | None = None,
        feedback: Callable[[str, float], None] | None = None,
        **fields: Any,
    ) -> Goal:
        """Send a goal (``fields`` as for ``instruct``); ``feedback(stage, elapsed_ms)`` is called on the spin
        thread as the goal passes each stage."""
        if self.Ask is None:
            raise RuntimeError(f"the ask action needs ptp_ros_interfaces: {ask_action.INTERFACE_HINT}")
        message = ask_action.goal_message(self.Ask, text, id=request_id or self.new_id(), **fields)
        return self.send_goal_message(message, feedback=feedback)

    def send_goal_message(self, message, *, feedback=None, goal_uuid=None) -> Goal:
        """Send an ``Ask.Goal`` as it is, under ``goal_uuid`` if given (rclpy rejects one in use)."""
        if self.action is None:
            raise RuntimeError(f"the ask action needs ptp_ros_interfaces: {ask_action.INTERFACE_HINT}")
        return Goal(self.action, message, feedback, goal_uuid)

    # -- either --------------------------------------------------------------------------------------------
    def query(self, text: str, *, timeout: float, request_id: str | None = None, **fields: Any) -> dict:
        """Ask and wait for the result (JSON shape): over the ``ask`` action when the agent serves it, else on
        the topics.  After ``timeout`` s TimeoutError, and a goal is cancelled: the agent stops spending time on
        an answer nobody waits for."""
        if self.action is None or not self.action.server_is_ready():
            return self.wait_result(self.instruct(text, request_id=request_id, **fields), timeout)
        goal = self.send_goal(text, request_id=request_id, **fields)
        try:
            return goal.result(timeout)
        except TimeoutError:
            if goal.accepted:
                goal.handle.cancel_goal_async()
            raise
