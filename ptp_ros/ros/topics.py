"""The agent's topics as its peers see them: names, QoS and the name of its diagnostics status.

One place for both sides, the node and the clients that talk to it (``client.py``), without importing the
node (which loads the model stack: torch, transformers)."""

from __future__ import annotations

from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

# relative to the node's namespace, so `-r`/`__ns` remapping works; /diagnostics is global by convention
IMAGE = "image"
INSTRUCTION = "instruction"
RESULT = "result"
ANSWER = "answer"
SALIENCY = "saliency"
DIAGNOSTICS = "/diagnostics"
STATUS_SUFFIX = ": ptp agent"  # the node's diagnostics status is named "<node's full name>: ptp agent"
CAMERA_STATUS = ": ptp camera "  # and each camera's "<node's full name>: ptp camera <camera>"
COMPRESSED = "compressed"  # image_transport's naming: the compressed stream of <image> is <image>/compressed


def reliable(depth: int) -> QoSProfile:
    """Reliable keep-last ``depth``: the instruction and result topics (and the action's services) hold a burst
    of ``depth`` messages on both ends, unanswered by none."""
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=ReliabilityPolicy.RELIABLE)


RELIABLE = reliable(10)  # /diagnostics and the saliency images: a planner wants the newest, not a backlog


def status_name(node_fqn: str) -> str:
    """The name of the diagnostics status the node ``node_fqn`` publishes."""
    return node_fqn + STATUS_SUFFIX


def camera_status_name(node_fqn: str, camera: str) -> str:
    """The name of the diagnostics status of ``camera`` on the node ``node_fqn``."""
    return node_fqn + CAMERA_STATUS + camera


def camera_image(camera: str, transport: str = "raw") -> str:
    """The image topic of ``camera`` (``frames.SINGLE_CAMERA``: plain ``image``, as before cameras had names)."""
    base = IMAGE if camera == IMAGE else f"{camera}/{IMAGE}"
    return base if transport == "raw" else f"{base}/{COMPRESSED}"


def camera_saliency(camera: str) -> str:
    """The saliency topic of ``camera``: ``saliency/<camera>``, with the header of the camera's frame."""
    return f"{SALIENCY}/{camera}"
