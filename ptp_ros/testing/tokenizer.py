"""Offline word-level tokenizers for the models this project builds itself (no hub downloads)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from . import BASE_WORDS, SPECIAL_TOKENS

__all__ = ["BASE_WORDS", "SPECIAL_TOKENS", "build_word_tokenizer", "tokenizer_from_vocab"]


def build_word_tokenizer(
    words: Iterable[str] = BASE_WORDS, model_max_length: int = 8192, extra_special: Mapping[str, str] | None = None
) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer whose ids are: the special tokens, ``extra_special``'s tokens, then
    ``words`` in order.

    ``extra_special`` maps attribute names to tokens a model's processor reads from its tokenizer
    (InternVL: ``{"start_image_token": "<img>", ...}``); each becomes ``tok.<name>`` / ``tok.<name>_id``.
    """
    extra = dict(extra_special or {})
    vocab: dict[str, int] = {}
    for token in [*SPECIAL_TOKENS, *extra.values(), *words]:
        vocab.setdefault(token, len(vocab))
    return tokenizer_from_vocab(
        vocab, {"image_token": "<image>", **extra}, ["<image>", *extra.values()], model_max_length
    )


def tokenizer_from_vocab(
    vocab: Mapping[str, int],
    attributes: Mapping[str, str],
    special: Iterable[str],
    model_max_length: int = 8192,
) -> PreTrainedTokenizerFast:
    """The lower-casing word-level tokenizer over ``vocab`` (token → id, holding ``SPECIAL_TOKENS``) with
    ``special`` as special tokens; ``attributes`` name some of them as ``tok.<name>`` / ``tok.<name>_id``."""
    core = Tokenizer(models.WordLevel(vocab=dict(vocab), unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Split("<image>", "isolated")]
    )
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=model_max_length,
        extra_special_tokens=dict(attributes),
    )
    tok.add_special_tokens({"additional_special_tokens": list(special)})
    return tok
