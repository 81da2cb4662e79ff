"""Replay a rosbag2 bag to ROS 2 topics at its recorded timing, with /clock, without a ROS install.

Camera frames, instructions, any message type whose Python class is installed here.  rosbag2 has no
wheel; this reads bags with ``rosbags``.  Run the agent with ``use_sim_time`` so that frame ages are
measured on the bag's clock:

    python -m ptp_ros.ros.node --ros-args --params-file config/agent.yaml -p use_sim_time:=true \\
        -r image:=/camera/image_raw
    python -m ptp_ros.ros.bag_replay BAG --topic /camera/image_raw --rate 1.0

BAG is a rosbag2 directory (``metadata.yaml`` plus ``.db3``/``.mcap`` files) or a single ``.mcap`` file.
Messages go out as the bag holds them (serialized CDR, no decoding), at ``--rate`` times the recorded
speed; /clock carries the bag's recording time (the time each message was logged), published with
every message and ``--clock-hz`` times a second in between, like ``ros2 bag play --clock``.
``--ros-args -r /from:=/to`` remaps topics.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROG = "bag_replay"
SENSOR_PACKAGES = ("sensor_msgs", "stereo_msgs")  # published best effort, as cameras do


class ReplayError(Exception):
    """A problem with the bag or the request, told to the user in one line."""


@dataclass
class Track:
    topic: str
    msgtype: str
    count: int
    message_class: Any
    connections: list


def message_class(msgtype: str):
    """The rclpy message class of ``pkg/msg/Name`` (ReplayError when it is not installed here)."""
    parts = msgtype.split("/")
    if len(parts) != 3 or parts[1] != "msg":
        raise ReplayError(f"unsupported message type {msgtype!r}: not a ROS 2 message type (pkg/msg/Name)")
    package, _, name = parts
    try:
        return getattr(importlib.import_module(f"{package}.msg"), name)
    except (ImportError, AttributeError) as exc:
        raise ReplayError(
            f"unsupported message type {msgtype}: no Python message class for it here ({exc}); "
            f"install its interface package, or leave its topic out with --topic"
        ) from None


def open_bag(path: Path):
    """An open rosbags AnyReader on ``path``."""
    try:
        from rosbags.highlevel import AnyReader
    except ImportError:
        raise ReplayError(
            "the rosbags package is not installed: pip install rosbags (or pip install -e .[ros])"
        ) from None
    if not path.exists():
        raise ReplayError(f"no bag at {path}")
    if path.suffix == ".bag":
        raise ReplayError(f"{path} is a ROS 1 bag; convert it first: rosbags-convert --src {path} --dst BAG_DIR")
    if path.is_file() and path.suffix == ".db3":
        path = path.parent  # a sqlite3 bag's data file: the bag is its directory (metadata.yaml)
    if path.is_dir() and not (path / "metadata.yaml").exists():
        raise ReplayError(f"{path} is not a rosbag2 bag: no metadata.yaml in it")
    try:
        reader = AnyReader([path])
        reader.open()
    except Exception as exc:  # noqa: BLE001 - whatever rosbags finds wrong, in one line
        raise ReplayError(f"cannot read the bag {path}: {exc}") from None
    return reader


def select_tracks(reader, topics: list[str] | None) -> tuple[list[Track], list[str]]:
    """The tracks to replay, and warnings for topics left out (unsupported types, when no --topic named
    them).  Named topics must exist and have a replayable type."""
    by_topic: dict[str, list] = {}
    for connection in reader.connections:
        by_topic.setdefault(connection.topic, []).append(connection)

    def describe() -> str:
        return (
            ", ".join(
                f"{t} ({cs[0].msgtype}, {sum(c.msgcount for c in cs)} messages)" for t, cs in sorted(by_topic.items())
            )
            or "no topics"
        )

    if topics:
        unknown = [t for t in topics if t not in by_topic]
        if unknown:
            raise ReplayError(f"topic {', '.join(unknown)} is not in the bag; it has: {describe()}")
    tracks, warnings = [], []
    for topic in topics or sorted(by_topic):
        connections = by_topic[topic]
        msgtype = connections[0].msgtype
        try:
            if {c.msgtype for c in connections} != {msgtype}:
                raise ReplayError(f"unsupported topic {topic}: it holds several message types")
            formats = {getattr(c.ext, "serialization_format", "cdr") for c in connections}
            if formats != {"cdr"}:
                raise ReplayError(f"unsupported serialization {', '.join(sorted(formats))} on {topic} (only cdr)")
            cls = message_class(msgtype)
        except ReplayError as exc:
            if topics:
                raise
            warnings.append(f"skipping {topic}: {exc}")
            continue
        tracks.append(Track(topic, msgtype, sum(c.msgcount for c in connections), cls, connections))
    if not tracks:
        raise ReplayError(f"nothing to replay: no topic of a supported message type; the bag has: {describe()}")
    return tracks, warnings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.splitlines()[0], epilog="Remap topics with --ros-args -r /recorded:=/wanted."
    )
    parser.add_argument("bag", type=Path, help="rosbag2 directory or .mcap file")
    parser.add_argument(
        "--topic",
        action="append",
        dest="topics",
        metavar="TOPIC",
        help="topic to replay (repeatable); default: every topic of an installed message type",
    )
    parser.add_argument("--rate", type=float, default=1.0, help="playback speed, 1.0 = as recorded (default)")
    parser.add_argument(
        "--clock-hz",
        type=float,
        default=40.0,
        help="/clock messages per second between the bag's messages (default 40; 0: only with each message)",
    )
    parser.add_argument("--no-clock", action="store_true", help="do not publish /clock")
    parser.add_argument("--loop", action="store_true", help="start over at the end (the clock jumps back)")
    parser.add_argument(
        "--wait-for-subscribers",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before playing, wait up to this long until every replayed topic has a subscriber "
        "(default 0: play at once; frames sent before discovery completes are lost)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    try:
        import rclpy
    except ImportError:
        sys.exit(f"{PROG}: error: rclpy is not installed (pip install -e .[ros])")
    args = build_parser().parse_args(rclpy.utilities.remove_ros_args(argv)[1:])
    try:
        if not args.rate > 0:
            raise ReplayError(f"--rate must be > 0 (got {args.rate:g})")
        if args.clock_hz < 0:
            raise ReplayError(f"--clock-hz must be >= 0 (got {args.clock_hz:g})")
        reader = open_bag(args.bag)
        try:
            tracks, warnings = select_tracks(reader, list(dict.fromkeys(args.topics or [])) or None)
            if not args.no_clock and any(t.topic == "/clock" for t in tracks):  # ours replaces the recorded one
                warnings.append("skipping the recorded /clock: this replay publishes the bag's time there")
                tracks = [t for t in tracks if t.topic != "/clock"]
                if not tracks:
                    raise ReplayError("nothing to replay but the recorded /clock (use --no-clock to replay it)")
            return _replay(reader, tracks, warnings, args, argv)
        finally:
            reader.close()
    except ReplayError as exc:
        sys.exit(f"{PROG}: error: {exc}")


def _replay(reader, tracks: list[Track], warnings: list[str], args, argv: list[str]) -> int:
    import rclpy
    from rclpy.duration import Duration
    from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from rosgraph_msgs.msg import Clock

    rclpy.init(args=argv)
    node = rclpy.create_node("bag_replay")
    log = node.get_logger()
    for warning in warnings:
        log.warning(warning)
    reliable = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
    publishers = {}
    for track in tracks:
        qos = qos_profile_sensor_data if track.msgtype.split("/")[0] in SENSOR_PACKAGES else reliable
        publisher = node.create_publisher(track.message_class, track.topic, qos)
        for connection in track.connections:
            publishers[connection.id] = publisher
    clock_pub = None if args.no_clock else node.create_publisher(Clock, "/clock", QoSProfile(depth=1))
    connections = [c for t in tracks for c in t.connections]
    played = 0
    try:
        if args.wait_for_subscribers > 0:
            _wait_for_subscribers(node, list(dict.fromkeys(publishers.values())), args.wait_for_subscribers)
        duration_s = reader.duration / 1e9
        log.info(
            f"replaying {sum(t.count for t in tracks)} messages over {duration_s:.2f} s from {args.bag} "
            f"at rate {args.rate:g}: "
            + ", ".join(
                f"{p.topic_name} ({t.msgtype})" for t, p in ((t, publishers[t.connections[0].id]) for t in tracks)
            )
            + ("" if clock_pub is None else f"; /clock at {args.clock_hz:g} Hz")
        )
        started = time.monotonic()
        while True:
            played += _play_once(reader, connections, publishers, clock_pub, args.rate, args.clock_hz)
            if not args.loop:
                break
        for publisher in {*publishers.values(), *([clock_pub] if clock_pub else [])}:
            # reliable topics (and /clock): let subscribers take the last messages before the process ends
            if publisher.qos_profile.reliability == ReliabilityPolicy.RELIABLE:
                publisher.wait_for_all_acked(Duration(seconds=2.0))
        log.info(f"done: {played} messages in {time.monotonic() - started:.2f} s")
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # noqa: BLE001 - a corrupt chunk of the bag: say so in one line
        raise ReplayError(f"replay stopped after {played} messages: {type(exc).__name__}: {exc}") from None
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


def _wait_for_subscribers(node, publishers: list, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while any(p.get_subscription_count() == 0 for p in publishers):
        if time.monotonic() > deadline:
            missing = [p.topic_name for p in publishers if p.get_subscription_count() == 0]
            node.get_logger().warning(f"no subscriber after {timeout_s:g} s on {', '.join(missing)}; playing anyway")
            return
        time.sleep(0.02)


def _play_once(reader, connections: list, publishers: dict, clock_pub, rate: float, clock_hz: float) -> int:
    """One pass over the bag in recorded order; returns the number of messages published."""
    from builtin_interfaces.msg import Time
    from rosgraph_msgs.msg import Clock

    def publish_clock(bag_ns: int) -> None:
        if clock_pub is not None:
            clock_pub.publish(Clock(clock=Time(sec=bag_ns // 1_000_000_000, nanosec=bag_ns % 1_000_000_000)))

    tick_s = 1.0 / clock_hz if clock_hz > 0 else float("inf")
    start_wall, start_bag = time.monotonic(), reader.start_time
    count = 0
    for connection, bag_ns, raw in reader.messages(connections=connections):
        due = start_wall + (bag_ns - start_bag) / 1e9 / rate
        while (left := due - time.monotonic()) > 0:
            if clock_pub is not None and tick_s != float("inf"):
                publish_clock(start_bag + int((time.monotonic() - start_wall) * rate * 1e9))
            time.sleep(min(left, tick_s))
        publish_clock(bag_ns)
        publishers[connection.id].publish(bytes(raw))
        count += 1
    return count


if __name__ == "__main__":
    sys.exit(main())
