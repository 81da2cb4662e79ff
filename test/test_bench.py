"""ptp-bench itself: --quick runs end to end and writes well-formed output (timings are not asserted)."""

from __future__ import annotations

import json

import pytest
import torch

from ptp_ros.pruning import ConfiguredSelector, selector_names
from ptp_ros_bench import cli
from ptp_ros_bench.cost_model import kv_bytes_per_token, kv_cache_bytes
from ptp_ros_bench.measure import DEFAULT_SELECTORS, _llm_dims, oracle_indices
from ptp_ros_bench.report import STAGES, summarize, upgrade_run


@pytest.fixture(scope="module")
def quick_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert cli.main(["--out", str(out), "--quick"]) == 0
    return out


def test_default_rows_are_every_registered_selector_with_its_own_reduction_and_the_library_stage():
    assert {s.selector and s.selector.name for s in DEFAULT_SELECTORS} == {*selector_names(), None}  # the oracle
    assert len({s.label for s in DEFAULT_SELECTORS}) == len(DEFAULT_SELECTORS)
    by = {s.label: s.selector for s in DEFAULT_SELECTORS}
    assert (by["text_attention"].reduce, by["fastv"].reduce, by["ptp"].reduce) == ("mean", "max", "max")
    # one default stage, the library's: only the "ptp" row says "before the LLM"
    assert [label for label, s in by.items() if s and not s.prune_in_llm] == ["ptp"]
    assert by["ptp_in_llm"] == ConfiguredSelector() and by["oracle"] is None


def test_quick_writes_results_report_and_plots(quick_out):
    for name in (
        "results.json",
        "README.md",
        "latency_vs_keep_ratio.png",
        "flops_vs_keep_ratio.png",
        "stage_breakdown.png",
    ):
        assert (quick_out / name).stat().st_size > 0, name
    assert not list(quick_out.glob("raw-*.json"))
    for png in quick_out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_results_are_well_formed(quick_out):
    results = json.loads((quick_out / "results.json").read_text())
    (run,) = results["runs"]
    settings = run["settings"]
    assert run["machine"]["versions"]["torch"] and run["machine"]["device"] == "cpu"
    ratios = [r for r in settings["keep_ratios"] if r < 1]
    cells = {(r["selector"], r["keep_ratio"]) for r in run["records"]}
    assert cells == {("unpruned", 1.0)} | {(s.label, r) for s in DEFAULT_SELECTORS for r in ratios}
    assert settings["selectors"] == [s.record() for s in DEFAULT_SELECTORS]
    assert [ConfiguredSelector.from_record(r) for r in settings["selectors"]] == [s.selector for s in DEFAULT_SELECTORS]
    assert len(run["records"]) == len(cells) * settings["repetitions"]
    for record in run["records"]:
        assert record["new_tokens"] == settings["max_new_tokens"]  # fixed, so runs compare
        assert all(record[s] >= 0 for s in STAGES)
        assert record["e2e_ms"] == pytest.approx(sum(record[s] for s in STAGES))
        assert record["peak_rss_mib"] is None or record["peak_rss_mib"] > 0
        expected = (
            record["visual_tokens"]
            if record["selector"] == "unpruned"
            else round(record["keep_ratio"] * record["visual_tokens"])
        )
        assert record["kept"] == expected
    quiet = {s.label for s in DEFAULT_SELECTORS if s.selector is None or not s.selector.bound.needs_relevance}
    assert {"hired", "divprune", "oracle", "ptp_no_instruction"} <= quiet and not {"ptp", "fastv"} & quiet
    for record in run["records"]:  # only relevance readers pay a score stage
        if record["selector"] in quiet:
            assert record["score_ms"] == 0 or record["score_ms"] < 5
    assert {t["met"] for t in run["targets"]} <= {True, False}
    assert set(results["analytic"]) == {"llava-next-7b", "llava-next-13b", "cpu-proxy", "internvl2-8b"}
    readme = (quick_out / "README.md").read_text()
    assert "| ptp | 0.111 |" in readme and "Not measured — no GPU lent" in readme
    assert "| fastv | 0.111 |" in readme and "| text_attention | 0.111 |" in readme and "total GFLOPs" in readme


def test_in_llm_rows_prune_inside_the_prefill_and_every_row_has_its_total_flops(quick_out):
    (run,) = json.loads((quick_out / "results.json").read_text())["runs"]
    s = run["settings"]
    assert s["llm"]["layers"] == s["llm_layers"] and s["llm_layer"] == 2 and 0 < s["query_tokens"] < s["text_tokens"]
    by = {(r["selector"], r["keep_ratio"], r["rep"]): r for r in run["records"]}
    for (name, ratio, rep), r in by.items():
        if name in ("fastv", "ptp_in_llm"):  # one generate over the full prompt, scored inside it
            assert r["prune_layer"] == 2 and r["score_ms"] == 0
            assert r["prompt_tokens"] == s["text_tokens"] + s["visual_tokens"]
            pre = by[("text_attention", ratio, rep)]  # the same kept count, pruned before the LLM
            assert pre["prune_layer"] is None and pre["prompt_tokens"] == s["text_tokens"] + r["kept"]
            kv = kv_cache_bytes(
                {"llm": s["llm"]},
                r["prompt_tokens"] + r["new_tokens"] - 1,
                pre["prompt_tokens"] + r["new_tokens"] - 1,
                2,
                4,
            )
            assert r["kv_cache_mib"] == pytest.approx(kv / 2**20) and r["kv_cache_mib"] > pre["kv_cache_mib"]
    summary = {(r["selector"], r["keep_ratio"]): r for r in run["summary"]}
    assert summary[("unpruned", 1.0)]["flops"]["ratio"] == 1
    ninth = {
        name: summary[(name, 0.111)]["flops"]
        for name in ("ptp", "ptp_in_llm", "fastv", "text_attention", "uniform_cls", "divprune", "oracle")
    }
    assert ninth["uniform_cls"]["ratio"] == ninth["oracle"]["ratio"] < ninth["divprune"]["ratio"]
    assert ninth["fastv"]["ratio"] < ninth["ptp_in_llm"]["ratio"] < ninth["ptp"]["ratio"]
    # the same probe and prefill; PTP's diverse pick adds its per-region feature distances
    assert ninth["ptp"]["ratio"] > ninth["text_attention"]["ratio"]
    analytic = {t["target"]: t for t in run["targets"]}
    assert analytic["same, total LLM FLOPs of PTP, its instruction probe included"]["value"] == pytest.approx(
        0.182, abs=0.002
    )


def test_runs_measured_before_in_llm_fastv_show_its_emulation_as_text_attention():
    old = {
        "settings": {
            "selectors": [
                {"name": "ptp", "selector": "ptp", "options": {}, "reduce": "max"},
                {"name": "fastv", "selector": "fastv", "options": {}, "reduce": "mean"},
            ]
        },
        "records": [{"selector": "fastv"}, {"selector": "ptp"}],
    }
    run = upgrade_run(old)
    assert [r["selector"] for r in run["records"]] == ["text_attention", "ptp"]
    assert run["settings"]["selectors"][1]["selector"] == "text_attention" and run["settings"]["notes"]
    assert upgrade_run(run) == run  # once


def test_in_llm_kv_cache_formula_matches_a_real_cache(tiny_adapter):
    """Layers below the prune layer cache the whole prompt, the others only the kept tokens."""
    from ptp_ros.pruning import InLLMPruning
    from ptp_ros.vlm.in_llm import pruned_inside

    lm = tiny_adapter.model.model.language_model
    embeds = torch.randn(1, 37, lm.config.hidden_size)
    image = torch.arange(5, 30)  # 25 visual tokens, 10 kept
    with pruned_inside(lm.layers, InLLMPruning.fastv(2), image, 37, lambda rows: torch.arange(0, 20, 2)):
        cache = lm(inputs_embeds=embeds, use_cache=True).past_key_values
    actual = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert actual == kv_cache_bytes(_llm_dims(tiny_adapter), 37, 37 - 15, 2, 4)


def test_report_only_rebuilds_from_results(quick_out):
    (quick_out / "README.md").unlink()
    assert cli.main(["--out", str(quick_out), "--report-only"]) == 0
    assert (quick_out / "README.md").is_file()


def test_summary_median_min_max():
    records = [
        {"selector": "ptp", "keep_ratio": 0.5, **{s: v for s in STAGES}, "e2e_ms": 6 * v} for v in (3.0, 1.0, 2.0)
    ]
    (row,) = summarize(records)
    assert row["e2e_ms"] == {"median": 12.0, "min": 6.0, "max": 18.0}
    assert row["overhead_ms"]["median"] == 4.0 and row["n"] == 3


def test_oracle_indices_are_evenly_spread_content_tokens():
    region = torch.tensor([0, 0, -1, 1, 1, -1, 1, 1])
    kept = oracle_indices(region, 2)
    assert kept.tolist() == [0, 4] and bool((region[kept] >= 0).all())
    assert oracle_indices(region, 6).tolist() == [0, 1, 3, 4, 6, 7]


def test_kv_cache_formula_matches_a_real_cache(tiny_adapter):
    lm = tiny_adapter.model.model.language_model
    embeds = torch.randn(1, 37, lm.config.hidden_size)
    cache = lm(inputs_embeds=embeds, use_cache=True).past_key_values
    actual = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert actual == 37 * kv_bytes_per_token(_llm_dims(tiny_adapter), 4)


@pytest.mark.parametrize("name, billions", [("llava-next-7b", 7.06), ("llava-next-13b", 13.35), ("cpu-proxy", 0.935)])
def test_random_models_have_the_published_size(name, billions):
    """The measured stand-ins are built from the cost model's dims (shapes only, on the meta device)."""
    from transformers import LlavaNextForConditionalGeneration

    from ptp_ros_bench.models import llava_next_config

    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration(llava_next_config(name))
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, rel=0.01)


def test_downscaling_baseline_for_models_that_can_read_fewer_pixels(tmp_path):
    """Qwen2.5-VL can simply be given fewer pixels: ptp-bench measures that beside pruning, at each budget."""
    from ptp_ros.testing.qwen2_5_vl import build_tiny_qwen2_5_vl

    model = build_tiny_qwen2_5_vl(tmp_path / "tiny-qwen2_5_vl")
    out = tmp_path / "bench"
    assert (
        cli.main(
            [
                "--out",
                str(out),
                "--quick",
                "--model",
                str(model),
                "--selectors",
                "ptp,oracle",
                "--keep-ratios",
                "1,0.25",
                "--repetitions",
                "1",
            ]
        )
        == 0
    )
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    assert run["model"] == "tiny-qwen2_5_vl" and run["settings"]["tiles"] is None
    cells = {r["selector"]: r for r in run["records"]}
    assert set(cells) == {"unpruned", "ptp", "oracle", "downscaled"}
    budget = cells["ptp"]["kept"]
    assert 0.8 * budget <= cells["downscaled"]["kept"] <= budget  # the same budget, reached by resolution
    assert cells["downscaled"]["encode_ms"] != cells["ptp"]["encode_ms"]  # its own, cheaper encode is charged
    assert "| downscaled | 0.25 |" in (out / "README.md").read_text()


def test_views_mode_times_one_batched_encode_against_single_encodes(tiny_adapter, sample_image, tmp_path):
    """``ptp-bench --views N``: N crops in one prompt encoded once, against N one-view encodes; both timed."""
    from ptp_ros_bench.views import measure_views, write_views

    result = measure_views(tiny_adapter, sample_image, "what is there ?", views=2, repetitions=1, side=200)
    assert result["views"] == 2 and result["view_px"] == [200, 200] and result["tiles_per_view"] >= 2
    assert len(result["batched_ms"]) == len(result["single_ms"]) == 1 and result["speedup"] > 0
    run = {"command": "ptp-bench --views 2", "model": "tiny", "device": "cpu", "dtype": "float32"}
    write_views({**run, "machine": {"cpu": "test", "torch_threads": 1}, "result": result}, tmp_path)
    assert json.loads((tmp_path / "views.json").read_text())["result"]["views"] == 2
    assert "2 views in one batch" in (tmp_path / "views.md").read_text()
