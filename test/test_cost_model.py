"""The analytic cost model against the published LLaVA-NeXT figures (anchors.md, Table A2-3)."""
from __future__ import annotations

import pytest

from ptp_ros_bench.cost_model import MODELS, cost_table, costs, kv_bytes_per_token, prefill_flops, vision_flops

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
