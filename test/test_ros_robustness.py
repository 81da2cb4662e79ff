"""Hostile and careless input to the serving loop, without DDS: every request gets exactly one result,
no input ends the inference thread, frames are bounded and fresh, a running request stops promptly.

Each numbered item of the robustness issue has its regression test here or in test_ros_fuzz.py (over DDS).
"""

from __future__ import annotations

import struct
import threading
import time
import zlib

import cv2
import numpy as np
import pytest
from ros_helpers import SlowAdapter

from ptp_ros.overlay import saliency_image
from ptp_ros.pipeline import Cancelled, Pipeline, PipelineConfig
from ptp_ros.ros.requests import Request, RequestError, loggable, parse_request
from ptp_ros.ros.worker import Counters, Frame, RequestWorker, Settings, calibrate, frame_freshness

conversions = pytest.importorskip("ptp_ros.ros.conversions", reason="ROS 2 message packages are not installed")
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402


# -- crafted inputs ------------------------------------------------------------------------------------
def jpeg_claiming(width: int, height: int) -> bytes:
    """A 16x16 JPEG whose SOF0 header claims ``width`` x ``height`` (the issue's 631-byte bomb)."""
    ok, data = cv2.imencode(".jpg", np.zeros((16, 16, 3), np.uint8))
    data = bytearray(data.tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def png_claiming(width: int, height: int) -> bytes:
    """A 16x16 PNG whose IHDR claims ``width`` x ``height`` (CRC fixed, so decoders trust it)."""
    ok, data = cv2.imencode(".png", np.zeros((16, 16, 3), np.uint8))
    data = bytearray(data.tobytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


# -- 1, 8: instruction messages ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "data, reason",
    [
        ('{"a":' + "[" * 1100 + "]" * 1100 + "}", "nested 1101 levels deep"),
        ('{"text":"q","max_new_tokens":' + "9" * 4301 + "}", "a number with 4301 characters"),
        ('{"text":"q","keep_ratio":NaN}', "NaN is not a number"),
        ('{"text":"q","keep_ratio":-Infinity}', "-Infinity is not a number"),
        ('{"text":"q","keep_ratio":1e999}', "keep_ratio must be in"),
        ("x" * 20_000, "the limit is"),
    ],
)
def test_messages_that_killed_the_process_are_refused_with_a_reason(data, reason):
    with pytest.raises(RequestError, match=reason):
        parse_request(data, "d", 2000)


def test_a_byte_order_mark_does_not_turn_json_into_plain_text():
    request = parse_request('\ufeff{"text": "hi", "keep_ratio": 0.5, "max_new_tokens": 3}', "d", 2000)
    assert (request.text, request.keep_ratio, request.max_new_tokens) == ("hi", 0.5, 3)


def test_a_field_name_cannot_forge_a_log_line():
    with pytest.raises(RequestError) as info:
        parse_request('{"text": "q", "x\\n\\u001b[31m[ERROR] [ptp_agent]: forged": 1}', "d", 2000)
    message = str(info.value)
    assert "\n" not in message and "\x1b" not in message and "\\n" in message and "\\x1b" in message
    assert loggable("a\u202eb\rc") == "a\\u202eb\\rc"


# -- 4: resolution caps ----------------------------------------------------------------------------------
@pytest.mark.parametrize("data", [jpeg_claiming(65_500, 65_500), png_claiming(20_000, 20_000)])
def test_a_small_file_claiming_a_huge_image_is_refused_before_decoding(data):
    msg = CompressedImage(format="jpeg", data=data)
    started = time.perf_counter()
    with pytest.raises(conversions.ImageConversionError, match="exceeds max_input_pixels"):
        conversions.check_compressed(msg, max_pixels=4096 * 4096)
    with pytest.raises(conversions.ImageConversionError, match="exceeds max_input_pixels"):
        conversions.compressed_to_rgb(msg, max_pixels=4096 * 4096)
    assert time.perf_counter() - started < 1.0


def test_a_raw_image_over_the_cap_is_refused_from_its_header():
    msg = Image(height=20_000, width=20_000, encoding="rgb8", step=60_000, data=b"\x00" * 16)
    with pytest.raises(conversions.ImageConversionError, match="exceeds max_input_pixels"):
        conversions.check_image(msg, max_pixels=4096 * 4096)


def test_the_saliency_image_is_bounded(tiny_adapter, sample_image):
    big = cv2.resize(sample_image, (3840, 2160), interpolation=cv2.INTER_LINEAR)
    answer = Pipeline(tiny_adapter, PipelineConfig(max_new_tokens=1)).answer(big, "where?", keep_ratio=0.2)
    out = saliency_image(big, answer.visual, answer.selection, max_side=640)
    assert out.shape == (360, 640, 3)
    assert saliency_image(sample_image, answer.visual, answer.selection, max_side=4000).shape == sample_image.shape


# -- 5: freshness ------------------------------------------------------------------------------------------
def frame_at(stamp_ns: int, arrived: float, decode=lambda: np.zeros((64, 64, 3), np.uint8)) -> Frame:
    return Frame(
        stamp_ns=stamp_ns,
        stamp={"sec": stamp_ns // 10**9, "nanosec": stamp_ns % 10**9},
        frame_id="cam",
        header=None,
        decode=decode,
        arrived=arrived,
    )


def test_freshness_judges_plausible_stamps_and_flags_the_rest():
    now_ns, now = 1_800_000_000 * 10**9, 1000.0
    fields, warning, stale = frame_freshness(frame_at(now_ns - 300 * 10**6, now - 0.25), now_ns, now, 1000.0)
    assert (warning, stale) == (None, None) and fields["frame_age_ms"] == pytest.approx(300.0)
    _, warning, stale = frame_freshness(frame_at(now_ns - 5 * 10**9, now - 0.1), now_ns, now, 1000.0)
    assert warning is None and stale.startswith("stale frame: 5000 ms old")
    for stamp, flag in (
        (now_ns + 10**12, "in the future"),
        (1001 * 10**9, "h old"),
        (-5 * 10**9, "h old"),
        (0, "unset"),
    ):
        fields, warning, stale = frame_freshness(frame_at(stamp, now - 0.1), now_ns, now, 1000.0)
        assert flag in warning and stale is None and fields["stamp_warning"] == warning  # judged by arrival
        assert frame_freshness(frame_at(stamp, now - 3.0), now_ns, now, 1000.0)[2] is not None
    assert frame_freshness(frame_at(now_ns - 10**12, now - 999.0), now_ns, now, 0.0)[2] is None  # 0 = never


# -- the serving loop ----------------------------------------------------------------------------------
class Results:
    def __init__(self):
        self.items: list[dict] = []
        self._cond = threading.Condition()

    def __call__(self, result) -> None:
        with self._cond:
            self.items.append(result.to_json())
            self._cond.notify_all()

    def of(self, request_id: str, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not (found := [r for r in self.items if r["id"] == request_id]):
                assert time.monotonic() < deadline, f"no result for {request_id}: {self.items}"
                self._cond.wait(0.1)
        assert len(found) == 1, found
        return found[0]


@pytest.fixture(scope="module")
def served(tiny_adapter, sample_image):
    """A calibrated worker over the tiny model with a slow stage that tests may lengthen."""
    results = Results()
    adapter = SlowAdapter(tiny_adapter)
    worker = RequestWorker(
        adapter,
        Settings(mode="fixed", keep_ratio=0.1, max_new_tokens=1),
        queue_size=2,
        emit=results,
        emit_saliency=lambda *_: None,
        now_ns=time.time_ns,
        counters=Counters(),
    )
    image = cv2.resize(sample_image, (640, 360), interpolation=cv2.INTER_AREA)
    calibrate(worker, image, [0.1, 0.5], max_new_tokens=1)
    worker.start()
    yield worker, adapter, image, results
    worker.stop()


def ask(worker, request_id: str, **fields) -> None:
    worker.submit(Request(id=request_id, text="What is on the table?", **fields), time.monotonic())


def wait_idle(worker, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while (worker.busy or worker.queue_depth) and time.monotonic() < deadline:
        time.sleep(0.02)


def test_a_decoder_crash_is_the_request_s_error_and_the_next_request_is_served(served):
    worker, _, image, results = served

    def bomb():
        cv2.imdecode(np.frombuffer(jpeg_claiming(65_500, 65_500), np.uint8), cv2.IMREAD_UNCHANGED)
        raise AssertionError("cv2 decoded the bomb; the test needs a decoder that raises")

    def raising():
        raise cv2.error("OpenCV(4.x) imgcodecs: Insufficient memory")

    for request_id, decode in (("crash1", raising), ("crash2", bomb)):
        worker.put_frame(frame_at(time.time_ns(), time.monotonic(), decode))
        ask(worker, request_id)
        failed = results.of(request_id)
        assert failed["status"] == "error" and "invalid image" in failed["error"], failed
    worker.put_frame(frame_at(time.time_ns(), time.monotonic(), lambda: image))
    ask(worker, "after-crash")
    assert results.of("after-crash")["status"] == "ok"
    assert worker.health(60.0) is None


def test_an_unforeseen_failure_becomes_an_error_result_and_the_thread_lives_on(served, monkeypatch):
    worker, adapter, image, results = served
    worker.put_frame(frame_at(time.time_ns(), time.monotonic(), lambda: image))
    monkeypatch.setattr(worker, "_choose", lambda *a, **k: 1 / 0)
    ask(worker, "internal")
    failed = results.of("internal")
    assert failed["status"] == "error" and "ZeroDivisionError" in failed["error"]
    monkeypatch.undo()
    worker.put_frame(frame_at(time.time_ns(), time.monotonic(), lambda: image))
    ask(worker, "after-internal")
    assert results.of("after-internal")["status"] == "ok"
    assert worker.counters.internal_errors >= 1


def test_a_stale_frame_gets_a_stale_result(served):
    worker, _, image, results = served
    worker.put_frame(frame_at(time.time_ns() - 60 * 10**9, time.monotonic() - 60, lambda: image))
    ask(worker, "old")
    stale = results.of("old")
    assert stale["status"] == "stale" and "ms old (max_frame_age_ms 1000)" in stale["error"]
    assert stale["frame_age_ms"] >= 60_000
    worker.put_frame(frame_at(time.time_ns() + 10**12, time.monotonic(), lambda: image))
    ask(worker, "future")
    future = results.of("future")
    assert future["status"] == "ok" and "in the future" in future["stamp_warning"]


def test_every_request_in_a_burst_gets_exactly_one_result(served):
    worker, _, image, results = served
    worker.put_frame(frame_at(time.time_ns(), time.monotonic(), lambda: image))
    ids = [f"burst{i}" for i in range(40)]
    for request_id in ids:
        ask(worker, request_id)
    statuses = [results.of(request_id)["status"] for request_id in ids]
    assert set(statuses) <= {"ok", "busy"} and statuses.count("ok") >= 2 and statuses.count("busy") >= 30
    assert len(results.items) == len({r["id"] for r in results.items})  # nothing answered twice


def slow_worker(adapter, image, delay_s: float, calibrated: bool) -> tuple[RequestWorker, Results]:
    results = Results()
    slow = SlowAdapter(adapter, delay_s=delay_s)
    worker = RequestWorker(
        slow,
        Settings(mode="budget", max_new_tokens=1),
        queue_size=4,
        emit=results,
        emit_saliency=lambda *_: None,
        now_ns=time.time_ns,
        counters=Counters(),
    )
    if calibrated:
        calibrate(worker, image, [0.1], max_new_tokens=1)
    worker.start()
    worker.put_frame(frame_at(time.time_ns(), time.monotonic(), lambda: image))
    return worker, results


def test_a_request_whose_budget_expires_in_the_queue_gets_an_expired_result(tiny_adapter, sample_image):
    image = cv2.resize(sample_image, (640, 360), interpolation=cv2.INTER_AREA)
    worker, results = slow_worker(tiny_adapter, image, delay_s=1.0, calibrated=False)  # no prediction yet
    try:
        ask(worker, "long", keep_ratio=0.1)
        ask(worker, "waits", latency_budget_ms=300.0)
        expired = results.of("waits")
        assert expired["status"] == "expired" and "past its 300 ms latency budget" in expired["error"], expired
        assert results.of("long")["status"] == "ok"
        assert worker.counters.results["expired"] == 1
    finally:
        worker.stop()


def test_a_request_that_cannot_start_within_its_budget_is_refused_at_once(tiny_adapter, sample_image):
    image = cv2.resize(sample_image, (640, 360), interpolation=cv2.INTER_AREA)
    worker, results = slow_worker(tiny_adapter, image, delay_s=0.6, calibrated=True)  # knows: >= 0.6 s a request
    try:
        ask(worker, "first", keep_ratio=0.1)
        ask(worker, "second", keep_ratio=0.1)
        ask(worker, "refused", latency_budget_ms=700.0)  # ~1.2 s of work ahead of it
        refused = results.of("refused", timeout=0.5)  # at once, not after the requests ahead
        assert refused["status"] == "busy" and "overloaded" in refused["error"], refused
        assert [results.of(i)["status"] for i in ("first", "second")] == ["ok", "ok"]
        worker.put_frame(frame_at(time.time_ns(), time.monotonic(), lambda: image))
        ask(worker, "fits", latency_budget_ms=60_000.0)
        assert results.of("fits")["status"] == "ok"
    finally:
        worker.stop()


def test_stop_cancels_the_running_request_within_a_second(served):
    worker, adapter, image, results = served
    worker.put_frame(frame_at(time.time_ns(), time.monotonic(), lambda: image))
    wait_idle(worker)
    adapter.delay_s = 30.0
    try:
        ask(worker, "running", keep_ratio=0.1)
        ask(worker, "queued", keep_ratio=0.1)
        deadline = time.monotonic() + 30
        while not worker.busy and time.monotonic() < deadline:
            time.sleep(0.01)
        assert worker.health(0.0).startswith("one request has been running")  # the watchdog's view
        started = time.monotonic()
        worker.stop("deactivated")
        assert time.monotonic() - started < 1.0
        assert results.of("running", 1.0)["status"] == "cancelled"
        assert results.of("queued", 1.0)["status"] == "cancelled"
    finally:
        adapter.delay_s = 0.0
        worker.start()
    assert worker.health(60.0) is None


def test_generate_stops_after_the_current_token_when_cancelled(tiny_adapter, sample_image):
    pipeline = Pipeline(tiny_adapter, PipelineConfig())
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled, match="before encoding"):
        pipeline.answer(sample_image, "hi", keep_ratio=0.1, cancel=cancel)
    prepared = tiny_adapter.prepare(sample_image, "hi")
    visual = tiny_adapter.encode(prepared)
    with pytest.raises(Cancelled, match="after 1 generated token"):
        tiny_adapter.generate(prepared, visual, None, max_new_tokens=1000, cancel=cancel)


def test_a_dead_inference_thread_is_reported(tiny_adapter):
    worker = RequestWorker(
        tiny_adapter,
        Settings(),
        queue_size=1,
        emit=lambda *_: None,
        emit_saliency=lambda *_: None,
        now_ns=time.time_ns,
        counters=Counters(),
    )
    worker.start()
    worker._stop.set()  # the loop ends while the node still accepts requests: what a crash would look like
    worker._thread.join(5)
    assert worker.health(60.0) == "the inference thread is not running"


def test_an_echoed_stop_signal_does_not_kill_the_clean_shutdown(monkeypatch):
    """A non-interactive ``ros2 launch`` delivers Ctrl-C twice within milliseconds: the echo is ignored, a
    later second signal still interrupts a shutdown that hangs."""
    import signal

    from ptp_ros.ros import node as node_module

    saved = {n: signal.getsignal(n) for n in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop = node_module.StopSignal()
        clock = iter([100.0, 100.1, 101.0])
        monkeypatch.setattr(node_module.time, "monotonic", lambda: next(clock))
        stop._handle(signal.SIGINT, None)
        assert stop.event.is_set() and stop.name == "SIGINT"
        stop._handle(signal.SIGINT, None)  # the echo, 0.1 s later
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGINT, None)  # a deliberate second Ctrl-C
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)
