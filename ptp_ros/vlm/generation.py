"""Timed, cancellable transformers ``generate``: the one place an adapter hooks into stock generation.

Apart from ``vlm/base.py`` (the adapter interface and its data types, which need no transformers), so that
code which only reads an adapter's results (the pipeline's types, the overlay) does not pull in transformers.
"""

from __future__ import annotations

import threading

import torch
from transformers import StoppingCriteriaList
from transformers.generation.stopping_criteria import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from ..timing import now
from .base import Cancelled, Generation


class StopOnEvent(StoppingCriteria):
    """Ends ``generate`` after the current token once ``event`` is set, so that a node shutting down or
    deactivating does not wait for up to ``max_new_tokens`` more decoding steps."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class StageClock(BaseStreamer):
    """A ``generate`` streamer that timestamps the end of prefill (first new token) and of decoding."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = now(device)
        self.first_token: float | None = None
        self.end_time: float | None = None
        self._calls = 0

    def _now(self) -> float:
        return now(self.device)

    def put(self, value) -> None:
        self._calls += 1
        if self._calls == 2:  # call 1 is the prompt, call 2 the first generated token
            self.first_token = self._now()

    def end(self) -> None:
        self.end_time = self._now()

    def stages_ms(self) -> tuple[float, float]:
        end = self.end_time if self.end_time is not None else self._now()
        first = self.first_token if self.first_token is not None else end
        return (first - self.start) * 1e3, (end - first) * 1e3


def timed_generate(
    model, tokenizer, device: torch.device, max_new_tokens: int, cancel: threading.Event | None = None, **inputs
) -> Generation:
    """Greedy stock ``model.generate(**inputs)`` with prefill / decode timed by a ``StageClock``; setting
    ``cancel`` stops it after the current token and raises ``Cancelled``."""
    clock = StageClock(device)
    prompt_len = inputs["input_ids"].shape[1]
    stopping = StoppingCriteriaList([StopOnEvent(cancel)]) if cancel is not None else None
    out = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        streamer=clock,
        pad_token_id=tokenizer.pad_token_id,
        stopping_criteria=stopping,
    )
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"cancelled after {out.shape[1] - prompt_len} generated token(s)")
    prefill_ms, decode_ms = clock.stages_ms()
    new = out[0, prompt_len:]
    text = tokenizer.decode(new, skip_special_tokens=True).strip()
    return Generation(
        text=text,
        token_ids=new.tolist(),
        prompt_tokens=prompt_len,
        new_tokens=int(new.shape[0]),
        prefill_ms=prefill_ms,
        decode_ms=decode_ms,
    )
