"""The ``ask`` action (``ptp_ros_interfaces/action/Ask``): the typed way for a planner to ask the agent, beside the
JSON ``instruction``/``result`` topics, which stay.

A goal is the JSON request as typed fields and goes through the same checks (``request_from_fields``, the node
being serving, the worker's queue and overload rules).  An action's goal response carries no reason, so every
goal rclpy accepts is taken (rclpy itself rejects only a goal whose UUID is in use, and such a goal never
reaches the node), and one the node refuses is aborted at once with a typed result that says why (``rejected``
or ``busy`` and the reason): the refusal reaches the action client, under the goal's own ``request_id``.  A goal
is submitted to the worker only once rclpy accepted it, so a goal rclpy rejects never runs.  An accepted goal
gets feedback per stage, ends exactly once with the worker's result (succeeded when ``ok``, canceled when its
client cancelled it, aborted otherwise), and its result is published on ``result`` as JSON too.

The services and the feedback topic keep as many messages as the JSON topics (``instruction_history_depth``):
with rclpy's default depth of 10, a burst of goals loses requests and responses below rclpy, unanswered.

The interface package is built separately (ament_cmake + rosidl); without it the node serves the topics only.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import threading
import time
import uuid
from typing import Any

from ..result import RequestResult
from .requests import RequestError, request_from_fields

ACTION_NAME = "ask"
STAGES = ("queued", "converting", "encoding", "scoring", "prefill", "decoding")
#: The feedback stage (``STAGES``) each stage of a running request reports as: the worker's "convert" (the request
#: left the queue), then the pipeline's (``timing.STAGES``, told through ``Pipeline.answer``'s ``on_stage``).
FEEDBACK = {
    "convert": "converting",
    "preprocess": "converting",
    "encode": "encoding",
    "score": "scoring",
    "select": "scoring",
    "prefill": "prefill",
    "decode": "decoding",
}
#: The typed result's fields that are not one JSON key of the same name: the request id, the frame's stamp and
#: frame_id (its header), the stage times (a StageLatency message) and the cameras' frames (CameraFrame messages
#: from the JSON object ``frames``); every other field is the JSON key it names.
FROM_JSON_APART = ("request_id", "header", "latency_ms", "frames")
CANCEL_TRANSITION_S = 2.0  # how long a cancelled goal's result waits for rclpy to mark the goal canceling
RESULT_TIMEOUT_S = 60  # how long rclpy keeps a goal's result for a client that asks for it late (rclpy's: 10 s)
CLIENT_DEPTH = 1000  # the depth ``client`` gives a planner's side: bursts as large as the node's default take
INTERFACE_HINT = "build it with `bash ptp_ros_interfaces/install.sh` (pip venv) or colcon (docs/ros.md)"


def interface():
    """The ``Ask`` action type, or None when ptp_ros_interfaces is not importable (looked up on each call, so
    a package put on the path later is found)."""
    try:
        return importlib.import_module("ptp_ros_interfaces.action").Ask
    except ImportError:
        return None


def action_qos(depth: int, side: str = "server") -> dict:
    """The keyword arguments that give ``ActionServer`` (``side="server"``) or ``ActionClient`` (``"client"``) the
    goal, cancel and result services and the feedback topic reliable keep-last ``depth``; rclpy's default of 10
    loses the 11th of a burst of goals (or of their result requests) on whichever side is shallower.  The status
    topic keeps rclpy's profile: each status message lists every goal."""
    from .topics import reliable

    deep = reliable(depth)
    feedback = {"server": "feedback_pub_qos_profile", "client": "feedback_sub_qos_profile"}[side]
    return {
        "goal_service_qos_profile": deep,
        "result_service_qos_profile": deep,
        "cancel_service_qos_profile": deep,
        feedback: deep,
    }


def client(node, Ask, depth: int = CLIENT_DEPTH):
    """An ``ActionClient`` of the ask action whose QoS holds a burst of ``depth`` goals; safe to create on a node
    that is already spinning (``LockedFirstActionClient``)."""
    return _locked_first_client()(node, Ask, ACTION_NAME, **action_qos(depth, "client"))


@functools.cache
def _locked_first_client():
    from rclpy.action import ActionClient

    class LockedFirstActionClient(ActionClient):
        """rclpy's ``ActionClient`` with its lock made first: rclpy's ``__init__`` adds the client to the node's
        waitables and only then makes ``_lock``, so an executor already spinning that node in another thread can
        call ``get_num_entities`` in between and die on ``AttributeError`` (seen in CI: a client's spin thread
        ended and it waited out its timeouts)."""

        def __init__(self, *args, **kwargs):
            self._lock = threading.Lock()
            super().__init__(*args, **kwargs)

    return LockedFirstActionClient


# -- messages <-> the JSON shapes ------------------------------------------------------------------------
def goal_message(Ask, text: str, **fields: Any):
    """An ``Ask.Goal`` from the fields of a JSON instruction (``id``, ``keep_ratio``, ...); absent ones are 0."""
    return Ask.Goal(
        instruction=text,
        request_id=str(fields.get("id", "")),
        keep_ratio=float(fields.get("keep_ratio") or 0.0),
        latency_budget_ms=float(fields.get("latency_budget_ms") or 0.0),
        max_new_tokens=int(fields.get("max_new_tokens") or 0),
        cameras=list(fields.get("cameras") or []),
    )


def goal_fields(goal) -> dict[str, Any]:
    """The fields of the JSON instruction a goal stands for: an empty ``request_id`` and 0 or NaN numbers are
    left out (the node's defaults); anything else, ±inf included, is kept for the checks to refuse."""
    fields: dict[str, Any] = {"text": goal.instruction}
    if goal.request_id:
        fields["id"] = goal.request_id
    for name in ("keep_ratio", "latency_budget_ms"):
        value = getattr(goal, name)
        if value != 0.0 and not math.isnan(value):
            fields[name] = value
    if goal.max_new_tokens:
        fields["max_new_tokens"] = goal.max_new_tokens
    if len(goal.cameras):
        fields["cameras"] = list(goal.cameras)
    return fields


def result_message(Ask, result: dict):
    """The typed ``Ask.Result`` of a JSON result (``RequestResult.to_json``): each field the message declares takes
    the JSON key of its name, converted by the field's type (a number the JSON leaves out is NaN, a count 0, a
    text empty, a flag false); ``request_id`` is its ``id``, ``header`` its ``stamp`` and ``frame_id``."""
    msg = Ask.Result(request_id=str(result.get("id", "")))
    for name, kind in msg.get_fields_and_field_types().items():
        if name not in FROM_JSON_APART:
            setattr(msg, name, _typed(kind, result.get(name)))
    if stamp := result.get("stamp"):
        msg.header.stamp.sec, msg.header.stamp.nanosec = int(stamp["sec"]), int(stamp["nanosec"])
    msg.header.frame_id = str(result.get("frame_id", ""))
    msg.frames = camera_frames(result.get("frames") or {})
    latency = result.get("latency_ms") or {}
    for stage in msg.latency_ms.get_fields_and_field_types():
        setattr(msg.latency_ms, stage, float(latency.get(stage, math.nan)))
    return msg


def camera_frames(frames: dict) -> list:
    """``CameraFrame`` messages of the JSON ``frames`` object (camera → ``CameraFrame.to_json``), in its order."""
    from ptp_ros_interfaces.msg import CameraFrame

    out = []
    for camera, frame in frames.items():
        msg = CameraFrame(camera=camera)
        msg.header.stamp.sec, msg.header.stamp.nanosec = int(frame["stamp"]["sec"]), int(frame["stamp"]["nanosec"])
        msg.header.frame_id = str(frame["frame_id"])
        msg.visual_tokens_kept = int(frame.get("visual_tokens_kept") or 0)
        msg.visual_tokens_total = int(frame.get("visual_tokens_total") or 0)
        out.append(msg)
    return out


def frames_dict(msgs) -> dict:
    """The JSON ``frames`` object of ``CameraFrame`` messages (token counts left out while unknown: total 0)."""
    out = {}
    for msg in msgs:
        frame = {"stamp": {"sec": msg.header.stamp.sec, "nanosec": msg.header.stamp.nanosec}}
        frame["frame_id"] = msg.header.frame_id
        if msg.visual_tokens_total:
            frame.update(visual_tokens_kept=msg.visual_tokens_kept, visual_tokens_total=msg.visual_tokens_total)
        out[msg.camera] = frame
    return out


def _typed(kind: str, value: Any) -> Any:
    """A JSON value as a message field of type ``kind``; absent (``None``): NaN, 0, "" or false."""
    if kind == "string":
        return "" if value is None else str(value)
    if kind in ("double", "float"):
        return math.nan if value is None else float(value)
    if kind == "boolean":
        return bool(value)
    return 0 if value is None else int(value)  # the counts: uint32 and friends


def result_dict(msg) -> dict:
    """The JSON shape of a typed result (what ``describe`` and scripts read): ``result_message`` read back, NaN
    numbers and empty texts left out."""
    out: dict[str, Any] = {"id": msg.request_id}
    for name, kind in msg.get_fields_and_field_types().items():
        value = getattr(msg, name)
        absent = (kind == "string" and not value) or (kind in ("double", "float") and math.isnan(value))
        if name not in FROM_JSON_APART and not absent:
            out[name] = value
    if msg.header.frame_id or msg.header.stamp.sec or msg.header.stamp.nanosec:
        out.update(
            stamp={"sec": msg.header.stamp.sec, "nanosec": msg.header.stamp.nanosec}, frame_id=msg.header.frame_id
        )
    if msg.frames:
        out["frames"] = frames_dict(msg.frames)
    latency = {stage: getattr(msg.latency_ms, stage) for stage in msg.latency_ms.get_fields_and_field_types()}
    if not all(math.isnan(v) for v in latency.values()):
        out["latency_ms"] = {k: v for k, v in latency.items() if not math.isnan(v)}
    return out


# -- the server --------------------------------------------------------------------------------------------
class Goal:
    """One goal rclpy accepted, from ``handle_accepted_callback`` to its result."""

    def __init__(self, handle, request_id: str, Feedback):
        self.handle, self.request_id, self.Feedback = handle, request_id, Feedback
        self.received = time.monotonic()
        self.lock = threading.Lock()  # orders the feedback and starts execution once
        self.reached: list[tuple[str, float, list]] = [("queued", 0.0, [])]  # stage, elapsed ms, CameraFrame msgs
        self.split: list = []  # each camera's frame and token split (CameraFrame messages), once known
        self.sent = 0  # feedback messages published
        self.queued: bool | None = None  # None until the worker queued it (True) or it was refused (False)
        self.executing = False
        self.cancel_requested = False
        self.result: RequestResult | None = None
        self.done = threading.Event()
        self.cancel = threading.Event()  # the request's own: set, it stops at its next stage or token

    def stage(self, name: str) -> None:
        """The worker's and the pipeline's stage ``name`` began: feedback when it starts a new ``STAGES`` one
        (``FEEDBACK``); called on the inference thread."""
        feedback = FEEDBACK[name]
        with self.lock:
            if not self.reached or feedback != self.reached[-1][0]:
                self.reached.append((feedback, (time.monotonic() - self.received) * 1e3, self.split))
                self._advance()

    def frames(self, frames: dict) -> None:
        """Each camera's frame and token split (``CameraFrame`` by camera) is known: every later feedback carries
        it; called on the inference thread."""
        with self.lock:
            self.split = camera_frames({camera: frame.to_json() for camera, frame in frames.items()})

    def finish(self, result: RequestResult) -> None:
        with self.lock:
            self.result = result
            self.done.set()
            self._advance()

    def settle(self, queued: bool) -> None:
        """Whether the worker queued the goal; a refused goal was never queued and gets no feedback."""
        with self.lock:
            self.queued = queued
            if not queued:
                self.reached = []
            self._advance()

    def _advance(self) -> None:
        """Publish the stages not yet sent, and execute the goal once it left the queue or has its result
        (while it waits in the queue it holds no executor thread)."""
        if self.queued is None:  # the worker may report stages before submit returned: hold them until then
            return
        for name, elapsed, frames in self.reached[self.sent :]:
            self.handle.publish_feedback(self.Feedback(stage=name, elapsed_ms=elapsed, frames=frames))
        self.sent = len(self.reached)
        if not self.executing and (self.result is not None or len(self.reached) > 1):
            self.executing = True
            self.handle.execute()


class AskServer:
    """The ``ask`` action server of an ``AgentNode``; its services and feedback keep ``depth`` messages."""

    def __init__(self, node, Ask, depth: int):
        from rclpy.action import ActionServer
        from rclpy.callback_groups import ReentrantCallbackGroup

        self.node, self.Ask = node, Ask
        self._lock = threading.Lock()
        self._by_key: dict[str, Goal] = {}  # the worker's request id of each goal → the goal, until its result
        self._by_uuid: dict[bytes, Goal] = {}  # until rclpy has its result
        self.server = ActionServer(
            node,
            Ask,
            ACTION_NAME,
            self._execute,
            callback_group=ReentrantCallbackGroup(),
            handle_accepted_callback=self._on_accepted,
            cancel_callback=self._on_cancel,
            result_timeout=RESULT_TIMEOUT_S,
            **action_qos(depth),
        )

    # -- callbacks ---------------------------------------------------------------------------------
    def _on_accepted(self, handle) -> None:
        """Take a goal rclpy accepted: queue it, or end it at once with the reason the node refuses it."""
        node = self.node
        node.counters.add(received=1)
        goal = Goal(handle, node.default_request_id(), self.Ask.Feedback)
        key = f"{ACTION_NAME}-goal-{uuid.uuid4().hex}"  # unique, so that a topic request cannot take its result
        with self._lock:
            self._by_uuid[bytes(handle.goal_id.uuid)] = goal
            self._by_key[key] = goal
        try:
            queued = self._submit(goal, key)
        except Exception as exc:  # noqa: BLE001 - no goal may end the callback, and every goal gets a result
            node.counters.add(internal_errors=1)
            node.refuse(
                key, handle.request.instruction[:200], f"internal error: {type(exc).__name__}: {exc}", status="error"
            )
            queued = False
        goal.settle(queued)

    def _submit(self, goal: Goal, key: str) -> bool:
        """Submit the goal's request to the worker (True: queued); a refusal's result goes out under ``key``,
        which ``route`` turns into the goal's own request id."""
        node, message = self.node, goal.handle.request
        try:
            request = request_from_fields(
                goal_fields(message), goal.request_id, node.get_parameter("max_instruction_chars").value
            )
        except RequestError as exc:
            goal.request_id = exc.request_id or goal.request_id
            node.refuse(key, message.instruction[:200], f"invalid instruction: {exc}")
            return False
        goal.request_id = request.id
        worker, problem = node.serving_worker()
        if worker is None:
            node.refuse(key, request.text, problem)
            return False
        return worker.submit(
            dataclasses.replace(request, id=key),
            goal.received,
            cancel=goal.cancel,
            on_stage=goal.stage,
            on_frames=goal.frames,
        )

    def _on_cancel(self, handle):
        from rclpy.action import CancelResponse

        goal = self._by_uuid.get(bytes(handle.goal_id.uuid))
        if goal is None or goal.done.is_set():
            return CancelResponse.REJECT
        goal.cancel_requested = True
        goal.cancel.set()  # running: it stops at its next stage or token
        if (worker := self.node.worker) is not None:
            worker.withdraw(goal.cancel)  # waiting: answered now, and its place in the queue is free
        return CancelResponse.ACCEPT

    def _execute(self, handle):
        """Runs once the goal left the queue (or has its result); waits for the worker's result."""
        with self._lock:
            goal = self._by_uuid[bytes(handle.goal_id.uuid)]
        goal.done.wait()
        result = goal.result
        if result.status == "cancelled" and goal.cancel_requested:
            deadline = time.monotonic() + CANCEL_TRANSITION_S  # rclpy marks it canceling after _on_cancel returns
            while not handle.is_cancel_requested and time.monotonic() < deadline:
                time.sleep(0.005)
        if result.status == "ok":
            handle.succeed()
        elif result.status == "cancelled" and handle.is_cancel_requested:
            handle.canceled()
        else:
            handle.abort()
        with self._lock:
            self._by_uuid.pop(bytes(handle.goal_id.uuid), None)
        return result_message(self.Ask, result.to_json())

    # -- from the node ---------------------------------------------------------------------------------
    def route(self, result: RequestResult) -> None:
        """Called with every result the node publishes: a goal's gets the goal's request id back and ends
        the goal."""
        with self._lock:
            goal = self._by_key.pop(result.id, None)
        if goal is not None:
            result.id = goal.request_id
            goal.finish(result)

    def open_goals(self) -> int:
        """Accepted goals whose result has not been handed to rclpy yet."""
        with self._lock:
            return len(self._by_uuid)

    def drain(self, executor, timeout_s: float) -> None:
        """After the worker stopped (every goal has its result): spin until rclpy sent the goals' results."""
        deadline = time.monotonic() + timeout_s
        while self.open_goals() and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.05)
        end = min(deadline, time.monotonic() + 0.2)  # the result responses go out as tasks of their own
        while time.monotonic() < end:
            executor.spin_once(timeout_sec=0.05)


def serve(node) -> AskServer | None:
    """The ask action server of ``node``, or None (logged) when ptp_ros_interfaces is not importable."""
    Ask = interface()
    if Ask is None:
        node.get_logger().info(
            f"the ask action is off: ptp_ros_interfaces is not importable; {INTERFACE_HINT}. "
            "The instruction/result topics work without it."
        )
        return None
    try:
        return AskServer(node, Ask, node.get_parameter("instruction_history_depth").value)
    except Exception as exc:  # noqa: BLE001 - e.g. a build whose type support libraries cannot be loaded
        node.get_logger().error(f"the ask action is off: {type(exc).__name__}: {exc}; {INTERFACE_HINT}")
        return None
