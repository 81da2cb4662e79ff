"""Pruning inside the LLM: the decoder layers before ``prune_layer`` read every visual token, the rest
only the kept ones, and the kept tokens keep their original positions.

This is FastV's scheme as its code (pkunlp-icler/FastV) runs it: layers < K over the whole prompt, the
visual tokens ranked by the *last* prompt token's head-mean attention at layer K − 1, the rest dropped
from layer K on (its hidden states, its keys and values in the cache).  Here it runs on the stock
transformers decoder through forward pre-hooks, so no modeling file is forked: the hook on the scoring
layer recomputes the needed attention rows from that layer's own input (``attention_rows``), and the
hooks on layers ≥ ``prune_layer`` cut the hidden states and every per-position argument (rotary tables,
position ids, a materialised attention mask) down to the kept positions.  Decoding then reads
full-length caches below ``prune_layer`` and pruned ones above; new tokens' positions continue from the
full prompt length, as FastV's do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..pruning.types import InLLMPruning
from .attention import attention_rows

#: ``choose(rows)``: [queries, visual tokens] attention → the kept visual tokens' indices, ascending.
Chooser = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def pruned_inside(
    layers: nn.ModuleList, plan: InLLMPruning, image_positions: torch.Tensor, prompt_len: int, choose: Chooser
) -> Iterator[dict]:
    """Hooks ``plan`` into ``layers`` for forward passes over one unpadded prompt of ``prompt_len``
    tokens whose visual tokens sit at ``image_positions``.

    Yields a dict that receives ``"kept"`` (the visual indices ``choose`` returned) during the prefill.  A
    ``plan`` whose ``prune_layer`` is past the last layer installs nothing: the forward is the stock one.  Only
    materialised (tensor) or absent attention masks are supported.
    """
    state: dict = {}
    if plan.prune_layer >= len(layers):
        yield state
        return
    queries = plan.query_positions(image_positions, prompt_len)

    def score(module, args, kwargs):
        if not _is_prefill(kwargs, prompt_len):
            return None
        rows = attention_rows(module, _hidden(args, kwargs), kwargs["position_embeddings"], queries, image_positions)
        kept = choose(rows).to(image_positions.device)
        positions = torch.nonzero(kept_prompt_mask(prompt_len, image_positions, kept)).squeeze(1)
        state.update(kept=kept, positions=positions)
        return None

    def prune(module, args, kwargs):
        positions = state["positions"]
        if _is_prefill(kwargs, prompt_len):
            hidden = _hidden(args, kwargs)
            if hidden.shape[1] == prompt_len:  # the first pruned layer: later ones already get the kept rows
                hidden = hidden[:, positions]
            cos, sin = kwargs["position_embeddings"]
            kwargs["position_embeddings"] = (cos[..., positions, :], sin[..., positions, :])
            if torch.is_tensor(kwargs.get("position_ids")):
                kwargs["position_ids"] = kwargs["position_ids"][..., positions]
            kwargs["attention_mask"] = _cut_mask(kwargs.get("attention_mask"), positions, positions)
        else:  # decoding: the cache of this layer holds only the kept prompt positions
            hidden = _hidden(args, kwargs)
            mask = kwargs.get("attention_mask")
            if mask is not None:
                keys = torch.cat([positions, torch.arange(prompt_len, _key_length(mask), device=positions.device)])
                kwargs["attention_mask"] = _cut_mask(mask, None, keys)
        kwargs.pop("hidden_states", None)
        return (hidden, *args[1:]), kwargs

    handles = [layers[plan.score_layer].register_forward_pre_hook(score, with_kwargs=True)]
    handles += [layer.register_forward_pre_hook(prune, with_kwargs=True) for layer in layers[plan.prune_layer :]]
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()


def kept_prompt_mask(prompt_len: int, image_positions: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """[prompt_len] bool: the prompt positions that survive when only the visual tokens ``kept`` (indices
    into ``image_positions``) stay; text and every other token stay."""
    keep = torch.ones(prompt_len, dtype=torch.bool, device=image_positions.device)
    keep[image_positions] = False
    keep[image_positions[kept.to(image_positions.device)]] = True
    return keep


def causal_mask(length: int, dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
    """[1, 1, length, length] additive causal mask: 0 on and below the diagonal, the dtype's minimum above.
    A decoder layer called directly (not through its model's forward, which builds the mask) is causal
    under every attention implementation with it; with ``attention_mask=None`` SDPA is causal but eager
    attention attends both ways."""
    blocked = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
    mask = torch.zeros(length, length, dtype=dtype, device=device).masked_fill(blocked, torch.finfo(dtype).min)
    return mask[None, None]


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _is_prefill(kwargs: dict, prompt_len: int) -> bool:
    """The prompt's forward pass (rotary tables for every prompt position), not a decoding step."""
    cos, _ = kwargs["position_embeddings"]
    return cos.shape[-2] == prompt_len


def _key_length(mask) -> int:
    if not torch.is_tensor(mask):
        raise NotImplementedError(f"in-LLM pruning needs a tensor attention mask or none, got {type(mask).__name__}")
    return int(mask.shape[-1])


def _cut_mask(mask, rows: torch.Tensor | None, keys: torch.Tensor):
    """A materialised [B, 1, Q, K] mask restricted to the kept query rows and key columns."""
    if mask is None:
        return None
    _key_length(mask)
    if rows is not None:
        mask = mask[..., rows.to(mask.device), :]
    return mask[..., keys.to(mask.device)]
