#!/usr/bin/env bash
# Build ptp_ros_interfaces (the Ask action) with CMake and install it into a prefix: by default the Python
# environment that runs this script (the project's venv), where the agent and the planner import it with
# no sourcing, since the pip ROS 2 wheels already put that prefix's lib/ on the loader path.
# Re-running rebuilds only what changed.  With a ROS 2 install, build it with colcon instead (docs/ros.md).
#
#   bash ptp_ros_interfaces/install.sh [PREFIX]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
ros_prefix=$("$python" -c 'import sys; print(sys.prefix)')   # where the ROS 2 wheels keep share/ and lib/
prefix=${1:-$ros_prefix}
build=${PTP_INTERFACES_BUILD:-$here/../build/ptp_ros_interfaces}
export AMENT_PREFIX_PATH="${AMENT_PREFIX_PATH:+$AMENT_PREFIX_PATH:}$ros_prefix"
export CMAKE_PREFIX_PATH="${CMAKE_PREFIX_PATH:+$CMAKE_PREFIX_PATH:}$ros_prefix"
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
if [[ -f "$build/CMakeCache.txt" ]] && ! grep -qxF "CMAKE_INSTALL_PREFIX:PATH=$prefix" "$build/CMakeCache.txt"; then
  rm -rf "$build"   # configured for another prefix
fi
mkdir -p "$build"
log=$build/install.log
cmake -S "$here" -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF \
  -DCMAKE_INSTALL_PREFIX="$prefix" -DPython3_EXECUTABLE="$("$python" -c 'import sys; print(sys.executable)')" \
  >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
cmake --build "$build" -j "$(nproc 2>/dev/null || echo 2)" >>"$log" 2>&1 || { tail -50 "$log" >&2; exit 1; }
cmake --install "$build" >>"$log" 2>&1 || { tail -50 "$log" >&2; exit 1; }
echo "ptp_ros_interfaces installed into $prefix"
