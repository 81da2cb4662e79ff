"""A request's budget — keep ratio, token count, latency: the one set of bounds of each, its check, and the one
rule that turns a keep ratio into a token count.

Every edge runs these checks once (``ptp-ask``'s flags, the node's parameters and requests, the library's
``Pipeline.answer``); inside, values are taken as checked.  Pure Python, so that the node's request parser
(ptp_ros/ros/requests.py) and the latency controller import it without torch.
"""

from __future__ import annotations

import argparse
import math
import numbers

#: The one range of a keep ratio: above 0 (at least one token is kept anyway), at most 1 (everything).
KEEP_RATIO_RANGE = "(0, 1]"
#: The keep ratio a tool uses when given no budget (``ptp-ask``, the node's fixed mode): PTP's defaults were chosen
#: at 11.1 % of the visual tokens on validation and kept 97.8 % of the all-token accuracy there on the proxy's test
#: split, for 0.20× of an unpruned prefill (docs/accuracy/).  1 keeps every token (the stock model).
DEFAULT_KEEP_RATIO = 0.111
#: The one range of a latency budget in ms (a request's ``latency_budget_ms``, the node's parameter): above 0, at
#: most an hour.
MAX_LATENCY_BUDGET_MS = 3_600_000.0
LATENCY_BUDGET_RANGE = f"(0.0, {MAX_LATENCY_BUDGET_MS}]"


def check_keep_ratio(keep_ratio: float, name: str = "keep_ratio") -> float:
    """``keep_ratio`` as a float in ``KEEP_RATIO_RANGE``, or a ``ValueError`` naming ``name``."""
    return _above_zero(keep_ratio, 1.0, name, KEEP_RATIO_RANGE)


def check_latency_budget_ms(budget_ms: float, name: str = "latency_budget_ms") -> float:
    """``budget_ms`` as a float in ``LATENCY_BUDGET_RANGE``, or a ``ValueError`` naming ``name``."""
    return _above_zero(budget_ms, MAX_LATENCY_BUDGET_MS, name, LATENCY_BUDGET_RANGE)


def _above_zero(value: float, most: float, name: str, shown: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < value <= most:  # NaN fails too
        raise ValueError(f"{name} must be in {shown}, got {value!r}")
    return float(value)


def keep_ratio_arg(text: str) -> float:
    """``check_keep_ratio`` as an argparse type (``ptp-ask --keep-ratio``, ``ptp-eval --ratios``)."""
    try:
        return check_keep_ratio(float(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def check_tokens(tokens: int, name: str = "tokens") -> int:
    """``tokens`` as an int >= 1 (a whole number), or a ``ValueError`` naming ``name``."""
    if (
        isinstance(tokens, bool)
        or not isinstance(tokens, numbers.Real)
        or not math.isfinite(tokens)
        or tokens < 1
        or int(tokens) != tokens
    ):
        raise ValueError(f"{name} must be a whole number >= 1, got {tokens!r}")
    return int(tokens)


def ratio_tokens(total: int, keep_ratio: float) -> int:
    """The tokens ``keep_ratio`` keeps of ``total``: round(keep_ratio × total), at least 1 and at most ``total``.
    The one ratio → tokens rule: the pipeline's budget, the latency controller's bounds, the node's overload check
    and the cost model all count so."""
    return max(1, min(total, round(keep_ratio * total)))
