"""Image messages ⇄ numpy: every supported encoding, row padding, big-endian data, bad messages."""

from __future__ import annotations

import sys

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
