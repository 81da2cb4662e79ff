"""The PTP agent: a lifecycle node that answers instructions about the newest frames of its cameras.

One node serves every camera of the robot with one model: the ``cameras`` parameter names them (empty: one
camera on ``image``), and a request names the camera(s) it asks about (``default_cameras`` when it names none).
configure loads the model and fits the latency model, activate subscribes to the cameras and starts
the inference thread, deactivate stops both, cleanup frees the model.  With ``autostart`` (default)
``main`` walks the node to active by itself, so ``python -m ptp_ros.ros.node --ros-args --params-file
config/agent.yaml`` works without a lifecycle manager; ``-p autostart:=false`` leaves it to one.
See docs/ros.md for the interface.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import itertools
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import cv2
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.duration import Duration
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header, String

from ..pipeline import Cancelled
from ..result import RequestResult
from ..vlm.defaults import default_model_path
from ..vlm.loading import RESOLUTION_OPTIONS, LoadOptions, ModelLoadError, load_adapter, quiet_transformers
from . import ask_action, conversions
from .diagnostics import Health, agent_status, camera_status
from .frames import SINGLE_CAMERA, Frame, camera_problems
from .intake import CameraIntake
from .params import BY_NAME, PARAMS, RUNTIME, check_choice, removed_parameter_warnings, widen_integers
from .requests import RequestError, loggable, parse_request
from .topics import (
    ANSWER,
    COMPRESSED,
    DIAGNOSTICS,
    INSTRUCTION,
    RELIABLE,
    RESULT,
    SALIENCY,
    camera_image,
    camera_saliency,
    camera_status_name,
    reliable,
    status_name,
)
from .worker import Counters, RequestWorker, Settings, calibrate

SAMPLE_IMAGE = Path(__file__).resolve().parents[1] / "data" / "sample_scene.jpg"
RESULT_FLUSH_S = 1.0  # on shutdown, how long the last results (the cancelled ones) may take to be acknowledged
LOG_THROTTLE_S = 5.0  # one line per kind of failure per 5 s: a flood of bad input cannot flood the log


class AgentNode(LifecycleNode):
    def __init__(self, node_name: str = "ptp_agent", **kwargs):
        super().__init__(node_name, **kwargs)
        for p in PARAMS:
            self.declare_parameter(p.name, p.declared, p.descriptor())
            if reason := check_choice(p.name, self.parameter(p.name)):
                raise ValueError(reason)
        self.settings = Settings(**{name: self.get_parameter(name).value for name in RUNTIME})
        if problems := self.settings.problems():
            raise ValueError("; ".join(problems))
        self.cameras = tuple(self.parameter("cameras")) or (SINGLE_CAMERA,)
        if problems := camera_problems(self.parameter("cameras"), self.parameter("default_cameras")):
            raise ValueError("; ".join(problems))
        # image_transport's naming: <the resolved image topic>/compressed, so `-r image:=/cam/raw` alone subscribes
        # to /cam/raw/compressed (and `-r head/image:=/cam/raw` to /cam/raw/compressed for the camera head)
        self.compressed = self.get_parameter("image_transport").value == "compressed"
        suffix = f"/{COMPRESSED}" if self.compressed else ""
        self.camera_topics = {c: self.resolve_topic_name(camera_image(c)) + suffix for c in self.cameras}
        self.add_pre_set_parameters_callback(widen_integers)  # `ros2 param set ... latency_budget_ms 4000` works
        self.add_on_set_parameters_callback(self._validate_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)
        self.counters = Counters()
        self.model_state = "unconfigured"
        self.configure_error = ""
        self.device = self.get_parameter("device").value
        self.worker: RequestWorker | None = None
        self.intake = CameraIntake(self, on_error=self.callback_failed)  # the camera, on a thread of its own
        self._request_numbers = itertools.count(1)  # thread-safe: instructions arrive on a reentrant group
        self._configure_cancel = threading.Event()  # set on shutdown: calibration stops at its next token
        self.finalized = threading.Event()  # set by the shutdown transition: main then exits the process
        self.configuring = False  # model loading cannot be interrupted: a shutdown then exits the process
        self._max_pixels = self.get_parameter("max_input_pixels").value
        # outputs and the instruction input exist in every state: a planner always gets a result,
        # an operator always gets diagnostics, even when the model failed to load
        self._io_group = ReentrantCallbackGroup()
        # instructions and results share one depth, sized for bursts: every instruction that DDS delivers
        # gets exactly one result, and a burst of busy results must not overwrite each other unsent
        depth = self.get_parameter("instruction_history_depth").value
        self._answer_pub = self.create_publisher(String, ANSWER, reliable(depth))
        self._result_pub = self.create_publisher(String, RESULT, reliable(depth))
        self._saliency_pub = self.create_publisher(Image, SALIENCY, QoSProfile(depth=2))  # the default cameras'
        self._camera_saliency_pubs = {
            camera: self.create_publisher(Image, camera_saliency(camera), QoSProfile(depth=2))
            for camera in self.cameras
        }
        self._diag_pub = self.create_publisher(DiagnosticArray, DIAGNOSTICS, RELIABLE)
        self.create_subscription(
            String, INSTRUCTION, self._on_instruction, reliable(depth), callback_group=self._io_group
        )
        self.steady_clock = Clock(clock_type=ClockType.STEADY_TIME)
        # wall-clock timers: under use_sim_time a ROS-time timer would stay silent until a bag publishes /clock
        self.create_timer(
            1.0, self._publish_diagnostics, callback_group=MutuallyExclusiveCallbackGroup(), clock=self.steady_clock
        )
        self.ask = ask_action.serve(self)  # the typed Ask action, when ptp_ros_interfaces is importable

    # -- parameters -------------------------------------------------------------------------------
    def parameter(self, name: str):
        """The value of the declared parameter ``name``; an unset string list (never given) is its empty default."""
        value = self.get_parameter_or(name).value
        return BY_NAME[name].default if value is None else value

    def _validate_parameters(self, params: list[Parameter]) -> SetParametersResult:
        """Choices and cross-parameter rules; rclpy already checked ranges, types and read-only."""
        changes = {p.name: p.value for p in params if p.name in RUNTIME}
        problems = [reason for p in params if (reason := check_choice(p.name, p.value))]
        if not problems and changes:
            problems = dataclasses.replace(self.settings, **changes).problems()
        return SetParametersResult(successful=not problems, reason="; ".join(problems))

    def _apply_parameters(self, params: list[Parameter]) -> None:
        changes = {p.name: p.value for p in params if p.name in RUNTIME}
        if changes:
            self.settings = dataclasses.replace(self.settings, **changes)
            if self.worker is not None:
                self.worker.settings = self.settings
            # throttled: a peer setting parameters in a loop cannot flood the log (every change is on
            # /parameter_events)
            self.get_logger().info(f"parameters changed: {changes}", throttle_duration_sec=LOG_THROTTLE_S)

    # -- lifecycle --------------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.configuring = True
        try:
            return self._configure()
        finally:
            self.configuring = False

    def _configure(self) -> TransitionCallbackReturn:
        param = self.get_parameter
        try:
            self.model_state = "loading"
            adapter = self.load_model()
            self.device = str(adapter.device)
            self.worker = RequestWorker(
                adapter,
                self.settings,
                queue_size=param("queue_size").value,
                emit=self._publish_result,
                emit_saliency=self._publish_saliency,
                now_ns=lambda: self.get_clock().now().nanoseconds,
                counters=self.counters,
                max_instruction_chars=param("max_instruction_chars").value,
                encode_cache_frames=param("encode_cache_frames").value,
                encode_reuse_threshold=param("encode_reuse_threshold").value,
                cameras=self.cameras,
                default_cameras=self.parameter("default_cameras"),  # empty: the worker's first camera
            )
            self.model_state = "calibrating"
            image = self._calibration_image(param("calibration_image").value)
            started = time.monotonic()
            runs = calibrate(
                self.worker,
                image,
                list(param("calibration_keep_ratios").value),
                self.settings.max_new_tokens,
                cancel=self._configure_cancel,
            )
            self.get_logger().info(f"calibrated in {time.monotonic() - started:.1f} s on {self.device}: {runs}")
        except Exception as exc:  # noqa: BLE001 - any load fault (corrupt file, wrong architecture) is named
            cause = str(exc) if isinstance(exc, ModelLoadError) else f"{type(exc).__name__}: {exc}"
            if isinstance(exc, Cancelled):
                cause = "the node shut down during configure"
            self.model_state = "error"
            self.worker = None
            self.configure_error = f"configure failed: {loggable(cause, 500)}"
            self.counters.error(self.configure_error)
            self.get_logger().error(self.configure_error)
            return TransitionCallbackReturn.FAILURE
        self.model_state, self.configure_error = "ready", ""
        return TransitionCallbackReturn.SUCCESS

    def load_model(self):
        """The adapter named by the read-only model parameters (ModelLoadError with the reason if not)."""
        param = self.get_parameter
        path = param("model_path").value or default_model_path()
        self.get_logger().info(f"loading model {path}")
        for warning in removed_parameter_warnings(self):
            self.get_logger().warning(warning)
        resolution = {name: param(name).value for name in RESOLUTION_OPTIONS}  # 0: the checkpoint's own
        return load_adapter(
            path,
            LoadOptions(device=param("device").value, dtype=param("dtype").value),
            **{name: value for name, value in resolution.items() if value},
        )

    @staticmethod
    def _calibration_image(path: str):
        source = path or str(SAMPLE_IMAGE)
        bgr = cv2.imread(source)
        if bgr is None:
            raise ValueError(f"calibration_image {source!r} cannot be read")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        for camera, topic in self.camera_topics.items():
            self.intake.subscribe(CompressedImage if self.compressed else Image, topic, self._frame_callback(camera))
        self.worker.start()
        self.model_state = "serving"
        topics = ", ".join(s.topic_name for s in self.intake.subscriptions)
        self.get_logger().info(f"serving: images on {topics}, conversion by {conversions.BACKEND}")
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.stop_serving("the node was deactivated before the request ran")
        self.model_state = "ready"
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.worker = None  # the worker holds the only reference to the adapter
        gc.collect()
        self.model_state = "unconfigured"
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Finalized is final (no transition leads out of it), so the process exits: diagnostics say
        ``finalized`` once more, and ``main`` stops as on SIGTERM."""
        self.stop_serving("the node shut down", shutting_down=True)
        self.worker = None
        self.model_state = "finalized"
        self._publish_diagnostics()
        self.finalized.set()
        return TransitionCallbackReturn.SUCCESS

    def stop_serving(self, reason: str, shutting_down: bool = False) -> None:
        """Stop the camera and the worker: the running request is cancelled, queued ones answered; on
        shutdown a calibration still running is cancelled too."""
        if shutting_down:
            self._configure_cancel.set()
        self.intake.unsubscribe()
        if self.worker is not None:
            self.worker.stop(reason)

    # -- callbacks: store, enqueue, return -------------------------------------------------------
    def _frame_callback(self, camera: str):
        """The intake callback of ``camera``'s frames (raw or compressed, as ``image_transport`` says)."""
        if self.compressed:
            check, decode = conversions.check_compressed, conversions.compressed_to_rgb
        else:
            check, decode = conversions.check_image, conversions.image_to_rgb
        return lambda msg: self._store_frame(msg, check, decode, camera)

    def _store_frame(self, msg, check, decode, camera: str) -> None:
        """Keep the frame for the next request; a bad one is kept too, so that request can say why."""
        arrived = time.monotonic()
        worker = self.worker
        if worker is None:
            return
        try:
            check(msg, self._max_pixels)
            error = None
        except conversions.ImageConversionError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - no frame may end the callback
            error = f"{type(exc).__name__}: {exc}"
            self.counters.add(internal_errors=1)
        if error is not None:
            self.counters.error(f"invalid image: {error}")
            self.get_logger().warning(f"invalid image: {loggable(error)}", throttle_duration_sec=LOG_THROTTLE_S)
        stamp = msg.header.stamp
        worker.put_frame(
            Frame(
                stamp_ns=stamp.sec * 1_000_000_000 + stamp.nanosec,
                stamp={"sec": stamp.sec, "nanosec": stamp.nanosec},
                frame_id=msg.header.frame_id,
                header=msg.header,
                decode=lambda: decode(msg, self._max_pixels),
                error=error,
                arrived=arrived,
                camera=camera,
            )
        )

    def _on_instruction(self, msg: String) -> None:
        """Exactly one result for every message: a queued request's comes later, any other now."""
        received = time.monotonic()
        self.counters.add(received=1)
        default_id = self.default_request_id()
        try:
            self._take_instruction(msg.data, default_id, received)
        except Exception as exc:  # noqa: BLE001 - no message may end the callback (and with it the process)
            self.counters.add(internal_errors=1)
            text = msg.data[:200] if isinstance(msg.data, str) else ""
            self.refuse(default_id, text, f"internal error: {type(exc).__name__}: {exc}", status="error")

    def _take_instruction(self, data: str, default_id: str, received: float) -> None:
        try:
            request = parse_request(data, default_id, self.get_parameter("max_instruction_chars").value)
        except RequestError as exc:
            self.refuse(exc.request_id or default_id, data[:200], f"invalid instruction: {exc}")
            return
        worker, problem = self.serving_worker()
        if worker is None:
            self.refuse(request.id, request.text, problem)
            return
        worker.submit(request, received)

    def default_request_id(self) -> str:
        """``<node>-<n>``, for a request without an id of its own (thread-safe)."""
        return f"{self.get_name()}-{next(self._request_numbers)}"

    def serving_worker(self) -> tuple[RequestWorker | None, str]:
        """(the worker, "") when the node takes requests now, else (None, why not)."""
        worker = self.worker
        if worker is not None and self.model_state == "serving":
            return worker, ""
        reason = f"not serving: model {self.model_state}"
        if self.configure_error:
            reason += f" ({self.configure_error})"
        return None, reason

    def refuse(self, request_id: str, text: str, reason: str, status: str = "rejected") -> None:
        """Count and publish the result of a request refused before it reached the worker."""
        self._publish_result(self.counters.rejection(request_id, text, reason, status=status))

    # -- outputs (called from the worker thread) -----------------------------------------------
    def flush_results(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) until subscribers acknowledged the results already published."""
        try:
            self._result_pub.wait_for_all_acked(Duration(seconds=timeout_s))
        except Exception as exc:  # noqa: BLE001 - best effort on the way out
            self.get_logger().warning(f"results may be unsent at shutdown: {exc}")

    def _publish_result(self, result: RequestResult) -> None:
        """The one result of a request: the action's typed result (a goal's), the JSON on ``result``, the answer
        text on ``answer`` — all from ``result``."""
        if self.ask is not None:
            self.ask.route(result)  # an action goal's: ends the goal, and gets the goal's request id back
        if result.answer is not None:
            self._answer_pub.publish(String(data=result.answer.answer))
        elif result.status != "busy":
            self.get_logger().warning(
                f"request {loggable(str(result.id), 80)}: {loggable(result.error or '')}",
                throttle_duration_sec=LOG_THROTTLE_S,
            )
        self._result_pub.publish(String(data=json.dumps(result.to_json())))

    def _publish_saliency(self, bgr, header, camera: str, default: bool) -> None:
        """``camera``'s saliency image on ``saliency/<camera>``, and on ``saliency`` for the default cameras."""
        msg = conversions.array_to_imgmsg(bgr, "bgr8", header)
        self._camera_saliency_pubs[camera].publish(msg)
        if default:
            self._saliency_pub.publish(msg)

    def _publish_diagnostics(self) -> None:
        worker, counters, now = self.worker, self.counters, time.monotonic()
        problem = worker.health(self.get_parameter("watchdog_timeout_s").value) if worker else None
        if problem:
            self.get_logger().error(f"watchdog: {problem}", throttle_duration_sec=LOG_THROTTLE_S)
        last_frame, last_overload = counters.last_frame_arrival, counters.last_overload
        health = Health(
            model_state=self.model_state,
            configure_error=self.configure_error,
            device=self.device,
            queue_depth=worker.queue_depth if worker else 0,
            busy=bool(worker and worker.busy),
            worker_problem=problem,
            frame_silence_s=None if last_frame is None else now - last_frame,
            overload_age_s=None if last_overload is None else now - last_overload,
            prediction=worker.latency_model.prediction_error if worker else None,
            encode_reuse=worker.encode_reuse.stats if worker and worker.encode_reuse else None,
        )
        fqn = self.get_fully_qualified_name()
        statuses = [agent_status(status_name(fqn), health, self.settings, counters)]
        serving = self.model_state == "serving"
        for camera, topic in self.camera_topics.items():
            name = camera_status_name(fqn, camera)
            statuses.append(camera_status(name, camera, topic, serving, self.settings, counters, now))
        self._diag_pub.publish(DiagnosticArray(header=Header(stamp=self.get_clock().now().to_msg()), status=statuses))

    def callback_failed(self, exc: Exception) -> None:
        """An exception that escaped a callback (each catches its own; this is the last net): counted, logged."""
        self.counters.add(internal_errors=1)
        self.counters.error(f"callback failed: {type(exc).__name__}: {exc}")
        self.get_logger().error(
            f"callback failed: {loggable(f'{type(exc).__name__}: {exc}')}", throttle_duration_sec=LOG_THROTTLE_S
        )

    def destroy_node(self) -> None:
        self.intake.close()
        super().destroy_node()

    # -- startup without a lifecycle manager ---------------------------------------------------
    def bring_up(self) -> None:
        """configure → activate, as a lifecycle manager would; stays unconfigured (and says why in
        the results and diagnostics) when configure fails."""
        if self.trigger_configure() == TransitionCallbackReturn.SUCCESS:
            self.trigger_activate()


class StopSignal:
    """SIGINT/SIGTERM as a request to stop, handled by the node rather than by rclpy.

    rclpy's own handlers invalidate the context at once, so a request cancelled by the shutdown could no
    longer publish its ``cancelled`` result.  Here the first signal only sets ``event``; the spin loop
    returns within ``SPIN_PERIOD_S``, the running request is cancelled (it stops after its current token)
    and answered, and then rclpy shuts down.  A second signal interrupts the shutdown itself, unless it
    comes within ``REPEAT_S`` of the first: a non-interactive ``ros2 launch`` delivers Ctrl-C twice (the
    terminal's process group, then launch itself), and that echo must not kill the clean shutdown.
    """

    REPEAT_S = 0.5

    def __init__(self) -> None:
        self.event = threading.Event()
        self.name = ""
        self._first = 0.0
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, self._handle)

    def _handle(self, number: int, frame) -> None:
        if self.event.is_set():
            if time.monotonic() - self._first < self.REPEAT_S:
                return
            raise KeyboardInterrupt
        self._first = time.monotonic()
        self.name = signal.Signals(number).name
        self.event.set()


SPIN_PERIOD_S = 0.1


def spin_until(executor, node: AgentNode, stop: threading.Event) -> None:
    """Spin until ``stop``, the node's shutdown transition or rclpy shutdown.  An exception that escapes a
    callback (every callback catches its own, so this is the last net) is counted and logged, and spinning
    goes on: no message may end the process."""
    while not stop.is_set() and not node.finalized.is_set() and rclpy.ok(context=node.context):
        try:
            executor.spin_once(timeout_sec=SPIN_PERIOD_S)
        except (KeyboardInterrupt, ExternalShutdownException):
            raise
        except Exception as exc:  # noqa: BLE001
            node.callback_failed(exc)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc mallopt parameters
FRAME_HEAP_MAX = 32 << 20  # glibc's largest mmap threshold on 64-bit: frames up to 4K rgb8 (24.9 MB)
HEAP_KEEP = 128 << 20  # free memory a heap keeps rather than returning it to the OS: a few frames


def bound_allocator() -> None:
    """Serve camera frames from at most two heaps that reuse the memory of the frames before them.

    rclpy allocates every frame it takes three times (the C message, a bytes copy, the array); from mmap
    each would be fresh memory for the kernel to fault in and zero (1080p at 30 Hz: a quarter of a core in
    system time, for frames nobody asked about).  A fixed threshold keeps frames in the heap, the trim
    threshold keeps their freed memory there for the next frame, and two arenas bound how many heaps hold
    it: glibc otherwise makes up to eight per core, and a 32-minute soak at 10 Hz crept up 10 % in
    per-thread heaps.  No effect off glibc."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, FRAME_HEAP_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, HEAP_KEEP)
        libc.mallopt(M_ARENA_MAX, 2)
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        pass


def main(args: list[str] | None = None, node_class: type[AgentNode] = AgentNode) -> None:
    bound_allocator()
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    stop = StopSignal()
    quiet_transformers()
    node = node_class()
    executor = MultiThreadedExecutor(num_threads=4)
    executor.add_node(node)
    startup = None

    def start_once() -> None:
        startup.cancel()
        node.bring_up()

    if node.get_parameter("autostart").value:
        startup = node.create_timer(
            0.0, start_once, callback_group=MutuallyExclusiveCallbackGroup(), clock=node.steady_clock
        )
    try:
        spin_until(executor, node, stop.event)
        why = stop.name or ("the shutdown transition" if node.finalized.is_set() else "rclpy shutdown")
        node.get_logger().info(f"shutting down ({why})")
        node.stop_serving(f"the node shut down ({why})", shutting_down=True)
        if node.ask is not None:
            node.ask.drain(executor, RESULT_FLUSH_S)
        node.flush_results(RESULT_FLUSH_S)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node.configuring:  # a model still loading in an executor thread would hold the exit for seconds
            node.get_logger().info("exiting during configure")
            os._exit(0)
        try:
            executor.shutdown(timeout_sec=RESULT_FLUSH_S)
            node.destroy_node()
        except KeyboardInterrupt:  # a second signal during shutdown
            pass
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
