"""The ROS 2 side of ptp_ros: the agent node, message conversion, the demo's camera and planner."""
