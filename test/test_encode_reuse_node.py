"""The node's side of the encode cache: the worker (the node's inference thread) shares one cache between its pipelines,
its results say how much of each frame's encoding was reused, and /diagnostics reports the reuse rate; the settings
that size the cache are checked where they are given."""

from __future__ import annotations

import time

import numpy as np
import pytest


def ask(worker, frame, results, text: str) -> dict:
    """One request on ``frame`` (camera "cam") through the worker's queue and thread; its JSON result."""
    from ptp_ros.ros.requests import Request
    from ptp_ros.ros.worker import Frame

    stamp = {"sec": 0, "nanosec": 0}
    worker.put_frame(Frame(stamp_ns=0, stamp=stamp, frame_id="cam", header=None, decode=lambda: frame))
    before = len(results)
    worker.submit(Request(id=f"r{before}", text=text), time.monotonic())
    deadline = time.monotonic() + 120
    while len(results) == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(results) == before + 1, "no result within 120 s"
    return results[-1]


def test_results_and_diagnostics_report_reuse(tiny_adapter, sample_image):
    """Two questions on one frame, then a frame with one changed corner: the results say 0, 1 and 2 of 3 views
    reused, the worker expects to encode none of a cached frame, and /diagnostics reports the rate over all three."""
    from ptp_ros.ros.diagnostics import Health, agent_status
    from ptp_ros.ros.frames import SINGLE_CAMERA
    from ptp_ros.ros.worker import Counters, RequestWorker, Settings

    results: list[dict] = []
    settings = Settings(mode="fixed", max_new_tokens=2, publish_saliency=False, max_frame_age_ms=0.0)
    worker = RequestWorker(
        tiny_adapter,
        settings,
        queue_size=2,
        emit=lambda result: results.append(result.to_json()),
        emit_saliency=lambda *_: None,
        now_ns=lambda: 0,
        counters=Counters(),
        encode_cache_frames=2,
    )
    frame = np.ascontiguousarray(sample_image[200:536, 600:1272])  # 1×2 tiles and the global view
    changed = frame.copy()
    changed[:100, :100] = 255
    worker.start()
    try:
        answers = [ask(worker, image, results, "what is there?") for image in (frame, frame, changed)]
    finally:
        worker.stop()
    assert [a["status"] for a in answers] == ["ok"] * 3
    assert [a["encode_reused"] for a in answers] == pytest.approx([0.0, 1.0, 1 / 3])
    pipeline = worker.pipeline(settings.selector)
    assert pipeline.reuse is worker.encode_reuse
    assert pipeline.expected_encode_fraction({SINGLE_CAMERA: frame}) == 0.0  # the cache's camera: the node's camera
    assert pipeline.expected_encode_fraction({SINGLE_CAMERA: np.zeros_like(frame)}) == pytest.approx(2 / 3)
    health = Health("serving", "", "cpu", 0, False, None, 0.1, None, encode_reuse=worker.encode_reuse.stats)
    values = {kv.key: kv.value for kv in agent_status("agent", health, settings, worker.counters).values}
    assert float(values["encode_reuse_rate"]) == pytest.approx((0 + 1 + 1 / 3) / 3)
    assert values["encode_frame_hits"] == "1"


@pytest.mark.parametrize(
    ("frames", "threshold", "message"),
    [(-1, 0.0, "encode_cache_frames"), (2.5, 0.0, "encode_cache_frames"), (2, 1.5, "encode_reuse_threshold")],
)
def test_cache_settings_out_of_range_are_refused(frames, threshold, message):
    from ptp_ros.pipeline import PipelineConfig

    with pytest.raises(ValueError, match=message):
        PipelineConfig(encode_cache_frames=frames, encode_reuse_threshold=threshold)


def test_the_benchmarks_camera_sequences_are_what_they_say():
    """``ptp-bench --sequence``'s frames: a still camera changes by sensor noise only, and the moving object crosses
    from one tile column to the other, asked about by the same colour question."""
    from ptp_ros_bench.sequence import NOISE, sequence

    still, moved = sequence("still", 0, 2), sequence("moved", 0, 2)
    difference = np.abs(still[1][0].astype(float) - still[0][0].astype(float))
    assert 0 < difference.mean() < 2 * NOISE
    width = moved[0][0].shape[1]
    (first, _), (last, _) = moved[0][2], moved[-1][2]
    assert (first < width / 2) != (last < width / 2)  # from one half (tile column) to the other
    assert moved[0][1].text == moved[-1][1].text and moved[0][1].qtype == "colour"
