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
from ptp_ros.vlm.stock_adapter import placeholder_positions


@dataclass
class EncodedScene:
    """One scene after the processor, with its questions tokenized as prefix-sharing suffixes."""

    inputs: dict  # the processor's tensors for the first question's prompt (ids, pixels, grid)
    prefix_ids: torch.Tensor  # [P] text ids before the image tokens
    suffix_ids: list[torch.Tensor]  # per question: ids after the image tokens
    answer_ids: torch.Tensor  # [Q] the single answer token of each question
    questions: list[Question]
    scene: Scene | None = None

    @property
    def pixel_inputs(self) -> dict:
        """What the model's ``get_image_features`` takes (LLaVA-NeXT: sizes; Qwen2.5-VL: the patch grid)."""
        return {k: self.inputs[k] for k in ("pixel_values", "image_sizes", "image_grid_thw") if k in self.inputs}


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


def question_suffix(processor, question: str) -> torch.Tensor:
    """[S] ids of the prompt after the image tokens."""
    return processor.tokenizer(prompt_parts(processor, question)[1], add_special_tokens=False, return_tensors="pt")[
        "input_ids"
    ][0]


def encode_scene(
    processor, scene: Scene, questions: list[Question], keep_scene: bool = False, **processor_kwargs
) -> EncodedScene:
    """The processor's own tensors for the first question's prompt (``processor_kwargs``: e.g. a
    resolution), then every question's suffix on the shared prefix."""
    before, after = prompt_parts(processor, questions[0].text if questions else "")
    inputs = processor(
        images=Image.fromarray(scene.image),
        text=before + processor.tokenizer.image_token + after,
        return_tensors="pt",
        **processor_kwargs,
    )
    ids = inputs["input_ids"][0]
    first = int(placeholder_positions(inputs["input_ids"], processor.tokenizer.image_token_id)[0])
    suffixes = [question_suffix(processor, q.text) for q in questions]
    answers = torch.tensor([answer_token(processor.tokenizer, q.answer) for q in questions], dtype=torch.long)
    return EncodedScene(dict(inputs), ids[:first], suffixes, answers, questions, scene if keep_scene else None)


def kept_positions(
    full: torch.Tensor | None, prefix_len: int, num_visual: int, kept: torch.Tensor
) -> tuple[torch.Tensor, int] | None:
    """LLM positions of the prefix text plus the ``kept`` visual tokens, [3, 1, P + K], and the position
    the suffix starts at, for a model with 3-D M-RoPE (``full`` [3, 1, L] of the whole prompt: a kept
    token keeps its original position, as the Qwen2.5-VL adapter feeds it).  ``None`` for a model with
    1-D positions: its pruned sequence is simply renumbered."""
    if full is None:
        return None
    index = torch.cat([torch.arange(prefix_len), prefix_len + kept.cpu()])
    return full[:, :, index], int(full[0, 0, prefix_len + num_visual])


def pad_suffixes(suffixes: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [Q, L] ids and the index of each row's last real token (causal: padding after it
    never influences it)."""
    length = max(int(s.shape[0]) for s in suffixes)
    ids = torch.full((len(suffixes), length), pad_id, dtype=torch.long)
    for i, s in enumerate(suffixes):
        ids[i, : s.shape[0]] = s
    return ids, torch.tensor([int(s.shape[0]) - 1 for s in suffixes])


def answer_logits(
    model,
    prefix_embeds: torch.Tensor,
    suffix_ids: list[torch.Tensor],
    pad_id: int,
    positions: tuple[torch.Tensor, int] | None = None,
    last_two: bool = False,
    visual_inputs: dict | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """[Q, vocab] next-token logits after each question, from one prefix pass shared by all of them.

    ``prefix_embeds`` is [B, P, D] with B = 1 (shared by every question) or B = Q (one per question);
    ``positions`` (from ``kept_positions``, its tensor [3, B, P]) for a model with 3-D positions;
    ``last_two``: the suffixes end with the answer word, and the logits before and after it are returned
    (the answer's and the end-of-answer's); ``visual_inputs``: what else of the visual tokens the prefix pass
    takes (``deepstack_prefix_inputs``).
    """
    lm = model.model.language_model
    ids, last = pad_suffixes(suffix_ids, pad_id)
    q, s = ids.shape
    prefix_pos = suffix_pos = None
    if positions is not None:
        prefix_pos, start = positions
        suffix_pos = (start + torch.arange(s)).view(1, 1, s).expand(prefix_pos.shape[0], q, s)
    out = lm(inputs_embeds=prefix_embeds, position_ids=prefix_pos, use_cache=True, **(visual_inputs or {}))
    cache = out.past_key_values
    if prefix_embeds.shape[0] == 1 and q > 1:
        cache.batch_repeat_interleave(q)
    hidden = lm(
        inputs_embeds=model.get_input_embeddings()(ids), position_ids=suffix_pos, past_key_values=cache
    ).last_hidden_state
    rows = torch.arange(q)
    if last_two:
        return model.lm_head(hidden[rows, last - 1]), model.lm_head(hidden[rows, last])
    return model.lm_head(hidden[rows, last])


def prefix_embeddings(model, prefix_ids: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """[P + N, D]: the text before the image, then the visual tokens in the LLM's order."""
    return torch.cat([model.get_input_embeddings()(prefix_ids), visual.to(model.dtype)], dim=0)


def deepstack_prefix_inputs(levels: list[torch.Tensor], prefix_len: int, kept_sets: list[torch.Tensor]) -> dict:
    """The decoder's DeepStack arguments (Qwen3-VL) for the prefixes [text (``prefix_len``), visual tokens
    ``kept``], one per kept set as ``prefix_embeddings`` stacks them: each level's rows of the kept tokens at
    their positions, as the model's own forward adds them; ``{}`` for a model without DeepStack (no levels)."""
    if not levels:
        return {}
    mask = torch.zeros(len(kept_sets), prefix_len + len(kept_sets[0]), dtype=torch.bool)
    mask[:, prefix_len:] = True
    return {
        "visual_pos_masks": mask,
        "deepstack_visual_embeds": [torch.cat([level[kept] for kept in kept_sets]) for level in levels],
    }
