"""Budgets are exact: no request gets more visual tokens than it asked for, under any newline policy or
selector, and the JSON's numbers agree with each other."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptp_ros.pipeline import NEWLINE_POLICIES, Answer, Pipeline, PipelineConfig
from ptp_ros.pruning import NO_REGION, VIEW_SPLITS, instruction_relevance, resolve_budget, selector_names
from ptp_ros.pruning import ConfiguredSelector as Configured

INSTRUCTION = "what colour is the circle?"
TOTAL = 1948  # the sample scene on the tiny LLaVA-NeXT: 576 global + 4×336 tiles + 28 row newlines
NEWLINES = 28
TOKENS = [1, 2, 5, 10, 27, 28, 29, 30, 50, 487, 1919, 1920, 1921, 1947, TOTAL, TOTAL + 100]


@pytest.fixture(scope="module")
def visual(tiny_adapter, sample_image):
    """Encoded once, with everything any selector reads (relevance for ptp/fastv, features for divprune)."""
    prepared = tiny_adapter.prepare(sample_image, INSTRUCTION)
    visual = tiny_adapter.encode(prepared)
    relevance = instruction_relevance(tiny_adapter.instruction_attention(prepared, visual), "max")
    visual.scores = dataclasses.replace(visual.scores, features=visual.features, relevance=relevance)
    assert visual.num_tokens == TOTAL and int((visual.scores.region == NO_REGION).sum()) == NEWLINES
    return visual


@pytest.fixture(scope="module")
def pipelines(tiny_adapter):
    return {
        (name, policy): Pipeline(tiny_adapter, PipelineConfig(selector=Configured(name), newline_policy=policy))
        for name in selector_names()
        for policy in NEWLINE_POLICIES
    }


def check(pipeline: Pipeline, visual, tokens: int) -> dict:
    budget = resolve_budget(visual.num_tokens, tokens=tokens)
    assert budget == min(tokens, visual.num_tokens)
    selection = pipeline.select(visual.num_tokens, visual.scores, budget)
    kept = selection.kept
    assert 1 <= selection.num_kept <= budget <= tokens
    assert selection.total == visual.num_tokens
    assert torch.equal(kept, torch.sort(kept).values) and kept.unique().numel() == kept.numel()
    assert int(kept.min()) >= 0 and int(kept.max()) < visual.num_tokens
    region = visual.scores.region[kept]
    assert bool((region != NO_REGION).any())  # never only newlines
    if pipeline.config.newline_policy == "drop" and budget < visual.num_tokens:
        assert not bool((region == NO_REGION).any())
    data = (
        Answer(
            text="",
            selection=selection,
            visual=visual,
            timings_ms={},
            prompt_tokens=0,
            new_tokens=0,
            selector=pipeline.selector.name,
        )
        .result()
        .to_json()
    )
    assert data["visual_tokens_total"] == visual.num_tokens
    assert data["visual_tokens_kept"] == selection.num_kept
    assert sum(q["kept"] for q in data["quotas"]) + data["structural_kept"] == data["visual_tokens_kept"]
    assert sum(q["size"] for q in data["quotas"]) + data["structural_total"] == data["visual_tokens_total"]
    assert all(0 <= q["kept"] <= q["size"] for q in data["quotas"])
    assert 0 <= data["structural_kept"] <= data["structural_total"]
    assert data["keep_ratio"] == pytest.approx(data["visual_tokens_kept"] / data["visual_tokens_total"], abs=1e-6)
    return data


@pytest.mark.parametrize("policy", NEWLINE_POLICIES)
@pytest.mark.parametrize("name", selector_names())
def test_no_budget_overshoot_for_any_newline_policy(pipelines, visual, name, policy):
    pipeline = pipelines[name, policy]
    for tokens in TOKENS:
        data = check(pipeline, visual, tokens)
        budget = min(tokens, TOTAL)
        if budget == TOTAL:  # keep-all: every token, newlines included
            assert data["visual_tokens_kept"] == TOTAL and data["structural_kept"] == NEWLINES
        elif policy == "drop":  # exact up to what is selectable
            assert data["visual_tokens_kept"] == min(budget, TOTAL - NEWLINES)
        elif budget > NEWLINES:  # every newline and the rest content: exact
            assert data["visual_tokens_kept"] == budget and data["structural_kept"] == NEWLINES


@pytest.mark.parametrize("name", selector_names())
def test_small_keep_budgets_keep_only_the_newlines_of_kept_rows(pipelines, visual, name):
    """Below one newline per row plus a token, a newline survives only to end a row that holds a kept token."""
    pipeline = pipelines[name, "keep"]
    region = visual.scores.region
    structural = torch.nonzero(region == NO_REGION).squeeze(1)
    for budget in (1, 2, 5, 10, NEWLINES - 1, NEWLINES):
        kept = pipeline.select(visual.num_tokens, visual.scores, budget).kept
        assert kept.numel() <= budget
        newlines = kept[region[kept] == NO_REGION]
        rows_with_content = set()
        for t in kept[(region[kept] != NO_REGION) & (region[kept] != visual.scores.global_region)].tolist():
            rows_with_content.add(int(structural[torch.searchsorted(structural, torch.tensor(t))]))
        assert set(newlines.tolist()) <= rows_with_content
        if budget >= 2:  # room for a token and its newline: every kept row stays delimited
            assert set(newlines.tolist()) == rows_with_content


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    tokens=st.integers(min_value=1, max_value=TOTAL + 50),
    policy=st.sampled_from(NEWLINE_POLICIES),
    name=st.sampled_from(selector_names()),
)
def test_any_token_budget_is_respected(pipelines, visual, tokens, policy, name):
    check(pipelines[name, policy], visual, tokens)


def test_reported_case_end_to_end(tiny_adapter, sample_image):
    """The issue's case: keep + tokens=10 returned 29 tokens; now ≤ 10, and the prompt shrinks to match."""
    pipeline = Pipeline(
        tiny_adapter, PipelineConfig(selector=Configured(prune_in_llm=False), newline_policy="keep", max_new_tokens=1)
    )
    full = pipeline.answer(sample_image, INSTRUCTION, tokens=TOTAL)
    answer = pipeline.answer(sample_image, INSTRUCTION, tokens=10)
    data = answer.result().to_json()
    assert 1 <= data["visual_tokens_kept"] <= 10
    assert sum(q["kept"] for q in data["quotas"]) + data["structural_kept"] == data["visual_tokens_kept"]
    assert data["keep_ratio"] == pytest.approx(data["visual_tokens_kept"] / TOTAL, abs=1e-6)
    assert answer.prompt_tokens == full.prompt_tokens - (TOTAL - data["visual_tokens_kept"])
    full_data = full.result().to_json()
    assert full_data["visual_tokens_kept"] == TOTAL and full_data["structural_kept"] == NEWLINES
    assert sum(q["kept"] for q in full_data["quotas"]) + full_data["structural_kept"] == TOTAL


@pytest.fixture(scope="module")
def two_views(tiny_adapter, sample_image):
    """The sample scene and a crop of it in one prompt, encoded once, with relevance and features."""
    import cv2

    frames = [cv2.resize(sample_image, (480, 270)), cv2.resize(sample_image[200:800, 300:1100], (320, 240))]
    prepared = tiny_adapter.prepare(frames, INSTRUCTION)
    visual = tiny_adapter.encode(prepared)
    relevance = instruction_relevance(tiny_adapter.instruction_attention(prepared, visual), "max")
    visual.scores = dataclasses.replace(visual.scores, features=visual.features, relevance=relevance)
    return visual


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fraction=st.floats(min_value=0.0, max_value=1.05),
    policy=st.sampled_from(NEWLINE_POLICIES),
    name=st.sampled_from(selector_names()),
    split=st.sampled_from(VIEW_SPLITS),
)
def test_any_budget_over_several_views_is_respected_and_split_across_them(
    tiny_adapter, two_views, fraction, policy, name, split
):
    """One budget over two views, any selector, newline policy and camera split: never more than asked, the kept
    counts of the views add up to it, and each view keeps only its own tokens."""
    from ptp_ros.pipeline import view_tokens

    pipeline = Pipeline(
        tiny_adapter, PipelineConfig(selector=Configured(name, view_split=split), newline_policy=policy)
    )
    tokens = max(1, round(fraction * two_views.num_tokens))
    data = check(pipeline, two_views, tokens)
    selection = pipeline.select(two_views.num_tokens, two_views.scores, min(tokens, two_views.num_tokens))
    views = view_tokens(("a", "b"), two_views.scores, selection.kept)
    assert sum(v.kept for v in views) == data["visual_tokens_kept"] and [v.total for v in views] == list(
        two_views.scores.view_tokens
    )
    assert all(0 <= v.kept <= v.total for v in views)
