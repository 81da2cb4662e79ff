"""Offline, safe model loading: a local directory or the local HF cache, safetensors only.

``load_adapter`` reads the checkpoint's config, picks the adapter of its model family and hands it the
stock transformers model and processor.  Nothing here can reach the network, and no code shipped with a
checkpoint ever runs: a remote-code format (``model_type: internvl_chat``, an ``auto_map``) is refused by
name, with the transformers-format checkpoints to use instead (docs/models.md lists them).  Every way a load can fail
ends as a one-line ``ModelLoadError`` naming the cause, and the weight files are checked here (safetensors,
whole, inside the checkpoint) before transformers opens any of them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from .families import ADAPTERS, FAMILIES

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".bin.index.json")
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header


class ModelLoadError(RuntimeError):
    """A checkpoint that is missing, unreadable, corrupt, pickled, of a family no adapter handles, or whose
    weights do not fit its config; one line, naming the cause (the original exception chained)."""


@dataclass(frozen=True)
class LoadOptions:
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    dtype: str = "auto"  # "auto" | "float32" | "float16" | "bfloat16"


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
            "(downloads are disabled; pass a local checkpoint directory)"
        ) from exc


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{file} is unreadable: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{file} is not a JSON object")
    return data


def checkpoint_family(path: Path) -> str:
    return str(_read_json(path / "config.json").get("model_type", ""))


#: The model families an adapter handles (config.json ``model_type``), in the order messages name them.
SUPPORTED_FAMILIES = FAMILIES

_LLAVA_NEXT_HF = (
    "llava-hf/llava-v1.6-vicuna-7b-hf, llava-hf/llava-v1.6-vicuna-13b-hf or llava-hf/llava-v1.6-mistral-7b-hf"
)
#: model_types only the original LLaVA repository defines (its own "llava" is told from transformers' by
#: its ``mm_vision_tower`` key and ``*ForCausalLM`` architectures).
_LLAVA_REPOSITORY_TYPES = frozenset({"llava_llama", "llava_mistral", "llava_mpt", "llava_qwen"})
_NO_CHECKPOINT_CODE = "ptp_ros never runs code shipped with a checkpoint"
_DENSE_QWEN3_VL = "use Qwen3-VL (model_type 'qwen3_vl'), e.g. Qwen/Qwen3-VL-8B-Instruct or Qwen/Qwen3-VL-4B-Instruct"

#: Formats users meet that no adapter loads, with what to load instead: the rest of "<path> holds ...",
#: short enough that the node's 500-character log line keeps all of it.
_OTHER_FORMATS = {
    "internvl_chat": (
        "InternVL in its original remote-code format (model_type 'internvl_chat', e.g. OpenGVLab/InternVL2-8B); "
        f"{_NO_CHECKPOINT_CODE}. Use a transformers-format release, e.g. OpenGVLab/InternVL3-8B-hf or "
        "OpenGVLab/InternVL2_5-8B-MPO-hf (docs/models.md: which checkpoints, and transformers' "
        "convert_internvl_weights_to_hf.py)"
    ),
    "llava_original": (
        "LLaVA in the original LLaVA repository's format (architectures {architectures}, as in "
        "liuhaotian/llava-v1.6-*), which needs that repository's code; ptp_ros runs transformers' own classes "
        f"only. Use a llava-hf conversion (model_type 'llava_next'), e.g. {_LLAVA_NEXT_HF}"
    ),
    "llava": (
        "LLaVA-1.5 (model_type 'llava': one 336-px view, no tiles), which has no adapter: PTP's regions are "
        f"LLaVA-NeXT's anyres tiles. Use a LLaVA-NeXT checkpoint (model_type 'llava_next'), e.g. {_LLAVA_NEXT_HF}"
    ),
    "qwen": (
        f"Qwen-VL in its remote-code format (model_type 'qwen', e.g. Qwen/Qwen-VL-Chat); {_NO_CHECKPOINT_CODE}. "
        "Use Qwen2.5-VL (model_type 'qwen2_5_vl'), e.g. Qwen/Qwen2.5-VL-7B-Instruct or Qwen/Qwen2.5-VL-3B-Instruct"
    ),
    "qwen2_vl": (
        "Qwen2-VL (model_type 'qwen2_vl'), which has no adapter; use Qwen2.5-VL (model_type 'qwen2_5_vl'), "
        "e.g. Qwen/Qwen2.5-VL-7B-Instruct or Qwen/Qwen2.5-VL-3B-Instruct"
    ),
    "qwen3_vl_moe": (
        "Qwen3-VL-MoE (model_type 'qwen3_vl_moe', e.g. Qwen/Qwen3-VL-30B-A3B-Instruct: another stock class, "
        f"Qwen3VLMoeForConditionalGeneration, with a mixture-of-experts LLM), which has no adapter; {_DENSE_QWEN3_VL}"
    ),
    "qwen3_5": (
        "Qwen3.5 (model_type 'qwen3_5'), which has no adapter: its LLM interleaves linear-attention (Gated "
        f"DeltaNet) layers, which PTP's relevance probe and in-LLM pruning cannot read; {_DENSE_QWEN3_VL}"
    ),
}
_OTHER_FORMATS["qwen3_5_moe"] = _OTHER_FORMATS["qwen3_5"].replace("'qwen3_5'", "'qwen3_5_moe'")


def _stock_model_types() -> frozenset[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return frozenset(CONFIG_MAPPING_NAMES)


def unsupported_format(path: Path, config: dict) -> str | None:
    """Why no adapter loads the checkpoint at ``path`` (its parsed config.json), in one line naming what to
    load instead; ``None`` when its family has an adapter."""
    family = str(config.get("model_type", ""))
    if family in SUPPORTED_FAMILIES:
        return None
    architectures = config.get("architectures") or []
    if family in _LLAVA_REPOSITORY_TYPES or (
        family == "llava"
        and ("mm_vision_tower" in config or not any("ForConditionalGeneration" in str(a) for a in architectures))
    ):
        key = "llava_original"  # liuhaotian/*, lmms-lab/*: LlavaLlamaForCausalLM, LlavaMistralForCausalLM, ...
    elif family in _OTHER_FORMATS:
        key = family
    elif config.get("auto_map") and family not in _stock_model_types():
        return (
            f"{path} holds a {family or 'unknown'!r} model in a remote-code format (its config.json auto_map "
            f"names code shipped with the checkpoint); {_NO_CHECKPOINT_CODE}. Supported: "
            f"{', '.join(SUPPORTED_FAMILIES)} (docs/models.md lists the checkpoints)"
        )
    else:
        return (
            f"{path} holds a {family or 'unknown'!r} model; supported: {', '.join(SUPPORTED_FAMILIES)} "
            "(docs/models.md lists the checkpoints)"
        )
    names = ", ".join(str(a) for a in architectures) or "unnamed"
    return f"{path} holds {_OTHER_FORMATS[key].format(architectures=names)}"


def missing_processor_config(path: Path, family: str) -> str | None:
    """Why the checkpoint at ``path`` cannot be read as its ``family``'s images: no image-processor settings
    (``preprocessor_config.json``, or ``processor_config.json`` with an ``image_processor`` entry, as
    transformers 5 saves them), without which resolution, patch size and normalisation are unknown."""
    if (path / "preprocessor_config.json").is_file():
        return None
    if (path / "processor_config.json").is_file() and "image_processor" in _read_json(path / "processor_config.json"):
        return None
    return (
        f"{path} holds a {family!r} model without its image processor config (neither preprocessor_config.json "
        "nor an image_processor entry in processor_config.json): the resolution, patch size and normalisation "
        "it was trained with are unknown; copy them from the checkpoint it was made from"
    )


def _member(path: Path, name: object, named_by: str, suffixes: tuple[str, ...] = (".safetensors",)) -> str:
    """``name`` as a file inside ``path`` with one of ``suffixes``: what a config or index may point to."""
    if not isinstance(name, str) or not name.endswith(suffixes):
        if isinstance(name, str) and name.endswith(PICKLE_SUFFIXES):
            raise ModelLoadError(
                f"{named_by} names pickled weights {name!r}; pickled weights are refused (convert them to safetensors)"
            )
        raise ModelLoadError(f"{named_by} names {name!r}, which is not a safetensors file")
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or Path(name).is_absolute() or ".." in pure.parts:
        raise ModelLoadError(f"{named_by} names {name!r}, outside the checkpoint directory {path}")
    if not (path / name).is_file():
        raise ModelLoadError(f"{named_by} names {name!r}, which is missing from {path}")
    return name


def _check_safetensors(file: Path) -> None:
    """Header readable and the file as long as its tensors need: truncation shows here, not mid-load."""
    try:
        size = file.stat().st_size
        with file.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if size < 8 or length > min(size - 8, MAX_HEADER_BYTES):
                raise ValueError(f"header length {length} does not fit the file's {size} bytes")
            header = json.loads(handle.read(length))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        if 8 + length + end > size:
            raise ValueError(f"its tensors need {8 + length + end} bytes, the file has {size}")
        from safetensors import safe_open

        with safe_open(str(file), framework="pt"):
            pass
    except Exception as exc:  # noqa: BLE001 - whatever the bytes are, the user gets this one message
        raise ModelLoadError(f"corrupt or truncated safetensors file {file}: {exc}") from exc


def check_weight_files(path: str | os.PathLike) -> list[Path]:
    """The weight files transformers will read from ``path``, each a whole safetensors file inside it.

    Follows transformers' own choice (config ``transformers_weights``, else ``model.safetensors``, else its
    index) so a pickle, a missing shard or a truncated file is refused here, by name, before transformers
    could unpickle or half-read it.
    """
    path = Path(path)
    explicit = _read_json(path / "config.json").get("transformers_weights")
    if explicit is not None:
        entry = _member(
            path, explicit, f"{path}/config.json transformers_weights", (".safetensors", ".safetensors.index.json")
        )
    elif (path / SAFE_WEIGHTS).is_file():
        entry = SAFE_WEIGHTS
    elif (path / SAFE_INDEX).is_file():
        entry = SAFE_INDEX
    else:
        pickles = sorted(p.name for p in path.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise ModelLoadError(
                f"{path} holds only pickled weights ({', '.join(pickles)}); pickled weights are "
                "refused (convert them to safetensors)"
            )
        raise ModelLoadError(f"{path} has no safetensors weights (neither {SAFE_WEIGHTS} nor {SAFE_INDEX})")
    names = [entry]
    if entry.endswith(".index.json"):
        weight_map = _read_json(path / entry).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{path / entry} has no weight_map")
        names = [_member(path, name, str(path / entry)) for name in dict.fromkeys(weight_map.values())]
    files = [path / name for name in names]
    for file in files:
        _check_safetensors(file)
    return files


def weights_misfit(loading_info: dict) -> str | None:
    """Why the checkpoint's weights do not fit its config (wrong architecture), from ``from_pretrained``'s
    ``output_loading_info``; ``None`` when they fit.  transformers only logs these, and fills the gaps
    with random weights, which would answer nonsense."""
    if mismatched := loading_info.get("mismatched_keys"):
        key, in_checkpoint, in_model = min(mismatched, key=lambda mismatch: mismatch[0])
        return (
            f"weights do not fit the config: {len(mismatched)} tensors differ in shape, e.g. {key} "
            f"is {list(in_checkpoint)} in the checkpoint, {list(in_model)} in the model"
        )
    if missing := loading_info.get("missing_keys"):
        return (
            f"weights do not fit the config (wrong architecture?): {len(missing)} of the model's "
            f"tensors are not in the checkpoint, e.g. {min(missing)}"
        )
    return None


#: Options that set the resolution the processor reads an image at (only where ``supports_downscaling``).
RESOLUTION_OPTIONS = ("max_pixels", "min_pixels")


def check_option_names(path: Path, adapter_class: type, options: dict) -> None:
    """A ValueError naming the options the checkpoint's family does not have (and its own)."""
    known = {f.name for f in dataclasses.fields(adapter_class.options_class)}
    if unknown := sorted(set(options) - known):
        why = (
            "; its processor reads images at the resolutions it fixes"
            if set(unknown) & set(RESOLUTION_OPTIONS) and not adapter_class.supports_downscaling
            else ""
        )
        raise ValueError(
            f"{path} holds a {adapter_class.name!r} model, which has no {' or '.join(unknown)} option{why} "
            f"(its options: {', '.join(sorted(known))})"
        )


def load_adapter(path_or_id: str | os.PathLike, options: LoadOptions = LoadOptions(), **adapter_config):
    """The adapter for the checkpoint's model family, loaded on the chosen device and dtype."""
    path = resolve_checkpoint(path_or_id)
    config = _read_json(path / "config.json")
    if reason := unsupported_format(path, config) or missing_processor_config(path, config["model_type"]):
        raise ModelLoadError(reason)
    check_weight_files(path)
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    adapter_class = ADAPTERS[config["model_type"]]
    check_option_names(path, adapter_class, adapter_config)
    adapter_class.options_class(**adapter_config)  # a bad option is the caller's ValueError, not a load fault
    try:
        return adapter_class.from_checkpoint(path, device, dtype, **adapter_config)
    except ModelLoadError as exc:
        raise ModelLoadError(f"cannot load {path}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - any transformers failure reaches the user as one named cause
        raise ModelLoadError(f"cannot load {path}: {type(exc).__name__}: {' '.join(str(exc).split())}") from exc
