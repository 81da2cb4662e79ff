"""The ``/diagnostics`` status an operator reads: is the model up, is the budget met, what went wrong."""
from __future__ import annotations

from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

from .worker import Counters, Settings


def _fmt(value) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def agent_status(name: str, model_state: str, configure_error: str, device: str, settings: Settings,
                 counters: Counters, queue_depth: int, busy: bool) -> DiagnosticStatus:
    """ERROR when the model failed to load, WARN when not serving or the p95 latency overruns the budget."""
    p95 = counters.p95_latency_ms()
    budget = settings.latency_budget_ms
    if model_state == "error":
        level, message = DiagnosticStatus.ERROR, f"model not loaded: {configure_error}"
    elif model_state != "serving":
        level, message = DiagnosticStatus.WARN, f"not serving: model {model_state}"
    elif p95 is not None and p95 > budget:
        level, message = DiagnosticStatus.WARN, f"p95 latency {p95:.0f} ms over the {budget:.0f} ms budget"
    else:
        level, message = DiagnosticStatus.OK, "serving"
    values = {
        "model_state": model_state, "device": device, "mode": settings.mode, "busy": busy,
        "latency_budget_ms": budget, "last_latency_ms": counters.last_latency_ms, "p95_latency_ms": p95,
        "keep_ratio": counters.last_keep_ratio, "frames_received": counters.frames_received,
        "frames_dropped": counters.frames_dropped, "frames_invalid": counters.frames_invalid,
        "requests_served": counters.served, "requests_rejected": counters.rejected,
        "requests_failed": counters.failed, "queue_depth": queue_depth, "last_error": counters.last_error,
    }
    return DiagnosticStatus(level=level, name=name, message=message, hardware_id=device,
                            values=[KeyValue(key=k, value=_fmt(v)) for k, v in values.items()])
