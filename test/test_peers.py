"""The peer selectors: exact K, determinism, and the behaviour that makes each one what it is."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from ptp_ros.pruning import NO_REGION, TokenScores, make_selector
from ptp_ros.pruning.peers import attention_top_k_select, divprune_select, globalcom2_select, hired_select
from ptp_ros.pruning.selectors import PEER_SELECTORS, RELEVANCE_SELECTORS

PEERS = ["hired", "text_attention", "globalcom2", "divprune"]


def anyres_scores(seed: int = 0, tile_mass=(0.7, 0.1, 0.1, 0.1)) -> TokenScores:
    """A LLaVA-NeXT-shaped toy: global view (16 tokens) + 4 tiles of 16, a newline after every 4 tile tokens."""
    g = torch.Generator().manual_seed(seed)
    region = [0] * 16
    for tile in range(1, 5):
        for row in range(4):
            region += [tile] * 4 + [NO_REGION]
    region = torch.tensor(region)
    n = region.shape[0]
    logits = torch.log(torch.tensor(tile_mass, dtype=torch.float64))
    region_saliency = torch.cat([torch.logsumexp(logits, 0).reshape(1) - torch.log(torch.tensor(4.0)), logits]).float()
    return TokenScores(region=region, saliency=torch.rand(n, generator=g), region_saliency=region_saliency,
                       relevance=torch.rand(n, generator=g), global_region=0, features=torch.randn(n, 8, generator=g))


@pytest.mark.parametrize("name", PEERS)
@pytest.mark.parametrize("budget", [1, 7, 32, 80])
def test_exact_k_sorted_and_never_structural(name, budget):
    scores = anyres_scores()
    selection = make_selector(name)(scores, budget)
    assert selection.num_kept == budget
    assert torch.equal(selection.kept, torch.sort(selection.kept).values)
    assert len(set(selection.kept.tolist())) == budget
    assert bool((scores.region[selection.kept] != NO_REGION).all())
    assert int(selection.quotas.sum()) == budget
    assert selection.method == name


@pytest.mark.parametrize("name", PEERS)
def test_deterministic(name):
    a = make_selector(name)(anyres_scores(), 20)
    b = make_selector(name)(anyres_scores(), 20)
    assert torch.equal(a.kept, b.kept)


@pytest.mark.parametrize("name", PEERS)
def test_budget_out_of_range_is_refused(name):
    with pytest.raises(ValueError):
        make_selector(name)(anyres_scores(), 81)


def test_registered_and_relevance_flags():
    assert set(PEERS) <= set(PEER_SELECTORS)
    assert make_selector("text_attention").needs_relevance and "text_attention" in RELEVANCE_SELECTORS
    assert make_selector("text_attention").in_llm is None and make_selector("fastv").in_llm is not None
    assert not any(make_selector(n).needs_relevance for n in ("hired", "globalcom2", "divprune"))


def test_hired_gives_the_global_view_half_and_tiles_by_mass():
    selection = hired_select(anyres_scores(), 20)
    assert int(selection.quotas[0]) == 10  # HiRED's α = 0.5
    tiles = selection.quotas[1:]
    assert int(tiles[0]) == 7 and int(tiles.sum()) == 10  # 70 % of the mass → 7 of 10
    # inside a region the kept tokens are the region's [CLS] top-k
    scores = anyres_scores()
    g_tokens = torch.nonzero(scores.region == 0).squeeze(1)
    top = g_tokens[torch.argsort(scores.saliency[g_tokens], descending=True)[:10]]
    assert set(top.tolist()) <= set(selection.kept.tolist())


def test_globalcom2_keeps_nominal_ratio_of_global_view_and_scales_crops():
    selection = globalcom2_select(anyres_scores(), 20)
    assert int(selection.quotas[0]) == 4  # 20/80 of its 16 tokens
    assert int(selection.quotas[1]) == 11 and int(selection.quotas.sum()) == 20  # 0.7 · 16 tile tokens, rounded
    flat = globalcom2_select(anyres_scores(tile_mass=(0.25, 0.25, 0.25, 0.25)), 20)
    assert flat.quotas[1:].tolist() == [4, 4, 4, 4]


def test_attention_top_k_ignores_region_structure():
    scores = anyres_scores()
    # all relevance on tile 2: FastV takes everything from it, whatever the region budgets say
    relevance = torch.where(scores.region == 2, 1.0 + torch.rand(scores.num_tokens), torch.zeros(scores.num_tokens))
    selection = attention_top_k_select(dataclasses.replace(scores, relevance=relevance), 16)
    assert selection.quotas.tolist() == [0, 0, 16, 0, 0]
    # and changing region saliency or [CLS] saliency does not move it
    other = dataclasses.replace(scores, relevance=relevance, saliency=torch.rand(scores.num_tokens),
                                region_saliency=torch.zeros(5))
    assert torch.equal(attention_top_k_select(other, 16).kept, selection.kept)


def test_attention_top_k_needs_relevance():
    with pytest.raises(ValueError, match="relevance"):
        attention_top_k_select(dataclasses.replace(anyres_scores(), relevance=None), 4)


def test_divprune_picks_one_token_per_cluster():
    # three tight clusters of 10 near-duplicates: 3 diverse picks must hit all three clusters
    g = torch.Generator().manual_seed(1)
    centres = torch.eye(3, 6) * 10
    features = centres.repeat_interleave(10, 0) + 0.01 * torch.randn(30, 6, generator=g)
    scores = TokenScores(region=torch.zeros(30, dtype=torch.long), saliency=torch.rand(30, generator=g),
                         region_saliency=torch.zeros(1), features=features)
    kept = divprune_select(scores, 3).kept
    assert sorted((kept // 10).tolist()) == [0, 1, 2]
    # a saliency top-k would not: it ignores features
    assert divprune_select(dataclasses.replace(scores, saliency=torch.rand(30)), 3).kept.tolist() == kept.tolist()


def test_divprune_needs_features():
    with pytest.raises(ValueError, match="features"):
        divprune_select(dataclasses.replace(anyres_scores(), features=None), 4)


def test_pipeline_runs_every_peer_on_the_tiny_model(tiny_adapter, sample_image):
    from ptp_ros.pipeline import Pipeline, PipelineConfig

    for name in PEERS:
        answer = Pipeline(tiny_adapter, PipelineConfig(selector=name)).answer(
            sample_image, "what is on the table ?", keep_ratio=0.25, max_new_tokens=2)
        assert answer.selection.method == name
        assert answer.selection.num_kept == round(0.25 * answer.selection.total)
