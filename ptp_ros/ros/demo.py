"""ptp-demo: the agent, a 10 Hz camera, and a scripted planner, as three processes talking over DDS, as
they would on a robot.

    ptp-demo --out /tmp/ptp_demo_saliency

Uses the built-in default model unless ``--model-path`` is given.  With the built-in proxy model the
camera shows a scene of the proxy task and the planner asks that scene's questions, printing the
expected answer next to the model's (``--scene sample`` replays the bundled 1920×1080 clip instead,
whose questions only a real LVLM answers).  DDS stays on this machine
(ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST) and large frames go through shared memory
(config/fastdds_shm.xml), unless the environment already says otherwise.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import random
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

PACKAGE = "ptp_ros"


def config_file(name: str) -> Path:
    """A file of config/: from the source tree (editable install), else from the installed share folder."""
    candidates = [
        Path(__file__).resolve().parents[2] / "config" / name,
        Path(sysconfig.get_path("data")) / "share" / PACKAGE / "config" / name,
        Path(sys.prefix) / "share" / PACKAGE / "config" / name,
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"config/{name} not found in {', '.join(map(str, candidates))}")


def fastdds_profile_variable() -> str:
    """Fast DDS 3 (kilted on) reads FASTDDS_DEFAULT_PROFILES_FILE; Fast DDS 2 (humble..jazzy, rclpy < 8)
    reads FASTRTPS_DEFAULT_PROFILES_FILE, which Fast DDS 3 still honours but warns about."""
    major = int(importlib.metadata.version("rclpy").split(".")[0])
    return "FASTRTPS_DEFAULT_PROFILES_FILE" if major < 8 else "FASTDDS_DEFAULT_PROFILES_FILE"


def demo_environment() -> dict[str, str]:
    """The caller's environment, completed: localhost-only DDS, the SHM profile, and (unless the caller
    chose one) a domain of the demo's own, so that neither other ROS graphs nor shared-memory ports
    left by killed runs in the default domain get in the way."""
    env = dict(os.environ)
    env.setdefault("ROS_DOMAIN_ID", str(random.randint(100, 230)))
    env.setdefault(fastdds_profile_variable(), str(config_file("fastdds_shm.xml")))
    env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGINT (a ROS node shuts down cleanly on it), then kill after ``timeout``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ptp-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("ptp_demo_saliency"), help="folder for saliency images")
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--rate", type=float, default=10.0, help="camera frames per second")
    parser.add_argument("--model-path", default="", help="checkpoint directory (default: the built-in model)")
    parser.add_argument("--latency-budget-ms", type=float, default=3000.0)
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="longest answer in tokens (default: the node's; the model's end-of-sequence token ends it sooner)",
    )
    parser.add_argument("--agent-log", type=Path, default=None, help="write the agent's log here (default: stderr)")
    parser.add_argument(
        "--scene",
        choices=("auto", "proxy", "sample"),
        default="auto",
        help="auto: a proxy-task scene for the built-in proxy model, the sample clip otherwise",
    )
    parser.add_argument("--proxy-scene", type=int, default=0, help="which proxy test scene")
    args = parser.parse_args(argv)
    proxy = args.scene == "proxy" or (args.scene == "auto" and not args.model_path)  # the built-in model: the proxy
    scene_args = ["--proxy-scene", str(args.proxy_scene)] if proxy else []

    env = demo_environment()
    print(f"ROS_DOMAIN_ID={env['ROS_DOMAIN_ID']}; saliency images go to {args.out}/", flush=True)
    python = sys.executable
    agent_cmd = [
        python,
        "-m",
        "ptp_ros.ros.node",
        "--ros-args",
        "--params-file",
        str(config_file("agent.yaml")),
        "-p",
        f"latency_budget_ms:={args.latency_budget_ms}",
    ]
    if args.max_new_tokens:
        agent_cmd += ["-p", f"max_new_tokens:={args.max_new_tokens}"]
    if args.model_path:
        agent_cmd += ["-p", f"model_path:={args.model_path}"]
    agent_out = open(args.agent_log, "wb") if args.agent_log else None
    started = time.monotonic()
    processes = [
        subprocess.Popen(agent_cmd, env=env, stdout=agent_out, stderr=subprocess.STDOUT if agent_out else None)
    ]
    try:
        processes.append(
            subprocess.Popen(
                [python, "-m", "ptp_ros.ros.camera_replay", "--rate", str(args.rate), *scene_args], env=env
            )
        )
        planner = subprocess.Popen(
            [
                python,
                "-m",
                "ptp_ros.ros.planner",
                "--out",
                str(args.out),
                "--questions",
                str(args.questions),
                *scene_args,
            ],
            env=env,
        )
        processes.append(planner)
        while planner.poll() is None:
            crashed = [p for p in processes[:2] if p.poll() is not None]
            if crashed:
                print(f"{crashed[0].args[2]} exited with {crashed[0].returncode}", file=sys.stderr)
                return 1
            time.sleep(0.5)
        print(f"demo finished in {time.monotonic() - started:.0f} s", flush=True)
        return planner.returncode
    except KeyboardInterrupt:
        return 130
    finally:
        for proc in reversed(processes):
            stop_process(proc)
        if agent_out:
            agent_out.close()


if __name__ == "__main__":
    sys.exit(main())
