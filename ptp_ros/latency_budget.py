"""Latency model of one model on one device, and the keep-ratio controller that uses it.

Each pipeline stage's time is fitted as ``a + b·kept_tokens`` (``a, b ≥ 0``) over a sliding window of
recent requests, so the model follows the device as it warms up, throttles or gets shared.  Decoding
is fitted per generated token, because its cost scales with ``max_new_tokens`` far more than with the
image.  Requests that keep every token are fitted apart: the pipeline skips scoring for them, so
they are not a point on the pruned line.  The controller adds the fit's own residual spread as a
safety margin and picks the largest keep ratio whose predicted total still fits the budget.

numpy only: no models, no ROS (see DESIGN.md).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

STAGES = ("preprocess", "encode", "score", "select", "prefill", "decode")
PER_TOKEN_STAGE = "decode"  # fitted as ms per generated token after the first


@dataclass(frozen=True)
class Observation:
    kept: int
    total: int
    stages_ms: dict[str, float]
    new_tokens: int

    @property
    def keep_all(self) -> bool:
        return self.kept >= self.total

    @property
    def total_ms(self) -> float:
        return float(sum(self.stages_ms.get(s, 0.0) for s in STAGES))


def fit_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares ``y ≈ a + b·x`` with ``a, b ≥ 0`` (time never falls with more tokens)."""
    if len(x) == 0:
        return 0.0, 0.0
    if len(np.unique(x)) < 2:
        return max(float(np.mean(y)), 0.0), 0.0
    b, a = np.polyfit(x, y, 1)
    if b < 0:
        return max(float(np.mean(y)), 0.0), 0.0
    if a < 0:  # through the origin
        return 0.0, max(float(np.dot(x, y) / np.dot(x, x)), 0.0)
    return float(a), float(b)


class LatencyModel:
    """Per-stage time as a function of kept visual tokens, refitted after every observation."""

    def __init__(self, window: int = 32, margin_sigmas: float = 1.0):
        if window < 2:
            raise ValueError("window must be >= 2")
        self.window = window
        self.margin_sigmas = margin_sigmas
        self._observations: deque[Observation] = deque(maxlen=window)
        self._fits: dict[tuple[str, bool], tuple[float, float]] = {}
        self._sigma = 0.0

    @property
    def ready(self) -> bool:
        return len(self._observations) > 0

    def observe(self, kept: int, total: int, stages_ms: dict[str, float], new_tokens: int) -> None:
        """Record one finished request (``stages_ms`` as in ``Answer.timings_ms``) and refit."""
        if kept < 1 or total < 1:
            raise ValueError(f"kept and total must be >= 1, got {kept}, {total}")
        self._observations.append(Observation(min(kept, total), total, dict(stages_ms), max(new_tokens, 1)))
        self._refit()

    def _refit(self) -> None:
        obs = list(self._observations)
        pruned = [o for o in obs if not o.keep_all]
        full = [o for o in obs if o.keep_all]
        self._fits = {}
        for stage in STAGES:
            for keep_all, group in ((False, pruned or full), (True, full or pruned)):
                rows = [o for o in group if stage != PER_TOKEN_STAGE or o.new_tokens > 1]
                x = np.array([o.kept for o in rows], float)
                y = np.array([self._stage_value(o, stage) for o in rows], float)
                self._fits[stage, keep_all] = fit_line(x, y)
        residuals = [o.total_ms - self.predict_total(o.kept, o.total, o.new_tokens) for o in obs]
        self._sigma = float(np.std(residuals)) if len(residuals) > 2 else 0.0

    @staticmethod
    def _stage_value(o: Observation, stage: str) -> float:
        value = o.stages_ms.get(stage, 0.0)
        return value / (o.new_tokens - 1) if stage == PER_TOKEN_STAGE else value

    def predict(self, kept: int, total: int, max_new_tokens: int) -> dict[str, float]:
        """Expected ms per stage (and ``total``) for keeping ``kept`` of ``total`` tokens."""
        if not self.ready:
            raise RuntimeError("latency model has no observations yet; calibrate first")
        keep_all = kept >= total
        out = {}
        for stage in STAGES:
            a, b = self._fits[stage, keep_all]
            value = a + b * kept
            out[stage] = value * max(max_new_tokens - 1, 0) if stage == PER_TOKEN_STAGE else value
        out["total"] = sum(out[s] for s in STAGES)
        return out

    def predict_total(self, kept: int, total: int, max_new_tokens: int) -> float:
        return self.predict(kept, total, max_new_tokens)["total"]

    @property
    def margin_ms(self) -> float:
        """Safety margin added to every prediction: the fit's residual spread on recent requests."""
        return self.margin_sigmas * self._sigma


@dataclass(frozen=True)
class BudgetChoice:
    keep_ratio: float
    tokens: int
    predicted_ms: float  # expected total, margin included
    feasible: bool  # False: even the minimum keep ratio is predicted to overrun


def choose_keep_ratio(
    model: LatencyModel, budget_ms: float, total: int, max_new_tokens: int, ratio_min: float, ratio_max: float
) -> BudgetChoice:
    """The largest keep ratio in [ratio_min, ratio_max] whose predicted time fits ``budget_ms``.

    When even ``ratio_min`` is predicted to overrun, the answer is ``ratio_min`` with
    ``feasible=False``: the request still runs, as fast as it is allowed to.
    """
    if not 0.0 < ratio_min <= ratio_max <= 1.0:
        raise ValueError(f"need 0 < ratio_min <= ratio_max <= 1, got {ratio_min}, {ratio_max}")
    if total < 1:
        raise ValueError("total must be >= 1")
    lo = max(1, math.ceil(ratio_min * total - 1e-9))
    hi = max(lo, min(total, math.floor(ratio_max * total + 1e-9)))

    def cost(k: int) -> float:
        return model.predict_total(k, total, max_new_tokens) + model.margin_ms

    def choice(k: int, feasible: bool) -> BudgetChoice:
        return BudgetChoice(keep_ratio=k / total, tokens=k, predicted_ms=cost(k), feasible=feasible)

    if hi == total and cost(total) <= budget_ms:  # keep-all is fitted apart (no scoring stage)
        return choice(total, True)
    hi_pruned = min(hi, total - 1) if total > 1 else hi
    if hi_pruned < lo or cost(lo) > budget_ms:
        return choice(lo, lo == total and cost(lo) <= budget_ms)
    while lo < hi_pruned:  # predictions grow with k (non-negative slopes): bisect the last fit
        mid = (lo + hi_pruned + 1) // 2
        if cost(mid) <= budget_ms:
            lo = mid
        else:
            hi_pruned = mid - 1
    return choice(lo, True)
