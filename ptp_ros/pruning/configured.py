"""A configured selector: which selector, with which options, at which stage — one value, checked once, where it
is built.

``ptp-ask``, the node, the lmms-eval plugin, ``ptp-bench``, ``ptp-eval`` and the cost model all take this value
(``PipelineConfig.selector`` runs it), so an option means the same everywhere and is refused in one place: an
option given to a selector that does not take it is an error whatever its value (``--selector fastv --alpha 0.5``
names ``alpha``, even at PTP's default).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .registry import REDUCTIONS, BoundSelector, selector_spec
from .types import InLLMPruning
from .views import check_view_split


@dataclass(frozen=True)
class ConfiguredSelector:
    """A registered selector, the options the user gave it and where it prunes.

    ``name``: a registered selector (``selector_names(controls=True)``).  ``options``: only those the user gave
    (PTP: ``PTPConfig``'s fields; FastV: ``k``; the others their keyword options); the registry checks them
    (``SelectorSpec.bind``) and fills in the rest with the selector's defaults.

    The stage — for a selector that ranks by instruction relevance and may do so inside the LLM
    (``SelectorSpec.relevance_in_llm``: PTP): ``prune_in_llm`` ranks at the adapter's relevance layer from that
    layer's input and drops from it on (the default: cheaper than the probe and, on the validation splits of
    both proxies, far more accurate, docs/accuracy/stage_sweep/); ``False`` ranks after a separate relevance probe
    and prunes before the LLM.  A selector with its own plan (FastV) or without relevance prunes where it does,
    whatever ``prune_in_llm`` says.  ``probe_candidates`` (PTP before the LLM only): the probe reads only the
    ⌈m × budget⌉ tokens PTP ranks best bottom-up (α = 0) and the text; 0: every visual token.

    ``view_split``: how a request over several camera views splits its one budget across them before regions and
    tokens (``views.VIEW_SPLITS``: "shared" by the instruction's attention, or the baselines "equal" and "alone");
    a single view ignores it.

    ``reduce``: how relevance is reduced over the instruction rows — the selector's own (FastV's "max",
    text_attention's "mean") or this, else "max"; filled in, so the value says what runs.
    """

    name: str = "ptp"
    options: Mapping[str, Any] = field(default_factory=dict)
    prune_in_llm: bool = True
    probe_candidates: float = 0.0
    reduce: str | None = None
    view_split: str = "shared"

    def __post_init__(self) -> None:
        options = MappingProxyType(dict(self.options))  # a copy the caller cannot change under us
        object.__setattr__(self, "options", options)
        bound = selector_spec(self.name).bind(**options)  # an unknown name or option: a ValueError here
        object.__setattr__(self, "_bound", bound)
        if self.reduce not in (None, *REDUCTIONS):
            raise ValueError(f"reduce must be one of {', '.join(REDUCTIONS)}, got {self.reduce!r}")
        object.__setattr__(self, "reduce", bound.relevance_reduce(self.reduce))
        check_view_split(self.view_split)
        if not isinstance(self.prune_in_llm, bool):
            raise ValueError(f"prune_in_llm must be true or false, got {self.prune_in_llm!r}")
        if self.probe_candidates:
            if not (self.probe_candidates >= 1.0 and math.isfinite(self.probe_candidates)):
                raise ValueError(f"probe_candidates must be 0 (off) or >= 1, got {self.probe_candidates}")
            if self.name != "ptp" or self.prune_in_llm:
                raise ValueError(
                    "probe_candidates narrows PTP's relevance probe before the LLM: it needs selector 'ptp' and "
                    "prune_in_llm false"
                )

    def __repr__(self) -> str:
        stage = f"prune_in_llm={self.prune_in_llm}, probe_candidates={self.probe_candidates}, reduce={self.reduce!r}"
        if self.view_split != "shared":
            stage += f", view_split={self.view_split!r}"
        return f"ConfiguredSelector({self.name!r}, {dict(self.options)!r}, {stage})"

    def __hash__(self) -> int:
        options = tuple(sorted(self.options.items()))
        return hash((self.name, options, self.prune_in_llm, self.probe_candidates, self.view_split))

    @property
    def bound(self) -> BoundSelector:
        """The registry's selector with these options, its needs resolved (what the pipeline calls)."""
        return self._bound

    def in_llm_plan(self, llm_layer: int) -> InLLMPruning | None:
        """Where inside the LLM it ranks and drops visual tokens, with ``llm_layer`` the adapter's relevance layer;
        ``None``: before the LLM.  The selector's own plan (FastV's), else with ``prune_in_llm`` a selector that
        declares ``relevance_in_llm`` and needs relevance ranks at ``llm_layer`` and drops from it on."""
        bound = self.bound
        if bound.in_llm is not None:
            return bound.in_llm
        if self.prune_in_llm and bound.spec.relevance_in_llm and bound.needs_relevance:
            return InLLMPruning(score_layer=llm_layer, prune_layer=llm_layer, queries="instruction")
        return None

    def record(self) -> dict:
        """Its JSON form in the benchmarks' results (``from_record`` reads it back); ``probe_candidates`` only
        when set, ``view_split`` only when not the default."""
        out = {"selector": self.name, "options": dict(self.options), "reduce": self.reduce}
        out["prune_in_llm"] = self.prune_in_llm
        if self.probe_candidates:
            out["probe_candidates"] = self.probe_candidates
        if self.view_split != "shared":
            out["view_split"] = self.view_split
        return out

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ConfiguredSelector | None:
        """The value a ``record`` describes (``None`` for a row without a selector); a record without
        ``prune_in_llm`` (written before it existed) ran before the LLM."""
        if record.get("selector") is None:
            return None
        return cls(
            record["selector"],
            record.get("options") or {},
            prune_in_llm=record.get("prune_in_llm", False),
            probe_candidates=record.get("probe_candidates", 0.0),
            reduce=record.get("reduce"),
            view_split=record.get("view_split", "shared"),
        )
