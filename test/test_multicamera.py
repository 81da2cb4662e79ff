"""``ptp-eval --multicamera`` (bench/accuracy/multicamera.py): two-camera proxy scenes under one budget, on one small
scene pair (the report in docs/accuracy/multicamera/ is the same code over many full-size pairs)."""

from __future__ import annotations

import json

import pytest

from ptp_ros.vlm.defaults import default_model_path
from ptp_ros.vlm.loading import LoadOptions, load_adapter
from ptp_ros_bench.accuracy.multicamera import build, single_camera_agreement, two_camera_recall, write

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
        # told the asked camera, the shared split gives it (1 - 0.5) / 2 + 0.5 = 3/4 of the budget
        assert abs(4 * cell["told camera"]["target_view_kept"] - 3 * cell["budget"]) <= 4
    agreement = single_camera_agreement(proxy, "test", 1, 1, size=SMALL)
    assert agreement["agree"] == agreement["n"] > 0  # the camera mapping answers as the bare frame
    meta = {"command": "ptp-eval --multicamera (test)", "model": "proxy", "split": "test", "device": "cpu"}
    meta |= {"threads": 1, "pairs": 1, "per_type": 1, "ratios": [0.111], "single_scenes": 1, "llm_layer": 2}
    write(build(rows, agreement, meta | {"seconds": 1.0}), tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data["paired"]) == {"0.111"} and data["questions"] == len(rows)
    # every split is paired with the random control at the same budget
    assert {"shared - random", "equal - random", "alone - random"} <= set(data["paired"]["0.111"])
    assert "told camera - equal" in data["paired"]["0.111"] and "upper bound" in (tmp_path / "results.md").read_text()
    assert "random (control)" in (tmp_path / "results.md").read_text()
    # the control rows in ptp-eval's results.json form, the single-camera answers beside random-after-2's
    controls = data["controls"]
    assert controls["random"]["ratios"]["0.111"]["target_recall"] == data["recall"]["0.111"]["random"]
    assert controls["random-after-2"] == {
        "stage": "in_llm",
        "prune_layer": 2,
        "ratios": {"0.111": {"accuracy": agreement["random"][0]}},
    }
    assert set(data["single_camera"]["gain_over_control"]) == {"bare", "named"}
    assert "random-after-2" in (tmp_path / "results.md").read_text()
    mean, _, _ = data["paired"]["0.111"]["shared - equal"]
    assert mean == pytest.approx(
        sum(r["0.111"]["shared"]["recall"] - r["0.111"]["equal"]["recall"] for r in rows) / len(rows)
    )
    assert f"agree on {agreement['n']} of {agreement['n']}" in (tmp_path / "results.md").read_text()
