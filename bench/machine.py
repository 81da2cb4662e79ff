"""What machine produced the figures, how busy it was, and how much memory a block of work peaked at."""

from __future__ import annotations

import os
import platform
import sys
import time
from importlib import metadata

import psutil
import torch

_CLEAR_REFS = "/proc/self/clear_refs"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def describe(device: torch.device) -> dict:
    """Hardware and software of this run (goes into results.json and the report header)."""
    info = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "versions": {p: _version(p) for p in ("torch", "transformers", "tokenizers", "numpy", "ptp_ros")},
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {
            "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
        }
    return info


def load_snapshot(interval_s: float = 0.5) -> dict:
    """Load average and the other processes using the CPU now: how contended the measurement was."""
    me = os.getpid()
    procs = [p for p in psutil.process_iter(["pid", "name"]) if p.info["pid"] != me]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    psutil.cpu_percent(None)
    time.sleep(interval_s)
    busy = []
    for p in procs:
        try:
            pct = p.cpu_percent(None)
        except psutil.Error:
            continue
        if pct >= 5.0:
            busy.append({"name": p.info["name"], "cpu_percent": round(pct, 1)})
    one, five, fifteen = os.getloadavg()
    return {
        "load_avg_1m": round(one, 2),
        "load_avg_5m": round(five, 2),
        "load_avg_15m": round(fifteen, 2),
        "machine_cpu_percent": psutil.cpu_percent(None),
        "other_busy_processes": sorted(busy, key=lambda b: -b["cpu_percent"]),
    }


def _vm_hwm_mib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak resident set (RSS) of this process during a block, and the CUDA peak when on a GPU.

    Linux resets the RSS high-water mark on ``echo 5 > /proc/self/clear_refs``, so the peak is the
    block's own, not the process's since start.  Elsewhere the RSS figure is ``None``.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._resettable = os.path.exists(_CLEAR_REFS)
        self._figures: dict = {}

    def __enter__(self) -> PeakMemory:
        if self._resettable:
            try:
                with open(_CLEAR_REFS, "w") as f:
                    f.write("5")
            except OSError:
                self._resettable = False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        self._figures = {"peak_rss_mib": _vm_hwm_mib() if self._resettable else None}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._figures["cuda_peak_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20

    def figures(self) -> dict:
        return dict(self._figures)
