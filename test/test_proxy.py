"""The proxy task: deterministic, disjoint splits, ground truth that matches the pixels, and objects
sized so that the tiles resolve them and the global view does not."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ptp_ros.proxy import COLOURS, QUESTION_TYPES, make_questions, make_scene, proxy_words, split_seed
from ptp_ros.proxy.scenes import CENTRE_BAND, COUNT_WORDS, PATCH, TILE_OBJECT_PX, anyres_scale, patch_centres

SCENES = [make_scene(split_seed("val", k)) for k in range(12)]


def test_scenes_are_deterministic_and_splits_disjoint():
    a, b = make_scene(split_seed("test", 3)), make_scene(split_seed("test", 3))
    assert np.array_equal(a.image, b.image) and a.objects == b.objects
    assert not np.array_equal(make_scene(split_seed("train", 3)).image[:50], a.image[:50])
    seeds = {s: {split_seed(s, k) for k in (0, 1, 9_999_999)} for s in ("train", "val", "test")}
    assert not (seeds["train"] & seeds["val"] or seeds["val"] & seeds["test"] or seeds["train"] & seeds["test"])
    with pytest.raises(ValueError):
        split_seed("dev", 0)


def test_scenes_are_high_resolution_with_varied_grids():
    assert all(max(s.image.shape[:2]) >= 1344 and s.image.dtype == np.uint8 for s in SCENES)
    assert len({s.image.shape[:2] for s in SCENES}) >= 3


def test_objects_are_tile_sized_and_below_a_global_patch():
    for s in SCENES:
        h, w = s.image.shape[:2]
        assert s.tile_scale == pytest.approx(anyres_scale(h, w))
        for o in s.objects:
            side = o.box[2] - o.box[0]
            assert TILE_OBJECT_PX[0] - 1e-6 <= side * s.tile_scale <= TILE_OBJECT_PX[1] + 1e-6
            assert side * 336 / max(h, w) < 14  # under one patch of the global view along the long side


def test_each_object_fills_one_tile_patch_of_its_own():
    """Objects are centred on a tile patch (so one tile token holds each), never in neighbouring patches."""
    for s in SCENES:
        xs, ys = patch_centres(*s.image.shape[:2])
        cells = []
        for o in s.objects:
            i, j = np.abs(xs - o.centre[0]).argmin(), np.abs(ys - o.centre[1]).argmin()
            assert abs(xs[i] - o.centre[0]) < 1e-6 and abs(ys[j] - o.centre[1]) < 1e-6
            assert (o.box[2] - o.box[0]) * s.tile_scale < PATCH
            cells.append((i, j))
        assert all(max(abs(a - c), abs(b - d)) >= 2 for k, (a, b) in enumerate(cells) for c, d in cells[:k])


def test_crowded_scenes_are_for_pre_training_only():
    crowded = make_scene(split_seed("train", 1), crowd=60)
    assert len(crowded.objects) == 60
    assert make_scene(split_seed("train", 1)).objects != crowded.objects


def test_object_pixels_have_the_labelled_colour():
    for s in SCENES:
        for o in s.objects:
            if o.shape not in ("circle", "square"):  # filled at the centre
                continue
            cx, cy = (int(v) for v in o.centre)
            pixel = s.image[cy, cx].astype(int)
            nearest = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - pixel).sum())
            assert nearest == o.colour, (s.seed, o, pixel)


def test_questions_match_the_ground_truth():
    words = set(proxy_words())
    types = set()
    for s in SCENES:
        for q in make_questions(s, per_type=3):
            types.add(q.qtype)
            assert set(q.text.split()) <= words and q.answer in words
            targets = [s.objects[t] for t in q.targets]
            if q.qtype == "colour":
                assert len(targets) == 1 and targets[0].colour == q.answer
            elif q.qtype == "count":
                assert COUNT_WORDS.index(q.answer) == len(targets)
                assert all(o.shape in q.text or o.shape + "es" in q.text for o in targets)
            elif q.qtype == "location":
                assert sum(o.colour == targets[0].colour for o in s.objects) == 1
                assert q.text.split()[2:4] == [targets[0].colour, targets[0].shape]
                x = targets[0].centre[0] / s.image.shape[1]
                assert not CENTRE_BAND[0] < x < CENTRE_BAND[1]
                assert q.answer == ("left" if x < 0.5 else "right")
            else:
                colour, shape = q.text.split()[3:5]
                present = any(o.colour == colour and o.shape == shape for o in s.objects)
                assert q.answer == ("yes" if present else "no")
    assert types == set(QUESTION_TYPES)


def test_yes_no_and_sides_are_balanced():
    answers = [q.answer for s in SCENES for q in make_questions(s, per_type=3, seed=s.seed + 1)]
    yes, no = answers.count("yes"), answers.count("no")
    assert yes and no and 0.5 < yes / no < 2.0
    assert answers.count("left") and answers.count("right")


def test_demo_frames(tmp_path):
    from ptp_ros.proxy.demo import write_demo_frames

    paths = write_demo_frames(tmp_path, count=2)
    manifest = json.loads((tmp_path / "questions.json").read_text())
    assert [p.name for p in paths] == [m["image"] for m in manifest] and all(p.stat().st_size > 10_000 for p in paths)
    assert manifest[0]["questions"] and manifest[0]["objects"][0]["box"]
