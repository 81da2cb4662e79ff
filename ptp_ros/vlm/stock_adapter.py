"""The adapter base classes every family subclasses: ``StockModelAdapter`` (loading, the ``encode`` tail
``visual_tokens``, instruction relevance, the pruned ``generate`` path over a stock
``*ForConditionalGeneration``) and ``TiledClsAdapter`` (with ``TiledModelOptions``: the region logits of tiled
models with [CLS] tokens and a global view), and the pieces they share: prompt building, placeholder
positions, layer choice.

They live here so that a model family's file holds only what is particular to that family (how its
tokens are laid out, where its saliency comes from); docs/models.md, "Adding a model family", walks
through what that is.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..pruning import TokenScores
from ..pruning.region_saliency import footprint_mass, mass_logits, similarity_logits
from .attention import text_to_token_attention
from .base import Generation, PreparedInput, VisualTokens
from .compat import hide_video_processor
from .encode_cache import ViewReuse
from .generation import timed_generate
from .in_llm import Chooser, InLLMPruning, kept_prompt_mask, pruned_inside
from .loading import ModelLoadError, weights_misfit

#: How a tiled model's regions are weighed against each other (see ``tile_region_logits``).
TILE_REGION_SCORES = ("cls_mass", "global_similarity")


def paper_vision_layer(num_layers: int) -> int:
    """0-based index of the paper's [CLS] layer, "11 of 24", scaled to the tower's depth."""
    return max(0, round(11 * num_layers / 24) - 1)


def vision_layer_index(choice: int | str, num_layers: int, feature_layer: int) -> int:
    """Resolve ``"paper"``, ``"feature"`` (the layer whose output the model reads, from its
    ``vision_feature_layer`` hidden-state index) or a layer index (negative counts from the end)."""
    if choice == "paper":
        return paper_vision_layer(num_layers)
    if choice == "feature":
        return feature_layer % num_layers if feature_layer < 0 else feature_layer - 1
    index = int(choice)
    if not -num_layers <= index < num_layers:
        raise ValueError(f"vision_layer {index} is outside the tower's {num_layers} layers")
    return index % num_layers


def prepare_image_prompt(
    processor,
    images: np.ndarray | Sequence[np.ndarray],
    instruction: str,
    fallback_image: str,
    fallback_prompt: str,
    device: torch.device,
    dtype: torch.dtype,
    **processor_kwargs,
) -> PreparedInput:
    """RGB uint8 [H, W, 3] image(s) + instruction → the processor's tensors on ``device``, pixels in ``dtype``;
    several images (camera views) go into one prompt, one image entry each, in order.

    Uses the processor's chat template when it has one, else ``fallback_prompt`` (``{images}{instruction}``,
    ``{images}`` being ``fallback_image`` once per image).
    """
    images = [images] if isinstance(images, np.ndarray) else list(images)
    content = [*({"type": "image"} for _ in images), {"type": "text", "text": instruction}]
    if getattr(processor, "chat_template", None):
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    else:
        prompt = fallback_prompt.format(images=fallback_image * len(images), instruction=instruction)
    pil = [Image.fromarray(image) for image in images]
    inputs = processor(images=pil, text=prompt, return_tensors="pt", **processor_kwargs).to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    sizes = tuple((int(image.shape[0]), int(image.shape[1])) for image in images)
    return PreparedInput(inputs=inputs, image_sizes=sizes, instruction=instruction)


def placeholder_positions(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Sequence positions of the image placeholders in a single prompt ([1, L] ids) → [N] long."""
    return torch.nonzero(input_ids[0] == image_token_id).squeeze(1)


def kept_sequence_mask(input_ids: torch.Tensor, image_token_id: int, kept: torch.Tensor) -> torch.Tensor:
    """[L] bool: which prompt positions survive when only visual tokens ``kept`` (indices into the
    placeholders, in order) are fed; text and every other token stay."""
    return kept_prompt_mask(input_ids.shape[1], placeholder_positions(input_ids, image_token_id), kept)


def instruction_query_positions(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Positions after the last image placeholder: the instruction (and template) tokens that attend."""
    image_pos = placeholder_positions(input_ids, image_token_id)
    query_pos = torch.arange(int(image_pos.max()) + 1, input_ids.shape[1], device=input_ids.device)
    if query_pos.numel() == 0:
        raise ValueError("the prompt has no instruction tokens after the image")
    return query_pos


def raster_grid(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) [rows·cols] long of every cell of a rows×cols grid, in raster (row-major) order."""
    return torch.arange(rows).repeat_interleave(cols), torch.arange(cols).repeat(rows)


def grid_names(kind: str, rows: int, cols: int) -> list[str]:
    """Region names of a rows×cols grid in raster order: ``"<kind> r<row> c<col>"``."""
    return [f"{kind} r{r} c{c}" for r in range(rows) for c in range(cols)]


def normalised_boxes(boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Pixel boxes [.., 4] (x0, y0, x1, y1) of an image of (height, width) → fractions of its sides."""
    height, width = image_size
    return boxes / torch.tensor([width, height, width, height], dtype=boxes.dtype)


def tile_region_logits(
    region_score: str,
    global_attention: torch.Tensor,
    tile_boxes: torch.Tensor,
    tile_cls: torch.Tensor,
    global_cls: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-tile logits [T], global-view logit []) for a tiled model whose global view shows the whole image.

    ``cls_mass``: the global view's [CLS] attention (``global_attention``, an [h, w] map over the image)
    that falls on each tile's footprint (``tile_boxes``, normalised [T, 4]); the global view counts as an
    average tile.  ``global_similarity``: cosine of each tile's [CLS] state to the global view's; the
    global view gets the mean.
    """
    if region_score == "cls_mass":
        tiles = mass_logits(footprint_mass(global_attention, tile_boxes))
        return tiles, torch.logsumexp(tiles, 0) - np.log(len(tiles))
    if region_score == "global_similarity":
        tiles = similarity_logits(tile_cls, global_cls)
        return tiles, tiles.mean()
    raise ValueError(f"region_score must be one of {TILE_REGION_SCORES}, got {region_score!r}")


@dataclass(frozen=True)
class TiledModelOptions:
    """PTP's knobs for a tiled model with [CLS] tokens (LLaVA-NeXT, InternVL)."""

    vision_layer: int | str = "paper"  # "paper", "feature" (the layer the model reads features from) or 0-based index
    llm_layer: int = 2  # LLM layer whose text→visual attention gives instruction relevance
    region_score: str = "cls_mass"  # one of TILE_REGION_SCORES

    def __post_init__(self) -> None:
        if self.region_score not in TILE_REGION_SCORES:
            raise ValueError(f"region_score must be one of {TILE_REGION_SCORES}, got {self.region_score!r}")
        if isinstance(self.vision_layer, str) and self.vision_layer not in ("paper", "feature"):
            raise ValueError(f"vision_layer must be 'paper', 'feature' or an index, got {self.vision_layer!r}")


def check_llm_layer(llm_layer: int, num_layers: int) -> None:
    if not 0 <= llm_layer < num_layers:
        raise ValueError(f"llm_layer {llm_layer} is outside the LLM's {num_layers} layers")


class StockModelAdapter:
    """Loading, instruction relevance and pruned generation as every family over a stock
    ``*ForConditionalGeneration`` with ``mm_encoder_outputs`` does them.

    A family sets ``name`` (its ``model_type``), ``model_class``/``options_class`` (and
    ``processor_needing_shim`` when its processor cannot be built without torchvision), declares its
    capabilities (``supports_downscaling``, ``region_scores``), implements ``prepare``/``encode`` (ending in
    ``visual_tokens``) and says how its ``pooler_output`` is shaped (``pooler_output``).  One whose LLM
    reads other positions than 0..L-1 overrides ``rope_positions`` (and ``generation_positions``,
    ``reset_generation_state`` where ``generate`` needs them); the pruned and the reference ``generate``
    are then this class's.
    """

    name: ClassVar[str]
    model_class: ClassVar[type]
    options_class: ClassVar[type]
    processor_needing_shim: ClassVar[type | None] = None
    #: ``downscaled`` works: the processor reads the image at any resolution (the baseline pruning must beat)
    supports_downscaling: ClassVar[bool] = False
    #: several images (camera views) in one prompt: ``prepare`` takes a list, ``encode`` encodes them in one batch
    supports_views: ClassVar[bool] = True
    #: ``VisualTokens.extras`` that hold lists of per-token [N, D] tensors (``base.join_views`` joins them)
    per_token_extras: ClassVar[tuple[str, ...]] = ()
    #: the ``region_score`` options the family's options offer (empty: it has no such option)
    region_scores: ClassVar[tuple[str, ...]] = ()
    #: each view (tile, global view) is its own vision-tower forward, so ``encode`` takes a ``ViewReuse`` plan that
    #: runs only some of them (vlm/encode_cache.py); False: a frame's encoding is reused whole or not at all
    independent_views: ClassVar[bool] = False
    vision_layer: int  # the vision layer saliency is read from (set by the family's ``__init__``)

    def __init__(self, model, processor, options) -> None:
        self.model = model.eval()
        self.processor = processor
        self.options = options
        self.device = model.device
        self.dtype = model.dtype
        self.image_token_id = model.config.image_token_id
        check_llm_layer(options.llm_layer, len(model.model.language_model.layers))

    @classmethod
    def from_checkpoint(cls, path: Path, device: torch.device, dtype: torch.dtype, **options):
        # trust_remote_code stays False: only transformers' own classes run (remote-code formats are refused
        # by name in loading.unsupported_format before this is reached)
        model, loading_info = cls.model_class.from_pretrained(
            path,
            dtype=dtype,
            use_safetensors=True,
            local_files_only=True,
            trust_remote_code=False,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
        )  # misfits are refused below, with their names
        if misfit := weights_misfit(loading_info):
            raise ModelLoadError(misfit)
        if cls.processor_needing_shim is not None:
            hide_video_processor(cls.processor_needing_shim)
        processor = AutoProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        return cls(model.to(device), processor, cls.options_class(**options))

    def downscaled(self, tokens: int, image_size: tuple[int, int] | None = None) -> StockModelAdapter:
        raise NotImplementedError(
            f"{self.name} reads images at the resolutions its processor fixes: "
            "no down-scaling baseline (supports_downscaling is False)"
        )

    def view_pixels(self, prepared: PreparedInput) -> torch.Tensor:
        """[V, C, H, W]: each view's vision-tower input as the processor made it, in the tower's order — what the
        encode cache hashes and compares.  Views of one image ([.., V, C, H, W]: tiles, a global view) as they are;
        flattened patches ([N, C·T·P·P], channels outermost: the Qwen-VL processors) as one view [1, C, N, T·P·P],
        the whole frame."""
        pixels = prepared.inputs["pixel_values"]
        if pixels.dim() >= 4:
            return pixels.flatten(0, pixels.dim() - 4)
        channels = getattr(self.model.config.vision_config, "in_channels", 3)
        return pixels.view(pixels.shape[0], channels, -1).transpose(0, 1)[None]

    def rope_positions(self, prepared: PreparedInput) -> torch.Tensor | None:
        """Position ids of the full prompt for the LLM; ``None``: its default 0..L-1."""
        return None

    def generation_positions(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The ``position_ids`` ``generate`` gets for the (pruned) prompt ``input_ids`` whose tokens keep
        their ``rope_positions`` columns ``positions``; by default those positions themselves."""
        return positions

    def reset_generation_state(self) -> None:
        """Drop what an earlier ``generate`` left in the model that would shift the next one (none by default)."""

    def visual_tokens(
        self,
        image_size: tuple[int, int],
        features: torch.Tensor,
        *,
        region: torch.Tensor,
        saliency: torch.Tensor,
        region_saliency: torch.Tensor,
        global_region: int | None,
        token_boxes: torch.Tensor,
        region_boxes: torch.Tensor,
        region_names: list[str],
        **extras,
    ) -> VisualTokens:
        """The end of every view's ``encode``: the family's token layout (``region`` [N] per token, bottom-up
        ``saliency`` [N], ``region_saliency`` logits [R], boxes, names) checked against the ``features``
        [N, D] the model produced for the view of ``image_size``, as ``VisualTokens`` (``extras`` plus the
        ``vision_layer``); ``base.join_views`` joins the views of one prompt."""
        if region.shape[0] != features.shape[0]:
            raise RuntimeError(f"token layout ({region.shape[0]}) and features ({features.shape[0]}) disagree")
        scores = TokenScores(
            region=region.long(),
            saliency=saliency.float(),
            region_saliency=region_saliency.float(),
            global_region=global_region,
        )
        return VisualTokens(
            features=features,
            scores=scores,
            token_boxes=token_boxes,
            region_boxes=region_boxes,
            region_names=region_names,
            image_size=image_size,
            extras={**extras, "vision_layer": self.vision_layer},
        )

    def pooler_output(self, features: torch.Tensor):
        """``features`` [N, D] in the container the model's ``mm_encoder_outputs`` expects."""
        raise NotImplementedError

    def encoder_output(
        self, features: torch.Tensor, visual: VisualTokens, kept: torch.Tensor | None
    ) -> BaseModelOutputWithPooling:
        """The image encoder's output ``generate`` hands the model (``mm_encoder_outputs["image"]``): the fed
        ``features`` [K, D]; a family whose tower hands the LLM more per token (Qwen3-VL's DeepStack) adds
        the rows of it of the ``kept`` visual tokens (``None``: all)."""
        return BaseModelOutputWithPooling(pooler_output=self.pooler_output(features))

    def llm_visual_inputs(self, input_ids: torch.Tensor, visual: VisualTokens, kept: torch.Tensor | None) -> dict:
        """Keyword arguments of the LLM's forward, besides the embeddings, that carry visual tokens (the
        ``kept`` ones, placed in ``input_ids`` [B, L]; a batch holds them row after row, ``kept`` their indices
        concatenated); none for a family whose LLM reads them as embeddings only."""
        return {}

    def after_llm_layer(self, index: int, hidden: torch.Tensor, visual_inputs: dict) -> torch.Tensor:
        """The hidden states [B, L, D] after decoder layer ``index`` as the LLM's own forward hands them on,
        given the ``llm_visual_inputs`` of the sequence they hold: for a caller that runs the decoder layers
        itself (ptp-eval's batched in-LLM rows).  Unchanged unless the family adds visual inputs between layers."""
        return hidden

    def inside_llm_pruning(self, state: dict) -> AbstractContextManager:
        """Around a ``generate`` pruned inside the LLM (``state``: ``pruned_inside``'s, whose ``kept`` and
        ``positions`` appear at the prune layer): what else the family must cut to the kept tokens."""
        return nullcontext()

    @torch.no_grad()
    def instruction_attention(
        self,
        prepared: PreparedInput,
        visual: VisualTokens,
        kept: torch.Tensor | None = None,
        layers: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """[instruction tokens, N] (or [instruction tokens, len(kept)] over a prompt that holds only the
        ``kept`` visual tokens, laid out as the pruned ``generate`` lays them out); [len(layers), ...] at each
        of ``layers`` instead of the configured one, from one forward."""
        ids = prepared.inputs["input_ids"]
        positions = self.rope_positions(prepared)
        features = visual.features
        if kept is not None:
            keep = kept_sequence_mask(ids, self.image_token_id, kept)
            ids, features = ids[:, keep], features[kept.to(features.device)]
            positions = None if positions is None else positions[..., keep]
        image_pos = placeholder_positions(ids, self.image_token_id)
        visual_inputs = self.llm_visual_inputs(ids, visual, kept)
        embeds = self.model.get_input_embeddings()(ids).clone()
        embeds[0, image_pos] = features.to(embeds.dtype)
        return text_to_token_attention(
            self.model.model.language_model,
            embeds,
            self.options.llm_layer if layers is None else layers,
            instruction_query_positions(ids, self.image_token_id),
            image_pos,
            position_ids=positions,
            **visual_inputs,
        ).cpu()

    @torch.no_grad()
    def generate(
        self,
        prepared: PreparedInput,
        visual: VisualTokens,
        kept: torch.Tensor | None,
        max_new_tokens: int,
        cancel: threading.Event | None = None,
        in_llm: tuple[InLLMPruning, Chooser] | None = None,
    ) -> Generation:
        """Stock ``generate`` over the prompt without the pruned placeholders, fed the kept ``features``
        through ``mm_encoder_outputs`` (and, where ``rope_positions`` gives them, the kept tokens' original
        positions); keep-all runs the same path, with every placeholder."""
        ids, mask = prepared.inputs["input_ids"], prepared.inputs["attention_mask"]
        positions = self.rope_positions(prepared)
        features = visual.features
        if kept is not None and kept.numel() < visual.num_tokens:
            keep = kept_sequence_mask(ids, self.image_token_id, kept)
            ids, mask, features = ids[:, keep], mask[:, keep], features[kept.to(features.device)]
            positions = None if positions is None else positions[..., keep]
        else:
            kept = None
        encoded = {"image": self.encoder_output(features, visual, kept)}
        extra = {} if positions is None else {"position_ids": self.generation_positions(ids, positions)}
        self.reset_generation_state()
        return self.run_generate(
            max_new_tokens, cancel, in_llm, input_ids=ids, attention_mask=mask, mm_encoder_outputs=encoded, **extra
        )

    def run_generate(
        self, max_new_tokens: int, cancel: threading.Event | None, in_llm: tuple[InLLMPruning, Chooser] | None, **inputs
    ) -> Generation:
        """``timed_generate`` over ``inputs``; with ``in_llm`` = (plan, choose), the visual tokens of the
        (unpruned) prompt are ranked and dropped inside the LLM (``pruned_inside``), and the returned
        ``Generation.in_llm_kept`` holds the visual indices ``choose`` kept."""
        if in_llm is None:
            return timed_generate(self.model, self.processor.tokenizer, self.device, max_new_tokens, cancel, **inputs)
        plan, choose = in_llm
        ids = inputs["input_ids"]
        image_pos = placeholder_positions(ids, self.image_token_id)
        layers = self.model.model.language_model.layers
        with (
            pruned_inside(layers, plan, image_pos, ids.shape[1], choose) as state,
            self.inside_llm_pruning(state),
        ):
            generation = timed_generate(
                self.model, self.processor.tokenizer, self.device, max_new_tokens, cancel, **inputs
            )
        generation.in_llm_kept = state.get("kept")
        return generation

    @torch.no_grad()
    def generate_reference(self, prepared: PreparedInput, max_new_tokens: int) -> Generation:
        self.reset_generation_state()
        return timed_generate(self.model, self.processor.tokenizer, self.device, max_new_tokens, **prepared.inputs)


class TiledClsAdapter(StockModelAdapter):
    """A tiled model whose vision tower has a [CLS] token and whose global view shows the whole image
    (LLaVA-NeXT, InternVL): ``TiledModelOptions``, regions weighed by ``tile_region_logits``.

    ``vision_layers`` are the tower's layers, ``attention`` the name of the attention module in each;
    ``tile_px``/``patch_px`` the tile and patch sizes.
    """

    options_class = TiledModelOptions
    region_scores = TILE_REGION_SCORES
    independent_views = True  # the tiles and the global view are separate forwards of the tower

    def __init__(
        self,
        model,
        processor,
        options: TiledModelOptions,
        *,
        vision_layers,
        attention: str,
        tile_px: int,
        patch_px: int,
    ):
        super().__init__(model, processor, options)
        self.vision_layer = vision_layer_index(
            options.vision_layer, len(vision_layers), model.config.vision_feature_layer
        )
        self._vision_attention = getattr(vision_layers[self.vision_layer], attention)
        self._tile_px = int(tile_px)
        self._patches_per_side = self._tile_px // int(patch_px)

    def reusing(self, views: ViewReuse):
        """Context in which ``get_image_features`` runs the tower on ``views``' views to encode only, the others'
        projected features put back in place (``ViewReuse.around``)."""
        return views.around(self.model.model.vision_tower, self.model.model.multi_modal_projector)

    def patch_grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, col) [side²] float of a tile's patches, in the tower's (raster) order."""
        rows, cols = raster_grid(self._patches_per_side, self._patches_per_side)
        return rows.float(), cols.float()

    def tile_logits(
        self,
        cls_attention: torch.Tensor,
        cls_states: torch.Tensor,
        tile_boxes: torch.Tensor,
        image_size: tuple[int, int],
        tiles,
        glob: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-tile logits, global-view logit) by the ``region_score`` option, from the [CLS] attention
        [views, side²] and [CLS] states of the encoded views (``tiles``: the tiles' rows, ``glob``: the
        global view's) and the tiles' pixel boxes [T, 4]."""
        side = self._patches_per_side
        return tile_region_logits(
            self.options.region_score,
            cls_attention[glob].view(side, side),
            normalised_boxes(tile_boxes, image_size),
            cls_states[tiles],
            cls_states[glob],
        )
