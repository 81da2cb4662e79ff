"""``ptp-eval --retrieval-probe`` (bench/accuracy/retrieval.py): does the instruction's attention prefer the asked
object, layer by layer? On three small two-camera pairs of the shipped proxy (the report in docs/accuracy/retrieval/
is the same code over many full-size pairs)."""

from __future__ import annotations

import json

import pytest

from ptp_ros.vlm.defaults import default_model_path
from ptp_ros.vlm.loading import LoadOptions, load_adapter
from ptp_ros_bench.accuracy.retrieval import CHECKS, CONTROL, ROWS, build, probe, supervised_layers, write

SMALL = (336, 672)  # one 1×2 tile grid a view


@pytest.fixture(scope="module")
def proxy():
    return load_adapter(default_model_path(), LoadOptions(device="cpu"))


def test_probe_finds_the_retrieval_training_put_at_layer_7_and_marks_it(proxy, tmp_path):
    rows = probe(proxy, "val", 3, 1, [2, 7], size=SMALL)
    assert len(rows) >= 6
    for row in rows:
        for layer in ("2", "7"):
            assert set(row[layer]) == set(ROWS)
            assert all(row[layer][name][key] in (0, 1) for name in ROWS for key, _ in CHECKS)
        assert all(row[CONTROL][key] in (0, 1) for key, _ in CHECKS)  # random relevance, the same checks
    # the shipped proxy's layer 7 is trained to retrieve the asked object (docs/accuracy/training.md): a probe whose
    # object masks, views or attention rows were misaligned would find it at chance, as it finds layer 2
    for check in ("same_view", "other_camera"):
        assert sum(r["7"]["relevance"][check] for r in rows) >= 0.8 * len(rows)
    model = default_model_path()
    assert supervised_layers(model) == [6, 7]  # from the shipped train_log.jsonl
    meta = {"command": "ptp-eval --retrieval-probe (test)", "model": "proxy", "split": "val", "device": "cpu"}
    meta |= {"pairs": 3, "per_type": 1, "layers": [2, 7], "llm_layer": 2, "supervised_layers": [6, 7]}
    write(build(rows, meta | {"seconds": 1.0}), tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    share, lo, hi = data["shares"]["7"]["relevance"]["same_view"]
    assert share == pytest.approx(sum(r["7"]["relevance"]["same_view"] for r in rows) / len(rows))
    assert lo <= share <= hi
    # every share stands beside its control: the same check on random relevance, per question as in the rows
    control = data["controls"][CONTROL]["shares"]["same_view"]
    assert control[0] == pytest.approx(sum(r[CONTROL]["same_view"] for r in rows) / len(rows))
    text = (tmp_path / "results.md").read_text()
    assert "| 7 (supervised) |" in text and "| 2 (PTP's) |" in text
    assert text.count("| random relevance (control) |") == len(ROWS)


def test_supervised_layers_only_where_training_supervised_attention(tmp_path):
    assert supervised_layers(tmp_path) == []  # no training log: a user's checkpoint
    start = {"event": "start", "args": {"attention": "0.0", "hop_layer": "6", "retrieval_layer": "7"}}
    (tmp_path / "train_log.jsonl").write_text(json.dumps(start) + "\n")
    assert supervised_layers(tmp_path) == []  # attention weight 0: nothing supervised
    start["args"]["attention"] = "1.0"
    (tmp_path / "train_log.jsonl").write_text(json.dumps(start) + "\n")
    assert supervised_layers(tmp_path) == [6, 7]
    (tmp_path / "train_log.jsonl").write_text("not json\n")
    assert supervised_layers(tmp_path) == []  # another tool's log: nothing known, no crash
