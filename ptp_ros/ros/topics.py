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


def reliable(depth: int) -> QoSProfile:
    """Reliable keep-last ``depth``: the instruction and result topics (and the action's services) hold a burst
    of ``depth`` messages on both ends, unanswered by none."""
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=ReliabilityPolicy.RELIABLE)


RELIABLE = reliable(10)  # /diagnostics and the saliency images: a planner wants the newest, not a backlog


def status_name(node_fqn: str) -> str:
    """The name of the diagnostics status the node ``node_fqn`` publishes."""
    return node_fqn + STATUS_SUFFIX
