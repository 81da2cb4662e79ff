"""sensor_msgs images ⇄ numpy, without PyPI's broken cv-bridge.

The ROS distro's ``cv_bridge`` (the compiled one that ships with apt ROS 2) decodes the buffer when it
is installed; otherwise a small numpy decoder does, honouring ``step`` row padding and
``is_bigendian``.  Either way the pixels then go through the same colour conversion to RGB, so the
model sees the same image on a robot and in CI.  Outgoing images are built with ``bytes`` data:
assigning a numpy array to ``msg.data`` copies element by element (~0.7 s for one 1080p frame).
"""

from __future__ import annotations

import importlib
import sys

import cv2
import numpy as np
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


#: What ``compressed_to_rgb`` decodes: the formats image_transport's ``compressed`` plugin writes (an MPO,
#: the multi-picture JPEG some cameras write, is a JPEG whose first picture is decoded).
COMPRESSED_FORMATS = ("JPEG", "PNG")
#: Markers a JPEG may have before its scan, chunks a PNG may have before its image data.  Camera files have
#: under twenty (an ICC profile split over APP2 segments included); a flood of empty ones is refused after
#: this many instead of being walked, here or by the decoder (libjpeg took 23 s over 3 million).
MAX_HEADER_SEGMENTS = 256
JPEG_SOI = b"\xff\xd8"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# frame headers that carry the size: SOF0-15 but DHT (C4), JPG (C8) and DAC (CC)
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_NO_LENGTH = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and RST0-7 stand alone
_JPEG_SOS, _JPEG_EOI, _JPEG_FILL = 0xDA, 0xD9, 0xFF
_PNG_GREY = 0  # IHDR colour type whose 16-bit samples the decoder turns into 8-bit grey


def compressed_size(data) -> tuple[int, int]:
    """(width, height) a JPEG/PNG declares, read from its header without decoding or copying ``data``.

    Time and memory are bounded by ``MAX_HEADER_SEGMENTS`` whatever the size of ``data``: the walk reads a
    few bytes per marker or chunk and stops at the JPEG's scan (the size is its first frame header's) or at
    the PNG's first image data (the size is IHDR's, the first chunk by the spec).  Sample depths the decoder
    would turn into something other than 8-bit grey or colour are refused here, before a pixel is decoded:
    12-bit JPEGs and 16-bit colour PNGs (a 4096² RGBA16 PNG decodes to 128 MB).  Raises ImageConversionError.
    """
    view = memoryview(data).cast("B")
    if view[:2] == JPEG_SOI:
        return _jpeg_size(view)
    if view[:8] == PNG_SIGNATURE:
        return _png_size(view)
    raise ImageConversionError(f"cannot decode {len(view)} bytes: not a JPEG or PNG image")


def _jpeg_size(view: memoryview) -> tuple[int, int]:
    size, pos, end = None, 2, len(view)
    for _ in range(MAX_HEADER_SEGMENTS):
        if pos + 2 > end:
            raise ImageConversionError(f"JPEG of {end} bytes ends at byte {pos}, before its scan")
        if view[pos] != 0xFF:
            raise ImageConversionError(f"JPEG: no marker at byte {pos} (0x{view[pos]:02x})")
        code = view[pos + 1]
        if code == _JPEG_FILL:  # fill bytes may precede a marker; each counts towards the limit
            pos += 1
            continue
        pos += 2
        if code in _JPEG_NO_LENGTH:
            continue
        if code == _JPEG_EOI:
            raise ImageConversionError("JPEG ends (EOI) before its scan")
        if pos + 2 > end:
            raise ImageConversionError(f"JPEG of {end} bytes ends inside the marker at byte {pos - 2}")
        length = int.from_bytes(view[pos : pos + 2], "big")
        if length < 2 or pos + length > end:
            raise ImageConversionError(f"JPEG: segment 0x{code:02x} at byte {pos - 2} has a bogus length {length}")
        if code in _JPEG_SOF and size is None:
            if length < 8:
                raise ImageConversionError(f"JPEG: frame header of {length} bytes is truncated")
            if (precision := view[pos + 2]) != 8:
                raise ImageConversionError(f"JPEG with {precision}-bit samples; only 8-bit JPEGs are decoded")
            size = int.from_bytes(view[pos + 5 : pos + 7], "big"), int.from_bytes(view[pos + 3 : pos + 5], "big")
        if code == _JPEG_SOS:
            if size is None:
                raise ImageConversionError("JPEG: scan before any frame header (SOF)")
            return size
        pos += length
    raise ImageConversionError(
        f"JPEG with more than {MAX_HEADER_SEGMENTS} markers before its scan: refused (a flood of segments)"
    )


def _png_size(view: memoryview) -> tuple[int, int]:
    end = len(view)
    if end < 33 or view[12:16] != b"IHDR" or int.from_bytes(view[8:12], "big") != 13:
        raise ImageConversionError("PNG without an IHDR chunk first (truncated or not a PNG)")
    width, height = int.from_bytes(view[16:20], "big"), int.from_bytes(view[20:24], "big")
    if view[24] == 16 and view[25] != _PNG_GREY:
        raise ImageConversionError("PNG with 16-bit colour samples; send 8-bit colour or 16-bit grey")
    pos = 33  # after the signature and IHDR
    for _ in range(MAX_HEADER_SEGMENTS):
        if pos + 8 > end:
            raise ImageConversionError(f"PNG of {end} bytes ends at byte {pos}, before its image data (IDAT)")
        if view[pos + 4 : pos + 8] == b"IDAT":
            return width, height
        pos += 12 + int.from_bytes(view[pos : pos + 4], "big")  # length, type, data, CRC
    raise ImageConversionError(
        f"PNG with more than {MAX_HEADER_SEGMENTS} chunks before its image data: refused (a flood of chunks)"
    )


def check_compressed(msg: CompressedImage, max_pixels: int | None = None) -> None:
    """Cheap check done when a frame arrives: data present, a colour format, and a declared size within
    ``max_pixels`` (so a small file claiming 65 500 x 65 500 px is refused before it is decoded)."""
    if len(msg.data) == 0:
        raise ImageConversionError("compressed image has no data")
    if "compresseddepth" in msg.format.lower().replace(" ", ""):
        raise ImageConversionError(
            f"format {msg.format[:64]!r} (compressedDepth) is not supported; send a colour image"
        )
    check_size(*compressed_size(msg.data), max_pixels)


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
