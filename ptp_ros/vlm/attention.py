"""Attention rows read from model internals without attention maps.

Both probes recompute only the few rows PTP needs ([CLS] in the vision tower, the instruction tokens in
the LLM) from the layer's own projections, so the model keeps running on SDPA / FlashAttention and
``output_attentions`` is never switched on.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import nn


class ClsAttentionProbe:
    """Captures the query/key states of one vision self-attention and yields the [CLS] row.

    ``query``/``key`` name the submodules whose outputs are the final per-token q and k, [tiles, T, width]:
    ``q_proj``/``k_proj`` for CLIP, ``q_norm``/``k_norm`` for InternViT (qk-norm follows the projection).
    Use as a context manager around the vision forward; the hooks are gone afterwards.
    ``cls_attention()`` → [tiles, patches] head-averaged softmax(q_cls·kᵀ·scale) over all keys, [CLS]
    column dropped (exactly eager attention's ``attn[:, :, 0, 1:].mean(1)``).
    ``cls_query_states()`` → [tiles, hidden] the [CLS] query input (the layer's normalised [CLS] state).
    """

    def __init__(self, attention: nn.Module, query: str = "q_proj", key: str = "k_proj"):
        self.attention = attention
        self._query, self._key = getattr(attention, query), getattr(attention, key)
        self._q: torch.Tensor | None = None
        self._k: torch.Tensor | None = None
        self._x: torch.Tensor | None = None
        self._handles: list = []

    def __enter__(self) -> ClsAttentionProbe:
        def keep_x(module, args):
            self._x = args[0][:, 0].detach()

        def keep_q(module, args, output):
            self._q = output[:, :1].detach()

        def keep_k(module, args, output):
            self._k = output.detach()

        self._handles = [
            self.attention.q_proj.register_forward_pre_hook(keep_x),
            self._query.register_forward_hook(keep_q),
            self._key.register_forward_hook(keep_k),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def cls_attention(self) -> torch.Tensor:
        if self._q is None or self._k is None:
            raise RuntimeError("the probed layer did not run")
        tiles, tokens, width = self._k.shape
        heads = self.attention.num_heads
        head_dim = width // heads
        q = self._q.float().view(tiles, 1, heads, head_dim).transpose(1, 2)
        k = self._k.float().view(tiles, tokens, heads, head_dim).transpose(1, 2)
        probs = torch.softmax((q @ k.transpose(-1, -2)) * self.attention.scale, dim=-1)  # [tiles, H, 1, T]
        return probs[:, :, 0, 1:].mean(dim=1)

    def cls_query_states(self) -> torch.Tensor:
        if self._x is None:
            raise RuntimeError("the probed layer did not run")
        return self._x.float()


class _StopForward(Exception):
    """Raised from a pre-hook to end a forward pass once the wanted layer's input is known."""


def _rotary_for(attention: nn.Module):
    """``apply_rotary_pos_emb`` of the attention's own modeling file (Llama, Qwen2, Mistral, … share it)."""
    fn = getattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb", None)
    if fn is None:
        raise NotImplementedError(f"{type(attention).__name__}: no apply_rotary_pos_emb in its modeling file")
    return fn


@torch.no_grad()
def layer_inputs(
    language_model: nn.Module,
    inputs_embeds: torch.Tensor,
    layer_indices: list[int],
    position_ids: torch.Tensor | None = None,
    **decoder_kwargs,
) -> tuple[dict[int, torch.Tensor], tuple]:
    """The inputs of decoder layers ``layer_indices`` ({index: [B, L, D]}) and the rotary tables (cos, sin)
    the decoder hands its layers, from one forward that stops before the deepest of them runs
    (``decoder_kwargs``: more of the decoder's inputs, e.g. Qwen3-VL's DeepStack features)."""
    layers = language_model.layers
    if not layer_indices or not all(0 <= i < len(layers) for i in layer_indices):
        raise ValueError(f"LLM layers {layer_indices} do not all exist (the model has {len(layers)})")
    last = max(layer_indices)
    store: dict = {}

    def grab(index: int):
        def hook(module, args, kwargs):
            store[index] = args[0] if args else kwargs["hidden_states"]
            store["position_embeddings"] = kwargs.get("position_embeddings")
            if index == last:
                raise _StopForward

        return hook

    handles = [layers[i].register_forward_pre_hook(grab(i), with_kwargs=True) for i in set(layer_indices)]
    try:
        language_model(inputs_embeds=inputs_embeds, position_ids=position_ids, use_cache=False, **decoder_kwargs)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return {i: store[i] for i in layer_indices}, store["position_embeddings"]


@torch.no_grad()
def text_to_token_attention(
    language_model: nn.Module,
    inputs_embeds: torch.Tensor,
    layer_index: int | Sequence[int],
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    **decoder_kwargs,
) -> torch.Tensor:
    """Head-averaged causal attention of ``query_positions`` onto ``key_positions`` at one LLM layer (or at each
    of several, from the same forward).

    Runs the decoder only up to ``layer_index`` (layers before it in full, that layer's input norm and
    q/k projections for the needed rows only), for a single unpadded sequence (``inputs_embeds`` [1, L, D]).
    ``position_ids`` are handed to the decoder as they are (``None``: its default 0..L-1); Qwen2.5-VL needs
    its 3-D M-RoPE ids [3, 1, L] here; ``decoder_kwargs`` go to the decoder too (Qwen3-VL: its DeepStack
    features and their positions).  The rotary tables are read back from the layer's input, so any
    rotary scheme whose ``apply_rotary_pos_emb`` has the Llama signature works unchanged.
    Returns [len(query_positions), len(key_positions)] float32 (stacked → [len(layers), ...] for a sequence).
    """
    layers = [layer_index] if isinstance(layer_index, int) else list(layer_index)
    for index in layers:
        if not 0 <= index < len(language_model.layers):
            raise ValueError(f"LLM layer {index} does not exist (the model has {len(language_model.layers)})")
    inputs, position_embeddings = layer_inputs(language_model, inputs_embeds, layers, position_ids, **decoder_kwargs)
    rows = [
        attention_rows(language_model.layers[i], inputs[i], position_embeddings, query_positions, key_positions)
        for i in layers
    ]
    return rows[0] if isinstance(layer_index, int) else torch.stack(rows)


@torch.no_grad()
def attention_rows(
    layer: nn.Module,
    layer_input: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
) -> torch.Tensor:
    """Head-averaged causal attention rows of one decoder layer, recomputed from its input [1, L, D] and
    the rotary tables (cos, sin) it was called with: that layer's input norm, q/k projections (and
    q/k norms) for the needed rows only.  → [len(query_positions), len(key_positions)] float32."""
    hidden = layer.input_layernorm(layer_input)  # [1, L, D]
    attn = layer.self_attn
    head_dim = attn.head_dim
    q = attn.q_proj(hidden[:, query_positions]).view(1, len(query_positions), -1, head_dim).transpose(1, 2)
    last = int(query_positions.max()) + 1  # causal: no query sees past itself
    k = attn.k_proj(hidden[:, :last]).view(1, last, -1, head_dim).transpose(1, 2)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin = position_embeddings
    q_cos, q_sin = cos[:, query_positions], sin[:, query_positions]
    q, _ = _rotary_for(attn)(q, q, q_cos, q_sin)
    k, _ = _rotary_for(attn)(k, k, cos[:, :last], sin[:, :last])
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped-query attention
    logits = (q.float() @ k.float().transpose(-1, -2)) * attn.scaling  # [1, H, Q, last]
    future = torch.arange(last, device=logits.device)[None, :] > query_positions[:, None]
    probs = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)
    return probs.mean(dim=1)[0][:, key_positions]


class ReceivedAttentionProbe:
    """Attention each token *receives* in one full-attention block of a packed-sequence ViT (Qwen2.5-VL).

    Such towers have no [CLS]; the saliency signal that exists is how much attention the other patches pay
    to a patch.  The probe keeps the block's fused ``qkv`` output and the rotary tables / ``cu_seqlens`` it
    was called with, then recomputes softmax(q·kᵀ·scale) for ``chunk`` queries at a time (never an N×N map
    for all heads at once) within each sequence of ``cu_seqlens``.
    ``received()`` → [N] in the block's token order: mean over heads and queries, so it sums to 1 per image.
    """

    def __init__(self, attention: nn.Module, chunk: int = 1024):
        self.attention = attention
        self.chunk = chunk
        self._qkv: torch.Tensor | None = None
        self._call: dict = {}
        self._handles: list = []

    def __enter__(self) -> ReceivedAttentionProbe:
        def keep_call(module, args, kwargs):
            self._call = {"cu_seqlens": kwargs["cu_seqlens"], "position_embeddings": kwargs["position_embeddings"]}

        def keep_qkv(module, args, output):
            self._qkv = output.detach()

        self._handles = [
            self.attention.register_forward_pre_hook(keep_call, with_kwargs=True),
            self.attention.qkv.register_forward_hook(keep_qkv),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @torch.no_grad()
    def received(self) -> torch.Tensor:
        if self._qkv is None:
            raise RuntimeError("the probed block did not run")
        attn = self.attention
        rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
        tokens = self._qkv.shape[0]
        q, k, _ = self._qkv.float().reshape(tokens, 3, attn.num_heads, -1).unbind(1)  # [N, H, hd] each
        cos, sin = self._call["position_embeddings"]
        q, k = rotary(q, k, cos, sin)
        bounds = self._call["cu_seqlens"].tolist()
        out = torch.zeros(tokens, dtype=torch.float32, device=q.device)
        for start, end in zip(bounds[:-1], bounds[1:]):
            keys = k[start:end].transpose(0, 1)  # [H, n, hd]
            for first in range(start, end, self.chunk):
                queries = q[first : min(first + self.chunk, end)].transpose(0, 1)  # [H, c, hd]
                probs = torch.softmax((queries @ keys.transpose(-1, -2)) * attn.scaling, dim=-1)
                out[start:end] += probs.sum(dim=(0, 1))
            out[start:end] /= attn.num_heads * (end - start)
        return out
