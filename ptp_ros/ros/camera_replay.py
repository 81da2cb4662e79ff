"""A stand-in camera: publishes sensor_msgs/Image frames on 'image' at a fixed rate, cycling through them.

The frames are, by choice:
  (default)          the bundled 1920x1080 sample scene as a short clip (the scene, a slow pan, a mirror);
  --images PATH      your own image, or every image in a folder (sorted by name, not recursive);
  --proxy-scene N    one scene of the proxy task, held still (what the built-in model knows).

    python -m ptp_ros.ros.camera_replay --rate 10 --ros-args -r image:=/camera/image_raw
    python -m ptp_ros.ros.camera_replay --images ~/shots/ --rate 2
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import cv2
import numpy as np
import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from .conversions import array_to_imgmsg

DATA = Path(__file__).resolve().parents[1] / "data"
#: what OpenCV's imread reads in every build
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm"})
MAX_REPLAY_MB = 2048  # decoded frames are held in memory, serialised once


class ReplayError(ValueError):
    """A path that cannot be replayed, with the reason."""


def bundled_frames() -> list[np.ndarray]:
    """The 1920×1080 sample scene as a short clip: the scene, a slow pan across it, and a mirrored view,
    all at full resolution, so consecutive frames differ the way a moving camera's do."""
    scene = cv2.cvtColor(cv2.imread(str(DATA / "sample_scene.jpg")), cv2.COLOR_BGR2RGB)
    height, width = scene.shape[:2]
    pans = []
    for shift in (0.0, 0.05, 0.1):  # zoomed 1.25x, panning right
        crop_w, crop_h = int(width / 1.25), int(height / 1.25)
        x0, y0 = int(shift * width), (height - crop_h) // 2
        pans.append(
            cv2.resize(scene[y0 : y0 + crop_h, x0 : x0 + crop_w], (width, height), interpolation=cv2.INTER_LINEAR)
        )
    return [scene, *pans, np.ascontiguousarray(scene[:, ::-1])]


def proxy_frames(index: int) -> list[np.ndarray]:
    """Test-split scene ``index`` of the proxy task, as a still camera (its ground truth holds only unmoved)."""
    from ..proxy import make_scene, split_seed

    return [make_scene(split_seed("test", index)).image]


def image_files(path: Path) -> list[Path]:
    """``path`` itself, or the images directly in the folder ``path`` in name order (other files skipped)."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ReplayError(f"{path} holds no image ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return files
    if not path.is_file():
        raise ReplayError(f"{path} does not exist")
    return [path]


def image_frames(path: Path, max_mb: float = MAX_REPLAY_MB) -> list[np.ndarray]:
    """RGB frames of the image ``path``, or of every image in the folder ``path``, as 8-bit colour (grey
    and 16-bit images are converted, alpha dropped).  ReplayError names a file that does not decode, or
    says when the frames would take more than ``max_mb`` of memory."""
    frames, total = [], 0
    for file in image_files(path):
        bgr = cv2.imread(str(file), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ReplayError(f"{file} cannot be read as an image")
        total += bgr.nbytes
        if total > max_mb * 2**20:
            raise ReplayError(
                f"the images of {path} take more than {max_mb:g} MB decoded (at {file.name}); "
                "pass fewer or smaller images, or raise --max-memory-mb"
            )
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    return frames


def positive_rate(text: str) -> float:
    rate = float(text)
    if not (math.isfinite(rate) and rate > 0):
        raise argparse.ArgumentTypeError(f"the rate must be a positive number of frames per second, got {text}")
    return rate


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="camera_replay", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=positive_rate, default=10.0, help="frames per second (default 10)")
    parser.add_argument("--frame-id", default="camera")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--images", type=Path, help="an image file, or a folder of images, replayed in a loop")
    source.add_argument("--proxy-scene", type=int, default=-1, help="show this proxy test scene instead")
    parser.add_argument(
        "--max-memory-mb",
        type=float,
        default=MAX_REPLAY_MB,
        help=f"most memory the decoded --images may take (default {MAX_REPLAY_MB})",
    )
    args = parser.parse_args(rclpy.utilities.remove_ros_args(argv)[1:])
    if args.images is not None:
        try:
            frames = image_frames(args.images.expanduser(), args.max_memory_mb)
        except ReplayError as exc:
            parser.exit(2, f"camera_replay: {exc}\n")
    elif args.proxy_scene >= 0:
        frames = proxy_frames(args.proxy_scene)
    else:
        frames = bundled_frames()
    # serialised once: only the header changes from frame to frame
    messages = [array_to_imgmsg(frame, "rgb8") for frame in frames]
    del frames  # the arrays are not needed once serialised: a folder of frames is held once, not twice
    rclpy.init(args=argv)
    node = rclpy.create_node("camera_replay")
    publisher = node.create_publisher(Image, "image", qos_profile_sensor_data)
    count = 0

    def tick() -> None:
        nonlocal count
        msg = messages[count % len(messages)]
        msg.header = Header(stamp=node.get_clock().now().to_msg(), frame_id=args.frame_id)
        publisher.publish(msg)
        count += 1

    node.create_timer(1.0 / args.rate, tick)
    sizes = sorted({f"{m.width}x{m.height}" for m in messages})
    node.get_logger().info(
        f"replaying {len(messages)} frame(s) of {', '.join(sizes)} at {args.rate:g} Hz on {publisher.topic_name}"
    )
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception:
        # rclpy's SIGINT handler shuts the context down; when that lands while spin builds its wait set, rclpy
        # raises RCLError ("the given context is not valid") instead of ExternalShutdownException: the same end
        if rclpy.ok():
            raise
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
