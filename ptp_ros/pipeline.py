"""One request end to end: image + instruction + budget → answer, selection and per-stage timings."""

from __future__ import annotations

import dataclasses
import math
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from .pruning import (
    NO_REGION,
    BoundSelector,
    InLLMPruning,
    PTPConfig,
    Selection,
    TokenScores,
    check_keep_ratio,
    check_tokens,
    fused_scores,
    instruction_relevance,
    make_selector,
    ptp_select,
    resolve_budget,
)
from .timing import timed
from .vlm.base import Cancelled, Generation, PreparedInput, VisionLanguageAdapter, VisualTokens

__all__ = ["Answer", "Cancelled", "InvalidRequest", "Pipeline", "PipelineConfig", "validate_image"]

NEWLINE_POLICIES = ("drop", "keep")


class InvalidRequest(ValueError):
    """A request the pipeline refuses before touching the model (bad image, instruction or budget)."""


@dataclass(frozen=True)
class PipelineConfig:
    selector: str = "ptp"
    ptp: PTPConfig = PTPConfig()
    selector_options: dict = field(default_factory=dict)  # for peer selectors
    instruction_reduce: str = "max"  # over instruction tokens: "max" (paper) or "mean"
    newline_policy: str = "drop"  # structural tokens when pruning: "drop", or "keep" (counted in the budget)
    # PTP: rank at the adapter's LLM layer inside the LLM and drop from that layer on,
    # instead of a separate relevance probe followed by a pruned prefill (see vlm/in_llm.py).  On by
    # default: cheaper than the probe and, on the validation splits of both proxies, far more accurate
    # (docs/accuracy/stage_sweep/)
    prune_in_llm: bool = True
    # PTP only: run the relevance probe over the ⌈probe_candidates × budget⌉ tokens PTP ranks best bottom-up
    # (α = 0) and the text, not over every visual token; the others get no relevance.  0: over all of them.
    probe_candidates: float = 0.0
    max_new_tokens: int = 32
    max_instruction_chars: int = 2000

    def __post_init__(self) -> None:
        if self.newline_policy not in NEWLINE_POLICIES:
            raise ValueError(f"newline_policy must be one of {NEWLINE_POLICIES}, got {self.newline_policy!r}")
        if self.instruction_reduce not in ("max", "mean"):
            raise ValueError(f"instruction_reduce must be 'max' or 'mean', got {self.instruction_reduce!r}")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.probe_candidates and not (self.probe_candidates >= 1.0 and math.isfinite(self.probe_candidates)):
            raise ValueError(f"probe_candidates must be 0 (off) or >= 1, got {self.probe_candidates}")
        if self.probe_candidates and (self.selector != "ptp" or self.prune_in_llm):
            raise ValueError(
                "probe_candidates narrows PTP's relevance probe before the LLM: it needs "
                "selector='ptp' and prune_in_llm=False"
            )
        if self.selector != "ptp" and self.ptp != PTPConfig():
            raise ValueError(f"PTP's options (alpha, ...) do not apply to selector {self.selector!r}")
        if self.selector == "ptp" and self.selector_options:
            raise ValueError("selector 'ptp' takes its options as ptp=PTPConfig(...), not selector_options")

    @classmethod
    def for_selector(cls, selector: str, options: dict | None = None, **fields) -> PipelineConfig:
        """The configuration that runs ``selector`` with ``options`` (PTPConfig fields for "ptp", the selector's
        own otherwise): how the benchmarks turn a row into what the library runs."""
        options = dict(options or {})
        if selector == "ptp":
            return cls(selector=selector, ptp=PTPConfig(**options), **fields)
        return cls(selector=selector, selector_options=options, **fields)


@dataclass
class Answer:
    text: str
    selection: Selection
    visual: VisualTokens
    timings_ms: dict[str, float]
    prompt_tokens: int
    new_tokens: int
    selector: str
    prune_layer: int | None = None  # the first LLM layer that read only the kept tokens; None: pruned before the LLM

    def to_dict(self) -> dict:
        """The JSON view of an answer: what ``ptp-ask --json`` prints, and the fields the node's ``result`` shares
        (the node adds its own: status, id, mode, and queue / convert / end-to-end times in ``latency_ms``)."""
        sizes = (
            self.selection.region_sizes
            if self.selection.region_sizes is not None
            else self.visual.scores.region_sizes()
        )
        # counted from the kept indices, so sum(quotas.kept) + structural_kept == visual_tokens_kept
        region = self.visual.scores.region.cpu()
        kept_region = region[self.selection.kept.cpu()]
        quotas = torch.bincount(kept_region[kept_region != NO_REGION], minlength=len(sizes))
        return {
            "answer": self.text,
            "visual_tokens_total": self.selection.total,
            "visual_tokens_kept": self.selection.num_kept,
            "keep_ratio": round(self.selection.keep_ratio, 6),
            "selector": self.selector,
            "quotas": [
                {"region": r, "name": self.visual.region_names[r], "kept": int(quotas[r]), "size": int(sizes[r])}
                for r in range(len(self.visual.region_names))
            ],
            "structural_kept": int((kept_region == NO_REGION).sum()),  # row newlines: in no region's quota
            "structural_total": int((region == NO_REGION).sum()),
            "prompt_tokens": self.prompt_tokens,  # as fed to the LLM (in-LLM pruning: the whole prompt)
            "prune_layer": self.prune_layer,
            "new_tokens": self.new_tokens,
            "latency_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},  # per stage (timing.STAGES) + total
        }


def validate_image(image: np.ndarray) -> np.ndarray:
    """An RGB uint8 [H, W, 3] array, or a clear ``InvalidRequest``."""
    if not isinstance(image, np.ndarray):
        raise InvalidRequest(f"image must be a numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise InvalidRequest(f"image must be RGB [H, W, 3], got shape {tuple(image.shape)}")
    if image.dtype != np.uint8:
        raise InvalidRequest(f"image must be uint8, got {image.dtype}")
    if min(image.shape[:2]) < 14:
        raise InvalidRequest(f"image of {image.shape[1]}x{image.shape[0]} px is too small (min 14 px a side)")
    return image


@dataclass
class Pruned:
    """What ``Pipeline.generate`` returns: the generation, the tokens kept (chosen before or inside the LLM), the
    scores they were chosen on, and where inside the LLM they were dropped (``None``: before it, or nothing)."""

    generation: Generation
    selection: Selection
    scores: TokenScores
    prune_layer: int | None


class Pipeline:
    """Adapter + selector: the library's one entry point, used by the CLI, the node and the benchmarks.

    ``answer`` runs the stages in order; each is public so that the benchmarks time and reuse them
    (``ptp-bench`` runs score → select → generate per cell on one encode, ``ptp-eval`` selects through it):
    ``prepare`` → ``encode`` → ``budget`` → ``score`` → ``select`` → ``generate``.
    """

    def __init__(self, adapter: VisionLanguageAdapter, config: PipelineConfig = PipelineConfig()):
        self.adapter = adapter
        self.config = config
        options = {"config": config.ptp} if config.selector == "ptp" else config.selector_options
        self.selector = make_selector(config.selector, **options)

    def validate_instruction(self, instruction: str) -> str:
        if not isinstance(instruction, str) or not instruction.strip():
            raise InvalidRequest("instruction is empty")
        if len(instruction) > self.config.max_instruction_chars:
            raise InvalidRequest(
                f"instruction has {len(instruction)} characters; the limit is {self.config.max_instruction_chars}"
            )
        return instruction.strip()

    def answer(
        self,
        image: np.ndarray,
        instruction: str,
        *,
        keep_ratio: float | None = None,
        tokens: int | None = None,
        max_new_tokens: int | None = None,
        cancel: threading.Event | None = None,
    ) -> Answer:
        """Answer ``instruction`` about ``image`` keeping ``keep_ratio`` (or ``tokens``) of the visual tokens.

        Setting ``cancel`` (from another thread) ends the request with ``Cancelled`` at the next stage
        boundary or generated token.
        """
        image = validate_image(image)
        instruction = self.validate_instruction(instruction)
        keep_ratio, tokens = budget_request(keep_ratio, tokens)
        timings: dict[str, float] = {}
        device = self.adapter.device
        with timed(timings, "preprocess", device):
            prepared = self.adapter.prepare(image, instruction)
        _check(cancel, "before encoding")
        with timed(timings, "encode", device):
            visual = self.encode(prepared)
        _check(cancel, "after encoding")
        budget = self.budget(visual, keep_ratio=keep_ratio, tokens=tokens)
        with timed(timings, "score", device):
            scores = self.score(prepared, visual, budget)
        pruned = self.generate(prepared, visual, scores, budget, max_new_tokens, cancel=cancel, timings=timings)
        visual.scores = pruned.scores
        timings["prefill"] = pruned.generation.prefill_ms
        timings["decode"] = pruned.generation.decode_ms
        timings["total"] = sum(timings.values())
        return Answer(
            text=pruned.generation.text,
            selection=pruned.selection,
            visual=visual,
            timings_ms=timings,
            prompt_tokens=pruned.generation.prompt_tokens,
            new_tokens=pruned.generation.new_tokens,
            selector=self.selector.name,
            prune_layer=pruned.prune_layer,
        )

    def prepare(self, image: np.ndarray, instruction: str) -> PreparedInput:
        """The checked image and instruction through the model's processor."""
        return self.adapter.prepare(validate_image(image), self.validate_instruction(instruction))

    def encode(self, prepared: PreparedInput) -> VisualTokens:
        return self.adapter.encode(prepared)

    def budget(self, visual: VisualTokens, keep_ratio: float | None = None, tokens: int | None = None) -> int:
        """The token budget over all ``visual`` tokens (``budget_request``'s rules; keep-all when it reaches
        them all); ``select`` caps it at the selectable tokens."""
        keep_ratio, tokens = budget_request(keep_ratio, tokens)
        return resolve_budget(visual.num_tokens, keep_ratio=keep_ratio, tokens=tokens)

    def score(self, prepared: PreparedInput, visual: VisualTokens, budget: int) -> TokenScores:
        """``visual``'s scores with what the selector needs: the features (DivPrune, PTP's diverse pick) and,
        when it ranks before the LLM, the instruction relevance (a probe); ``visual`` is left as it is."""
        scores = visual.scores
        if self.selector.needs_features and scores.features is None:
            scores = dataclasses.replace(scores, features=visual.features)
        if self.selector.needs_relevance and budget < visual.num_tokens and self.in_llm_plan() is None:
            if self.config.probe_candidates:
                relevance = candidate_relevance(
                    self.adapter, prepared, visual, self.config.ptp, budget, self.config.probe_candidates, self._reduce
                )
            else:
                relevance = instruction_relevance(self.adapter.instruction_attention(prepared, visual), self._reduce)
            scores = dataclasses.replace(scores, relevance=relevance)
        return scores

    def generate(
        self,
        prepared: PreparedInput,
        visual: VisualTokens,
        scores: TokenScores,
        budget: int,
        max_new_tokens: int | None = None,
        *,
        cancel: threading.Event | None = None,
        timings: dict[str, float] | None = None,
    ) -> Pruned:
        """Select and generate.  Before the LLM: ``select`` (timed as "select"), then a generate over the kept
        tokens.  Inside it: one generate over the whole prompt that ranks at the plan's layer from the
        instruction's attention there and drops from it on; its selection is timed apart and taken out of
        the prefill, so each is counted once."""
        timings = {} if timings is None else timings
        device = self.adapter.device
        max_new_tokens = max_new_tokens or self.config.max_new_tokens
        keep_all = budget >= visual.num_tokens
        plan = None if keep_all else self.in_llm_plan()
        if plan is None:
            with timed(timings, "select", device):
                selection = self.select(visual.num_tokens, scores, budget)
            _check(cancel, "before generating")
            generation = self.adapter.generate(
                prepared, visual, None if keep_all else selection.kept, max_new_tokens, cancel=cancel
            )
            return Pruned(generation, selection, scores, None)
        chosen: list[tuple[TokenScores, Selection]] = []

        def choose(rows: torch.Tensor) -> torch.Tensor:
            with timed(timings, "select", device):
                ranked = dataclasses.replace(scores, relevance=instruction_relevance(rows.cpu(), self._reduce))
                chosen.append((ranked, self.select(visual.num_tokens, ranked, budget)))
            return chosen[-1][1].kept

        _check(cancel, "before generating")
        generation = self.adapter.generate(prepared, visual, None, max_new_tokens, cancel=cancel, in_llm=(plan, choose))
        generation.prefill_ms -= timings.setdefault("select", 0.0)  # timed inside the prefill: counted once
        if not chosen or generation.in_llm_kept is None:  # a plan past the last layer drops nothing
            return Pruned(generation, self.select(visual.num_tokens, scores, visual.num_tokens), scores, None)
        return Pruned(generation, chosen[-1][1], chosen[-1][0], plan.prune_layer)

    def in_llm_plan(self) -> InLLMPruning | None:
        """Where inside the LLM this pipeline ranks and drops visual tokens; ``None``: before the LLM."""
        return in_llm_plan(self.selector, self.config.prune_in_llm, self.adapter.options.llm_layer)

    @property
    def _reduce(self) -> str:
        return self.selector.relevance_reduce(default=self.config.instruction_reduce)

    def select(self, total: int, scores: TokenScores, budget: int) -> Selection:
        """At most ``budget`` of the ``total`` visual tokens (all of them when ``budget`` reaches ``total``), capped
        at the selectable ones; with ``newline_policy="keep"`` the kept structural tokens count in it."""
        if budget >= total:
            return Selection(
                kept=torch.arange(total),
                total=total,
                quotas=scores.region_sizes(),
                region_sizes=scores.region_sizes(),
                fused=fused_scores(scores, 0.0),
                method="keep_all",
            )
        structural = torch.nonzero(scores.region.cpu() == NO_REGION).squeeze(1)
        selectable = int(scores.region_sizes().sum())
        if self.config.newline_policy == "drop" or structural.numel() == 0:
            return self.selector(scores, min(budget, selectable))
        # All newlines when they fit beside >= 1 token (kept tokens keep their exact row index); else only those
        # ending rows that hold a kept token (rows stay delimited), and a lone token drops its newline if it must.
        if budget > structural.numel():
            selection = self.selector(scores, min(budget - structural.numel(), selectable))
            newlines = structural
        else:
            content = min(budget, selectable)
            while True:
                selection = self.selector(scores, content)
                newlines = self._row_newlines(scores.region, scores.global_region, selection.kept, structural)
                over = content + newlines.numel() - budget
                if over <= 0:
                    break
                if content <= 1:
                    newlines = newlines[: max(0, budget - content)]
                    break
                content = max(1, content - over)  # strictly smaller: the loop ends
        kept = torch.sort(torch.cat([selection.kept.cpu(), newlines])).values
        return dataclasses.replace(selection, kept=kept)

    @staticmethod
    def _row_newlines(
        region: torch.Tensor, global_region: int | None, kept: torch.Tensor, structural: torch.Tensor
    ) -> torch.Tensor:
        """The structural tokens ending a row that holds a kept token: the first one after the token
        (the global view, packed before the tile grid without newlines, owns none)."""
        kept = kept.cpu()
        kept_region = region.cpu()[kept]
        in_rows = kept_region != NO_REGION
        if global_region is not None:
            in_rows &= kept_region != global_region
        pos = torch.searchsorted(structural, kept[in_rows])
        return torch.unique(structural[pos[pos < structural.numel()]])


def candidate_relevance(
    adapter: VisionLanguageAdapter,
    prepared,
    visual: VisualTokens,
    config: PTPConfig,
    budget: int,
    multiple: float,
    reduce: str,
) -> torch.Tensor:
    """[N] relevance from a probe over PTP's ⌈multiple × budget⌉ bottom-up best tokens only (0 elsewhere).

    The probe's cost scales with the tokens it reads, so at 11.1 % kept and ``multiple`` 3 it reads a third
    of the visual tokens.  A relevance spread evenly over the candidates leaves their bottom-up order as it
    is (the fusion's top-down term is then the same for all of them)."""
    scores = dataclasses.replace(visual.scores, relevance=None, features=visual.features)
    count = min(int(scores.region_sizes().sum()), math.ceil(multiple * budget))
    candidates = ptp_select(scores, count, dataclasses.replace(config, alpha=0.0)).kept
    rows = adapter.instruction_attention(prepared, visual, kept=candidates)
    relevance = torch.zeros(visual.num_tokens, dtype=torch.float32)
    relevance[candidates] = instruction_relevance(rows, reduce).float()
    return relevance


def in_llm_plan(selector: BoundSelector, prune_in_llm: bool, llm_layer: int) -> InLLMPruning | None:
    """The selector's own in-LLM plan (FastV's), else with ``prune_in_llm`` a selector that declares
    ``relevance_in_llm`` (PTP) and needs relevance ranks at ``llm_layer`` (the adapter's relevance layer) from
    that layer's input and drops from it on."""
    if selector.in_llm is not None:
        return selector.in_llm
    if prune_in_llm and selector.spec.relevance_in_llm and selector.needs_relevance:
        return InLLMPruning(score_layer=llm_layer, prune_layer=llm_layer, queries="instruction")
    return None


def budget_request(keep_ratio: float | None, tokens: int | None) -> tuple[float | None, int | None]:
    """A request's budget checked at the edge, before any model runs: a keep ratio in ``KEEP_RATIO_RANGE`` or a
    token count >= 1 (keep-all when neither is given); the token count wins when both are."""
    if keep_ratio is None and tokens is None:
        return 1.0, None
    try:
        return (None, check_tokens(tokens)) if tokens is not None else (check_keep_ratio(keep_ratio), None)
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(str(exc)) from exc


def _check(cancel: threading.Event | None, where: str) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"cancelled {where}")
