"""What every model adapter hands to the pipeline, and the interface it implements.

An adapter wraps one stock transformers model family.  It knows the model's internals (where the
[CLS] attention is, how tiles map to tokens, how to feed pruned features to ``generate``) and nothing
of ROS or of how tokens are chosen.

This module itself needs no transformers (the hooks into ``generate`` are in ``generation.py``), so that
code which only reads an adapter's results imports torch and the pruning types, nothing more.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from ..pruning import TokenScores, concat_views, view_parts


@dataclass
class PreparedInput:
    """One prompt — one or several images (camera views, in prompt order) + instruction — after the model's
    processor: the adapter's own tensors, opaque outside."""

    inputs: Any  # the processor's BatchFeature, on the model's device
    image_sizes: tuple[tuple[int, int], ...]  # (height, width) of every original image
    instruction: str

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the one image of a single-view prompt."""
        if len(self.image_sizes) != 1:
            raise ValueError(f"the prompt holds {len(self.image_sizes)} images, not one")
        return self.image_sizes[0]


@dataclass
class VisualTokens:
    """The projected visual tokens of one image, in the order the LLM reads them, and what they show.

    ``token_boxes[i]`` is the image area token i looks at, (x0, y0, x1, y1) in pixels of the original
    image (NaN for structural tokens such as row newlines); ``region_boxes`` likewise per region.
    ``grid_shape[r]`` is the (rows, cols) token grid of region r, for drawing.

    Several views in one prompt: the fields run over all of them, view after view (each token's box in its own
    view's pixels, ``image_size`` the first view's, ``scores`` from ``concat_views``), and ``views`` holds each
    view's own ``VisualTokens`` (``view(i)``); a single view has none.
    """

    features: torch.Tensor  # [N, D]
    scores: TokenScores  # region, bottom-up saliency, region saliency (relevance added later)
    token_boxes: torch.Tensor  # [N, 4] float
    region_boxes: torch.Tensor  # [R, 4] float
    region_names: list[str]
    image_size: tuple[int, int]
    extras: dict = field(default_factory=dict)
    views: tuple[VisualTokens, ...] = ()

    @property
    def num_tokens(self) -> int:
        return int(self.features.shape[0])

    @property
    def num_views(self) -> int:
        return max(1, len(self.views))

    def view(self, index: int) -> VisualTokens:
        """View ``index``'s own tokens, with the scores (relevance, features) these tokens hold now."""
        if not self.views:
            if index != 0:
                raise IndexError(f"view {index} of a single view")
            return self
        return dataclasses.replace(self.views[index], scores=view_parts(self.scores)[index])


def join_views(views: Sequence[VisualTokens], per_token_extras: Sequence[str] = ()) -> VisualTokens:
    """Several views' tokens as one ``VisualTokens`` in prompt order (``views`` keeps each; the ``per_token_extras``,
    lists of per-token [N, D] tensors, joined item by item); one view as it is."""
    if len(views) == 1:
        return views[0]
    extras = {k: v for k, v in views[0].extras.items() if k == "vision_layer"}
    for key in per_token_extras:
        extras[key] = [torch.cat(items) for items in zip(*(v.extras[key] for v in views))]
    return VisualTokens(
        features=torch.cat([v.features for v in views]),
        scores=concat_views([v.scores for v in views]),
        token_boxes=torch.cat([v.token_boxes for v in views]),
        region_boxes=torch.cat([v.region_boxes for v in views]),
        region_names=[name for v in views for name in v.region_names],
        image_size=views[0].image_size,
        extras=extras,
        views=tuple(views),
    )


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
    works: its processor reads any resolution), ``supports_views`` (several images in one prompt) and
    ``region_scores`` (the ``region_score`` options it offers; empty when its options have none).
    """

    name: str  # the config.json ``model_type`` it loads: its key in ``families.ADAPTERS``
    supports_downscaling: bool
    supports_views: bool
    region_scores: tuple[str, ...]
    device: torch.device
    dtype: torch.dtype
    options: Any  # the family's frozen options dataclass

    def prepare(self, image: np.ndarray | Sequence[np.ndarray], instruction: str) -> PreparedInput:
        """One RGB image, or several (camera views, one prompt with an image each, in order) where the family
        ``supports_views``."""
        ...

    def encode(self, prepared: PreparedInput) -> VisualTokens: ...

    def instruction_attention(
        self,
        prepared: PreparedInput,
        visual: VisualTokens,
        kept: torch.Tensor | None = None,
        layers: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """[instruction tokens, N] head-averaged text→visual attention at the configured LLM layer (over a
        prompt holding only the ``kept`` visual tokens, → [instruction tokens, len(kept)], when given); with
        ``layers``, stacked [len(layers), ...] at each of them, from one forward (a layer-by-layer probe)."""
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
