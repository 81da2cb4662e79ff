"""``ptp-eval --data``: every method × keep ratio on a user's labelled frames, through the library's own
``Pipeline.answer`` (the path the node and ``ptp-ask`` run), with per-cell latency on the chosen device.

A real 7B evaluation takes hours, so every answer is appended to ``OUT/cache.jsonl`` as soon as it exists
(one line per item × cell, flushed): a rerun with the same model, device, dtype and generation length skips
what is already there and scores only the rest.  Answers are stored as text and matched when the report is
built, so changing ``--match`` needs no rerun.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ptp_ros.pipeline import Pipeline
from ptp_ros.pruning import resolve_budget
from ptp_ros.vlm.stock_adapter import StockModelAdapter

from ..rows import Row
from .dataset import Item, read_image
from .matching import matches
from .methods import adapter_variant
from .runner import DOWNSCALED, FULL, Results

FULL_KEY = ("all tokens",)
DOWNSCALED_KEY = ("max_pixels",)


@dataclass(frozen=True)
class Cell:
    """One row × keep ratio: what is run (``key``, the cache's identity) and how it is labelled."""

    label: str
    ratio: float
    key: tuple


class AnswerCache:
    """``cache.jsonl``: one scored answer a line, keyed by run settings, cell and item content."""

    def __init__(self, path: Path, settings: dict):
        self.path = path
        self.settings = json.dumps(settings, sort_keys=True)
        self.entries: dict[tuple[str, str], dict] = {}
        if path.is_file():
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                try:
                    entry = json.loads(line)
                    if entry["settings"] == self.settings:
                        self.entries[(entry["cell"], entry["item"])] = entry
                except (ValueError, KeyError, TypeError):  # a line cut by an interrupted run: scored anew
                    print(f"[ptp-eval] {path}:{number}: unreadable cache line skipped", file=sys.stderr)
        self._file = None

    @staticmethod
    def cell_id(cell: Cell) -> str:
        return json.dumps([repr(cell.key), cell.ratio])

    def get(self, cell: Cell, item: Item) -> dict | None:
        entry = self.entries.get((self.cell_id(cell), item.id))
        return entry if entry is not None and entry.get("fingerprint") == item.fingerprint else None

    def put(self, cell: Cell, item: Item, record: dict) -> dict:
        entry = {
            "settings": self.settings,
            "cell": self.cell_id(cell),
            "item": item.id,
            "fingerprint": item.fingerprint,
            "label": cell.label,
            **record,
        }
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
            if self._file.tell() and _last_byte(self.path) != b"\n":
                self._file.write("\n")  # after a line cut by an interrupted run, start a fresh one
        self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._file.flush()
        self.entries[(entry["cell"], item.id)] = entry
        return entry

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _last_byte(path: Path) -> bytes:
    with path.open("rb") as handle:
        handle.seek(-1, 2)
        return handle.read(1)


class DataEvaluator:
    """Answers each item in every cell with ``Pipeline.answer`` and fills ``Results`` (plus the answers).

    Rows: all tokens, each method at each ratio < 1 and, for a model whose processor takes any resolution
    (Qwen2.5-VL), the whole frame re-read at the resolution that yields the ratio's token count."""

    def __init__(
        self,
        adapter: StockModelAdapter,
        methods: list[Row],
        ratios: Iterable[float],
        cache: AnswerCache,
        max_new_tokens: int,
        rule: str,
        prompt: str = "{question}",
    ):
        self.adapter, self.methods, self.cache = adapter, methods, cache
        self.ratios = tuple(r for r in ratios if r < 1.0)
        self.max_new_tokens, self.rule, self.prompt = max_new_tokens, rule, prompt
        self.downscales = adapter.supports_downscaling
        self._pipelines: dict[tuple, Pipeline] = {}
        self.answers: list[dict] = []

    def cells(self) -> list[Cell]:
        out = [Cell(FULL, 1.0, FULL_KEY)]
        for ratio in self.ratios:
            out += [Cell(m.label, ratio, m.key()) for m in self.methods]
            if self.downscales:
                out.append(Cell(DOWNSCALED, ratio, DOWNSCALED_KEY))
        return out

    def pipeline(self, method: Row | None) -> Pipeline:
        """The method's pipeline (``None``: the unpruned one), built once."""
        method = method or Row(FULL, None)
        key = FULL_KEY if method.selector is None else method.key()
        if key not in self._pipelines:
            adapter = adapter_variant(self.adapter, method.adapter)
            self._pipelines[key] = Pipeline(adapter, method.pipeline_config(self.max_new_tokens))
        return self._pipelines[key]

    def run(self, items: list[Item], results: Results, progress: Callable[[int, int, int], None]) -> int:
        """Scores every item in every cell; returns how many answers were computed (not from the cache)."""
        by_label = {m.label: m for m in self.methods}
        cells = self.cells()
        fresh = 0
        for index, item in enumerate(items):
            image = None
            entries = {}
            for cell in cells:
                entry = self.cache.get(cell, item)
                if entry is None:
                    image = read_image(item.image) if image is None else image
                    entry = self.cache.put(cell, item, self._answer(image, item, cell, by_label, entries))
                    fresh += 1
                entries[cell] = entry
            self._record(item, entries, results)
            progress(index + 1, len(items), fresh)
        return fresh

    def _answer(self, image, item: Item, cell: Cell, by_label: dict[str, Row], done: dict) -> dict:
        instruction = self.prompt.format(question=item.question)
        if cell.key == FULL_KEY:
            answer = self.pipeline(None).answer(image, instruction, keep_ratio=1.0)
        elif cell.key == DOWNSCALED_KEY:
            total = done[Cell(FULL, 1.0, FULL_KEY)]["total"]
            small = self.adapter.downscaled(resolve_budget(total, keep_ratio=cell.ratio), image.shape[:2])
            answer = Pipeline(small, self.pipeline(None).config).answer(image, instruction, keep_ratio=1.0)
        else:
            answer = self.pipeline(by_label[cell.label]).answer(image, instruction, keep_ratio=cell.ratio)
        return {
            "prediction": answer.text,
            "kept": answer.selection.num_kept,
            "total": answer.selection.total,
            "region_sizes": answer.visual.scores.region_sizes().tolist(),
            "prompt_tokens": answer.prompt_tokens,
            "new_tokens": answer.new_tokens,
            "timings_ms": {k: round(v, 3) for k, v in answer.timings_ms.items()},
        }

    def _record(self, item: Item, entries: dict[Cell, dict], results: Results) -> None:
        full = entries[Cell(FULL, 1.0, FULL_KEY)]
        visual = full["total"]
        for cell, entry in entries.items():
            key = (cell.label, cell.ratio)
            correct = matches(entry["prediction"], list(item.answers), self.rule)
            results.correct[key].append(int(correct))
            results.recall[key].append(float("nan"))  # no object boxes in user data
            results.kept_ratio[key].append(entry["kept"] / visual)
            results.latency_ms[key].append(entry["timings_ms"])
            self.answers.append(
                {
                    "item": item.id,
                    "row": cell.label,
                    "keep_ratio": cell.ratio,
                    "prediction": entry["prediction"],
                    "answers": list(item.answers),
                    "correct": correct,
                    "kept": entry["kept"],
                }
            )
        results.qtypes.append(item.qtype)
        results.scenes.append(str(item.image))  # counted as distinct images
        results.text_tokens.append(full["prompt_tokens"] - visual)
        results.visual_tokens.append(visual)
        results.region_sizes.append(full.get("region_sizes", []))  # absent from answers cached before


def progress_printer(every_s: float = 10.0) -> Callable[[int, int, int], None]:
    """Prints items done, elapsed time and an estimate of the rest to stderr, at most every ``every_s``."""
    start = last = time.perf_counter()

    def show(done: int, total: int, fresh: int) -> None:
        nonlocal last
        now = time.perf_counter()
        if now - last < every_s and done != total:
            return
        last = now
        rest = (now - start) / done * (total - done)
        print(
            f"[ptp-eval] {done}/{total} items ({fresh} answers computed, the rest cached), {now - start:.0f} s, "
            f"about {rest:.0f} s left",
            file=sys.stderr,
            flush=True,
        )

    return show
