"""The node's cameras and their newest frames: which camera names a node has, and the set of frames a request
meets.

A camera keeps its newest frames only (``history`` of them: one on a one-camera node, a few on a node with
several, so that a request spanning cameras can find frames taken within ``sync_tolerance_ms`` of each other
when the cameras run at different rates).  Frames stay undecoded until a request takes them.  Free of rclpy.
"""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: The camera of a node whose ``cameras`` parameter is empty: its topic is ``image``, as before cameras had names.
SINGLE_CAMERA = "image"
MAX_CAMERAS = 16
SYNC_HISTORY = 4  # frames kept per camera on a node with several: ~130 ms of a 30 Hz camera
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,62}")  # one ROS topic token: <name>/image and saliency/<name>


@dataclass
class Frame:
    """A camera frame, kept undecoded until a request needs it."""

    stamp_ns: int
    stamp: dict  # {"sec", "nanosec"}
    frame_id: str
    header: Any  # the message header, copied onto the saliency image
    decode: Callable[[], np.ndarray]  # → RGB uint8; raises for a malformed frame
    error: str | None = None  # set when the metadata check already failed on arrival
    arrived: float = field(default_factory=time.monotonic)  # when the message arrived
    used: bool = False
    camera: str = SINGLE_CAMERA


def camera_problems(cameras: Sequence[str], default_cameras: Sequence[str]) -> list[str]:
    """Why the ``cameras`` and ``default_cameras`` parameters are unusable (empty when fine)."""
    out = [
        f"camera name {name!r} is not a topic name token (a letter, then letters, digits or _; at most 63)"
        for name in cameras
        if not _NAME.fullmatch(name)
    ]
    if len(cameras) > MAX_CAMERAS:
        out.append(f"at most {MAX_CAMERAS} cameras, got {len(cameras)}")
    for names, what in ((cameras, "cameras"), (default_cameras, "default_cameras")):
        if len(set(names)) != len(names):
            out.append(f"{what} names a camera twice: {list(names)}")
    known = list(cameras) or [SINGLE_CAMERA]
    if unknown := [name for name in default_cameras if name not in known]:
        out.append(f"default_cameras {unknown} are not among the cameras {known}")
    return out


@dataclass(frozen=True)
class Pick:
    """The frames a request meets, by camera in the request's order; or why there are none."""

    frames: dict[str, Frame]
    missing: tuple[str, ...] = ()  # cameras that sent no frame yet
    spread_ms: float | None = None  # set when no set of frames lies within the tolerance: the newest frames' spread


class FrameStore:
    """The newest frames of each camera, shared between the intake (``put``) and the inference thread (``take``)."""

    def __init__(self, cameras: Sequence[str], history: int = 1):
        self._frames = {name: deque(maxlen=history) for name in cameras}
        self._lock = threading.Lock()

    def put(self, frame: Frame) -> bool:
        """Keep ``frame`` as its camera's newest; True when that pushed out a frame no request used."""
        with self._lock:
            kept = self._frames[frame.camera]
            dropped = len(kept) == kept.maxlen and not kept[0].used
            kept.append(frame)
        return dropped

    def take(self, cameras: Sequence[str], tolerance_ms: float) -> Pick:
        """The frames for a request on ``cameras``: one camera's newest; for several, the newest set whose
        times lie within ``tolerance_ms`` of each other (by stamp, or by arrival where a stamp is unset).
        The frames taken are marked used."""
        with self._lock:
            kept = {name: list(self._frames[name]) for name in cameras}
            if missing := tuple(name for name, frames in kept.items() if not frames):
                return Pick({}, missing=missing)
            chosen = _newest_set(kept, tolerance_ms)
            if chosen is None:
                newest = [frames[-1] for frames in kept.values()]
                return Pick({}, spread_ms=_spread_ms(newest))
            for frame in chosen.values():
                frame.used = True
            return Pick(chosen)

    def clear(self) -> None:
        with self._lock:
            for frames in self._frames.values():
                frames.clear()


def _time_ns(frame: Frame, by_stamp: bool) -> int:
    return frame.stamp_ns if by_stamp else int(frame.arrived * 1e9)


def _spread_ms(frames: Sequence[Frame], by_stamp: bool | None = None) -> float:
    if by_stamp is None:
        by_stamp = all(f.stamp_ns for f in frames)
    times = [_time_ns(f, by_stamp) for f in frames]
    return (max(times) - min(times)) / 1e6


def _newest_set(kept: dict[str, list[Frame]], tolerance_ms: float) -> dict[str, Frame] | None:
    """Anchored on each kept frame, newest first: every other camera's frame nearest to it in time; the first set
    within the tolerance."""
    if len(kept) == 1:
        return {name: frames[-1] for name, frames in kept.items()}
    by_stamp = all(f.stamp_ns for frames in kept.values() for f in frames)
    anchors = sorted(
        ((name, f) for name, frames in kept.items() for f in frames), key=lambda a: -_time_ns(a[1], by_stamp)
    )
    for anchor_camera, anchor in anchors:
        at = _time_ns(anchor, by_stamp)
        chosen = {
            name: anchor
            if name == anchor_camera
            else min(frames, key=lambda f: (abs(_time_ns(f, by_stamp) - at), -_time_ns(f, by_stamp)))
            for name, frames in kept.items()
        }
        if _spread_ms(list(chosen.values()), by_stamp) <= tolerance_ms:
            return chosen
    return None
