"""The serving loop behind the node, free of rclpy so it can be tested and timed without DDS.

Callbacks only store the newest frame and enqueue requests; one worker thread takes requests in
order, picks the frame that is newest *when the request starts*, chooses the keep ratio (fixed, or
from the latency budget) and runs the pipeline.  Every request that reaches ``submit`` gets exactly
one result through ``emit``: an answer, ``busy`` when the queue is full, or an error saying why.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..budget import BudgetChoice, LatencyModel, choose_keep_ratio
from ..overlay import saliency_image
from ..pipeline import Answer, InvalidRequest, Pipeline, PipelineConfig
from ..pruning import PTPConfig
from .requests import Request

MODES = ("budget", "fixed")


@dataclass(frozen=True)
class Settings:
    """The runtime-settable knobs; replaced as a whole when a parameter changes."""

    mode: str = "budget"
    latency_budget_ms: float = 2000.0
    keep_ratio: float = 0.25
    keep_ratio_min: float = 0.05
    keep_ratio_max: float = 1.0
    alpha: float = 0.5
    max_new_tokens: int = 32
    publish_saliency: bool = True

    def problems(self) -> list[str]:
        """Why these settings are unusable (empty when fine); ranges of single values are the descriptors' job."""
        out = []
        if self.mode not in MODES:
            out.append(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.keep_ratio_min > self.keep_ratio_max:
            out.append(f"keep_ratio_min {self.keep_ratio_min} exceeds keep_ratio_max {self.keep_ratio_max}")
        return out


@dataclass
class Frame:
    """The newest camera frame, kept undecoded until a request needs it."""

    stamp_ns: int
    stamp: dict  # {"sec", "nanosec"}
    frame_id: str
    header: Any  # the message header, copied onto the saliency image
    decode: Callable[[], np.ndarray]  # → RGB uint8; raises ValueError for a malformed frame
    error: str | None = None  # set when the metadata check already failed on arrival
    used: bool = False


class Counters:
    """What ``/diagnostics`` reports; shared between callbacks, the worker and the timer."""

    def __init__(self, window: int = 100):
        self._lock = threading.Lock()
        self.frames_received = self.frames_dropped = self.frames_invalid = 0
        self.served = self.rejected = self.failed = 0
        self.last_error = ""
        self.last_latency_ms: float | None = None
        self.last_keep_ratio: float | None = None
        self._latencies: deque[float] = deque(maxlen=window)

    def add(self, **increments: int) -> None:
        with self._lock:
            for name, value in increments.items():
                setattr(self, name, getattr(self, name) + value)

    def error(self, text: str) -> None:
        with self._lock:
            self.last_error = text

    def rejection(self, request_id: str, text: str, reason: str, status: str = "rejected") -> dict:
        """Count a request refused without running the model, and the result that tells the planner why."""
        self.add(rejected=1)
        self.error(reason)
        return {"id": request_id, "instruction": text, "status": status, "error": reason}

    def latency(self, total_ms: float, keep_ratio: float) -> None:
        with self._lock:
            self.last_latency_ms, self.last_keep_ratio = total_ms, keep_ratio
            self._latencies.append(total_ms)

    def p95_latency_ms(self) -> float | None:
        with self._lock:
            return float(np.percentile(self._latencies, 95)) if self._latencies else None


@dataclass
class Job:
    request: Request
    received: float  # time.monotonic() when the instruction arrived


Emit = Callable[[dict, str | None], None]  # (result, answer text or None)
EmitSaliency = Callable[[np.ndarray, Any], None]  # (BGR image, frame header)


class RequestWorker:
    """Bounded request queue + one inference thread over a ``Pipeline``."""

    def __init__(self, adapter, settings: Settings, *, queue_size: int, emit: Emit,
                 emit_saliency: EmitSaliency, now_ns: Callable[[], int], counters: Counters,
                 latency_model: LatencyModel | None = None, max_instruction_chars: int = 2000):
        self.adapter = adapter
        self.settings = settings
        self.counters = counters
        self.latency_model = latency_model or LatencyModel()
        self.total_tokens: int | None = None  # visual tokens of the last image; the camera's size rarely changes
        self._emit, self._emit_saliency, self._now_ns = emit, emit_saliency, now_ns
        self._max_chars = max_instruction_chars
        self._pipelines: dict[float, Pipeline] = {}
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self._frame: Frame | None = None
        self._frame_lock = threading.Lock()
        self._accepting = False
        self._busy = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- called from ROS callbacks: never blocks on the model ------------------------------------
    def put_frame(self, frame: Frame) -> None:
        with self._frame_lock:
            if self._frame is not None and not self._frame.used:
                self.counters.add(frames_dropped=1)
            self._frame = frame
        self.counters.add(frames_received=1, frames_invalid=int(frame.error is not None))

    def submit(self, request: Request, received: float) -> None:
        """Queue ``request``; when the queue is full or the worker is stopped, answer at once."""
        if not self._accepting:
            self._emit(self.counters.rejection(request.id, request.text, "not serving: the node is not active"), None)
            return
        try:
            self._queue.put_nowait(Job(request, received))
        except queue.Full:
            reason = f"busy: {self._queue.maxsize} request(s) already waiting"
            self._emit(self.counters.rejection(request.id, request.text, reason, status="busy"), None)

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def busy(self) -> bool:
        return self._busy

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._accepting = True
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="ptp-inference", daemon=True)
            self._thread.start()

    def stop(self, reason: str = "the node stopped serving before the request ran") -> None:
        """Stop taking requests, let the running one finish, answer the queued ones with an error."""
        self._accepting = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            self._emit(self.counters.rejection(job.request.id, job.request.text, reason), None)
        with self._frame_lock:
            self._frame = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            self._busy = True
            try:
                self._serve(job)
            finally:
                self._busy = False

    # -- one request ------------------------------------------------------------------------------
    def pipeline(self, alpha: float) -> Pipeline:
        if alpha not in self._pipelines:
            self._pipelines = {alpha: Pipeline(self.adapter, PipelineConfig(
                selector="ptp", ptp=PTPConfig(alpha=alpha), max_instruction_chars=self._max_chars))}
        return self._pipelines[alpha]

    def _take_frame(self) -> Frame | None:
        with self._frame_lock:
            frame = self._frame
            if frame is not None:
                frame.used = True
            return frame

    def _serve(self, job: Job) -> None:
        started = time.monotonic()
        settings, request = self.settings, job.request
        frame = self._take_frame()
        result: dict = {"id": request.id, "instruction": request.text}
        if frame is None:
            return self._fail(result, "no image received yet", status="error")
        result.update(stamp=frame.stamp, frame_id=frame.frame_id,
                      frame_age_ms=round((self._now_ns() - frame.stamp_ns) / 1e6, 3) if frame.stamp_ns else None)
        if frame.error is not None:
            return self._fail(result, f"invalid image: {frame.error}", status="error")
        try:
            image = frame.decode()
        except ValueError as exc:
            self.counters.add(frames_invalid=1)
            return self._fail(result, f"invalid image: {exc}", status="error")
        converted = time.monotonic()

        max_new_tokens = request.max_new_tokens or settings.max_new_tokens
        budget_ms = request.latency_budget_ms or settings.latency_budget_ms
        mode, keep_ratio, choice = self._choose(request, settings, budget_ms, max_new_tokens,
                                                spent_ms=(converted - job.received) * 1e3)
        result.update(mode=mode, latency_budget_ms=budget_ms, max_new_tokens=max_new_tokens)
        if choice is not None:
            result.update(predicted_ms=round(choice.predicted_ms, 3), budget_feasible=choice.feasible)
        try:
            answer = self.pipeline(settings.alpha).answer(image, request.text, keep_ratio=keep_ratio,
                                                          max_new_tokens=max_new_tokens)
        except InvalidRequest as exc:
            return self._fail(result, f"invalid request: {exc}", status="rejected")
        except Exception as exc:  # noqa: BLE001 - a model failure must not take the node down
            return self._fail(result, f"inference failed: {type(exc).__name__}: {exc}", status="error")
        done = time.monotonic()
        self.learn(answer)
        self._succeed(result, answer, job, started, converted, done, budget_ms)
        if settings.publish_saliency:
            self._emit_saliency(saliency_image(image, answer.visual, answer.selection), frame.header)

    def _choose(self, request: Request, settings: Settings, budget_ms: float, max_new_tokens: int,
                spent_ms: float) -> tuple[str, float, BudgetChoice | None]:
        """(mode used, keep ratio, the budget choice when the budget decided).  A request's own keep_ratio wins; a
        request's own latency budget asks for budget mode even when the node runs fixed."""
        if request.keep_ratio is not None:
            return "request", request.keep_ratio, None
        budget_mode = settings.mode == "budget" or request.latency_budget_ms is not None
        if not budget_mode or not self.latency_model.ready or self.total_tokens is None:
            return "fixed", settings.keep_ratio, None
        choice = choose_keep_ratio(self.latency_model, budget_ms - spent_ms, self.total_tokens, max_new_tokens,
                                   settings.keep_ratio_min, settings.keep_ratio_max)
        return "budget", choice.keep_ratio, choice

    def learn(self, answer: Answer) -> None:
        self.total_tokens = answer.selection.total
        self.latency_model.observe(answer.selection.num_kept, answer.selection.total, answer.timings_ms,
                                   answer.new_tokens)

    def _succeed(self, result: dict, answer: Answer, job: Job, started: float, converted: float, done: float,
                 budget_ms: float) -> None:
        total_ms = (done - job.received) * 1e3
        stages = {k: round(v, 3) for k, v in answer.timings_ms.items() if k != "total"}
        latency = {"queue": round((started - job.received) * 1e3, 3), "convert": round((converted - started) * 1e3, 3),
                   **stages, "pipeline": round(answer.timings_ms["total"], 3), "total": round(total_ms, 3)}
        result.update(status="ok", answer=answer.text, keep_ratio=round(answer.selection.keep_ratio, 6),
                      visual_tokens_kept=answer.selection.num_kept, visual_tokens_total=answer.selection.total,
                      new_tokens=answer.new_tokens, latency_ms=latency, budget_met=total_ms <= budget_ms)
        self.counters.add(served=1)
        self.counters.latency(total_ms, answer.selection.keep_ratio)
        self._emit(result, answer.text)

    def _fail(self, result: dict, reason: str, status: str) -> None:
        self.counters.add(**{"rejected" if status == "rejected" else "failed": 1})
        self.counters.error(reason)
        result.update(status=status, error=reason)
        self._emit(result, None)


def calibrate(worker: RequestWorker, image: np.ndarray, keep_ratios: list[float], max_new_tokens: int,
              instruction: str = "Describe the scene.") -> list[dict]:
    """Fit the worker's latency model from a few runs at different keep ratios (after one warm-up run,
    which pays one-off costs such as allocator growth and is not recorded)."""
    pipeline = worker.pipeline(worker.settings.alpha)
    pipeline.answer(image, instruction, keep_ratio=min(keep_ratios), max_new_tokens=max_new_tokens)
    runs = []
    for ratio in sorted(keep_ratios):
        answer = pipeline.answer(image, instruction, keep_ratio=ratio, max_new_tokens=max_new_tokens)
        worker.learn(answer)
        runs.append({"keep_ratio": ratio, "kept": answer.selection.num_kept,
                     "total_ms": round(answer.timings_ms["total"], 1)})
    return runs

