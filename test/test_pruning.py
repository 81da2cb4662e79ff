"""PTP's algorithm pinned with small hand-checked cases and randomised invariants (pure tensors)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ptp_ros.pruning import (
    NO_REGION,
    PTPConfig,
    TokenScores,
    fused_scores,
    instruction_relevance,
    make_selector,
    ptp_select,
    region_quotas,
    region_shares,
    resolve_budget,
)
from ptp_ros.pruning.region_saliency import footprint_mass, mass_logits


def q(shares, sizes, budget, minimum=0):
    return region_quotas(torch.tensor(shares, dtype=torch.float64), torch.tensor(sizes), budget, minimum).tolist()


# -- region level ------------------------------------------------------------------------------------
def test_quotas_hand_checked():
    assert q([0.5, 0.3, 0.2], [10, 10, 10], 10) == [5, 3, 2]
    # capped region passes its excess on, in proportion
    assert q([0.9, 0.1], [3, 10], 8) == [3, 5]
    # largest remainder; equal remainders go to the lower index
    assert q([1 / 3, 1 / 3, 1 / 3], [10, 10, 10], 10) == [4, 3, 3]
    assert q([0.2, 0.45, 0.35], [10, 10, 10], 3) == [1, 1, 1]  # ideal 0.6 / 1.35 / 1.05
    # a minimum per region comes first, the rest by share
    assert q([0.98, 0.01, 0.01], [10, 10, 10], 6, minimum=1) == [4, 1, 1]
    # the minimum shrinks when the budget cannot afford it; empty regions get nothing
    assert q([0.5, 0.5, 0.0], [5, 5, 0], 1, minimum=3) == [1, 0, 0]
    assert q([0.1, 0.9], [4, 4], 8) == [4, 4]  # everything


def test_quotas_invariants_random():
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        regions = int(torch.randint(1, 9, (1,), generator=g))
        sizes = torch.randint(0, 40, (regions,), generator=g)
        if int(sizes.sum()) == 0:
            continue
        shares = region_shares(torch.randn(regions, generator=g) * 2, float(torch.rand(1, generator=g)) + 0.2)
        budget = int(torch.randint(0, int(sizes.sum()) + 1, (1,), generator=g))
        minimum = int(torch.randint(0, 4, (1,), generator=g))
        quotas = region_quotas(shares, sizes, budget, minimum)
        assert int(quotas.sum()) == budget
        assert bool((quotas <= sizes).all()) and bool((quotas >= 0).all())
        for a in range(regions):  # more salient, same size → never fewer tokens
            for b in range(regions):
                if sizes[a] == sizes[b] and shares[a] > shares[b]:
                    assert quotas[a] >= quotas[b]


def test_shares_temperature():
    logits = torch.log(torch.tensor([1.0, 3.0]))
    assert torch.allclose(region_shares(logits, 1.0), torch.tensor([0.25, 0.75], dtype=torch.float64))
    flat = region_shares(logits, 100.0)
    assert abs(float(flat[0] - flat[1])) < 0.01  # hot → uniform
    assert float(region_shares(logits, 0.05)[1]) > 0.99  # cold → winner takes all
    with pytest.raises(ValueError):
        region_shares(logits, 0.0)


def test_footprint_mass_counts_patch_centres():
    attention = torch.zeros(4, 4)
    attention[0, 0] = 0.5  # top-left patch
    attention[3, 3] = 0.25  # bottom-right patch
    attention[0, 3] = 0.25
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.0, 1.0, 0.5], [0.0, 0.5, 0.5, 1.0], [0.5, 0.5, 1.0, 1.0]])
    assert footprint_mass(attention, boxes).tolist() == [0.5, 0.25, 0.0, 0.25]
    assert torch.isfinite(mass_logits(torch.tensor([0.0, 1.0]))).all()


# -- token and instruction levels -------------------------------------------------------------------
def scores(saliency, relevance, region, region_logits, global_region=0):
    return TokenScores(
        region=torch.tensor(region),
        saliency=torch.tensor(saliency, dtype=torch.float32),
        relevance=None if relevance is None else torch.tensor(relevance, dtype=torch.float32),
        region_saliency=torch.tensor(region_logits, dtype=torch.float32),
        global_region=global_region,
    )


def test_minmax_fusion_scales_per_region_and_mixes_by_alpha():
    s = scores([1.0, 3.0, 10.0, 30.0, 0.0], [0.2, 0.1, 0.5, 0.9, 0.0], [0, 0, 1, 1, NO_REGION], [0.0, 0.0])
    assert fused_scores(s, 0.0, "minmax").tolist() == [0.0, 1.0, 0.0, 1.0, 0.5]
    assert fused_scores(s, 1.0, "minmax").tolist() == [1.0, 0.0, 0.0, 1.0, 0.5]
    assert fused_scores(s, 0.5, "minmax").tolist() == [0.5, 0.5, 0.0, 1.0, 0.5]


def test_the_default_fusion_ranks_saliency_and_weighs_relevance_by_its_concentration():
    s = scores([1.0, 3.0, 10.0, 30.0, 0.0], [0.0, 1.0, 0.5, 0.5, 0.0], [0, 0, 1, 1, NO_REGION], [0.0, 0.0])
    assert fused_scores(s, 0.0).tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]  # ranks inside each region
    # region 0: all relevance on token 1 (concentration 1); region 1: uniform (0, leaves the order alone)
    assert fused_scores(s, 1.0).tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert fused_scores(s, 0.5).tolist() == [0.0, 1.0, 0.0, 0.5, 0.0]


def random_scores(n=60, regions=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    region = torch.randint(0, regions, (n,), generator=g)
    region[::13] = NO_REGION  # structural tokens sprinkled in
    return TokenScores(
        region=region,
        saliency=torch.rand(n, generator=g),
        relevance=torch.rand(n, generator=g),
        region_saliency=torch.randn(regions, generator=g),
        global_region=0,
    )


def test_alpha_zero_ignores_instruction_and_alpha_one_ignores_saliency():
    base = random_scores()
    g = torch.Generator().manual_seed(1)
    other_relevance = dataclasses.replace(base, relevance=torch.rand(base.num_tokens, generator=g))
    other_saliency = dataclasses.replace(base, saliency=torch.rand(base.num_tokens, generator=g))
    for budget in (5, 17, 30):
        a0 = PTPConfig(alpha=0.0)
        assert torch.equal(ptp_select(base, budget, a0).kept, ptp_select(other_relevance, budget, a0).kept)
        a1 = PTPConfig(alpha=1.0)
        assert torch.equal(ptp_select(base, budget, a1).kept, ptp_select(other_saliency, budget, a1).kept)
        # and at 0.5 both matter
        mid = PTPConfig(alpha=0.5)
        assert not torch.equal(
            ptp_select(base, budget, mid).kept, ptp_select(other_saliency, budget, mid).kept
        ) or not torch.equal(ptp_select(base, budget, mid).kept, ptp_select(other_relevance, budget, mid).kept)


def test_selection_keeps_order_exact_budget_quotas_and_is_deterministic():
    s = random_scores(n=200, regions=5, seed=3)
    for budget in (1, 23, 100, int(s.region_sizes().sum())):
        sel = ptp_select(s, budget)
        assert sel.num_kept == budget
        assert torch.equal(sel.kept, torch.sort(sel.kept).values)  # original order
        assert len(set(sel.kept.tolist())) == budget
        assert (s.region[sel.kept] != NO_REGION).all()  # structural tokens are never "chosen"
        assert torch.equal(torch.bincount(s.region[sel.kept], minlength=5), sel.quotas)
        assert torch.equal(sel.kept, ptp_select(s, budget).kept)


def test_top_k_inside_each_region_by_fused_score():
    # region 0: tokens 0-3, region 1: tokens 4-7; shares 0.27 / 0.73 of 4 → 1.08 / 2.92 → 1 and 3
    s = scores([0.1, 0.9, 0.5, 0.2, 0.3, 0.8, 0.1, 0.6], None, [0, 0, 0, 0, 1, 1, 1, 1], [0.0, 1.0])
    sel = ptp_select(s, 4, PTPConfig(alpha=0.0))
    assert sel.quotas.tolist() == [1, 3]
    assert sel.kept.tolist() == [1, 4, 5, 7]


def test_global_share_and_no_region_budgets():
    s = random_scores(n=120, regions=4, seed=5)
    fixed = ptp_select(s, 40, PTPConfig(global_share=0.5))
    assert int(fixed.quotas[0]) == min(20, int(s.region_sizes()[0]))
    flat = ptp_select(s, 40, PTPConfig(use_region_budgets=False, alpha=0.0))
    best = torch.argsort(
        torch.where(s.region != NO_REGION, fused_scores(s, 0.0), torch.tensor(-1.0)), descending=True, stable=True
    )[:40]
    assert torch.equal(flat.kept, torch.sort(best).values)


def test_budget_resolution():
    assert resolve_budget(1948, keep_ratio=0.25) == 487
    assert resolve_budget(1948, keep_ratio=0.111) == 216
    assert resolve_budget(1948, keep_ratio=1.0) == 1948
    assert resolve_budget(1948, tokens=5000) == 1948
    assert resolve_budget(10, keep_ratio=0.01) == 1  # never zero
    for bad in (dict(), dict(keep_ratio=0.5, tokens=3)):  # the values themselves are checked where they enter
        with pytest.raises(ValueError, match="exactly one"):
            resolve_budget(100, **bad)


def test_instruction_relevance_max_vs_mean():
    rows = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.1, 0.4]])
    assert instruction_relevance(rows, "max").tolist() == pytest.approx([0.5, 0.7, 0.4])
    assert instruction_relevance(rows, "mean").tolist() == pytest.approx([0.3, 0.4, 0.3])


def test_config_validation_and_selector_registry():
    for bad in (dict(alpha=1.5), dict(temperature=0.0), dict(min_per_region=-1), dict(global_share=2.0)):
        with pytest.raises(ValueError):
            PTPConfig(**bad)
    with pytest.raises(ValueError, match="unknown selector"):
        make_selector("nope")
    assert make_selector("ptp", alpha=0.0).needs_relevance is False
    assert make_selector("ptp", alpha=0.5).needs_relevance is True
    s = random_scores(n=80, regions=3, seed=9)
    for name in ("random", "uniform_cls"):
        sel = make_selector(name)(s, 20)
        assert sel.num_kept == 20 and torch.equal(sel.kept, torch.sort(sel.kept).values)
        assert (s.region[sel.kept] != NO_REGION).all()
