"""The rows compared by ``ptp-eval``: PTP, its ablations and the peer methods, each a ``bench.rows.Row`` (a label and
the ``ConfiguredSelector`` the library runs, plus the adapter option changes that produce its scores and its group).

"ptp" always means the library's current defaults.  Every report also carries control rows (``control_methods``):
random tokens before the LLM, and random tokens or none dropped inside it at each layer a row drops tokens at;
each row's gain is paired with the control of its own stage (``control_for``).
"""

from __future__ import annotations

import dataclasses

from ptp_ros.pruning import ConfiguredSelector, PTPConfig, selector_names, selector_spec
from ptp_ros.pruning.ptp import FUSIONS, WITHIN_REGION
from ptp_ros.vlm.stock_adapter import StockModelAdapter

from ..rows import Row


def adapter_variant(base: StockModelAdapter, changes: tuple[tuple[str, object], ...]) -> StockModelAdapter:
    """``base`` with some options changed (a method's ``adapter``), over the same model: no copy of the weights."""
    if not changes:
        return base
    return type(base)(base.model, base.processor, dataclasses.replace(base.options, **dict(changes)))


def pick_methods(methods: list[Row], names: list[str]) -> list[Row]:
    """The rows of ``methods`` named in ``names``, in ``methods``' order: a name is a row's label or, when no
    label is that name, a selector name (every row of that selector); a ``ValueError`` names unknown ones."""
    labels = {m.label for m in methods}
    selectors = {m.label: m.selector.name for m in methods if m.selector is not None}
    chosen = {n for n in names if n in labels}
    chosen |= {label for label, name in selectors.items() if name in names and name not in labels}
    unknown = [n for n in names if n not in labels and n not in selectors.values()]
    if unknown:
        known = sorted(labels | set(selectors.values()))
        raise ValueError(f"unknown method(s) {', '.join(map(repr, unknown))}; known: {', '.join(map(repr, known))}")
    return [m for m in methods if m.label in chosen]


#: The control row before the LLM: random tokens, then a pruned prefill (the pre-LLM methods' control).
RANDOM = "random"


def random_after(k: int) -> str:
    """The control of the methods that drop tokens inside the LLM from layer ``k``: random tokens dropped so."""
    return f"random-after-{k}"


def no_visual_after(k: int) -> str:
    """The floor of layer ``k``: no visual token at all from it on (what layers < ``k`` already carried)."""
    return f"no-visual-after-{k}"


def control_for(method: Row, llm_layer: int) -> str:
    """The control a method's gain is paired with: random tokens dropped where it drops them (before the LLM:
    ``RANDOM``; inside it from layer K: ``random_after(K)``)."""
    k = method.prune_layer(llm_layer)
    return RANDOM if k is None else random_after(k)


def control_methods(methods: list[Row], llm_layer: int) -> list[Row]:
    """The control rows of a report on ``methods`` (the UniPruneBench convention: random is a strong baseline):
    random before the LLM, and for every layer K at which a row drops tokens inside the LLM, random tokens
    (as many as the rows keep) and no visual token at all from K on, through the same in-LLM plan as the rows
    (registered selectors ``random_in_llm`` / ``no_visual_in_llm``)."""
    layers = sorted({k for m in methods if m.group != "control" and (k := m.prune_layer(llm_layer)) is not None})
    out = [peer("random", label=RANDOM, group="control")]
    for k in layers:
        out.append(Row(random_after(k), ConfiguredSelector("random_in_llm", {"k": k}), group="control"))
        out.append(Row(no_visual_after(k), ConfiguredSelector("no_visual_in_llm", {"k": k}), group="control"))
    return out


def with_controls(methods: list[Row], llm_layer: int) -> list[Row]:
    """``methods`` and, after them, every control row they need that is not among them already."""
    have = {m.key() for m in methods}
    return methods + [c for c in control_methods(methods, llm_layer) if c.key() not in have]


def main_rows(methods: list[Row], llm_layer: int) -> list[Row]:
    """The rows ``ptp-eval`` runs on every scene: all but the ablations and the controls that only ablations
    need (those run on the ablation scenes, where they are paired)."""
    main = [m for m in methods if m.group not in ("ablation", "control")]
    needed = {c.key() for c in control_methods(main, llm_layer)}
    return [m for m in methods if m.group != "ablation" and (m.group != "control" or m.key() in needed)]


#: Registered peers whose comparison row is an ablation (run on the ablation scenes, not plotted with the
#: peers): text_attention is FastV's ranking moved before the LLM (a pre-LLM emulation).
ABLATION_PEERS = frozenset({"text_attention"})


def peer(selector: str, options: dict | None = None, label: str | None = None, group: str | None = None) -> Row:
    """The row of a registered selector as its paper runs it: its label (``SelectorSpec.label``) and, for the
    [CLS] peers, the vision layer whose [CLS] attention their code reads (``SelectorSpec.saliency_layer``;
    "feature": the layer whose output the LLM reads, LLaVA-NeXT's penultimate, Qwen2.5-VL's last
    full-attention block)."""
    spec = selector_spec(selector)
    adapter = (("vision_layer", spec.saliency_layer),) if spec.saliency_layer else ()
    group = group or ("ablation" if selector in ABLATION_PEERS else "peer")
    return Row(label or spec.label, ConfiguredSelector(selector, options or {}), adapter, group)


def _ptp(
    label: str,
    group: str = "ablation",
    reduce: str = "max",
    adapter: dict | None = None,
    prune_in_llm: bool = True,
    probe_candidates: float = 0.0,
    **changes,
) -> Row:
    """A PTP row: every ``PTPConfig`` field given (the defaults with ``changes``), so the report says what ran."""
    options = dataclasses.asdict(dataclasses.replace(PTPConfig(), **changes))
    selector = ConfiguredSelector(
        "ptp", options, prune_in_llm=prune_in_llm, probe_candidates=probe_candidates, reduce=reduce
    )
    return Row(label, selector, tuple(sorted((adapter or {}).items())), group)


def comparison_methods() -> list[Row]:
    """PTP (max over instruction tokens), the ablations the issue names, and the peers: FastV inside the LLM
    as its code runs it, and its ranking applied before the LLM (mean attention of the instruction rows)."""
    default = PTPConfig().alpha  # α = 0 and α = 1 are the ablation rows, the default is the "ptp" row
    alphas = [_ptp(f"ptp α={a:g}", alpha=a) for a in (0.25, 0.5, 0.75) if a != default]
    return [
        _ptp("ptp", group="ptp"),
        _ptp("ptp before the LLM (separate probe; the default before)", prune_in_llm=False),
        _ptp("ptp probe over 3× budget candidates (before the LLM)", prune_in_llm=False, probe_candidates=3.0),
        _ptp("ptp without region budgets", use_region_budgets=False),
        _ptp("ptp without token saliency (α=1)", alpha=1.0),
        _ptp("ptp without instruction (α=0, before the LLM)", alpha=0.0),
        _ptp("ptp mean over instruction", reduce="mean"),
        _ptp("ptp min-max fusion", fusion="minmax"),
        _ptp("ptp min-max saliency + raw attention", fusion="minmax_raw"),
        *alphas,
        # an earlier prune layer (K=1: cheaper, less context gathered before the drop), with its own controls
        _ptp("ptp llm_layer=1", adapter={"llm_layer": 1}),
        # every other registered selector as its paper runs it: the [CLS] peers read the feature layer's
        # attention, as their code does (docs/method.md); FastV inside the LLM
        # (random before the LLM is a control row: ``control_methods``)
        *(peer(name) for name in selector_names() if name not in ("ptp", "random")),
    ]


def sweep_methods() -> list[Row]:
    """Candidate defaults for PTP, run on the validation split to choose them (never on test); for a
    tiled model with [CLS] (the region scores are those of LLaVA-NeXT and InternVL)."""
    out = []
    for region_score in ("cls_mass", "global_similarity"):
        for vision_layer in ("paper", "feature", 0):
            adapter = {"vision_layer": vision_layer, "region_score": region_score}
            out.append(_ptp(f"ptp region={region_score} vision_layer={vision_layer}", adapter=adapter))
    for llm_layer in (0, 1, 2, 3):
        for reduce in ("max", "mean"):
            out.append(_ptp(f"ptp llm_layer={llm_layer} {reduce}", reduce=reduce, adapter={"llm_layer": llm_layer}))
    for temperature in (0.5, 1.0, 2.0, 4.0):
        out.append(_ptp(f"ptp temperature={temperature:g}", temperature=temperature))
    out.extend(_ptp(f"ptp α={a:g}", alpha=a) for a in (0.0, 0.25, 0.5, 0.75, 0.9, 1.0))
    out.extend(_ptp(f"ptp global_share={g:g}", global_share=g) for g in (0.0, 0.1, 0.25))
    out.append(_ptp("ptp without region budgets", use_region_budgets=False))
    return out


def fusion_methods() -> list[Row]:
    """Candidate fusions of saliency and relevance, at the default LLM layer (where the proxy's relevance
    is uninformative) and at layer 1 (where it is informative), run on the validation split to choose."""
    out = [_ptp("ptp α=0", alpha=0.0)]
    for llm_layer in (None, 1):
        adapter = {"llm_layer": llm_layer} if llm_layer is not None else None
        where = f" llm_layer={llm_layer}" if llm_layer is not None else ""
        for fusion in FUSIONS:
            out.extend(
                _ptp(f"ptp {fusion} α={a:g}{where}", fusion=fusion, alpha=a, adapter=adapter) for a in (0.25, 0.5, 0.75)
            )
    return out


def stage_methods() -> list[Row]:
    """The candidate defaults, run on the validation split to choose them (``ptp-eval --stage-sweep``), compared
    at matched total cost: where PTP's instruction stage runs (inside the LLM at K = 2 or 4, a separate probe
    before the LLM, a probe over the bottom-up candidates only, no instruction stage at all), how each region's
    quota is filled (top-k, the diverse pick at λ = 0.5 or 0.75), the fusion and α, beside the peers that
    prune at those stages; the control rows of each stage are added by ``with_controls``."""
    before = {"prune_in_llm": False}
    out = [_ptp("ptp", group="ptp")]
    for label, stage in (("in-LLM", {}), ("before the LLM", before)):
        out += [
            _ptp(f"ptp {label}, top_k", within_region="top_k", **stage),
            _ptp(f"ptp {label}, diverse λ=0.75", within_region="diverse", diversity=0.75, **stage),
            *(_ptp(f"ptp {label}, α={a:g}", alpha=a, **stage) for a in (0.25, 0.75)),
            _ptp(f"ptp {label}, min-max fusion", fusion="minmax", **stage),
        ]
    out += [
        _ptp("ptp in-LLM K=4", adapter={"llm_layer": 4}),
        _ptp("ptp before the LLM", **before),
        _ptp("ptp probe over 3× budget candidates", probe_candidates=3.0, **before),
        *(_ptp(f"ptp α=0, {within}", alpha=0.0, within_region=within) for within in WITHIN_REGION),
    ]
    return out + [peer("fastv"), peer("hired"), peer("uniform_cls"), peer("divprune")]


def diversity_methods() -> list[Row]:
    """How PTP fills each region's quota: the diverse pick (``within_region="diverse"``: relevance-weighted
    max–min diversity, weight λ) against plain top-k and DivPrune, at the default LLM layer and at layer 1,
    run on the validation split to choose (never on test).  Every row names its ``within_region`` except
    "ptp", the library's defaults; "candidate" rows are plotted.  The rows prune before the LLM
    (``prune_in_llm=False``), so only the within-region filling varies; ``stage_methods`` compares both inside
    the LLM."""

    def top_k(label: str, group: str = "candidate", **changes) -> Row:
        return _ptp(f"ptp top-k{label}", group=group, within_region="top_k", prune_in_llm=False, **changes)

    def diverse(label: str, diversity: float, group: str = "candidate", **changes) -> Row:
        return _ptp(
            f"ptp diverse λ={diversity:g}{label}",
            group=group,
            within_region="diverse",
            diversity=diversity,
            prune_in_llm=False,
            **changes,
        )

    return [
        _ptp("ptp", group="ptp"),
        top_k(""),
        top_k(" α=0", group="ablation", alpha=0.0),
        peer("divprune"),
        diverse("", 0.5),
        diverse("", 0.75),
        diverse(" α=0", 0.5, group="ablation", alpha=0.0),
        diverse(" without region budgets", 0.75, group="ablation", use_region_budgets=False),
        top_k(" llm_layer=1", group="ablation", adapter={"llm_layer": 1}),
        diverse(" llm_layer=1", 0.5, group="ablation", adapter={"llm_layer": 1}),
    ]
