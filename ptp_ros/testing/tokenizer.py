"""Offline word-level tokenizers for the models this project builds itself (no hub downloads)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from . import BASE_WORDS, SPECIAL_TOKENS

__all__ = ["BASE_WORDS", "SPECIAL_TOKENS", "build_word_tokenizer"]


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
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
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
        extra_special_tokens={"image_token": "<image>", **extra},
    )
    tok.add_special_tokens({"additional_special_tokens": ["<image>", *extra.values()]})
    return tok
