"""A stand-in camera: replays the bundled high-resolution scene (and views derived from it) at a fixed rate,
or holds still on one scene of the proxy task (``--proxy-scene``: what the built-in model knows).

    python -m ptp_ros.ros.camera_replay --rate 10 --ros-args -r image:=/camera/image_raw
"""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=10.0, help="frames per second (default 10)")
    parser.add_argument("--frame-id", default="camera")
    parser.add_argument("--proxy-scene", type=int, default=-1, help="show this proxy test scene instead")
    args = parser.parse_args(rclpy.utilities.remove_ros_args(argv)[1:])
    rclpy.init(args=argv)
    node = rclpy.create_node("camera_replay")
    publisher = node.create_publisher(Image, "image", qos_profile_sensor_data)
    # serialised once: only the header changes from frame to frame
    frames = proxy_frames(args.proxy_scene) if args.proxy_scene >= 0 else bundled_frames()
    messages = [array_to_imgmsg(frame, "rgb8") for frame in frames]
    count = 0

    def tick() -> None:
        nonlocal count
        msg = messages[count % len(messages)]
        msg.header = Header(stamp=node.get_clock().now().to_msg(), frame_id=args.frame_id)
        publisher.publish(msg)
        count += 1

    node.create_timer(1.0 / args.rate, tick)
    node.get_logger().info(
        f"replaying {len(messages)} frames of {messages[0].width}x{messages[0].height} "
        f"at {args.rate:g} Hz on {publisher.topic_name}"
    )
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
