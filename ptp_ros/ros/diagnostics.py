"""The ``/diagnostics`` status an operator reads: is the model up, is the worker alive, is the camera
publishing, is the budget met, what went wrong."""

from __future__ import annotations

from dataclasses import dataclass

from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

from ..latency_budget import PredictionError
from ..vlm.encode_cache import ReuseStats
from .worker import Counters, Settings

COUNTED_STATUSES = ("busy", "expired", "stale", "out_of_sync", "cancelled")  # each has a requests_<status> count
OVERLOAD_WARN_S = 10.0  # a busy or expired result this recently keeps the status at WARN


def _fmt(value) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Health:
    """What the node observed about itself at the moment of the report."""

    model_state: str
    configure_error: str
    device: str
    queue_depth: int
    busy: bool
    worker_problem: str | None  # the watchdog's finding: a dead or stuck inference thread
    frame_silence_s: float | None  # seconds since the last camera frame (None: never one)
    overload_age_s: float | None  # seconds since the last busy/expired result (None: never)
    prediction: PredictionError | None = None  # the latency model's recent predictions against what they measured
    encode_reuse: ReuseStats | None = None  # the encode cache's counts (None: no cache)


def camera_timeout_s(settings: Settings) -> float:
    """Silence longer than this makes a camera's status WARN."""
    return max(settings.max_frame_age_ms, 1000.0) / 1e3


def camera_status(
    name: str, camera: str, topic: str, serving: bool, settings: Settings, counters: Counters, now: float
) -> DiagnosticStatus:
    """One camera's status: WARN when the node serves and this camera sent no frame for ``camera_timeout_s``
    (its requests then get ``stale``); the other cameras' statuses stay OK."""
    arrived = counters.camera_arrival.get(camera)
    silence = None if arrived is None else now - arrived
    if not serving:
        level, message = DiagnosticStatus.OK, "not subscribed: the node is not serving"
    elif silence is None:
        level, message = DiagnosticStatus.WARN, f"camera {camera} silent: no frame received yet on {topic}"
    elif silence > camera_timeout_s(settings):
        level, message = DiagnosticStatus.WARN, f"camera {camera} silent: no frame for {silence:.1f} s on {topic}"
    else:
        level, message = DiagnosticStatus.OK, "receiving"
    values = {
        "camera": camera,
        "topic": topic,
        "frames_received": counters.camera_frames[camera],
        "frames_dropped": counters.camera_dropped[camera],
        "last_frame_age_s": silence,
    }
    return DiagnosticStatus(
        level=level, name=name, message=message, values=[KeyValue(key=k, value=_fmt(v)) for k, v in values.items()]
    )


def agent_status(name: str, health: Health, settings: Settings, counters: Counters) -> DiagnosticStatus:
    """ERROR when the model failed to load or the worker is dead or stuck; WARN when not serving, every
    camera went silent (one silent camera of several: its own status, ``camera_status``), requests are refused
    for overload, or the p95 latency overruns the budget."""
    p95 = counters.p95_latency_ms()
    prediction = health.prediction
    budget = settings.latency_budget_ms
    silence = health.frame_silence_s
    if health.model_state == "error":
        level, message = DiagnosticStatus.ERROR, f"model not loaded: {health.configure_error}"
    elif health.worker_problem:
        level, message = DiagnosticStatus.ERROR, f"watchdog: {health.worker_problem}"
    elif health.model_state != "serving":
        level, message = DiagnosticStatus.WARN, f"not serving: model {health.model_state}"
    elif silence is None or silence > camera_timeout_s(settings):
        level, message = (
            DiagnosticStatus.WARN,
            ("no camera frame received yet" if silence is None else f"no camera frame for {silence:.1f} s"),
        )
    elif health.overload_age_s is not None and health.overload_age_s < OVERLOAD_WARN_S:
        level, message = DiagnosticStatus.WARN, "overloaded: requests refused (busy) or expired in the queue"
    elif p95 is not None and p95 > budget:
        level, message = DiagnosticStatus.WARN, f"p95 latency {p95:.0f} ms over the {budget:.0f} ms budget"
    else:
        level, message = DiagnosticStatus.OK, "serving"
    results = counters.results
    values = {
        "model_state": health.model_state,
        "device": health.device,
        "mode": settings.mode,
        "busy": health.busy,
        "latency_budget_ms": budget,
        "last_latency_ms": counters.last_latency_ms,
        "p95_latency_ms": p95,
        "p95_queue_ms": counters.p95_queue_ms(),
        "keep_ratio": counters.last_keep_ratio,
        "frames_received": counters.frames_received,
        "frames_dropped": counters.frames_dropped,
        "frames_invalid": counters.frames_invalid,
        "frames_bad_stamp": counters.frames_bad_stamp,
        "last_frame_age_s": silence,
        "requests_received": counters.received,
        "requests_served": results["ok"],
        "requests_rejected": counters.refused(),
        "requests_failed": counters.failed(),
        **{f"requests_{status}": results[status] for status in COUNTED_STATUSES},
        "internal_errors": counters.internal_errors,
        "queue_depth": health.queue_depth,
        "latency_model_error_pct": prediction.median_abs_pct if prediction else None,
        "latency_model_requests": prediction.requests if prediction else None,
        "latency_model_last_predicted_ms": prediction.last_predicted_ms if prediction else None,
        "latency_model_last_measured_ms": prediction.last_measured_ms if prediction else None,
        "encode_reuse_rate": health.encode_reuse.reuse_rate if health.encode_reuse else None,
        "encode_frame_hits": health.encode_reuse.frame_hits if health.encode_reuse else None,
        "last_error": counters.last_error,
    }
    return DiagnosticStatus(
        level=level,
        name=name,
        message=message,
        hardware_id=health.device,
        values=[KeyValue(key=k, value=_fmt(v)) for k, v in values.items()],
    )
