"""The ``ptp_frames`` lmms-eval task: ``ptp-eval --data``'s JSONL frames, its loader and its answer matching.

lmms-eval imports this file by path (``!function utils.X`` in ptp_frames.yaml), not as a package.
"""

from __future__ import annotations

import os
from pathlib import Path

import datasets
from lmms_eval.api.task import ConfigurableTask
from loguru import logger
from PIL import Image

from ptp_ros_bench.accuracy.dataset import DataError, load_items, read_image
from ptp_ros_bench.accuracy.matching import MATCHERS, matches

DATA_ENV = "PTP_FRAMES_DATA"
MATCH_ENV = "PTP_FRAMES_MATCH"
#: the proxy frames shipped with the repository (4 scenes, 28 questions), when no data file is named
BUNDLED = Path(__file__).resolve().parents[2] / "data" / "frames" / "data.jsonl"


class FramesTaskError(ValueError):
    """A data file, image, prompt or matching rule the task cannot use: one line."""


def data_file(dataset_kwargs: dict | None) -> Path:
    """The JSONL file: the task YAML's ``dataset_kwargs.data_files`` (lmms-eval made it absolute), else
    ``$PTP_FRAMES_DATA``, else the bundled frames."""
    files = (dataset_kwargs or {}).get("data_files")
    if isinstance(files, dict):
        files = files.get("test", next(iter(files.values()), None))
    if isinstance(files, (list, tuple)):
        if len(files) != 1:
            raise FramesTaskError(f"ptp_frames: data_files must name one JSONL file, got {files!r}")
        files = files[0]
    path = files or os.environ.get(DATA_ENV)
    if not path:
        logger.warning(
            f"ptp_frames: neither data_files nor {DATA_ENV} names a data file: the bundled proxy frames {BUNDLED}"
        )
        return BUNDLED
    return Path(path).expanduser()


def match_rule() -> str:
    rule = os.environ.get(MATCH_ENV, "normalised")
    if rule not in MATCHERS:
        raise FramesTaskError(f"ptp_frames: {MATCH_ENV}={rule!r}; use one of {', '.join(MATCHERS)}")
    return rule


def frames_dataset(dataset_kwargs: dict | None = None, split: str = "test") -> datasets.DatasetDict:
    """The items of the data file as one in-memory split (image paths made absolute), or one
    ``FramesTaskError`` line (an unknown PTP_FRAMES_MATCH, or what ``load_items`` refuses)."""
    match_rule()  # a bad rule fails here, before any model runs
    try:
        items = load_items(data_file(dataset_kwargs))
    except DataError as exc:
        raise FramesTaskError(f"ptp_frames: {exc}") from None
    rows = [
        {
            "id": item.id,
            "image": str(item.image),
            "question": item.question,
            "answers": list(item.answers),
            "type": item.qtype,
        }
        for item in items
    ]
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


class FramesTask(ConfigurableTask):
    """A ConfigurableTask whose documents come from ``frames_dataset``: nothing goes through the HF cache."""

    def __init__(self, config: dict | None = None, **kwargs):
        config = {k: v for k, v in (config or {}).items() if k != "class"}
        prompt = ((config.get("lmms_eval_specific_kwargs") or {}).get("default") or {}).get("prompt", "{question}")
        check_prompt(prompt)  # before the data and the model's first answer
        super().__init__(config=config, **kwargs)

    def download(self, dataset_kwargs=None) -> None:
        self.dataset = frames_dataset(dataset_kwargs, self.config.test_split or "test")
        self.dataset_no_image = self.dataset


def check_prompt(prompt: object) -> str:
    """A template of ``{question}``, as ``ptp-eval --data --prompt`` takes."""
    try:
        if not isinstance(prompt, str) or "{question}" not in prompt:
            raise ValueError("it does not contain {question}")
        prompt.format(question="q")
    except (ValueError, IndexError, KeyError) as exc:
        raise FramesTaskError(f"ptp_frames: prompt {prompt!r} is not a template of {{question}}: {exc}") from None
    return prompt


def doc_to_visual(doc: dict) -> list:
    """The frame decoded as ptp-eval --data decodes it (OpenCV), so both read the same pixels."""
    try:
        return [Image.fromarray(read_image(Path(doc["image"])))]
    except DataError as exc:
        raise FramesTaskError(f"ptp_frames: {exc}") from None


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return (lmms_eval_specific_kwargs or {}).get("prompt", "{question}").format(question=doc["question"])


def doc_to_target(doc: dict) -> str:
    return " | ".join(doc["answers"])


def process_results(doc: dict, results: list) -> dict:
    prediction = results[0] if results else ""
    return {"accuracy": float(matches(prediction, list(doc["answers"]), match_rule()))}
