"""Pyramid Token Pruning: region budgets → token saliency → instruction relevance, fused with α.

The whole method, as pure tensor code: the adapters supply ``TokenScores``, this file decides.
See docs/method.md for which choices are the paper's and which are ours.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .budgets import region_quotas, region_shares
from .registry import SelectorSpec, register
from .types import NO_REGION, Selection, TokenScores, check_budget


@dataclass(frozen=True)
class PTPConfig:
    """Knobs of the method; defaults are documented in docs/method.md."""

    alpha: float = 0.5  # weight of top-down instruction relevance in the fused score
    temperature: float = 1.0  # region-share temperature (see budgets.region_shares)
    min_per_region: int = 0  # tokens every non-empty region keeps at least
    global_share: float | None = None  # fixed budget share of the global view; None = by saliency
    use_region_budgets: bool = True  # False: one global top-K over all regions (ablation)
    fusion: str = "rank_concentration"  # how the two terms share one scale (FUSIONS; chosen on validation)
    within_region: str = "diverse"  # how a region's quota is filled (WITHIN_REGION; chosen on validation)
    diversity: float = 0.5  # "diverse": weight λ of the diversity term (0 = top-k, 1 = max–min diversity)

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.min_per_region < 0:
            raise ValueError(f"min_per_region must be >= 0, got {self.min_per_region}")
        if self.global_share is not None and not 0.0 <= self.global_share <= 1.0:
            raise ValueError(f"global_share must be in [0, 1], got {self.global_share}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        if self.within_region not in WITHIN_REGION:
            raise ValueError(f"within_region must be one of {', '.join(WITHIN_REGION)}, got {self.within_region!r}")
        if not 0.0 <= self.diversity <= 1.0:
            raise ValueError(f"diversity must be in [0, 1], got {self.diversity}")


def minmax_per_region(values: torch.Tensor, region: torch.Tensor, num_regions: int) -> torch.Tensor:
    """Scale ``values`` to [0, 1] inside each region (a constant region maps to 0.5).

    Per region because [CLS] attention is a softmax inside each tile: raw values of different tiles
    are not on one scale.
    """
    v = values.double()
    out = torch.full_like(v, 0.5)
    valid = region != NO_REGION
    idx = region.clamp(min=0)
    lo = torch.full((num_regions,), float("inf"), dtype=v.dtype).scatter_reduce(0, idx[valid], v[valid], "amin")
    hi = torch.full((num_regions,), float("-inf"), dtype=v.dtype).scatter_reduce(0, idx[valid], v[valid], "amax")
    span = (hi - lo)[idx]
    scaled = (v - lo[idx]) / torch.where(span > 0, span, torch.ones_like(span))
    out = torch.where(valid & (span > 0), scaled, out)
    return out.float()


def rank_per_region(values: torch.Tensor, region: torch.Tensor, num_regions: int) -> torch.Tensor:
    """Each value's rank inside its region scaled to [0, 1] (0 = lowest, 1 = highest; ties by index).

    Keeps the order and forgets the scale: a heavy-tailed saliency (one [CLS] favourite ~1 000× the
    median) does not squash every other token of its tile next to zero.
    """
    valid = region != NO_REGION
    idx = torch.where(valid, region, torch.full_like(region, num_regions))  # structural tokens: a bucket apart
    order = torch.argsort(values.double(), stable=True)
    order = order[torch.argsort(idx[order], stable=True)]  # by region, ascending value inside
    counts = torch.bincount(idx, minlength=num_regions + 1)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel()) - starts[idx[order]]
    scaled = rank.double() / (counts[idx] - 1).clamp(min=1)
    return torch.where(valid, scaled, torch.zeros_like(scaled)).float()


def concentration_per_region(values: torch.Tensor, region: torch.Tensor, num_regions: int) -> torch.Tensor:
    """How far each token's share of its region's mass exceeds a uniform share, on a log scale in [0, 1]:
    ``clamp(log(n · p) / log n, 0, 1)`` with ``p`` the token's share and ``n`` the region's size.

    A uniform (uninformative) signal gives 0 everywhere; a token holding all of the region's mass gives 1.
    """
    v = values.double().clamp(min=0)
    valid = region != NO_REGION
    idx = region.clamp(min=0)
    mass = torch.zeros(num_regions, dtype=v.dtype).scatter_add(0, idx[valid], v[valid])
    size = torch.bincount(idx[valid], minlength=num_regions).double()
    n, total = size[idx], mass[idx]
    share = torch.where(total > 0, v / torch.where(total > 0, total, torch.ones_like(total)), 1.0 / n.clamp(min=1))
    excess = torch.log((n * share).clamp(min=1e-12)) / torch.log(n.clamp(min=2))
    return torch.where(valid, excess.clamp(0, 1), torch.zeros_like(excess)).float()


def raw_values(values: torch.Tensor, region: torch.Tensor, num_regions: int) -> torch.Tensor:
    """``values`` as they are (the attention probabilities themselves)."""
    return values.float()


#: name → (bottom-up scale, top-down scale), each ``f(values, region, num_regions)`` per token.  "minmax"
#: scales both to [0, 1] per region; "rank_concentration" ranks the saliency and measures how much the
#: relevance exceeds a uniform share, so an uninformative relevance leaves the saliency order as it is;
#: "minmax_raw" adds the raw attention (the third-party reading of the paper, research notes).
FUSIONS = {
    "minmax": (minmax_per_region, minmax_per_region),
    "rank_concentration": (rank_per_region, concentration_per_region),
    "minmax_raw": (minmax_per_region, raw_values),
}


def fused_scores(scores: TokenScores, alpha: float, fusion: str = "rank_concentration") -> torch.Tensor:
    """score = (1 − α)·bottom-up term + α·top-down term, per token, both terms as ``fusion`` scales them.

    Without a relevance signal (instruction stage off) the score is the bottom-up term alone.
    """
    bottom_up, top_down = FUSIONS[fusion]
    region, r = scores.region.cpu(), scores.num_regions
    sal = bottom_up(scores.saliency.cpu(), region, r)
    if scores.relevance is None or alpha == 0.0:
        return sal
    rel = top_down(scores.relevance.cpu(), region, r)
    if alpha == 1.0:
        return rel
    return (1.0 - alpha) * sal + alpha * rel


def budget_shares(scores: TokenScores, config: PTPConfig) -> torch.Tensor:
    """Each region's share of the budget, with the global view's share fixed when configured."""
    shares = region_shares(scores.region_saliency.cpu(), config.temperature)
    g = scores.global_region
    if config.global_share is None or g is None or scores.num_regions == 1:
        return shares
    others = shares.clone()
    others[g] = 0.0
    others = others / others.sum() * (1.0 - config.global_share)
    others[g] = config.global_share
    return others


def top_k_per_region(fused: torch.Tensor, region: torch.Tensor, quotas: torch.Tensor) -> torch.Tensor:
    """Indices of the ``quotas[r]`` best tokens of every region, in original order (ties: lower index)."""
    order = torch.argsort(fused, descending=True, stable=True)
    order = order[region[order] != NO_REGION]
    order = order[torch.argsort(region[order], stable=True)]  # grouped by region, best first
    reg = region[order]
    group_start = torch.cumsum(torch.bincount(reg, minlength=quotas.shape[0]), 0) - torch.bincount(
        reg, minlength=quotas.shape[0]
    )
    rank = torch.arange(order.shape[0]) - group_start[reg]
    return torch.sort(order[rank < quotas[reg]]).values


def diverse_per_region(
    fused: torch.Tensor, region: torch.Tensor, quotas: torch.Tensor, features: torch.Tensor, diversity: float = 0.5
) -> torch.Tensor:
    """Indices of ``quotas[r]`` tokens of every region, chosen greedily for relevance and diversity.

    Inside each region, step by step, the token with the largest gain
    ``(1 − λ)·fused + λ·d / max d`` joins, where ``d`` is its cosine distance (of ``features``) to the
    nearest token already kept in the region — before the first pick, to its nearest neighbour in the
    region, as DivPrune starts — and ``max d`` the largest ``d`` among the region's candidates (a region
    of identical features has ``d = 0``: the fused score alone decides).  ``λ = 0`` is
    ``top_k_per_region``; ``λ = 1`` is DivPrune's max–min selection inside each region.  All regions step
    together ([R, n, n] distances, one argmax per region a step, ties to the lower index); returns the
    kept indices in original order, exactly ``quotas[r]`` of region r.
    """
    r_count = quotas.shape[0]
    tokens = torch.nonzero(region != NO_REGION).squeeze(1)
    tokens = tokens[torch.argsort(region[tokens], stable=True)]  # grouped by region, original order inside
    reg = region[tokens]
    counts = torch.bincount(reg, minlength=r_count)
    if tokens.numel() == 0 or int(quotas.sum()) == 0:
        return torch.empty(0, dtype=torch.long)
    width = int(counts.max())
    slot = torch.arange(tokens.shape[0]) - (torch.cumsum(counts, 0) - counts)[reg]
    table = torch.full((r_count, width), -1, dtype=torch.long)
    table[reg, slot] = tokens
    valid = table >= 0
    device = features.device
    feats = torch.nn.functional.normalize(features[table.clamp(min=0).to(device)].float(), dim=-1)
    feats = feats * valid.to(device).unsqueeze(-1)
    distance = (1.0 - feats @ feats.transpose(1, 2)).clamp_(min=0.0).cpu()  # [R, n, n] cosine distance
    # a padding column or the token itself is never a neighbour; both stay +inf (a kept or padding token is
    # never a candidate again, so its column is not read after this)
    distance.masked_fill_(~valid.unsqueeze(1), float("inf")).diagonal(dim1=1, dim2=2).fill_(float("inf"))
    nearest = distance.amin(dim=2)
    nearest = torch.where(torch.isfinite(nearest), nearest, torch.zeros_like(nearest)).double()  # a lone token: 0
    relevance = (1.0 - diversity) * torch.where(valid, fused.double()[table.clamp(min=0)], torch.zeros_like(nearest))
    blocked = ~valid  # padding and kept tokens: never (again) a candidate
    d = nearest  # step 0: distance to the nearest neighbour; then to the nearest kept token
    rows = torch.arange(r_count)
    for step in range(int(quotas.max())):
        d = d.masked_fill(blocked, 0.0)
        top = d.amax(dim=1, keepdim=True)
        gain = relevance + diversity * d / torch.where(top > 0, top, torch.ones_like(top))
        pick = torch.argmax(gain.masked_fill_(blocked, float("-inf")), dim=1)
        blocked[rows, pick] |= quotas > step  # a region past its quota picks nothing
        d = distance[rows, pick].double() if step == 0 else torch.minimum(d, distance[rows, pick].double())
    return torch.sort(table[blocked & valid]).values


#: name → how a region's quota is filled from the fused scores (and, for "diverse", the features).
WITHIN_REGION = ("top_k", "diverse")


def ptp_select(scores: TokenScores, budget: int, config: PTPConfig = PTPConfig()) -> Selection:
    """Keep ``budget`` tokens: region quotas from region saliency, then inside each region a greedy
    relevance-weighted diversity pick (``within_region="diverse"``, ``diverse_per_region``) or the top-K_r
    by fused score ("top_k")."""
    region = scores.region.cpu()
    sizes = scores.region_sizes()
    check_budget(scores, budget, minimum=0)
    fused = fused_scores(scores, config.alpha, config.fusion)
    # "diverse" reads the projected features (the pipeline and ptp-eval pass them); scores without them
    # have nothing to be diverse over and are ranked top-k, which the selection records in ``extras``
    diverse = config.within_region == "diverse" and scores.features is not None
    if config.use_region_budgets:
        quotas = region_quotas(budget_shares(scores, config), sizes, budget, config.min_per_region)
        kept = (
            diverse_per_region(fused, region, quotas, scores.features, config.diversity)
            if diverse
            else top_k_per_region(fused, region, quotas)
        )
    elif diverse:  # one group of every selectable token: relevance-weighted DivPrune
        group = torch.where(region != NO_REGION, torch.zeros_like(region), region)
        kept = diverse_per_region(fused, group, torch.tensor([budget]), scores.features, config.diversity)
        quotas = torch.bincount(region[kept], minlength=scores.num_regions)
    else:
        masked = torch.where(region != NO_REGION, fused.double(), torch.tensor(float("-inf"), dtype=torch.double))
        kept = torch.sort(torch.argsort(masked, descending=True, stable=True)[:budget]).values
        quotas = torch.bincount(region[kept], minlength=scores.num_regions)
    return Selection(
        kept=kept,
        total=scores.num_tokens,
        quotas=quotas,
        region_sizes=sizes,
        fused=fused,
        method="ptp",
        extras={"within_region": "diverse" if diverse else "top_k"},
    )


def _ptp_options(**fields) -> dict:
    """PTP's options are ``PTPConfig``'s fields; an unknown one is a ``ValueError`` naming the known ones."""
    known = [f.name for f in dataclasses.fields(PTPConfig)]
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ValueError(f"ptp has no option(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return {"config": PTPConfig(**fields)}


def _ptp_distances(options: dict) -> str | None:
    """The diverse pick's cosine distances: one matrix per region, or one over all tokens without region
    budgets; none for top-k or λ = 0."""
    config = options["config"]
    if config.within_region != "diverse" or config.diversity == 0:
        return None
    return "per_region" if config.use_region_budgets else "all"


register(
    SelectorSpec(
        "ptp",
        ptp_select,
        label="ptp",
        description="Pyramid Token Pruning: region budgets by region saliency, then in each region the tokens best "
        "by [CLS] saliency fused with instruction relevance (alpha), picked for diversity",
        options=_ptp_options,
        needs_relevance=lambda options: options["config"].alpha > 0,
        needs_features=lambda options: options["config"].within_region == "diverse",
        relevance_in_llm=True,
        distances=_ptp_distances,
    )
)


def instruction_relevance(attention_rows: torch.Tensor, reduce: str = "max") -> torch.Tensor:
    """Per visual token, the max (paper) or mean over instruction tokens of text→visual attention.

    ``attention_rows`` is [instruction tokens, N]; returns [N].
    """
    if reduce == "max":
        return attention_rows.max(dim=0).values
    if reduce == "mean":
        return attention_rows.mean(dim=0)
    raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
