"""Start the ptp_ros agent:  ros2 launch ptp_ros agent.launch.py image_topic:=/camera/color/image_raw

Several cameras, one model:  ros2 launch ptp_ros agent.launch.py "cameras:=[head, wrist]" rviz:=true

Only wiring: every argument becomes a node parameter, a remapping or the node's environment, so the
same node runs without launch as  python -m ptp_ros.ros.node --ros-args --params-file config/agent.yaml
(docs/ros.md).  A lifecycle node: with autostart:=true (default) it walks itself to active, with
autostart:=false it waits unconfigured for a lifecycle manager.
"""

import os
import tempfile
from typing import List  # noqa: UP035 - launch_ros documents value_type=List[str], older distros compare to it

import yaml
from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
from launch.actions import DeclareLaunchArgument, LogInfo, OpaqueFunction, SetEnvironmentVariable
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node
from launch_ros.parameter_descriptions import ParameterValue

from launch import LaunchDescription


def check_files(context, *args, **kwargs) -> list:
    """Refuse to start on a params_file or fastdds_profile that is not a file.  launch_ros would skip a
    missing parameter file with a warning and Fast DDS a missing profile with an error line, and the node
    would then run on its defaults (or with frames silently lost), ignoring what the user asked for."""
    for name in ("params_file", "fastdds_profile"):
        path = context.launch_configurations.get(name, "")
        if (path or name == "params_file") and not os.path.isfile(path):
            raise FileNotFoundError(f"launch argument {name}: {path!r} is not a file")
    return []


def start_rviz(context, *args, **kwargs) -> list:
    """With rviz:=true: rviz2 showing each camera beside its saliency image (the config of config/ptp_ros.rviz,
    written for the launched cameras and namespace), or a clear line when rviz2 is not installed."""
    if context.launch_configurations.get("rviz") != "true":
        return []
    try:
        get_package_share_directory("rviz2")
    except PackageNotFoundError:
        return [LogInfo(msg="rviz:=true, but rviz2 is not installed (apt install ros-$ROS_DISTRO-rviz2): no rviz")]
    from ptp_ros.ros.rviz import dump, rviz_config

    cameras = yaml.safe_load(context.launch_configurations["cameras"]) or []
    namespace = context.launch_configurations.get("namespace") or "/"
    with tempfile.NamedTemporaryFile("w", prefix="ptp_ros_", suffix=".rviz", delete=False) as config:
        config.write(dump(rviz_config(cameras, namespace)))
    return [Node(package="rviz2", executable="rviz2", arguments=["-d", config.name], output="screen")]


def generate_launch_description() -> LaunchDescription:
    config = os.path.join(get_package_share_directory("ptp_ros"), "config")
    arguments = [
        DeclareLaunchArgument(
            "model_path",
            default_value="",
            description="Checkpoint directory or cached repo id; empty = built-in default model",
        ),
        DeclareLaunchArgument(
            "image_topic",
            default_value="/camera/image_raw",
            description="Camera topic (raw Image; with compressed transport, <topic>/compressed)",
        ),
        DeclareLaunchArgument(
            "image_transport",
            default_value="raw",
            choices=["raw", "compressed"],
            description="raw: sensor_msgs/Image; compressed: sensor_msgs/CompressedImage",
        ),
        DeclareLaunchArgument(
            "cameras",
            default_value="[]",
            description="Camera names, e.g. [head, wrist]: camera NAME reads NAME/image (NAME/image/compressed). "
            "[]: the params file's cameras (default: one camera on image_topic)",
        ),
        DeclareLaunchArgument(
            "rviz",
            default_value="false",
            choices=["true", "false"],
            description="Start rviz2 with each camera beside its saliency image (needs rviz2 installed)",
        ),
        DeclareLaunchArgument(
            "instruction_topic", default_value="instruction", description="std_msgs/String instructions (text or JSON)"
        ),
        DeclareLaunchArgument(
            "latency_budget_ms", default_value="2000.0", description="Time allowed from instruction to answer, in ms"
        ),
        DeclareLaunchArgument(
            "params_file",
            default_value=os.path.join(config, "agent.yaml"),
            description="YAML with the node's parameters (arguments here override it)",
        ),
        DeclareLaunchArgument("namespace", default_value="", description="Namespace of the node and its topics"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="Use /clock (bag replay, sim)"),
        DeclareLaunchArgument(
            "autostart",
            default_value="true",
            choices=["true", "false"],
            description="Configure and activate at start; false: a lifecycle manager drives it",
        ),
        DeclareLaunchArgument(
            "fastdds_profile",
            default_value=os.path.join(config, "fastdds_shm.xml"),
            description="Fast DDS XML profile (large shared-memory segment for camera frames)",
        ),
    ]
    agent = LifecycleNode(
        package="ptp_ros",
        executable="agent",
        name="ptp_agent",
        namespace=LaunchConfiguration("namespace"),
        output="screen",
        parameters=[
            LaunchConfiguration("params_file"),
            {
                "model_path": ParameterValue(LaunchConfiguration("model_path"), value_type=str),
                "image_transport": ParameterValue(LaunchConfiguration("image_transport"), value_type=str),
                "latency_budget_ms": ParameterValue(LaunchConfiguration("latency_budget_ms"), value_type=float),
                "use_sim_time": ParameterValue(LaunchConfiguration("use_sim_time"), value_type=bool),
                "autostart": ParameterValue(LaunchConfiguration("autostart"), value_type=bool),
                # [] leaves the params file's cameras (a later params file's empty list overrides nothing)
                "cameras": ParameterValue(LaunchConfiguration("cameras"), value_type=List[str]),  # noqa: UP006
            },
        ],
        remappings=[  # with compressed transport the node subscribes to <image_topic>/compressed itself
            ("image", LaunchConfiguration("image_topic")),
            ("instruction", LaunchConfiguration("instruction_topic")),
        ],
    )
    # Fast DDS 2 (humble..jazzy) reads FASTRTPS_DEFAULT_PROFILES_FILE, Fast DDS 3 (kilted on) FASTDDS_...
    fast_dds_2 = os.environ.get("ROS_DISTRO", "") in ("humble", "iron", "jazzy")
    profile_variable = "FASTRTPS_DEFAULT_PROFILES_FILE" if fast_dds_2 else "FASTDDS_DEFAULT_PROFILES_FILE"
    return LaunchDescription(
        [
            *arguments,
            OpaqueFunction(function=check_files),
            SetEnvironmentVariable(profile_variable, LaunchConfiguration("fastdds_profile")),
            agent,
            OpaqueFunction(function=start_rviz),
        ]
    )
