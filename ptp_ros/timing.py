"""One clock for every stage timing (the pipeline, ``generate``'s prefill/decode split, the benchmarks), and
the one list of the stages a request goes through."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

#: The stages of one request, in order; ``Answer.timings_ms`` / the node's ``latency_ms`` use these names
#: (plus "total"), ptp-bench reports them with an ``_ms`` suffix.
STAGES = ("preprocess", "encode", "score", "select", "prefill", "decode")


def now(device: torch.device) -> float:
    """Seconds, after waiting for work queued on ``device``: each stage is charged for what it launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@contextmanager
def timed(timings: dict[str, float], stage: str, device: torch.device) -> Iterator[None]:
    """Adds the milliseconds the block took to ``timings[stage]``."""
    start = now(device)
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + (now(device) - start) * 1e3
