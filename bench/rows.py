"""A benchmark row: a label and the configured selector it runs — the one row type of ``ptp-bench`` and
``ptp-eval``."""

from __future__ import annotations

from dataclasses import dataclass

from ptp_ros.pipeline import PipelineConfig
from ptp_ros.pruning import ConfiguredSelector, InLLMPruning

from .cost_model import Passes, passes_for


@dataclass(frozen=True)
class Row:
    """``label`` and the ``ConfiguredSelector`` the library runs for it (``None``: a row that selects nothing,
    such as ``ptp-bench``'s zero-cost oracle or ``ptp-eval``'s down-scaled image).

    ``ptp-eval`` rows also carry ``adapter``, (option, value) changes to the evaluated adapter's options that
    produce the scores (e.g. the LLM layer; any family takes them as long as its options have those fields), and
    ``group``: "ptp", "ablation", "peer", "candidate" (a sweep's) or "control"."""

    label: str
    selector: ConfiguredSelector | None
    adapter: tuple[tuple[str, object], ...] = ()
    group: str = "peer"

    def llm_layer(self, default: int) -> int:
        """The relevance layer it runs at: its own ``llm_layer`` change, else the adapter's ``default``."""
        return dict(self.adapter).get("llm_layer", default)

    def in_llm_plan(self, llm_layer: int) -> InLLMPruning | None:
        """Where inside the LLM it drops tokens, with ``llm_layer`` the adapter's relevance layer (its own change
        wins); ``None``: before the LLM, or no selector."""
        return None if self.selector is None else self.selector.in_llm_plan(self.llm_layer(llm_layer))

    def prune_layer(self, llm_layer: int) -> int | None:
        """The LLM layer from which it drops visual tokens (``None``: before the LLM)."""
        plan = self.in_llm_plan(llm_layer)
        return None if plan is None else plan.prune_layer

    def passes(self, llm_layer: int = 2) -> Passes:
        """What it runs, for the cost model (``passes_for``), at its own relevance layer."""
        return passes_for(self.selector, self.llm_layer(llm_layer))

    def pipeline_config(self, max_new_tokens: int) -> PipelineConfig:
        """What the library runs for this row (the unpruned pipeline for a row without a selector)."""
        if self.selector is None:
            return PipelineConfig(max_new_tokens=max_new_tokens)
        return PipelineConfig(selector=self.selector, max_new_tokens=max_new_tokens)

    def key(self) -> tuple:
        """Identity of what is computed (two labels for one configuration are computed once)."""
        return self.selector, self.adapter

    def record(self) -> dict:
        """Its settings in a results.json: the label as ``name`` and the selector's ``ConfiguredSelector.record``."""
        described = {"selector": None} if self.selector is None else self.selector.record()
        return {"name": self.label, **described}
