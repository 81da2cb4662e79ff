"""One budget path: a keep ratio is checked by one function wherever it enters (CLI, node parameters, node
requests, the library), converted to tokens once, and options that do not apply are refused."""

from __future__ import annotations

import json

import pytest

from ptp_ros.pipeline import InvalidRequest, PipelineConfig, budget_request
from ptp_ros.pruning import PTPConfig, check_keep_ratio, resolve_budget, selectable_budget
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


def test_options_that_do_not_apply_are_refused():
    with pytest.raises(ValueError, match="do not apply to selector 'fastv'"):
        PipelineConfig(selector="fastv", ptp=PTPConfig(alpha=0.3))
    with pytest.raises(ValueError, match="takes its options as ptp=PTPConfig"):
        PipelineConfig(selector="ptp", selector_options={"alpha": 0.3})
    config = PipelineConfig.for_selector("ptp", {"alpha": 0.25})
    assert config.ptp.alpha == 0.25 and PipelineConfig.for_selector("fastv", {"k": 3}).selector_options == {"k": 3}
