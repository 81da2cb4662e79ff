"""Every registered selector under one signature (exact K, determinism, the shared budget check, the needs it
declares), and the behaviour that makes each peer what it is."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ptp_ros.pruning import (
    NO_REGION,
    Selection,
    SelectorSpec,
    TokenScores,
    make_selector,
    register,
    selector_names,
    selector_spec,
)
from ptp_ros.pruning.peers import attention_top_k_select, divprune_select, globalcom2_select, hired_select

#: every registered selector with its defaults, and the options that change what PTP and FastV need
CONFIGURATIONS = [(name, {}) for name in selector_names()] + [
    ("ptp", {"alpha": 0.0}),
    ("ptp", {"within_region": "top_k"}),
    ("ptp", {"alpha": 0.0, "within_region": "top_k"}),
    ("fastv", {"k": 1}),
]


def anyres_scores(seed: int = 0, tile_mass=(0.7, 0.1, 0.1, 0.1)) -> TokenScores:
    """A LLaVA-NeXT-shaped toy: global view (16 tokens) + 4 tiles of 16, a newline after every 4 tile tokens."""
    g = torch.Generator().manual_seed(seed)
    region = [0] * 16
    for tile in range(1, 5):
        for _row in range(4):
            region += [tile] * 4 + [NO_REGION]
    region = torch.tensor(region)
    n = region.shape[0]
    logits = torch.log(torch.tensor(tile_mass, dtype=torch.float64))
    region_saliency = torch.cat([torch.logsumexp(logits, 0).reshape(1) - torch.log(torch.tensor(4.0)), logits]).float()
    return TokenScores(
        region=region,
        saliency=torch.rand(n, generator=g),
        region_saliency=region_saliency,
        relevance=torch.rand(n, generator=g),
        global_region=0,
        features=torch.randn(n, 8, generator=g),
    )


@pytest.mark.parametrize("name", selector_names())
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


@pytest.mark.parametrize("name", selector_names())
def test_deterministic(name):
    a = make_selector(name)(anyres_scores(), 20)
    b = make_selector(name)(anyres_scores(), 20)
    assert torch.equal(a.kept, b.kept)


@pytest.mark.parametrize("name", selector_names())
@pytest.mark.parametrize("budget", [0, -1, 81, 2.0, 20.5, True, "20", None])
def test_one_budget_check_for_every_selector(name, budget):
    """An integer in [1, selectable tokens] (80 here: 96 tokens, 16 row newlines), else a ValueError."""
    with pytest.raises(ValueError, match="budget"):
        make_selector(name)(anyres_scores(), budget)


@pytest.mark.parametrize("name, options", CONFIGURATIONS)
def test_a_selector_reads_only_what_it_declares(name, options):
    """Without relevance (or features) a selector that declares none chooses exactly what it chooses with them;
    one that declares a reduction or an in-LLM plan names a valid one."""
    selector = make_selector(name, **options)
    full = anyres_scores()
    bare = dataclasses.replace(
        full,
        relevance=full.relevance if selector.needs_relevance else None,
        features=full.features if selector.needs_features else None,
    )
    for budget in (1, 20, 80):
        assert torch.equal(selector(bare, budget).kept, selector(full, budget).kept)
    assert selector.reduce in (None, "max", "mean") and selector.distances in (None, "all", "per_region")
    assert selector.in_llm is None or selector.needs_relevance
    if selector.distances is not None:
        assert selector.needs_features


def test_declared_needs():
    assert make_selector("text_attention").needs_relevance and make_selector("text_attention").reduce == "mean"
    assert make_selector("text_attention").in_llm is None and make_selector("fastv").in_llm is not None
    assert make_selector("fastv").reduce == "max" and make_selector("fastv").relevance_reduce(default="mean") == "max"
    assert make_selector("ptp").relevance_reduce(default="mean") == "mean"
    assert not any(
        make_selector(n).needs_relevance for n in ("hired", "globalcom2", "divprune", "random", "uniform_cls")
    )
    assert make_selector("divprune").needs_features and make_selector("divprune").distances == "all"
    assert make_selector("ptp").needs_features and make_selector("ptp").distances == "per_region"
    assert not make_selector("ptp", within_region="top_k").needs_features
    assert make_selector("ptp", use_region_budgets=False).distances == "all"
    assert make_selector("ptp", diversity=0.0).distances is None
    assert not make_selector("ptp", alpha=0.0).needs_relevance
    with pytest.raises(ValueError, match="contradicts"):
        make_selector("text_attention").relevance_reduce("max")


def test_registry_names_labels_and_options():
    names = selector_names()
    assert names[:2] == ["ptp", "fastv"] and len(set(names)) == len(names)
    labels = [selector_spec(n).label for n in names]
    assert len(set(labels)) == len(labels) and all(selector_spec(n).description for n in names)
    assert make_selector("hired", temperature=2.0).options == {"global_share": 0.5, "temperature": 2.0}
    with pytest.raises(ValueError, match="hired has no option.*nope; known: global_share, temperature"):
        make_selector("hired", nope=1)
    with pytest.raises(ValueError, match="unknown selector 'magic'; known: ptp, fastv"):
        make_selector("magic")
    with pytest.raises(ValueError, match="registered twice"):
        register(selector_spec("random"))


def test_a_new_selector_is_one_spec():
    """What a new selector writes: its function and one SelectorSpec (here bound without registering it)."""

    def first_k(scores: TokenScores, budget: int, offset: int = 0) -> Selection:
        content = torch.nonzero(scores.region != NO_REGION).squeeze(1)
        return Selection(kept=content[offset : offset + budget], total=scores.num_tokens, method="")

    spec = SelectorSpec("first_k", first_k, label="first K", description="the first K content tokens")
    selector = spec.bind(offset=2)
    assert (selector.name, selector.needs_relevance, selector.needs_features, selector.in_llm) == (
        "first_k",
        False,
        False,
        None,
    )
    selection = selector(anyres_scores(), 3)
    assert selection.kept.tolist() == [2, 3, 4] and selection.method == "first_k"
    with pytest.raises(ValueError, match="outside"):
        selector(anyres_scores(), 81)


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
    other = dataclasses.replace(
        scores, relevance=relevance, saliency=torch.rand(scores.num_tokens), region_saliency=torch.zeros(5)
    )
    assert torch.equal(attention_top_k_select(other, 16).kept, selection.kept)


def test_attention_top_k_needs_relevance():
    with pytest.raises(ValueError, match="relevance"):
        attention_top_k_select(dataclasses.replace(anyres_scores(), relevance=None), 4)


def test_divprune_picks_one_token_per_cluster():
    # three tight clusters of 10 near-duplicates: 3 diverse picks must hit all three clusters
    g = torch.Generator().manual_seed(1)
    centres = torch.eye(3, 6) * 10
    features = centres.repeat_interleave(10, 0) + 0.01 * torch.randn(30, 6, generator=g)
    scores = TokenScores(
        region=torch.zeros(30, dtype=torch.long),
        saliency=torch.rand(30, generator=g),
        region_saliency=torch.zeros(1),
        features=features,
    )
    kept = divprune_select(scores, 3).kept
    assert sorted((kept // 10).tolist()) == [0, 1, 2]
    # a saliency top-k would not: it ignores features
    assert divprune_select(dataclasses.replace(scores, saliency=torch.rand(30)), 3).kept.tolist() == kept.tolist()


def test_divprune_needs_features():
    with pytest.raises(ValueError, match="features"):
        divprune_select(dataclasses.replace(anyres_scores(), features=None), 4)


@pytest.mark.parametrize("name", selector_names())
def test_pipeline_runs_every_selector_on_the_tiny_model_with_what_it_declares(tiny_adapter, sample_image, name):
    from ptp_ros.pipeline import Pipeline, PipelineConfig
    from ptp_ros.pruning import ConfiguredSelector

    pipeline = Pipeline(tiny_adapter, PipelineConfig(selector=ConfiguredSelector(name)))
    answer = pipeline.answer(sample_image, "what is on the table ?", keep_ratio=0.25, max_new_tokens=2)
    assert answer.selection.method == name
    assert answer.selection.num_kept == round(0.25 * answer.selection.total)
    assert (answer.visual.scores.features is not None) == pipeline.selector.needs_features  # attached only if read
    assert (answer.visual.scores.relevance is not None) == pipeline.selector.needs_relevance
