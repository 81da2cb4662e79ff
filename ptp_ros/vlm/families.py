"""The model families ptp_ros runs, and the registries their modules fill.

A family is named by the ``model_type`` of its checkpoints' config.json and lives in two modules of that
name: ``ptp_ros/vlm/<model_type>.py``, its adapter (a class decorated with ``@register_adapter``), and
``ptp_ros/testing/<model_type>.py``, its tiny random-weight fixture (``register_fixture``).  ``FAMILIES``
is the one line a new family adds here; everything that handles "every family" (``load_adapter``, its
refusal messages, the benchmarks, the proxy trainer, the tests) reads the registries, which import a
family's module the first time it is asked for.  This module imports nothing heavy.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Generic, TypeVar

#: The model families an adapter handles (config.json ``model_type``), in the order messages name them.
FAMILIES = ("llava_next", "internvl", "qwen2_5_vl", "qwen3_vl")

#: LLaVA-NeXT's default anyres pinpoints, (height, width): 2, 3 or 4 tiles of 336 px plus the global view.
#: The tiny and real-size test models are built with them and the proxy task's scenes are drawn for them;
#: here, not in the adapter, so that reading them imports no transformers.
DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))

T = TypeVar("T")


class FamilyRegistry(Generic[T]):
    """``model_type`` → what the module ``<package>.<model_type>`` registers, imported on first use."""

    def __init__(self, package: str, kind: str):
        self.package, self.kind = package, kind
        self._entries: dict[str, T] = {}

    def register(self, model_type: str, entry: T) -> T:
        if model_type not in FAMILIES:
            raise ValueError(
                f"{self.kind} for {model_type!r}, which is not a family: add it to "
                f"ptp_ros.vlm.families.FAMILIES {FAMILIES}"
            )
        self._entries[model_type] = entry
        return entry

    def __getitem__(self, model_type: str) -> T:
        if model_type not in FAMILIES:
            raise KeyError(f"no {self.kind} for {model_type!r}; families: {', '.join(FAMILIES)}")
        if model_type not in self._entries:
            importlib.import_module(f"{self.package}.{model_type}")
        if model_type not in self._entries:
            raise LookupError(f"{self.package}.{model_type} registers no {self.kind}")
        return self._entries[model_type]

    def __iter__(self) -> Iterator[str]:
        return iter(FAMILIES)

    def items(self) -> Iterator[tuple[str, T]]:
        return ((model_type, self[model_type]) for model_type in FAMILIES)


#: ``model_type`` → adapter class (``ptp_ros/vlm/<model_type>.py``).
ADAPTERS: FamilyRegistry[type] = FamilyRegistry("ptp_ros.vlm", "adapter")


def register_adapter(cls: type) -> type:
    """Class decorator: ``cls`` is the adapter of the family ``cls.name`` (its checkpoints' ``model_type``)."""
    return ADAPTERS.register(cls.name, cls)
