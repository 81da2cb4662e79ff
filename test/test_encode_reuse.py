"""Reuse of the vision encoding (vlm/encode_cache.py): a second question on a frame runs no vision-tower forward, a
new frame re-encodes only the views that changed (tiled families; whole frames for Qwen2.5-VL), and at threshold 0
every answer, kept token and score equals encoding from scratch; the cache stays bounded; the latency model counts
only the views it will encode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

QUESTIONS = ("what colour is the circle?", "is there a cup?")
#: (height, width) of a frame per family: small enough to be quick, and 1×2 tiles and a global view where tiled
FRAME_SIZE = {"llava_next": (336, 672), "internvl": (336, 672), "qwen2_5_vl": (112, 112)}


@pytest.fixture(scope="module")
def adapters(tiny_checkpoint, tiny_adapter):
    from ptp_ros.vlm.loading import LoadOptions, load_adapter

    loaded = {"llava_next": tiny_adapter}

    def adapter(family: str):
        if family not in loaded:
            loaded[family] = load_adapter(tiny_checkpoint(family), LoadOptions(device="cpu"))
        return loaded[family]

    return adapter


def frame_of(sample_image: np.ndarray, family: str) -> np.ndarray:
    height, width = FRAME_SIZE[family]
    return np.ascontiguousarray(sample_image[200 : 200 + height, 600 : 600 + width])


class TowerRuns:
    """Counts the vision tower's forwards and the views each one read (after reuse took the reused ones out)."""

    def __init__(self, adapter):
        inner = adapter.model.model
        self.tower = getattr(inner, "vision_tower", None) or inner.visual
        self.views: list[int] = []

    def __enter__(self) -> TowerRuns:
        def count(module, args, kwargs, output):
            pixels = args[0] if args else next(iter(kwargs.values()))
            self.views.append(int(pixels.shape[0]))

        self._handle = self.tower.register_forward_hook(count, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def pipelines(adapter, threshold: float = 0.0, frames: int = 4):
    """(a pipeline with an encode cache, one encoding every frame from scratch), PTP at 25 %, 3 new tokens."""
    from ptp_ros.pipeline import Pipeline, PipelineConfig

    reusing = PipelineConfig(max_new_tokens=3, encode_cache_frames=frames, encode_reuse_threshold=threshold)
    return Pipeline(adapter, reusing), Pipeline(adapter, PipelineConfig(max_new_tokens=3))


def assert_same_answer(got, expected) -> None:
    """Answer, kept tokens, every score and the features equal, bit for bit."""
    assert got.text == expected.text
    assert torch.equal(got.selection.kept, expected.selection.kept)
    for name in ("saliency", "region_saliency", "region", "relevance"):
        assert torch.equal(getattr(got.visual.scores, name), getattr(expected.visual.scores, name)), name
    assert torch.equal(got.visual.features, expected.visual.features)


@pytest.mark.parametrize("family", ["llava_next", "internvl", "qwen2_5_vl"])
def test_a_second_question_on_a_frame_runs_no_vision_forward_and_answers_as_from_scratch(
    adapters, sample_image, family
):
    adapter = adapters(family)
    reusing, fresh = pipelines(adapter)
    frame = frame_of(sample_image, family)
    first = reusing.answer(frame, QUESTIONS[0], keep_ratio=0.25)
    with TowerRuns(adapter) as runs:
        second = reusing.answer({"another camera": frame.copy()}, QUESTIONS[1], keep_ratio=0.25)
    assert runs.views == []  # the same pixels, whichever camera: no forward at all
    assert (first.encode_reused, second.encode_reused) == (0.0, 1.0)
    assert second.result().encode_reused == 1.0
    assert_same_answer(second, fresh.answer(frame, QUESTIONS[1], keep_ratio=0.25))


@pytest.mark.parametrize("family", ["llava_next", "internvl"])
def test_threshold_zero_reencodes_only_changed_tiles_and_equals_from_scratch(adapters, sample_image, family):
    """A block painted into the top-left corner changes the left tile and the global view: only those two run through
    the tower, and the answer, kept tokens, saliency and region scores are those of encoding from scratch.  A frame
    of another size (another tile grid) reuses nothing."""
    adapter = adapters(family)
    reusing, fresh = pipelines(adapter)
    before = frame_of(sample_image, family)
    after = before.copy()
    after[20:120, 20:120] = (250, 20, 20)
    reusing.answer(before, QUESTIONS[0], keep_ratio=0.25)
    with TowerRuns(adapter) as runs:
        changed = reusing.answer(after, QUESTIONS[0], keep_ratio=0.25)
    views = len(adapter.view_pixels(adapter.prepare(after, QUESTIONS[0])))
    assert views == 3 and runs.views == [2]
    assert changed.encode_reused == pytest.approx(1 / 3)
    assert_same_answer(changed, fresh.answer(after, QUESTIONS[0], keep_ratio=0.25))

    other_grid = np.ascontiguousarray(after[:, :336])  # one tile
    with TowerRuns(adapter) as runs:
        regridded = reusing.answer(other_grid, QUESTIONS[0], keep_ratio=0.25)
    assert regridded.encode_reused == 0.0
    assert runs.views == [len(adapter.view_pixels(adapter.prepare(other_grid, QUESTIONS[0])))]


def test_two_cameras_reuse_each_cameras_encoding(adapters, sample_image):
    """A request over two cameras holds each camera's frame as its own cache entry: a second question on the same
    frames runs no tower forward and answers as a pipeline without a cache does; a new frame on one camera re-encodes
    only its changed tiles, the other camera's frame is found whole, and ``encode_reused`` is the mean of the two."""
    adapter = adapters("llava_next")
    reusing, fresh = pipelines(adapter)
    head = frame_of(sample_image, "llava_next")
    wrist = np.ascontiguousarray(sample_image[400:736, 100:772])
    reusing.answer({"head": head, "wrist": wrist}, QUESTIONS[0], keep_ratio=0.25)
    with TowerRuns(adapter) as runs:
        second = reusing.answer({"head": head.copy(), "wrist": wrist.copy()}, QUESTIONS[1], keep_ratio=0.25)
    assert runs.views == []
    assert second.encode_reused == 1.0 and second.result().encode_reused == 1.0
    expected = fresh.answer({"head": head, "wrist": wrist}, QUESTIONS[1], keep_ratio=0.25)
    assert_same_answer(second, expected)
    assert [v.name for v in second.views] == ["head", "wrist"] and second.views == expected.views
    assert second.visual.region_names == expected.visual.region_names

    moved = wrist.copy()
    moved[20:120, 20:120] = (250, 20, 20)  # the wrist's left tile and global view change
    assert reusing.expected_encode_fraction({"head": head, "wrist": moved}) == 0.5  # as the wrist's last new frame
    with TowerRuns(adapter) as runs:
        third = reusing.answer({"head": head, "wrist": moved}, QUESTIONS[0], keep_ratio=0.25)
    assert runs.views == [2] and third.encode_reused == pytest.approx((1 + 1 / 3) / 2)
    assert_same_answer(third, fresh.answer({"head": head, "wrist": moved}, QUESTIONS[0], keep_ratio=0.25))


def test_qwen2_5_vl_reuses_whole_frames_only(adapters, sample_image):
    """Window attention mixes the whole image: a frame with one changed corner is encoded whole (and answers as from
    scratch), while a frame seen before is not encoded at all."""
    adapter = adapters("qwen2_5_vl")
    reusing, fresh = pipelines(adapter)
    before = frame_of(sample_image, "qwen2_5_vl")
    after = before.copy()
    after[:16, :16] = 255
    reusing.answer(before, QUESTIONS[0], keep_ratio=0.25)
    with TowerRuns(adapter) as runs:
        changed = reusing.answer(after, QUESTIONS[0], keep_ratio=0.25)
        again = reusing.answer(before, QUESTIONS[0], keep_ratio=0.25)
    assert len(runs.views) == 1 and (changed.encode_reused, again.encode_reused) == (0.0, 1.0)
    assert_same_answer(changed, fresh.answer(after, QUESTIONS[0], keep_ratio=0.25))


class ViewMeans:
    """A model whose views are 8×8-px blocks of the frame and whose features are their mean colours: encoding costs
    nothing, so 1 000 frames take a second, and what is held is only what the cache holds."""

    independent_views = True
    tokens, width = 16, 64  # per view

    def view_pixels(self, prepared):
        return prepared.inputs["pixel_values"]

    def encode(self, prepared, views=None):
        from ptp_ros.pruning import TokenScores
        from ptp_ros.vlm.base import VisualTokens
        from ptp_ros.vlm.encode_cache import ViewReuse

        views = views or ViewReuse()
        pixels = self.view_pixels(prepared)
        run = pixels if views.encode is None else pixels[views.encode]
        means = run.mean(dim=(1, 2, 3))[:, None, None].expand(-1, self.tokens, self.width).contiguous()
        features = views.rows("features", means)
        views.rows("cls_attention", torch.ones(len(run), self.tokens))
        views.rows("cls_states", torch.ones(len(run), self.width))
        count = features.shape[0] * self.tokens
        region = torch.arange(features.shape[0]).repeat_interleave(self.tokens)
        scores = TokenScores(region=region, saliency=torch.ones(count), region_saliency=torch.zeros(len(features)))
        boxes = torch.zeros(count, 4)
        return VisualTokens(features.reshape(count, -1), scores, boxes, torch.zeros(len(features), 4), [], (8, 32))


def test_the_cache_stays_bounded_over_1000_distinct_frames():
    """1 000 distinct frames from 7 cameras through a 4-frame cache: never more than 4 frames and 4 cameras held, and
    the memory held after the 1 000th frame is what it was once the cache had filled."""
    from ptp_ros.vlm.base import PreparedInput
    from ptp_ros.vlm.encode_cache import EncodeReuse

    reuse = EncodeReuse(ViewMeans(), frames=4)
    rng = np.random.default_rng(0)
    held = []
    for i in range(1000):
        frame = rng.integers(0, 256, (8, 32, 3), dtype=np.uint8)
        views = torch.from_numpy(frame).float().permute(2, 0, 1).reshape(3, 8, 4, 8).permute(2, 0, 1, 3)
        prepared = PreparedInput({"pixel_values": views.contiguous()}, ((8, 32),), "what?")
        reuse.encode(prepared, frame, camera=f"camera {i % 7}")
        assert len(reuse) <= 4 and reuse.cameras <= 4
        if i in (20, 999):
            held.append(reuse.nbytes())
    assert reuse.stats.frames == 1000 and reuse.stats.frame_hits == 0
    assert held[1] <= held[0]


def test_the_latency_model_predicts_the_encode_from_the_views_to_encode():
    """Fitted on requests that encoded all, half or none of their frame's views, the model predicts the whole-frame
    encode for a new frame and nothing for a cached one, so the same budget buys a cached frame more tokens."""
    from ptp_ros.latency_budget import LatencyModel, choose_keep_ratio

    model = LatencyModel()
    total = 2000
    for i, fraction in enumerate([1.0, 0.5, 0.0] * 4):
        kept = (200, 600, 1200, 2000)[i % 4]
        stages = {"preprocess": 20.0, "encode": 1000.0 * fraction, "prefill": 50 + kept, "decode": 30.0}
        model.observe(kept, total, stages, new_tokens=4, encode_fraction=fraction)
    assert model.predict(500, total, 4, encode_fraction=1.0)["encode"] == pytest.approx(1000, rel=0.01)
    assert model.predict(500, total, 4, encode_fraction=0.0)["encode"] == 0.0
    new, cached = (choose_keep_ratio(model, 1700, total, 4, 0.05, 1.0, encode_fraction=f) for f in (1.0, 0.0))
    assert new.feasible and cached.feasible and cached.keep_ratio > new.keep_ratio
    with pytest.raises(ValueError, match="encode_fraction"):
        model.observe(100, total, stages, new_tokens=4, encode_fraction=1.5)


def moved_object_frames(seed: int = 0, noise: float = 2.0):
    """A proxy scene and the same scene with its one square moved to the mirrored position in the other tile column,
    each with its own sensor noise (σ in grey levels), and the square's two centres."""
    from ptp_ros.proxy import make_scene, move_object, split_seed

    scene = make_scene(split_seed("test", seed), size=(1344, 1344))
    index = next(i for i, o in enumerate(scene.objects) if o.shape == "square" and scene.count("square") == 1)
    square = scene.objects[index]
    moved = move_object(scene, index, scene.image.shape[1] - square.centre[0])
    rng = np.random.default_rng(seed)
    frames = [np.clip(s.image + rng.normal(0, noise, s.image.shape), 0, 255).astype(np.uint8) for s in (scene, moved)]
    return frames, square, (square.centre, moved.objects[index].centre)


def keeps_a_token_at(answer, point) -> bool:
    boxes = answer.visual.token_boxes[answer.selection.kept]
    x, y = point
    return bool(((boxes[:, 0] <= x) & (x <= boxes[:, 2]) & (boxes[:, 1] <= y) & (y <= boxes[:, 3])).any())


def test_a_moved_object_is_read_at_its_new_position_with_reuse_on():
    """The trained proxy LLaVA-NeXT on a noisy still camera whose one square moves from one tile to another: with a
    threshold above the noise, the tiles that only saw noise are reused and the two the square left and entered are
    re-encoded, so PTP (11.1 %) keeps the square's token at its new position and names its colour.  The control shows
    the test catches stale reuse: reusing everything keeps the token at the old position only."""
    from ptp_ros.pipeline import Pipeline, PipelineConfig
    from ptp_ros.vlm.defaults import PROXY_MODEL
    from ptp_ros.vlm.loading import LoadOptions, load_adapter

    adapter = load_adapter(PROXY_MODEL, LoadOptions(device="cpu"))
    (before, after), square, (old, new) = moved_object_frames()
    question = "what colour is the square ?"
    read = {}
    for threshold in (0.02, 1.0):
        config = PipelineConfig(max_new_tokens=2, encode_cache_frames=2, encode_reuse_threshold=threshold)
        pipeline = Pipeline(adapter, config)
        pipeline.answer(before, question, keep_ratio=0.111)
        read[threshold] = pipeline.answer(after, question, keep_ratio=0.111)
    reused = read[0.02]
    assert reused.encode_reused == pytest.approx(2 / 5)  # of the 2×2 tiles and the global view
    assert reused.text == square.colour
    assert keeps_a_token_at(reused, new) and not keeps_a_token_at(reused, old)
    stale = read[1.0]
    assert stale.encode_reused == 1.0 and keeps_a_token_at(stale, old) and not keeps_a_token_at(stale, new)
