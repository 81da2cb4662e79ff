"""A user's labelled frames for ``ptp-eval --data``: one JSON object a line.

    {"image": "frames/dock_0001.jpg", "question": "is the door open ?", "answers": ["yes"], "id": "d1", "type": "door"}

``image`` is a path relative to the JSONL file; ``question`` a non-empty string; ``answers`` a non-empty list of
strings (any one of them counts as right); ``id`` (default: the line number) and ``type`` (default: "all") are
optional.  Every fault is reported as one ``DataError`` line naming the file and line, before any model runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import cv2
import numpy as np


class DataError(ValueError):
    """A data file the evaluation cannot use; the message names the file and line."""


@dataclass(frozen=True)
class Item:
    id: str
    image: Path
    question: str
    answers: tuple[str, ...]
    qtype: str = "all"

    @cached_property
    def fingerprint(self) -> str:
        """What identifies the item's content in the results cache: an edited question, answer list or image
        file gets scored anew (read once per run, not once per cell)."""
        stat = self.image.stat()
        text = json.dumps([self.id, str(self.image), stat.st_size, stat.st_mtime_ns, self.question, self.answers])
        return hashlib.sha1(text.encode()).hexdigest()[:16]


def load_items(path: str | Path) -> list[Item]:
    """The items of a JSONL file, checked line by line (blank lines are skipped)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc
    items: list[Item] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{where}: not a JSON object: {exc}") from exc
        if not isinstance(record, dict):
            raise DataError(f"{where}: not a JSON object but {type(record).__name__}")
        image, question, answers = record.get("image"), record.get("question"), record.get("answers")
        if not isinstance(image, str) or not image:
            raise DataError(f"{where}: 'image' must be a path string")
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{where}: 'question' must be a non-empty string")
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise DataError(f"{where}: 'answers' must be a non-empty list of strings")
        item_id = str(record.get("id", number))
        if item_id in seen:
            raise DataError(f"{where}: id {item_id!r} repeats line {seen[item_id]}")
        seen[item_id] = number
        file = (path.parent / image).resolve()
        if not file.is_file():
            raise DataError(f"{where}: image {image!r} not found (looked for {file})")
        items.append(Item(item_id, file, question.strip(), tuple(answers), str(record.get("type", "all"))))
    if not items:
        raise DataError(f"{path}: no items")
    return items


def read_image(file: Path) -> np.ndarray:
    """The frame as RGB uint8 [H, W, 3], or a ``DataError`` naming the file."""
    image = cv2.imread(str(file), cv2.IMREAD_COLOR)
    if image is None:
        raise DataError(f"{file}: not an image OpenCV can read")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
