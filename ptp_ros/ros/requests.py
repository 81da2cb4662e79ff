"""What a planner sends on ``instruction``: plain text, or a JSON object with per-request overrides."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

FIELDS = ("id", "text", "max_new_tokens", "latency_budget_ms", "keep_ratio")
MAX_NEW_TOKENS_LIMIT = 1024


class RequestError(ValueError):
    """An instruction message the node refuses; the text says why and goes into the error result,
    under the message's own ``id`` when it had a usable one."""

    def __init__(self, message: str, request_id: str | None = None):
        super().__init__(message)
        self.request_id = request_id


@dataclass(frozen=True)
class Request:
    id: str
    text: str
    max_new_tokens: int | None = None
    latency_budget_ms: float | None = None
    keep_ratio: float | None = None


def _number(obj: dict, key: str, kind: type, lo: float, hi: float, lo_open: bool = False):
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise RequestError(f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if not math.isfinite(value) or value > hi or value < lo or (lo_open and value == lo):
        bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise RequestError(f"{key} must be in {bound}, got {value!r}")
    return kind(value)


def parse_request(data: str, default_id: str, max_chars: int) -> Request:
    """A ``Request`` from an instruction message, or ``RequestError``.

    Text starting with ``{`` is read as JSON; unknown keys are refused rather than ignored, so that a
    misspelt override (``keep_raito``) cannot silently fall back to the node's default.
    """
    stripped = data.strip()
    if not stripped.startswith("{"):
        return Request(id=default_id, text=_check_text(stripped, max_chars))
    try:
        obj = json.loads(stripped)
    except json.JSONDecodeError as exc:
        raise RequestError(f"instruction starts with '{{' but is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise RequestError("a JSON instruction must be an object")
    request_id = obj.get("id", default_id)
    if not isinstance(request_id, (str, int)) or isinstance(request_id, bool):
        raise RequestError(f"id must be a string or an integer, got {request_id!r}")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(FIELDS)}", str(request_id))
    request_id = str(request_id)
    try:
        text = obj.get("text")
        if not isinstance(text, str):
            raise RequestError("a JSON instruction needs a string field 'text'")
        return Request(
            id=request_id,
            text=_check_text(text.strip(), max_chars),
            max_new_tokens=_number(obj, "max_new_tokens", int, 1, MAX_NEW_TOKENS_LIMIT),
            latency_budget_ms=_number(obj, "latency_budget_ms", float, 0.0, 3.6e6, lo_open=True),
            keep_ratio=_number(obj, "keep_ratio", float, 0.0, 1.0, lo_open=True),
        )
    except RequestError as exc:
        raise RequestError(str(exc), request_id) from None


def _check_text(text: str, max_chars: int) -> str:
    if not text:
        raise RequestError("instruction text is empty")
    if len(text) > max_chars:
        raise RequestError(f"instruction has {len(text)} characters; the limit is {max_chars} (max_instruction_chars)")
    return text
