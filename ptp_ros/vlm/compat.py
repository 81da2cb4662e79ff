"""Compatibility shim: build InternVL / Qwen2.5-VL processors where torchvision is missing.

Why: in transformers 5.23.0 every video processor needs torchvision, and without it
``transformers.VIDEO_PROCESSOR_MAPPING`` is a dummy.  ``ProcessorMixin`` nevertheless type-checks
(``check_argument_for_proper_class``), loads (``_get_arguments_from_pretrained`` → ``AutoVideoProcessor``)
and saves every sub-processor its ``__init__`` names, ``video_processor`` included, even when it is
``None``; so ``InternVLProcessor(..., video_processor=None)`` raises
``AttributeError: type object 'VIDEO_PROCESSOR_MAPPING' has no attribute '_extra_content'`` and
``AutoProcessor.from_pretrained`` cannot load such a checkpoint.  Images never touch the video processor.

What: ``hide_video_processor(cls)`` drops ``video_processor`` from ``cls.get_attributes()`` — the one list
all three code paths read — for that processor class only, and only when torchvision is unavailable.
Construction, ``save_pretrained`` and ``from_pretrained`` then handle image + tokenizer exactly as stock.

When to remove: ``test/test_internvl_compat.py::test_stock_processor_still_needs_the_shim`` fails as soon as
the stock class builds with ``video_processor=None`` on a torchvision-less install; then delete this module.
"""

from __future__ import annotations

from transformers.processing_utils import ProcessorMixin
from transformers.utils import is_torchvision_available

_VIDEO_ATTRIBUTE = "video_processor"
_patched: set[type] = set()


def video_processors_unavailable() -> bool:
    """True where transformers' video processors cannot be built (they are torchvision-only in 5.x)."""
    return not is_torchvision_available()


def hide_video_processor(processor_class: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """Let ``processor_class`` build, save and load without a video processor (idempotent; no-op when
    torchvision is installed).  Returns the class, so it reads as ``hide_video_processor(InternVLProcessor)(...)``."""
    if not video_processors_unavailable() or processor_class in _patched:
        return processor_class
    stock = processor_class.get_attributes.__func__

    def get_attributes(cls) -> list[str]:
        return [name for name in stock(cls) if name != _VIDEO_ATTRIBUTE]

    processor_class.get_attributes = classmethod(get_attributes)
    _patched.add(processor_class)
    return processor_class
