"""Image messages ⇄ numpy: every supported encoding, row padding, big-endian data, bad messages."""

from __future__ import annotations

import sys
import time
import tracemalloc
import zlib

import cv2
import numpy as np
import pytest

pytest.importorskip("sensor_msgs", reason="ROS 2 message packages are not installed (pip install -e .[ros])")

from sensor_msgs.msg import CompressedImage, Image  # noqa: E402

from ptp_ros.ros import conversions as conv  # noqa: E402

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)


def message(arr: np.ndarray, encoding: str, pad: int = 0, big_endian: bool = False) -> Image:
    """An Image as a foreign driver might send it: optional row padding and byte order."""
    arr = np.ascontiguousarray(arr)
    if arr.dtype.itemsize > 1:
        arr = arr.astype(arr.dtype.newbyteorder(">" if big_endian else "<"))
    rows = arr.reshape(arr.shape[0], -1).view(np.uint8)
    padded = np.concatenate([rows, np.full((arr.shape[0], pad), 0xEE, np.uint8)], axis=1)
    return Image(
        height=arr.shape[0],
        width=arr.shape[1],
        encoding=encoding,
        is_bigendian=int(big_endian),
        step=padded.shape[1],
        data=padded.tobytes(),
    )


@pytest.mark.parametrize(
    "encoding, pixels",
    [
        ("rgb8", RGB),
        ("bgr8", RGB[..., ::-1]),
        ("rgba8", np.dstack([RGB, np.full(RGB.shape[:2], 9, np.uint8)])),
        ("bgra8", np.dstack([RGB[..., ::-1], np.full(RGB.shape[:2], 9, np.uint8)])),
    ],
)
@pytest.mark.parametrize("pad", [0, 3])
def test_colour_encodings_become_the_same_rgb(encoding, pixels, pad):
    assert np.array_equal(conv.image_to_rgb(message(pixels, encoding, pad)), RGB)


@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("pad", [0, 2])
def test_16_bit_images_honour_byte_order_and_padding(big_endian, pad):
    depth = RNG.integers(0, 65535, (4, 6), dtype=np.uint16)
    msg = message(depth, "16UC1", pad, big_endian)
    assert np.array_equal(conv.imgmsg_to_array(msg), depth)
    mono = conv.image_to_rgb(message(depth, "mono16", pad, big_endian))
    assert np.array_equal(mono[..., 0], (depth >> 8).astype(np.uint8)) and mono.shape == (4, 6, 3)


def test_depth_is_stretched_over_its_valid_range():
    depth = np.array([[0, 1000], [1500, 2000]], np.uint16)
    grey = conv.image_to_rgb(message(depth, "16UC1"))[..., 0]
    assert grey.tolist() == [[0, 0], [127, 255]]


def test_mono8_with_padding():
    grey = RNG.integers(0, 256, (3, 5), dtype=np.uint8)
    rgb = conv.image_to_rgb(message(grey, "mono8", pad=3))
    assert np.array_equal(rgb, np.repeat(grey[..., None], 3, axis=2))


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda m: setattr(m, "encoding", "yuv422"), "unsupported encoding"),
        (lambda m: setattr(m, "data", bytes(m.data[:10])), "needs"),
        (lambda m: setattr(m, "step", 3), "step"),
        (lambda m: setattr(m, "height", 0), "empty"),
    ],
)
def test_malformed_messages_say_why(mutate, reason):
    msg = message(RGB, "rgb8")
    mutate(msg)
    with pytest.raises(conv.ImageConversionError, match=reason):
        conv.image_to_rgb(msg)


def test_round_trip_and_bytes_data():
    header = Image().header
    header.frame_id, header.stamp.sec = "cam", 42
    msg = conv.array_to_imgmsg(RGB[..., ::-1], "bgr8", header)
    assert isinstance(msg.data, (bytes, bytearray)) or msg.data.typecode == "B"
    assert (msg.header.frame_id, msg.header.stamp.sec, msg.step) == ("cam", 42, 21)
    assert msg.is_bigendian == int(sys.byteorder == "big")
    assert np.array_equal(conv.image_to_rgb(msg), RGB)
    with pytest.raises(conv.ImageConversionError):
        conv.array_to_imgmsg(RGB, "mono8")


def test_compressed_images():
    big = cv2.resize(RGB, (70, 50), interpolation=cv2.INTER_NEAREST)
    ok, png = cv2.imencode(".png", cv2.cvtColor(big, cv2.COLOR_RGB2BGR))
    assert ok
    assert np.array_equal(conv.compressed_to_rgb(CompressedImage(format="png", data=png.tobytes())), big)
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(big, cv2.COLOR_RGB2BGR))
    decoded = conv.compressed_to_rgb(CompressedImage(format="rgb8; jpeg compressed bgr8", data=jpeg.tobytes()))
    assert decoded.shape == big.shape and np.abs(decoded.astype(int) - big).mean() < 20
    with pytest.raises(conv.ImageConversionError, match="cannot decode"):
        conv.compressed_to_rgb(CompressedImage(format="jpeg", data=b"not a jpeg"))
    with pytest.raises(conv.ImageConversionError, match="no data"):
        conv.compressed_to_rgb(CompressedImage(format="jpeg"))
    with pytest.raises(conv.ImageConversionError, match="compressedDepth"):
        conv.compressed_to_rgb(CompressedImage(format="16UC1; compressedDepth", data=b"x"))


# -- the compressed header: bounded whatever the file holds ------------------------------------------------
hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install -e .[dev])")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SCENE = cv2.resize(RGB, (64, 40), interpolation=cv2.INTER_NEAREST)
JPEG = cv2.imencode(".jpg", SCENE)[1].tobytes()
PNG = cv2.imencode(".png", SCENE)[1].tobytes()
EMPTY_APP2 = b"\xff\xe2\x00\x02"
SOS = JPEG.index(b"\xff\xda")
IDAT = PNG.index(b"IDAT") - 4
FEW, MANY = conv.MAX_HEADER_SEGMENTS - 32, conv.MAX_HEADER_SEGMENTS  # camera files have under 20 before the scan


def png_chunk(kind: bytes, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(4, "big") + kind + payload + zlib.crc32(kind + payload).to_bytes(4, "big")


def jpeg_bomb(segments: int) -> bytes:
    """The issue's bomb: a valid JPEG carrying ``segments`` empty APP2 segments before its frame header."""
    return JPEG[:2] + EMPTY_APP2 * segments + JPEG[2:]


def png_flood(chunks: int) -> bytes:
    return PNG[:IDAT] + png_chunk(b"tEXt", b"k\x00v") * chunks + PNG[IDAT:]


def size_or_refusal(data) -> tuple[int, int] | str:
    try:
        return conv.compressed_size(data)
    except conv.ImageConversionError as exc:
        return str(exc)


@pytest.mark.parametrize("bomb", [jpeg_bomb(3_000_000), png_flood(1_000_000)], ids=["jpeg-12MB", "png-12MB"])
def test_a_segment_flood_is_refused_from_a_few_bytes_without_copying(bomb):
    msg = CompressedImage(format="jpeg", data=bomb)
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(conv.ImageConversionError, match="a flood of"):
        conv.check_compressed(msg, max_pixels=4096 * 4096)
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 100_000, f"{peak} bytes allocated for a {len(bomb)}-byte header check"
    assert elapsed < 1.0, f"{elapsed:.2f} s (Pillow's walk took 9.8 s)"


def test_camera_files_pass_with_their_size():
    assert conv.compressed_size(JPEG) == conv.compressed_size(PNG) == (64, 40)
    icc_split = JPEG[:2] + (b"\xff\xe2\xff\xff" + bytes(65_533)) * 20 + JPEG[2:]  # a 1.3 MB ICC profile
    assert conv.compressed_size(icc_split) == (64, 40)
    assert conv.compressed_size(jpeg_bomb(FEW)) == conv.compressed_size(png_flood(FEW)) == (64, 40)


def test_16_bit_colour_and_12_bit_jpeg_are_refused_from_the_header():
    rgba16 = cv2.imencode(".png", np.zeros((8, 8, 4), np.uint16))[1].tobytes()
    with pytest.raises(conv.ImageConversionError, match="16-bit colour"):
        conv.check_compressed(CompressedImage(format="png", data=rgba16))
    grey16 = cv2.imencode(".png", np.full((8, 8), 0x1234, np.uint16))[1].tobytes()  # decoded as 8-bit grey
    assert np.array_equal(conv.compressed_to_rgb(CompressedImage(format="png", data=grey16)), np.full((8, 8, 3), 0x12))
    sof = JPEG.index(b"\xff\xc0")
    twelve_bit = JPEG[: sof + 4] + b"\x0c" + JPEG[sof + 5 :]
    with pytest.raises(conv.ImageConversionError, match="12-bit"):
        conv.compressed_size(twelve_bit)


def test_a_scan_before_any_frame_header_or_an_early_end_is_refused():
    sof = JPEG.index(b"\xff\xc0")
    sof_length = int.from_bytes(JPEG[sof + 2 : sof + 4], "big")
    for data, reason in [
        (JPEG[:sof] + JPEG[sof + 2 + sof_length :], "scan before any frame header"),
        (JPEG[:2] + b"\xff\xd9", "ends"),
        (JPEG[:SOS], "before its scan"),
        (PNG[:IDAT], "before its image data"),
        (PNG[:8] + PNG[33:], "IHDR"),
        (b"GIF89a" + bytes(20), "not a JPEG or PNG"),
    ]:
        with pytest.raises(conv.ImageConversionError, match=reason):
            conv.compressed_size(data)


jpeg_segments = st.one_of(
    st.builds(
        lambda code, n: bytes([0xFF, code]) + (n + 2).to_bytes(2, "big") + bytes(n),
        st.integers(0xE0, 0xEF) | st.just(0xFE),
        st.integers(0, 40),
    ),  # APPn and COM with payloads
    st.sampled_from([EMPTY_APP2, b"\xff", b"\xff\xd3", b"\xff\x01"]),  # fill byte, RST3, TEM
)
png_chunks = st.builds(
    png_chunk, st.sampled_from([b"tEXt", b"zTXt", b"iTXt", b"gAMA", b"pHYs", b"abCd"]), st.binary(max_size=40)
)
fuzz = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@fuzz
@given(
    segments=st.lists(jpeg_segments, max_size=40) | st.integers(0, 3 * MANY).map(lambda n: [EMPTY_APP2] * n),
    before_scan=st.booleans(),
)
def test_jpeg_segment_floods_are_read_or_refused_by_count(segments, before_scan):
    at = SOS if before_scan else 2
    outcome = size_or_refusal(JPEG[:at] + b"".join(segments) + JPEG[at:])
    if len(segments) <= FEW:
        assert outcome == (64, 40)
    elif len(segments) > MANY:
        assert "a flood of segments" in outcome


@fuzz
@given(chunks=st.lists(png_chunks, max_size=40) | st.integers(0, 3 * MANY).map(lambda n: [png_chunk(b"tEXt")] * n))
def test_png_chunk_floods_are_read_or_refused_by_count(chunks):
    outcome = size_or_refusal(PNG[:IDAT] + b"".join(chunks) + PNG[IDAT:])
    if len(chunks) <= FEW:
        assert outcome == (64, 40)
    elif len(chunks) > MANY:
        assert "a flood of chunks" in outcome


@fuzz
@given(
    base=st.sampled_from([JPEG, PNG, jpeg_bomb(MANY + 1), png_flood(MANY + 1)]),
    cut=st.none() | st.integers(0, 2000),
    patches=st.lists(st.tuples(st.integers(0, 1500), st.binary(min_size=1, max_size=4)), max_size=4),
    tail=st.binary(max_size=64),
)
def test_truncated_and_lying_headers_give_a_size_or_the_module_s_error(base, cut, patches, tail):
    data = bytearray(base if cut is None else base[:cut])
    for at, value in patches:  # bogus lengths, markers and chunk types
        data[at : at + len(value)] = value
    data += tail
    outcome = size_or_refusal(bytes(data))  # anything but ImageConversionError propagates and fails the test
    assert isinstance(outcome, str) or (isinstance(outcome, tuple) and all(0 <= v < 2**32 for v in outcome))
