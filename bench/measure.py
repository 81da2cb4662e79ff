"""Measured cost of every selector at every keep ratio, side by side in one process.

One repetition = preprocess + vision encode once (their cost is the same for every selector), then
every (selector, keep ratio) cell in a shuffled order: score → select → pruned generate for selectors
that prune before the LLM; for those that prune inside it (FastV, PTP with ``prune_in_llm``) one
generate over the full prompt through the adapter's in-LLM path with the plan ``Pipeline`` uses
(``ptp_ros.pipeline.in_llm_plan``), so its prefill includes the full-length layers below the prune
layer and the attention rows it ranks by.  Shuffling
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

from ptp_ros.pipeline import in_llm_plan
from ptp_ros.pruning import (
    NO_REGION,
    InLLMPruning,
    instruction_relevance,
    make_selector,
    resolve_budget,
    selector_names,
)
from ptp_ros.vlm.llava_next import LlavaNextAdapter

from .cost_model import Passes, kv_cache_bytes, llm_dims_from_config, passes_for
from .machine import PeakMemory, load_snapshot


@dataclass(frozen=True)
class BenchSelector:
    """A row of the benchmark: a registered selector with its options (``selector=None``: the oracle).
    ``prune_in_llm``: ``PipelineConfig.prune_in_llm`` (a relevance selector ranks and drops inside the LLM)."""

    name: str
    selector: str | None
    options: dict = field(default_factory=dict)
    # over the instruction rows: the selector's own reduction (FastV's "max", text_attention's "mean"), else this
    # (default "max"); filled in, so the recorded settings say what ran
    reduce: str | None = None
    prune_in_llm: bool = False

    def __post_init__(self) -> None:
        bound = self.bound()
        object.__setattr__(self, "reduce", bound.relevance_reduce(self.reduce) if bound else self.reduce or "max")

    def bound(self):
        return make_selector(self.selector, **self.options) if self.selector else None

    def plan(self, llm_layer: int) -> InLLMPruning | None:
        """Where inside the LLM it prunes (``None``: before the LLM), as ``Pipeline`` decides it."""
        bound = self.bound()
        return None if bound is None else in_llm_plan(bound, self.prune_in_llm, llm_layer)

    def passes(self, llm_layer: int) -> Passes:
        """What it runs, for the cost model (bench/cost_model.py ``passes_for``)."""
        return passes_for(self.selector, self.options, self.prune_in_llm, llm_layer)


#: PTP three ways (before the LLM after a separate probe, inside it as the library's default, without its
#: instruction stage), then every other registered selector with its defaults — "fastv" is FastV inside the
#: LLM (K=2: the last token's attention at layer 1, dropped from layer 2), "text_attention" its ranking
#: applied before the LLM (its own reduction: the mean over the instruction rows, as FastV's average
#: attention received), then a pruned prefill from scratch — and the zero-cost oracle.
DEFAULT_SELECTORS = (
    BenchSelector("ptp", "ptp"),  # before the LLM, after a separate probe (prune_in_llm below defaults to False)
    BenchSelector("ptp_in_llm", "ptp", prune_in_llm=True),  # the library's default
    BenchSelector("ptp_no_instruction", "ptp", {"alpha": 0.0}),
    *(BenchSelector(name, name) for name in selector_names() if name != "ptp"),
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
    """The cost model's view of the adapter's LLM (``{"llm": ...}``, from its transformers text config)."""
    return {"llm": llm_dims_from_config(adapter.model.config.text_config)}


def run_cell(adapter: LlavaNextAdapter, prepared, visual, selector: BenchSelector | None, keep_ratio: float,
             max_new_tokens: int, clock: Clock, oracle: dict[int, torch.Tensor]) -> dict:
    """One selector at one keep ratio (``None``: unpruned); times in ms.  Before the LLM: score → select →
    pruned generate.  Inside it: one generate over the full prompt that ranks and drops at the plan's
    layers; its scoring (the attention rows) runs inside the prefill and is charged there, its selection
    is timed apart and taken out of the prefill."""
    budget = min(resolve_budget(visual.num_tokens, keep_ratio=keep_ratio), int(visual.scores.region_sizes().sum()))
    bound = selector.bound() if selector else None
    plan = selector.plan(adapter.options.llm_layer) if selector else None
    scores = dataclasses.replace(visual.scores, features=visual.features)
    with PeakMemory(adapter.device) as memory:
        if plan is not None:
            select_s: list[float] = []

            def choose(rows: torch.Tensor) -> torch.Tensor:
                start = clock.now()
                relevance = instruction_relevance(rows.cpu(), selector.reduce)
                kept_ = bound(dataclasses.replace(scores, relevance=relevance), budget).kept
                select_s.append(clock.now() - start)
                return kept_

            generation = adapter.generate(prepared, visual, None, max_new_tokens, in_llm=(plan, choose))
            kept = generation.in_llm_kept
            score_ms, select_ms = 0.0, sum(select_s) * 1e3
            generation.prefill_ms = max(0.0, generation.prefill_ms - select_ms)
        else:
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
            score_ms, select_ms = (t1 - t0) * 1e3, (t2 - t1) * 1e3
    num_kept = visual.num_tokens if kept is None else int(kept.numel())
    # a plan past the last layer drops nothing (kept is None): the stock prefill
    prune_layer = plan.prune_layer if plan is not None and kept is not None else None
    return {"kept": num_kept, "score_ms": score_ms, "select_ms": select_ms, "prune_layer": prune_layer,
            **_generation_figures(adapter, generation, visual.num_tokens - num_kept if prune_layer is not None
                                  else 0, prune_layer),
            **memory.figures()}


def _generation_figures(adapter, generation, dropped_inside: int = 0, prune_layer: int | None = None) -> dict:
    """Prompt length, prefill / decode times and the KV cache the generation left behind.  In-LLM pruning
    (``prune_layer``, ``dropped_inside`` visual tokens dropped from it on): the layers below it keep the
    whole prompt's K/V, the others the kept tokens'."""
    kv_tokens = generation.prompt_tokens + generation.new_tokens - 1  # the last token's K/V is never cached
    bytes_per_value = torch.finfo(adapter.dtype).bits // 8
    kv = kv_cache_bytes(_llm_dims(adapter), kv_tokens, kv_tokens - dropped_inside, prune_layer, bytes_per_value)
    return {
        "prompt_tokens": generation.prompt_tokens, "new_tokens": generation.new_tokens,
        "prefill_ms": generation.prefill_ms, "decode_ms": generation.decode_ms,
        "decode_ms_per_token": generation.decode_ms / max(1, generation.new_tokens - 1),
        "kv_cache_mib": kv / 2**20,
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
    kept = oracle_indices(visual.scores.region, budget)
    adapter.generate(prepared, visual, kept, 2)
    adapter.generate(prepared, visual, None, 2, in_llm=(InLLMPruning.fastv(2), lambda rows: kept))
