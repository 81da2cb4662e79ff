"""Bags: camera frames recorded over DDS into a rosbag2 bag with ``rosbags`` (rosbag2 has no wheel), and
replayed with ``python -m ptp_ros.ros.bag_replay`` at the recorded timing, with /clock, to the agent node
running on ``use_sim_time``.  Answers must carry the stamp of a recorded frame and count its age on the
bag's clock.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest
from ros_helpers import BagRecorder, NodeProcess, Probe, read_bag

rclpy = pytest.importorskip("rclpy", reason="ROS 2 rclpy is not installed (pip install -e .[ros])")
pytest.importorskip("rosbags", reason="rosbags is not installed (pip install -e .[ros])")

RAW, COMPRESSED = "/bag_cam/image_raw", "/bag_cam/image_raw/compressed"
FRAMES = 20  # per topic, at 10 Hz: a 2 s bag
PERIOD_S = 0.1
STARTUP_S = 180.0  # model load + calibration on a busy 2-core box
ANSWER_S = 120.0


def replay(bag, *args: str, env, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ptp_ros.ros.bag_replay", str(bag), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def frame(sample_image):
    return cv2.resize(sample_image, (640, 360), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def bag(ros, tmp_path_factory, frame):
    """20 raw and 20 JPEG frames of a 10 Hz camera, recorded as they arrive over DDS.  Returns the bag's
    path and the header stamps sent, per topic."""
    from sensor_msgs.msg import CompressedImage, Image
    from std_msgs.msg import Header

    from ptp_ros.ros.conversions import array_to_imgmsg

    path = tmp_path_factory.mktemp("bags") / "camera_bag"
    recorder = BagRecorder(path, {RAW: Image, COMPRESSED: CompressedImage})
    camera = Probe()  # a camera node in this process: publishes best effort, as drivers do
    raw_pub = camera.node.create_publisher(Image, RAW, rclpy.qos.qos_profile_sensor_data)
    jpeg_pub = camera.node.create_publisher(CompressedImage, COMPRESSED, rclpy.qos.qos_profile_sensor_data)
    sent = {RAW: [], COMPRESSED: []}
    try:
        camera.wait_for(
            lambda: raw_pub.get_subscription_count() and jpeg_pub.get_subscription_count(), 30, "the recorder"
        )
        time.sleep(0.5)  # both ends matched: let discovery settle before the first frame
        jpeg = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))[1].tobytes()
        start = time.monotonic()
        for i in range(FRAMES):
            time.sleep(max(0.0, start + i * PERIOD_S - time.monotonic()))
            stamp = camera.node.get_clock().now().to_msg()  # a camera stamps with its own (wall) clock
            view = frame if i % 2 == 0 else np.ascontiguousarray(frame[:, ::-1])
            raw = array_to_imgmsg(view, "rgb8", Header(stamp=stamp, frame_id="bag_camera"))
            raw_pub.publish(raw)
            jpeg_pub.publish(
                CompressedImage(header=Header(stamp=stamp, frame_id="bag_camera"), format="jpeg", data=jpeg)
            )
            sent[RAW].append((stamp.sec, stamp.nanosec))
            sent[COMPRESSED].append((stamp.sec, stamp.nanosec))
        camera.wait_for(lambda: min(recorder.counts.values()) >= FRAMES, 5, "the recorder to get every frame")
    except TimeoutError:
        pass  # best effort: a lost frame is not recorded, the test below says how many were
    finally:
        camera.close()
        recorder.close()
    return path, sent


def stamps_in(messages, topic: str) -> list[tuple[int, int]]:
    from rclpy.serialization import deserialize_message
    from sensor_msgs.msg import CompressedImage, Image

    cls = Image if topic == RAW else CompressedImage
    return [
        ((m := deserialize_message(raw, cls)).header.stamp.sec, m.header.stamp.nanosec)
        for t, _, _, raw in messages
        if t == topic
    ]


def test_the_bag_holds_the_recorded_raw_and_compressed_frames(bag, frame):
    from rclpy.serialization import deserialize_message
    from sensor_msgs.msg import CompressedImage, Image

    from ptp_ros.ros.conversions import compressed_to_rgb, image_to_rgb

    path, sent = bag
    assert (path / "metadata.yaml").exists()
    messages = read_bag(path)
    assert {(t, msgtype) for t, msgtype, _, _ in messages} == {
        (RAW, "sensor_msgs/msg/Image"),
        (COMPRESSED, "sensor_msgs/msg/CompressedImage"),
    }
    for topic in (RAW, COMPRESSED):
        recorded = stamps_in(messages, topic)
        assert len(recorded) >= FRAMES - 1, f"{topic}: {len(recorded)} of {FRAMES} frames recorded"
        assert set(recorded) <= set(sent[topic]) and recorded == sorted(recorded)
    log_times = [t for _, _, t, _ in messages]
    assert log_times == sorted(log_times)
    raw_times = [t for topic, _, t, _ in messages if topic == RAW]
    assert (raw_times[-1] - raw_times[0]) / 1e9 == pytest.approx(PERIOD_S * (len(raw_times) - 1), abs=0.15)
    first_raw = deserialize_message(next(m for t, _, _, m in messages if t == RAW), Image)
    assert np.array_equal(image_to_rgb(first_raw, 1 << 24), frame)
    first_jpeg = deserialize_message(next(m for t, _, _, m in messages if t == COMPRESSED), CompressedImage)
    assert first_jpeg.format == "jpeg"
    assert np.abs(compressed_to_rgb(first_jpeg, 1 << 24).astype(int) - frame).mean() < 8  # JPEG, lossy


def test_replay_errors_are_one_clear_line(ros, bag, tmp_path):
    from rosbags.rosbag2 import Writer
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    path, _ = bag
    store = get_typestore(Stores.ROS2_KILTED)
    store.register(get_types_from_msg("float64 mass", "ptp_test_nowhere_msgs/msg/Blob"))
    odd = tmp_path / "odd_bag"
    with Writer(odd, version=9) as writer:
        connection = writer.add_connection("/blob", "ptp_test_nowhere_msgs/msg/Blob", typestore=store)
        blob = store.types["ptp_test_nowhere_msgs/msg/Blob"](mass=1.5)
        writer.write(connection, 1_000, store.serialize_cdr(blob, "ptp_test_nowhere_msgs/msg/Blob"))
    (tmp_path / "not_a_bag").mkdir()
    cases = {
        "missing bag": ((tmp_path / "nowhere",), f"no bag at {tmp_path / 'nowhere'}"),
        "not a bag": ((tmp_path / "not_a_bag",), "is not a rosbag2 bag: no metadata.yaml"),
        "unknown topic": (
            (path, "--topic", "/elsewhere"),
            f"topic /elsewhere is not in the bag; it has: {RAW} (sensor_msgs/msg/Image, ",
        ),
        "unsupported type": ((odd, "--topic", "/blob"), "unsupported message type ptp_test_nowhere_msgs/msg/Blob"),
        "nothing replayable": ((odd,), "nothing to replay: no topic of a supported message type"),
        "bad rate": ((path, "--rate", "0"), "--rate must be > 0"),
    }
    for case, (args, message) in cases.items():
        done = replay(args[0], *map(str, args[1:]), env=ros)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1, f"{case}: rc {done.returncode}, stderr {done.stderr!r}"
        assert lines[0].startswith("bag_replay: error: ") and message in lines[0], f"{case}: {lines[0]}"


def test_replay_keeps_the_recorded_timing_and_publishes_the_bag_clock(ros, bag):
    """At --rate 2 the frames come twice as fast as recorded, and /clock runs on the bag's time."""
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import Image

    path, _ = bag
    recorded = [(t, raw) for topic, _, t, raw in read_bag(path) if topic == RAW]
    listener = Probe(namespace="/timing")
    arrivals, clocks, lock = [], [], threading.Lock()

    def on_image(msg):
        with lock:
            arrivals.append((time.monotonic(), (msg.header.stamp.sec, msg.header.stamp.nanosec)))

    def on_clock(msg):
        with lock:
            clocks.append((time.monotonic(), msg.clock.sec * 1_000_000_000 + msg.clock.nanosec))

    listener.node.create_subscription(Image, RAW, on_image, rclpy.qos.qos_profile_sensor_data)
    listener.node.create_subscription(Clock, "/clock", on_clock, 10)
    try:
        done = replay(path, "--topic", RAW, "--rate", "2.0", "--wait-for-subscribers", "30", env=ros)
        assert done.returncode == 0, done.stderr
        time.sleep(0.3)
    finally:
        listener.close()
    assert f"done: {len(recorded)} messages" in done.stderr
    assert len(arrivals) >= len(recorded) - 1, f"{len(arrivals)} of {len(recorded)} frames arrived"
    # the spacing of the frames: the recorded one, halved
    (first_t, first_stamp), (last_t, last_stamp) = arrivals[0], arrivals[-1]
    stamps = [s for _, s in arrivals]
    recorded_stamps = stamps_in([(RAW, "", t, raw) for t, raw in recorded], RAW)
    recorded_span = recorded[recorded_stamps.index(last_stamp)][0] - recorded[recorded_stamps.index(first_stamp)][0]
    assert last_t - first_t == pytest.approx(recorded_span / 1e9 / 2, abs=0.15), (arrivals, recorded_span)
    assert stamps == sorted(stamps) and set(stamps) <= set(recorded_stamps)
    # the clock: the bag's log times, monotonic, ending at the last message's, about 40 Hz of wall time
    bag_times = [t for _, t in clocks]
    assert bag_times == sorted(bag_times)
    assert bag_times[0] >= recorded[0][0] - 1 and bag_times[-1] == recorded[-1][0]
    assert len(clocks) >= 0.5 * 40 * recorded_span / 1e9 / 2
    for wall, bag_ns in clocks[1:]:  # bag time advances at twice the wall time
        assert (bag_ns - clocks[0][1]) / 1e9 == pytest.approx(2 * (wall - clocks[0][0]), abs=0.25)


@pytest.mark.parametrize("transport", ["raw", "compressed"])
def test_the_node_answers_from_a_replayed_bag_on_the_bag_clock(ros, bag, tmp_path, transport):
    """The node runs on use_sim_time; the bag (recorded a while ago) is replayed at its recorded rate with
    /clock.  The answer carries the stamp of a recorded frame, and the frame counts as fresh on the bag's
    clock although its stamp is seconds old on the wall clock."""
    path, sent = bag
    topic = RAW if transport == "raw" else COMPRESSED
    ns = f"/bag_{transport}"
    node = NodeProcess(
        ros,
        tmp_path / "agent.log",
        node_name="ptp_agent",
        namespace=ns,
        remaps={"image": RAW},
        params={
            "use_sim_time": True,
            "image_transport": transport,
            "mode": "fixed",
            "keep_ratio": 0.1,
            "max_new_tokens": 2,
            "calibration_keep_ratios": [0.1],
            "max_frame_age_ms": 1000.0,
        },
    )
    probe = Probe(namespace=ns)
    asked: list[str] = []
    try:
        # with use_sim_time the node's timers (diagnostics) wait for /clock: readiness is its camera subscription
        try:
            probe.wait_for(lambda: probe.node.count_subscribers(topic) > 0, STARTUP_S, f"the agent on {topic}")
        except TimeoutError:
            pytest.fail(f"the agent never subscribed to {topic}:\n{node.log()[-3000:]}")
        assert probe.get_parameter(f"{ns}/ptp_agent", "use_sim_time") is True
        probe.wait_for(lambda: probe.instruction_pub.get_subscription_count() > 0, 30, "the agent's instructions")
        player = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ptp_ros.ros.bag_replay",
                str(path),
                "--topic",
                topic,
                "--rate",
                "1.0",
                "--wait-for-subscribers",
                "30",
            ],
            env=ros,
            stderr=subprocess.PIPE,
            text=True,
        )
        # ask while the bag plays (the first questions may come before its first frame: "no frame yet")
        while player.poll() is None and not probe.count("ok"):
            asked.append(f"bag-{transport}-{len(asked)}")
            probe.ask(id=asked[-1], text="What is on the table?")
            time.sleep(0.25)
        _, replay_log = player.communicate(timeout=60)
        assert player.returncode == 0, replay_log
        results = probe.wait_for(
            lambda: all(probe.result(r) for r in asked) and [probe.result(r) for r in asked],
            ANSWER_S,
            "a result for every question",
        )
        answered = [r for r in results if r["status"] == "ok"]
        assert answered, f"no answer while the bag played: {results}\n{replay_log}\n{node.log()[-3000:]}"
        result = answered[0]
        stamp = (result["stamp"]["sec"], result["stamp"]["nanosec"])
        wall_age_s = time.time() - (stamp[0] + stamp[1] / 1e9)
        saliency = probe.wait_for(
            lambda: [m for m in probe.saliency if (m.header.stamp.sec, m.header.stamp.nanosec) == stamp],
            30,
            "the saliency image of the answer",
        )
    finally:
        probe.close()
        code = node.stop()
    assert code == 0, node.log()[-3000:]
    assert stamp in sent[topic] and stamp in stamps_in(read_bag(path), topic)  # a recorded frame's stamp
    assert result["frame_id"] == "bag_camera" and saliency[0].header.frame_id == "bag_camera"
    # fresh on the bag's clock (/clock carries the recording times) ...
    assert abs(result["frame_age_ms"]) < 500 and "stamp_warning" not in result, result
    # ... though on the wall clock the frame is older than max_frame_age_ms: without sim time it were stale
    assert wall_age_s > 1.0
