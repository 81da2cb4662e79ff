"""Measured cost of every selector at every keep ratio, side by side in one process.

One repetition = preprocess + vision encode once (their cost is the same for every selector), then
every (selector, keep ratio) cell in a shuffled order: score → select → pruned generate.  Shuffling
per repetition interleaves ratios and selectors, so slow phases of a contended machine spread over
all cells instead of landing on one.  The "oracle" cell keeps the same number of tokens chosen by a
precomputed index (zero-cost selection): the floor the others' choosing overhead is measured against.
"""
from __future__ import annotations

import dataclasses
import random
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ptp_ros.pruning import NO_REGION, instruction_relevance, make_selector, resolve_budget
from ptp_ros.vlm.llava_next import LlavaNextAdapter

from .cost_model import kv_bytes_per_token
from .machine import PeakMemory, load_snapshot


@dataclass(frozen=True)
class BenchSelector:
    """A row of the benchmark: a registered selector with its options (``selector=None``: the oracle)."""

    name: str
    selector: str | None
    options: dict = field(default_factory=dict)
    reduce: str = "max"  # over instruction rows, for selectors that read relevance


#: FastV ranks by the average attention a token receives, so its rows are reduced by mean; PTP's by max.
DEFAULT_SELECTORS = (
    BenchSelector("ptp", "ptp"),
    BenchSelector("ptp_no_instruction", "ptp", {"alpha": 0.0}),
    BenchSelector("uniform_cls", "uniform_cls"),
    BenchSelector("hired", "hired"),
    BenchSelector("globalcom2", "globalcom2"),
    BenchSelector("fastv", "fastv", reduce="mean"),
    BenchSelector("divprune", "divprune"),
    BenchSelector("random", "random"),
    BenchSelector("oracle", None),
)
UNPRUNED = "unpruned"
#: The row of models that can simply read the image at lower resolution (``adapter.downscaled(tokens)``,
#: Qwen2.5-VL's ``max_pixels``): the same token budget reached without pruning, its own encode included.
DOWNSCALED = "downscaled"


class Clock:
    """Wall time that waits for queued GPU work, so each stage is charged for what it launched."""

    def __init__(self, device: torch.device):
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def oracle_indices(region: torch.Tensor, budget: int) -> torch.Tensor:
    """``budget`` content tokens evenly spread: a fixed answer that costs nothing to compute."""
    content = torch.nonzero(region != NO_REGION).squeeze(1)
    return content[torch.arange(budget) * content.shape[0] // budget]


def _llm_dims(adapter: LlavaNextAdapter) -> dict:
    text = adapter.model.config.text_config
    return {"llm": {"layers": text.num_hidden_layers, "kv_heads": text.num_key_value_heads,
                    "hidden": text.hidden_size, "heads": text.num_attention_heads}}


def run_cell(adapter: LlavaNextAdapter, prepared, visual, selector: BenchSelector | None, keep_ratio: float,
             max_new_tokens: int, clock: Clock, oracle: dict[int, torch.Tensor]) -> dict:
    """score → select → generate for one selector at one keep ratio (``None``: unpruned); times in ms."""
    budget = min(resolve_budget(visual.num_tokens, keep_ratio=keep_ratio), int(visual.scores.region_sizes().sum()))
    bound = make_selector(selector.selector, **selector.options) if selector and selector.selector else None
    scores = dataclasses.replace(visual.scores, features=visual.features)
    with PeakMemory(adapter.device) as memory:
        t0 = clock.now()
        if bound is not None and bound.needs_relevance:
            rows = adapter.instruction_attention(prepared, visual)
            scores = dataclasses.replace(scores, relevance=instruction_relevance(rows, selector.reduce))
        t1 = clock.now()
        if selector is None:
            kept = None
        elif bound is None:
            kept = oracle[budget]
        else:
            kept = bound(scores, budget).kept
        t2 = clock.now()
        generation = adapter.generate(prepared, visual, kept, max_new_tokens)
    return {"kept": visual.num_tokens if kept is None else int(kept.numel()),
            "score_ms": (t1 - t0) * 1e3, "select_ms": (t2 - t1) * 1e3,
            **_generation_figures(adapter, generation), **memory.figures()}


def _generation_figures(adapter, generation) -> dict:
    """Prompt length, prefill / decode times and the KV cache the generation left behind."""
    kv_tokens = generation.prompt_tokens + generation.new_tokens - 1  # the last token's K/V is never cached
    bytes_per_value = torch.finfo(adapter.dtype).bits // 8
    return {
        "prompt_tokens": generation.prompt_tokens, "new_tokens": generation.new_tokens,
        "prefill_ms": generation.prefill_ms, "decode_ms": generation.decode_ms,
        "decode_ms_per_token": generation.decode_ms / max(1, generation.new_tokens - 1),
        "kv_cache_mib": kv_tokens * kv_bytes_per_token(_llm_dims(adapter), bytes_per_value) / 2**20,
    }


def run_downscaled_cell(adapter, image: np.ndarray, instruction: str, tokens: int, max_new_tokens: int,
                        clock: Clock) -> dict:
    """The down-scaling baseline at ``tokens``: preprocess + encode at the lower resolution, then generate
    with everything kept.  Its own preprocess / encode times replace the shared ones."""
    low = adapter.downscaled(tokens)
    with PeakMemory(adapter.device) as memory:
        t0 = clock.now()
        prepared = low.prepare(image, instruction)
        t1 = clock.now()
        visual = low.encode(prepared)
        t2 = clock.now()
        generation = low.generate(prepared, visual, None, max_new_tokens)
    return {"kept": visual.num_tokens, "preprocess_ms": (t1 - t0) * 1e3, "encode_ms": (t2 - t1) * 1e3,
            "score_ms": 0.0, "select_ms": 0.0, **_generation_figures(adapter, generation), **memory.figures()}


def measure(adapter: LlavaNextAdapter, image: np.ndarray, instruction: str, keep_ratios: list[float],
            selectors: tuple[BenchSelector, ...] = DEFAULT_SELECTORS, repetitions: int = 3,
            max_new_tokens: int = 8, seed: int = 0, log=sys.stderr) -> list[dict]:
    """Every raw figure: one record per (repetition, selector, keep ratio), plus the unpruned cell."""
    clock = Clock(adapter.device)
    pruned_ratios = [r for r in keep_ratios if r < 1.0]
    cells = [(UNPRUNED, 1.0)] + [(s.name, r) for s in selectors for r in pruned_ratios]
    if hasattr(adapter, "downscaled"):
        cells += [(DOWNSCALED, r) for r in pruned_ratios]
    by_name = {s.name: s for s in selectors}
    _warm_up(adapter, image, instruction, min(keep_ratios))
    # exactly max_new_tokens every time: a random-weight model may otherwise stop early at EOS
    adapter.model.generation_config.min_new_tokens = max_new_tokens
    records = []
    for rep in range(repetitions):
        with PeakMemory(adapter.device) as encode_memory:
            t0 = clock.now()
            prepared = adapter.prepare(image, instruction)
            t1 = clock.now()
            visual = adapter.encode(prepared)
            t2 = clock.now()
        content = int(visual.scores.region_sizes().sum())
        budgets = {min(resolve_budget(visual.num_tokens, keep_ratio=r), content) for r in pruned_ratios}
        oracle = {b: oracle_indices(visual.scores.region, b) for b in budgets}  # computed before any timing
        order = cells[:]
        random.Random(seed + rep).shuffle(order)
        rep_load = load_snapshot()
        for name, ratio in order:
            if name == DOWNSCALED:
                tokens = resolve_budget(visual.num_tokens, keep_ratio=ratio)
                cell = run_downscaled_cell(adapter, image, instruction, tokens, max_new_tokens, clock)
            else:
                cell = run_cell(adapter, prepared, visual, None if name == UNPRUNED else by_name[name], ratio,
                                max_new_tokens, clock, oracle)
            record = {"rep": rep, "selector": name, "keep_ratio": ratio, "visual_tokens": visual.num_tokens,
                      "preprocess_ms": (t1 - t0) * 1e3, "encode_ms": (t2 - t1) * 1e3,
                      "encode_peak_rss_mib": encode_memory.figures()["peak_rss_mib"], **cell}
            record["e2e_ms"] = sum(record[k] for k in ("preprocess_ms", "encode_ms", "score_ms", "select_ms",
                                                       "prefill_ms", "decode_ms"))
            record["load_avg_1m"] = rep_load["load_avg_1m"]
            records.append(record)
            print(f"rep {rep} {name:>18} r={ratio:<6} kept={record['kept']:>5} score={record['score_ms']:8.1f} "
                  f"select={record['select_ms']:7.1f} prefill={record['prefill_ms']:9.1f} "
                  f"decode/tok={record['decode_ms_per_token']:7.1f} e2e={record['e2e_ms']:9.1f} ms",
                  file=log, flush=True)
    return records


def _warm_up(adapter: LlavaNextAdapter, image: np.ndarray, instruction: str, keep_ratio: float) -> None:
    """One untimed request: first-call costs (allocator, kernel selection, lazy init) are not charged."""
    prepared = adapter.prepare(image, instruction)
    visual = adapter.encode(prepared)
    budget = resolve_budget(visual.num_tokens, keep_ratio=keep_ratio)
    adapter.instruction_attention(prepared, visual)
    adapter.generate(prepared, visual, oracle_indices(visual.scores.region, budget), 2)
