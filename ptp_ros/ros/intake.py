"""The camera intake: frames reach the agent on an executor and a thread of their own.

The agent's executor is multi-threaded because some of its callbacks block for seconds (configure loads the
model, an action goal waits for its answer).  Frames taken there pay rclpy's MultiThreadedExecutor per
message (a wait set rebuilt in Python, a hand-off to a pool thread, the GIL shared with the pool) and, under
load, most 4K frames were lost before the node took them.  Here a hidden internal node, ``_<agent>_intake``
in the agent's namespace and context, holds the camera subscriptions (one per camera) alone and a
SingleThreadedExecutor spins it on its own thread.  Its callbacks only check the header and store the frame
(decoding waits for a request, on the inference thread), and nothing else runs there, so frames and the
agent's diagnostics, parameters and results never wait for each other.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data


class CameraIntake:
    """The camera subscriptions, on the intake thread; ``on_error`` gets what escapes a callback."""

    def __init__(self, agent: Node, on_error: Callable[[Exception], None]):
        # global arguments are the agent's (-r __node:=..., -r image:=...): the topic comes resolved by the agent
        self.node = rclpy.create_node(
            f"_{agent.get_name()}_intake",
            namespace=agent.get_namespace(),
            context=agent.context,
            use_global_arguments=False,
            start_parameter_services=False,
            enable_rosout=False,
        )
        self.subscriptions: list = []
        self._on_error = on_error
        self._executor = SingleThreadedExecutor(context=agent.context)
        self._executor.add_node(self.node)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._spin, name="ptp-intake", daemon=True)
        self._thread.start()

    def subscribe(self, msg_type, topic: str, callback: Callable) -> None:
        """Also take ``msg_type`` frames from the fully resolved ``topic`` (best effort, sensor-data QoS)."""
        self.subscriptions.append(self.node.create_subscription(msg_type, topic, callback, qos_profile_sensor_data))

    def unsubscribe(self) -> None:
        """Drop every camera subscription."""
        while self.subscriptions:
            self.node.destroy_subscription(self.subscriptions.pop())

    def close(self) -> None:
        self._closed.set()
        self._executor.shutdown(timeout_sec=1.0)
        self._thread.join(2.0)
        self.unsubscribe()
        self.node.destroy_node()

    def _spin(self) -> None:
        """Spin until closed or rclpy shuts down; an exception that escapes a callback is reported, not fatal."""
        while not self._closed.is_set() and self.node.context.ok():
            try:
                self._executor.spin_once()  # no timeout: a frame, close() or rclpy's shutdown wakes it
            except ExternalShutdownException:
                return
            except Exception as exc:  # noqa: BLE001 - no frame may end the intake
                self._on_error(exc)
