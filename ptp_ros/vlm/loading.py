"""Offline, safe model loading: a local directory or the local HF cache, safetensors only.

``load_adapter`` reads the checkpoint's config, picks the adapter of its model family and hands it the
stock transformers model and processor.  Nothing here can reach the network.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch


class ModelLoadError(RuntimeError):
    """A checkpoint that is missing, unreadable or of a family no adapter handles."""


@dataclass(frozen=True)
class LoadOptions:
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    dtype: str = "auto"  # "auto" | "float32" | "float16" | "bfloat16"
    trust_remote_code: bool = False


def quiet_transformers() -> None:
    """Keep transformers' progress bars and advisory warnings out of CLI output and node logs."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but CUDA is not available here")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU (no fast half precision on common CPUs), bf16 (else fp16) on CUDA."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        resolved = getattr(torch, dtype)
    except AttributeError:
        resolved = None
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use auto, float32, float16 or bfloat16")
    return resolved


def resolve_checkpoint(path_or_id: str | os.PathLike) -> Path:
    """A local directory, or a repo id already in the local HF cache; never a download."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json: not a transformers checkpoint")
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(path_or_id), local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError) as exc:
        raise ModelLoadError(
            f"model {str(path_or_id)!r} not found: no such directory and not in the local Hugging Face cache "
            "(downloads are disabled; pass a local checkpoint directory)") from exc


def checkpoint_family(path: Path) -> str:
    import json

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}/config.json is unreadable: {exc}") from exc
    return str(config.get("model_type", ""))


def load_adapter(path_or_id: str | os.PathLike, options: LoadOptions = LoadOptions(), **adapter_config):
    """The adapter for the checkpoint's model family, loaded on the chosen device and dtype."""
    from .internvl import InternVLAdapter
    from .llava_next import LlavaNextAdapter
    from .qwen2_5_vl import Qwen2_5_VLAdapter

    families = {"llava_next": LlavaNextAdapter, "internvl": InternVLAdapter, "qwen2_5_vl": Qwen2_5_VLAdapter}
    path = resolve_checkpoint(path_or_id)
    family = checkpoint_family(path)
    if family not in families:
        raise ModelLoadError(f"{path} holds a {family or 'unknown'!r} model; supported: {', '.join(families)}")
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"{path} has no .safetensors weights (pickled .bin weights are refused)")
    device = resolve_device(options.device)
    return families[family].from_checkpoint(path, device, resolve_dtype(options.dtype, device),
                                            trust_remote_code=options.trust_remote_code, **adapter_config)
