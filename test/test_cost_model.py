"""The analytic cost model against the published LLaVA-NeXT figures (anchors.md, Table A2-3), and the totals
per method with every scoring pass (issue 11)."""

from __future__ import annotations

import pytest

from ptp_ros.pruning import ConfiguredSelector as Configured
from ptp_ros.pruning import make_selector, selector_names
from ptp_ros_bench.cost_model import (
    MODELS,
    Passes,
    cost_table,
    costs,
    decode_flops_per_token,
    kv_bytes_per_token,
    kv_cache_bytes,
    llm_dims_from_config,
    passes_for,
    prefill_breakdown,
    prefill_flops,
    relevance_flops,
    selection_flops,
    total_prefill_flops,
    vision_flops,
)

RATIOS = [1.0, 0.5, 0.25, 0.111, 0.056]


@pytest.mark.parametrize("published", [41.7, 43.58])  # CDPruner / GlobalCom², FasterVLM (A100 tables)
def test_llava_next_7b_unpruned_prefill_matches_published_within_5_percent(published):
    tflops = prefill_flops(MODELS["llava-next-7b"], 2880 + 60) / 1e12
    assert abs(tflops - published) / published <= 0.05, tflops


def test_llava_next_13b_unpruned_prefill_matches_published_within_5_percent():
    tflops = prefill_flops(MODELS["llava-next-13b"], 2880 + 60) / 1e12
    assert abs(tflops - 80.0) / 80.0 <= 0.05, tflops  # GlobalCom² efficiency table


def test_kv_cache_of_2880_visual_tokens_is_the_published_1440_mib():
    assert 2880 * kv_bytes_per_token(MODELS["llava-next-7b"]) / 2**20 == pytest.approx(1440.0)


def test_vision_tower_of_five_tiles():
    # CLIP ViT-L/14-336, 5 views: ≈1.9 TFLOP of layers (research §4c) + patch embedding + projector
    assert vision_flops(MODELS["llava-next-7b"], 5) / 1e12 == pytest.approx(2.03, abs=0.02)


def test_target_7b_prefill_at_one_ninth_kept_is_at_most_0_12_of_unpruned():
    rows = {r["keep_ratio"]: r for r in cost_table("llava-next-7b", RATIOS)}
    assert rows[0.111]["visual_tokens"] == 320
    assert rows[0.111]["prefill_ratio"] <= 0.12


def test_costs_shrink_monotonically_and_vision_does_not():
    rows = cost_table("cpu-proxy", RATIOS, text_tokens=61, visual_tokens=1948)
    for key in ("prefill_tflops", "kv_cache_mib", "decode_gflops_per_token"):
        values = [r[key] for r in rows]
        assert values == sorted(values, reverse=True)
    assert len({r["vision_tflops"] for r in rows}) == 1


def test_grouped_query_attention_shrinks_the_cache():
    proxy = MODELS["cpu-proxy"]
    assert kv_bytes_per_token(proxy, 4) == 2 * 24 * 2 * 64 * 4  # 2 KV heads of 64 in 24 layers, fp32
    assert costs(proxy, 100, 0, 1).kv_cache_bytes == 100 * kv_bytes_per_token(proxy)


def test_internvl2_8b_counts_pixel_shuffled_tiles():
    """InternViT-300M at 448 px: 1025 tokens a tile through 24 layers, 256 LLM tokens after the 2×2 shuffle."""
    model = MODELS["internvl2-8b"]
    per_tile = vision_flops(model, 1) / 1e12
    assert 0.65 < per_tile < 0.8  # ≈ 2 × 0.3 B params × 1025 tokens + attention + the 4096-wide projector
    rows = {r["keep_ratio"]: r for r in cost_table("internvl2-8b", RATIOS)}
    assert rows[1]["tiles"] == 13 and rows[1]["visual_tokens"] == 3328
    assert rows[0.111]["prefill_ratio"] < 0.13
    # grouped-query attention (8 KV heads): a quarter of the MHA cache per token
    assert kv_bytes_per_token(model) == 2 * 32 * 8 * 128 * 2


# ---- totals: every scoring pass counted (issue 11, item 3) ----

SEVEN = MODELS["llava-next-7b"]
#: the shipped proxies' LLM (4 layers, width 128, 2 KV heads)
FOUR_LAYERS = {"layers": 4, "hidden": 128, "ffn": 256, "heads": 4, "kv_heads": 2, "vocab": 132, "gated_mlp": True}


def _ratio(model, kept, passes, text=60, visual=2880):
    return total_prefill_flops(model, text, visual, kept, passes) / total_prefill_flops(model, text, visual, visual)


def test_passes_come_from_the_library_selectors_and_plans():
    top_k = {"within_region": "top_k"}
    assert passes_for(Configured("ptp", top_k, prune_in_llm=False)) == Passes(probe_layer=2)
    assert passes_for(Configured("ptp", {"alpha": 0.0, **top_k})) == Passes()
    assert passes_for(Configured("ptp", top_k, prune_in_llm=False), llm_layer=1) == Passes(probe_layer=1)
    inside = Passes(score_layer=2, prune_layer=2, queries="instruction")
    assert passes_for(Configured("ptp", top_k)) == inside
    assert passes_for(Configured()).prune_layer == 2  # the library's default prunes inside the LLM
    assert passes_for(Configured("fastv")) == Passes(score_layer=1, prune_layer=2, queries="last")
    assert passes_for(Configured("fastv", {"k": 3})) == Passes(score_layer=2, prune_layer=3, queries="last")
    assert passes_for(Configured("text_attention")) == Passes(probe_layer=2)
    assert passes_for(Configured("divprune")) == Passes(diversity="all")
    diverse = Configured("ptp", {"within_region": "diverse"}, prune_in_llm=False)
    assert passes_for(diverse) == Passes(probe_layer=2, diversity="per_region")
    assert passes_for(None) == Passes()  # a row that selects nothing: oracle, down-scaled image


@pytest.mark.parametrize("name", selector_names())
@pytest.mark.parametrize("prune_in_llm", [False, True])
def test_every_registered_selector_costs_what_it_declares(name, prune_in_llm):
    """The passes are the selector's declared needs: relevance → a probe or in-LLM rows, distances → selection
    matmuls; a selector that declares neither costs nothing beyond the prefill (uniform_cls, hired, ...)."""
    bound = make_selector(name)
    passes = passes_for(Configured(name, prune_in_llm=prune_in_llm))
    assert (passes.probe_layer is not None or passes.in_llm) == bound.needs_relevance
    assert passes.diversity == bound.distances
    assert passes.in_llm == (
        bound.in_llm is not None or (prune_in_llm and bound.spec.relevance_in_llm and bound.needs_relevance)
    )
    if not bound.needs_relevance and bound.distances is None:
        assert passes == Passes()


def test_passes_of_a_benchmark_row_follow_its_llm_layer_and_stage():
    from ptp_ros_bench.accuracy.methods import comparison_methods
    from ptp_ros_bench.rows import Row

    methods = {m.label: m for m in comparison_methods()}
    assert methods["ptp"].passes().prune_layer == 2
    assert methods["ptp llm_layer=1"].passes().prune_layer == 1
    before = methods["ptp before the LLM (separate probe; the default before)"].passes()
    assert before.probe_layer == 2 and before.prune_layer is None
    assert methods["FastV (in-LLM, K=2)"].passes().prune_layer == 2
    inside = methods["ptp"].passes(llm_layer=3)
    assert (inside.score_layer, inside.prune_layer, inside.queries) == (3, 3, "instruction")
    assert Row("down", None).passes() == Passes()


def test_ptp_with_its_instruction_probe_on_7b_at_one_ninth_is_0_18_of_unpruned():
    """The issue's figure: the pruned prefill (0.117×) plus the probe (2.77 TFLOPs of 42.6)."""
    parts = prefill_breakdown(
        SEVEN, 60, 2880, 320, passes_for(Configured("ptp", {"within_region": "top_k"}, prune_in_llm=False))
    )
    unpruned = prefill_flops(SEVEN, 2940)
    assert parts["prefill"] / unpruned == pytest.approx(0.117, abs=0.001)
    assert parts["scoring"] / 1e12 == pytest.approx(2.77, abs=0.01)
    assert parts["scoring"] == relevance_flops(SEVEN, 2940, 2, 60)
    assert parts["total"] / unpruned == pytest.approx(0.18, abs=0.005)


def test_fastv_k2_on_a_four_layer_model_at_small_keep_costs_about_half():
    """Layers 0–1 over the full prompt, 2–3 over a few tokens: half the layers at full length."""
    ratio = _ratio(FOUR_LAYERS, 8, passes_for(Configured("fastv")), text=40, visual=1900)
    assert 0.48 <= ratio <= 0.55
    assert ratio > _ratio(FOUR_LAYERS, 8, Passes(), text=40, visual=1900) + 0.4


def test_in_llm_ptp_is_cheaper_than_ptp_with_a_separate_probe():
    for kept in (1440, 720, 320, 161):
        inside = _ratio(SEVEN, kept, passes_for(Configured("ptp")))
        before = _ratio(SEVEN, kept, passes_for(Configured("ptp", prune_in_llm=False)))
        plain = _ratio(SEVEN, kept, Passes())
        assert plain < inside < before
    # on 7B it saves the 2 layers the probe ran and the pruned prefill re-runs: ≈ 2/32 of the pruned prefill
    assert _ratio(SEVEN, 320, passes_for(Configured("ptp", prune_in_llm=False))) - _ratio(
        SEVEN, 320, passes_for(Configured("ptp"))
    ) == pytest.approx(2 / 32 * 0.117, rel=0.1)


def test_divprune_selection_is_counted_beside_the_llm():
    parts = prefill_breakdown(SEVEN, 60, 2880, 320, passes_for(Configured("divprune")))
    assert parts["selection"] == 2 * 2880**2 * 4096 and parts["scoring"] == 0
    assert parts["total"] == parts["prefill"] + parts["selection"]
    assert parts["total"] > total_prefill_flops(SEVEN, 60, 2880, 320, Passes())
    per_region = prefill_breakdown(SEVEN, 60, 2880, 320, Passes(diversity="per_region"), regions=5)
    assert per_region["selection"] == pytest.approx(parts["selection"] / 5)


def test_keeping_everything_scores_nothing():
    unpruned = prefill_flops(SEVEN, 2940)
    for selector in selector_names():
        assert total_prefill_flops(SEVEN, 60, 2880, 2880, passes_for(Configured(selector))) == unpruned
    # a FastV K past the last layer installs nothing: the stock prefill
    assert total_prefill_flops(FOUR_LAYERS, 40, 100, 10, passes_for(Configured("fastv", {"k": 4}))) == prefill_flops(
        FOUR_LAYERS, 140
    )


def test_cost_table_has_per_method_totals_with_scoring():
    rows = {r["keep_ratio"]: r for r in cost_table("llava-next-7b", RATIOS)}
    totals = rows[0.111]["totals"]
    assert set(totals) == {"unpruned", "no_instruction", "ptp", "ptp_in_llm", "fastv", "divprune"}
    assert totals["unpruned"]["ratio"] == 1 and totals["no_instruction"]["ratio"] == rows[0.111]["prefill_ratio"]
    assert totals["ptp"]["ratio"] == pytest.approx(0.182, abs=0.002)
    assert totals["ptp"]["scoring_tflops"] == pytest.approx(rows[0.111]["relevance_tflops_layer2"])
    assert (
        totals["no_instruction"]["ratio"]
        < totals["divprune"]["ratio"]
        < totals["fastv"]["ratio"]
        < totals["ptp_in_llm"]["ratio"]
        < totals["ptp"]["ratio"]
    )
    assert all(t["ratio"] == 1 for t in rows[1.0]["totals"].values())


def test_llm_dims_from_a_transformers_config_match_the_published_ones():
    from ptp_ros_bench.models import llava_next_config

    config = llava_next_config("cpu-proxy")
    dims = llm_dims_from_config(config)  # the multimodal config: its text_config is read
    for key in ("layers", "hidden", "ffn", "heads", "kv_heads", "vocab", "gated_mlp"):
        assert dims[key] == MODELS["cpu-proxy"]["llm"][key], key
    assert prefill_flops(dims, 2000) == prefill_flops(MODELS["cpu-proxy"], 2000)
    assert llm_dims_from_config(config.text_config.to_dict()) == llm_dims_from_config(config.text_config)


def test_in_llm_kv_cache_keeps_the_full_prompt_below_the_prune_layer():
    per_token = kv_bytes_per_token(SEVEN)
    assert kv_cache_bytes(SEVEN, 2940, 380) == 380 * per_token
    assert kv_cache_bytes(SEVEN, 2940, 380, prune_layer=2) == pytest.approx((2 * 2940 + 30 * 380) / 32 * per_token)


def test_the_analytic_table_gives_in_llm_rows_their_full_length_layers():
    """At 11.1 % on LLaVA-NeXT-7B: 190 MiB of cache when pruned before the LLM, 270 MiB inside it (layers 0–1
    keep all 2 940 prompt tokens), and a decoding step there attends to the full prompt in those layers."""
    rows = {r["keep_ratio"]: r for r in cost_table("llava-next-7b", RATIOS)}
    assert rows[0.111]["kv_cache_mib"] == pytest.approx(190.0)
    assert rows[0.111]["kv_cache_mib_in_llm"] == pytest.approx(270.0)
    assert rows[0.111]["in_llm_prune_layer"] == passes_for(Configured("ptp")).prune_layer == 2
    two_full = decode_flops_per_token(SEVEN, 380, 2940, prune_layer=2)
    assert rows[0.111]["decode_gflops_per_token_in_llm"] == pytest.approx(two_full / 1e9)
    assert decode_flops_per_token(SEVEN, 380) < two_full < decode_flops_per_token(SEVEN, 2940)
    assert two_full - decode_flops_per_token(SEVEN, 380) == pytest.approx(2 * 2 * 2 * (2940 - 380) * 4096)  # QKᵀ, AV
    # keeping everything is the unpruned path: nothing differs
    assert rows[1.0]["kv_cache_mib_in_llm"] == rows[1.0]["kv_cache_mib"]
    assert rows[1.0]["decode_gflops_per_token_in_llm"] == rows[1.0]["decode_gflops_per_token"]


def _counted_matmul_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("sizes", [[576, 576, 576, 576, 576], [576, 648, 648, 420, 300], [50]])
def test_selection_flops_are_the_matmuls_the_selectors_run(sizes):
    """What the cost model counts for the diverse pick and DivPrune is what their code multiplies (counted
    by torch's FLOP counter): PTP one [R, n, n] product padded to the largest region, DivPrune one N×N."""
    import torch

    from ptp_ros.pruning import NO_REGION, TokenScores, make_selector

    dim = 32
    region = torch.cat([torch.full((n,), r) for r, n in enumerate(sizes)] + [torch.full((7,), NO_REGION)])
    g = torch.Generator().manual_seed(len(sizes))
    scores = TokenScores(
        region=region,
        saliency=torch.rand(region.shape[0], generator=g),
        region_saliency=torch.randn(len(sizes), generator=g),
        relevance=torch.rand(region.shape[0], generator=g),
        features=torch.randn(region.shape[0], dim, generator=g),
    )
    llm = {**FOUR_LAYERS, "hidden": dim}
    total = region.shape[0]  # the newlines count as visual tokens but are never candidates
    budget = max(1, sum(sizes) // 9)
    ptp = make_selector("ptp")
    assert ptp.distances == "per_region"
    counted = _counted_matmul_flops(lambda: ptp(scores, budget))
    assert counted == selection_flops(llm, "per_region", total, sizes)
    assert (
        counted == prefill_breakdown(llm, 10, total, budget, Passes(diversity="per_region"), regions=sizes)["selection"]
    )
    divprune = make_selector("divprune")
    assert _counted_matmul_flops(lambda: divprune(scores, budget)) == selection_flops(llm, "all", total, sizes)
    # one region over every token is the old upper bound; per region it is R times less when regions are equal
    if len(set(sizes)) == 1:
        whole = selection_flops(llm, "all", total, sizes)
        assert selection_flops(llm, "per_region", total, sizes) * len(sizes) == whole


def test_a_probe_over_candidates_costs_a_fraction_of_the_full_probe():
    from ptp_ros_bench.cost_model import MODELS, passes_for, prefill_breakdown

    model = MODELS["llava-next-7b"]
    full = prefill_breakdown(model, 60, 2880, 320, passes_for(Configured("ptp", prune_in_llm=False)))
    narrow = prefill_breakdown(
        model, 60, 2880, 320, passes_for(Configured("ptp", prune_in_llm=False, probe_candidates=3.0))
    )
    assert narrow["prefill"] == full["prefill"]
    assert 0.25 < narrow["scoring"] / full["scoring"] < 0.40  # 960 + 60 of 2940 tokens, attention quadratic
    with pytest.raises(ValueError, match="probe_candidates narrows PTP's relevance probe"):
        Configured("hired", prune_in_llm=False, probe_candidates=3.0)  # no probe to narrow: refused


def test_the_accuracy_report_counts_the_diverse_pick_over_each_questions_regions():
    """ptp-eval records each question's region sizes, and its FLOPs column counts PTP's per-region distances
    over them instead of one N×N matrix (which stays the fallback for results recorded without them)."""
    from ptp_ros_bench.accuracy.report import _flops
    from ptp_ros_bench.accuracy.runner import Results

    sizes = [576, 648, 648]
    results = Results(text_tokens=[40, 40], visual_tokens=[1900, 1900], region_sizes=[sizes, sizes])
    results.kept_ratio[("ptp", 0.111)] = [0.111, 0.111]
    passes = Passes(score_layer=2, prune_layer=2, diversity="per_region")
    counted = _flops(results, FOUR_LAYERS, "ptp", 0.111, passes)
    expected = prefill_breakdown(FOUR_LAYERS, 40, 1900, round(0.111 * 1900), passes, regions=sizes)
    assert counted["selection"] == pytest.approx(expected["selection"] / 1e9)
    assert counted["total"] == pytest.approx(expected["total"] / 1e9)
    unrecorded = Results(text_tokens=[40, 40], visual_tokens=[1900, 1900])
    unrecorded.kept_ratio[("ptp", 0.111)] = [0.111, 0.111]
    assert _flops(unrecorded, FOUR_LAYERS, "ptp", 0.111, passes)["selection"] > 2.5 * counted["selection"]
