"""Configuration schemas: one documented dataclass per Hydra config group.

YAML files under conf/ only supply values; the types, defaults and the validation live here.
Validation happens once, in ``__post_init__`` (which OmegaConf runs when a composed config is
turned into these objects with ``to_config``), and every message names the knob to change.
After validation every value is trusted downstream.

No torch import here: planning runs on a laptop with only the light dependencies.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import typing
from dataclasses import dataclass, field
from typing import Any, List, Optional

from .errors import ConfigError

# Resolution presets: (height, width) of the source video before the processor resizes it.
RESOLUTION_PRESETS = {
    "360p": (360, 640),
    "480p": (480, 854),
    "720p": (720, 1280),
    "1080p": (1080, 1920),
    "1440p": (1440, 2560),
    "2160p": (2160, 3840),
}

MODEL_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "internvl3")
METHODS = ("spava", "apb", "star", "zigzag_ring", "dense")
SOLVERS = ("zigzag", "greedy", "exact", "local_search")
SELECTIONS = ("query_aware", "key_norm")
DTYPES = {"bf16": 2, "fp16": 2, "fp32": 4}

# Sanity ceilings: beyond these a value is a typo, not a workload.
MAX_FRAMES = 1 << 20
MAX_GPUS = 1 << 16
MAX_SIDE = 16384


def _require(ok: bool, setting: str, message: str) -> None:
    if not ok:
        raise ConfigError(message, setting=setting)


def _positive_int(value: Any, setting: str, maximum: int | None = None) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, setting,
             f"must be a positive integer, got {value!r}")
    if maximum is not None:
        _require(value <= maximum, setting, f"must be at most {maximum}, got {value}")


@functools.lru_cache(maxsize=None)
def _field_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _matches(value: Any, hint: Any) -> bool:
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        return any(_matches(value, a) for a in args)
    if origin is list:
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    return True  # nested dataclasses validate themselves


def _check_types(obj: Any, prefix: str) -> None:
    """Every field holds a value of its annotated type (dataclasses built directly, not through
    OmegaConf, get no type checking otherwise: a string in a bool field would slip through)."""
    hints = _field_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        hint = hints[f.name]
        if not _matches(value, hint):
            name = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
            _require(False, f"{prefix}{f.name}", f"must be of type {name}, got {value!r}")


@dataclass
class VisionConfig:
    """The vision tower: how frames become tokens, and its size (for cost and memory)."""

    patch_size: int = 14  # ViT patch side in pixels
    spatial_merge: int = 2  # patches merged per side into one LLM token (2x2 merge)
    temporal_patch: int = 2  # frames per temporal grid (Qwen2-VL: 2)
    min_pixels: int = 56 * 56  # processor's lower pixel bound per frame
    max_pixels: int = 28 * 28 * 16384  # processor's upper pixel bound per frame
    tile_size: int = 448  # InternVL3: square tile side (one tile per frame)
    tile_tokens: int = 256  # InternVL3: LLM tokens per tile after pixel shuffle
    frame_text_tokens: int = 0  # text tokens wrapped around each frame (InternVL3: "Frame i: <img>...</img>")
    depth: int = 32  # ViT layers
    hidden_size: int = 1280  # ViT width
    num_heads: int = 16
    intermediate_size: int = 5120
    out_hidden_size: int = 3584  # merger output width (= LLM hidden size)

    def __post_init__(self) -> None:
        _check_types(self, "model.vision.")
        for name in ("patch_size", "spatial_merge", "temporal_patch", "min_pixels", "max_pixels",
                     "tile_size", "tile_tokens", "depth", "hidden_size", "num_heads",
                     "intermediate_size", "out_hidden_size"):
            _positive_int(getattr(self, name), f"model.vision.{name}")
        _require(self.min_pixels <= self.max_pixels, "model.vision.min_pixels",
                 f"must not exceed model.vision.max_pixels ({self.min_pixels} > {self.max_pixels})")
        _require(isinstance(self.frame_text_tokens, int) and self.frame_text_tokens >= 0,
                 "model.vision.frame_text_tokens", f"must be >= 0, got {self.frame_text_tokens!r}")
        _require(self.hidden_size % self.num_heads == 0, "model.vision.num_heads",
                 f"must divide model.vision.hidden_size ({self.hidden_size} % {self.num_heads} != 0)")

    @property
    def factor(self) -> int:
        """Pixel multiple that frame sides are resized to (patch x merge = 28 for Qwen2-VL)."""
        return self.patch_size * self.spatial_merge


@dataclass
class ModelConfig:
    """A multimodal LLM: language-model dimensions plus its vision tower."""

    name: str = "qwen2vl"
    family: str = "qwen2_vl"  # one of MODEL_FAMILIES: decides token layout and positions
    hf_id: str = "Qwen/Qwen2-VL-7B-Instruct"  # informational: the checkpoint these dims match
    num_layers: int = 28
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_heads: int = 28  # query heads Hq
    num_kv_heads: int = 4  # key/value heads Hkv (GQA group G = Hq / Hkv)
    head_dim: int = 128  # D
    vocab_size: int = 152064
    tie_word_embeddings: bool = False
    rope_theta: float = 1000000.0
    mrope_section: List[int] = field(default_factory=lambda: [16, 24, 24])  # t/h/w split of D/2
    tokens_per_second: int = 2  # Qwen2.5-VL temporal position scale (positions per second of video)
    vision: VisionConfig = field(default_factory=VisionConfig)
    checkpoint: Optional[str] = None  # path to a Hugging Face checkpoint (runtime only)
    init: str = "checkpoint"  # "checkpoint" or "random" (real-size random weights for benchmarks)

    def __post_init__(self) -> None:
        _check_types(self, "model.")
        _require(self.family in MODEL_FAMILIES, "model.family",
                 f"unknown model family {self.family!r}; choose one of {', '.join(MODEL_FAMILIES)}")
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads",
                     "head_dim", "vocab_size"):
            _positive_int(getattr(self, name), f"model.{name}")
        _require(self.num_heads % self.num_kv_heads == 0, "model.num_kv_heads",
                 f"must divide model.num_heads ({self.num_heads} % {self.num_kv_heads} != 0)")
        _require(self.head_dim % 2 == 0, "model.head_dim", f"must be even for RoPE, got {self.head_dim}")
        _require(self.family == "internvl3" or sum(self.mrope_section) * 2 == self.head_dim,
                 "model.mrope_section",
                 f"must sum to model.head_dim/2 = {self.head_dim // 2}, got {list(self.mrope_section)}")
        _require(self.init in ("checkpoint", "random"), "model.init",
                 f"must be 'checkpoint' or 'random', got {self.init!r}")

    @property
    def group(self) -> int:
        """GQA group size G = Hq / Hkv."""
        return self.num_heads // self.num_kv_heads


@dataclass
class TopologyConfig:
    """GPUs and links, with the rates the cost model uses (calibrated rates where measured)."""

    name: str = "h100_sxm"
    device: str = "NVIDIA H100 80GB HBM3"
    gpus: int = 8  # world size W (top-level shorthand: gpus=N)
    nodes: Optional[int] = None  # None: as few nodes as gpus_per_node allows (shorthand: nodes=N)
    gpus_per_node: int = 8
    memory_gib: float = 80.0  # device memory per GPU
    reserved_gib: float = 3.0  # CUDA context, allocator slack, workspace: not available to the plan
    peak_tflops: float = 989.0  # dense bf16 tensor-core peak (datasheet)
    gemm_tflops: float = 780.0  # achieved bf16 GEMM rate (measured)
    attention_tflops: float = 600.0  # achieved causal attention rate per useful FLOP
    hbm_gbps: float = 3000.0  # achieved device-memory bandwidth, GB/s (read + write)
    intra_node_gbps: float = 360.0  # NVLink all-gather bus bandwidth per GPU, GB/s
    inter_node_gbps: float = 45.0  # per-GPU network bandwidth between nodes, GB/s
    link_latency_us: float = 15.0  # fixed cost per collective step
    launch_overhead_us: float = 5.0  # fixed cost per kernel launch

    def __post_init__(self) -> None:
        _check_types(self, "topology.")
        _positive_int(self.gpus, "gpus", MAX_GPUS)
        _positive_int(self.gpus_per_node, "topology.gpus_per_node")
        if self.nodes is not None:
            _positive_int(self.nodes, "nodes")
            _require(self.gpus % self.nodes == 0, "nodes",
                     f"gpus={self.gpus} cannot be split evenly over nodes={self.nodes}")
            _require(self.gpus // self.nodes <= self.gpus_per_node, "nodes",
                     f"gpus={self.gpus} over nodes={self.nodes} needs {self.gpus // self.nodes} GPUs "
                     f"per node but topology.gpus_per_node={self.gpus_per_node}")
        for name in ("memory_gib", "peak_tflops", "gemm_tflops", "attention_tflops", "hbm_gbps",
                     "intra_node_gbps", "inter_node_gbps"):
            value = getattr(self, name)
            _require(isinstance(value, (int, float)) and value > 0, f"topology.{name}",
                     f"must be > 0, got {value!r}")
        for name in ("reserved_gib", "link_latency_us", "launch_overhead_us"):
            value = getattr(self, name)
            _require(isinstance(value, (int, float)) and value >= 0, f"topology.{name}",
                     f"must be >= 0, got {value!r}")
        _require(self.reserved_gib < self.memory_gib, "topology.reserved_gib",
                 f"must be below topology.memory_gib ({self.reserved_gib} >= {self.memory_gib})")

    @property
    def num_nodes(self) -> int:
        if self.nodes is not None:
            return self.nodes
        return -(-self.gpus // self.gpus_per_node)


def parse_resolution(text: str) -> tuple[int, int]:
    """'720p' or 'HEIGHTxWIDTH' (e.g. '720x1280') -> (height, width) in pixels."""
    key = str(text).strip().lower()
    if key in RESOLUTION_PRESETS:
        return RESOLUTION_PRESETS[key]
    match = re.fullmatch(r"(\d+)\s*x\s*(\d+)", key)
    if not match:
        raise ConfigError(f"cannot parse {text!r}; use one of {', '.join(RESOLUTION_PRESETS)} "
                          f"or HEIGHTxWIDTH such as 720x1280", setting="video.resolution")
    height, width = int(match.group(1)), int(match.group(2))
    _require(1 <= height <= MAX_SIDE and 1 <= width <= MAX_SIDE, "video.resolution",
             f"sides must be within 1..{MAX_SIDE} pixels, got {height}x{width}")
    return height, width


@dataclass
class VideoConfig:
    """The input: frame count and size, plus the text around the video."""

    frames: int = 64  # sampled frames (top-level shorthand: frames=N); padded to even for Qwen2-VL
    resolution: str = "1440p"  # preset (360p/720p/1080p/1440p...) or HEIGHTxWIDTH, e.g. 720x1280
    fps: float = 2.0  # sampling rate of the frames (Qwen2.5-VL temporal positions depend on it)
    # Tokens before the video (system prompt, user tag, <|vision_start|>). Fixed, not a range: the
    # chat template fixes the system prompt, and every video position and block boundary depends on it.
    system_tokens: int = 15
    # The plan's question capacity: any question of 1..max_question_tokens tokens runs on the same
    # plan and kernels (the runtime pads the query block and keeps pad tokens out of every real
    # row's attention); a longer one needs a plan with a larger value.
    max_question_tokens: int = 32
    path: Optional[str] = None  # the video file (runtime only; the planner needs only the counts)

    def __post_init__(self) -> None:
        _check_types(self, "video.")
        _positive_int(self.frames, "frames", MAX_FRAMES)
        parse_resolution(self.resolution)
        _require(isinstance(self.fps, (int, float)) and self.fps > 0, "video.fps",
                 f"must be > 0, got {self.fps!r}")
        _require(isinstance(self.system_tokens, int) and self.system_tokens >= 0, "video.system_tokens",
                 f"must be >= 0, got {self.system_tokens!r}")
        _positive_int(self.max_question_tokens, "video.max_question_tokens", 1 << 20)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the source frames."""
        return parse_resolution(self.resolution)


@dataclass
class MethodConfig:
    """The attention method and the Spava knobs (paper rules when a size is left at None)."""

    name: str = "spava"  # one of METHODS
    anchor_tokens: Optional[int] = None  # None: a = 128 * ceil((L // 64) / 128); 0 disables the anchor
    passing_tokens: Optional[int] = None  # None: p = 128 * ceil((L // 128) / 128) (apb: L // 64 to 128)
    pass_all: bool = False  # pass every token of every block (Spava then equals dense attention)
    hosts_per_gpu: int = 2  # virtual hosts per rank (2 = ZigZag pairs)
    pool_window: int = 5  # max-pool window over selection scores (odd; 1 disables smoothing)
    selection: str = "query_aware"  # "query_aware" (Spava) or "key_norm" (APB stand-in, query-unaware)
    overlap: bool = True  # hide the selection all-gathers behind host-1 attention

    def __post_init__(self) -> None:
        _check_types(self, "method.")
        _require(self.name in METHODS, "method", f"unknown method {self.name!r}; choose one of {', '.join(METHODS)}")
        for name in ("anchor_tokens", "passing_tokens"):
            value = getattr(self, name)
            _require(value is None or (isinstance(value, int) and value >= 0), f"method.{name}",
                     f"must be null (paper rule) or an integer >= 0, got {value!r}")
        _require(self.passing_tokens is None or self.passing_tokens % 128 == 0, "method.passing_tokens",
                 f"must be a multiple of 128 (selection works in 128-token tiles), got {self.passing_tokens}")
        _positive_int(self.hosts_per_gpu, "method.hosts_per_gpu", 64)
        _require(isinstance(self.pool_window, int) and self.pool_window >= 1 and self.pool_window % 2 == 1,
                 "method.pool_window", f"must be a positive odd integer, got {self.pool_window!r}")
        _require(self.selection in SELECTIONS, "method.selection",
                 f"must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")


@dataclass
class SolverConfig:
    """How virtual hosts are placed on ranks."""

    name: str = "zigzag"  # one of SOLVERS
    exact_max_hosts: int = 16  # the exact solver refuses larger problems (it is exponential)
    iterations: int = 2000  # local_search move budget
    seed: int = 0  # local_search randomness (deterministic for a given seed)

    def __post_init__(self) -> None:
        _check_types(self, "solver.")
        _require(self.name in SOLVERS, "solver", f"unknown solver {self.name!r}; choose one of {', '.join(SOLVERS)}")
        _positive_int(self.exact_max_hosts, "solver.exact_max_hosts", 64)
        _positive_int(self.iterations, "solver.iterations")
        _require(isinstance(self.seed, int) and self.seed >= 0, "solver.seed", f"must be >= 0, got {self.seed!r}")


@dataclass
class SpavaConfig:
    """The root config: what `spava-plan` composes from conf/config.yaml and the command line."""

    model: ModelConfig = field(default_factory=ModelConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    # Shorthands: conf/config.yaml interpolates them into topology.gpus, topology.nodes, video.frames.
    gpus: int = 8
    nodes: Optional[int] = None
    frames: int = 64
    dtype: str = "bf16"  # activation / KV dtype of the run
    kernels: bool = True  # render the plan's Triton kernels next to plan.json

    def __post_init__(self) -> None:
        _check_types(self, "")
        _require(self.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        # topology/video hold the truth (conf/config.yaml feeds the shorthands into them); mirror
        # them back so the stored config never disagrees with itself.
        self.gpus, self.nodes, self.frames = self.topology.gpus, self.topology.nodes, self.video.frames

    @property
    def dtype_bytes(self) -> int:
        return DTYPES[self.dtype]


def to_config(cfg: Any) -> SpavaConfig:
    """A composed OmegaConf/Hydra config (or a plain dict) -> a validated SpavaConfig.

    Type errors OmegaConf raises (a string where an int belongs) become ConfigError naming the key.
    """
    if isinstance(cfg, SpavaConfig):
        return cfg
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    _reject_unknown_keys(cfg, SpavaConfig, "")
    try:
        structured = OmegaConf.merge(OmegaConf.structured(SpavaConfig), cfg)
        obj = OmegaConf.to_object(structured)
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "config"
        raise ConfigError(f"{exc.msg if hasattr(exc, 'msg') else exc}".splitlines()[0], setting=str(key)) from None
    assert isinstance(obj, SpavaConfig)
    return obj


def _reject_unknown_keys(cfg: Any, cls: type, prefix: str) -> None:
    """A key the schema does not know (e.g. a typo added with +key=) would be dropped silently."""
    from omegaconf import DictConfig

    if not isinstance(cfg, (dict, DictConfig)):
        return
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in cfg.keys():
        name = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown setting {name!r}; known here: {', '.join(fields)}", setting=name)
        sub = fields[key].type
        target = {"ModelConfig": ModelConfig, "VisionConfig": VisionConfig, "TopologyConfig": TopologyConfig,
                  "VideoConfig": VideoConfig, "MethodConfig": MethodConfig, "SolverConfig": SolverConfig}.get(
            sub if isinstance(sub, str) else getattr(sub, "__name__", ""))
        if target is not None:
            _reject_unknown_keys(cfg[key], target, f"{name}.")


def config_to_dict(cfg: SpavaConfig) -> dict:
    """The fully resolved config as plain JSON-able data (stored in plan.json)."""
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict) -> SpavaConfig:
    """Inverse of config_to_dict (runs validation again)."""
    return to_config(data)
