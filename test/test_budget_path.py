"""One budget path: a keep ratio is checked by one function wherever it enters (CLI, node parameters, node
requests, the library), converted to tokens once, and options that do not apply are refused."""

from __future__ import annotations

import json
import re

import pytest

from ptp_ros.budget import MAX_LATENCY_BUDGET_MS, check_keep_ratio, ratio_tokens
from ptp_ros.pipeline import InvalidRequest, budget_request
from ptp_ros.pruning import ConfiguredSelector, resolve_budget, selectable_budget
from ptp_ros.ros.requests import RequestError, parse_request
from ptp_ros.ros.worker import Settings

MESSAGE = "keep_ratio must be in (0, 1]"


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), float("inf"), True, "0.5"])
def test_every_entry_refuses_the_same_keep_ratios_with_the_same_words(bad):
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\]"):
        check_keep_ratio(bad)
    with pytest.raises(InvalidRequest, match=r"keep_ratio must be in \(0, 1\]"):
        budget_request(bad, None)
    if bad == bad and bad not in (float("inf"), "0.5"):  # a JSON request (which has no NaN): the same check
        with pytest.raises(RequestError, match=r"keep_ratio must be in \(0, 1\]"):
            parse_request(json.dumps({"text": "q", "keep_ratio": bad}), "r", 100)
    if isinstance(bad, float):
        assert any(MESSAGE in p for p in Settings(keep_ratio=bad).problems())
        assert any(
            "keep_ratio_min must be in (0, 1]" in p for p in Settings(keep_ratio_min=bad, keep_ratio_max=1.0).problems()
        )


@pytest.mark.parametrize("good", [1e-6, 0.111, 1.0, 1])
def test_the_same_keep_ratios_pass_everywhere(good):
    assert check_keep_ratio(good) == budget_request(good, None)[0] == float(good)
    assert parse_request(f'{{"text": "q", "keep_ratio": {good}}}', "r", 100).keep_ratio == float(good)
    assert not Settings(keep_ratio=float(good)).problems()


def test_one_conversion_rounds_once_and_caps_at_the_selectable_tokens():
    import torch

    from ptp_ros.pruning import NO_REGION, TokenScores

    region = torch.tensor([0] * 90 + [NO_REGION] * 10)
    scores = TokenScores(region=region, saliency=torch.rand(100), region_saliency=torch.zeros(1))
    assert resolve_budget(100, keep_ratio=0.111) == 11 and resolve_budget(100, keep_ratio=1e-6) == 1
    assert selectable_budget(scores, keep_ratio=1.0) == 90  # newlines are never selected
    assert selectable_budget(scores, tokens=37) == 37
    assert budget_request(None, 37) == (None, 37) and budget_request(None, None) == (1.0, None)
    for bad in (0, 2.5, float("inf"), True):
        with pytest.raises(InvalidRequest, match="tokens must be a whole number >= 1"):
            budget_request(None, bad)


def test_options_that_do_not_apply_are_refused_by_the_configured_selector_whatever_their_value():
    for value in (0.3, 0.5):  # 0.5 is PTP's default: given to FastV it is still an error
        with pytest.raises(ValueError, match="fastv has no option.s. alpha; known: k"):
            ConfiguredSelector("fastv", {"alpha": value})
    with pytest.raises(ValueError, match="ptp has no option.s. k; known: alpha"):
        ConfiguredSelector("ptp", {"k": 2})
    with pytest.raises(ValueError, match="unknown selector 'magic'"):
        ConfiguredSelector("magic")
    with pytest.raises(ValueError, match="text_attention reduces its relevance by 'mean'"):
        ConfiguredSelector("text_attention", reduce="max")
    assert ConfiguredSelector("ptp", {"alpha": 0.25}).bound.options["config"].alpha == 0.25
    assert ConfiguredSelector("fastv", {"k": 3}).in_llm_plan(2).prune_layer == 3


def test_one_ratio_to_tokens_rule_for_the_pipeline_the_controller_the_overload_check_and_the_cost_model():
    from ptp_ros.latency_budget import choose_keep_ratio
    from ptp_ros_bench.cost_model import cost_table

    for total, ratio in ((2073, 0.05), (100, 0.111), (7, 0.5), (1948, 0.25)):
        assert resolve_budget(total, keep_ratio=ratio) == ratio_tokens(total, ratio) == max(1, round(ratio * total))
    row = cost_table("cpu-proxy", [0.111], visual_tokens=1948)[0]
    assert row["visual_tokens"] == ratio_tokens(1948, 0.111)

    class Flat:  # every keep ratio predicted over budget: the controller answers at keep_ratio_min's tokens
        default_stage = "in_llm"

        def ready_for(self, stage):
            return True

        def predict_total(self, kept, total, max_new_tokens, stage, views=1, encode_fraction=1.0):
            return 1e9

        def with_margin(self, ms):
            return ms

    assert choose_keep_ratio(Flat(), 100.0, 2073, 8, 0.05, 1.0).tokens == ratio_tokens(2073, 0.05)


def test_one_latency_budget_range_for_requests_and_the_parameter():
    from ptp_ros.ros.params import BY_NAME

    assert BY_NAME["latency_budget_ms"].range == (0.0, MAX_LATENCY_BUDGET_MS)  # 0 itself: refused by Settings
    message = r"latency_budget_ms must be in \(0.0, 3600000.0\]"
    for good in (1e-9, 0.5, MAX_LATENCY_BUDGET_MS):
        assert parse_request(json.dumps({"text": "q", "latency_budget_ms": good}), "r", 100).latency_budget_ms == good
        assert not Settings(latency_budget_ms=good).problems()
    for bad in (0.0, -5.0, MAX_LATENCY_BUDGET_MS * 2):
        with pytest.raises(RequestError, match=message):
            parse_request(json.dumps({"text": "q", "latency_budget_ms": bad}), "r", 100)
        assert any(re.match(message, p) for p in Settings(latency_budget_ms=bad).problems())
