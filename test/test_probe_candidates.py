"""PTP's cheaper instruction stage: the relevance probe reads only the bottom-up best candidates."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from ptp_ros.pipeline import Pipeline, PipelineConfig, candidate_relevance
from ptp_ros.pruning import ConfiguredSelector as Configured
from ptp_ros.pruning import PTPConfig, ptp_select, resolve_budget

INSTRUCTION = "what colour is the circle?"


@pytest.fixture(scope="module")
def prepared_visual(tiny_adapter, sample_image):
    prepared = tiny_adapter.prepare(sample_image, INSTRUCTION)
    return prepared, tiny_adapter.encode(prepared)


def test_probe_reads_only_the_candidates_and_the_text(tiny_adapter, prepared_visual, monkeypatch):
    prepared, visual = prepared_visual
    budget = resolve_budget(visual.num_tokens, keep_ratio=0.111)
    seen = {}
    original = type(tiny_adapter).instruction_attention

    def spy(self, prepared, visual, kept=None):
        seen["kept"] = kept
        return original(self, prepared, visual, kept)

    monkeypatch.setattr(type(tiny_adapter), "instruction_attention", spy)
    relevance = candidate_relevance(tiny_adapter, prepared, visual, PTPConfig(), budget, 3.0, "max")
    candidates = seen["kept"]
    assert candidates.numel() == math.ceil(3.0 * budget)
    expected = ptp_select(
        dataclasses.replace(visual.scores, relevance=None, features=visual.features),
        candidates.numel(),
        PTPConfig(alpha=0.0),
    ).kept
    assert torch.equal(candidates, expected)  # the bottom-up best, with PTP's own region budgets
    outside = torch.ones(visual.num_tokens, dtype=torch.bool)
    outside[candidates] = False
    assert (relevance[outside] == 0).all() and (relevance[candidates] > 0).all()
    # each instruction row is a softmax over the shorter prompt: its visual share sums to at most 1
    rows = original(tiny_adapter, prepared, visual, candidates)
    assert rows.shape[1] == candidates.numel() and float(rows.sum(1).max()) <= 1.0 + 1e-5


def test_pipeline_with_candidates_keeps_the_budget(tiny_adapter, sample_image):
    full = Pipeline(tiny_adapter, PipelineConfig(selector=Configured(prune_in_llm=False), max_new_tokens=1))
    narrow = Pipeline(
        tiny_adapter, PipelineConfig(selector=Configured(prune_in_llm=False, probe_candidates=3.0), max_new_tokens=1)
    )
    a = full.answer(sample_image, INSTRUCTION, keep_ratio=0.111)
    b = narrow.answer(sample_image, INSTRUCTION, keep_ratio=0.111)
    assert a.selection.num_kept == b.selection.num_kept == resolve_budget(a.selection.total, keep_ratio=0.111)
    # most of the choice is the bottom-up one both share
    overlap = len(set(a.selection.kept.tolist()) & set(b.selection.kept.tolist())) / a.selection.num_kept
    assert overlap > 0.5


@pytest.mark.parametrize(
    "config",
    [
        dict(probe_candidates=0.5, prune_in_llm=False),
        dict(probe_candidates=float("nan"), prune_in_llm=False),
        dict(probe_candidates=3.0, name="hired", prune_in_llm=False),
        dict(probe_candidates=3.0),
    ],
)  # the default prunes inside the LLM: no probe
def test_candidate_options_are_checked(config):
    with pytest.raises(ValueError, match="probe_candidates"):
        Configured(**config)
