"""Pieces every adapter shares: prompt building, placeholder pruning, timed ``generate``, layer choice and
the region logits of tiled models with a global view.

They live here so that a model family's file holds only what is particular to that family (how its
tokens are laid out, where its saliency comes from).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..pruning.region_saliency import footprint_mass, mass_logits, similarity_logits
from .base import Generation, PreparedInput, StageClock

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


def prepare_image_prompt(processor, image: np.ndarray, instruction: str, fallback_prompt: str,
                         device: torch.device, dtype: torch.dtype, **processor_kwargs) -> PreparedInput:
    """RGB uint8 [H, W, 3] + instruction → the processor's tensors on ``device``, pixels in ``dtype``.

    Uses the processor's chat template when it has one, else ``fallback_prompt`` (``{instruction}``).
    """
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    if getattr(processor, "chat_template", None):
        prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    else:
        prompt = fallback_prompt.format(instruction=instruction)
    inputs = processor(images=Image.fromarray(image), text=prompt, return_tensors="pt", **processor_kwargs).to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return PreparedInput(inputs=inputs, image_size=(int(image.shape[0]), int(image.shape[1])),
                         instruction=instruction)


def placeholder_positions(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Sequence positions of the image placeholders in a single prompt ([1, L] ids) → [N] long."""
    return torch.nonzero(input_ids[0] == image_token_id).squeeze(1)


def kept_sequence_mask(input_ids: torch.Tensor, image_token_id: int, kept: torch.Tensor) -> torch.Tensor:
    """[L] bool: which prompt positions survive when only visual tokens ``kept`` (indices into the
    placeholders, in order) are fed; text and every other token stay."""
    image_pos = placeholder_positions(input_ids, image_token_id)
    pruned = torch.ones(image_pos.shape[0], dtype=torch.bool, device=input_ids.device)
    pruned[kept.to(input_ids.device)] = False
    keep = torch.ones(input_ids.shape[1], dtype=torch.bool, device=input_ids.device)
    keep[image_pos[pruned]] = False
    return keep


def instruction_query_positions(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Positions after the last image placeholder: the instruction (and template) tokens that attend."""
    image_pos = placeholder_positions(input_ids, image_token_id)
    query_pos = torch.arange(int(image_pos.max()) + 1, input_ids.shape[1], device=input_ids.device)
    if query_pos.numel() == 0:
        raise ValueError("the prompt has no instruction tokens after the image")
    return query_pos


def timed_generate(model, tokenizer, device: torch.device, max_new_tokens: int, **inputs) -> Generation:
    """Greedy stock ``model.generate(**inputs)`` with prefill / decode timed by a ``StageClock``."""
    clock = StageClock(device)
    prompt_len = inputs["input_ids"].shape[1]
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=clock,
                         pad_token_id=tokenizer.pad_token_id)
    prefill_ms, decode_ms = clock.stages_ms()
    new = out[0, prompt_len:]
    text = tokenizer.decode(new, skip_special_tokens=True).strip()
    return Generation(text=text, token_ids=new.tolist(), prompt_tokens=prompt_len, new_tokens=int(new.shape[0]),
                      prefill_ms=prefill_ms, decode_ms=decode_ms)


def tile_region_logits(region_score: str, global_attention: torch.Tensor, tile_boxes: torch.Tensor,
                       tile_cls: torch.Tensor, global_cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
