"""One request end to end: image + instruction + budget → answer, selection and per-stage timings."""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from .budget import check_keep_ratio, check_tokens
from .pruning import (
    NO_REGION,
    ConfiguredSelector,
    InLLMPruning,
    PTPConfig,
    Selection,
    TokenScores,
    fused_scores,
    instruction_relevance,
    ptp_select,
    resolve_budget,
    select_views,
    view_quotas,
)
from .pruning.views import view_bounds
from .result import AnswerResult, RegionQuota, ViewTokens
from .timing import timed
from .vlm.base import Cancelled, Generation, PreparedInput, VisionLanguageAdapter, VisualTokens, join_views
from .vlm.encode_cache import EncodeReuse

__all__ = ["Answer", "Cancelled", "InvalidRequest", "Pipeline", "PipelineConfig", "validate_image", "validate_views"]

NEWLINE_POLICIES = ("drop", "keep")


#: Called with a stage's name (``timing.STAGES``) as the request enters it (``Pipeline.answer``'s ``on_stage``).
OnStage = Callable[[str], None]
#: Called once with the tokens each camera view keeps, as soon as the split is known (``Pipeline.answer``'s
#: ``on_views``).
OnViews = Callable[[tuple[ViewTokens, ...]], None]
#: The view name of a bare image (not a camera mapping).
SINGLE_VIEW = "image"


class InvalidRequest(ValueError):
    """A request the pipeline refuses before touching the model (bad image, instruction or budget)."""


@dataclass(frozen=True)
class PipelineConfig:
    selector: ConfiguredSelector = ConfiguredSelector()  # which selector, its options, its stage (PTP inside the LLM)
    newline_policy: str = "drop"  # structural tokens when pruning: "drop", or "keep" (counted in the budget)
    max_new_tokens: int = 32
    max_instruction_chars: int = 2000
    encode_cache_frames: int = 0  # frames whose encoding is kept for later requests (vlm/encode_cache.py); 0: none
    encode_reuse_threshold: float = 0.0  # largest change of a downsampled view that reuses it; 0: bit-identical only

    def __post_init__(self) -> None:
        if not isinstance(self.selector, ConfiguredSelector):
            raise TypeError(f"selector must be a ConfiguredSelector, got {type(self.selector).__name__}")
        if self.newline_policy not in NEWLINE_POLICIES:
            raise ValueError(f"newline_policy must be one of {NEWLINE_POLICIES}, got {self.newline_policy!r}")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if not isinstance(self.encode_cache_frames, int) or self.encode_cache_frames < 0:
            raise ValueError(f"encode_cache_frames must be an integer >= 0, got {self.encode_cache_frames!r}")
        if not 0.0 <= self.encode_reuse_threshold <= 1.0:
            raise ValueError(f"encode_reuse_threshold must be in [0, 1], got {self.encode_reuse_threshold!r}")


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
    view_names: tuple[str, ...] = (SINGLE_VIEW,)  # the camera views, in prompt order
    encode_reused: float = 0.0  # of the views' tiles, the fraction whose encoding was reused (1: every frame cached)

    @property
    def views(self) -> tuple[ViewTokens, ...]:
        """The tokens each camera view kept of its own (kept counts add up to the selection's)."""
        return view_tokens(self.view_names, self.visual.scores, self.selection.kept)

    def result(self) -> AnswerResult:
        """The typed result of this answer: what ``ptp-ask --json`` prints (``AnswerResult.to_json``), and the
        fields the node's ``result`` and the ``ask`` action share with it."""
        sizes = (
            self.selection.region_sizes
            if self.selection.region_sizes is not None
            else self.visual.scores.region_sizes()
        )
        # counted from the kept indices, so sum(quotas.kept) + structural_kept == visual_tokens_kept
        region = self.visual.scores.region.cpu()
        kept_region = region[self.selection.kept.cpu()]
        quotas = torch.bincount(kept_region[kept_region != NO_REGION], minlength=len(sizes))
        return AnswerResult(
            answer=self.text,
            visual_tokens_total=self.selection.total,
            visual_tokens_kept=self.selection.num_kept,
            keep_ratio=round(self.selection.keep_ratio, 6),
            selector=self.selector,
            quotas=tuple(
                RegionQuota(r, self.visual.region_names[r], int(quotas[r]), int(sizes[r]))
                for r in range(len(self.visual.region_names))
            ),
            structural_kept=int((kept_region == NO_REGION).sum()),
            structural_total=int((region == NO_REGION).sum()),
            prompt_tokens=self.prompt_tokens,
            prune_layer=self.prune_layer,
            new_tokens=self.new_tokens,
            latency_ms={k: round(v, 3) for k, v in self.timings_ms.items()},
            views=self.views,
            encode_reused=round(self.encode_reused, 6),
        )


def view_tokens(names: tuple[str, ...], scores: TokenScores, kept: torch.Tensor) -> tuple[ViewTokens, ...]:
    """Per view of ``scores``, named ``names``, how many of its tokens are among ``kept``."""
    kept = kept.cpu()
    return tuple(
        ViewTokens(name, int(((kept >= start) & (kept < end)).sum()), end - start)
        for name, (start, end) in zip(names, view_bounds(scores))
    )


def validate_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    """An RGB uint8 [H, W, 3] array, or a clear ``InvalidRequest`` naming ``name``."""
    if not isinstance(image, np.ndarray):
        raise InvalidRequest(f"{name} must be a numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise InvalidRequest(f"{name} must be RGB [H, W, 3], got shape {tuple(image.shape)}")
    if image.dtype != np.uint8:
        raise InvalidRequest(f"{name} must be uint8, got {image.dtype}")
    if min(image.shape[:2]) < 14:
        raise InvalidRequest(f"{name} of {image.shape[1]}x{image.shape[0]} px is too small (min 14 px a side)")
    return image


def validate_views(image: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A bare RGB image as the one view ``SINGLE_VIEW``, or a camera name → RGB frame mapping (its order is the
    prompt's) with every name a non-empty string and every frame valid; else a clear ``InvalidRequest``."""
    if isinstance(image, np.ndarray):
        return {SINGLE_VIEW: validate_image(image)}
    if not isinstance(image, Mapping):
        raise InvalidRequest(f"image must be a numpy array or a camera → image mapping, got {type(image).__name__}")
    if not image:
        raise InvalidRequest("no camera view given")
    for name in image:
        if not isinstance(name, str) or not name.strip():
            raise InvalidRequest(f"camera names must be non-empty strings, got {name!r}")
    return {name: validate_image(frame, f"camera {name!r}") for name, frame in image.items()}


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

    def __init__(
        self,
        adapter: VisionLanguageAdapter,
        config: PipelineConfig = PipelineConfig(),
        reuse: EncodeReuse | None = None,
    ):
        """``reuse``: an encode cache to share with other pipelines over the same adapter; by default one of the
        config's size (none at ``encode_cache_frames`` 0)."""
        self.adapter = adapter
        self.config = config
        self.selector = config.selector.bound
        if reuse is None and config.encode_cache_frames:
            reuse = EncodeReuse(adapter, config.encode_cache_frames, config.encode_reuse_threshold)
        self.reuse = reuse

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
        image: np.ndarray | Mapping[str, np.ndarray],
        instruction: str,
        *,
        keep_ratio: float | None = None,
        tokens: int | None = None,
        max_new_tokens: int | None = None,
        cancel: threading.Event | None = None,
        on_stage: OnStage | None = None,
        on_views: OnViews | None = None,
    ) -> Answer:
        """Answer ``instruction`` about ``image`` keeping ``keep_ratio`` (or ``tokens``) of the visual tokens.

        ``image`` is one RGB frame, or a camera name → RGB frame mapping: its frames go into one prompt as several
        images, in the mapping's order, under one token budget split camera → region → token (the configured
        selector's ``view_split``); a one-entry mapping answers as its frame alone does.  ``on_views`` is called
        once with the tokens each view keeps, as soon as that is known: before the prefill when pruning before the
        LLM, at the prune layer inside it.

        With an encode cache (``reuse``), a frame already encoded is not encoded again, and a new frame from a
        camera encodes only the tiles that changed since that camera's last one (``Answer.encode_reused``); each
        camera view is its own entry, under its name (a bare image's is ``SINGLE_VIEW``).

        Setting ``cancel`` (from another thread) ends the request with ``Cancelled`` at the next stage
        boundary or generated token.  ``on_stage`` is called with each stage's name (``timing.STAGES``) as it
        begins, on the thread that runs the request: "preprocess", "encode", "score", "select" (before the LLM),
        "prefill", and "decode" once the first token is out; a cancelled request announces no further stage.
        """
        stage = on_stage or _silent
        views = validate_views(image)
        instruction = self.validate_instruction(instruction)
        keep_ratio, tokens = budget_request(keep_ratio, tokens)
        names = tuple(views)
        timings: dict[str, float] = {}
        device = self.adapter.device
        stage("preprocess")
        with timed(timings, "preprocess", device):
            prepared = self._prepare_views(views, instruction)
        _check(cancel, "before encoding")
        stage("encode")
        with timed(timings, "encode", device):
            visual, encode_reused = self.encode_views(prepared, views, instruction)
        if len(names) > 1:
            visual.region_names = [
                f"{name}: {region}" for name, view in zip(names, visual.views) for region in view.region_names
            ]
        _check(cancel, "after encoding")
        stage("score")
        budget = self.budget(visual, keep_ratio=keep_ratio, tokens=tokens)
        with timed(timings, "score", device):
            scores = self.score(prepared, visual, budget)
        announce = None if on_views is None else (lambda kept: on_views(view_tokens(names, visual.scores, kept)))
        pruned = self.generate(
            prepared,
            visual,
            scores,
            budget,
            max_new_tokens,
            cancel=cancel,
            timings=timings,
            on_stage=on_stage,
            on_kept=announce,
        )
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
            view_names=names,
            encode_reused=encode_reused,
        )

    def prepare(self, image: np.ndarray | Mapping[str, np.ndarray], instruction: str) -> PreparedInput:
        """The checked image (or camera views) and instruction through the model's processor."""
        return self._prepare_views(validate_views(image), self.validate_instruction(instruction))

    def _prepare_views(self, views: dict[str, np.ndarray], instruction: str) -> PreparedInput:
        if len(views) == 1:
            return self.adapter.prepare(next(iter(views.values())), instruction)
        if not getattr(self.adapter, "supports_views", False):
            raise InvalidRequest(f"{self.adapter.name} takes one image per prompt, not {len(views)} camera views")
        return self.adapter.prepare(list(views.values()), instruction)

    def encode(self, prepared: PreparedInput) -> VisualTokens:
        return self.adapter.encode(prepared)

    def encode_views(
        self, prepared: PreparedInput, views: Mapping[str, np.ndarray], instruction: str
    ) -> tuple[VisualTokens, float]:
        """(``prepared``'s visual tokens, the mean over its camera ``views`` of the fraction of each one's tiles
        reused).  Without an encode cache, one ``encode`` of the whole prompt (nothing reused).  With one, each
        camera's frame is its own entry under the camera's name: several views are each encoded (or found) through
        the cache on a prompt of that frame alone, prepared only when the frame is not cached, and joined in
        prompt order."""
        if self.reuse is None:
            return self.encode(prepared), 0.0
        if len(views) == 1:
            ((camera, image),) = views.items()
            return self.reuse.encode(prepared, image, camera)
        encoded = [
            self.reuse.encode(functools.partial(self.adapter.prepare, image, instruction), image, camera)
            for camera, image in views.items()
        ]
        return join_views([visual for visual, _ in encoded]), sum(reused for _, reused in encoded) / len(encoded)

    def expected_encode_fraction(self, image: np.ndarray | Mapping[str, np.ndarray]) -> float:
        """The fraction of the tiles of ``image`` (one frame, or a camera → frame mapping as ``answer`` takes) a
        request on it is expected to run through the vision tower (for the latency model): 1 without an encode
        cache, else the mean over the views of ``EncodeReuse.expected_encode_fraction``."""
        if self.reuse is None:
            return 1.0
        views = validate_views(image)
        return sum(self.reuse.expected_encode_fraction(frame, camera) for camera, frame in views.items()) / len(views)

    def budget(self, visual: VisualTokens, keep_ratio: float | None = None, tokens: int | None = None) -> int:
        """The token budget over all ``visual`` tokens for a keep ratio or a token count as ``budget_request``
        checked it (keep-all when it reaches them all); ``select`` caps it at the selectable tokens."""
        return resolve_budget(visual.num_tokens, keep_ratio=keep_ratio, tokens=tokens)

    def score(self, prepared: PreparedInput, visual: VisualTokens, budget: int) -> TokenScores:
        """``visual``'s scores with what the selector needs: the features (DivPrune, PTP's diverse pick) and,
        when it ranks before the LLM, the instruction relevance (a probe); ``visual`` is left as it is."""
        scores = visual.scores
        if self.selector.needs_features and scores.features is None:
            scores = dataclasses.replace(scores, features=visual.features)
        if self.selector.needs_relevance and budget < visual.num_tokens and self.in_llm_plan() is None:
            configured = self.config.selector
            if configured.probe_candidates:
                relevance = candidate_relevance(
                    self.adapter,
                    prepared,
                    visual,
                    self.selector.options["config"],
                    budget,
                    configured.probe_candidates,
                    self._reduce,
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
        on_stage: OnStage | None = None,
        on_kept: Callable[[torch.Tensor], None] | None = None,
    ) -> Pruned:
        """Select and generate.  Before the LLM: ``select`` (timed as "select"), then a generate over the kept
        tokens.  Inside it: one generate over the whole prompt that ranks at the plan's layer from the
        instruction's attention there and drops from it on; its selection is timed apart and taken out of
        the prefill, so each is counted once.  ``on_stage``: as in ``answer``; ``on_kept`` is called once with
        the kept indices as soon as they are chosen."""
        stage = on_stage or _silent
        announce = on_kept or (lambda kept: None)
        reading = cancel if on_stage is None else _FirstTokenWatch(cancel, lambda: on_stage("decode"))
        timings = {} if timings is None else timings
        device = self.adapter.device
        max_new_tokens = max_new_tokens or self.config.max_new_tokens
        keep_all = budget >= visual.num_tokens
        plan = None if keep_all else self.in_llm_plan()
        if plan is None:
            stage("select")
            with timed(timings, "select", device):
                selection = self.select(visual.num_tokens, scores, budget)
            _check(cancel, "before generating")
            announce(selection.kept)
            stage("prefill")
            generation = self.adapter.generate(
                prepared, visual, None if keep_all else selection.kept, max_new_tokens, cancel=reading
            )
            return Pruned(generation, selection, scores, None)
        chosen: list[tuple[TokenScores, Selection]] = []

        def choose(rows: torch.Tensor) -> torch.Tensor:
            with timed(timings, "select", device):
                ranked = dataclasses.replace(scores, relevance=instruction_relevance(rows.cpu(), self._reduce))
                chosen.append((ranked, self.select(visual.num_tokens, ranked, budget)))
            announce(chosen[-1][1].kept)
            return chosen[-1][1].kept

        _check(cancel, "before generating")
        stage("prefill")
        generation = self.adapter.generate(
            prepared, visual, None, max_new_tokens, cancel=reading, in_llm=(plan, choose)
        )
        generation.prefill_ms -= timings.setdefault("select", 0.0)  # timed inside the prefill: counted once
        if not chosen or generation.in_llm_kept is None:  # a plan past the last layer drops nothing
            everything = self.select(visual.num_tokens, scores, visual.num_tokens)
            if not chosen:
                announce(everything.kept)
            return Pruned(generation, everything, scores, None)
        return Pruned(generation, chosen[-1][1], chosen[-1][0], plan.prune_layer)

    def in_llm_plan(self) -> InLLMPruning | None:
        """Where inside the LLM this pipeline ranks and drops visual tokens; ``None``: before the LLM."""
        return self.config.selector.in_llm_plan(self.adapter.options.llm_layer)

    @property
    def _reduce(self) -> str:
        return self.config.selector.reduce

    def select(
        self, total: int, scores: TokenScores, budget: int, view_weights: torch.Tensor | None = None
    ) -> Selection:
        """At most ``budget`` of the ``total`` visual tokens (all of them when ``budget`` reaches ``total``), capped
        at the selectable ones; with ``newline_policy="keep"`` the kept structural tokens count in it.  Over several
        camera views the budget is split across them first (``view_quotas`` by the selector's ``view_split``, with
        ``view_weights`` in place of the views' evidence when given), then each view is selected on its own."""
        if scores.parts and budget < total:
            selectable = int(scores.region_sizes().sum())
            split = self.config.selector.view_split
            quotas = view_quotas(scores, min(budget, selectable), split, self._view_alpha, view_weights)
            return select_views(self._select_view, scores, quotas)
        return self._select_view(scores, budget, total)

    @property
    def _view_alpha(self) -> float:
        """The weight of the instruction's attention in the camera split: PTP's own α, else PTP's default."""
        config = self.selector.options.get("config")
        return config.alpha if isinstance(config, PTPConfig) else PTPConfig().alpha

    def _select_view(self, scores: TokenScores, budget: int, total: int | None = None) -> Selection:
        """``select`` over one view's tokens."""
        total = scores.num_tokens if total is None else total
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


def budget_request(keep_ratio: float | None, tokens: int | None) -> tuple[float | None, int | None]:
    """A request's budget checked at the edge, before any model runs: a keep ratio in ``KEEP_RATIO_RANGE`` or a
    token count >= 1 (keep-all when neither is given); the token count wins when both are."""
    if keep_ratio is None and tokens is None:
        return 1.0, None
    try:
        return (None, check_tokens(tokens)) if tokens is not None else (check_keep_ratio(keep_ratio), None)
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(str(exc)) from exc


class _FirstTokenWatch:
    """The request's cancel event as the adapter's ``generate`` reads it, calling ``first_token`` at the first read:
    ``generate`` reads it once after every generated token (``vlm/generation.py``'s stopping criterion), so that read
    is the end of the prefill.  Waiting and setting are the event's own.  (A first-token hook on the adapters'
    ``generate`` would say so directly.)"""

    def __init__(self, cancel: threading.Event | None, first_token: Callable[[], None]):
        self._cancel = cancel if cancel is not None else threading.Event()
        self._first_token: Callable[[], None] | None = first_token

    def is_set(self) -> bool:
        if self._cancel.is_set():  # a cancelled request announces no further stage
            return True
        if self._first_token is not None:
            first, self._first_token = self._first_token, None
            first()
        return False

    def set(self) -> None:
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._cancel.wait(timeout)


def _silent(stage: str) -> None:
    """No one listens for stages."""


def _check(cancel: threading.Event | None, where: str) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"cancelled {where}")
