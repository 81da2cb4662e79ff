"""Qwen3-VL (dynamic resolution, no tiles, no [CLS], DeepStack) over the stock transformers classes.

Token order: Qwen2.5-VL's, with 16-px patches and no attention windows.  The processor resizes the image
(``smart_resize``) to a multiple of 32 px and cuts it into 16-px patches, grouped by 2×2 merge block in
raster order of the (h/2)×(w/2) merged grid; the tower keeps that order, and each LLM token merges one block.
Regions: Qwen2.5-VL's fixed ``region_grid`` of cells over the merged grid; no global view.
Token saliency: attention *received* in one ViT block (every block attends over the whole image; "paper"
is the paper's layer scaled to the depth), summed over each token's 2×2 patches.
DeepStack: the tower also hands the LLM one feature set per ``deepstack_visual_indexes`` block, each added
to the hidden states at the visual positions after LLM layer i (i = 0, 1, ...).  ``encode`` keeps them per
token (``extras["deepstack"]``), and every path that drops tokens drops their DeepStack rows with them:
the pruned ``generate`` (the encoder output it hands the model), the relevance probe, and pruning inside
the LLM (layers from K on add them at the kept positions only).
Positions: interleaved 3-D M-RoPE; kept tokens keep their original (t, h, w) positions (Qwen2.5-VL's path).
Baseline any pruning must beat: fewer pixels (``max_pixels``), as for Qwen2.5-VL with 32-px tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

from .base import VisualTokens
from .families import register_adapter
from .qwen2_5_vl import Qwen2_5_VLAdapter, Qwen2_5_VLOptions


@dataclass(frozen=True)
class Qwen3VLOptions(Qwen2_5_VLOptions):
    """Qwen2.5-VL's knobs; every block of the tower attends over the whole image, so any is a vision layer."""

    token_px: ClassVar[int] = 32  # the side of one merged token: 16-px patches, 2×2 merge


@register_adapter
class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    name = "qwen3_vl"
    model_class = Qwen3VLForConditionalGeneration
    options_class = Qwen3VLOptions
    processor_needing_shim = Qwen3VLProcessor

    @staticmethod
    def full_attention_blocks(visual) -> list[int]:
        return list(range(len(visual.blocks)))

    def token_saliency(self, received: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Per-patch received attention, already in merge-block raster order → per-token sums."""
        return received.view(-1, self.model.model.visual.spatial_merge_unit).sum(dim=1)

    per_token_extras = ("deepstack",)

    def feature_extras(self, encoded, view: int) -> dict:
        """Image ``view``'s DeepStack features, one [N, D] per level, in the tokens' order."""
        return {"deepstack": [level[view] for level in encoded.deepstack_features]}

    @staticmethod
    def _deepstack(visual: VisualTokens, kept: torch.Tensor | None) -> list[torch.Tensor]:
        levels = visual.extras["deepstack"]
        return levels if kept is None else [level[kept.to(level.device)] for level in levels]

    def encoder_output(
        self, features: torch.Tensor, visual: VisualTokens, kept: torch.Tensor | None
    ) -> BaseModelOutputWithDeepstackFeatures:
        return BaseModelOutputWithDeepstackFeatures(
            pooler_output=(features,), deepstack_features=[(level,) for level in self._deepstack(visual, kept)]
        )

    def llm_visual_inputs(self, input_ids: torch.Tensor, visual: VisualTokens, kept: torch.Tensor | None) -> dict:
        return {
            "visual_pos_masks": input_ids == self.image_token_id,
            "deepstack_visual_embeds": self._deepstack(visual, kept),
        }

    def after_llm_layer(self, index: int, hidden: torch.Tensor, visual_inputs: dict) -> torch.Tensor:
        """DeepStack level ``index`` added at the visual positions, by the decoder's own ``_deepstack_process``."""
        levels = visual_inputs["deepstack_visual_embeds"]
        if index >= len(levels):
            return hidden
        return self.model.model.language_model._deepstack_process(
            hidden, visual_inputs["visual_pos_masks"], levels[index]
        )

    def inside_llm_pruning(self, state: dict):
        return deepstack_at_kept_positions(self.model.model.language_model, state)


@contextmanager
def deepstack_at_kept_positions(language_model, state: dict) -> Iterator[None]:
    """While ``pruned_inside`` prunes ``language_model``: a DeepStack addition after a layer that runs on the
    kept positions only (``state["positions"]``, from the prune layer on) adds the kept tokens' rows
    (``state["kept"]``) there; before the prune layer, the stock addition over every visual position."""
    stock = language_model._deepstack_process

    def add(hidden_states: torch.Tensor, visual_pos_masks: torch.Tensor, visual_embeds: torch.Tensor):
        if hidden_states.shape[1] != visual_pos_masks.shape[1]:
            positions = state["positions"].to(visual_pos_masks.device)
            visual_pos_masks = visual_pos_masks[:, positions]
            visual_embeds = visual_embeds[state["kept"].to(visual_embeds.device)]
        return stock(hidden_states, visual_pos_masks, visual_embeds)

    language_model._deepstack_process = add
    try:
        yield
    finally:
        del language_model._deepstack_process
