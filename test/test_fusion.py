"""How PTP puts bottom-up saliency and top-down relevance on one scale: an uninformative (diffuse)
relevance must leave the saliency ranking alone; an informative (peaked) one must still take over."""

from __future__ import annotations

import pytest
import torch

from ptp_ros.pruning import PTPConfig, TokenScores, ptp_select
from ptp_ros.pruning.ptp import FUSIONS, concentration_per_region, fused_scores, rank_per_region

NO_REGION = -1


def heavy_tailed_tile(n: int = 576, seed: int = 0) -> TokenScores:
    """Two tiles of [CLS]-like saliency: one favourite ~1 000× the median, the rest log-normal."""
    g = torch.Generator().manual_seed(seed)
    sal = torch.exp(torch.randn(2 * n, generator=g))
    sal[0], sal[n] = sal.median() * 1100, sal.median() * 1100
    region = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])
    return TokenScores(region=region, saliency=sal, region_saliency=torch.zeros(2))


def order(values: torch.Tensor, region: torch.Tensor, r: int) -> torch.Tensor:
    inside = torch.nonzero(region == r).squeeze(1)
    return inside[torch.argsort(values[inside], descending=True, stable=True)]


@pytest.mark.parametrize("diffuse", ["uniform", "uniform plus 1% noise"])
def test_a_diffuse_relevance_leaves_the_saliency_ranking_unchanged(diffuse):
    scores = heavy_tailed_tile()
    g = torch.Generator().manual_seed(1)
    rel = torch.full((scores.num_tokens,), 1e-3)
    if diffuse != "uniform":
        rel = rel * (1 + 0.01 * torch.rand(scores.num_tokens, generator=g))
    scores = TokenScores(
        region=scores.region, saliency=scores.saliency, region_saliency=scores.region_saliency, relevance=rel
    )
    fused = fused_scores(scores, 0.5, "rank_concentration")
    for r in (0, 1):
        want, got = order(scores.saliency, scores.region, r), order(fused, scores.region, r)
        if diffuse == "uniform":
            assert torch.equal(want, got)
        else:  # 1 % noise around a uniform share barely moves anything: the top 50 stay the top 50
            assert set(want[:50].tolist()) == set(got[:50].tolist())
    # today's min-max fusion lets the same diffuse noise decide the order below each tile's favourite
    minmax = fused_scores(scores, 0.5, "minmax")
    if diffuse != "uniform":
        overlap = len(
            set(order(scores.saliency, scores.region, 0)[:50].tolist())
            & set(order(minmax, scores.region, 0)[:50].tolist())
        )
        assert overlap < 25


def test_a_peaked_relevance_still_takes_over():
    scores = heavy_tailed_tile()
    rel = torch.full((scores.num_tokens,), 1e-4)
    target = 300  # low saliency, but the instruction attends to it (a 20th of the tile's attention mass)
    rel[target] = rel[:576].sum() / 19
    scores = TokenScores(
        region=scores.region, saliency=scores.saliency, region_saliency=scores.region_saliency, relevance=rel
    )
    kept = ptp_select(scores, 16, PTPConfig(alpha=0.5, fusion="rank_concentration")).kept
    assert target in kept.tolist()
    assert target not in ptp_select(scores, 16, PTPConfig(alpha=0.0)).kept.tolist()


def test_the_terms_are_scaled_per_region_and_structural_tokens_stay_apart():
    region = torch.tensor([0, 0, 0, NO_REGION, 1, 1])
    values = torch.tensor([3.0, 1.0, 2.0, -5.0, 7.0, 9.0])
    assert rank_per_region(values, region, 2).tolist() == [1.0, 0.0, 0.5, 0.0, 0.0, 1.0]
    assert concentration_per_region(torch.ones(6), region, 2).tolist() == [0.0] * 6
    one_hot = concentration_per_region(torch.tensor([0.0, 5.0, 0.0, 1.0, 0.0, 2.0]), region, 2)
    assert one_hot.tolist() == [0.0, 1.0, 0.0, 0.0, 0.0, 1.0]


def test_every_fusion_is_a_valid_config_and_unknown_ones_are_refused():
    for fusion in FUSIONS:
        assert PTPConfig(fusion=fusion).fusion == fusion
    with pytest.raises(ValueError, match="fusion must be one of"):
        PTPConfig(fusion="softmax")
