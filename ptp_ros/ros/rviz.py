"""What rviz2 shows of the agent: each camera beside its saliency image, with the last answer burnt into the
saliency image's caption (a text needs no TF frame, so it shows whatever the robot's TF tree holds).

``rviz_config`` writes the rviz2 config for a camera set: ``config/ptp_ros.rviz`` is its output for a
one-camera node in the root namespace, and ``launch/agent.launch.py rviz:=true`` writes one for the launched
node's cameras and namespace.  ``python -m ptp_ros.ros.rviz --cameras head wrist --namespace /robot`` prints one.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import cv2
import numpy as np
import yaml

from .frames import SINGLE_CAMERA
from .topics import camera_image, camera_saliency

IMAGE_DISPLAY = "rviz_default_plugins/Image"
IMAGE_TYPE = "sensor_msgs/msg/Image"  # the message type an Image display subscribes to
CAPTION_MAX_CHARS = 120


def answer_caption(bgr: np.ndarray, text: str) -> np.ndarray:
    """``bgr`` with ``text`` (the answer) on a dark band along its bottom edge; same size, a copy."""
    out = bgr.copy()
    height, width = out.shape[:2]
    band = max(14, height // 12)
    scale = band / 40.0
    out[height - band :] = (out[height - band :] * 0.25).astype(out.dtype)
    line = " ".join(text.split())[:CAPTION_MAX_CHARS]
    while len(line) > 3 and cv2.getTextSize(line, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] > width - 8:
        line = line[:-4] + "..."  # the Hershey fonts have no ellipsis
    cv2.putText(out, line, (4, height - band // 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def _absolute(namespace: str, name: str) -> str:
    return "/" + "/".join(part for part in (*namespace.split("/"), *name.split("/")) if part)


def _image_display(name: str, topic: str, reliable: bool) -> dict:
    return {
        "Class": IMAGE_DISPLAY,
        "Enabled": True,
        "Name": name,
        "Normalize Range": True,
        "Topic": {
            "Depth": 2,
            "Durability Policy": "Volatile",
            "History Policy": "Keep Last",
            "Reliability Policy": "Reliable" if reliable else "Best Effort",
            "Value": topic,
        },
        "Value": True,
    }


def rviz_config(cameras: Sequence[str] = (), namespace: str = "/") -> dict:
    """The rviz2 config (as YAML data) of an agent with ``cameras`` (empty: the one camera on ``image``) in
    ``namespace``: per camera its image (best effort, as cameras publish) and its saliency image (``saliency/<name>``,
    with the answer in its caption), side by side."""
    displays = []
    for camera in cameras or [SINGLE_CAMERA]:
        displays.append(_image_display(f"{camera}: camera", _absolute(namespace, camera_image(camera)), False))
        displays.append(_image_display(f"{camera}: saliency", _absolute(namespace, camera_saliency(camera)), True))
    return {
        "Panels": [
            {"Class": "rviz_common/Displays", "Name": "Displays"},
            {"Class": "rviz_common/Views", "Name": "Views"},
        ],
        "Visualization Manager": {
            "Class": "",
            "Displays": displays,
            "Enabled": True,
            "Global Options": {"Background Color": "48; 48; 48", "Fixed Frame": "map", "Frame Rate": 30},
            "Name": "root",
            "Tools": [{"Class": "rviz_default_plugins/MoveCamera"}],
            "Value": True,
            "Views": {"Current": {"Class": "rviz_default_plugins/Orbit", "Name": "Current View"}, "Saved": None},
        },
        "Window Geometry": {"Height": 900, "Width": 1600},
    }


def displayed_topics(config: dict) -> dict[str, str]:
    """Topic → message type of every display of an rviz2 config (what the test holds against the node's graph)."""
    types = {IMAGE_DISPLAY: IMAGE_TYPE}
    return {d["Topic"]["Value"]: types[d["Class"]] for d in config["Visualization Manager"]["Displays"]}


def dump(config: dict) -> str:
    header = "# rviz2 -d this file: each camera of the ptp_ros agent beside its saliency image (the answer in its\n"
    header += "# caption). Written by `python -m ptp_ros.ros.rviz`; `ros2 launch ptp_ros agent.launch.py rviz:=true`\n"
    header += "# writes one for the launched node's cameras and namespace.\n"
    return header + yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print the rviz2 config of a ptp_ros agent's cameras.")
    parser.add_argument("--cameras", nargs="*", default=[], help="the node's cameras parameter (empty: one, 'image')")
    parser.add_argument("--namespace", default="/", help="the node's namespace")
    options = parser.parse_args(args)
    print(dump(rviz_config(options.cameras, options.namespace)), end="")


if __name__ == "__main__":
    main()
