"""Reuse of the vision encoding: one encode per frame, and per view (tile, global view) across frames.

Everything an adapter derives from a frame before the instruction matters (vision features, per-view [CLS]
saliency, region scores: its ``VisualTokens``) depends on the frame's pixels alone, so it is kept and reused:

* **frames** — an LRU of ``VisualTokens`` by the digest of the frame's bytes (and shape).  A second question on
  the same pixels runs no vision-tower forward, whichever camera or stamp they came with: the content decides
  the encoding, so it is the key (a camera and stamp would only split equal entries).
* **views** — per camera, the views (tiles and the global view) last run through the tower, with what the tower
  and its probes gave for each.  For a new frame of the same geometry (image size and view layout), a view whose
  tower input is bit-identical to that camera's last encoded one — or, with a threshold > 0, whose downsampled
  pixels changed by at most the threshold — takes those outputs; only the others run through the tower.  Where
  the views are independent forwards (LLaVA-NeXT's anyres tiles, InternVL's tiles: ``independent_views``),
  reuse at threshold 0 is exact.  Where they are not (Qwen2.5-VL: window attention over the whole image), the
  frame is one view: reused whole or encoded whole.

A prompt over several cameras (``Pipeline.answer`` with a camera → frame mapping) holds each camera's frame as its
own entry, its view memory under the camera's name.

Both are bounded by one size: at most ``frames`` frames and ``frames`` cameras are held (least recently used
go first).  ``ViewReuse`` is the hook one adapter ``encode`` takes to skip the tower for reused views.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .base import PreparedInput, VisualTokens

#: side of the downsampled view the threshold test compares (a 336-px CLIP tile: one cell per 14-px patch)
THUMBNAIL_SIDE = 24


@dataclass
class ViewOutputs:
    """What the vision tower and its [CLS] probe give per view, as ``encode`` reads them: the projector's
    ``features`` [V, T, D], ``cls_attention`` [V, P] and ``cls_states`` [V, H]."""

    features: torch.Tensor
    cls_attention: torch.Tensor
    cls_states: torch.Tensor


class ViewReuse:
    """One ``encode``'s reuse plan: the tower runs on the views in ``encode`` ([V] bool) only; the others' rows
    come from ``cached``.  Without a plan (``encode`` None) every view runs and the outputs are only recorded.

    ``around(tower, projector)`` hooks the model's own forward: the tower's input loses the reused views, and the
    projector's output gets them back in place, so the model's own packing sees every view.  ``rows`` does the
    same for the probe's per-view rows.  ``outputs`` is every view's, for the next frame."""

    def __init__(self, encode: torch.Tensor | None = None, cached: ViewOutputs | None = None):
        if (encode is None) != (cached is None):
            raise ValueError("a reuse plan needs both the views to encode and the cached outputs")
        if encode is not None and not bool(encode.any()):
            raise ValueError("a reuse plan encodes at least one view (a frame with none to encode is reused whole)")
        self.encode = encode
        self.cached = cached
        self._rows: dict[str, torch.Tensor] = {}

    @contextmanager
    def around(self, tower: nn.Module, projector: nn.Module):
        def views_to_encode(module, args, kwargs):
            if self.encode is None:
                return None
            if args:
                return (args[0][self.encode.to(args[0].device)], *args[1:]), kwargs
            pixels = kwargs["pixel_values"]
            return args, {**kwargs, "pixel_values": pixels[self.encode.to(pixels.device)]}

        def every_view(module, args, output):
            return self._merge("features", output)

        handles = [
            tower.register_forward_pre_hook(views_to_encode, with_kwargs=True),
            projector.register_forward_hook(every_view),
        ]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def rows(self, name: str, fresh: torch.Tensor) -> torch.Tensor:
        """Every view's rows of ``name`` (a ``ViewOutputs`` field) from the encoded views' ``fresh`` ones."""
        return self._merge(name, fresh)

    def _merge(self, name: str, fresh: torch.Tensor) -> torch.Tensor:
        if self.encode is None:
            full = fresh
        else:
            full = getattr(self.cached, name).to(device=fresh.device, dtype=fresh.dtype, copy=True)
            full[self.encode.to(fresh.device)] = fresh
        self._rows[name] = full
        return full

    @property
    def outputs(self) -> ViewOutputs:
        missing = {f.name for f in dataclasses.fields(ViewOutputs)} - set(self._rows)
        if missing:
            raise RuntimeError(f"encode did not report the views' {sorted(missing)}")
        return ViewOutputs(**self._rows)


@dataclass
class CameraViews:
    """A camera's last encoded views: their geometry, the digest and thumbnail of each view's tower input, the
    tower's outputs per view (None where views are not independent) and the ``VisualTokens`` they made."""

    geometry: tuple
    digests: list[bytes]
    thumbnails: torch.Tensor  # [V, C, s, s] in image intensity units (0..1)
    outputs: ViewOutputs | None
    visual: VisualTokens
    encoded_fraction: float  # of the camera's last new frame's views, the fraction that ran through the tower


@dataclass
class ReuseStats:
    """Counts since the start, for diagnostics and benchmarks."""

    frames: int = 0  # frames asked for
    frame_hits: int = 0  # of them, found whole in the frame cache
    views: int = 0  # views of the frames not found whole
    views_reused: int = 0  # of them, reused

    @property
    def reuse_rate(self) -> float | None:
        """Fraction of views reused over every frame asked for (a frame hit reuses all its views); None before
        the first."""
        if self.frames == 0:
            return None
        whole = self.frame_hits / self.frames
        partial = self.views_reused / self.views if self.views else 0.0
        return whole + (1 - whole) * partial


def frame_digest(image: np.ndarray) -> tuple:
    """The frame cache's key: the frame's shape and the digest of its bytes."""
    data = np.ascontiguousarray(image)
    return data.shape, str(data.dtype), hashlib.blake2b(memoryview(data).cast("B"), digest_size=16).digest()


def _tensor_digest(view: torch.Tensor) -> bytes:
    return hashlib.blake2b(view.detach().cpu().contiguous().numpy().tobytes(), digest_size=16).digest()


def view_change(thumbnails: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """[V] the largest change of any cell of the downsampled views, channels averaged: a local change (an object
    that moved) shows at full size where a mean over the view would dilute it, and sensor noise averages out in
    each cell."""
    return (thumbnails - reference).abs().mean(dim=1).flatten(1).amax(dim=1)


def _nbytes(*tensors: torch.Tensor) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def _visual_tensors(visual: VisualTokens) -> list[torch.Tensor]:
    scores = [v for v in vars(visual.scores).values() if isinstance(v, torch.Tensor)]
    return [visual.features, visual.token_boxes, visual.region_boxes, *scores]


class EncodeReuse:
    """The frame cache and the per-camera view memory of one adapter (see the module's docstring).

    ``threshold``: the largest change of a downsampled view (``view_change``, in image intensity 0..1) that still
    reuses it; 0 reuses only bit-identical views."""

    def __init__(self, adapter, frames: int, threshold: float = 0.0):
        if not isinstance(frames, int) or isinstance(frames, bool) or frames < 1:
            raise ValueError(f"the encode cache holds at least 1 frame, got {frames!r}")
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"the reuse threshold is a change of image intensity in [0, 1], got {threshold!r}")
        self.adapter = adapter
        self.frames, self.threshold = frames, float(threshold)
        std = getattr(getattr(adapter, "processor", None), "image_processor", None)
        std = getattr(std, "image_std", None)
        self._std = torch.tensor(std if std is not None else [1.0, 1.0, 1.0], dtype=torch.float32)
        self._frames: OrderedDict[tuple, VisualTokens] = OrderedDict()
        self._cameras: OrderedDict[str, CameraViews] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = ReuseStats()

    def __len__(self) -> int:
        """Frames held."""
        return len(self._frames)

    @property
    def cameras(self) -> int:
        """Cameras whose last views are held."""
        return len(self._cameras)

    def nbytes(self) -> int:
        """Bytes of tensor storage held (each storage counted once)."""
        with self._lock:
            held: dict[int, int] = {}
            for visual in self._frames.values():
                held.update(_nbytes(*_visual_tensors(visual)))
            for views in self._cameras.values():
                held.update(_nbytes(views.thumbnails, *_visual_tensors(views.visual)))
                if views.outputs is not None:
                    held.update(_nbytes(*vars(views.outputs).values()))
            return sum(held.values())

    def clear(self) -> None:
        with self._lock:
            self._frames.clear()
            self._cameras.clear()

    def expected_encode_fraction(self, image: np.ndarray, camera: str = "") -> float:
        """The fraction of ``image``'s views a request on it is expected to encode, before it runs: 0 for a frame
        in the cache, else the fraction this camera's last new frame encoded (1 for a camera not seen)."""
        with self._lock:
            if frame_digest(image) in self._frames:
                return 0.0
            views = self._cameras.get(camera)
        return 1.0 if views is None else views.encoded_fraction

    def encode(
        self, prepared: PreparedInput | Callable[[], PreparedInput], image: np.ndarray, camera: str = ""
    ) -> tuple[VisualTokens, float]:
        """(``prepared``'s visual tokens, the fraction of its views reused: 1 for a frame in the cache).
        ``prepared`` is the prompt of ``image`` alone, or what makes it (called only when the frame is not cached:
        a camera of a several-camera prompt)."""
        key = frame_digest(image)
        with self._lock:
            self.stats.frames += 1
            if (cached := self._frames.get(key)) is not None:
                self._frames.move_to_end(key)
                self.stats.frame_hits += 1
                return dataclasses.replace(cached), 1.0
            visual, reused = self._encode_views(prepared if isinstance(prepared, PreparedInput) else prepared(), camera)
            self._frames[key] = visual
            while len(self._frames) > self.frames:
                self._frames.popitem(last=False)
            return dataclasses.replace(visual), reused

    def _encode_views(self, prepared: PreparedInput, camera: str) -> tuple[VisualTokens, float]:
        pixels = self.adapter.view_pixels(prepared)  # [V, C, ...]: each view's tower input
        geometry = (tuple(prepared.image_size), tuple(pixels.shape))
        digests = [_tensor_digest(view) for view in pixels]
        thumbnails = self._thumbnails(pixels)
        last = self._cameras.get(camera)
        if last is not None and last.geometry != geometry:
            last = None  # a new resolution or view layout: nothing earlier is comparable
        reuse = torch.zeros(len(digests), dtype=torch.bool)
        if last is not None:
            reuse = torch.tensor([a == b for a, b in zip(digests, last.digests)])
            if self.threshold > 0:
                reuse |= view_change(thumbnails, last.thumbnails) <= self.threshold
        independent = getattr(self.adapter, "independent_views", False)
        if not independent:
            reuse[:] = bool(reuse.all())
        self.stats.views += len(digests)
        self.stats.views_reused += int(reuse.sum())
        if last is not None and bool(reuse.all()):
            last.encoded_fraction = 0.0
            self._cameras.move_to_end(camera)
            return last.visual, 1.0
        if independent:
            plan = ViewReuse(~reuse, last.outputs) if bool(reuse.any()) else ViewReuse()
            visual = self.adapter.encode(prepared, views=plan)
            outputs = plan.outputs
        else:
            visual, outputs = self.adapter.encode(prepared), None
        fraction_reused = float(reuse.float().mean())
        keep = reuse.tolist()  # a reused view's reference stays the pixels its outputs came from
        self._cameras[camera] = CameraViews(
            geometry,
            [old if kept else new for kept, old, new in zip(keep, last.digests if last else digests, digests)],
            torch.where(reuse[:, None, None, None], last.thumbnails, thumbnails) if last else thumbnails,
            outputs,
            visual,
            1.0 - fraction_reused,
        )
        self._cameras.move_to_end(camera)
        while len(self._cameras) > self.frames:
            self._cameras.popitem(last=False)
        return visual, fraction_reused

    def _thumbnails(self, pixels: torch.Tensor) -> torch.Tensor:
        """[V, C, s, s]: each view downsampled, in image intensity (the processor's normalisation undone up to
        its mean, which a difference cancels)."""
        side = (min(pixels.shape[-2], THUMBNAIL_SIDE), min(pixels.shape[-1], THUMBNAIL_SIDE))
        small = F.adaptive_avg_pool2d(pixels.detach().float().cpu(), side)
        return small * self._std.view(1, -1, 1, 1)
