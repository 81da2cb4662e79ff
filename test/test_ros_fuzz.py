"""Property-based fuzzing of the real agent node over DDS: generated instruction messages and camera
frames (deep nesting, huge numbers, odd unicode, lying headers, decompression bombs, raw CDR garbage).

Properties, checked after every generated batch:
- **exactly one result** for every instruction message the node receives (counted in the results, by id
  where the message has one, and against the node's own ``requests_received``);
- **liveness**: the process runs, the watchdog is quiet, no exception reached the safety nets
  (``internal_errors`` stays 0), and a good frame with a plain question is answered afterwards.

Two nodes run the built-in model: one on raw ``image``, one on ``image/compressed``.  The number of
generated examples scales with ``PTP_FUZZ_EXAMPLES`` (default: about 1 200 instruction messages and
1 800 raw and compressed frames a run, 90 s on 2 idle cores; ``PTP_FUZZ_EXAMPLES=2`` for a deeper run).
"""

from __future__ import annotations

import json
import os
import struct
import time
import zlib

import cv2
import numpy as np
import pytest
from ros_helpers import AGENT_PARAMS, NodeProcess, Probe

rclpy = pytest.importorskip("rclpy", reason="ROS 2 rclpy is not installed (pip install -e .[ros])")
hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install -e .[dev])")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ptp_ros.ros.conversions import ENCODINGS  # noqa: E402
from ptp_ros.ros.requests import FIELDS  # noqa: E402

SCALE = float(os.environ.get("PTP_FUZZ_EXAMPLES", "1"))
STARTUP_S = 180.0
PARAMS = AGENT_PARAMS | {"max_frame_age_ms": 0.0, "max_input_pixels": 4096 * 4096}


def fuzz(examples: int):
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


# -- generated instruction messages ---------------------------------------------------------------
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
field_values = {
    "id": st.text(max_size=300) | st.integers() | json_values,
    "text": st.text(max_size=50) | st.text(max_size=3000) | json_values,
    "max_new_tokens": st.integers(-5, 2000) | st.floats() | json_values,
    "latency_budget_ms": st.floats() | st.integers(-10, 10**7) | json_values,
    "keep_ratio": st.floats() | st.integers(-2, 2) | json_values,
    # the node's one camera is "image": unknown names, duplicates, empty lists and names, other types
    "cameras": st.lists(st.sampled_from(["image", "wrist", "", "IMAGE"]) | st.text(max_size=8), max_size=4)
    | json_values,
}
odd_keys = st.text(max_size=20) | st.sampled_from(["keep_raito", "x\n\x1b[31m[ERROR] forged", "\u202etext", "Text"])
request_objects = st.fixed_dictionaries({}, optional={k: v for k, v in field_values.items()}) | st.dictionaries(
    st.sampled_from(FIELDS) | odd_keys, json_values, max_size=6
)


def _json_text(obj, prefix: str, ascii_only: bool) -> str:
    return prefix + json.dumps(obj, ensure_ascii=ascii_only)  # NaN/Infinity included: not JSON, refused


instruction_messages = st.one_of(
    st.text(max_size=200),  # plain text, any unicode
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1990, max_size=2100),  # around max_instruction_chars
    st.builds(_json_text, request_objects, st.sampled_from(["", " ", "\ufeff", "\n\t"]), st.booleans()),
    st.integers(1, 5000).map(lambda n: '{"a":' + "[" * n + "]" * n + "}"),  # deep nesting
    st.integers(1, 5000).map(lambda n: '{"text":"q","max_new_tokens":' + "9" * n + "}"),  # huge integers
    st.integers(1, 400).map(lambda n: '{"text":"q","keep_ratio":0.' + "1" * n + "e-" + "9" * 5 + "}"),
    st.sampled_from(
        [
            '{"text":"q","keep_ratio":NaN}',
            '{"text":"q","latency_budget_ms":Infinity}',
            "{",
            "{}",
            '{"text":"q"}garbage',
            '{"text":"q","text":"r"}',
            "\x00",
            "{\x00}",
        ]
    ),
    st.binary(max_size=200).map(lambda b: b.decode("utf-8", "replace")),
    st.integers(100_000, 400_000).map(lambda n: "{" + "x" * n),  # big messages
)


# -- generated camera frames --------------------------------------------------------------------------
def raw_image(width: int, height: int, encoding: str, step_delta: int, data_len: int | None, big_endian: int):
    from sensor_msgs.msg import Image

    step = max(0, width * 3 + step_delta) % (1 << 32)
    length = data_len if data_len is not None else min(step * height, 4_000_000)
    return Image(width=width, height=height, encoding=encoding, step=step, is_bigendian=big_endian, data=bytes(length))


def _patch_png(data: bytes, width: int, height: int) -> bytes:
    data = bytearray(data)
    at = data.index(b"IHDR")
    data[at + 4 : at + 12] = struct.pack(">II", width, height)
    data[at + 17 : at + 21] = struct.pack(">I", zlib.crc32(bytes(data[at : at + 17])))
    return bytes(data)


def _patch_jpeg(data: bytes, width: int, height: int) -> bytes:
    data = bytearray(data)
    at = data.index(b"\xff\xc0")
    data[at + 5 : at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def compressed_image(kind: str, width: int, height: int, cut: float, fmt: str, noise: bytes):
    from sensor_msgs.msg import CompressedImage

    small = np.full((16, 24, 3), 90, np.uint8)
    if kind == "junk":
        return CompressedImage(format=fmt, data=noise)
    data = cv2.imencode(".png" if kind.startswith("png") else ".jpg", small)[1].tobytes()
    if kind.endswith("claim"):  # a small file whose header claims another size (decompression bomb)
        data = (_patch_png if kind.startswith("png") else _patch_jpeg)(data, width, height)
    if cut < 1.0:
        data = data[: max(0, int(len(data) * cut))]
    return CompressedImage(format=fmt, data=data)


dims = st.integers(0, 70_000) | st.integers(0, 64)
raw_frames = st.builds(
    raw_image,
    dims,
    dims,
    st.sampled_from(list(ENCODINGS)) | st.text(max_size=12),
    st.integers(-8, 64),
    st.none() | st.integers(0, 200_000),
    st.integers(0, 255),
)
compressed_frames = st.builds(
    compressed_image,
    st.sampled_from(["png", "jpeg", "png_claim", "jpeg_claim", "junk"]),
    st.integers(1, 65_535),
    st.integers(1, 65_535),
    st.sampled_from([1.0, 1.0, 0.5, 0.02]),
    st.sampled_from(["jpeg", "png", "rgb8; jpeg compressed bgr8", "16UC1; compressedDepth", ""]) | st.text(max_size=10),
    st.binary(max_size=2000),
)


# -- the nodes ------------------------------------------------------------------------------------------
class Agent:
    """A node process and the probe that talks to it, in a namespace of their own."""

    def __init__(self, ros, log_dir, namespace: str, **params):
        self.fqn = f"/{namespace}/ptp_agent"
        self.process = NodeProcess(
            ros, log_dir / f"{namespace}.log", params={**PARAMS, **params}, namespace=f"/{namespace}"
        )
        self.probe = Probe(namespace=f"/{namespace}")
        self.sent = 0
        self.frames = 0

    def ready(self, pub) -> None:
        deadline = time.monotonic() + STARTUP_S
        self.probe.wait_for(
            lambda: (
                pub.get_subscription_count() > 0
                and self.probe.instruction_pub.get_subscription_count() > 0
                or time.monotonic() > deadline
            ),
            STARTUP_S + 5,
            "the agent",
        )
        assert pub.get_subscription_count() > 0, f"agent never subscribed:\n{self.process.log()[-3000:]}"

    def ask(self, data: str | dict) -> None:
        self.probe.publish(data)
        self.sent += 1

    def check_alive(self) -> dict:
        """The process runs, the watchdog is quiet and no exception reached a safety net."""
        assert self.process.proc.poll() is None, f"the agent exited:\n{self.process.log()[-3000:]}"
        values = self.probe.wait_for(
            lambda: (v := self.probe.diag_values(self.fqn)) and int(v["requests_received"]) >= self.sent and v,
            30,
            "diagnostics",
        )
        assert values["_level"] != b"\x02", values
        assert values["internal_errors"] == "0", (values, self.process.log()[-3000:])
        assert int(values["requests_received"]) == self.sent, values
        return values

    def close(self) -> None:
        self.probe.close()
        assert self.process.stop() == 0, self.process.log()[-3000:]


@pytest.fixture(scope="module")
def raw_agent(ros, tmp_path_factory):
    agent = Agent(ros, tmp_path_factory.mktemp("fuzz"), "fuzz_raw")
    agent.ready(agent.probe.image_pub)
    yield agent
    agent.close()


@pytest.fixture(scope="module")
def compressed_agent(ros, tmp_path_factory):
    agent = Agent(ros, tmp_path_factory.mktemp("fuzz"), "fuzz_jpeg", image_transport="compressed")
    agent.ready(agent.probe.compressed_pub)
    yield agent
    agent.close()


@pytest.fixture(scope="module")
def good_frame(sample_image):
    return cv2.resize(sample_image, (320, 180), interpolation=cv2.INTER_AREA)


def answered_after(agent: Agent, publish_frame, tag: str, timeout: float = 120.0) -> dict:
    """Liveness: a good frame and a plain question get an answer (the frame is re-sent until one is used)."""
    deadline = time.monotonic() + timeout
    attempt = 0
    while time.monotonic() < deadline:
        attempt += 1
        request_id = f"{tag}-live{attempt}"
        publish_frame()
        time.sleep(0.1)
        agent.ask({"id": request_id, "text": "what colour is the square ?"})
        result = agent.probe.wait_for(lambda rid=request_id: agent.probe.result(rid), 60, f"result {request_id}")
        if result["status"] == "ok":
            return result
        time.sleep(0.2)
    raise AssertionError(f"no good answer after fuzzing: {agent.probe.results[-5:]}")


# -- properties -----------------------------------------------------------------------------------------
@fuzz(120)  # each batch waits for up to three model runs (one running, two queued): most of this file's time
@given(batch=st.lists(instruction_messages, min_size=5, max_size=60))
def test_every_generated_instruction_gets_exactly_one_result(raw_agent, good_frame, batch):
    """Counted against every instruction sent so far, without a pause for late extras after each batch: a
    duplicate result that comes late fails the next batch, or the final count in
    test_after_fuzzing_both_nodes_are_alive_and_answer."""
    agent, probe = raw_agent, raw_agent.probe
    if agent.sent == 0:
        probe.send_frame(good_frame, sec=int(time.time()))
    before = len(probe.results)
    for data in batch:
        agent.ask(data)
    results = probe.wait_results(agent.sent, timeout=120, settle_s=0.0)
    assert len(results) == agent.sent, results[before:]
    for result in results[before:]:
        assert result["status"] in ("ok", "busy", "rejected", "error"), result
        assert result["status"] == "ok" or result["error"], result
        assert "internal error" not in result.get("error", ""), result


def publish_and_ask(agent: Agent, pub, frames: list, tag: str) -> None:
    """Publish generated frames, then ask: the request meets the newest one that arrived."""
    for frame in frames:
        pub.publish(frame)
    agent.frames += len(frames)
    request_id = f"{tag}-{agent.sent}"
    agent.ask({"id": request_id, "text": "what is there ?"})
    result = agent.probe.wait_for(lambda: agent.probe.result(request_id), 120, f"result {request_id}")
    assert result["status"] in ("ok", "error", "busy", "rejected"), result  # rejected: e.g. too small
    assert "internal error" not in result.get("error", ""), result


@fuzz(100)
@given(frames=st.lists(raw_frames, min_size=4, max_size=20))
def test_generated_raw_frames_never_stop_the_node(raw_agent, frames):
    publish_and_ask(raw_agent, raw_agent.probe.image_pub, frames, "raw")


@fuzz(100)
@given(frames=st.lists(compressed_frames, min_size=4, max_size=20))
def test_generated_compressed_frames_never_stop_the_node(compressed_agent, frames):
    publish_and_ask(compressed_agent, compressed_agent.probe.compressed_pub, frames, "jpeg")


# -- the reproductions, over DDS (its numbers in brackets) ----------------------------------------
def test_the_messages_that_ended_the_process_are_rejected_with_reasons(raw_agent):  # [1]
    before = len(raw_agent.probe.results)
    raw_agent.ask('{"a":' + "[" * 1100 + "]" * 1100 + "}")
    raw_agent.ask('{"text":"q","max_new_tokens":' + "9" * 4301 + "}")
    results = raw_agent.probe.wait_results(before + 2, 30)[before:]  # in either order: callbacks run in parallel
    assert [r["status"] for r in results] == ["rejected", "rejected"], results
    errors = " | ".join(r["error"] for r in results)
    assert "nested 1101 levels deep" in errors and "4301 characters" in errors, errors
    raw_agent.check_alive()


def test_a_burst_of_200_instructions_gets_200_results_and_overload_shows(raw_agent, good_frame):  # [3], [7]
    probe = raw_agent.probe
    probe.send_frame(good_frame, sec=int(time.time()))
    ids = [f"burst-{i}" for i in range(200)]
    for request_id in ids:
        raw_agent.ask({"id": request_id, "text": "what colour is the square ?"})
    probe.wait_for(lambda: all(probe.result(i) for i in ids), 180, "200 results")
    time.sleep(0.5)
    counts = {i: sum(1 for r in probe.results if r.get("id") == i) for i in ids}
    assert set(counts.values()) == {1}, counts
    statuses = [probe.result(i)["status"] for i in ids]
    assert statuses.count("busy") >= 150 and set(statuses) <= {"ok", "busy"}, statuses
    values = probe.wait_for(
        lambda: (v := probe.diag_values(raw_agent.fqn)) and int(v["requests_busy"]) >= 150 and v, 10, "busy counted"
    )
    assert values["_message"].startswith("overloaded") or "camera" in values["_message"], values


def test_a_decompression_bomb_is_refused_from_its_header_and_the_next_frame_served(compressed_agent, good_frame):  # [2]
    from sensor_msgs.msg import CompressedImage

    probe = compressed_agent.probe
    jpeg = cv2.imencode(".jpg", np.zeros((16, 16, 3), np.uint8))[1].tobytes()
    for i, bomb in enumerate(
        (
            _patch_jpeg(jpeg, 65_500, 65_500),
            _patch_png(cv2.imencode(".png", np.zeros((16, 16, 3), np.uint8))[1].tobytes(), 20_000, 20_000),
        )
    ):
        deadline = time.monotonic() + 60
        while True:  # best-effort frames: resend until the node has it
            probe.compressed_pub.publish(CompressedImage(format="jpeg", data=bomb))
            time.sleep(0.2)
            request_id = f"bomb{i}-{compressed_agent.sent}"
            compressed_agent.ask({"id": request_id, "text": "what is there ?"})
            result = probe.wait_for(lambda rid=request_id: probe.result(rid), 60, request_id)
            if "exceeds max_input_pixels" in result.get("error", "") or time.monotonic() > deadline:
                break
        assert result["status"] == "error" and "exceeds max_input_pixels" in result["error"], result
    ok = cv2.imencode(".jpg", cv2.cvtColor(good_frame, cv2.COLOR_RGB2BGR))[1].tobytes()
    answered_after(
        compressed_agent, lambda: probe.compressed_pub.publish(CompressedImage(format="jpeg", data=ok)), "after-bomb"
    )
    compressed_agent.check_alive()


def test_a_huge_raw_frame_is_refused_without_the_memory_it_claims(raw_agent):  # [4]
    psutil = pytest.importorskip("psutil")
    from sensor_msgs.msg import Image

    node = psutil.Process(raw_agent.process.proc.pid)
    before = node.memory_info().rss
    request_id = f"huge-{raw_agent.sent}"
    raw_agent.probe.image_pub.publish(
        Image(width=20_000, height=20_000, encoding="rgb8", step=60_000, data=bytes(1_000_000))
    )
    time.sleep(0.3)
    raw_agent.ask({"id": request_id, "text": "what is there ?"})
    result = raw_agent.probe.wait_for(lambda: raw_agent.probe.result(request_id), 60, request_id)
    assert result["status"] == "error" and "exceeds max_input_pixels" in result["error"], result
    assert node.memory_info().rss - before < 100e6


def test_a_stale_frame_is_not_answered_and_a_silent_camera_warns(raw_agent, good_frame):  # [5]
    probe = raw_agent.probe
    assert probe.set_parameters(raw_agent.fqn, {"max_frame_age_ms": 400.0})[0].successful
    try:
        probe.send_frame(good_frame, sec=int(time.time()))
        time.sleep(1.5)
        raw_agent.ask({"id": "stale-1", "text": "what colour is the square ?"})
        result = probe.wait_for(lambda: probe.result("stale-1"), 60, "stale-1")
        assert result["status"] == "stale" and "max_frame_age_ms 400" in result["error"], result
        values = probe.wait_for(
            lambda: (
                (v := probe.diag_values(raw_agent.fqn))
                and "no camera frame for" in v["_message"]
                and int(v["requests_stale"]) >= 1
                and v
            ),
            10,
            "the silent-camera warning",
        )
        assert values["_level"] == b"\x01"
    finally:
        assert probe.set_parameters(raw_agent.fqn, {"max_frame_age_ms": 0.0})[0].successful


def test_a_byte_order_mark_keeps_the_request_s_overrides(raw_agent, good_frame):  # [8]
    probe = raw_agent.probe
    probe.send_frame(good_frame, sec=int(time.time()))
    time.sleep(0.3)
    raw_agent.ask('\ufeff{"id": "bom", "text": "what colour is the square ?", "keep_ratio": 0.2}')
    result = probe.wait_for(lambda: probe.result("bom"), 60, "bom")
    if result["status"] == "ok":
        assert result["mode"] == "request" and result["keep_ratio"] == pytest.approx(0.2, abs=0.01), result
    else:  # the frame was lost on the way (best effort): the override was still read
        assert result["status"] != "rejected", result


@fuzz(100)
@given(payload=st.binary(max_size=600), length=st.integers(0, 2**32 - 1))
def test_raw_cdr_garbage_on_every_topic_is_survived(raw_agent, payload, length):
    """Bytes that are not a valid message of the topic's type (lying lengths, invalid UTF-8) are either
    dropped by the middleware or read with replacement characters; neither may hurt the node."""
    probe = raw_agent.probe
    header = b"\x00\x01\x00\x00"
    for pub in (probe.instruction_pub, probe.image_pub):
        pub.publish(header + payload)
        pub.publish(header + struct.pack("<I", length) + payload)


def test_after_fuzzing_both_nodes_are_alive_and_answer(raw_agent, compressed_agent, good_frame):
    # raw CDR garbage that the middleware delivered counts as received instructions: count them in.  The
    # diagnostics (1 Hz) and the results settle on the same count once the node has worked off its backlog:
    # one result for each instruction received, garbage included
    probe = raw_agent.probe

    def settled() -> tuple[int] | None:
        values = probe.diag_values(raw_agent.fqn)
        received = None if values is None else int(values["requests_received"])
        return (received,) if received is not None and received == len(probe.results) else None

    try:
        (delivered,) = probe.wait_for(settled, 90, "as many results as instructions received")
    except TimeoutError:
        raise AssertionError(f"{len(probe.results)} results for {probe.diag_values(raw_agent.fqn)}") from None
    garbage = delivered - raw_agent.sent  # what the middleware delivered of the raw CDR garbage
    assert garbage >= 0
    raw_agent.sent = delivered

    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(good_frame, cv2.COLOR_RGB2BGR))
    from sensor_msgs.msg import CompressedImage

    live = answered_after(raw_agent, lambda: raw_agent.probe.send_frame(good_frame, sec=int(time.time())), "raw")
    assert live["visual_tokens_kept"] > 0
    answered_after(
        compressed_agent,
        lambda: compressed_agent.probe.compressed_pub.publish(CompressedImage(format="jpeg", data=jpeg.tobytes())),
        "jpeg",
    )
    raw_agent.check_alive()
    compressed_agent.check_alive()
    print(
        f"\nfuzzed: {raw_agent.sent} instruction messages ({garbage} of them raw CDR garbage), "
        f"{raw_agent.frames} raw and {compressed_agent.frames} compressed frames; every instruction answered once"
    )
