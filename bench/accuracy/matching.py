"""Whether a generated answer matches a question's reference answers, the way VQA evaluations decide it.

Three rules (``MATCHERS``), each applied against every reference answer; a prediction scores 1 when it
matches any of them:

* ``exact``: the strings equal after stripping surrounding whitespace;
* ``normalised`` (default): both sides lower-cased, punctuation removed (a decimal point between digits
  stays), number words → digits, articles (a, an, the) dropped and whitespace collapsed — the
  normalisation of the VQAv2 evaluation script, minus its contraction table;
* ``contains``: the normalised reference occurs in the normalised prediction as whole words (for models
  that answer in a sentence, "the circle is red" for "red").
"""

from __future__ import annotations

import re

MATCHERS = ("exact", "normalised", "contains")

_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = re.compile(r"(?!(?<=\d)\.(?=\d))[^\w\s]")


def normalise(text: str) -> str:
    """VQA-style normalisation: lower case, no punctuation, digits for number words, no articles."""
    words = _PUNCTUATION.sub(" ", text.lower()).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


def matches(prediction: str, answers: list[str], rule: str = "normalised") -> bool:
    """Whether ``prediction`` matches one of ``answers`` under ``rule`` (one of ``MATCHERS``)."""
    if rule == "exact":
        return prediction.strip() in {a.strip() for a in answers}
    if rule not in MATCHERS:
        raise ValueError(f"unknown answer matching {rule!r}; use one of {', '.join(MATCHERS)}")
    said = normalise(prediction)
    if rule == "normalised":
        return said in {normalise(a) for a in answers}
    padded = f" {said} "
    return any(ref and f" {ref} " in padded for ref in map(normalise, answers))
