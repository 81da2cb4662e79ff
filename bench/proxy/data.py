"""Scenes → model tensors for training and evaluation, sharing one image encode across its questions.

A prompt is "USER: <image>\\n{question} ASSISTANT:"; everything up to the last image token (the
*prefix*) is the same for every question about an image, so a causal LM computes it once and each
question only adds its few *suffix* tokens on top of the cached prefix.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from ptp_ros.proxy import Question, Scene


@dataclass
class EncodedScene:
    """One scene after the processor, with its questions tokenized as prefix-sharing suffixes."""

    pixel_values: torch.Tensor  # [1, tiles, 3, 336, 336]
    image_sizes: torch.Tensor  # [1, 2]
    prefix_ids: torch.Tensor  # [P] text ids before the image tokens
    suffix_ids: list[torch.Tensor]  # per question: ids after the image tokens
    answer_ids: torch.Tensor  # [Q] the single answer token of each question
    questions: list[Question]
    scene: Scene | None = None


def prompt_parts(processor, question: str) -> tuple[str, str]:
    """The chat prompt split around its image placeholder: (before, after)."""
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    before, after = prompt.split(processor.tokenizer.image_token, 1)
    return before, after


def answer_token(tokenizer, answer: str) -> int:
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"answer {answer!r} is not one known word of the tokenizer")
    return ids[0]


def encode_scene(processor, scene: Scene, questions: list[Question], keep_scene: bool = False) -> EncodedScene:
    images = processor.image_processor(images=Image.fromarray(scene.image), return_tensors="pt")
    tok = processor.tokenizer
    before, _ = prompt_parts(processor, questions[0].text if questions else "")
    prefix = tok(before, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    suffixes = [tok(prompt_parts(processor, q.text)[1], add_special_tokens=False, return_tensors="pt")["input_ids"][0]
                for q in questions]
    answers = torch.tensor([answer_token(tok, q.answer) for q in questions], dtype=torch.long)
    return EncodedScene(images["pixel_values"], images["image_sizes"], prefix, suffixes, answers, questions,
                        scene if keep_scene else None)


def pad_suffixes(suffixes: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [Q, L] ids and the index of each row's last real token (causal: padding after it
    never influences it)."""
    length = max(int(s.shape[0]) for s in suffixes)
    ids = torch.full((len(suffixes), length), pad_id, dtype=torch.long)
    for i, s in enumerate(suffixes):
        ids[i, : s.shape[0]] = s
    return ids, torch.tensor([int(s.shape[0]) - 1 for s in suffixes])


def answer_logits(model, prefix_embeds: torch.Tensor, suffix_ids: list[torch.Tensor], pad_id: int) -> torch.Tensor:
    """[Q, vocab] next-token logits after each question, from one prefix pass shared by all of them.

    ``prefix_embeds`` is [B, P, D] with B = 1 (shared by every question) or B = Q (one per question).
    """
    lm = model.model.language_model
    ids, last = pad_suffixes(suffix_ids, pad_id)
    q = ids.shape[0]
    out = lm(inputs_embeds=prefix_embeds, use_cache=True)
    cache = out.past_key_values
    if prefix_embeds.shape[0] == 1 and q > 1:
        cache.batch_repeat_interleave(q)
    hidden = lm(inputs_embeds=model.get_input_embeddings()(ids), past_key_values=cache).last_hidden_state
    return model.lm_head(hidden[torch.arange(q), last])


def prefix_embeddings(model, prefix_ids: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """[P + N, D]: the text before the image, then the visual tokens in the LLM's order."""
    return torch.cat([model.get_input_embeddings()(prefix_ids), visual.to(model.dtype)], dim=0)
