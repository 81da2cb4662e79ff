"""The selector registry: every selector, registered next to its function with what it needs.

A selector maps (scores, budget K) to a ``Selection`` of exactly K tokens.  The module that defines one
registers it with a ``SelectorSpec`` — ptp.py PTP, peers.py FastV and the peer methods, selectors.py the
baselines — and everything that lists, builds or costs selectors reads this registry: the pipeline (whether
to compute relevance, how to reduce it, whether to attach features, the in-LLM plan), ``ptp-ask --selector``,
``ptp-bench``'s rows, ``ptp-eval``'s comparison, the cost model's passes and the tests.  Adding a selector:
docs/method.md, "Adding a selector".
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from .types import InLLMPruning, Selection, TokenScores, check_budget

#: How a selector's relevance is reduced over the instruction rows (``ptp.instruction_relevance``).
REDUCTIONS = ("max", "mean")
#: The cosine-distance matrices a selector computes on the projected features, for the cost model:
#: one N×N over every selectable token, or one per region.
DISTANCES = ("all", "per_region")


@dataclass(frozen=True)
class SelectorSpec:
    """What a selector is and what it needs; every field after ``description`` defaults to "nothing".

    ``fn(scores, budget, **options)`` selects.  ``options(**user_options)`` turns the user's options into
    ``fn``'s keyword arguments, validated (``None``: ``fn``'s own keyword parameters, defaults filled in,
    unknown names refused).  A need is a constant or a function of those bound options:

    * ``needs_relevance``: it reads ``TokenScores.relevance`` (text→visual attention), which callers compute
      only then.  ``reduce``: its own reduction of the instruction rows (one of ``REDUCTIONS``; ``None``:
      the configured one, ``ConfiguredSelector.reduce``).
    * ``needs_features``: it reads ``TokenScores.features`` (the projected visual features), which callers
      attach only then.
    * ``in_llm``: its own in-LLM plan (FastV's), from the bound options.  ``relevance_in_llm``: with
      ``ConfiguredSelector.prune_in_llm`` (and relevance needed) it ranks inside the LLM at the adapter's
      relevance layer instead of after a separate probe (PTP).
    * ``distances``: one of ``DISTANCES`` or ``None`` — what the cost model counts as its selection matmuls.
    * ``saliency_layer``: the vision layer whose [CLS] attention its paper ranks by ("feature": the layer the
      LLM reads; ``None``: the adapter's default); ``ptp-eval`` runs it so.

    ``label``: its row in the benchmark tables (default options); ``description``: one line for ``--help``.
    ``control``: a control row of the accuracy report (random tokens, or none, dropped where a method drops
    them), not a method: built by name like any selector, but not listed by ``selector_names()`` (no CLI
    choice, no benchmark row), and it may keep fewer tokens than the budget (no visual token at all).
    """

    name: str
    fn: Callable[..., Selection]
    label: str
    description: str
    options: Callable[..., dict] | None = None
    needs_relevance: bool | Callable[[dict], bool] = False
    reduce: str | None = None
    needs_features: bool | Callable[[dict], bool] = False
    in_llm: Callable[[dict], InLLMPruning] | None = None
    relevance_in_llm: bool = False
    distances: str | None | Callable[[dict], str | None] = None
    saliency_layer: str | None = None
    control: bool = False

    def __post_init__(self) -> None:
        if self.reduce not in (None, *REDUCTIONS):
            raise ValueError(f"{self.name}: reduce must be None or one of {REDUCTIONS}, got {self.reduce!r}")

    def bind(self, **options) -> BoundSelector:
        """This selector with ``options``, its needs resolved; a ``ValueError`` names a bad option."""
        bound = self.options(**options) if self.options is not None else _keyword_options(self, options)
        distances = _resolve(self.distances, bound)
        if distances not in (None, *DISTANCES):
            raise ValueError(f"{self.name}: distances must be None or one of {DISTANCES}, got {distances!r}")
        return BoundSelector(
            self,
            bound,
            needs_relevance=bool(_resolve(self.needs_relevance, bound)),
            needs_features=bool(_resolve(self.needs_features, bound)),
            in_llm=None if self.in_llm is None else self.in_llm(bound),
            distances=distances,
        )


def _resolve(need, options: dict):
    return need(options) if callable(need) else need


def _keyword_options(spec: SelectorSpec, options: dict) -> dict:
    """``options`` checked against ``spec.fn``'s keyword parameters (after scores and budget), defaults filled."""
    params = list(inspect.signature(spec.fn).parameters.values())[2:]
    known = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"{spec.name} has no option(s) {', '.join(unknown)}{'; known: ' + ', '.join(known) if known else ''}"
        )
    return {**known, **options}


@dataclass(frozen=True)
class BoundSelector:
    """A registered selector with its options (``fn``'s keyword arguments) and its needs resolved for them:
    what the pipeline, the benchmarks and the cost model must compute for it (see ``SelectorSpec``)."""

    spec: SelectorSpec
    options: dict
    needs_relevance: bool
    needs_features: bool
    in_llm: InLLMPruning | None = None
    distances: str | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def fn(self) -> Callable[..., Selection]:
        return self.spec.fn

    @property
    def reduce(self) -> str | None:
        """Its own reduction of the instruction rows, or ``None``: the caller's (``relevance_reduce``)."""
        return self.spec.reduce

    def relevance_reduce(self, requested: str | None = None, default: str = "max") -> str:
        """How its relevance is reduced over the instruction rows: its own reduction, else ``requested``, else
        ``default``.  A ``requested`` reduction that its own contradicts is a ``ValueError`` (a configured selector
        that asks for one it would not get)."""
        own = self.spec.reduce
        if own is not None and requested not in (None, own):
            raise ValueError(f"{self.name} reduces its relevance by {own!r}; reduce={requested!r} contradicts it")
        return own or requested or default

    def __call__(self, scores: TokenScores, budget: int) -> Selection:
        """Exactly ``budget`` tokens: an integer in [1, selectable tokens], else a ``ValueError``."""
        check_budget(scores, budget, minimum=1)
        return dataclasses.replace(self.spec.fn(scores, budget, **self.options), method=self.spec.name)


_REGISTRY: dict[str, SelectorSpec] = {}


def register(spec: SelectorSpec) -> SelectorSpec:
    """Add ``spec`` to the registry (once per name); called by the module that defines the selector."""
    if spec.name in _REGISTRY:
        raise ValueError(f"selector {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def selector_spec(name: str) -> SelectorSpec:
    if name not in _REGISTRY:
        raise ValueError(f"unknown selector {name!r}; known: {', '.join(selector_names())}")
    return _REGISTRY[name]


def selector_names(controls: bool = False) -> list[str]:
    """Every registered selector, in registration order (PTP, FastV and the peers, the baselines); the
    accuracy report's control rows (``SelectorSpec.control``) only with ``controls``."""
    return [spec.name for spec in selector_specs(controls)]


def selector_specs(controls: bool = False) -> list[SelectorSpec]:
    return [spec for spec in _REGISTRY.values() if controls or not spec.control]


def make_selector(name: str, **options) -> BoundSelector:
    """A selector by name; ``options`` are its configuration (for "ptp": PTPConfig's fields; for "fastv":
    ``k``, the layer from which it drops tokens, FastV's default 2; for the others their keyword options)."""
    return selector_spec(name).bind(**options)
