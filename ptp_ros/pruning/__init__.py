"""Token selection as pure functions on tensors: no transformers, no ROS (see DESIGN.md).

Importing the package registers every selector: PTP (ptp.py), FastV and the peers (peers.py), then the
baselines (selectors.py) — the order ``selector_names()`` lists them in.
"""

from . import peers, selectors  # noqa: F401  (register their selectors)
from .budgets import region_quotas, region_shares
from .ptp import PTPConfig, fused_scores, instruction_relevance, ptp_select
from .registry import (
    BoundSelector,
    SelectorSpec,
    make_selector,
    register,
    selector_names,
    selector_spec,
    selector_specs,
)
from .types import (
    KEEP_RATIO_RANGE,
    NO_REGION,
    InLLMPruning,
    Selection,
    TokenScores,
    check_budget,
    check_keep_ratio,
    check_tokens,
    resolve_budget,
    selectable_budget,
)

__all__ = [
    "KEEP_RATIO_RANGE",
    "NO_REGION",
    "InLLMPruning",
    "PTPConfig",
    "Selection",
    "BoundSelector",
    "SelectorSpec",
    "TokenScores",
    "check_budget",
    "check_keep_ratio",
    "check_tokens",
    "fused_scores",
    "instruction_relevance",
    "make_selector",
    "ptp_select",
    "region_quotas",
    "region_shares",
    "register",
    "resolve_budget",
    "selectable_budget",
    "selector_names",
    "selector_spec",
    "selector_specs",
]
