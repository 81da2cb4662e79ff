"""Qwen2.5-VL (dynamic resolution, no tiles, no [CLS]) over the stock transformers classes.

Token order: the image is resized (``smart_resize``) to a multiple of 28 px and cut into 14-px patches;
each LLM token merges a 2×2 patch block, and ``get_image_features`` returns the tokens in raster order over
the (h/2)×(w/2) merged grid.  There is no global view and no tile.
Regions (ours, not the paper's): a fixed ``region_grid`` of rows×cols cells over that token grid, so that
PTP's region level has something to share the budget between; no region is a global view.
Token saliency: attention *received* in one full-attention ViT block (window blocks only see 112-px
windows), from ``ReceivedAttentionProbe``, summed over each token's 2×2 patches and put back from the
tower's window order into raster order with the model's own ``get_vision_window_index``.
Region saliency: log of the region's share of that attention.
Pruned path: drop pruned ``<|image_pad|>`` ids and hand ``generate`` the *original* 3-D M-RoPE positions
of the kept tokens (``get_rope_index``), with the model's cached ``rope_deltas`` cleared.
Baseline any pruning must beat: fewer pixels (``max_pixels``, see ``max_pixels_for_tokens``).
Encode reuse (vlm/encode_cache.py): whole frames only — window attention mixes each window and the full-attention
blocks the whole image, so no part of it encodes alone (``independent_views`` stays False).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
from transformers.vision_utils import get_vision_window_index

from ..pruning.region_saliency import mass_logits
from .attention import ReceivedAttentionProbe
from .base import PreparedInput, VisualTokens, join_views
from .families import register_adapter
from .stock_adapter import StockModelAdapter, grid_names, paper_vision_layer, prepare_image_prompt, raster_grid

_IMAGE_PROMPT = "<|vision_start|><|image_pad|><|vision_end|>"  # one image's part of a prompt without a chat template


#: The most visual tokens a resolution option may ask for: the published checkpoints' own cap (Qwen2.5-VL's
#: max_pixels 16384·28², Qwen3-VL's 16384·32²).
MAX_RESOLUTION_TOKENS = 16384


def max_pixels_for_tokens(tokens: int, patch_size: int = 14, merge_size: int = 2) -> int:
    """The ``max_pixels`` at which Qwen2.5-VL's processor yields at most ``tokens`` visual tokens: the
    plain down-scaling baseline at the same token count as a pruned run."""
    return int(tokens) * (patch_size * merge_size) ** 2


def fitted_max_pixels(
    tokens: int, image_size: tuple[int, int], min_pixels: int, patch_size: int = 14, merge_size: int = 2
) -> int:
    """The largest ``max_pixels`` at which an image of ``image_size`` (height, width) still yields at
    most ``tokens`` tokens.  ``max_pixels_for_tokens`` alone can give up to ~20 % fewer, because
    ``smart_resize`` floors each side to a multiple of 28 px: a baseline with fewer tokens than the
    pruned run it is compared with would lose accuracy for that reason alone."""
    factor = patch_size * merge_size
    tokens = min(int(tokens), MAX_RESOLUTION_TOKENS)

    def count(max_pixels: int) -> int:
        h, w = smart_resize(*image_size, factor=factor, min_pixels=min(min_pixels, max_pixels), max_pixels=max_pixels)
        return (h // factor) * (w // factor)

    lo, hi = (
        max_pixels_for_tokens(tokens, patch_size, merge_size),
        max_pixels_for_tokens(min(4 * tokens, MAX_RESOLUTION_TOKENS), patch_size, merge_size),
    )
    if count(hi) <= tokens:
        return hi
    while hi - lo > 1:  # count(lo) <= tokens < count(hi); the count grows with max_pixels
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) <= tokens else (lo, mid)
    return lo


def resolution_kwargs(image_processor, max_pixels: int | None, min_pixels: int | None = None) -> dict:
    """Processor kwargs that read an image at between ``min_pixels`` and ``max_pixels`` pixels (either left
    at the checkpoint's own when ``None``; the other bound follows one that passes it)."""
    size = image_processor.size
    longest = size["longest_edge"] if max_pixels is None else max_pixels
    shortest = size["shortest_edge"] if min_pixels is None else min_pixels
    if max_pixels is None:
        longest = max(longest, shortest)
    return {"size": {"shortest_edge": min(shortest, longest), "longest_edge": longest}}


@dataclass(frozen=True)
class Qwen2_5_VLOptions:
    token_px: ClassVar[int] = 28  # the side of one merged token: 14-px patches, 2×2 merge

    # "paper" (the full-attention block nearest the paper's layer), "last" or its alias "feature" (the last
    # full-attention block: the nearest to the output the LLM reads), or an index
    vision_layer: int | str = "paper"
    llm_layer: int = 2  # LLM layer whose text→visual attention gives instruction relevance
    region_grid: tuple[int, int] = (2, 2)  # rows, cols of the fixed region grid over the token grid
    max_pixels: int | None = None  # processor resolution cap (None: the checkpoint's); the down-scaling baseline
    min_pixels: int | None = None  # processor resolution floor (None: the checkpoint's)

    def __post_init__(self) -> None:
        self._check_resolution()
        if isinstance(self.vision_layer, str) and self.vision_layer not in ("paper", "last", "feature"):
            raise ValueError(f"vision_layer must be 'paper', 'last', 'feature' or an index, got {self.vision_layer!r}")
        if len(self.region_grid) != 2 or min(self.region_grid) < 1:
            raise ValueError(f"region_grid must be (rows >= 1, cols >= 1), got {self.region_grid!r}")
        object.__setattr__(self, "region_grid", tuple(int(v) for v in self.region_grid))

    def _check_resolution(self) -> None:
        """Each bound from one visual token (token_px² pixels) to the published checkpoints' cap, min ≤ max."""
        low, high = self.token_px**2, MAX_RESOLUTION_TOKENS * self.token_px**2
        for name in ("max_pixels", "min_pixels"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(
                    f"{name} must be an integer from {low} (one {self.token_px}x{self.token_px}-px visual token) "
                    f"to {high} ({MAX_RESOLUTION_TOKENS} tokens, the published checkpoints' cap), got {value!r}"
                )
        if self.max_pixels is not None and self.min_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels {self.min_pixels} is above max_pixels {self.max_pixels}")


@register_adapter
class Qwen2_5_VLAdapter(StockModelAdapter):
    name = "qwen2_5_vl"
    model_class = Qwen2_5_VLForConditionalGeneration
    options_class = Qwen2_5_VLOptions
    processor_needing_shim = Qwen2_5_VLProcessor
    supports_downscaling = True

    def __init__(
        self, model: Qwen2_5_VLForConditionalGeneration, processor, options: Qwen2_5_VLOptions = Qwen2_5_VLOptions()
    ):
        super().__init__(model, processor, options)
        visual = model.model.visual
        self.vision_layer = self._full_attention_block(
            options.vision_layer, len(visual.blocks), self.full_attention_blocks(visual)
        )
        self._vision_attention = visual.blocks[self.vision_layer].attn

    @staticmethod
    def full_attention_blocks(visual) -> list[int]:
        """The tower's blocks that attend over the whole image (the others see 112-px windows only)."""
        return list(visual.fullatt_block_indexes)

    @staticmethod
    def _full_attention_block(choice: int | str, depth: int, full_blocks: list[int]) -> int:
        if not full_blocks:
            raise ValueError("the vision tower has no full-attention block to read saliency from")
        if choice in ("last", "feature"):
            return full_blocks[-1]
        if choice == "paper":
            target = paper_vision_layer(depth)
            return min(full_blocks, key=lambda b: (abs(b - target), -b))
        index = int(choice) % depth if -depth <= int(choice) < depth else None
        if index not in full_blocks:
            raise ValueError(f"vision_layer {choice} is not a full-attention block (those are {full_blocks})")
        return index

    def downscaled(self, tokens: int, image_size: tuple[int, int] | None = None) -> Qwen2_5_VLAdapter:
        """The same model reading the image at a resolution of at most ``tokens`` visual tokens: the
        plain down-scaling baseline that pruning to ``tokens`` must beat (shares weights and processor).
        With ``image_size`` the resolution is fitted to that image (the most tokens up to ``tokens``)."""
        patch = self.model.model.visual.patch_size
        max_pixels = (
            max_pixels_for_tokens(tokens, patch)
            if image_size is None
            else fitted_max_pixels(tokens, image_size, self.processor.image_processor.size["shortest_edge"], patch)
        )
        options = dataclasses.replace(self.options, max_pixels=max_pixels, min_pixels=None)
        return type(self)(self.model, self.processor, options)

    # -- 0. inputs ---------------------------------------------------------------------------------
    def prepare(self, image: np.ndarray | Sequence[np.ndarray], instruction: str) -> PreparedInput:
        options = self.options
        kwargs = (
            {}
            if options.max_pixels is None and options.min_pixels is None
            else resolution_kwargs(self.processor.image_processor, options.max_pixels, options.min_pixels)
        )
        return prepare_image_prompt(
            self.processor,
            image,
            instruction,
            _IMAGE_PROMPT,
            "{images}{instruction}",
            self.device,
            self.dtype,
            **kwargs,
        )

    # -- 1. encode, with bottom-up saliency --------------------------------------------------------
    @torch.no_grad()
    def encode(self, prepared: PreparedInput) -> VisualTokens:
        """Every view through the tower in one packed sequence (full attention stays inside each view), then each
        view's tokens laid out on its own."""
        grid_thw = prepared.inputs["image_grid_thw"]
        with ReceivedAttentionProbe(self._vision_attention) as probe:
            out = self.model.model.get_image_features(
                pixel_values=prepared.inputs["pixel_values"], image_grid_thw=grid_thw, return_dict=True
            )
        saliency = self.token_saliency(probe.received().cpu(), grid_thw.cpu())  # every view's, raster order each
        per_view = saliency.split([int(f.shape[0]) for f in out.pooler_output])
        views = [
            self._view_tokens(features, view_saliency, grid_thw[i : i + 1], size, self.feature_extras(out, i))
            for i, (features, view_saliency, size) in enumerate(zip(out.pooler_output, per_view, prepared.image_sizes))
        ]
        return join_views(views, self.per_token_extras)

    def _view_tokens(
        self,
        features: torch.Tensor,
        saliency: torch.Tensor,
        grid_thw: torch.Tensor,
        size: tuple[int, int],
        extras: dict,
    ) -> VisualTokens:
        """One view's ``VisualTokens`` from its features [N, D] and token saliency [N], both in raster order, and
        its ``feature_extras``."""
        rows, cols = self.token_grid(grid_thw)
        region, names, region_rc = self._regions(rows, cols)
        token_boxes = self._token_boxes(rows, cols, size)
        region_boxes = torch.stack(
            [
                torch.cat([token_boxes[region == r, :2].amin(0), token_boxes[region == r, 2:].amax(0)])
                for r in range(len(names))
            ]
        )
        mass = torch.zeros(len(names), dtype=torch.float64).index_add_(0, region, saliency.double())
        return self.visual_tokens(
            size,
            features,
            region=region,
            saliency=saliency,
            region_saliency=mass_logits(mass),
            global_region=None,
            token_boxes=token_boxes,
            region_boxes=region_boxes,
            region_names=names,
            grid=region_rc,
            token_grid=(rows, cols),
            **extras,
        )

    def feature_extras(self, encoded, view: int) -> dict:
        """What else of the tower's output (``get_image_features``) ``generate`` needs, per token of image ``view``,
        in ``extras`` (those named in ``per_token_extras``: lists of [N, D] tensors, joined across views)."""
        return {}

    def token_grid(self, grid_thw: torch.Tensor) -> tuple[int, int]:
        """(rows, cols) of the merged token grid of the one image in ``grid_thw`` [1, 3]."""
        merge = self.model.model.visual.spatial_merge_size
        t, h, w = (int(v) for v in grid_thw[0])
        if t != 1:
            raise ValueError(f"one still image expected, got {t} temporal patches")
        return h // merge, w // merge

    def token_saliency(self, received: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Per-patch received attention in the tower's window order → per-token sums in raster order."""
        visual = self.model.model.visual
        window_index, _ = get_vision_window_index(
            grid_thw, visual.spatial_merge_size, visual.window_size, visual.patch_size
        )
        per_window_token = received.view(-1, visual.spatial_merge_unit).sum(dim=1)
        return per_window_token[torch.argsort(window_index)]

    def _regions(self, rows: int, cols: int) -> tuple[torch.Tensor, list[str], tuple[int, int]]:
        """Region of every token for the fixed grid (capped at the token grid, so none is empty)."""
        grid_r, grid_c = min(self.options.region_grid[0], rows), min(self.options.region_grid[1], cols)
        r, c = raster_grid(rows, cols)
        region = (r * grid_r // rows) * grid_c + c * grid_c // cols
        return region, grid_names("cell", grid_r, grid_c), (grid_r, grid_c)

    @staticmethod
    def _token_boxes(rows: int, cols: int, image_size: tuple[int, int]) -> torch.Tensor:
        """The processor resizes the whole image to the patch canvas, so token (r, c) covers the same
        fraction of the original image."""
        height, width = image_size
        r, c = (v.float() for v in raster_grid(rows, cols))
        return torch.stack([c * width / cols, r * height / rows, (c + 1) * width / cols, (r + 1) * height / rows], -1)

    # -- 2. top-down relevance -----------------------------------------------------------------------
    def rope_positions(self, prepared: PreparedInput) -> torch.Tensor:
        """The model's own 3-D M-RoPE positions of the full prompt, [3, 1, L]."""
        inputs = prepared.inputs
        positions, _ = self.model.model.get_rope_index(
            inputs["input_ids"],
            inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"],
        )
        return positions

    # -- 3. pruned generation (StockModelAdapter.generate, always through explicit positions) -------------
    def generation_positions(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[4, 1, L']: a text row 0..L'-1 (for the causal mask only) over the kept tokens' original M-RoPE rows."""
        text_positions = torch.arange(input_ids.shape[1], device=input_ids.device).view(1, 1, -1)
        return torch.cat([text_positions, positions], dim=0)

    def reset_generation_state(self) -> None:
        self.model.model.rope_deltas = None  # stale deltas of an earlier prompt would shift decoding

    def pooler_output(self, features: torch.Tensor) -> tuple[torch.Tensor]:
        return (features,)
