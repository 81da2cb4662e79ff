"""``python -m ptp_ros_bench.accuracy`` = ``ptp-eval``."""

from . import main

raise SystemExit(main())
