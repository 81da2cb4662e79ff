"""Token selection as pure functions on tensors: no transformers, no ROS (see DESIGN.md)."""
from .budgets import region_quotas, region_shares
from .ptp import PTPConfig, fused_scores, instruction_relevance, ptp_select
from .selectors import BoundSelector, make_selector, selector_names
from .types import NO_REGION, InLLMPruning, Selection, TokenScores, resolve_budget

__all__ = [
    "NO_REGION", "InLLMPruning", "PTPConfig", "Selection", "BoundSelector", "TokenScores", "fused_scores", "instruction_relevance", "make_selector",
    "ptp_select", "region_quotas", "region_shares", "resolve_budget", "selector_names",
]
