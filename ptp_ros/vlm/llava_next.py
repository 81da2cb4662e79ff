"""LLaVA-NeXT (anyres) over the stock transformers classes.

Token order, as ``LlavaNextModel.pack_image_features`` builds it:
  [global view: 24×24 patches, row-major] + [unpadded tile grid, row-major, a newline token after each row]
Regions: 0 = the global view, 1..T = the anyres tiles in the processor's row-major order.
Pruned path: ``get_image_features`` (with a [CLS] probe) → select → drop the pruned ``<image>``
placeholders from ``input_ids`` → stock ``generate(mm_encoder_outputs=...)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import LlavaNextForConditionalGeneration
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

from ..pruning import NO_REGION
from .attention import ClsAttentionProbe
from .base import PreparedInput, VisualTokens, join_views
from .encode_cache import ViewReuse
from .families import register_adapter
from .stock_adapter import TILE_REGION_SCORES as REGION_SCORES  # noqa: F401  (kept importable from here)
from .stock_adapter import (
    TiledClsAdapter,
    TiledModelOptions,
    grid_names,
    paper_vision_layer,  # noqa: F401  (kept importable from here)
    prepare_image_prompt,
)

_FALLBACK_PROMPT = "USER: {images}{instruction} ASSISTANT:"

#: PTP's knobs for LLaVA-NeXT: those of every tiled model with [CLS] tokens.
LlavaNextOptions = TiledModelOptions


@register_adapter
class LlavaNextAdapter(TiledClsAdapter):
    name = "llava_next"
    model_class = LlavaNextForConditionalGeneration

    def __init__(
        self, model: LlavaNextForConditionalGeneration, processor, options: LlavaNextOptions = LlavaNextOptions()
    ):
        vision = model.config.vision_config
        super().__init__(
            model,
            processor,
            options,
            vision_layers=model.model.vision_tower.encoder.layers,
            attention="self_attn",
            tile_px=vision.image_size,
            patch_px=vision.patch_size,
        )

    # -- 0. inputs ---------------------------------------------------------------------------------
    def prepare(self, image: np.ndarray | Sequence[np.ndarray], instruction: str) -> PreparedInput:
        """RGB uint8 [H, W, 3] image(s) + instruction → the processor's tensors on the model's device."""
        return prepare_image_prompt(
            self.processor, image, instruction, "<image>\n", _FALLBACK_PROMPT, self.device, self.dtype
        )

    # -- 1. encode, with bottom-up saliency --------------------------------------------------------
    @torch.no_grad()
    def encode(self, prepared: PreparedInput, views: ViewReuse | None = None) -> VisualTokens:
        """Every image's tiles through the tower in one batch, then each image's tokens laid out on its own.
        ``views``: which tiles to run through the tower, the rest reused (vlm/encode_cache.py); all by default."""
        inputs = prepared.inputs
        views = views or ViewReuse()
        with ClsAttentionProbe(self._vision_attention) as probe, self.reusing(views):
            out = self.model.model.get_image_features(
                pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"], return_dict=True
            )
        cls_attention = views.rows("cls_attention", probe.cls_attention().cpu())  # [tiles of every image, 576]
        cls_states = views.rows("cls_states", probe.cls_query_states().cpu())  # each image's global view first
        images, first = [], 0
        for features, image_size, size in zip(out.pooler_output, inputs["image_sizes"].cpu(), prepared.image_sizes):
            grid = self._grid_shape(image_size)
            tiles = slice(first, first + grid[0] * grid[1] + 1)
            first = tiles.stop
            images.append(self._view_tokens(features, cls_attention[tiles], cls_states[tiles], image_size, grid, size))
        return join_views(images)

    def _view_tokens(
        self,
        features: torch.Tensor,
        cls_attention: torch.Tensor,
        cls_states: torch.Tensor,
        image_size: torch.Tensor,
        grid: tuple[int, int],
        size: tuple[int, int],
    ) -> VisualTokens:
        """One view's ``VisualTokens`` from its packed features and its tiles' [CLS] rows (tile 0 = global view)."""
        layout = self._packed_layout(cls_attention, image_size)
        token_boxes, region_boxes = self._boxes(layout, grid, size)
        tiles, global_logit = self.tile_logits(cls_attention, cls_states, region_boxes[1:], size, slice(1, None), 0)
        return self.visual_tokens(
            size,
            features,
            region=layout[:, 0],
            saliency=layout[:, 3],
            region_saliency=torch.cat([global_logit.reshape(1), tiles]),
            global_region=0,
            token_boxes=token_boxes,
            region_boxes=region_boxes,
            region_names=["global view", *grid_names("tile", *grid)],
            grid=grid,
        )

    def _grid_shape(self, image_size: torch.Tensor) -> tuple[int, int]:
        rows, cols = get_anyres_image_grid_shape(
            image_size.tolist(), self.model.config.image_grid_pinpoints, self._tile_px
        )
        return int(rows), int(cols)

    def _packed_layout(self, cls_attention: torch.Tensor, image_size: torch.Tensor) -> torch.Tensor:
        """[N, 4] per packed token: (tile, patch row, patch col, [CLS] score); newlines have tile −1.

        Runs the model's own ``pack_image_features`` on these four channels, so unpadding and newline
        placement are exactly the model's.
        """
        tiles, patches = cls_attention.shape
        rows, cols = self.patch_grid()
        channels = torch.stack(
            [
                torch.arange(tiles).float()[:, None].expand(tiles, patches),
                rows[None].expand(tiles, patches),
                cols[None].expand(tiles, patches),
                cls_attention.float(),
            ],
            dim=-1,
        )
        newline = torch.tensor([float(NO_REGION), -1.0, -1.0, 0.0])
        packed, _ = self.model.model.pack_image_features([channels], image_size[None], "default", image_newline=newline)
        return packed[0]

    def _boxes(self, layout: torch.Tensor, grid: tuple[int, int], image_size: tuple[int, int]):
        """Pixel boxes of every token and region in the original image (the tiles' canvas is the image
        resized to fit the pinpoint, aspect kept, and centre-padded)."""
        height, width = image_size
        side, tile_px = self._patches_per_side, self._tile_px
        patch_px = tile_px / side
        canvas_h, canvas_w = grid[0] * tile_px, grid[1] * tile_px
        scale = min(canvas_w / width, canvas_h / height)
        off_x, off_y = (canvas_w - width * scale) / 2, (canvas_h - height * scale) / 2

        def to_image(x0, y0, x1, y1):
            xs = ((torch.stack([x0, x1]) - off_x) / scale).clamp(0, width)
            ys = ((torch.stack([y0, y1]) - off_y) / scale).clamp(0, height)
            return torch.stack([xs[0], ys[0], xs[1], ys[1]], dim=-1)

        tile, row, col = layout[:, 0].long(), layout[:, 1], layout[:, 2]
        boxes = torch.full((layout.shape[0], 4), float("nan"))
        glob = tile == 0
        boxes[glob] = torch.stack(
            [
                col[glob] * width / side,
                row[glob] * height / side,
                (col[glob] + 1) * width / side,
                (row[glob] + 1) * height / side,
            ],
            dim=-1,
        )
        grid_tok = tile > 0
        t = tile[grid_tok] - 1
        cx = (t % grid[1]).float() * tile_px + col[grid_tok] * patch_px
        cy = (t // grid[1]).float() * tile_px + row[grid_tok] * patch_px
        boxes[grid_tok] = to_image(cx, cy, cx + patch_px, cy + patch_px)
        t = torch.arange(grid[0] * grid[1])
        tx, ty = (t % grid[1]).float() * tile_px, (t // grid[1]).float() * tile_px
        region_boxes = torch.cat(
            [torch.tensor([[0.0, 0.0, width, height]]), to_image(tx, ty, tx + tile_px, ty + tile_px)]
        )
        return boxes, region_boxes

    def pooler_output(self, features: torch.Tensor) -> list[torch.Tensor]:
        return [features]  # one packed tensor per image
