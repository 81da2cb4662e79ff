"""What a planner sends on ``instruction``: plain text, or a JSON object with per-request overrides."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from itertools import accumulate

from ..budget import check_keep_ratio, check_latency_budget_ms
from .frames import MAX_CAMERAS

FIELDS = ("id", "text", "max_new_tokens", "latency_budget_ms", "keep_ratio", "cameras")
MAX_NEW_TOKENS_LIMIT = 1024
MAX_JSON_DEPTH = 4  # a valid request nests two levels (the cameras list); deeper is refused unparsed
MAX_NUMBER_CHARS = 32  # longer digit strings are refused before Python converts them (int() is quadratic)
MAX_ID_CHARS = 256
_STRING_LITERAL = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(r"[\[\]{}]")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def loggable(text: str, limit: int = 200) -> str:
    """``text`` safe for a one-line log: control characters, ANSI escapes and bidi overrides escaped (so a
    hostile field name cannot forge log lines), cut to ``limit`` characters."""
    cut = text if len(text) <= limit else text[:limit] + "…"
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), cut)


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
    cameras: tuple[str, ...] = ()  # empty: the node's default cameras


def _number(obj: dict, key: str, kind: type, lo: float, hi: float):
    value = obj.get(key)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (kind is int and not float(value).is_integer())
    ):
        raise RequestError(f"{key} must be {'an integer' if kind is int else 'a number'}, got {loggable(repr(value))}")
    if not math.isfinite(value) or value > hi or value < lo:
        raise RequestError(f"{key} must be in [{lo}, {hi}], got {value!r}")
    return kind(value)


def _camera_names(obj: dict) -> tuple[str, ...]:
    """The ``cameras`` field: a list of distinct camera names (whether the node has them is the node's to say)."""
    value = obj.get("cameras")
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(name, str) and name for name in value):
        raise RequestError(f"cameras must be a list of camera names, got {loggable(repr(value))}")
    if len(value) > MAX_CAMERAS:
        raise RequestError(f"cameras names {len(value)} cameras; the limit is {MAX_CAMERAS}")
    if len(set(value)) != len(value):
        raise RequestError(f"cameras names a camera twice: {loggable(repr(value))}")
    return tuple(value)


def _checked(obj: dict, key: str, check) -> float | None:
    """The field ``key`` (``None`` when absent) as the library's own ``check`` of it takes it (``ptp_ros.budget``:
    the one range of a keep ratio, of a latency budget), or ``RequestError`` in its words."""
    value = obj.get(key)
    try:
        return None if value is None else check(value)
    except ValueError as exc:
        raise RequestError(loggable(str(exc))) from None


def message_limit(max_chars: int) -> int:
    """Longest instruction message read at all: room for the longest text, fully JSON-escaped, and the fields."""
    return 6 * max_chars + 1024


def parse_request(data: str, default_id: str, max_chars: int) -> Request:
    """A ``Request`` from an instruction message, or ``RequestError``.

    Text starting with ``{`` (after a byte-order mark and blanks) is read as JSON; unknown keys are refused
    rather than ignored, so that a misspelt override (``keep_raito``) cannot silently fall back to the node's
    default.  Nesting depth and number lengths are bounded before and while parsing, so no message can
    exhaust the stack or the CPU.
    """
    if len(data) > message_limit(max_chars):
        raise RequestError(f"instruction message has {len(data)} characters; the limit is {message_limit(max_chars)}")
    stripped = data.lstrip("\ufeff").strip()
    if not stripped.startswith("{"):
        return Request(id=default_id, text=_check_text(stripped, max_chars))
    return request_from_fields(_load_object(stripped), default_id, max_chars)


def request_from_fields(obj: dict, default_id: str, max_chars: int) -> Request:
    """A ``Request`` from the fields of a JSON instruction or of an action goal, or ``RequestError``.

    The id is checked first, so that every later refusal (a field out of range, ±inf, a text over the limit)
    carries the request's own id."""
    request_id = obj.get("id", default_id)
    if not isinstance(request_id, (str, int)) or isinstance(request_id, bool):
        raise RequestError(f"id must be a string or an integer, got {loggable(repr(request_id))}")
    request_id = str(request_id)
    if not request_id.strip() or len(request_id) > MAX_ID_CHARS:
        raise RequestError(f"id must have 1 to {MAX_ID_CHARS} characters, got {len(request_id)}")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise RequestError(f"unknown field(s) {loggable(', '.join(unknown))}; allowed: {', '.join(FIELDS)}", request_id)
    try:
        text = obj.get("text")
        if not isinstance(text, str):
            raise RequestError("a JSON instruction needs a string field 'text'")
        return Request(
            id=request_id,
            text=_check_text(text.strip(), max_chars),
            max_new_tokens=_number(obj, "max_new_tokens", int, 1, MAX_NEW_TOKENS_LIMIT),
            latency_budget_ms=_checked(obj, "latency_budget_ms", check_latency_budget_ms),
            keep_ratio=_checked(obj, "keep_ratio", check_keep_ratio),
            cameras=_camera_names(obj),
        )
    except RequestError as exc:
        raise RequestError(str(exc), request_id) from None


def _json_depth(text: str) -> int:
    """Deepest bracket nesting of ``text`` outside string literals, without recursion."""
    skeleton = _BRACKETS.findall(_STRING_LITERAL.sub("", text))
    return max(accumulate(1 if b in "[{" else -1 for b in skeleton), default=0)


def _bounded_number(kind: type):
    def convert(literal: str):
        if len(literal) > MAX_NUMBER_CHARS:
            raise RequestError(f"a number with {len(literal)} characters; the limit is {MAX_NUMBER_CHARS}")
        return kind(literal)

    return convert


def _refuse_constant(name: str):
    raise RequestError(f"{name} is not a number JSON allows")


def _load_object(text: str) -> dict:
    if (depth := _json_depth(text)) > MAX_JSON_DEPTH:
        raise RequestError(f"JSON nested {depth} levels deep; the limit is {MAX_JSON_DEPTH}")
    try:
        obj = json.loads(
            text, parse_int=_bounded_number(int), parse_float=_bounded_number(float), parse_constant=_refuse_constant
        )
    except (json.JSONDecodeError, RecursionError) as exc:
        raise RequestError(f"instruction starts with '{{' but is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise RequestError("a JSON instruction must be an object")
    return obj


def _check_text(text: str, max_chars: int) -> str:
    if not text:
        raise RequestError("instruction text is empty")
    if len(text) > max_chars:
        raise RequestError(f"instruction has {len(text)} characters; the limit is {max_chars} (max_instruction_chars)")
    return text
