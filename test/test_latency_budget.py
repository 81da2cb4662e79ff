"""The latency model and keep-ratio controller: unit tests on synthetic timings, then the real serving
loop on the tiny model with an injected slow stage."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
from ros_helpers import SlowAdapter

from ptp_ros.latency_budget import IN_LLM, PRE_LLM, LatencyModel, choose_keep_ratio, nonnegative_least_squares
from ptp_ros.result import AnswerResult

N = 2000


def stages(kept: int, total: int = N, new_tokens: int = 8, noise: float = 0.0, split: float = 0.0) -> dict[str, float]:
    """A synthetic model: 100 ms fixed, prefill 1 ms per token (``split`` of it over every frame token, as the
    layers before an in-LLM prune read them all), decode 10 ms per generated token; scoring (50 ms) is skipped
    when every token is kept, as the pipeline does."""
    return {
        "preprocess": 40.0 + noise,
        "encode": 60.0,
        "score": 0.0 if kept >= total else 50.0,
        "select": 1.0,
        "prefill": split * total + (1 - split) * kept,
        "decode": 10.0 * (new_tokens - 1),
    }


def fitted(points=(100, 500, 1000, N), noise=()) -> LatencyModel:
    model = LatencyModel()
    for i, k in enumerate(points):
        model.observe(k, N, stages(k, noise=noise[i] if noise else 0.0), new_tokens=8, track_error=False)
    return model


def test_nonnegative_least_squares_is_exact_and_never_negative():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    ones = np.ones_like(x)
    design = np.column_stack([ones, x])
    assert nonnegative_least_squares(design, 2 + 3 * x, ones) == pytest.approx([2.0, 3.0])
    assert nonnegative_least_squares(design, 10 - x, ones)[1] == 0.0  # time does not fall with more tokens
    a, b = nonnegative_least_squares(design, 3 * x - 1, ones)
    assert a == 0.0 and b > 0
    weights = np.array([1.0, 1.0, 1.0, 0.0])  # a zero weight is no observation
    assert nonnegative_least_squares(design, np.array([3.0, 5.0, 7.0, 100.0]), weights) == pytest.approx([1.0, 2.0])


def test_prediction_recovers_each_stage():
    model = fitted()
    p = model.predict(800, N, max_new_tokens=8)
    assert p["prefill"] == pytest.approx(800.0)
    assert p["decode"] == pytest.approx(70.0)
    assert p["score"] == pytest.approx(50.0)
    assert p["total"] == pytest.approx(40 + 60 + 50 + 1 + 800 + 70)
    assert model.predict(N, N, 8)["score"] == 0.0  # keep-all skips scoring
    assert model.predict(800, N, max_new_tokens=21)["decode"] == pytest.approx(200.0)  # decode scales with tokens
    assert model.margin_fraction == pytest.approx(0.0, abs=1e-6)


def test_the_chosen_ratio_is_the_largest_that_fits():
    model = fitted()
    fixed = 40 + 60 + 50 + 1 + 70
    choice = choose_keep_ratio(model, fixed + 1000.5, N, 8, 0.05, 1.0)
    assert choice.feasible and choice.tokens == 1000 and choice.keep_ratio == pytest.approx(0.5)
    assert choice.predicted_ms <= fixed + 1000.5 and choice.prune_stage == IN_LLM and choice.reason is None
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


def test_noise_widens_the_margin():
    rng = np.random.default_rng(0)
    noisy, quiet = LatencyModel(), fitted()
    for k in np.tile([100, 500, 1000, 1500, N], 4):
        noisy.observe(int(k), N, {s: v * rng.uniform(0.7, 1.3) for s, v in stages(int(k)).items()}, 8)
    assert noisy.margin_fraction > 0.05
    assert (
        choose_keep_ratio(noisy, 1200, N, 8, 0.05, 1.0).tokens < choose_keep_ratio(quiet, 1200, N, 8, 0.05, 1.0).tokens
    )


def test_calibration_outliers_do_not_move_the_fit():
    """10x outliers (a busy neighbour during calibration) among repeated points: the fit is the clean one,
    and monotone in kept tokens, even when the outliers hit the smallest keep ratio."""
    model = LatencyModel()
    for repeat in range(2):
        for k in (100, 500, N):
            slow = 10.0 if (k == 100 and repeat == 0) or (k == N and repeat == 1) else 1.0
            model.observe(k, N, {s: v * slow for s, v in stages(k).items()}, 8, track_error=False)
    for k in (100, 500, 1500):
        assert model.predict_total(k, N, 8) == pytest.approx(sum(stages(k).values()), rel=0.02)
    totals = [model.predict_total(k, N, 8) for k in range(1, N, 97)]
    assert totals == sorted(totals)


def test_the_model_follows_a_device_that_slows_down_and_reports_its_error():
    model = fitted()
    assert model.prediction_error is None
    errors = []
    for i in range(20):  # the device gets twice as slow
        k = (100, 700, 1300)[i % 3]
        measured = {s: 2 * v for s, v in stages(k).items()}
        model.observe(k, N, measured, 8)
        error = model.prediction_error
        errors.append(abs(error.last_predicted_ms - error.last_measured_ms) / error.last_measured_ms)
        assert error.last_measured_ms == pytest.approx(sum(measured.values()))
    assert errors[0] == pytest.approx(0.5, abs=0.01)  # predicted at the old speed
    assert max(errors[10:]) < 0.05
    assert model.prediction_error.requests == 20


def test_a_larger_frame_is_predicted_from_two_calibration_sizes():
    """In-LLM, the layers before the prune layer (here a quarter of the prefill) read every frame token: a frame
    of 3 000 tokens after calibrating on 2 000 (and a 1 400-token crop, as ``calibrate`` runs) costs more at the
    same kept count, and the model says so."""
    model = LatencyModel()
    for total, ks in ((N, (100, 500, N)), (N, (100, 500, N)), (1400, (70, 350))):
        for k in ks:
            model.observe(k, total, stages(k, total, split=0.25), 8, track_error=False)
    for k in (150, 600, 3000):
        assert model.predict_total(k, 3000, 8) == pytest.approx(sum(stages(k, 3000, split=0.25).values()), rel=0.02)


def test_one_frame_size_extrapolates_to_a_larger_frame_on_the_safe_side():
    model = LatencyModel()
    for k in (100, 500, N):
        model.observe(k, N, stages(k, split=0.25), 8, track_error=False)
    true = sum(stages(150, 3000, split=0.25).values())
    assert true <= model.predict_total(150, 3000, 8) <= 1.4 * true
    smaller = sum(stages(100, 1000, split=0.25).values())
    assert smaller <= model.predict_total(100, 1000, 8) <= 2 * smaller


def pre_llm_stages(kept: int, total: int = N, new_tokens: int = 8) -> dict[str, float]:
    """Pruned before the LLM with the candidate probe: the probe reads 3x the kept tokens at a quarter of the
    depth, and the prefill only the kept ones."""
    return {**stages(kept, total, new_tokens), "score": 20 + 0.25 * 3 * kept, "prefill": float(kept)}


def test_below_the_in_llm_floor_the_controller_prunes_before_the_llm():
    model = LatencyModel()
    for total, ks in ((N, (100, 500, N)), (1400, (70, 350))):
        for k in ks:
            model.observe(k, total, stages(k, total, split=0.5), 8, prune_stage=IN_LLM, track_error=False)
    for k in (100, 500):
        model.observe(k, N, pre_llm_stages(k), 8, prune_stage=PRE_LLM, track_error=False)
    big = 3000
    floor = sum(stages(150, big, split=0.5).values())  # in-LLM at 5 % of a 3 000-token frame
    assert model.predict_total(150, big, 8, IN_LLM) == pytest.approx(floor, rel=0.03)
    above = choose_keep_ratio(model, floor * 1.3, big, 8, 0.05, 1.0, [IN_LLM, PRE_LLM])
    assert above.feasible and above.prune_stage == IN_LLM and above.tokens > 150 and above.reason is None
    below = choose_keep_ratio(model, floor * 0.8, big, 8, 0.05, 1.0, [IN_LLM, PRE_LLM])
    assert below.feasible and below.prune_stage == PRE_LLM and below.tokens >= 150
    assert "below the in_llm floor" in below.reason and sum(pre_llm_stages(below.tokens, big).values()) <= floor * 0.8
    hopeless = choose_keep_ratio(model, 10.0, big, 8, 0.05, 1.0, [IN_LLM, PRE_LLM])
    assert not hopeless.feasible and hopeless.prune_stage == PRE_LLM and "lowest floor" in hopeless.reason
    assert choose_keep_ratio(model, floor * 0.8, big, 8, 0.05, 1.0, [IN_LLM]).prune_stage == IN_LLM  # no fallback


def test_prediction_needs_observations():
    with pytest.raises(RuntimeError, match="calibrate"):
        LatencyModel().predict(10, N, 8)
    with pytest.raises(ValueError):
        LatencyModel().observe(0, N, stages(1), 8)
    with pytest.raises(RuntimeError, match="pre_llm"):
        fitted().predict(10, N, 8, PRE_LLM)


class Device:
    """The injected clock of ``LawPipeline``: a speed (2: twice as slow), random per-stage jitter, and a factor per
    upcoming run (a busy neighbour: 10 = ten times slower)."""

    def __init__(self, jitter: float = 0.1, seed: int = 0):
        self.speed, self.jitter, self.spikes = 1.0, jitter, []
        self.rng = np.random.default_rng(seed)

    def factor(self) -> float:
        return self.spikes.pop(0) if self.spikes else 1.0


class LawPipeline:
    """Stands in for ``Pipeline`` in the worker: answers at once, with the stage times a cost law gives for its frame
    (one visual token per 1 000 pixels) and kept tokens, as measured on ``device``.  Inside the LLM the layers
    before the prune layer (a quarter of them) read every token; before it a candidate probe reads 3x the kept."""

    reuse = None  # no encode cache: every request encodes its frame

    def __init__(self, device: Device, in_llm: bool):
        self.device, self.in_llm = device, in_llm

    def in_llm_plan(self):
        return object() if self.in_llm else None

    def expected_encode_fraction(self, image):
        return 1.0

    def law(self, total: int, kept: int, new_tokens: int) -> dict[str, float]:
        pruned = kept < total
        llm = 0.25 * total + 0.75 * kept if self.in_llm and pruned else kept
        return {
            "preprocess": 20 + 0.02 * total,
            "encode": 100 + 0.15 * total,
            "score": 20 + 0.25 * 3 * kept if pruned and not self.in_llm else 0.0,
            "select": 5 + 0.005 * total if pruned else 0.0,
            "prefill": 50 + llm,
            "decode": (10 + 0.005 * kept) * (new_tokens - 1),
        }

    def answer(
        self,
        image,
        instruction,
        *,
        keep_ratio=None,
        tokens=None,
        max_new_tokens=4,
        cancel=None,
        on_stage=None,
        on_views=None,
    ):
        from types import SimpleNamespace

        from ptp_ros.result import ViewTokens

        (name, image), *_ = image.items() if isinstance(image, dict) else [("image", image)]  # the node's one camera
        total = image.shape[0] * image.shape[1] // 1000
        kept = min(total, tokens or max(1, round(keep_ratio * total)))
        factor, d = self.device.factor(), self.device
        timings = {
            stage: ms * d.speed * factor * d.rng.uniform(1 - d.jitter, 1 + d.jitter)
            for stage, ms in self.law(total, kept, max_new_tokens).items()
        }
        timings["total"] = sum(timings.values())
        selection = SimpleNamespace(total=total, num_kept=kept, keep_ratio=kept / total)
        result = AnswerResult(
            answer="a cup",
            visual_tokens_total=total,
            visual_tokens_kept=kept,
            keep_ratio=kept / total,
            selector="ptp",
            quotas=(),
            structural_kept=0,
            structural_total=0,
            prompt_tokens=kept,
            prune_layer=None,
            new_tokens=max_new_tokens,
            latency_ms=dict(timings),
        )
        return SimpleNamespace(
            text="a cup",
            selection=selection,
            timings_ms=timings,
            new_tokens=max_new_tokens,
            result=lambda: result,
            views=(ViewTokens(name, kept, total),),
            view_names=(name,),
            encode_reused=0.0,
        )


FRAME = np.zeros((1080, 1920, 3), np.uint8)  # 2 073 tokens under LawPipeline's law


def law_worker(device: Device):
    """A real ``RequestWorker`` (queue, thread, controller, latency model) over ``LawPipeline``s."""
    from ptp_ros.ros.worker import Counters, RequestWorker, Settings

    results: list[dict] = []
    worker = RequestWorker(
        None,
        Settings(mode="budget", max_new_tokens=4, publish_saliency=False, max_frame_age_ms=0.0),
        queue_size=4,
        emit=lambda result: results.append(result.to_json()),
        emit_saliency=lambda *_: None,
        now_ns=lambda: 0,
        counters=Counters(),
    )
    pipelines = {IN_LLM: LawPipeline(device, in_llm=True), PRE_LLM: LawPipeline(device, in_llm=False)}
    worker.pipeline = lambda selector, prune_stage=None: pipelines[prune_stage or IN_LLM]
    return worker, results


def test_budget_mode_predictions_survive_a_noisy_calibration_and_follow_a_drift():
    """Three of ten calibration runs 10x slow (a busy neighbour), then 30 requests with ±10 % jitter on every
    stage, the device twice as slow from the 16th on (the planner's budgets scaled with it, so that the in-LLM
    floor stays within reach): ten requests after the start and after the drift, every prediction is within 25 % of
    what was measured, and /diagnostics says how far off the model is."""
    from ptp_ros.ros.diagnostics import Health, agent_status
    from ptp_ros.ros.worker import calibrate

    device = Device()
    worker, results = law_worker(device)
    # warm-up, then 0.05 0.25 1.0 0.05 0.25 1.0 (main frame), 0.05 0.25 (a crop), 0.05 0.25 (before the LLM)
    device.spikes = [1, 10, 1, 1, 1, 1, 10, 10]
    runs = calibrate(worker, FRAME, [0.05, 0.25, 1.0], max_new_tokens=4)
    assert [r["prune_stage"] for r in runs] == [IN_LLM] * 8 + [PRE_LLM] * 2
    assert {r["visual_tokens"] for r in runs} == {2073, 1166}
    worker.start()
    try:
        errors, stages_run = [], []
        for i in range(30):
            device.speed = 1.0 if i < 15 else 2.0
            budget = (1500, 2000, 2600, 3400)[i % 4] * device.speed
            result = serve(worker, FRAME, results, budget)
            assert result["status"] == "ok" and result["mode"] == "budget", result
            stages_run.append(result["prune_stage"])
            error = worker.latency_model.prediction_error
            assert error.last_measured_ms == pytest.approx(result["latency_ms"]["pipeline"], abs=1e-3)
            errors.append(abs(error.last_predicted_ms - error.last_measured_ms) / error.last_measured_ms)
    finally:
        worker.stop()
    assert stages_run == [IN_LLM] * 30
    assert max(errors[10:15]) < 0.25 and max(errors[25:]) < 0.25, [round(e, 2) for e in errors]
    assert errors[15] > 0.3  # the drift was real: the first request after it was mispredicted
    error = worker.latency_model.prediction_error
    assert error.requests == 20 and error.median_abs_pct < 25
    health = Health("serving", "", "cpu", 0, False, None, 0.1, None, prediction=error)
    values = {kv.key: kv.value for kv in agent_status("agent", health, worker.settings, worker.counters).values}
    assert float(values["latency_model_error_pct"]) == pytest.approx(error.median_abs_pct, rel=1e-5)
    assert float(values["latency_model_last_measured_ms"]) == pytest.approx(error.last_measured_ms, rel=1e-5)
    assert values["latency_model_requests"] == "20"


def test_below_the_in_llm_floor_of_a_larger_frame_the_worker_prunes_before_the_llm():
    """Calibrated on a 2 073-token frame, asked about a 3 110-token one: a budget between the two stages' floors
    runs before the LLM and says why; one above the in-LLM floor stays inside the LLM."""
    from ptp_ros.ros.worker import calibrate

    device = Device(jitter=0.0)
    worker, results = law_worker(device)
    calibrate(worker, FRAME, [0.05, 0.25, 1.0], max_new_tokens=4)
    worker.start()
    big = np.zeros((1080, 2880, 3), np.uint8)
    try:
        serve(worker, big, results, 1e5)  # the first answer on the new frame tells the worker its size
        in_llm, pre_llm = LawPipeline(device, True), LawPipeline(device, False)
        floor = sum(in_llm.law(3110, 156, 4).values())  # at keep_ratio_min 0.05
        assert sum(pre_llm.law(3110, 156, 4).values()) < 0.8 * floor
        below = serve(worker, big, results, 0.9 * floor)
        above = serve(worker, big, results, 1.5 * floor)
    finally:
        worker.stop()
    assert below["prune_stage"] == PRE_LLM and below["budget_feasible"] and below["budget_met"], below
    assert "below the in_llm floor" in below["prune_stage_reason"]
    assert above["prune_stage"] == IN_LLM and "prune_stage_reason" not in above and above["budget_met"], above
    assert above["visual_tokens_kept"] > 156


MS_PER_TOKEN = 1.5  # injected: dominates the tiny model's own (noisy) time at high keep ratios


@pytest.fixture(scope="module")
def slow_worker(tiny_adapter, sample_image):
    from ptp_ros.ros.worker import Counters, RequestWorker, Settings, calibrate

    results: list[dict] = []
    worker = RequestWorker(
        SlowAdapter(tiny_adapter, ms_per_token=MS_PER_TOKEN),
        Settings(mode="budget", max_new_tokens=2),
        queue_size=1,
        emit=lambda result: results.append(result.to_json()),
        emit_saliency=lambda *_: None,
        now_ns=lambda: 0,
        counters=Counters(),
    )
    image = cv2.resize(sample_image, (960, 540), interpolation=cv2.INTER_AREA)
    calibrate(worker, image, [0.05, 0.3, 1.0], max_new_tokens=2, repeats=1)
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
            spread = worker.latency_model.margin_fraction * r["predicted_ms"]  # margin = 1 sigma
            slack = max(0.3 * r["latency_budget_ms"], 3 * spread)
            assert r["latency_ms"]["total"] <= r["latency_budget_ms"] + slack, (r, slack)
    infeasible = served[-1]
    assert not infeasible["budget_feasible"] and not infeasible["budget_met"]
    assert infeasible["keep_ratio"] == pytest.approx(0.05, abs=1 / total)


def test_a_model_that_stops_early_is_predicted_by_what_it_generates_not_by_the_cap():
    """A model that ends its answer after 2 tokens under a cap of 32 is planned for 2 decode steps, so budget mode
    does not charge 30 decode steps that never run; a request that reached the cap keeps the cap."""
    model = LatencyModel()
    assert model.expected_new_tokens(32) == 32  # nothing seen yet: the cap
    for kept in (100, 400, 1000):
        model.observe(kept, 1000, {"prefill": 1.0 * kept, "decode": 50.0}, new_tokens=2)
    assert model.expected_new_tokens(32) == 2
    assert model.predict_total(500, 1000, model.expected_new_tokens(32)) < model.predict_total(500, 1000, 32) - 1000
    model.observe(500, 1000, {"prefill": 500.0, "decode": 50.0 * 31}, new_tokens=32)
    assert model.expected_new_tokens(32) == 32
