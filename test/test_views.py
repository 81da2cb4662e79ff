"""Several camera views in one prompt: one budget split camera → region → token, the per-view token counts a
result and the action's feedback report, one saliency image per view, and the latency model's view count."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ptp_ros.latency_budget import LatencyModel, choose_keep_ratio
from ptp_ros.overlay import saliency_images
from ptp_ros.pipeline import InvalidRequest, Pipeline, PipelineConfig, validate_views
from ptp_ros.pruning import ConfiguredSelector, TokenScores, concat_views, select_views, view_parts, view_quotas
from ptp_ros.pruning.ptp import ptp_select

QUESTION = "what colour is the circle?"


def _scores(regions: int, per_region: int, relevance: float | None = None, seed: int = 0) -> TokenScores:
    g = torch.Generator().manual_seed(seed)
    n = regions * per_region
    return TokenScores(
        region=torch.arange(regions).repeat_interleave(per_region),
        saliency=torch.rand(n, generator=g),
        region_saliency=torch.zeros(regions),
        relevance=None if relevance is None else torch.full((n,), relevance) + 0.01 * torch.rand(n, generator=g),
    )


def test_view_quotas_add_up_and_follow_the_split():
    big, small = _scores(4, 50), _scores(2, 25, seed=1)  # 200 and 50 tokens
    joined = concat_views([big, small])
    assert joined.view_tokens == (200, 50) and int(joined.region.max()) == 5
    for split in ("shared", "equal", "alone"):
        for budget in (0, 1, 28, 250):
            quotas = view_quotas(joined, budget, split)
            assert int(quotas.sum()) == budget and bool((quotas <= torch.tensor([200, 50])).all())
    assert view_quotas(joined, 100, "equal").tolist() == [50, 50]
    assert view_quotas(joined, 100, "alone").tolist() == [80, 20]  # each view's keep ratio of its own tokens
    assert view_quotas(joined, 100, "shared").tolist() == [80, 20]  # no relevance: the size split
    with pytest.raises(ValueError, match="view_split"):
        view_quotas(joined, 10, "uneven")


def test_the_shared_split_follows_the_instruction_across_views():
    """The view whose relevance singles out a few tokens gets more than its size share, whatever the attention mass
    of each view; the other keeps at least (1 − α) of its size share."""
    flat, peaked = _scores(2, 50, relevance=0.5), _scores(2, 50, relevance=0.001, seed=1)
    peaked = dataclasses.replace(peaked, relevance=peaked.relevance.index_fill(0, torch.arange(0, 100, 10), 0.2))
    assert float(flat.relevance.sum()) > float(peaked.relevance.sum())  # more attention mass on the flat view
    quotas = view_quotas(concat_views([flat, peaked]), 40, "shared", alpha=0.5)
    assert quotas.tolist() == [10, 30]
    assert view_quotas(concat_views([flat, peaked]), 40, "equal").tolist() == [20, 20]
    assert view_quotas(concat_views([flat, peaked]), 40, "shared", alpha=0.0).tolist() == [20, 20]


def test_select_views_prunes_each_view_with_its_quota_and_merges_in_prompt_order():
    a, b = _scores(3, 20), _scores(2, 30, seed=1)
    joined = concat_views([a, b])
    merged = select_views(ptp_select, joined, torch.tensor([9, 4]))
    assert merged.total == 120 and merged.num_kept == 13
    assert torch.equal(merged.kept[:9], ptp_select(a, 9).kept) and torch.equal(
        merged.kept[9:], ptp_select(b, 4).kept + 60
    )
    assert merged.quotas.tolist()[:3] == ptp_select(a, 9).quotas.tolist() and int(merged.quotas[3:].sum()) == 4
    relevance = torch.arange(120.0)
    parts = view_parts(joined.__class__(**{**joined.__dict__, "relevance": relevance}))
    assert torch.equal(parts[1].relevance, relevance[60:]) and parts[1].num_regions == 2


def test_view_split_is_one_validated_option_of_the_configured_selector():
    assert ConfiguredSelector().view_split == "shared"
    equal = ConfiguredSelector(view_split="equal")
    assert ConfiguredSelector.from_record(equal.record()) == equal and "view_split" not in ConfiguredSelector().record()
    with pytest.raises(ValueError, match="view_split must be one of shared, equal, alone"):
        ConfiguredSelector(view_split="each")


# -- the pipeline on the tiny LLaVA-NeXT ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def frames(sample_image):
    """Two small views of the sample scene (head: the left half, wrist: a crop) — few tiles, so a fast prompt."""
    head = cv2.resize(sample_image[:, :960], (320, 360), interpolation=cv2.INTER_AREA)
    wrist = cv2.resize(sample_image[300:780, 900:1540], (320, 240), interpolation=cv2.INTER_AREA)
    return {"head": np.ascontiguousarray(head), "wrist": np.ascontiguousarray(wrist)}


@pytest.fixture(scope="module")
def pipeline(tiny_adapter):
    return Pipeline(tiny_adapter, PipelineConfig(max_new_tokens=3))


@pytest.fixture(scope="module")
def two_views(pipeline, frames):
    seen = []
    answer = pipeline.answer(frames, QUESTION, keep_ratio=0.111, on_views=seen.append)
    return answer, seen


def test_a_one_camera_mapping_answers_exactly_as_the_bare_frame(pipeline, frames):
    bare = pipeline.answer(frames["wrist"], QUESTION, keep_ratio=0.2)
    named = pipeline.answer({"wrist": frames["wrist"]}, QUESTION, keep_ratio=0.2)
    assert named.text == bare.text and torch.equal(named.selection.kept, bare.selection.kept)
    assert [v.name for v in bare.result().views] == ["image"] and [v.name for v in named.result().views] == ["wrist"]
    assert named.result().views[0].kept == bare.selection.num_kept == named.result().visual_tokens_kept


def test_two_views_share_one_budget_and_report_the_split(two_views, frames):
    answer, seen = two_views
    result = answer.result()
    assert [v.name for v in result.views] == ["head", "wrist"]
    assert sum(v.kept for v in result.views) == result.visual_tokens_kept
    assert sum(v.total for v in result.views) == result.visual_tokens_total == answer.visual.num_tokens
    assert result.visual_tokens_kept == round(0.111 * result.visual_tokens_total)
    assert seen == [result.views]  # the feedback: once, the same split the result reports
    assert result.to_json()["views"] == [{"name": v.name, "kept": v.kept, "total": v.total} for v in result.views]
    assert any(q.name.startswith("wrist: ") for q in result.quotas) and result.quotas[0].name.startswith("head: ")
    images = saliency_images(frames, answer, max_side=200)
    assert list(images) == ["head", "wrist"]
    for name, image in images.items():
        scale = 200 / max(frames[name].shape[:2])
        assert image.dtype == np.uint8 and image.shape == (*(round(s * scale) for s in frames[name].shape[:2]), 3)


def test_the_split_baselines_are_selectable(tiny_adapter, two_views, frames):
    answer, _ = two_views
    sizes = [v.total for v in answer.result().views]
    equal = Pipeline(tiny_adapter, PipelineConfig(selector=ConfiguredSelector(view_split="equal"), max_new_tokens=1))
    result = equal.answer(frames, QUESTION, keep_ratio=0.111).result()
    kept = [v.kept for v in result.views]
    assert abs(kept[0] - kept[1]) <= 1 or min(kept) == min(sizes), kept


def test_bad_views_are_refused_with_the_camera_named(pipeline, frames, tiny_adapter, monkeypatch):
    with pytest.raises(InvalidRequest, match="no camera view"):
        pipeline.answer({}, QUESTION)
    with pytest.raises(InvalidRequest, match="camera 'wrist' must be uint8"):
        pipeline.answer({"head": frames["head"], "wrist": frames["wrist"].astype(np.float32)}, QUESTION)
    with pytest.raises(InvalidRequest, match="non-empty strings"):
        pipeline.answer({"": frames["head"]}, QUESTION)
    monkeypatch.setattr(type(tiny_adapter), "supports_views", False)
    with pytest.raises(InvalidRequest, match="takes one image per prompt, not 2 camera views"):
        pipeline.answer(frames, QUESTION)


# -- the latency model -------------------------------------------------------------------------------------------
def _stages(kept: int, total: int, views: int) -> dict[str, float]:
    """100 ms of image stages per view plus 0.01 ms a frame token, prefill 1 ms per kept token."""
    return {"preprocess": 40.0 * views, "encode": 60.0 * views + 0.01 * total, "prefill": float(kept), "decode": 0.0}


def test_the_latency_model_counts_views_and_flags_a_budget_n_views_cannot_meet():
    one = LatencyModel()
    for kept, total, views in [(100, 1000, 1), (500, 1000, 1), (1000, 1000, 1), (200, 2000, 2), (900, 2000, 2)]:
        one.observe(kept, total, _stages(kept, total, views), new_tokens=1, views=views, track_error=False)
    assert one.predict_total(100, 1000, 1) == pytest.approx(100 + 10 + 100, rel=0.02)  # the one-view call, as before
    assert one.predict_total(300, 3000, 1, views=3) == pytest.approx(300 + 30 + 300, rel=0.02)
    assert choose_keep_ratio(one, 500.0, 1000, 1, 0.1, 1.0).feasible
    three = choose_keep_ratio(one, 500.0, 3000, 1, 0.1, 1.0, views=3)
    assert not three.feasible and three.keep_ratio == pytest.approx(0.1)  # 300 ms of encodes + 300 kept > 500


_FRAMES = st.one_of(
    st.just(np.zeros((20, 30, 3), np.uint8)),
    st.just(np.zeros((20, 30, 3), np.float32)),
    st.just(np.zeros((20, 30), np.uint8)),
    st.just(np.zeros((5, 30, 3), np.uint8)),
    st.none(),
    st.text(max_size=5),
    st.integers(),
)


@settings(max_examples=60, deadline=None)
@given(
    views=st.one_of(
        st.dictionaries(st.one_of(st.text(max_size=6), st.integers(), st.none()), _FRAMES, max_size=4),
        _FRAMES,
        st.lists(_FRAMES, max_size=2),
    )
)
def test_any_camera_input_is_views_or_a_clear_refusal(views):
    """Whatever arrives as ``image``: a valid frame or camera mapping comes back as name → frame in order; anything
    else is ``InvalidRequest`` (never another exception), naming the camera whose frame is wrong."""
    try:
        checked = validate_views(views)
    except InvalidRequest as exc:
        assert str(exc)
        return
    assert list(checked) == (["image"] if isinstance(views, np.ndarray) else list(views))
    assert all(isinstance(k, str) and k.strip() and v.dtype == np.uint8 and v.ndim == 3 for k, v in checked.items())
