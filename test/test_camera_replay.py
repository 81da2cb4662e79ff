"""camera_replay replays a user's own image or folder of images, cycling at the given rate, and refuses a path it
cannot replay with one line; its --help, ptp-demo's, the planner's and the proxy frame writer's are whole."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest

pytest.importorskip("rclpy", reason="ROS 2 rclpy is not installed (pip install -e .[ros])")

from ptp_ros.proxy import demo as proxy_demo  # noqa: E402
from ptp_ros.ros import camera_replay, demo, planner  # noqa: E402
from ptp_ros.ros.camera_replay import ReplayError, image_frames  # noqa: E402

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)  # RGB


def write(path, rgb, size=(48, 32)):
    """A solid image of colour ``rgb`` (width, height = ``size``) at ``path``, as a user's file would be."""
    image = np.zeros((size[1], size[0], 3), np.uint8)
    image[:] = rgb[::-1]  # OpenCV writes BGR
    assert cv2.imwrite(str(path), image)
    return path


@pytest.fixture
def folder(tmp_path):
    shots = tmp_path / "shots"
    shots.mkdir()
    write(shots / "b.png", GREEN)
    write(shots / "a.jpg", RED, size=(64, 40))
    write(shots / "c.PNG", BLUE)
    (shots / "notes.txt").write_text("not an image")
    (shots / "sub").mkdir()
    write(shots / "sub" / "d.png", RED)  # not recursive
    return shots


def colour(frame: np.ndarray) -> tuple[int, ...]:
    return tuple(int(round(c)) for c in np.median(frame.reshape(-1, 3), axis=0))


def test_a_folder_is_replayed_in_name_order_as_rgb(folder):
    frames = image_frames(folder)
    assert [f.shape for f in frames] == [(40, 64, 3), (32, 48, 3), (32, 48, 3)]
    assert all(f.dtype == np.uint8 for f in frames)
    got = [colour(f) for f in frames]
    for have, want in zip(got, (RED, GREEN, BLUE)):  # JPEG is lossy: near, not equal
        assert np.abs(np.subtract(have, want)).max() <= 6, got


def test_one_image_and_grey_or_16_bit_images_are_replayed(tmp_path):
    [frame] = image_frames(write(tmp_path / "one.png", BLUE))
    assert colour(frame) == BLUE
    grey16 = tmp_path / "depth.png"
    cv2.imwrite(str(grey16), np.full((20, 30), 65535, np.uint16))
    [frame] = image_frames(grey16)
    assert frame.shape == (20, 30, 3) and frame.dtype == np.uint8 and colour(frame) == (255, 255, 255)


def test_paths_that_cannot_be_replayed_are_refused_with_the_reason(tmp_path, folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no images here")
    broken = folder / "z_broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    for path, reason in (
        (tmp_path / "missing.png", "does not exist"),
        (empty, "holds no image"),
        (folder, "z_broken.png cannot be read as an image"),
    ):
        with pytest.raises(ReplayError, match=reason):
            image_frames(path)
    broken.unlink()
    with pytest.raises(ReplayError, match="more than 0.01 MB decoded"):
        image_frames(folder, max_mb=0.01)  # 64x40x3 + 48x32x3 bytes > 10 KB


def test_the_command_refuses_a_bad_path_or_rate_in_one_line(tmp_path):
    for args, reason in (
        (["--images", str(tmp_path / "nothing")], "camera_replay: " + str(tmp_path / "nothing") + " does not exist"),
        (["--rate", "0"], "the rate must be a positive number"),
        (["--images", str(tmp_path), "--proxy-scene", "1"], "not allowed with argument"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "ptp_ros.ros.camera_replay", *args], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 2 and reason in done.stderr, done.stderr


@pytest.mark.parametrize("module", [camera_replay, demo, planner, proxy_demo])
def test_help_is_whole(module, capsys):
    with pytest.raises(SystemExit) as exit_:
        # the ROS commands take sys.argv as it is (program name first), the others argv without it
        module.main(["prog", "--help"] if module in (camera_replay, planner) else ["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert module.__doc__.strip() in out  # every sentence of the docstring, not its first line cut mid-sentence


def test_a_folder_is_published_in_a_loop_at_the_rate(ros, folder):
    """The replay as a process over DDS: the three images in name order, over and over, near the rate."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    from ptp_ros.ros.conversions import image_to_rgb

    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node("replay_probe", context=context)
    received: list[tuple[float, tuple[int, ...], str]] = []
    cond = threading.Condition()

    def on_image(msg: Image) -> None:
        with cond:
            received.append((time.monotonic(), colour(image_to_rgb(msg)), msg.header.frame_id))
            cond.notify_all()

    node.create_subscription(Image, "image", on_image, qos_profile_sensor_data)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    rate = 10.0
    replay = subprocess.Popen(
        [sys.executable, "-m", "ptp_ros.ros.camera_replay", "--images", str(folder), "--rate", str(rate)],
        env=ros,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        with cond:
            assert cond.wait_for(lambda: len(received) >= 13, timeout=120), f"{len(received)} frames arrived"
            frames = list(received)
    finally:
        replay.terminate()
        log = replay.communicate(timeout=30)[0].decode(errors="replace")
        executor.shutdown()
        spinner.join(5)
        node.destroy_node()
        rclpy.try_shutdown(context=context)
    assert "replaying 3 frame(s) of 48x32, 64x40 at 10 Hz" in log, log
    names = {RED: "a", GREEN: "b", BLUE: "c"}
    order = "".join(next(n for c, n in names.items() if np.abs(np.subtract(c, got)).max() <= 6) for _, got, _ in frames)
    # best effort: a frame may be lost on a loaded machine, but what arrives keeps the cycle a→b→c→a
    follows = sum(b == "abc"[("abc".index(a) + 1) % 3] for a, b in zip(order, order[1:]))
    assert follows >= 0.9 * (len(order) - 1), order
    assert all(frame_id == "camera" for _, _, frame_id in frames)
    span = frames[-1][0] - frames[0][0]
    assert (len(frames) - 1) / span == pytest.approx(rate, rel=0.5)
