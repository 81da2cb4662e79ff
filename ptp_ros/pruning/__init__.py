"""Token selection as pure functions on tensors: no transformers, no ROS (see DESIGN.md).

Importing the package registers every selector: PTP (ptp.py), FastV and the peers (peers.py), then the
baselines (selectors.py) — the order ``selector_names()`` lists them in.
"""

from . import peers, selectors  # noqa: F401  (register their selectors)
from .budgets import region_quotas, region_shares
from .configured import ConfiguredSelector
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
    NO_REGION,
    InLLMPruning,
    Selection,
    TokenScores,
    check_budget,
    resolve_budget,
    selectable_budget,
)
from .views import VIEW_SPLITS, concat_views, select_views, view_parts, view_quotas

__all__ = [
    "NO_REGION",
    "VIEW_SPLITS",
    "InLLMPruning",
    "PTPConfig",
    "Selection",
    "BoundSelector",
    "ConfiguredSelector",
    "SelectorSpec",
    "TokenScores",
    "check_budget",
    "concat_views",
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
    "select_views",
    "view_parts",
    "view_quotas",
]
