"""ptp_ros: an ament_python ROS 2 package that is also a pip-installable library."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "ptp_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    description="Pyramid Token Pruning for high-resolution vision-language models, as a library, CLI and ROS 2 node",
    # bench/ ships as ptp_ros_bench so that ptp-bench / ptp-eval work after a plain pip install
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"])
    + [f"ptp_ros_bench{p[5:]}" for p in find_packages(include=["bench", "bench.*"])],
    package_dir={"ptp_ros_bench": "bench"},
    package_data={PACKAGE: ["data/*", "models/**/*"]},
    include_package_data=True,
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml") + glob("config/*.xml") + glob("config/*.rviz")),
    ],
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4,<3",  # the local CPU wheel 2.13.0 satisfies this; install it first (README)
        "transformers==5.23.0",  # the 5.x line the adapters are tested against
        "tokenizers>=0.22",
        "safetensors>=0.5",
        "huggingface-hub>=1.0",
        "numpy>=1.24",
        "pillow>=10",
        "opencv-python-headless>=4.10,<5",
    ],
    extras_require={
        "ros": [
            "ros-kilted-rclpy[fastrtps]==9.1.2",
            "ros-kilted-sensor-msgs==5.5.1",
            "ros-kilted-std-msgs==5.5.1",
            "ros-kilted-diagnostic-msgs==5.5.1",
            "rosbags>=0.11,<0.12",  # bag_replay and the bag tests: rosbag2 has no wheel
            "osrf-pycommon>=2.0",  # ros2/launch needs it (test_ros_launch runs the vendored launch)
            # to build ptp_ros_interfaces (the Ask action): bash ptp_ros_interfaces/install.sh
            "ros-kilted-action-msgs==2.3.0",
            "ros-kilted-ament-cmake==2.7.3",
            "ros-kilted-ament-cmake-include-directories==2.7.3",
            "ros-kilted-ament-cmake-ros-core==0.14.5",
            "ros-kilted-ament-index-python==1.11.0",
            "ros-kilted-ament-package==0.17.2",
            "ros-kilted-rosidl-core-generators==0.3.1",
            "ros-kilted-rosidl-default-generators==1.7.1",
            "ros-kilted-rosidl-default-runtime==1.7.1",
        ],
        "bench": ["matplotlib>=3.7", "psutil>=5.9"],
        # what lmms-eval 0.7.3's CLI imports on the `--model ptp_ros` path; lmms-eval itself goes in with --no-deps
        # (its declared deps would replace torch): bash bench/lmms/install.sh installs both
        "eval": [
            "accelerate>=0.29.1",
            "datasets>=2.19",
            "evaluate>=0.4",
            "loguru>=0.7",
            "sacrebleu>=1.5",
            "tenacity>=8.3",
            "pytz",
            "pytablewriter>=1.2",
            "filelock>=3.16,<4",
        ],  # lmms-eval patches filelock._api.FileLockMeta, gone in filelock 4
        "test": ["pytest>=8"],  # colcon test runs pytest because of this entry
        # colcon builds and tests both packages as on a robot (CI, test/test_colcon.py); colcon-core wants setuptools<80
        "dev": [
            "pytest>=8",
            "hypothesis>=6.100",
            "pytest-xdist>=3.5",  # .ci/run: two workers, one per core; ROS tests wait on timers and other processes
            "matplotlib>=3.7",
            "psutil>=5.9",
            "colcon-core>=0.17",
            "colcon-ros>=0.5",
            "colcon-bash>=0.5",
            "colcon-package-selection>=0.2",
            "colcon-test-result>=0.3",
            "ruff==0.17.5",  # the linter and formatter .ci/run checks (ruff.toml)
        ],
    },
    zip_safe=False,
    maintainer="ptp_ros developers",
    maintainer_email="dev@ptp-ros.invalid",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "ptp-ask = ptp_ros.cli:ask_main",
            "ptp-demo = ptp_ros.ros.demo:main",
            "agent = ptp_ros.ros.node:main",
            "bag_replay = ptp_ros.ros.bag_replay:main",
            "camera_replay = ptp_ros.ros.camera_replay:main",
            "planner = ptp_ros.ros.planner:main",
            "ptp-bench = ptp_ros_bench.cli:main",
            "ptp-eval = ptp_ros_bench.accuracy:main",
        ],
        # lmms-eval >= 0.7 finds external models here: `lmms-eval --model ptp_ros` (ptp_ros/integrations/lmms.py)
        "lmms_eval.models": ["ptp_ros = ptp_ros.integrations.lmms_manifest:manifest"],
    },
)
