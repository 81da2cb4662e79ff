"""``ptp-eval --multicamera`` (bench/accuracy/multicamera.py): two-camera proxy scenes under one budget, on one small
scene pair (the report in docs/accuracy/multicamera/ is the same code over many full-size pairs)."""

from __future__ import annotations

import json

import pytest

from ptp_ros.vlm.defaults import default_model_path
from ptp_ros.vlm.loading import LoadOptions, load_adapter
from ptp_ros_bench.accuracy.multicamera import build, two_camera_recall, write

SMALL = (336, 672)  # one 1×2 tile grid a view


@pytest.fixture(scope="module")
def proxy():
    return load_adapter(default_model_path(), LoadOptions(device="cpu"))


def test_one_two_camera_pair_reports_every_split_paired(proxy, tmp_path):
    rows = two_camera_recall(proxy, "test", 1, 1, (0.111,), size=SMALL)
    assert rows and all(row["target_view"] == "head" for row in rows)  # pair 0: the asked scene on the first camera
    for row in rows:
        cell = row["0.111"]
        assert cell["budget"] == round(0.111 * sum(row["view_tokens"]))
        assert all(0.0 <= cell[split]["recall"] <= 1.0 for split in ("shared", "equal", "alone", "random"))
        assert cell["random"]["target_view_kept"] <= cell["budget"]
        assert abs(2 * cell["equal"]["target_view_kept"] - cell["budget"]) <= 1  # half each
    agreement = {"bare": (0.5, 0.1, 0.9), "named": (0.5, 0.1, 0.9), "agree": 2, "n": 2}  # measured in test_views
    meta = {"command": "ptp-eval --multicamera (test)", "model": "proxy", "split": "test", "device": "cpu"}
    meta |= {"threads": 1, "pairs": 1, "per_type": 1, "ratios": [0.111], "single_scenes": 1, "llm_layer": 2}
    write(build(rows, agreement, meta | {"seconds": 1.0}), tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data["paired"]) == {"0.111"} and data["questions"] == len(rows)
    # every split is paired with the random control at the same budget
    assert {"shared - random", "equal - random", "alone - random"} <= set(data["paired"]["0.111"])
    assert "random (control)" in (tmp_path / "results.md").read_text()
    mean, _, _ = data["paired"]["0.111"]["shared - equal"]
    assert mean == pytest.approx(
        sum(r["0.111"]["shared"]["recall"] - r["0.111"]["equal"]["recall"] for r in rows) / len(rows)
    )
    assert "agree on 2 of 2" in (tmp_path / "results.md").read_text()
