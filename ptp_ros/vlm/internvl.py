"""InternVL (InternViT + pixel shuffle + Qwen2/InternLM LLM) over the stock transformers classes.

Token order, as ``InternVLModel.get_image_features`` builds it:
  [tile 0: 16×16 tokens] … [tile T-1] [thumbnail: 16×16 tokens]   (tiles row-major over the canvas)
Each LLM token is one 2×2 group of 14-px InternViT patches (``pixel_shuffle`` with ratio 0.5), so a 448-px
tile gives 32×32 patches → 256 tokens.  The thumbnail (the whole image squashed to 448 px) exists only when
the image was cut into more than one tile.
Regions: 0..T-1 = the tiles, T = the thumbnail (the global view).
Token saliency: the [CLS]→patch attention of the chosen InternViT layer, read from its ``q_norm``/``k_norm``
outputs (qk-norm follows the projections), summed over each token's 2×2 patch group; the grouping is
obtained by running the model's own ``pixel_shuffle`` on patch coordinates, so it is exactly the model's.
Pruned path: ``get_image_features`` (with the probe) → select → drop the pruned ``<IMG_CONTEXT>`` ids →
stock ``generate(mm_encoder_outputs=...)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import InternVLForConditionalGeneration, InternVLProcessor
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

from .attention import ClsAttentionProbe
from .base import PreparedInput, VisualTokens, join_views
from .encode_cache import ViewReuse
from .families import register_adapter
from .stock_adapter import TiledClsAdapter, TiledModelOptions, grid_names, prepare_image_prompt

InternVLOptions = TiledModelOptions


@register_adapter
class InternVLAdapter(TiledClsAdapter):
    name = "internvl"
    model_class = InternVLForConditionalGeneration
    processor_needing_shim = InternVLProcessor

    def __init__(
        self, model: InternVLForConditionalGeneration, processor, options: InternVLOptions = InternVLOptions()
    ):
        vision = model.config.vision_config
        super().__init__(
            model,
            processor,
            options,
            vision_layers=model.model.vision_tower.encoder.layer,
            attention="attention",
            tile_px=vision.image_size[0],
            patch_px=vision.patch_size[0],
        )

    # -- 0. inputs ---------------------------------------------------------------------------------
    def prepare(self, image: np.ndarray | Sequence[np.ndarray], instruction: str) -> PreparedInput:
        """RGB uint8 [H, W, 3] image(s) + instruction → the processor's tensors on the model's device."""
        image_text = self.processor.image_token + "\n"
        return prepare_image_prompt(
            self.processor, image, instruction, image_text, "{images}{instruction}", self.device, self.dtype
        )

    # -- 1. encode, with bottom-up saliency --------------------------------------------------------
    @torch.no_grad()
    def encode(self, prepared: PreparedInput, views: ViewReuse | None = None) -> VisualTokens:
        """Every image's tiles through the tower in one batch, then each image's tokens laid out on its own.
        ``views``: which tiles to run through the tower, the rest reused (vlm/encode_cache.py); all by default."""
        views = views or ViewReuse()
        with (
            ClsAttentionProbe(self._vision_attention, query="q_norm", key="k_norm") as probe,
            self.reusing(views),
        ):
            out = self.model.model.get_image_features(pixel_values=prepared.inputs["pixel_values"], return_dict=True)
        cls_attention = views.rows("cls_attention", probe.cls_attention().cpu())  # [tiles of every image, 1024]
        cls_states = views.rows("cls_states", probe.cls_query_states().cpu())
        grids = [self.tile_grid(size) for size in prepared.image_sizes]
        counts = [rows * cols + int(rows * cols > 1) for rows, cols in grids]
        if cls_attention.shape[0] != sum(counts):
            raise RuntimeError(f"{cls_attention.shape[0]} tiles encoded, the views' canvases imply {sum(counts)}")
        starts = [sum(counts[:i]) for i in range(len(counts))]
        return join_views(
            [
                self._view_tokens(
                    out.pooler_output[start : start + n].reshape(-1, out.pooler_output.shape[-1]),
                    cls_attention[start : start + n],
                    cls_states[start : start + n],
                    grid,
                    size,
                )
                for start, n, grid, size in zip(starts, counts, grids, prepared.image_sizes)
            ]
        )

    def _view_tokens(
        self,
        features: torch.Tensor,
        cls_attention: torch.Tensor,
        cls_states: torch.Tensor,
        grid: tuple[int, int],
        size: tuple[int, int],
    ) -> VisualTokens:
        """One view's ``VisualTokens`` from its features [tiles·256, D] and its tiles' [CLS] rows (the thumbnail
        last, when the view was cut into more than one tile)."""
        rows, cols = grid
        num_grid = rows * cols
        has_thumbnail = cls_attention.shape[0] == num_grid + 1
        saliency, token_rc = self.pooled_patch_scores(cls_attention)  # [tiles, 256], [tiles, 256, 2]
        region = torch.arange(cls_attention.shape[0]).repeat_interleave(saliency.shape[1])
        token_boxes, region_boxes = self._boxes(token_rc, (rows, cols), size)
        if has_thumbnail:
            tiles, glob = self.tile_logits(
                cls_attention, cls_states, region_boxes[:num_grid], size, slice(0, num_grid), num_grid
            )
            logits = torch.cat([tiles, glob.reshape(1)])
        else:
            logits = torch.zeros(1)
        names = grid_names("tile", rows, cols) + (["thumbnail"] if has_thumbnail else [])
        return self.visual_tokens(
            size,
            features,
            region=region,
            saliency=saliency.reshape(-1),
            region_saliency=logits,
            global_region=num_grid if has_thumbnail else None,
            token_boxes=token_boxes,
            region_boxes=region_boxes,
            region_names=names,
            grid=(rows, cols),
        )

    def tile_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of the processor's tile canvas for an image of (height, width)."""
        ip = self.processor.image_processor
        cols, rows = get_optimal_tiled_canvas(
            tuple(image_size), (self._tile_px, self._tile_px), ip.min_patches, ip.max_patches
        )
        return int(rows), int(cols)

    def pooled_patch_scores(self, patch_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch scores [tiles, side²] → (per-token sums [tiles, tokens], per-token (row, col) in the token
        grid [tiles, tokens, 2]), grouped by the model's own ``pixel_shuffle``."""
        tiles = patch_scores.shape[0]
        side = self._patches_per_side
        rows, cols = self.patch_grid()
        channels = torch.stack(
            [patch_scores.float(), rows[None].expand(tiles, -1), cols[None].expand(tiles, -1)], dim=-1
        ).view(tiles, side, side, 3)
        shuffled = self.model.model.pixel_shuffle(channels, scale_factor=self.model.config.downsample_ratio)
        groups = shuffled.reshape(tiles, -1, shuffled.shape[-1] // 3, 3)  # [tiles, tokens, patches per token, 3]
        group_side = round(groups.shape[2] ** 0.5)
        token_rc = torch.stack([groups[..., 1].amin(-1), groups[..., 2].amin(-1)], dim=-1) / group_side
        return groups[..., 0].sum(-1), token_rc

    def _boxes(
        self, token_rc: torch.Tensor, grid: tuple[int, int], image_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel boxes of every token and region in the original image: the tiles cut the image resized
        (aspect not kept) to the rows×cols canvas; a region past the grid is the thumbnail, the whole image."""
        height, width = image_size
        rows, cols = grid
        tokens_per_side = self._patches_per_side * self.model.config.downsample_ratio
        tile = torch.arange(token_rc.shape[0])[:, None].expand(token_rc.shape[:2])
        tile_w = torch.where(tile < rows * cols, width / cols, float(width))  # region width in image pixels
        tile_h = torch.where(tile < rows * cols, height / rows, float(height))
        x0 = torch.where(tile < rows * cols, (tile % cols) * width / cols, 0.0)
        y0 = torch.where(tile < rows * cols, (tile // cols) * height / rows, 0.0)
        tx = x0 + token_rc[..., 1] * tile_w / tokens_per_side
        ty = y0 + token_rc[..., 0] * tile_h / tokens_per_side
        token_boxes = torch.stack([tx, ty, tx + tile_w / tokens_per_side, ty + tile_h / tokens_per_side], dim=-1)
        region_boxes = torch.stack([x0[:, 0], y0[:, 0], x0[:, 0] + tile_w[:, 0], y0[:, 0] + tile_h[:, 0]], dim=-1)
        return token_boxes.reshape(-1, 4).float(), region_boxes.float()

    def pooler_output(self, features: torch.Tensor) -> torch.Tensor:
        return features[None]  # the scatter checks only numel: [1, K, D] stands for the tiles
