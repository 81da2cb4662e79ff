"""The latency model and keep-ratio controller: unit tests on synthetic timings, then the real serving
loop on the tiny model with an injected slow stage."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
from ros_helpers import SlowAdapter

from ptp_ros.latency_budget import LatencyModel, choose_keep_ratio, fit_line

N = 2000


def stages(kept: int, total: int = N, new_tokens: int = 8, noise: float = 0.0) -> dict[str, float]:
    """A synthetic model: 100 ms fixed, prefill 1 ms per token, decode 10 ms per generated token;
    scoring (50 ms) is skipped when every token is kept, as the pipeline does."""
    return {
        "preprocess": 40.0 + noise,
        "encode": 60.0,
        "score": 0.0 if kept >= total else 50.0,
        "select": 1.0,
        "prefill": 1.0 * kept,
        "decode": 10.0 * (new_tokens - 1),
    }


def fitted(points=(100, 500, 1000, N), noise=()) -> LatencyModel:
    model = LatencyModel()
    for i, k in enumerate(points):
        model.observe(k, N, stages(k, noise=noise[i] if noise else 0.0), new_tokens=8)
    return model


def test_fit_line_is_least_squares_and_never_negative():
    x = np.array([1.0, 2.0, 3.0])
    assert fit_line(x, 2 + 3 * x) == pytest.approx((2.0, 3.0))
    assert fit_line(x, 10 - x)[1] == 0.0  # time does not fall with more tokens
    assert fit_line(np.array([5.0, 5.0]), np.array([1.0, 3.0])) == (2.0, 0.0)
    a, b = fit_line(x, 3 * x - 1)
    assert a == 0.0 and b > 0
    assert fit_line(np.array([]), np.array([])) == (0.0, 0.0)


def test_prediction_recovers_each_stage():
    model = fitted()
    p = model.predict(800, N, max_new_tokens=8)
    assert p["prefill"] == pytest.approx(800.0)
    assert p["decode"] == pytest.approx(70.0)
    assert p["score"] == pytest.approx(50.0)
    assert p["total"] == pytest.approx(40 + 60 + 50 + 1 + 800 + 70)
    assert model.predict(N, N, 8)["score"] == pytest.approx(0.0)  # keep-all is fitted apart
    assert model.predict(800, N, max_new_tokens=21)["decode"] == pytest.approx(200.0)  # decode scales with tokens
    assert model.margin_ms == pytest.approx(0.0)


def test_the_chosen_ratio_is_the_largest_that_fits():
    model = fitted()
    fixed = 40 + 60 + 50 + 1 + 70
    choice = choose_keep_ratio(model, fixed + 1000.5, N, 8, 0.05, 1.0)
    assert choice.feasible and choice.tokens == 1000 and choice.keep_ratio == pytest.approx(0.5)
    assert choice.predicted_ms <= fixed + 1000.5
    ratios = [choose_keep_ratio(model, b, N, 8, 0.05, 1.0).keep_ratio for b in (5000, 1500, 800, 400)]
    assert ratios == sorted(ratios, reverse=True) and ratios[0] == 1.0 and ratios[-1] < 0.15


def test_bounds_and_the_infeasible_case():
    model = fitted()
    assert choose_keep_ratio(model, 1e6, N, 8, 0.05, 0.3).keep_ratio == pytest.approx(0.3)
    low = choose_keep_ratio(model, 10.0, N, 8, 0.05, 1.0)
    assert not low.feasible and low.keep_ratio == pytest.approx(0.05) and low.predicted_ms > 10.0
    assert choose_keep_ratio(model, 1e6, N, 8, 0.2, 0.2).keep_ratio == pytest.approx(0.2)
    with pytest.raises(ValueError):
        choose_keep_ratio(model, 100.0, N, 8, 0.5, 0.2)


def test_noise_widens_the_margin_and_the_model_follows_the_device():
    noisy = fitted(points=(100, 500, 1000, 1500, N), noise=(0, 80, -80, 80, -80))
    assert noisy.margin_ms > 30
    quiet = fitted()
    assert (
        choose_keep_ratio(noisy, 1200, N, 8, 0.05, 1.0).tokens < choose_keep_ratio(quiet, 1200, N, 8, 0.05, 1.0).tokens
    )
    model = LatencyModel(window=4)
    for k in (100, 500, 1000, 1500):
        model.observe(k, N, stages(k), 8)
    for k in (100, 500, 1000, 1500):  # the device got twice as slow per token
        model.observe(k, N, {**stages(k), "prefill": 2.0 * k}, 8)
    assert model.predict(1000, N, 8)["prefill"] == pytest.approx(2000.0)


def test_prediction_needs_observations():
    with pytest.raises(RuntimeError, match="calibrate"):
        LatencyModel().predict(10, N, 8)
    with pytest.raises(ValueError):
        LatencyModel().observe(0, N, stages(1), 8)


MS_PER_TOKEN = 3.0  # injected: dominates the tiny model's own (noisy) time at high keep ratios


@pytest.fixture(scope="module")
def slow_worker(tiny_adapter, sample_image):
    from ptp_ros.ros.worker import Counters, RequestWorker, Settings, calibrate

    results: list[dict] = []
    worker = RequestWorker(
        SlowAdapter(tiny_adapter, ms_per_token=MS_PER_TOKEN),
        Settings(mode="budget", max_new_tokens=2),
        queue_size=1,
        emit=lambda result, _text: results.append(result),
        emit_saliency=lambda *_: None,
        now_ns=lambda: 0,
        counters=Counters(),
    )
    image = cv2.resize(sample_image, (960, 540), interpolation=cv2.INTER_AREA)
    calibrate(worker, image, [0.05, 0.3, 0.6, 1.0], max_new_tokens=2)
    worker.start()
    yield worker, image, results
    worker.stop()


def serve(worker, image, results, budget_ms: float) -> dict:
    """One request through the worker's queue and inference thread, as the node sends it."""
    from ptp_ros.ros.requests import Request
    from ptp_ros.ros.worker import Frame

    worker.put_frame(
        Frame(stamp_ns=0, stamp={"sec": 0, "nanosec": 0}, frame_id="cam", header=None, decode=lambda: image)
    )
    before = len(results)
    worker.submit(Request(id=f"b{before}", text="Where is the cup?", latency_budget_ms=budget_ms), time.monotonic())
    deadline = time.monotonic() + 180
    while len(results) == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(results) == before + 1, "no result within 180 s"
    return results[-1]


def test_budget_mode_trades_tokens_for_latency_on_the_tiny_model(slow_worker):
    worker, image, results = slow_worker
    total = worker.total_tokens
    full_ms = worker.latency_model.predict_total(total, total, 2)
    floor_ms = worker.latency_model.predict_total(round(0.05 * total), total, 2)
    # the last: below the floor's prediction (infeasible), yet long enough for an idle worker to start it
    # (a budget that expires before the request starts gets an 'expired' result instead: test_ros_robustness)
    budgets = [
        full_ms * 1.5,
        floor_ms + 0.6 * (full_ms - floor_ms),
        floor_ms + 0.25 * (full_ms - floor_ms),
        min(150.0, floor_ms / 2),
    ]
    served = [serve(worker, image, results, b) for b in budgets]
    ratios = [r["keep_ratio"] for r in served]
    assert all(r["status"] == "ok" and r["mode"] == "budget" for r in served), served
    assert ratios[0] == 1.0 and ratios[0] > ratios[1] > ratios[2] >= ratios[3], (ratios, served)
    for r in served:  # where feasible, the measured time keeps to the budget, give or take this box's noise
        if r["budget_feasible"]:
            slack = max(0.3 * r["latency_budget_ms"], 3 * worker.latency_model.margin_ms)  # margin = 1 sigma
            assert r["latency_ms"]["total"] <= r["latency_budget_ms"] + slack, (r, slack)
    infeasible = served[-1]
    assert not infeasible["budget_feasible"] and not infeasible["budget_met"]
    assert infeasible["keep_ratio"] == pytest.approx(0.05, abs=1 / total)
