"""Latency model of one model on one device, and the keep-ratio controller that uses it.

Each pipeline stage's time is fitted as ``a + b·total + c·kept`` (visual tokens of the frame, and kept;
``a, b, c ≥ 0``, so a prediction never falls with more tokens).  A request over several camera views counts
all their tokens in ``total`` and ``kept``, and the image stages (preprocess, encode) pay their fixed cost once
per view: ``a·views``.  ``total`` matters because inside the LLM
the layers before the prune layer read every token, and the image stages scale with the frame.  Decoding
is fitted per generated token, because its cost scales with ``max_new_tokens`` far more than with the
image.  Scoring and selection are skipped when every token is kept: they are fitted on pruned requests
and predicted 0 for keep-all.  The encode is fitted as if every tile (and global view) of every camera
view ran through the vision tower: a request whose frames were encoded before (vlm/encode_cache.py) runs
only a fraction of them, or none, and its encode is predicted at that fraction (``encode_fraction``, over
all its camera views), so a cached or mostly still frame gets a larger keep ratio for the same budget.

Where pruning happens (``IN_LLM``, ``PRE_LLM``: the *prune stage*) changes the cost law, so the stages
after the encoder are fitted per prune stage; a keep-all request runs the same way whatever the prune
stage (stock generate, no scoring) and counts for every one.

The fit has to hold on a shared machine:

* **robust** — the fit minimises relative errors, and requests whose total time is far off it (a busy
  neighbour during calibration, a garbage collection) count for nothing (Tukey's biweight on the
  relative residual, scaled by its median absolute deviation), so a 10× outlier does not move it;
* **forgetting** — observation weights halve every ``half_life`` requests, so the model follows a
  device that warms up, throttles or gets shared within a few requests;
* **frame size** — ``b`` (per frame token) and ``a`` are only told apart by frames of two sizes; until
  the window holds two, a stage's fixed cost is assumed to scale with a larger frame (and not to shrink
  with a smaller one): a new camera size is predicted on the safe side, never as cheaper than seen.

The controller adds the fit's relative spread as a safety margin and picks the largest keep ratio whose
predicted total fits the budget, in the first prune stage (in order of preference) that can meet it at
all: below the in-LLM floor (layers < K at full length, at the minimum keep) it takes the stage before
the LLM.  Every prediction made before a request ran is compared with what it measured
(``prediction_error``), for ``/diagnostics``.

numpy (and the one stage list, ``timing.STAGES``): no models, no ROS (see DESIGN.md).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from .budget import ratio_tokens
from .timing import STAGES

PER_TOKEN_STAGE = "decode"  # fitted as ms per generated token after the first
IMAGE_STAGES = ("preprocess", "encode")  # the same wherever tokens are pruned: fitted over every request
PRUNED_ONLY_STAGES = ("score", "select")  # skipped when every token is kept
VIEW_STAGE = "encode"  # scales with the fraction of the request's tiles run through the vision tower
IN_LLM, PRE_LLM = "in_llm", "pre_llm"  # prune stages: inside the LLM at layer K, or before it

TUKEY_C = 4.685  # biweight cut-off in robust standard deviations (95 % efficiency on Gaussian noise)
MIN_RELATIVE_SPREAD = 0.1  # timing noise assumed at least ±10 %: only what is far beyond is an outlier
ROBUST_ITERATIONS = 4
MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class Observation:
    kept: int
    total: int
    stages_ms: dict[str, float]
    new_tokens: int
    prune_stage: str
    views: int = 1  # camera views in the request
    encode_fraction: float = 1.0  # of the tiles (and global views) of every camera view, the fraction encoded

    @property
    def keep_all(self) -> bool:
        return self.kept >= self.total

    @property
    def total_ms(self) -> float:
        return float(sum(self.stages_ms.get(s, 0.0) for s in STAGES))


@dataclass(frozen=True)
class StageFit:
    """``a·units + b·total + c·kept`` with ``units`` the views where ``per_view`` (the image stages), else 1; with
    ``single_total`` set (every observation had that frame size, per view where ``per_view``) ``b`` is unknown and
    ``a`` scales up with a larger frame instead."""

    a: float
    b: float
    c: float
    single_total: float | None = None
    per_view: bool = False

    def __call__(self, total, kept, views=1):  # floats or arrays
        units = views if self.per_view else 1
        if self.single_total is not None:
            return self.a * units * np.maximum(1.0, np.divide(total, units * self.single_total)) + self.c * kept
        return self.a * units + self.b * total + self.c * kept


@dataclass(frozen=True)
class PredictionError:
    """How far the model's predictions (margin excluded) were from the measured pipeline time."""

    median_abs_pct: float  # median |predicted − measured| / measured, in %, over the last ``requests``
    requests: int
    last_predicted_ms: float
    last_measured_ms: float


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cumulative = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cumulative, 0.5 * cumulative[-1])])


def _supports(columns: int) -> list[np.ndarray]:
    return [np.array(c) for n in range(1, columns + 1) for c in itertools.combinations(range(columns), n)]


SUPPORTS = {n: _supports(n) for n in (1, 2, 3)}


def nonnegative_least_squares(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """argmin Σ w·(y − x·θ)² over θ ≥ 0, exactly: the optimum is the unconstrained fit on its own support, so
    when the fit on every column is negative somewhere, each support of the (at most 3) columns is solved from
    the normal equations, smallest first (ties keep the simpler one)."""
    gram, moment, energy = x.T @ (x * w[:, None]), x.T @ (w * y), float(w @ (y * y))
    supports = SUPPORTS[x.shape[1]]
    best, best_err = np.zeros(x.shape[1]), energy
    for support in (supports[-1], *supports):  # the full fit first: when it is non-negative, it is the optimum
        g, m = gram[support][:, support], moment[support]
        try:
            theta = np.linalg.solve(g, m)
        except np.linalg.LinAlgError:  # collinear columns: a smaller support explains the same
            continue
        err = energy - 2 * theta @ m + theta @ g @ theta
        if (theta >= 0).all() and err < best_err - 1e-9 * energy:
            best, best_err = np.zeros(x.shape[1]), err
            best[support] = theta
            if support is supports[-1]:
                break
    return best


def fit_stage(
    total: np.ndarray, kept: np.ndarray, y: np.ndarray, w: np.ndarray, views: np.ndarray | None = None
) -> StageFit:
    """The non-negative ``a·units + b·total + c·kept`` for one stage, ``units`` the ``views`` when given (an image
    stage) and 1 otherwise (see ``StageFit`` for one frame size)."""
    per_view = views is not None
    used = w > 0
    if not used.any():
        return StageFit(0.0, 0.0, 0.0, per_view=per_view)
    units = views[used] if per_view else np.ones(int(used.sum()))
    total, kept, y, w = total[used], kept[used], y[used], w[used]
    if np.ptp(total / units) == 0:
        a, c = nonnegative_least_squares(np.column_stack([units, kept]), y, w)
        return StageFit(float(a), 0.0, float(c), single_total=float(total[0] / units[0]), per_view=per_view)
    a, b, c = nonnegative_least_squares(np.column_stack([units, total, kept]), y, w)
    return StageFit(float(a), float(b), float(c), per_view=per_view)


class Observations:
    """The window as arrays, with which rows each (prune stage, stage) fit reads."""

    def __init__(self, obs: list[Observation], default_stage: str):
        self.total = np.array([o.total for o in obs], float)
        self.kept = np.array([o.kept for o in obs], float)
        self.views = np.array([o.views for o in obs], float)
        self.new_tokens = np.array([o.new_tokens for o in obs], float)
        self.encode_fraction = np.array([o.encode_fraction for o in obs], float)
        self.measured = np.array([o.total_ms for o in obs])
        self.keep_all = self.kept >= self.total
        self.stage_of = np.array([o.prune_stage for o in obs])
        self.prune_stages = list(dict.fromkeys([default_stage, *self.stage_of]))
        self.values = {stage: np.array([_stage_value(o, stage) for o in obs]) for stage in STAGES}
        self.rows = {}
        for prune_stage in self.prune_stages:
            ours = (self.stage_of == prune_stage) | self.keep_all
            for stage in STAGES:
                rows = np.ones(len(obs), bool) if stage in IMAGE_STAGES else ours
                if stage in PRUNED_ONLY_STAGES:
                    rows = rows & ~self.keep_all
                if stage == PER_TOKEN_STAGE:
                    rows = rows & (self.new_tokens > 1)
                if stage == VIEW_STAGE:
                    rows = rows & (self.encode_fraction > 0)  # a cached frame says nothing of the encoder
                self.rows[prune_stage, stage] = rows

    def fit(self, weights: np.ndarray) -> dict[tuple[str, str], StageFit]:
        return {
            (p, stage): fit_stage(
                self.total,
                self.kept,
                self.values[stage],
                np.where(rows, weights, 0.0),
                self.views if stage in IMAGE_STAGES else None,
            )
            for (p, stage), rows in self.rows.items()
        }

    def predicted(self, fits: dict[tuple[str, str], StageFit]) -> np.ndarray:
        """Each observation's predicted total ms, under its own prune stage."""
        out = np.zeros(len(self.kept))
        for prune_stage in self.prune_stages:
            mine = self.stage_of == prune_stage
            per_stage = _predict(
                fits,
                self.kept[mine],
                self.total[mine],
                self.new_tokens[mine],
                prune_stage,
                self.views[mine],
                self.encode_fraction[mine],
            )
            out[mine] = per_stage["total"]
        return out


class LatencyModel:
    """Per-stage time as a function of frame and kept visual tokens, per prune stage, refitted after every
    observation (robustly, recent requests weighing more)."""

    def __init__(self, window: int = 64, half_life: float = 6.0, margin_sigmas: float = 1.0, error_window: int = 20):
        if window < 2 or half_life <= 0 or error_window < 1:
            raise ValueError("need window >= 2, half_life > 0 and error_window >= 1")
        self.window, self.half_life, self.margin_sigmas = window, half_life, margin_sigmas
        self.default_stage: str | None = None  # the prune stage first observed (calibration's configured one)
        self._observations: deque[Observation] = deque(maxlen=window)
        # replaced whole after each refit, so readers on other threads (the overload check, diagnostics) see
        # one consistent fit without a lock
        self._fits: dict[tuple[str, str], StageFit] = {}
        self._spread = 0.0
        self._pruned_stages: frozenset[str] = frozenset()  # prune stages with a pruned request in the window
        self._errors: deque[tuple[float, float]] = deque(maxlen=error_window)
        self._prediction_error: PredictionError | None = None

    @property
    def ready(self) -> bool:
        return self.default_stage is not None

    def ready_for(self, prune_stage: str) -> bool:
        """Whether pruned requests at ``prune_stage`` have been seen (keep-all ones say nothing of its scoring)."""
        return prune_stage in self._pruned_stages or prune_stage == self.default_stage

    def observe(
        self,
        kept: int,
        total: int,
        stages_ms: dict[str, float],
        new_tokens: int,
        prune_stage: str | None = None,
        track_error: bool = True,
        views: int = 1,
        encode_fraction: float = 1.0,
    ) -> None:
        """Record one finished request (``stages_ms`` as in ``Answer.timings_ms``; ``kept`` and ``total`` over all
        its ``views``; ``encode_fraction`` of their tiles ran through the vision tower) and refit.  With
        ``track_error`` the prediction the model held for it counts in ``prediction_error`` (calibration runs,
        chosen to spread the fit, do not)."""
        if kept < 1 or total < 1 or views < 1:
            raise ValueError(f"kept, total and views must be >= 1, got {kept}, {total}, {views}")
        if not 0.0 <= encode_fraction <= 1.0:
            raise ValueError(f"encode_fraction must be in [0, 1], got {encode_fraction}")
        prune_stage = prune_stage or self.default_stage or IN_LLM
        observation = Observation(
            min(kept, total), total, dict(stages_ms), max(new_tokens, 1), prune_stage, views, float(encode_fraction)
        )
        if track_error and self.ready_for(prune_stage):
            predicted = self.predict_total(
                observation.kept, total, observation.new_tokens, prune_stage, views, observation.encode_fraction
            )
            self._errors.append((predicted, observation.total_ms))
            self._prediction_error = self._summarise_errors()
        self.default_stage = self.default_stage or prune_stage
        self._observations.append(observation)
        self._refit()

    def _summarise_errors(self) -> PredictionError:
        predicted, measured = np.array(self._errors).T
        pct = 100 * np.abs(predicted - measured) / np.maximum(measured, 1e-9)
        return PredictionError(float(np.median(pct)), len(pct), float(predicted[-1]), float(measured[-1]))

    @property
    def prediction_error(self) -> PredictionError | None:
        """Predicted (before the request ran, margin excluded) against measured pipeline time, over the last
        ``error_window`` served requests; None before the first."""
        return self._prediction_error

    def _refit(self) -> None:
        obs = Observations(list(self._observations), self.default_stage)
        ages = np.arange(len(obs.kept) - 1, -1, -1, dtype=float)
        recency = 0.5 ** (ages / self.half_life)
        # least squares on relative errors (noise on a shared machine is multiplicative); the first fit scales by
        # the measured time, so that a request slowed 10x by a neighbour weighs 100x less from the start
        scale, trust = np.maximum(obs.measured, 1e-3), np.ones(len(recency))
        for _ in range(ROBUST_ITERATIONS):
            fits = obs.fit(recency * trust / scale**2)
            scale = np.maximum(obs.predicted(fits), 1e-3)
            relative = obs.measured / scale - 1
            spread = max(MAD_TO_SIGMA * weighted_median(np.abs(relative), recency), MIN_RELATIVE_SPREAD)
            u = relative / (TUKEY_C * spread)  # Tukey's biweight: beyond TUKEY_C spreads counts for nothing
            trust = np.where(np.abs(u) < 1, (1 - u**2) ** 2, 0.0)
        self._fits = fits
        self._pruned_stages = frozenset(obs.stage_of[~obs.keep_all])
        inliers = trust > 0
        self._spread = (
            MAD_TO_SIGMA * weighted_median(np.abs(relative[inliers]), recency[inliers]) if inliers.sum() > 2 else 0.0
        )

    def predict(
        self,
        kept: int,
        total: int,
        max_new_tokens: int,
        prune_stage: str | None = None,
        views: int = 1,
        encode_fraction: float = 1.0,
    ) -> dict[str, float]:
        """Expected ms per stage (and ``total``) for keeping ``kept`` of ``total`` tokens (over ``views`` camera
        views) at ``prune_stage`` (default: the one first observed), running ``encode_fraction`` of their tiles
        through the vision tower (0: frames encoded before)."""
        if not self.ready:
            raise RuntimeError("latency model has no observations yet; calibrate first")
        prune_stage = prune_stage or self.default_stage
        if not self.ready_for(prune_stage):
            raise RuntimeError(f"latency model has no pruned request at {prune_stage!r} yet; calibrate it")
        predicted = _predict(self._fits, kept, total, max_new_tokens, prune_stage, views, encode_fraction)
        return {k: float(v) for k, v in predicted.items()}

    def predict_total(
        self,
        kept: int,
        total: int,
        max_new_tokens: int,
        prune_stage: str | None = None,
        views: int = 1,
        encode_fraction: float = 1.0,
    ) -> float:
        return self.predict(kept, total, max_new_tokens, prune_stage, views, encode_fraction)["total"]

    def expected_new_tokens(self, max_new_tokens: int) -> int:
        """The tokens a request is expected to generate under a cap of ``max_new_tokens``: the most the recent
        requests generated (a model that stops at its end-of-answer token uses far fewer than the cap), the cap
        itself before any observation or when one of them reached it (it may have been cut short)."""
        seen = [o.new_tokens for o in self._observations]
        if not seen or max(seen) >= max_new_tokens:
            return max_new_tokens
        return max(seen)

    @property
    def margin_fraction(self) -> float:
        """Safety margin, as a fraction of a prediction: the recent relative spread of measured around fitted."""
        return self.margin_sigmas * self._spread

    def with_margin(self, predicted_ms: float) -> float:
        return predicted_ms * (1 + self.margin_fraction)


def _stage_value(o: Observation, stage: str) -> float:
    value = o.stages_ms.get(stage, 0.0)
    if stage == VIEW_STAGE:
        return value / o.encode_fraction if o.encode_fraction > 0 else 0.0  # the whole frame's encode
    return value / (o.new_tokens - 1) if stage == PER_TOKEN_STAGE and o.new_tokens > 1 else value


def _predict(
    fits: dict[tuple[str, str], StageFit],
    kept,
    total,
    max_new_tokens,
    prune_stage: str,
    views=1,
    encode_fraction=1.0,
) -> dict:
    """ms per stage and in total; numbers or arrays (one per request) alike."""
    out = {}
    for stage in STAGES:
        value = fits[prune_stage, stage](total, kept, views)
        if stage in PRUNED_ONLY_STAGES:
            value = np.where(np.less(kept, total), value, 0.0)
        if stage == PER_TOKEN_STAGE:
            value = value * np.maximum(np.subtract(max_new_tokens, 1), 0)
        if stage == VIEW_STAGE:
            value = value * encode_fraction
        out[stage] = value
    out["total"] = sum(out[s] for s in STAGES)
    return out


@dataclass(frozen=True)
class BudgetChoice:
    keep_ratio: float
    tokens: int
    predicted_ms: float  # expected total, margin included
    feasible: bool  # False: even the minimum keep ratio is predicted to overrun
    prune_stage: str
    reason: str | None = None  # why not the preferred prune stage


def choose_keep_ratio(
    model: LatencyModel,
    budget_ms: float,
    total: int,
    max_new_tokens: int,
    ratio_min: float,
    ratio_max: float,
    prune_stages: Sequence[str] | None = None,
    views: int = 1,
    encode_fraction: float = 1.0,
) -> BudgetChoice:
    """The largest keep ratio in [ratio_min, ratio_max] whose predicted time fits ``budget_ms``, in the first of
    ``prune_stages`` (in order of preference; default: the model's first) that meets the budget at all.  Both
    bounds count in tokens as every keep ratio does (``budget.ratio_tokens``).  Over several camera views,
    ``total`` is all their tokens and the one keep ratio is the whole request's (``views`` of them to encode).
    ``encode_fraction``: of the views' tiles, the fraction expected to run through the vision tower (0 for frames
    encoded before).

    When no stage is predicted to meet it even at ``ratio_min``, the answer is the stage with the lowest
    floor at ``ratio_min``, ``feasible=False``: the request still runs, as fast as it is allowed to.
    """
    if not 0.0 < ratio_min <= ratio_max <= 1.0:
        raise ValueError(f"need 0 < ratio_min <= ratio_max <= 1, got {ratio_min}, {ratio_max}")
    if total < 1:
        raise ValueError("total must be >= 1")
    stages = [s for s in (prune_stages or [model.default_stage]) if model.ready_for(s)]
    if not stages:
        raise RuntimeError(f"latency model has seen none of the prune stages {list(prune_stages or [])}")
    choices = [
        _choose_in_stage(model, stage, budget_ms, total, max_new_tokens, ratio_min, ratio_max, views, encode_fraction)
        for stage in stages
    ]
    preferred = choices[0]
    chosen = next((c for c in choices if c.feasible), min(choices, key=lambda c: c.predicted_ms))
    if chosen is preferred:
        return chosen
    floor = f"{preferred.prune_stage} floor of {preferred.predicted_ms:.0f} ms ({preferred.tokens} of {total} tokens)"
    why = "fits it" if chosen.feasible else "has the lowest floor"
    reason = f"the {budget_ms:.0f} ms budget is below the {floor}; {chosen.prune_stage} {why}"
    return replace(chosen, reason=reason)


def _choose_in_stage(
    model: LatencyModel,
    stage: str,
    budget_ms: float,
    total: int,
    max_new_tokens: int,
    ratio_min: float,
    ratio_max: float,
    views: int = 1,
    encode_fraction: float = 1.0,
) -> BudgetChoice:
    lo = ratio_tokens(total, ratio_min)
    hi = max(lo, ratio_tokens(total, ratio_max))

    def cost(k: int) -> float:
        return model.with_margin(model.predict_total(k, total, max_new_tokens, stage, views, encode_fraction))

    def choice(k: int, feasible: bool) -> BudgetChoice:
        return BudgetChoice(k / total, k, cost(k), feasible, stage)

    if hi == total and cost(total) <= budget_ms:  # keep-all skips scoring: not on the pruned line
        return choice(total, True)
    hi_pruned = min(hi, total - 1) if total > 1 else hi
    if hi_pruned < lo or cost(lo) > budget_ms:
        return choice(lo, lo == total and cost(lo) <= budget_ms)
    while lo < hi_pruned:  # predictions grow with k (non-negative coefficients): bisect
        mid = (lo + hi_pruned + 1) // 2
        if cost(mid) <= budget_ms:
            lo = mid
        else:
            hi_pruned = mid - 1
    return choice(lo, True)
