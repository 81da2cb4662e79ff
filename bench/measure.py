"""Measured cost of every selector at every keep ratio, side by side in one process.

One repetition = preprocess + vision encode once (their cost is the same for every selector), then
every (selector, keep ratio) cell in a shuffled order: score → select → pruned generate for selectors
that prune before the LLM; for those that prune inside it (FastV, PTP with ``prune_in_llm``) one
generate over the full prompt through the adapter's in-LLM path with the plan ``Pipeline`` uses
(``ConfiguredSelector.in_llm_plan``), so its prefill includes the full-length layers below the prune
layer and the attention rows it ranks by.  Shuffling
per repetition interleaves ratios and selectors, so slow phases of a contended machine spread over
all cells instead of landing on one.  The "oracle" cell keeps the same number of tokens chosen by a
precomputed index (zero-cost selection): the floor the others' choosing overhead is measured against.
"""

from __future__ import annotations

import random
import sys

import numpy as np
import torch

from ptp_ros.pipeline import Pipeline
from ptp_ros.pruning import (
    NO_REGION,
    ConfiguredSelector,
    InLLMPruning,
    resolve_budget,
    selectable_budget,
    selector_names,
)
from ptp_ros.timing import STAGES, timed
from ptp_ros.vlm.stock_adapter import StockModelAdapter

from .cost_model import kv_cache_bytes, llm_dims_from_config
from .machine import PeakMemory, load_snapshot
from .rows import Row

#: PTP three ways (before the LLM after a separate probe, inside it as the library's default, without its
#: instruction stage), then every other registered selector with its defaults — "fastv" is FastV inside the
#: LLM (K=2: the last token's attention at layer 1, dropped from layer 2), "text_attention" its ranking
#: applied before the LLM (its own reduction: the mean over the instruction rows, as FastV's average
#: attention received), then a pruned prefill from scratch — and the zero-cost oracle.
DEFAULT_SELECTORS = (
    Row("ptp", ConfiguredSelector("ptp", prune_in_llm=False)),  # before the LLM, after a separate probe
    Row("ptp_in_llm", ConfiguredSelector("ptp")),  # the library's default
    Row("ptp_no_instruction", ConfiguredSelector("ptp", {"alpha": 0.0})),
    *(Row(name, ConfiguredSelector(name)) for name in selector_names() if name != "ptp"),
    Row("oracle", None),
)
UNPRUNED = "unpruned"
#: The row of models that can simply read the image at lower resolution (``adapter.downscaled(tokens)``,
#: Qwen2.5-VL's ``max_pixels``): the same token budget reached without pruning, its own encode included.
DOWNSCALED = "downscaled"


def oracle_indices(region: torch.Tensor, budget: int) -> torch.Tensor:
    """``budget`` content tokens evenly spread: a fixed answer that costs nothing to compute."""
    content = torch.nonzero(region != NO_REGION).squeeze(1)
    return content[torch.arange(budget) * content.shape[0] // budget]


def _llm_dims(adapter: StockModelAdapter) -> dict:
    """The cost model's view of the adapter's LLM (``{"llm": ...}``, from its transformers text config)."""
    return {"llm": llm_dims_from_config(adapter.model.config.text_config)}


def run_cell(
    adapter: StockModelAdapter,
    prepared,
    visual,
    row: Row | None,
    keep_ratio: float,
    max_new_tokens: int,
    oracle: dict[int, torch.Tensor],
) -> dict:
    """One row at one keep ratio (``None``: unpruned); times in ms.  Runs the library's own stages
    (``Pipeline.score`` → ``select`` → ``generate``) on the shared encode: before the LLM, scoring (the
    relevance probe) and selection are timed apart from the pruned generate; inside it, one generate over the
    full prompt ranks and drops at the plan's layers, its scoring (the attention rows) is charged to the
    prefill and its selection is timed apart and taken out of it.  The oracle keeps precomputed indices."""
    pipeline = Pipeline(adapter, (row or Row(UNPRUNED, None)).pipeline_config(max_new_tokens))
    budget = pipeline.budget(visual, keep_ratio=keep_ratio)
    timings: dict[str, float] = {}
    with PeakMemory(adapter.device) as memory:
        if row is not None and row.selector is None:  # the oracle: no scoring, no choosing
            indices = oracle[selectable_budget(visual.scores, tokens=budget)]
            generation = adapter.generate(prepared, visual, indices, max_new_tokens)
            kept, prune_layer = int(indices.numel()), None
        else:
            with timed(timings, "score", adapter.device):
                scores = pipeline.score(prepared, visual, budget)
            pruned = pipeline.generate(prepared, visual, scores, budget, timings=timings)
            generation, kept, prune_layer = pruned.generation, pruned.selection.num_kept, pruned.prune_layer
    if prune_layer is not None:  # ranked inside the prefill: no score stage of its own
        timings["score"] = 0.0
    return {
        "kept": kept,
        "score_ms": timings.get("score", 0.0),
        "select_ms": timings.get("select", 0.0),
        "prune_layer": prune_layer,
        **_generation_figures(
            adapter, generation, visual.num_tokens - kept if prune_layer is not None else 0, prune_layer
        ),
        **memory.figures(),
    }


def _generation_figures(adapter, generation, dropped_inside: int = 0, prune_layer: int | None = None) -> dict:
    """Prompt length, prefill / decode times and the KV cache the generation left behind.  In-LLM pruning
    (``prune_layer``, ``dropped_inside`` visual tokens dropped from it on): the layers below it keep the
    whole prompt's K/V, the others the kept tokens'."""
    kv_tokens = generation.prompt_tokens + generation.new_tokens - 1  # the last token's K/V is never cached
    bytes_per_value = torch.finfo(adapter.dtype).bits // 8
    kv = kv_cache_bytes(_llm_dims(adapter), kv_tokens, kv_tokens - dropped_inside, prune_layer, bytes_per_value)
    return {
        "prompt_tokens": generation.prompt_tokens,
        "new_tokens": generation.new_tokens,
        "prefill_ms": generation.prefill_ms,
        "decode_ms": generation.decode_ms,
        "decode_ms_per_token": generation.decode_ms / max(1, generation.new_tokens - 1),
        "kv_cache_mib": kv / 2**20,
    }


def run_downscaled_cell(adapter, image: np.ndarray, instruction: str, tokens: int, max_new_tokens: int) -> dict:
    """The down-scaling baseline at ``tokens``: preprocess + encode at the lower resolution, then generate
    with everything kept.  Its own preprocess / encode times replace the shared ones."""
    low = adapter.downscaled(tokens)
    timings: dict[str, float] = {}
    with PeakMemory(adapter.device) as memory:
        with timed(timings, "preprocess", adapter.device):
            prepared = low.prepare(image, instruction)
        with timed(timings, "encode", adapter.device):
            visual = low.encode(prepared)
        generation = low.generate(prepared, visual, None, max_new_tokens)
    return {
        "kept": visual.num_tokens,
        "preprocess_ms": timings["preprocess"],
        "encode_ms": timings["encode"],
        "score_ms": 0.0,
        "select_ms": 0.0,
        **_generation_figures(adapter, generation),
        **memory.figures(),
    }


def measure(
    adapter: StockModelAdapter,
    image: np.ndarray,
    instruction: str,
    keep_ratios: list[float],
    selectors: tuple[Row, ...] = DEFAULT_SELECTORS,
    repetitions: int = 3,
    max_new_tokens: int = 8,
    seed: int = 0,
    log=sys.stderr,
) -> list[dict]:
    """Every raw figure: one record per (repetition, selector, keep ratio), plus the unpruned cell."""
    pruned_ratios = [r for r in keep_ratios if r < 1.0]
    cells = [(UNPRUNED, 1.0)] + [(s.label, r) for s in selectors for r in pruned_ratios]
    if adapter.supports_downscaling:
        cells += [(DOWNSCALED, r) for r in pruned_ratios]
    _warm_up(adapter, image, instruction, min(keep_ratios))
    # exactly max_new_tokens every time (a random-weight model may otherwise stop early at EOS); restored after
    config = adapter.model.generation_config
    before, config.min_new_tokens = config.min_new_tokens, max_new_tokens
    try:
        return _repetitions(
            adapter,
            image,
            instruction,
            pruned_ratios,
            cells,
            {s.label: s for s in selectors},
            repetitions,
            max_new_tokens,
            seed,
            log,
        )
    finally:
        config.min_new_tokens = before


def _repetitions(
    adapter: StockModelAdapter,
    image: np.ndarray,
    instruction: str,
    pruned_ratios: list[float],
    cells: list[tuple[str, float]],
    by_name: dict[str, Row],
    repetitions: int,
    max_new_tokens: int,
    seed: int,
    log,
) -> list[dict]:
    records = []
    for rep in range(repetitions):
        shared: dict[str, float] = {}
        with PeakMemory(adapter.device) as encode_memory:
            with timed(shared, "preprocess", adapter.device):
                prepared = adapter.prepare(image, instruction)
            with timed(shared, "encode", adapter.device):
                visual = adapter.encode(prepared)
        budgets = {selectable_budget(visual.scores, keep_ratio=r) for r in pruned_ratios}
        oracle = {b: oracle_indices(visual.scores.region, b) for b in budgets}  # computed before any timing
        order = cells[:]
        random.Random(seed + rep).shuffle(order)
        rep_load = load_snapshot()
        for name, ratio in order:
            if name == DOWNSCALED:
                tokens = resolve_budget(visual.num_tokens, keep_ratio=ratio)
                cell = run_downscaled_cell(adapter, image, instruction, tokens, max_new_tokens)
            else:
                cell = run_cell(
                    adapter,
                    prepared,
                    visual,
                    None if name == UNPRUNED else by_name[name],
                    ratio,
                    max_new_tokens,
                    oracle,
                )
            record = {
                "rep": rep,
                "selector": name,
                "keep_ratio": ratio,
                "visual_tokens": visual.num_tokens,
                "preprocess_ms": shared["preprocess"],
                "encode_ms": shared["encode"],
                "encode_peak_rss_mib": encode_memory.figures()["peak_rss_mib"],
                **cell,
            }
            record["e2e_ms"] = sum(record[f"{stage}_ms"] for stage in STAGES)
            record["load_avg_1m"] = rep_load["load_avg_1m"]
            records.append(record)
            print(
                f"rep {rep} {name:>18} r={ratio:<6} kept={record['kept']:>5} score={record['score_ms']:8.1f} "
                f"select={record['select_ms']:7.1f} prefill={record['prefill_ms']:9.1f} "
                f"decode/tok={record['decode_ms_per_token']:7.1f} e2e={record['e2e_ms']:9.1f} ms",
                file=log,
                flush=True,
            )
    return records


def _warm_up(adapter: StockModelAdapter, image: np.ndarray, instruction: str, keep_ratio: float) -> None:
    """One untimed request: first-call costs (allocator, kernel selection, lazy init) are not charged."""
    prepared = adapter.prepare(image, instruction)
    visual = adapter.encode(prepared)
    adapter.instruction_attention(prepared, visual)
    kept = oracle_indices(visual.scores.region, selectable_budget(visual.scores, keep_ratio=keep_ratio))
    adapter.generate(prepared, visual, kept, 2)
    adapter.generate(prepared, visual, None, 2, in_llm=(InLLMPruning.fastv(2), lambda rows: kept))
