"""Every parameter of the agent node, declared from one table (config/agent.yaml documents the same list)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.parameter import Parameter

from ..budget import MAX_LATENCY_BUDGET_MS
from ..pruning.views import VIEW_SPLITS
from .requests import MAX_NEW_TOKENS_LIMIT
from .worker import MODES, Settings


@dataclass(frozen=True)
class Param:
    name: str
    default: Any
    description: str
    read_only: bool = False
    range: tuple[float, float] | None = None  # inclusive
    choices: tuple[str, ...] | None = None

    @property
    def declared(self) -> Any:
        """What ``declare_parameter`` takes: the default, or for an empty string list the type, since rclpy types
        an empty list as a byte array (the parameter is then unset until given, and unset reads as ``default``)."""
        return Parameter.Type.STRING_ARRAY if self.default == [] else self.default

    def descriptor(self) -> ParameterDescriptor:
        d = ParameterDescriptor(name=self.name, description=self.description, read_only=self.read_only)
        if self.range is not None and isinstance(self.default, int) and not isinstance(self.default, bool):
            d.integer_range = [IntegerRange(from_value=int(self.range[0]), to_value=int(self.range[1]), step=1)]
        elif self.range is not None:
            d.floating_point_range = [
                FloatingPointRange(from_value=float(self.range[0]), to_value=float(self.range[1]), step=0.0)
            ]
        if self.choices:
            d.additional_constraints = f"one of: {', '.join(self.choices)}"
        return d


_DEFAULT = Settings()

PARAMS: tuple[Param, ...] = (
    # read-only: fixed for the life of the node (model, device, wiring)
    Param(
        "model_path",
        "",
        "Checkpoint directory or a repo id already in the local Hugging Face cache; "
        "empty = the built-in default model. Transformers-format checkpoints only: code shipped with a "
        "checkpoint never runs",
        read_only=True,
    ),
    Param("device", "auto", "auto, cpu, cuda or cuda:N", read_only=True),
    Param(
        "dtype",
        "auto",
        "auto (fp32 on CPU, bf16/fp16 on CUDA), float32, float16 or bfloat16",
        read_only=True,
        choices=("auto", "float32", "float16", "bfloat16"),
    ),
    Param("autostart", True, "Walk to active by itself at start; false: wait for a lifecycle manager", read_only=True),
    Param(
        "image_transport",
        "raw",
        "raw: sensor_msgs/Image on 'image' (each camera's NAME/image); compressed: CompressedImage on "
        "'image/compressed' (NAME/image/compressed)",
        read_only=True,
        choices=("raw", "compressed"),
    ),
    Param(
        "cameras",
        [],
        "Camera names; camera NAME reads NAME/image (raw) or NAME/image/compressed. Empty: one camera, "
        "named 'image', on the topic 'image'",
        read_only=True,
    ),
    Param(
        "default_cameras",
        [],
        "The cameras a request that names none is asked about; empty: the first camera",
        read_only=True,
    ),
    Param(
        "queue_size",
        4,
        "Requests that may wait while one runs; more get an immediate 'busy' result",
        read_only=True,
        range=(1, 64),
    ),
    Param(
        "instruction_history_depth",
        1000,
        "Instruction messages DDS may hold for the node (reliable, keep "
        "last); a burst larger than this can be lost below the node. Also the depth of 'result'",
        read_only=True,
        range=(10, 100_000),
    ),
    Param(
        "max_input_pixels",
        16_777_216,
        "Largest camera frame accepted (width x height), checked from the "
        "header before decoding; larger frames get an error result",
        read_only=True,
        range=(1, 1 << 31),
    ),
    Param(
        "max_pixels",
        0,
        "Most pixels the model's processor reads an image at (Qwen2.5-VL, Qwen3-VL; refused for a family "
        "whose processor fixes the resolution); 0 = the checkpoint's own cap",
        read_only=True,
        range=(0, 1 << 31),
    ),
    Param(
        "min_pixels",
        0,
        "Fewest pixels the model's processor reads an image at (Qwen2.5-VL, Qwen3-VL); 0 = the checkpoint's own",
        read_only=True,
        range=(0, 1 << 31),
    ),
    Param(
        "watchdog_timeout_s",
        120.0,
        "One request running longer than this turns /diagnostics to ERROR",
        read_only=True,
        range=(1.0, 86_400.0),
    ),
    Param("max_instruction_chars", 2000, "Longest instruction text accepted", read_only=True, range=(1, 100_000)),
    Param(
        "calibration_keep_ratios",
        [0.05, 0.25, 1.0],
        "Keep ratios run at configure time to fit the latency model (one warm-up run first)",
        read_only=True,
    ),
    Param(
        "calibration_image",
        "",
        "Image used for calibration; empty = the bundled 1920x1080 sample scene",
        read_only=True,
    ),
    Param(
        "encode_cache_frames",
        4,
        "Frames whose vision encoding is kept, so that later questions on them skip the encoder (and cameras "
        "whose last views are kept, so that a new frame re-encodes only its changed tiles); 0 = encode every "
        "request from scratch",
        read_only=True,
        range=(0, 64),
    ),
    Param(
        "encode_reuse_threshold",
        0.0,
        "Largest change of a downsampled tile (image intensity, 0..1) whose encoding is still reused; "
        "0 = only bit-identical tiles (exact)",
        read_only=True,
        range=(0.0, 1.0),
    ),
    # runtime-settable: validated, a bad value is rejected with a reason and the old one kept
    # (their defaults are Settings' own; a keep ratio must be in (0, 1] and a latency budget above 0: the
    # descriptors' inclusive ranges admit 0, which Settings.problems refuses with the library's checks)
    Param(
        "mode",
        _DEFAULT.mode,
        "budget: largest keep ratio predicted to fit latency_budget_ms; fixed: keep_ratio",
        choices=MODES,
    ),
    Param(
        "latency_budget_ms",
        _DEFAULT.latency_budget_ms,
        "Time allowed from instruction to answer (ms), in (0, 3600000]",
        range=(0.0, MAX_LATENCY_BUDGET_MS),
    ),
    Param(
        "keep_ratio", _DEFAULT.keep_ratio, "Fraction of visual tokens kept in fixed mode, in (0, 1]", range=(0.0, 1.0)
    ),
    Param(
        "keep_ratio_min",
        _DEFAULT.keep_ratio_min,
        "Lowest keep ratio budget mode may choose, in (0, 1]",
        range=(0.0, 1.0),
    ),
    Param(
        "keep_ratio_max",
        _DEFAULT.keep_ratio_max,
        "Highest keep ratio budget mode may choose, in (0, 1]",
        range=(0.0, 1.0),
    ),
    Param("alpha", _DEFAULT.alpha, "Weight of instruction relevance in PTP's fused token score", range=(0.0, 1.0)),
    Param(
        "view_split",
        _DEFAULT.view_split,
        "How a request on several cameras shares its token budget: shared (by the instruction's attention), "
        "equal (the same count per camera) or alone (each camera its own keep ratio)",
        choices=VIEW_SPLITS,
    ),
    Param("max_new_tokens", _DEFAULT.max_new_tokens, "Longest answer in tokens", range=(1, MAX_NEW_TOKENS_LIMIT)),
    Param("publish_saliency", _DEFAULT.publish_saliency, "Publish the saliency image for every answer"),
    Param(
        "saliency_max_side",
        _DEFAULT.saliency_max_side,
        "Longer side of the published saliency image in pixels (smaller frames keep their size)",
        range=(64, 16_384),
    ),
    Param(
        "max_frame_age_ms",
        _DEFAULT.max_frame_age_ms,
        "Frames older than this get a 'stale' result instead of an answer; 0 = never stale",
        range=(0.0, 3_600_000.0),
    ),
    Param(
        "sync_tolerance_ms",
        _DEFAULT.sync_tolerance_ms,
        "A request on several cameras takes the newest frames stamped within this of each other, else "
        "gets 'out_of_sync'",
        range=(0.0, 60_000.0),
    ),
)
BY_NAME = {p.name: p for p in PARAMS}
RUNTIME = tuple(f.name for f in fields(Settings))  # the runtime-settable ones, named as in Settings
FLOATS = frozenset(p.name for p in PARAMS if isinstance(p.default, float))

#: Parameters earlier versions declared, and why they are gone.  ROS ignores a parameter nobody declares,
#: so a params file that still sets one would otherwise do nothing without a word: the node warns instead
#: (a "/**" params file may hold other nodes' parameters, so an unknown name is not an error).
REMOVED: dict[str, str] = {
    "trust_remote_code": "code shipped with a checkpoint never runs, whatever it says; a remote-code checkpoint "
    "(e.g. model_type internvl_chat) is refused with the transformers-format one to use instead "
    "(docs/models.md)",
}


def check_choice(name: str, value: Any) -> str | None:
    """Why ``value`` is not allowed for ``name`` (ranges and types are checked by rclpy itself).  A parameter
    outside the table (rclpy's own ``use_sim_time``) is rclpy's to check: None."""
    param = BY_NAME.get(name)
    if param is not None and param.choices and value not in param.choices:
        return f"{name} must be one of {', '.join(param.choices)}, got {value!r}"
    return None


def widen_integers(params: list[Parameter]) -> list[Parameter]:
    """``params`` with an integer given for a float parameter turned into that float.

    rclpy types a parameter by its default and refuses any other type, so ``ros2 param set /ptp_agent
    latency_budget_ms 4000`` would fail with "Wrong parameter type"; registered with rclpy's
    ``add_pre_set_parameters_callback``, this runs before that check, and the value stays a float."""
    return [
        Parameter(p.name, Parameter.Type.DOUBLE, float(p.value))
        if p.type_ == Parameter.Type.INTEGER and p.name in FLOATS
        else p
        for p in params
    ]


def removed_parameter_warnings(node) -> list[str]:
    """One warning per parameter in ``REMOVED`` that ``node`` was started with (-p, a params file).

    Reads rclpy's ``Node._parameter_overrides``, the only place that holds overrides nobody declared (no public
    accessor exists); a node without it gets no warnings."""
    overrides = getattr(node, "_parameter_overrides", None) or {}
    return [
        f"parameter {name!r} is no longer used and is ignored: {why}"
        for name, why in REMOVED.items()
        if name in overrides
    ]
