"""Benchmarks of ptp_ros (installed as ``ptp_ros_bench``): cost (ptp-bench) and accuracy (ptp-eval)."""
