"""What every model adapter hands to the pipeline, and the interface it implements.

An adapter wraps one stock transformers model family.  It knows the model's internals (where the
[CLS] attention is, how tiles map to tokens, how to feed pruned features to ``generate``) and nothing
of ROS or of how tokens are chosen.

This module itself needs no transformers (the hooks into ``generate`` are in ``generation.py``), so that
code which only reads an adapter's results imports torch and the pruning types, nothing more.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from ..pruning import TokenScores


@dataclass
class PreparedInput:
    """One image + instruction after the model's processor: the adapter's own tensors, opaque outside."""

    inputs: Any  # the processor's BatchFeature, on the model's device
    image_size: tuple[int, int]  # (height, width) of the original image
    instruction: str


@dataclass
class VisualTokens:
    """The projected visual tokens of one image, in the order the LLM reads them, and what they show.

    ``token_boxes[i]`` is the image area token i looks at, (x0, y0, x1, y1) in pixels of the original
    image (NaN for structural tokens such as row newlines); ``region_boxes`` likewise per region.
    ``grid_shape[r]`` is the (rows, cols) token grid of region r, for drawing.
    """

    features: torch.Tensor  # [N, D]
    scores: TokenScores  # region, bottom-up saliency, region saliency (relevance added later)
    token_boxes: torch.Tensor  # [N, 4] float
    region_boxes: torch.Tensor  # [R, 4] float
    region_names: list[str]
    image_size: tuple[int, int]
    extras: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.features.shape[0])


@dataclass
class Generation:
    text: str
    token_ids: list[int]  # the generated ids, prompt excluded
    prompt_tokens: int
    new_tokens: int
    prefill_ms: float
    decode_ms: float
    in_llm_kept: torch.Tensor | None = None  # the visual indices kept inside the LLM (in-LLM pruning only)


class Cancelled(RuntimeError):
    """The caller set its cancel event: the request stopped between stages or between two generated tokens."""


class VisionLanguageAdapter(Protocol):
    """Encode → score → (select outside) → generate, for one model family.

    What a family can do beyond that is declared, not probed: ``supports_downscaling`` (``downscaled``
    works: its processor reads any resolution) and ``region_scores`` (the ``region_score`` options it
    offers; empty when its options have none).
    """

    name: str  # the config.json ``model_type`` it loads: its key in ``families.ADAPTERS``
    supports_downscaling: bool
    region_scores: tuple[str, ...]
    device: torch.device
    dtype: torch.dtype
    options: Any  # the family's frozen options dataclass

    def prepare(self, image: np.ndarray, instruction: str) -> PreparedInput: ...

    def encode(self, prepared: PreparedInput) -> VisualTokens: ...

    def instruction_attention(
        self, prepared: PreparedInput, visual: VisualTokens, kept: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[instruction tokens, N] head-averaged text→visual attention at the configured LLM layer (over a
        prompt holding only the ``kept`` visual tokens, → [instruction tokens, len(kept)], when given)."""
        ...

    def generate(
        self,
        prepared: PreparedInput,
        visual: VisualTokens,
        kept: torch.Tensor | None,
        max_new_tokens: int,
        cancel: threading.Event | None = None,
        in_llm: tuple[Any, Any] | None = None,
    ) -> Generation:
        """Greedy answer from the ``kept`` visual tokens (all when None); ``Cancelled`` once ``cancel`` is set.
        ``in_llm`` = (``InLLMPruning``, chooser): prune inside the LLM instead (see vlm/in_llm.py)."""
        ...

    def generate_reference(self, prepared: PreparedInput, max_new_tokens: int) -> Generation:
        """Stock ``generate(**inputs)``, no pruning: the baseline the pruned path must match at keep-all."""
        ...

    def downscaled(self, tokens: int, image_size: tuple[int, int] | None = None) -> VisionLanguageAdapter:
        """The same model reading the image at a resolution of at most ``tokens`` visual tokens (fitted to
        ``image_size`` when given): the baseline pruning must beat.  Only where ``supports_downscaling``."""
        ...
