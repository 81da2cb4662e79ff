"""ptp_ros: Pyramid Token Pruning for high-resolution vision-language models, as a library and a ROS 2 node."""

__version__ = "0.1.0"
