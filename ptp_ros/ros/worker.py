"""The serving loop behind the node, free of rclpy so it can be tested and timed without DDS.

Callbacks only store the newest frame of each camera and enqueue requests; one worker thread takes
requests in order, picks the frames that are newest *when the request starts* (for a request on several
cameras, the newest set taken within ``sync_tolerance_ms`` of each other), checks that each is fresh, chooses
the keep ratio (fixed, or from the latency budget) and runs the pipeline.  Every request that reaches
``submit`` gets exactly one result through ``emit``: an answer, ``busy`` when the queue is full or the
request could not start within its budget, ``stale``, ``out_of_sync``, ``expired``, ``cancelled`` or an error
saying why.
No exception escapes the thread: a failure becomes the result of the request it belongs to.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..budget import DEFAULT_KEEP_RATIO, check_keep_ratio, check_latency_budget_ms, ratio_tokens
from ..latency_budget import IN_LLM, PRE_LLM, BudgetChoice, LatencyModel, choose_keep_ratio
from ..overlay import saliency_images
from ..pipeline import Answer, Cancelled, InvalidRequest, OnStage, Pipeline, PipelineConfig, validate_image
from ..pruning import ConfiguredSelector
from ..result import CameraFrame, RequestResult, ViewTokens
from .frames import SINGLE_CAMERA, SYNC_HISTORY, Frame, FrameStore, Pick
from .requests import Request, loggable
from .rviz import answer_caption

MODES = ("budget", "fixed")
# the statuses besides "ok" (an answer), grouped as /diagnostics reports them
REFUSED = ("busy", "rejected", "expired")  # refused before the model ran
FAILED = ("stale", "out_of_sync", "cancelled", "error")  # the request started but has no answer
FUTURE_STAMP_TOLERANCE_MS = 500.0  # more than clock jitter between machines: the clocks disagree
FAR_PAST_STAMP_MS = 24 * 3600e3  # older than a day: the camera's clock is not set, not a stale frame
STOP_JOIN_S = 5.0
CANCELLED_BY_CLIENT = "its client cancelled it"
# the budget controller's fallback below the in-LLM floor: PTP before the LLM, its relevance probe over the
# 3 x budget tokens PTP ranks best bottom-up (docs/method.md), so its cost follows the kept tokens, not the frame
FALLBACK_PROBE_CANDIDATES = 3.0


@dataclass(frozen=True)
class Settings:
    """The runtime-settable knobs; replaced as a whole when a parameter changes."""

    mode: str = "budget"
    latency_budget_ms: float = 2000.0
    keep_ratio: float = DEFAULT_KEEP_RATIO
    keep_ratio_min: float = 0.05
    keep_ratio_max: float = 1.0
    alpha: float = 0.5
    view_split: str = "shared"
    max_new_tokens: int = 32
    publish_saliency: bool = True
    saliency_max_side: int = 1280
    max_frame_age_ms: float = 1000.0
    sync_tolerance_ms: float = 100.0

    def problems(self) -> list[str]:
        """Why these settings are unusable (empty when fine); ranges of single values are the descriptors' job."""
        out = []
        if self.mode not in MODES:
            out.append(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        checks = {name: check_keep_ratio for name in ("keep_ratio", "keep_ratio_min", "keep_ratio_max")}
        for name, check in {**checks, "latency_budget_ms": check_latency_budget_ms}.items():
            try:
                check(getattr(self, name), name)
            except ValueError as exc:
                out.append(str(exc))
        if self.keep_ratio_min > self.keep_ratio_max:
            out.append(f"keep_ratio_min {self.keep_ratio_min} exceeds keep_ratio_max {self.keep_ratio_max}")
        try:
            self.selector  # noqa: B018 - built to be checked: the selector's options are its to refuse
        except ValueError as exc:
            out.append(str(exc))
        return out

    @property
    def selector(self) -> ConfiguredSelector:
        """The selector the node runs: PTP with the ``alpha`` parameter, at the library's default stage, sharing a
        request's budget across its cameras by ``view_split``."""
        return ConfiguredSelector("ptp", {"alpha": self.alpha}, view_split=self.view_split)


def frame_freshness(
    frame: Frame, now_ns: int, now_monotonic: float, max_age_ms: float
) -> tuple[dict, str | None, str | None]:
    """(fields for the result, a warning about the stamp, why the frame is stale) for ``frame`` now.

    The age is the stamp's when the stamp is plausible.  A stamp that is unset, from the future or more
    than a day old says the camera's clock is off, not that the frame is old: it is flagged, and the age
    is judged by the frame's arrival at this node instead.
    """
    arrival_age = (now_monotonic - frame.arrived) * 1e3
    stamp_age = (now_ns - frame.stamp_ns) / 1e6 if frame.stamp_ns else None
    warning = None
    if stamp_age is None:
        warning = "the frame's stamp is unset (0); its age is judged by its arrival"
    elif stamp_age < -FUTURE_STAMP_TOLERANCE_MS:
        warning = f"the frame's stamp is {-stamp_age:.0f} ms in the future: camera and node clocks disagree"
    elif stamp_age > FAR_PAST_STAMP_MS:
        warning = f"the frame's stamp is {stamp_age / 3.6e6:.1f} h old: the camera's clock is not synchronised"
    age = arrival_age if warning else max(stamp_age, arrival_age)
    fields = {
        "frame_age_ms": round(stamp_age, 3) if stamp_age is not None else None,
        "frame_arrival_age_ms": round(arrival_age, 3),
    }
    if warning:
        fields["stamp_warning"] = warning
    stale = None
    if max_age_ms > 0 and age > max_age_ms:
        stale = f"stale frame: {age:.0f} ms old (max_frame_age_ms {max_age_ms:.0f}); is the camera still publishing?"
    return fields, warning, stale


class Counters:
    """What ``/diagnostics`` reports; shared between callbacks, the worker and the timer."""

    def __init__(self, window: int = 100):
        self._lock = threading.Lock()
        self.frames_received = self.frames_dropped = self.frames_invalid = self.frames_bad_stamp = 0
        self.received = 0  # instruction messages taken from the topic
        self.internal_errors = 0  # exceptions caught in callbacks or the worker that no check foresaw
        self.results: Counter[str] = Counter()
        self.last_error = ""
        self.last_latency_ms: float | None = None
        self.last_keep_ratio: float | None = None
        self.last_frame_arrival: float | None = None  # of any camera
        self.camera_frames: Counter[str] = Counter()  # frames received, per camera
        self.camera_dropped: Counter[str] = Counter()
        self.camera_arrival: dict[str, float] = {}  # time.monotonic() of each camera's newest frame
        self.last_overload: float | None = None  # time.monotonic() of the last busy or expired result
        self._latencies: deque[float] = deque(maxlen=window)
        self._queue_waits: deque[float] = deque(maxlen=window)

    def add(self, **increments: int) -> None:
        with self._lock:
            for name, value in increments.items():
                setattr(self, name, getattr(self, name) + value)

    def error(self, text: str) -> None:
        with self._lock:
            self.last_error = loggable(text, 500)

    def frame_arrived(self, frame: Frame, dropped: bool) -> None:
        """A camera frame was kept; ``dropped``: it pushed out a frame no request used."""
        with self._lock:
            self.frames_received += 1
            self.frames_invalid += int(frame.error is not None)
            self.frames_dropped += int(dropped)
            self.camera_frames[frame.camera] += 1
            self.camera_dropped[frame.camera] += int(dropped)
            self.camera_arrival[frame.camera] = frame.arrived
            self.last_frame_arrival = frame.arrived

    def count(self, status: str) -> None:
        """One result went out with ``status``."""
        with self._lock:
            self.results[status] += 1
            if status in ("busy", "expired"):
                self.last_overload = time.monotonic()

    def failure(self, result: RequestResult, reason: str, status: str) -> RequestResult:
        """Count a request without an answer and complete its ``result`` with why."""
        self.count(status)
        self.error(reason)
        return result.fail(status, reason)

    def rejection(self, request_id: str, text: str, reason: str, status: str = "rejected") -> RequestResult:
        """Count a request refused without running the model, and the result that tells the planner why."""
        return self.failure(RequestResult(request_id, text), reason, status)

    def latency(self, total_ms: float, keep_ratio: float, queue_ms: float) -> None:
        with self._lock:
            self.last_latency_ms, self.last_keep_ratio = total_ms, keep_ratio
            self._latencies.append(total_ms)
            self._queue_waits.append(queue_ms)

    def p95_latency_ms(self) -> float | None:
        with self._lock:
            return float(np.percentile(self._latencies, 95)) if self._latencies else None

    def p95_queue_ms(self) -> float | None:
        with self._lock:
            return float(np.percentile(self._queue_waits, 95)) if self._queue_waits else None

    def refused(self) -> int:
        return sum(self.results[s] for s in REFUSED)

    def failed(self) -> int:
        return sum(self.results[s] for s in FAILED)


@dataclass
class Job:
    request: Request
    received: float  # time.monotonic() when the instruction arrived
    cancel: threading.Event | None = None  # the request's own (an action goal's): set, this request alone stops
    on_stage: OnStage | None = None  # told each stage as the request enters it: "convert", then the pipeline's
    on_frames: OnFrames | None = None  # told each camera's frame and token split once the split is known


OnFrames = Callable[[dict[str, CameraFrame]], None]  # each camera's frame and token split, by camera
Emit = Callable[[RequestResult], None]  # a request's one result
EmitSaliency = Callable[[np.ndarray, Any, str, bool], None]  # (BGR image, frame header, camera, of the default set)


class RequestWorker:
    """Bounded request queue + one inference thread over a ``Pipeline``."""

    def __init__(
        self,
        adapter,
        settings: Settings,
        *,
        queue_size: int,
        emit: Emit,
        emit_saliency: EmitSaliency,
        now_ns: Callable[[], int],
        counters: Counters,
        latency_model: LatencyModel | None = None,
        max_instruction_chars: int = 2000,
        encode_cache_frames: int = 0,
        encode_reuse_threshold: float = 0.0,
        cameras: Sequence[str] = (SINGLE_CAMERA,),
        default_cameras: Sequence[str] = (),
    ):
        self.adapter = adapter
        self.cameras = tuple(cameras)
        self.default_cameras = tuple(default_cameras) or self.cameras[:1]  # a request without cameras meets these
        self.settings = settings
        self.counters = counters
        self.latency_model = latency_model or LatencyModel()
        self.total_tokens: int | None = None  # visual tokens of the last image; the camera's size rarely changes
        self.view_tokens: dict[str, int] = {}  # visual tokens of each camera's last view
        self._emit, self._emit_saliency, self._now_ns = emit, emit_saliency, now_ns
        self._max_chars = max_instruction_chars
        self._encode_cache = {
            "encode_cache_frames": encode_cache_frames,
            "encode_reuse_threshold": encode_reuse_threshold,
        }
        self.encode_reuse = None  # the encode cache every pipeline of this worker shares (None: none)
        self._pipelines: dict[ConfiguredSelector, Pipeline] = {}  # the configured selector's and its fallback's
        self._queue_size = queue_size
        self._pending: deque[Job] = deque()  # waiting, oldest first; a withdrawn request leaves at once
        self._pending_cond = threading.Condition()  # guards _pending and the hand-over to _job
        self._frames = FrameStore(self.cameras, SYNC_HISTORY if len(self.cameras) > 1 else 1)
        self._accepting = False
        self._running_since: float | None = None  # time.monotonic() when the current request started
        self._job: Job | None = None  # the running one
        self._answered = False  # the running request's result is out; only its saliency image is left to draw
        self._saliency_ms = 0.0  # how long the last saliency image took to draw
        self._stop = threading.Event()
        self._cancel = threading.Event()
        self._cancel_reason = ""
        self._thread: threading.Thread | None = None

    # -- called from ROS callbacks: never blocks on the model ------------------------------------
    def put_frame(self, frame: Frame) -> None:
        """Keep ``frame`` as its camera's newest (``frame.camera``, one of ``cameras``)."""
        self.counters.frame_arrived(frame, dropped=self._frames.put(frame))

    def resolve_cameras(self, request: Request) -> Request:
        """``request`` with its cameras named: the default set when it names none; ``InvalidRequest`` naming the
        known cameras when it names another."""
        if not request.cameras:
            return dataclasses.replace(request, cameras=self.default_cameras)
        if unknown := [name for name in request.cameras if name not in self.cameras]:
            raise InvalidRequest(
                f"unknown camera(s) {', '.join(map(repr, unknown))}; this node's cameras: {', '.join(self.cameras)}"
            )
        return request

    def submit(
        self,
        request: Request,
        received: float,
        cancel: threading.Event | None = None,
        on_stage: OnStage | None = None,
        on_frames: OnFrames | None = None,
    ) -> bool:
        """Queue ``request`` (True); when the queue is full, the worker is stopped or the request could not
        start within its own latency budget, answer at once (False).  Setting ``cancel`` cancels this request
        alone: it is answered ``cancelled`` when its turn comes, or stops at its next stage or token.
        ``on_stage`` is called with "convert" when the request leaves the queue to run (taking and decoding the
        frame), then with each of the pipeline's stages (``Pipeline.answer``); never for a request that does not
        run.  ``on_frames`` is called once with each camera's frame and token split as soon as the split is known."""
        if not self._accepting:
            self._emit(self.counters.rejection(request.id, request.text, "not serving: the node is not active"))
            return False
        try:
            request = self.resolve_cameras(request)
        except InvalidRequest as exc:
            self._emit(self.counters.rejection(request.id, request.text, f"invalid instruction: {loggable(str(exc))}"))
            return False
        if (overload := self._overloaded(request)) is not None:
            self._emit(self.counters.rejection(request.id, request.text, overload, status="busy"))
            return False
        with self._pending_cond:
            full = len(self._pending) >= self._queue_size
            if not full:
                self._pending.append(Job(request, received, cancel, on_stage, on_frames))
                self._pending_cond.notify()
        if full:
            reason = f"busy: {self._queue_size} request(s) already waiting"
            self._emit(self.counters.rejection(request.id, request.text, reason, status="busy"))
            return False
        return True

    def withdraw(self, cancel: threading.Event, reason: str = CANCELLED_BY_CLIENT) -> bool:
        """Answer the waiting request whose own cancel event is ``cancel`` with ``cancelled`` now and free its
        place in the queue (True); False when it is not waiting (running already, or answered)."""
        with self._pending_cond:
            job = next((j for j in self._pending if j.cancel is cancel), None)
            if job is not None:
                self._pending.remove(job)
        if job is None:
            return False
        reason = f"cancelled: {reason} before it ran"
        self._emit(self.counters.rejection(job.request.id, job.request.text, reason, status="cancelled"))
        return True

    def _overloaded(self, request: Request) -> str | None:
        """Why ``request`` cannot start before its budget expires, even if every request ahead of it ran at
        the minimum keep ratio; None when it may.  Only requests with a latency budget have a deadline."""
        budget_ms = self._deadline_ms(request, self.settings)
        running, answered, queued = self._running_since, self._answered, self.queue_depth
        ahead = queued + int(running is not None)
        if budget_ms is None or ahead == 0 or not self.latency_model.ready or self.total_tokens is None:
            return None
        s = self.settings
        floor = ratio_tokens(self.total_tokens, s.keep_ratio_min)
        expected = self.latency_model.expected_new_tokens(s.max_new_tokens)
        per_request = self.latency_model.predict_total(floor, self.total_tokens, expected)
        if running is None:
            running_left = 0.0
        elif answered:  # only the saliency image is left: charge what the last one took, not a request
            running_left = self._saliency_ms if s.publish_saliency else 0.0
        else:
            running_left = max(0.0, per_request - (time.monotonic() - running) * 1e3)
        wait_ms = running_left + per_request * queued
        if wait_ms < budget_ms:
            return None
        return (
            f"busy: overloaded, {ahead} request(s) ahead would take at least {wait_ms:.0f} ms, "
            f"past this request's {budget_ms:.0f} ms latency budget"
        )

    @staticmethod
    def _deadline_ms(request: Request, settings: Settings) -> float | None:
        """The request's latency budget when it has one to meet (budget mode, or its own budget)."""
        if request.latency_budget_ms is not None:
            return request.latency_budget_ms
        if settings.mode == "budget" and request.keep_ratio is None:
            return settings.latency_budget_ms
        return None

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def busy(self) -> bool:
        return self._running_since is not None

    def health(self, stuck_after_s: float) -> str | None:
        """What is wrong with the inference thread (dead, or one request running too long); None if fine."""
        if self._accepting and (self._thread is None or not self._thread.is_alive()):
            return "the inference thread is not running"
        started = self._running_since
        if started is not None and (running := time.monotonic() - started) > stuck_after_s:
            return f"one request has been running for {running:.0f} s (watchdog_timeout_s {stuck_after_s:.0f})"
        return None

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._cancel.clear()
        self._accepting = True
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="ptp-inference", daemon=True)
            self._thread.start()

    def stop(self, reason: str = "the node stopped serving before the request ran") -> None:
        """Stop taking requests, cancel the running one (it stops after its current token and gets a
        ``cancelled`` result), and answer the queued ones with ``reason``."""
        self._accepting = False
        self._cancel_reason = reason
        self._cancel.set()
        if (job := self._job) is not None and job.cancel is not None:
            job.cancel.set()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(STOP_JOIN_S)
            if not self._thread.is_alive():  # else it ends its request (cancelled) and then its loop
                self._thread = None
        with self._pending_cond:
            waiting, self._pending = list(self._pending), deque()
        for job in waiting:
            self._emit(self.counters.rejection(job.request.id, job.request.text, reason, status="cancelled"))
        self._frames.clear()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._pending_cond:  # taken and marked running at once: withdraw sees it in one place or the other
                if not self._pending_cond.wait_for(lambda: self._pending, timeout=0.1):
                    continue
                job = self._pending.popleft()
                self._job, self._running_since, self._answered = job, time.monotonic(), False
            try:
                self._serve(job)
            except Exception as exc:  # noqa: BLE001 - no request may end the thread; it gets an error result
                self.counters.add(internal_errors=1)
                self._fail(
                    RequestResult(job.request.id, job.request.text),
                    f"internal error: {type(exc).__name__}: {exc}",
                    status="error",
                )
            finally:
                self._job = self._running_since = None

    # -- one request ------------------------------------------------------------------------------
    def pipeline(self, selector: ConfiguredSelector, prune_stage: str | None = None) -> Pipeline:
        """The pipeline of ``selector`` (``prune_stage`` None or the stage it prunes at), or with ``PRE_LLM`` the budget
        controller's fallback: ``selector`` before the LLM with the candidate probe."""
        if selector not in self._pipelines:  # the configured selector changed: the old pipelines go
            config = PipelineConfig(selector=selector, max_instruction_chars=self._max_chars, **self._encode_cache)
            self._pipelines = {selector: Pipeline(self.adapter, config, reuse=self.encode_reuse)}
            self.encode_reuse = self._pipelines[selector].reuse
        configured = self._pipelines[selector]
        if prune_stage is None or prune_stage == prune_stage_of(configured):
            return configured
        if prune_stage != PRE_LLM:
            raise ValueError(f"no fallback pipeline prunes at {prune_stage!r}")
        fallback = dataclasses.replace(selector, prune_in_llm=False, probe_candidates=FALLBACK_PROBE_CANDIDATES)
        if fallback not in self._pipelines:
            config = dataclasses.replace(configured.config, selector=fallback)
            self._pipelines[fallback] = Pipeline(self.adapter, config, reuse=self.encode_reuse)
        return self._pipelines[fallback]

    def _serve(self, job: Job) -> None:
        started = time.monotonic()
        settings, request = self.settings, job.request
        result = RequestResult(request.id, request.text)
        cancel = job.cancel or self._cancel
        budget_ms = request.latency_budget_ms or settings.latency_budget_ms
        deadline_ms = self._deadline_ms(request, settings)
        waited_ms = (started - job.received) * 1e3
        if deadline_ms is not None and waited_ms >= deadline_ms:
            return self._fail(
                result,
                f"expired: waited {waited_ms:.0f} ms in the queue, past its {deadline_ms:.0f} ms latency budget",
                status="expired",
            )
        if job.cancel is not None and (job.cancel.is_set() or self._cancel.is_set()):
            return self._fail(result, f"cancelled: {self._cancelled_why()} before it ran", status="cancelled")
        if job.on_stage is not None:
            job.on_stage("convert")
        pick = self._frames.take(request.cameras, settings.sync_tolerance_ms)
        result, images, failure = self._frames_of(result, request.cameras, pick, started, settings)
        if failure is not None:
            return self._fail(result, *failure)
        converted = time.monotonic()

        max_new_tokens = request.max_new_tokens or settings.max_new_tokens
        encode_fraction = self.pipeline(settings.selector).expected_encode_fraction(images)
        mode, budget, choice = self._choose(
            request, settings, budget_ms, max_new_tokens, (converted - job.received) * 1e3, encode_fraction
        )
        result.mode, result.latency_budget_ms, result.max_new_tokens = mode, budget_ms, max_new_tokens
        prune_stage = choice.prune_stage if choice is not None else None
        if choice is not None:
            result.predicted_ms, result.budget_feasible = round(choice.predicted_ms, 3), choice.feasible
            result.prune_stage, result.prune_stage_reason = prune_stage, choice.reason
        on_views = None if job.on_frames is None else lambda views: job.on_frames(with_tokens(result.frames, views))
        try:
            answer = self.pipeline(settings.selector, prune_stage).answer(
                images,  # camera → frame, in the request's order: one prompt, one budget
                request.text,
                **budget,
                max_new_tokens=max_new_tokens,
                cancel=cancel,
                on_stage=job.on_stage,
                on_views=on_views,
            )
        except Cancelled as exc:
            return self._fail(result, f"cancelled: {self._cancelled_why()} ({exc})", status="cancelled")
        except InvalidRequest as exc:
            return self._fail(result, f"invalid request: {exc}", status="rejected")
        except Exception as exc:  # noqa: BLE001 - a model failure must not take the node down
            return self._fail(result, f"inference failed: {type(exc).__name__}: {exc}", status="error")
        done = time.monotonic()
        self.learn(answer, prune_stage)
        self._answered = True  # set before the result goes out: a planner's next request may come at once
        result.frames = with_tokens(result.frames, answer.views)
        self.view_tokens.update({view.name: view.total for view in answer.views})
        self._succeed(result, answer, job, started, converted, done, budget_ms)
        if settings.publish_saliency:
            drawing = time.monotonic()
            default = request.cameras == self.default_cameras
            for camera, overlay in saliency_images(images, answer, settings.saliency_max_side).items():
                self._emit_saliency(answer_caption(overlay, answer.text), pick.frames[camera].header, camera, default)
            self._saliency_ms = (time.monotonic() - drawing) * 1e3

    def _frames_of(
        self, result: RequestResult, cameras: tuple[str, ...], pick: Pick, started: float, settings: Settings
    ) -> tuple[RequestResult, dict[str, np.ndarray], tuple[str, str] | None]:
        """(``result`` with the frames ``pick`` found, their decoded images by camera, None) or (``result``, {},
        (why, status)) when a camera has no usable frame: none yet, stale, out of sync with the others, invalid.
        The result's ``stamp``, ``frame_id`` and ages are the first camera's, as on a one-camera node."""
        named = len(self.cameras) > 1  # a one-camera node's messages stay as they were
        if pick.missing:
            where = f" from camera(s) {', '.join(pick.missing)}" if named else ""
            return result, {}, (f"no image received yet{where}", "error")
        if pick.spread_ms is not None:
            why = (
                f"out of sync: the newest frames of cameras {', '.join(cameras)} lie {pick.spread_ms:.0f} ms apart "
                f"(sync_tolerance_ms {settings.sync_tolerance_ms:.0f}) and no older ones kept are closer"
            )
            return result, {}, (why, "out_of_sync")
        frames = {camera: CameraFrame(f.stamp, f.frame_id) for camera, f in pick.frames.items()}
        first = pick.frames[cameras[0]]
        fields, _, _ = frame_freshness(first, self._now_ns(), started, settings.max_frame_age_ms)
        result = dataclasses.replace(result, stamp=first.stamp, frame_id=first.frame_id, frames=frames, **fields)
        images = {}
        for camera, frame in pick.frames.items():
            _, warning, stale = frame_freshness(frame, self._now_ns(), started, settings.max_frame_age_ms)
            prefix = f"camera {camera}: " if named else ""
            if warning:
                self.counters.add(frames_bad_stamp=1)
            if stale:
                return result, {}, (prefix + stale, "stale")
            if frame.error is not None:
                return result, {}, (f"{prefix}invalid image: {frame.error}", "error")
            try:
                images[camera] = validate_image(frame.decode())  # decodes; too small for any model is invalid too
            except Exception as exc:  # noqa: BLE001 - decoders raise their own types (cv2.error, PIL errors)
                self.counters.add(frames_invalid=1)
                frame.error = str(exc)  # counted once: the next request meeting this frame is told without a decode
                return result, {}, (f"{prefix}invalid image: {exc}", "error")
        return result, images, None

    def _cancelled_why(self) -> str:
        return self._cancel_reason if self._cancel.is_set() else CANCELLED_BY_CLIENT

    def _choose(
        self,
        request: Request,
        settings: Settings,
        budget_ms: float,
        max_new_tokens: int,
        spent_ms: float,
        encode_fraction: float = 1.0,
    ) -> tuple[str, dict, BudgetChoice | None]:
        """(mode used, the budget as ``Pipeline.answer``'s keep_ratio= or tokens=, the budget choice when the
        latency budget decided; ``encode_fraction`` of the frames' tiles are expected to need the encoder).  A
        request's own keep_ratio wins; a request's own latency budget asks for budget mode even when the node runs
        fixed.  Budget mode passes the token count it chose, so nothing is
        rounded twice; below the floor of the configured in-LLM pruning it prunes before the LLM instead."""
        if request.keep_ratio is not None:
            return "request", {"keep_ratio": request.keep_ratio}, None
        budget_mode = settings.mode == "budget" or request.latency_budget_ms is not None
        configured = prune_stage_of(self.pipeline(settings.selector))
        if not budget_mode or not self.latency_model.ready_for(configured) or self.total_tokens is None:
            return "fixed", {"keep_ratio": settings.keep_ratio}, None
        choice = choose_keep_ratio(
            self.latency_model,
            budget_ms - spent_ms,
            sum(self.view_tokens.get(camera, self.total_tokens) for camera in request.cameras),
            self.latency_model.expected_new_tokens(max_new_tokens),
            settings.keep_ratio_min,
            settings.keep_ratio_max,
            [configured, PRE_LLM] if configured == IN_LLM else [configured],
            views=len(request.cameras),
            encode_fraction=encode_fraction,
        )
        return "budget", {"tokens": choice.tokens}, choice

    def learn(self, answer: Answer, prune_stage: str | None = None, track_error: bool = True) -> None:
        """Fit ``answer``'s stage times into the latency model, under the prune stage that ran it (default: the
        configured one); with ``track_error`` the model's prediction for it counts in its reported error."""
        if len(answer.view_names) == 1:  # the one-view size; several views' are summed per request (_choose)
            self.total_tokens = answer.selection.total
        self.latency_model.observe(
            answer.selection.num_kept,
            answer.selection.total,
            answer.timings_ms,
            answer.new_tokens,
            prune_stage or prune_stage_of(self.pipeline(self.settings.selector)),
            track_error,
            views=len(answer.view_names),
            encode_fraction=1.0 - answer.encode_reused,
        )

    def _succeed(
        self,
        result: RequestResult,
        answer: Answer,
        job: Job,
        started: float,
        converted: float,
        done: float,
        budget_ms: float,
    ) -> None:
        total_ms = (done - job.received) * 1e3
        queue_ms = (started - job.received) * 1e3
        result.answer = answer.result()
        stages = {k: v for k, v in result.answer.latency_ms.items() if k != "total"}
        result.latency_ms = {
            "queue": round(queue_ms, 3),
            "convert": round((converted - started) * 1e3, 3),
            **stages,
            "pipeline": round(answer.timings_ms["total"], 3),
            "total": round(total_ms, 3),
        }
        result.status, result.budget_met = "ok", total_ms <= budget_ms
        self.counters.count("ok")
        self.counters.latency(total_ms, answer.selection.keep_ratio, queue_ms)
        self._emit(result)

    def _fail(self, result: RequestResult, reason: str, status: str) -> None:
        self._emit(self.counters.failure(result, reason, status))


def with_tokens(frames: dict[str, CameraFrame], views: tuple[ViewTokens, ...]) -> dict[str, CameraFrame]:
    """``frames`` (by camera) with each camera's view's kept and total visual tokens."""
    tokens = {view.name: (view.kept, view.total) for view in views}
    return {
        camera: dataclasses.replace(frame, visual_tokens_kept=tokens[camera][0], visual_tokens_total=tokens[camera][1])
        for camera, frame in frames.items()
    }


def prune_stage_of(pipeline: Pipeline) -> str:
    """Where ``pipeline`` prunes: ``IN_LLM`` at a layer inside the LLM, or ``PRE_LLM`` before it."""
    return IN_LLM if pipeline.in_llm_plan() is not None else PRE_LLM


def other_frame_size(image: np.ndarray) -> np.ndarray:
    """A centre crop of ``image`` with another aspect ratio (square, or half height when square): another tile
    layout or pixel count, so another visual token count for every model family."""
    h, w = image.shape[:2]
    if h == w:
        return image[: h // 2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return image[top : top + side, left : left + side]


def calibrate(
    worker: RequestWorker,
    image: np.ndarray,
    keep_ratios: list[float],
    max_new_tokens: int,
    instruction: str = "Describe the scene.",
    cancel: threading.Event | None = None,
    repeats: int = 2,
) -> list[dict]:
    """Fit the worker's latency model.  After one warm-up run (one-off costs such as allocator growth, not
    recorded): every keep ratio ``repeats`` times, interleaved, so that a busy spell hits different ratios and the
    robust fit sets it aside; the smallest and largest pruned ratio on a crop of another size, so that the model
    tells per-frame-token cost from fixed cost; and when the configured pipeline prunes inside the LLM, the
    pruned ratios before the LLM, the controller's fallback below the in-LLM floor.  ``cancel`` ends it early
    (``Cancelled``), so that a shutdown during configure does not wait for the model."""
    selector = worker.settings.selector
    configured = worker.pipeline(selector)
    ratios = sorted(set(keep_ratios))
    pruned = [r for r in ratios if r < 1.0]

    def run(pipeline: Pipeline, frame: np.ndarray, ratio: float) -> dict:
        if pipeline.reuse is not None:  # every calibration run measures a whole encode
            pipeline.reuse.clear()
        answer = pipeline.answer(frame, instruction, keep_ratio=ratio, max_new_tokens=max_new_tokens, cancel=cancel)
        stage = prune_stage_of(pipeline)
        worker.learn(answer, stage, track_error=False)
        return {
            "prune_stage": stage,
            "keep_ratio": ratio,
            "visual_tokens": answer.selection.total,
            "kept": answer.selection.num_kept,
            "total_ms": round(answer.timings_ms["total"], 1),
        }

    configured.answer(image, instruction, keep_ratio=ratios[0], max_new_tokens=max_new_tokens, cancel=cancel)
    runs = [run(configured, image, ratio) for _ in range(repeats) for ratio in ratios]
    other = other_frame_size(image)
    runs += [run(configured, other, ratio) for ratio in sorted({(pruned or ratios)[0], (pruned or ratios)[-1]})]
    if prune_stage_of(configured) == IN_LLM:
        runs += [run(worker.pipeline(selector, PRE_LLM), image, ratio) for ratio in pruned]
    worker.total_tokens = runs[0]["visual_tokens"]  # the calibration image's, not the crop's
    return runs
