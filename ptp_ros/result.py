"""One typed result: what ``ptp-ask --json`` prints, what the node publishes on ``result`` and what the ``ask``
action returns are all produced from these two dataclasses, so a new field is added once.

``AnswerResult`` is the library's view of one answer (``Pipeline.answer(...).result()``); ``RequestResult`` is one
node request's: the request, the frame it used, how it ran and, when it was answered, the ``AnswerResult``.  The
JSON forms (``to_json``) are the keys scripts read; the action's typed result takes every field it declares under
the same name (ptp_ros/ros/ask_action.py ``result_message``).  Pure Python: a planner can import it without torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RegionQuota:
    """The tokens one region kept of its selectable ones."""

    region: int
    name: str
    kept: int
    size: int


@dataclass(frozen=True)
class ViewTokens:
    """The visual tokens one camera view kept of its own, in a request over one or several views."""

    name: str  # the camera's name ("image" for a bare image)
    kept: int
    total: int


@dataclass(frozen=True)
class AnswerResult:
    """One answer as the library reports it; every field is always in its JSON (``prune_layer`` null when the
    tokens were pruned before the LLM, or not at all)."""

    answer: str
    visual_tokens_total: int
    visual_tokens_kept: int
    keep_ratio: float
    selector: str
    quotas: tuple[RegionQuota, ...]  # per region, in region order
    structural_kept: int  # row newlines kept: in no region's quota (sum of quotas + this = visual_tokens_kept)
    structural_total: int
    prompt_tokens: int  # as fed to the LLM (in-LLM pruning: the whole prompt)
    prune_layer: int | None  # the first LLM layer that read only the kept tokens
    new_tokens: int
    latency_ms: dict[str, float]  # per stage (timing.STAGES) and "total"
    views: tuple[ViewTokens, ...] = ()  # per camera view, in prompt order (sum of kept = visual_tokens_kept)
    encode_reused: float = 0.0  # of the camera views' tiles, the mean fraction whose encoding was reused (1: cached)

    def to_json(self) -> dict[str, Any]:
        """What ``ptp-ask --json`` prints."""
        out = dataclasses.asdict(self)
        out["quotas"] = list(out["quotas"])
        out["views"] = list(out["views"])
        return out


@dataclass
class CameraFrame:
    """One camera's part of a request: the frame it used (its header) and, once answered, the visual tokens of
    that view the request kept of its total (``frames`` of ``RequestResult``; the kept counts add up to the
    answer's ``visual_tokens_kept``)."""

    stamp: dict[str, int]  # {"sec", "nanosec"}
    frame_id: str
    visual_tokens_kept: int | None = None
    visual_tokens_total: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class RequestResult:
    """One node request's result, filled in as the request goes (a field left ``None`` was not reached and is not
    in the JSON): the request, then the frame it used, then how it ran, then the answer and the node's times.

    ``status`` is "ok" (``answer`` set) or one of the node's refusals and failures, with ``error`` saying why.
    ``latency_ms`` is the node's: ``queue``, ``convert``, the pipeline's stages, ``pipeline`` and ``total`` from
    the instruction's arrival."""

    id: str
    instruction: str
    status: str | None = None
    error: str | None = None
    # the frame
    stamp: dict[str, int] | None = None  # {"sec", "nanosec"}
    frame_id: str | None = None
    frame_age_ms: float | None = None  # node clock minus the frame's stamp; unknown for an unset stamp
    frame_arrival_age_ms: float | None = None
    stamp_warning: str | None = None  # the stamp is unset, in the future or more than a day old
    # every camera's frame, keyed by camera name in prompt order (``stamp``/``frame_id`` above: the first's)
    frames: dict[str, CameraFrame] | None = None
    # how it ran
    mode: str | None = None  # "budget", "fixed" or "request" (the request's own keep ratio)
    latency_budget_ms: float | None = None
    max_new_tokens: int | None = None
    predicted_ms: float | None = None  # budget mode: the latency model's prediction, margin included
    budget_feasible: bool | None = None  # budget mode: whether even keep_ratio_min was predicted to fit
    prune_stage: str | None = None  # budget mode: "in_llm" or "pre_llm"
    prune_stage_reason: str | None = None  # why it fell back before the LLM
    # the answer
    answer: AnswerResult | None = None
    latency_ms: dict[str, float] | None = None
    budget_met: bool | None = None  # latency_ms["total"] <= latency_budget_ms

    def fail(self, status: str, error: str) -> RequestResult:
        """This result ended without an answer: ``status`` and why."""
        self.status, self.error = status, error
        return self

    def to_json(self) -> dict[str, Any]:
        """The ``result`` topic's object: the fields set, an answer's fields under their own names (its per-stage
        ``latency_ms`` replaced by the node's, which holds the same stages)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, AnswerResult):
                out.update(value.to_json())
            elif f.name == "frames" and value is not None:
                out[f.name] = {camera: frame.to_json() for camera, frame in value.items()}
            elif value is not None:
                out[f.name] = value
        return out
