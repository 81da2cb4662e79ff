"""sensor_msgs images ⇄ numpy, without PyPI's broken cv-bridge.

The ROS distro's ``cv_bridge`` (the compiled one that ships with apt ROS 2) decodes the buffer when it
is installed; otherwise a small numpy decoder does, honouring ``step`` row padding and
``is_bigendian``.  Either way the pixels then go through the same colour conversion to RGB, so the
model sees the same image on a robot and in CI.  Outgoing images are built with ``bytes`` data:
assigning a numpy array to ``msg.data`` copies element by element (~0.7 s for one 1080p frame).
"""

from __future__ import annotations

import importlib
import io
import sys

import cv2
import numpy as np
from PIL import Image as PILImage
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

# encoding → (numpy dtype of one channel, channels)
ENCODINGS: dict[str, tuple[str, int]] = {
    "rgb8": ("u1", 3),
    "bgr8": ("u1", 3),
    "rgba8": ("u1", 4),
    "bgra8": ("u1", 4),
    "mono8": ("u1", 1),
    "8UC1": ("u1", 1),
    "8UC3": ("u1", 3),
    "mono16": ("u2", 1),
    "16UC1": ("u2", 1),
}
_TO_RGB = {
    "bgr8": cv2.COLOR_BGR2RGB,
    "8UC3": cv2.COLOR_BGR2RGB,
    "rgba8": cv2.COLOR_RGBA2RGB,
    "bgra8": cv2.COLOR_BGRA2RGB,
}


class ImageConversionError(ValueError):
    """A message that cannot be turned into an RGB image; the text says why."""


def _distro_cv_bridge():
    """The ROS 2 distro's CvBridge, or None.  PyPI's ``cv-bridge`` (a ROS 1 port that lacks the compiled
    ``cv_bridge.boost`` module) is deliberately not used: it mangles 16UC1, padding and endianness."""
    try:
        importlib.import_module("cv_bridge.boost.cv_bridge_boost")
        return importlib.import_module("cv_bridge").CvBridge()
    except Exception:  # noqa: BLE001 - absent or broken: fall back to the numpy decoder
        return None


_BRIDGE = _distro_cv_bridge()
BACKEND = "cv_bridge" if _BRIDGE is not None else "numpy"


def check_size(width: int, height: int, max_pixels: int | None) -> None:
    """Refuse an image whose declared size exceeds ``max_pixels``, before anything is allocated for it."""
    if width <= 0 or height <= 0:
        raise ImageConversionError(f"empty image ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageConversionError(
            f"image of {width}x{height} px ({width * height} px) exceeds max_input_pixels {max_pixels}"
        )


def check_image(msg: Image, max_pixels: int | None = None) -> None:
    """Cheap metadata check (no pixel copy), done when a frame arrives."""
    if msg.encoding not in ENCODINGS:
        raise ImageConversionError(f"unsupported encoding {msg.encoding[:64]!r}; supported: {', '.join(ENCODINGS)}")
    check_size(msg.width, msg.height, max_pixels)
    base, channels = ENCODINGS[msg.encoding]
    row = msg.width * channels * np.dtype(base).itemsize
    if msg.step < row:
        raise ImageConversionError(
            f"step {msg.step} is smaller than a {msg.encoding} row of {msg.width} px ({row} bytes)"
        )
    if len(msg.data) < msg.step * msg.height:
        raise ImageConversionError(
            f"data has {len(msg.data)} bytes; step {msg.step} x height {msg.height} needs {msg.step * msg.height}"
        )


def imgmsg_to_array(msg: Image, max_pixels: int | None = None) -> np.ndarray:
    """The message's pixels as an [H, W] or [H, W, C] native-endian array (no colour change)."""
    check_image(msg, max_pixels)
    if _BRIDGE is not None:
        return np.asarray(_BRIDGE.imgmsg_to_cv2(msg, desired_encoding="passthrough"))
    base, channels = ENCODINGS[msg.encoding]
    dtype = np.dtype(base).newbyteorder(">" if msg.is_bigendian else "<")
    row = msg.width * channels * dtype.itemsize
    buf = np.frombuffer(msg.data, dtype=np.uint8, count=msg.step * msg.height).reshape(msg.height, msg.step)
    if msg.step != row:
        buf = buf[:, :row]
    arr = np.ascontiguousarray(buf).view(dtype)
    arr = arr.reshape((msg.height, msg.width) if channels == 1 else (msg.height, msg.width, channels))
    return arr if dtype.isnative or dtype.itemsize == 1 else arr.astype(dtype.newbyteorder("="))


def to_rgb8(arr: np.ndarray, encoding: str) -> np.ndarray:
    """An RGB uint8 image from pixels in ``encoding``.

    16-bit images are shown to the model as 8-bit grey: ``mono16`` keeps its high byte, ``16UC1``
    (depth in mm) is stretched over its valid (non-zero) range, so near and far stay distinguishable.
    """
    if encoding in ("mono16", "16UC1"):
        if encoding == "mono16":
            arr = (arr >> 8).astype(np.uint8)
        else:
            valid = arr[arr > 0]
            lo, hi = (int(valid.min()), int(valid.max())) if valid.size else (0, 1)
            scaled = (arr.astype(np.float32) - lo) * (255.0 / max(hi - lo, 1))
            arr = np.where(arr > 0, np.clip(scaled, 0, 255), 0).astype(np.uint8)
    if arr.ndim == 2:
        return cv2.cvtColor(arr, cv2.COLOR_GRAY2RGB)
    if encoding in _TO_RGB:
        return cv2.cvtColor(arr, _TO_RGB[encoding])
    return np.ascontiguousarray(arr)


def image_to_rgb(msg: Image, max_pixels: int | None = None) -> np.ndarray:
    return to_rgb8(imgmsg_to_array(msg, max_pixels), msg.encoding)


#: What ``compressed_to_rgb`` decodes: the formats image_transport's ``compressed`` plugin writes.
COMPRESSED_FORMATS = ("JPEG", "MPO", "PNG")  # MPO: a multi-picture JPEG, as some cameras write


def compressed_size(data: bytes) -> tuple[int, int]:
    """(width, height) a JPEG/PNG declares in its header, read without decoding a pixel."""
    try:
        with PILImage.open(io.BytesIO(data)) as header:
            kind, size = header.format, header.size
    except PILImage.DecompressionBombError as exc:  # Pillow's own cap, far above any max_input_pixels
        raise ImageConversionError(f"image exceeds max_input_pixels: {exc}") from None
    except PILImage.UnidentifiedImageError:
        raise ImageConversionError(f"cannot decode {len(data)} bytes: not a JPEG or PNG image") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for a broken header; all mean "unusable"
        raise ImageConversionError(
            f"cannot decode {len(data)} bytes: broken header ({type(exc).__name__}: {exc})"
        ) from None
    if kind not in COMPRESSED_FORMATS:
        raise ImageConversionError(f"compressed image is {kind}; supported: {', '.join(COMPRESSED_FORMATS)}")
    return size


def check_compressed(msg: CompressedImage, max_pixels: int | None = None) -> None:
    """Cheap check done when a frame arrives: data present, a colour format, and a declared size within
    ``max_pixels`` (so a small file claiming 65 500 x 65 500 px is refused before it is decoded)."""
    if len(msg.data) == 0:
        raise ImageConversionError("compressed image has no data")
    if "compresseddepth" in msg.format.lower().replace(" ", ""):
        raise ImageConversionError(
            f"format {msg.format[:64]!r} (compressedDepth) is not supported; send a colour image"
        )
    check_size(*compressed_size(bytes(msg.data)), max_pixels)


def compressed_to_rgb(msg: CompressedImage, max_pixels: int | None = None) -> np.ndarray:
    """Decode a JPEG/PNG ``CompressedImage`` (image_transport's ``compressed``) to RGB."""
    check_compressed(msg, max_pixels)
    try:
        decoded = cv2.imdecode(np.frombuffer(msg.data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise ImageConversionError(f"cannot decode {len(msg.data)} bytes: {exc}") from None
    if decoded is None:
        raise ImageConversionError(f"cannot decode {len(msg.data)} bytes of format {msg.format[:64]!r}")
    check_size(decoded.shape[1], decoded.shape[0], max_pixels)
    channels = 1 if decoded.ndim == 2 else decoded.shape[2]
    if decoded.dtype == np.uint16 and channels == 1:
        return to_rgb8(decoded, "mono16")
    encoding = {(np.uint8, 1): "mono8", (np.uint8, 3): "bgr8", (np.uint8, 4): "bgra8"}.get(
        (decoded.dtype.type, channels)
    )
    if encoding is None:
        raise ImageConversionError(
            f"decoded image is {decoded.dtype} with {channels} channels; expected 8-bit grey/colour"
        )
    return to_rgb8(decoded, encoding)


def array_to_imgmsg(arr: np.ndarray, encoding: str, header: Header | None = None) -> Image:
    """An ``Image`` of ``arr`` (uint8/uint16 in ``encoding``), data set as bytes."""
    if encoding not in ENCODINGS:
        raise ImageConversionError(f"unsupported encoding {encoding!r}")
    base, channels = ENCODINGS[encoding]
    arr = np.ascontiguousarray(arr)
    expected = (arr.shape[0], arr.shape[1]) if channels == 1 else (arr.shape[0], arr.shape[1], channels)
    if arr.dtype != np.dtype(base) or arr.shape != expected:
        raise ImageConversionError(f"array {arr.dtype} {arr.shape} does not match encoding {encoding}")
    msg = Image()
    if header is not None:
        msg.header = header
    msg.height, msg.width = int(arr.shape[0]), int(arr.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = int(sys.byteorder == "big")
    msg.step = int(arr.strides[0])
    msg.data = arr.tobytes()
    return msg
