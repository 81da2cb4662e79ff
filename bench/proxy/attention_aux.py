"""Attention supervision for the proxy LLM: one head of two *deep* layers is told where to look while it learns.

Why: a from-scratch LM learns query-dependent retrieval from one answer word per question only after a
long plateau (docs/accuracy/training.md); telling one head which tokens the answer position should read
removes the plateau.  It is a training aid like the auxiliary vision heads: nothing of it is saved.

What it shapes: the answer position's attention row (the last prompt token) at the hop and retrieval
layers.  That row is exactly what FastV ranks by (the last token at layer K − 1), and it is one of the
instruction rows PTP's instruction stage reads at layer K, so supervising a layer a selector reads would
train that selector's ranking in.  The supervised layers must therefore lie deeper than every layer a
row of the accuracy report reads (train.py's defaults: 6 and 7 of 12, reports read layers ≤ 5).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from ptp_ros.proxy import Question, SceneObject


class AnswerAttentionTap:
    """Keeps the inputs of one LLM layer's self-attention for the prefix pass and the suffix pass of
    ``bench.proxy.data.answer_logits`` and recomputes, differentiably, the answer row's attention."""

    def __init__(self, language_model: nn.Module, layer: int):
        self.attention = language_model.layers[layer].self_attn
        self.calls: list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = []
        self._handle = self.attention.register_forward_pre_hook(self._keep, with_kwargs=True)
        self._rotary = sys.modules[type(self.attention).__module__].apply_rotary_pos_emb

    def _keep(self, module, args, kwargs) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        self.calls.append((hidden, kwargs["position_embeddings"]))

    def reset(self) -> None:
        self.calls.clear()

    def answer_attention(self, last: torch.Tensor) -> torch.Tensor:
        """[Q, heads, P + S] attention of each question's answer position (suffix index ``last``) over
        the shared prefix and its own suffix (future suffix positions masked)."""
        (hp, (cp, sp)), (hs, (cs, ss)) = self.calls[-2], self.calls[-1]
        attn = self.attention
        hd = attn.head_dim
        q_rows = torch.arange(hs.shape[0])
        q = attn.q_proj(hs[q_rows, last]).view(hs.shape[0], 1, -1, hd).transpose(1, 2)  # [Q, H, 1, hd]
        kp = attn.k_proj(hp).view(1, hp.shape[1], -1, hd).transpose(1, 2)  # [1, KV, P, hd]
        ks = attn.k_proj(hs).view(hs.shape[0], hs.shape[1], -1, hd).transpose(1, 2)  # [Q, KV, S, hd]
        if hasattr(attn, "q_norm"):  # QK-norm (Qwen3): per head, before the rotary
            q, kp, ks = attn.q_norm(q), attn.k_norm(kp), attn.k_norm(ks)
        q, _ = self._rotary(
            q,
            q,
            cs[q_rows if cs.shape[0] > 1 else 0, last][:, None],
            ss[q_rows if ss.shape[0] > 1 else 0, last][:, None],
        )
        kp, _ = self._rotary(kp, kp, cp, sp)
        ks, _ = self._rotary(ks, ks, cs, ss)
        keys = torch.cat([kp.expand(hs.shape[0], -1, -1, -1), ks], dim=2)
        keys = keys.repeat_interleave(q.shape[1] // keys.shape[1], dim=1)
        logits = (q @ keys.transpose(-1, -2))[:, :, 0] * attn.scaling  # [Q, H, P + S]
        future = torch.arange(hs.shape[1])[None, :] > last[:, None]
        mask = torch.cat([torch.zeros(hs.shape[0], hp.shape[1], dtype=torch.bool), future], dim=1)
        return torch.softmax(logits.masked_fill(mask[:, None], float("-inf")), dim=-1)


def retrieval_loss(probs: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of one head's attention rows [Q, K] against wanted distributions [Q, K] (rows that
    sum to 0 are skipped)."""
    rows = wanted.sum(-1) > 0
    if not rows.any():
        return probs.sum() * 0.0
    return -(wanted[rows] * torch.log(probs[rows] + 1e-9)).sum(-1).mean()


#: The supervised heads of the retrieval layer, by question type, and the share of a count head's
#: attention each counted object should draw (the rest stays on the first token, the "sink").
RETRIEVAL_HEAD = {"colour": 0, "location": 0, "count": 1, "presence": 2}
COUNT_SHARE = 0.2


def wanted_attention(
    questions: list[Question],
    objects: list[SceneObject],
    object_index: torch.Tensor,
    position: torch.Tensor,
    suffix_ids: torch.Tensor,
    key_ids: set[int],
    prefix_len: int,
    heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target attention rows of every question's answer position over prefix + padded suffix.

    ``object_index`` [objects, 2] packed index of each object's tile and global token (−1: none);
    ``position`` [packed] the sequence position of each packed token (−1: not shown to the LLM).
    Returns (hop [Q, K]: the question's shape/colour words, for the layer that gathers them;
    retrieval [Q, heads, K]: colour → the named object's tile token, location → its global-view token
    (its tile token in a model without a global view),
    presence → the tile tokens of objects of that colour and shape, or the sink when there are none,
    count → COUNT_SHARE on each counted object's tile token and the rest on the sink).
    Rows whose object is not shown stay zero (no supervision)."""
    q, s = suffix_ids.shape
    k = prefix_len + s
    hop = torch.zeros(q, k)
    retrieval = torch.zeros(q, heads, k)

    def shown(obj: int, column: int) -> int:
        i = int(object_index[obj, column])
        return int(position[i]) if i >= 0 else -1

    for r, question in enumerate(questions):
        words = [prefix_len + t for t, w in enumerate(suffix_ids[r].tolist()) if w in key_ids]
        hop[r, words] = 1.0 / len(words)
        row = retrieval[r, RETRIEVAL_HEAD[question.qtype]]
        if question.qtype in ("colour", "location"):
            # location reads the global view, where a model has one (else the object's own token)
            at = shown(question.targets[0], 0)
            if question.qtype == "location" and int(object_index[question.targets[0], 1]) >= 0:
                at = shown(question.targets[0], 1)
            if at >= 0:
                row[at] = 1.0
            continue
        if question.qtype == "presence":
            said = question.text.split()
            matches = [j for j in question.targets if objects[j].colour in said]
            at = [p for p in (shown(j, 0) for j in matches) if p >= 0]
            if at:
                row[at] = 1.0 / len(at)
            else:
                row[0] = 1.0
            continue
        at = [p for p in (shown(j, 0) for j in question.targets) if p >= 0]
        row[0] = 1.0 - COUNT_SHARE * len(at)
        row[at] = COUNT_SHARE
    return hop, retrieval
