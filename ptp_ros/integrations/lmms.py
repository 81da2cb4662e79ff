"""``lmms-eval --model ptp_ros``: any lmms-eval task answered through ``ptp_ros.Pipeline``, with pruning.

    lmms-eval --model ptp_ros \\
        --model_args pretrained=llava-hf/llava-v1.6-vicuna-7b-hf,selector=ptp,keep_ratio=0.111 \\
        --tasks pope,textvqa_val --output_path out/ --log_samples

lmms-eval finds the class through the ``lmms_eval.models`` entry point (``lmms_manifest.py``, registered
by setup.py).  Install with ``bash bench/lmms/install.sh``.  Importing ``ptp_ros`` never imports this
module; this module imports lmms-eval.

model_args (``key=value`` separated by commas):

* ``pretrained``: checkpoint directory or a repo id already in the local HF cache (LLaVA-NeXT, InternVL in
  HF format, Qwen2.5-VL; default: the built-in proxy model); never downloaded.
* ``selector`` (default ``ptp``): any name of ``ptp_ros.pruning.selector_names()``.
* ``keep_ratio`` in (0, 1] (default 0.111, ``ptp-ask``'s: the ratio PTP's defaults were chosen at; 1: unpruned)
  or ``tokens`` (a count); not both.
* ``alpha`` (PTP's weight of instruction relevance), ``prune_in_llm`` (true/false),
  ``probe_candidates``: as ``ptp-ask``'s flags.
* ``device`` (auto | cpu | cuda | cuda:N), ``dtype`` (auto | float32 | float16 | bfloat16).
* ``max_new_tokens`` (default 16): the most an answer may take when the task's ``generation_kwargs`` name
  none; the model's end-of-sequence token (its generation_config's) ends it sooner.
* ``max_instruction_chars`` (default 8000): the longest prompt accepted (benchmarks with long contexts).
* ``stats_file``: a JSONL file that gets one line per answer (task, doc_id, answer, kept / total visual
  tokens, keep ratio, prompt tokens, timings per stage in ms).
* ``skip_unsupported`` (default false): answer "" (scored as the task scores an empty answer) to a
  document that is not exactly one image, with one warning and a count in the summary, instead of
  stopping the run: e.g. SEED-Bench, whose video questions come as 8 frames (its ``seed_image`` score
  stays exact, ``seed_video`` and ``seed_all`` do not).

What it reports besides the scores: every answer's kept and total visual tokens and its timings per stage
go into the per-sample ``token_counts`` of ``--log_samples`` (with lmms-eval's ``input_tokens`` /
``output_tokens``), their means into the results JSON's ``throughput`` block (``avg_keep_ratio``,
``avg_visual_tokens_kept``, ``avg_prefill_ms``, ...) and into one summary line in the log.

Limits: one image per request (a multi-image, video or text-only document is refused with one line
naming the task and document, or skipped with ``skip_unsupported=true``); greedy decoding (temperature,
sampling and beams in ``generation_kwargs`` are ignored, with one warning); ``until`` stop strings cut the
answer after generation; one process (no multi-GPU data parallelism); no ``loglikelihood`` (multiple
choice by likelihood) and no multi-round generation.  A bad model_arg or a model that does not load ends
the run at construction with one line (``ptp_ros: ...``), before any task runs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms
from loguru import logger as eval_logger

__all__ = ["PTPRos", "PTPRosError", "PruningCounts"]

KNOWN_ARGS = (
    "pretrained",
    "selector",
    "keep_ratio",
    "tokens",
    "alpha",
    "prune_in_llm",
    "probe_candidates",
    "device",
    "dtype",
    "max_new_tokens",
    "max_instruction_chars",
    "stats_file",
    "skip_unsupported",
    "batch_size",
    "max_batch_size",
)


class PTPRosError(ValueError):
    """A bad model_arg, a model that does not load or a request the plugin cannot answer: one line."""

    def __init__(self, message: str):
        super().__init__("ptp_ros: " + " ".join(str(message).split()))


@dataclass
class PruningCounts(TokenCounts):
    """lmms-eval's per-request token counts plus what pruning kept and what each stage took; ``to_dict``
    is what ``--log_samples`` writes under ``token_counts``."""

    visual_tokens_kept: int | None = None
    visual_tokens_total: int | None = None
    keep_ratio: float | None = None
    latency_ms: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            **super().to_dict(),
            "visual_tokens_kept": self.visual_tokens_kept,
            "visual_tokens_total": self.visual_tokens_total,
            "keep_ratio": self.keep_ratio,
            "latency_ms": dict(self.latency_ms),
        }


def _number(name: str, value, kind=float):
    if isinstance(value, bool) or value is None:
        raise PTPRosError(f"{name} must be a number, got {value!r}")
    try:
        number = kind(value) if kind is float else int(str(value))
    except (TypeError, ValueError):
        raise PTPRosError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None
    if kind is float and not math.isfinite(number):
        raise PTPRosError(f"{name} must be finite, got {value!r}")
    return number


def _positive_int(name: str, value) -> int:
    number = _number(name, value, int)
    if number < 1:
        raise PTPRosError(f"{name} must be >= 1, got {value!r}")
    return number


def _flag(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise PTPRosError(f"{name} must be true or false, got {value!r}")


def _image(visuals, where: str):
    """The request's one image as RGB uint8 [H, W, 3]."""
    import numpy as np

    if not isinstance(visuals, (list, tuple)):
        visuals = [visuals]
    flat = []
    for visual in visuals:
        flat.extend(visual if isinstance(visual, (list, tuple)) else [visual])
    flat = [visual for visual in flat if visual is not None]
    if len(flat) != 1:
        what = "no image (a text-only document)" if not flat else f"{len(flat)} images or frames"
        raise PTPRosError(f"{where} has {what}; ptp_ros answers about exactly one image per request")
    (visual,) = flat
    if isinstance(visual, np.ndarray):
        return visual
    if isinstance(visual, (str, Path)):
        raise PTPRosError(
            f"{where} gives a file path ({str(visual)!r}, e.g. a video); ptp_ros answers about "
            "one decoded image per request"
        )
    from PIL import Image

    if isinstance(visual, Image.Image):
        return np.array(visual.convert("RGB"), dtype=np.uint8)
    raise PTPRosError(
        f"{where} gives a {type(visual).__name__}, not an image; ptp_ros answers about one image per request"
    )


def _cut_at(text: str, until) -> str:
    """The answer up to the first stop string (lmms-eval's ``until``), as lmms-eval's own models do."""
    if isinstance(until, str):
        until = [until]
    for stop in until or []:
        if isinstance(stop, str) and stop:
            text = text.split(stop)[0]
    return text


class PTPRos(lmms):
    """lmms-eval model: each ``generate_until`` request is one ``Pipeline.answer`` (batch size 1)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        selector: str = "ptp",
        keep_ratio=None,
        tokens=None,
        alpha=None,
        prune_in_llm=None,
        probe_candidates=None,
        device: str = "auto",
        dtype: str = "auto",
        max_new_tokens=16,
        max_instruction_chars=8000,
        stats_file: str | None = None,
        skip_unsupported=False,
        batch_size=1,
        max_batch_size=None,
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            raise PTPRosError(f"unknown model_args {', '.join(sorted(unknown))}; known: {', '.join(KNOWN_ARGS)}")
        from ptp_ros.budget import DEFAULT_KEEP_RATIO
        from ptp_ros.pipeline import InvalidRequest, Pipeline, PipelineConfig, budget_request
        from ptp_ros.pruning import ConfiguredSelector
        from ptp_ros.vlm.defaults import default_model_path
        from ptp_ros.vlm.loading import LoadOptions, ModelLoadError, load_adapter, quiet_transformers

        if keep_ratio is not None and tokens is not None:
            raise PTPRosError("give keep_ratio or tokens, not both")
        if keep_ratio is None and tokens is None:
            keep_ratio = DEFAULT_KEEP_RATIO
        try:  # the library's own check of a budget
            self.keep_ratio, self.tokens = budget_request(
                None if keep_ratio is None else _number("keep_ratio", keep_ratio),
                None if tokens is None else _number("tokens", tokens),
            )
        except InvalidRequest as exc:
            raise PTPRosError(str(exc)) from None
        self.max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
        self.skip_unsupported = _flag("skip_unsupported", skip_unsupported)
        if str(batch_size).strip() not in ("1", "auto") and not str(batch_size).startswith("auto"):
            eval_logger.warning(f"ptp_ros answers one request at a time: batch_size={batch_size} is ignored")
        try:  # only the options given: the configured selector refuses one its selector does not take
            stage = {}
            if prune_in_llm is not None:
                stage["prune_in_llm"] = _flag("prune_in_llm", prune_in_llm)
            if probe_candidates is not None:
                stage["probe_candidates"] = _number("probe_candidates", probe_candidates)
            options = {} if alpha is None else {"alpha": _number("alpha", alpha)}
            self.config = PipelineConfig(
                selector=ConfiguredSelector(str(selector), options, **stage),
                max_new_tokens=self.max_new_tokens,
                max_instruction_chars=_positive_int("max_instruction_chars", max_instruction_chars),
            )
        except PTPRosError:
            raise
        except (TypeError, ValueError) as exc:
            raise PTPRosError(str(exc)) from None
        self.stats_path = None if stats_file in (None, "") else Path(str(stats_file)).expanduser()
        if self.stats_path is not None:
            try:
                self.stats_path.parent.mkdir(parents=True, exist_ok=True)
                self.stats_path.open("w", encoding="utf-8").close()
            except OSError as exc:
                raise PTPRosError(f"cannot write stats_file {self.stats_path}: {exc.strerror or exc}") from None

        quiet_transformers()
        model = default_model_path() if pretrained in (None, "") else str(pretrained)
        try:
            adapter = load_adapter(model, LoadOptions(device=str(device), dtype=str(dtype)))
            self.pipeline = Pipeline(adapter, self.config)
        except (ModelLoadError, ValueError, TypeError) as exc:
            raise PTPRosError(str(exc)) from None
        self.pretrained = str(model)
        self._warned: set[str] = set()
        budget = f"keep_ratio={self.keep_ratio:g}" if self.tokens is None else f"tokens={self.tokens}"
        eval_logger.info(
            f"ptp_ros: {type(adapter).__name__} from {self.pretrained} on {adapter.device}, "
            f"selector={self.config.selector.name}, {budget}"
        )

    @property
    def batch_size(self) -> int:
        return 1

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            eval_logger.warning(message)

    def _max_new_tokens(self, gen_kwargs: dict) -> int:
        value = gen_kwargs.get("max_new_tokens")
        if value is None:
            return self.max_new_tokens
        return _positive_int("generation_kwargs max_new_tokens", value)

    def _check_decoding(self, gen_kwargs: dict) -> None:
        try:
            sampling = bool(gen_kwargs.get("do_sample")) or float(gen_kwargs.get("temperature") or 0) > 0
            beams = int(gen_kwargs.get("num_beams") or 1) > 1
        except (TypeError, ValueError):
            sampling = beams = False
        if sampling or beams:
            self._warn_once("decoding", "ptp_ros decodes greedily: the task's sampling / beam settings are ignored")

    def generate_until(self, requests) -> list:
        from tqdm import tqdm

        from ptp_ros.pipeline import InvalidRequest

        out = []
        stats = []
        skipped = 0
        for request in tqdm(requests, disable=self.rank != 0, desc="Model Responding"):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            gen_kwargs = dict(gen_kwargs or {})
            where = f"{task} document {doc_id}"
            try:
                image = _image(doc_to_visual(self.task_dict[task][split][doc_id]), where)
            except PTPRosError as exc:
                if not self.skip_unsupported:
                    raise
                self._warn_once(
                    "skip",
                    f"{exc}: answered with an empty string (skip_unsupported), and so are the other such documents",
                )
                skipped += 1
                self._write_stats({"task": task, "split": split, "doc_id": doc_id, "answer": "", "skipped": str(exc)})
                out.append(GenerationResult(text=""))
                continue
            self._check_decoding(gen_kwargs)
            try:
                answer = self.pipeline.answer(
                    image,
                    context,
                    keep_ratio=None if self.tokens else self.keep_ratio,
                    tokens=self.tokens,
                    max_new_tokens=self._max_new_tokens(gen_kwargs),
                )
            except InvalidRequest as exc:
                raise PTPRosError(f"{where}: {exc}") from None
            text = _cut_at(answer.text, gen_kwargs.get("until"))
            result = answer.result()
            record = result.to_json()
            counts = PruningCounts(
                input_tokens=answer.prompt_tokens,
                output_tokens=answer.new_tokens,
                visual_tokens_kept=result.visual_tokens_kept,
                visual_tokens_total=result.visual_tokens_total,
                keep_ratio=result.keep_ratio,
                latency_ms=result.latency_ms,
            )
            stats.append(record)
            self._write_stats(
                {
                    "task": task,
                    "split": split,
                    "doc_id": doc_id,
                    "answer": text,
                    **{k: v for k, v in record.items() if k != "answer"},
                }
            )
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(GenerationResult(text=text, token_counts=counts))
        if skipped:
            eval_logger.warning(
                f"ptp_ros: {skipped} of {len(requests)} documents were not one image and got an "
                "empty answer (skip_unsupported)"
            )
        if stats:
            self._report(stats)
        return out

    def _write_stats(self, line: dict) -> None:
        if self.stats_path is not None:
            with self.stats_path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")

    def _report(self, stats: list[dict]) -> None:
        """One summary line in the log, and the means into lmms-eval's ``throughput`` results block."""
        n = len(stats)

        def mean(values) -> float:
            values = list(values)
            return sum(values) / len(values) if values else 0.0

        stages = list(dict.fromkeys(k for s in stats for k in s["latency_ms"]))
        stage_ms = {stage: mean(s["latency_ms"][stage] for s in stats if stage in s["latency_ms"]) for stage in stages}
        kept, total = mean(s["visual_tokens_kept"] for s in stats), mean(s["visual_tokens_total"] for s in stats)
        ratio = mean(s["keep_ratio"] for s in stats)
        new_tokens = sum(s["new_tokens"] for s in stats)
        seconds = sum(s["latency_ms"].get("total", 0.0) for s in stats) / 1e3
        eval_logger.info(
            f"ptp_ros: {n} answers, {self.config.selector.name} kept {kept:.1f} of {total:.1f} visual tokens "
            f"on average ({100 * ratio:.1f} %); mean ms per answer: "
            + ", ".join(f"{stage} {ms:.1f}" for stage, ms in stage_ms.items())
        )
        try:
            from lmms_eval.models.model_utils.gen_metrics import log_metrics
        except ImportError:  # another lmms-eval layout: the log line and the samples still carry it
            return
        log_metrics(
            total_elapsed_time=seconds,
            total_gen_tokens=new_tokens,
            avg_speed=new_tokens / seconds if seconds > 0 else 0.0,
            additional_metrics={
                "total_requests": n,
                "visual_tokens_kept": kept,
                "visual_tokens_total": total,
                "keep_ratio": ratio,
                **{f"{stage}_ms": ms for stage, ms in stage_ms.items()},
            },
        )

    def loglikelihood(self, requests) -> list:
        raise PTPRosError(
            "loglikelihood (multiple choice scored by likelihood) is not supported: ptp_ros generates "
            "answers; use the task's generate_until variant"
        )

    def generate_until_multi_round(self, requests) -> list:
        raise PTPRosError(
            "multi-round generation is not supported: ptp_ros answers one question about one image per request"
        )
