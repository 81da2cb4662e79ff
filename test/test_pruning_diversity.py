"""PTP's diverse within-region selection (``within_region="diverse"``, the default): exact quotas,
determinism, its two limits (λ → 0: top-k; λ = 1: DivPrune inside each region) and what a user sees on
duplicated tokens."""

from __future__ import annotations

import pytest
import torch

from ptp_ros.pruning import NO_REGION, PTPConfig, TokenScores, ptp_select
from ptp_ros.pruning.peers import divprune_select
from ptp_ros.pruning.ptp import diverse_per_region, fused_scores, top_k_per_region


def random_scene(seed: int = 0, regions: int = 5, n: int = 120, dim: int = 16, relevance: bool = True) -> TokenScores:
    """``regions`` tiles of ``n`` tokens (every 37th a structural token), random scores and features."""
    g = torch.Generator().manual_seed(seed)
    region = torch.arange(regions * n) // n
    region[::37] = NO_REGION
    total = regions * n
    return TokenScores(
        region=region,
        saliency=torch.rand(total, generator=g),
        region_saliency=torch.randn(regions, generator=g),
        relevance=torch.rand(total, generator=g) if relevance else None,
        features=torch.randn(total, dim, generator=g),
    )


def diverse(diversity: float = 0.5, **changes) -> PTPConfig:
    return PTPConfig(within_region="diverse", diversity=diversity, **changes)


def top_k(**changes) -> PTPConfig:
    return PTPConfig(within_region="top_k", **changes)


def test_the_default_is_the_diverse_pick_at_half_weight():
    assert (PTPConfig().within_region, PTPConfig().diversity) == ("diverse", 0.5)
    scores = random_scene(seed=10)
    assert torch.equal(ptp_select(scores, 60).kept, ptp_select(scores, 60, diverse(0.5)).kept)
    assert ptp_select(scores, 60).extras["within_region"] == "diverse"


@pytest.mark.parametrize("budget", [0, 1, 7, 60, 250, 583])  # 583: every selectable token
@pytest.mark.parametrize("diversity", [0.0, 0.5, 1.0])
def test_each_region_gets_exactly_its_quota_and_no_token_twice(budget, diversity):
    scores = random_scene()
    selection = ptp_select(scores, budget, diverse(diversity))
    plain = ptp_select(scores, budget, top_k())
    kept = selection.kept
    assert kept.numel() == budget == kept.unique().numel()
    assert torch.equal(kept, torch.sort(kept).values)  # original order
    assert bool((scores.region[kept] != NO_REGION).all())  # structural tokens are never picked
    assert torch.equal(selection.quotas, plain.quotas)  # the region level is untouched
    assert torch.equal(torch.bincount(scores.region[kept], minlength=scores.num_regions), selection.quotas)


def test_random_invariants():
    g = torch.Generator().manual_seed(3)
    for case in range(60):
        regions = int(torch.randint(1, 6, (1,), generator=g))
        scores = random_scene(seed=case, regions=regions, n=int(torch.randint(1, 50, (1,), generator=g)))
        selectable = int(scores.region_sizes().sum())
        budget = int(torch.randint(0, selectable + 1, (1,), generator=g))
        config = diverse(float(torch.rand(1, generator=g)), alpha=float(torch.rand(1, generator=g)))
        selection = ptp_select(scores, budget, config)
        assert selection.kept.unique().numel() == budget
        assert torch.equal(torch.bincount(scores.region[selection.kept], minlength=regions), selection.quotas)


def test_deterministic():
    scores = random_scene(seed=4)
    first = ptp_select(scores, 100, diverse(0.5)).kept
    for _ in range(3):
        assert torch.equal(ptp_select(scores, 100, diverse(0.5)).kept, first)


def test_a_region_of_identical_features_still_yields_its_quota_by_relevance():
    scores = random_scene(seed=5, regions=2, n=40)
    features = scores.features.clone()
    features[scores.region == 0] = torch.ones(features.shape[1])  # every token of region 0 alike
    scores = TokenScores(
        region=scores.region,
        saliency=scores.saliency,
        region_saliency=scores.region_saliency,
        relevance=scores.relevance,
        features=features,
    )
    for diversity in (0.5, 0.9):
        selection = ptp_select(scores, 30, diverse(diversity))
        kept = selection.kept
        assert kept.unique().numel() == 30
        assert int((scores.region[kept] == 0).sum()) == int(selection.quotas[0]) > 0
        # no diversity to be had: region 0 falls back to its top-k by fused score
        fused = fused_scores(scores, 0.5)
        region0 = torch.where(scores.region == 0, scores.region, torch.full_like(scores.region, NO_REGION))
        want = top_k_per_region(fused, region0, selection.quotas[:1])
        assert torch.equal(kept[scores.region[kept] == 0], want)


@pytest.mark.parametrize("seed", range(5))
def test_without_diversity_weight_it_is_top_k(seed):
    scores = random_scene(seed=seed)
    for budget in (1, 33, 200):
        want = ptp_select(scores, budget, top_k()).kept
        assert torch.equal(ptp_select(scores, budget, diverse(0.0)).kept, want)
        assert torch.equal(ptp_select(scores, budget, diverse(1e-6)).kept, want)  # the limit, not a special case


@pytest.mark.parametrize("budget", [1, 10, 100, 500])
def test_full_weight_without_region_budgets_is_divprune(budget):
    scores = random_scene(seed=6)
    got = ptp_select(scores, budget, diverse(1.0, alpha=0.0, use_region_budgets=False)).kept
    assert torch.equal(got, divprune_select(scores, budget).kept)


def test_full_weight_is_divprune_inside_each_region():
    scores = random_scene(seed=7, regions=3, n=80)
    selection = ptp_select(scores, 50, diverse(1.0))
    for r in range(3):
        inside = scores.region == r
        alone = TokenScores(
            region=torch.where(inside, torch.zeros_like(scores.region), NO_REGION),
            saliency=scores.saliency,
            region_saliency=torch.zeros(1),
            features=scores.features,
        )
        want = divprune_select(alone, int(selection.quotas[r])).kept
        assert torch.equal(selection.kept[inside[selection.kept]], want)


def test_duplicated_salient_tokens_give_way_to_a_distinct_one():
    """One tile: a bright object seen as 6 near-identical tokens (all very salient), a second, distinct
    object that is a little less salient, and background.  Top-6 keeps six copies of the first object;
    the diverse pick keeps the first object once or a few times and the second object too."""
    g = torch.Generator().manual_seed(8)
    n, dim = 100, 32
    background = torch.randn(dim, generator=g)
    features = background + 0.05 * torch.randn(n, dim, generator=g)
    first, second = torch.randn(dim, generator=g), torch.randn(dim, generator=g)
    duplicates, distinct = list(range(10, 16)), 50
    features[duplicates] = first + 0.01 * torch.randn(len(duplicates), dim, generator=g)
    features[distinct] = second
    saliency = torch.rand(n, generator=g) * 0.1
    saliency[duplicates] = 1.0 + 0.01 * torch.arange(len(duplicates))
    saliency[distinct] = 0.9
    scores = TokenScores(
        region=torch.zeros(n, dtype=torch.long), saliency=saliency, region_saliency=torch.zeros(1), features=features
    )
    plain = ptp_select(scores, 6, top_k(alpha=0.0)).kept.tolist()
    assert plain == duplicates and distinct not in plain
    kept = ptp_select(scores, 6, diverse(0.5, alpha=0.0)).kept.tolist()
    assert distinct in kept
    assert any(i in kept for i in duplicates)  # the salient object itself is still kept


def test_without_features_it_is_top_k_and_says_so():
    scores = random_scene(seed=9)
    bare = TokenScores(
        region=scores.region,
        saliency=scores.saliency,
        region_saliency=scores.region_saliency,
        relevance=scores.relevance,
    )
    selection = ptp_select(bare, 40, diverse(0.5))
    assert torch.equal(selection.kept, ptp_select(scores, 40, top_k()).kept)
    assert selection.extras["within_region"] == "top_k"


def test_knobs_are_validated():
    with pytest.raises(ValueError):
        PTPConfig(within_region="dpp")
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError):
            PTPConfig(diversity=bad)


def test_diverse_per_region_edge_cases():
    region = torch.tensor([0, 0, NO_REGION, 1, 2, 2])
    fused = torch.tensor([0.1, 0.9, 1.0, 0.5, 0.2, 0.3])
    features = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    assert diverse_per_region(fused, region, torch.tensor([0, 0, 0]), features).numel() == 0
    everything = diverse_per_region(fused, region, torch.tensor([2, 1, 2]), features)
    assert everything.tolist() == [0, 1, 3, 4, 5]
    lone = diverse_per_region(fused, region, torch.tensor([1, 1, 0]), features, diversity=0.5)
    assert 3 in lone.tolist() and lone.numel() == 2
