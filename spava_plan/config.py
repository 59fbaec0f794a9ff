"""Configuration schemas: one documented dataclass per Hydra config group.

YAML files under conf/ only supply values; the types, defaults and the validation live here.
Validation happens once, in ``__post_init__`` (which OmegaConf runs when a composed config is
turned into these objects with ``to_config``), and every message names the knob to change.
After validation every value is trusted downstream.

No torch import here: planning runs on a laptop with only the light dependencies.
"""
from __future__ import annotations

import contextvars
import copy
import dataclasses
import functools
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, List, Optional

from .calibration_config import CalibrationConfig
from .errors import ConfigError
from .tune_config import TuneConfig
from .vocab import DTYPE_BYTES, RopeType

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
# RoPE scalings the runtime reproduces exactly (transformers' rope types; runtime/rope.py): the
# supported checkpoints use default (Qwen2-VL, Qwen2.5-VL) and dynamic NTK (InternVL3).
ROPE_TYPES = typing.get_args(RopeType)
METHODS = ("spava", "apb", "star", "zigzag_ring", "dense", "dense_tp")
SOLVERS = ("zigzag", "greedy", "exact", "local_search")
SELECTIONS = ("query_aware", "key_norm")
# How a Spava host's passing block is formed: ``per_block`` (the paper: every earlier block passes
# its own top k, so host v attends v*k keys) or ``global`` (host v receives the P best keys of all
# earlier hosts, ranked together: a budget that does not grow with the hosts; SPAVA_SPEC.md s. 11).
PASSINGS = ("per_block", "global")
# Where the vision tower runs: "frames" (SPAVA_SPEC.md section 2: every rank encodes its share of the
# temporal grids) or "one_gpu" (rank 0 encodes the whole video and scatters the embeddings, as vLLM
# and SGLang hand a whole video to one encoder GPU: zigzag_ring with it is their context parallelism).
VISION_PARALLELS = ("frames", "one_gpu")
# method.anchor: how the ranks other than rank 0 get the anchor's K/V (methods with an anchor:
# spava, apb, star). recompute: every rank runs the anchor rows through every layer itself;
# broadcast: rank 0, which holds the anchor as its first rows, sends their K/V every layer.
ANCHOR_MODES = ("broadcast", "recompute")
ANCHOR_METHODS = ("spava", "apb", "star")  # the methods with an anchor (dense and zigzag_ring ignore it)
DTYPES = DTYPE_BYTES  # plan dtype -> bytes per element (spava_plan.vocab)

# Sanity ceilings: beyond these a value is a typo, not a workload. The planner's time and its
# artifacts grow with gpus: at the ceilings (the largest sizes benchmarks/plan_speed.py times)
# planning takes about 6 s of CPU and writes about 16 MB, at any resolution.
MAX_FRAMES = 1 << 17
MAX_GPUS = 1 << 10
MAX_SIDE = 16384
MAX_TOKENS = 1 << 24  # anchor / passing budgets and question lengths: beyond any context planned
MAX_INT = 1 << 31  # any other integer knob (layer counts, widths, pixel bounds...)
MAX_TEXT = 512  # characters in a string setting (names, paths)
MAX_POOL_WINDOW = 127  # a max-pool wider than a 128-token selection tile smooths the selection away
FPS_RANGE = (0.01, 1000.0)  # frames per second of the sampled video
# local_search: solver.iterations x max(gpus, 16) rank visits (each move scans the ranks, plus a
# fixed cost per move): 10^7 is about 2 s of search on one core.
MAX_SEARCH_STEPS = 10_000_000
SEARCH_MIN_RANKS = 16

# Type checks. When a config comes through OmegaConf (the command line, YAML, to_config), the
# structured config has already checked every value against its annotation and converted it, so
# the dataclasses skip their own check (``_OMEGACONF_TYPED`` is set by ``_to_object``). A dataclass
# built directly in Python (tests, library users) gets no such check, so the type check in ``_check_fields`` runs
# there: a string in a bool field must not slip through. Everything else (finite floats, printable
# strings, bounds, consistency) is checked on both paths.
_OMEGACONF_TYPED: contextvars.ContextVar[bool] = contextvars.ContextVar("_OMEGACONF_TYPED", default=False)


def _require(ok: bool, setting: str, message: str) -> None:
    if not ok:
        raise ConfigError(message, setting=setting)


def _positive_int(value: Any, setting: str, maximum: int | None = None) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, setting,
             f"must be a positive integer, got {value!r}")
    if maximum is not None:
        _require(value <= maximum, setting, f"must be at most {maximum}, got {value}")


def _finite_number(value: Any, setting: str, low: float, high: float | None = None, strict: bool = False) -> None:
    """A finite number >= low (> low when ``strict``) and <= high."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if strict else value >= low) and (high is None or value <= high)
    bound = f"{'>' if strict else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
    _require(ok, setting, f"must be a finite number {bound}, got {value!r}")


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
    return dataclasses.is_dataclass(hint) and isinstance(value, hint)


def _scalars(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _check_fields(obj: Any, prefix: str) -> None:
    """Checks every field of every schema needs, driven by the annotations (a field added later is
    covered without new code): its type (Python-built dataclasses only, see above), finite floats,
    integers within MAX_INT, printable strings of at most MAX_TEXT characters."""
    hints = _field_hints(type(obj))
    typed = _OMEGACONF_TYPED.get()
    for f in dataclasses.fields(obj):
        value, hint, setting = getattr(obj, f.name), hints[f.name], f"{prefix}{f.name}"
        if not typed and not _matches(value, hint):
            name = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
            _require(False, setting, f"must be of type {name}, got {value!r}")
        for item in _scalars(value):
            if isinstance(item, float):
                _require(math.isfinite(item), setting, f"must be a finite number, got {item!r}")
            elif isinstance(item, int) and not isinstance(item, bool):
                _require(abs(item) <= MAX_INT, setting, f"must be at most {MAX_INT} in magnitude, got {item}")
            elif isinstance(item, str):
                _require(len(item) <= MAX_TEXT, setting, f"must be at most {MAX_TEXT} characters, got {len(item)}")
                _require(item.isprintable(), setting,
                         f"must not contain control characters (newline, tab...), got {item!r}")


@dataclass
class VisionConfig:
    """The vision tower: how frames become tokens, and its size (for cost and memory)."""

    patch_size: int = 14  # ViT patch side in pixels
    spatial_merge: int = 2  # patches merged per side into one LLM token (2x2 merge)
    temporal_patch: int = 2  # frames per temporal grid (Qwen2-VL: 2)
    min_pixels: int = 56 * 56  # processor's lower pixel bound per frame
    max_pixels: int = 28 * 28 * 16384  # processor's upper pixel bound per frame
    # transformers' video processor keyword of the same name (qwen-vl-utils' rule): each frame is
    # also bounded by an even share of max_video_tokens tokens' worth of pixels (90% of it), floored
    # at 1.05 x min_pixels. false: the per-frame bound alone (transformers' default up to 5.25).
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 128000  # the budget the cap divides over the frames
    tile_size: int = 448  # InternVL3: square tile side (one tile per frame)
    tile_tokens: int = 256  # InternVL3: LLM tokens per tile after pixel shuffle
    frame_text_tokens: int = 0  # InternVL3: text tokens of "Frame{i}: <img>...</img>\n" except i's digits (6)
    depth: int = 32  # ViT layers
    hidden_size: int = 1280  # ViT width
    num_heads: int = 16
    intermediate_size: int = 5120
    out_hidden_size: int = 3584  # merger output width (= LLM hidden size)

    def __post_init__(self) -> None:
        _check_fields(self, "model.vision.")
        for name in ("patch_size", "spatial_merge", "temporal_patch", "min_pixels", "max_pixels", "max_video_tokens",
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
class RopeScalingConfig:
    """The language model's RoPE scaling, as its config.json's ``rope_scaling`` names it.

    dynamic (InternVL3): NTK scaling from the largest position of the whole sequence once it
    passes ``model.max_position_embeddings``; linear: positions divided by ``factor``."""

    rope_type: str = "default"  # one of ROPE_TYPES
    factor: float = 1.0

    def __post_init__(self) -> None:
        _check_fields(self, "model.rope_scaling.")
        _require(self.rope_type in ROPE_TYPES, "model.rope_scaling.rope_type",
                 f"unsupported RoPE scaling {self.rope_type!r}; the runtime reproduces {', '.join(ROPE_TYPES)}")
        _finite_number(self.factor, "model.rope_scaling.factor", 1.0, 1e6)
        _require(self.rope_type != "default" or self.factor == 1.0, "model.rope_scaling.factor",
                 f"must be 1.0 for rope_type=default (no scaling), got {self.factor!r}")


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
    # the checkpoint's pretraining length: where dynamic RoPE scaling starts
    max_position_embeddings: int = 32768
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    checkpoint: Optional[str] = None  # path to a Hugging Face checkpoint (runtime only)
    init: str = "checkpoint"  # "checkpoint" or "random" (real-size random weights for benchmarks)

    def __post_init__(self) -> None:
        _check_fields(self, "model.")
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
        _finite_number(self.rope_theta, "model.rope_theta", 0.0, strict=True)
        _require(all(part >= 0 for part in self.mrope_section), "model.mrope_section",
                 f"parts must be >= 0, got {list(self.mrope_section)}")
        _require(self.family == "internvl3" or len(self.mrope_section) == 3, "model.mrope_section",
                 f"must have 3 parts (temporal, height, width), got {list(self.mrope_section)}")
        _positive_int(self.tokens_per_second, "model.tokens_per_second", 1000)
        _positive_int(self.max_position_embeddings, "model.max_position_embeddings", MAX_INT)

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
    calibration: Optional[CalibrationConfig] = None  # set by calibrated presets: device, held-out error

    def __post_init__(self) -> None:
        _check_fields(self, "topology.")
        if self.calibration is not None:  # its own module checks presence; finiteness and text here
            _check_fields(self.calibration, "topology.calibration.")
        _positive_int(self.gpus, "gpus", MAX_GPUS)
        _positive_int(self.gpus_per_node, "topology.gpus_per_node", MAX_GPUS)
        if self.nodes is not None:
            _positive_int(self.nodes, "nodes")
            _require(self.gpus % self.nodes == 0, "nodes",
                     f"gpus={self.gpus} cannot be split evenly over nodes={self.nodes}")
            _require(self.gpus // self.nodes <= self.gpus_per_node, "nodes",
                     f"gpus={self.gpus} over nodes={self.nodes} needs {self.gpus // self.nodes} GPUs "
                     f"per node but topology.gpus_per_node={self.gpus_per_node}")
        else:  # nodes left to the planner: every node must be full, or the ranks sit on uneven nodes
            _require(self.gpus <= self.gpus_per_node or self.gpus % self.gpus_per_node == 0,
                     "topology.gpus_per_node",
                     f"gpus={self.gpus} does not fill nodes of {self.gpus_per_node} GPUs evenly; choose "
                     f"gpus as a multiple of topology.gpus_per_node or set nodes=N")
        for name in ("memory_gib", "peak_tflops", "gemm_tflops", "attention_tflops", "hbm_gbps",
                     "intra_node_gbps", "inter_node_gbps"):
            _finite_number(getattr(self, name), f"topology.{name}", 0.0, strict=True)
        for name in ("reserved_gib", "link_latency_us", "launch_overhead_us"):
            _finite_number(getattr(self, name), f"topology.{name}", 0.0)
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

    frames: int = 256  # sampled frames (top-level shorthand: frames=N); padded to even for Qwen2-VL
    resolution: str = "720p"  # preset (360p/720p/1080p/1440p...) or HEIGHTxWIDTH, e.g. 720x1280
    fps: float = 2.0  # sampling rate of the frames (Qwen2.5-VL temporal positions depend on it)
    # Tokens before the video (system prompt, user tag, <|vision_start|>). Fixed, not a range: the
    # chat template fixes the system prompt, and every video position and block boundary depends on it.
    system_tokens: int = 15
    # The plan's question capacity: any question of 1..max_question_tokens tokens runs on the same
    # plan and kernels (the runtime pads the query block and keeps pad tokens out of every real
    # row's attention); a longer one needs a plan with a larger value.
    max_question_tokens: int = 32
    # A clip to plan for: `spava-plan video.path=clip.mp4` takes frames (sampled at video.fps within
    # min_frames..max_frames, as the model's processor samples) and resolution from its metadata.
    path: Optional[str] = None
    min_frames: int = 4  # the processor's bounds on fps-based sampling (Qwen2-VL video processor)
    max_frames: int = 768

    def __post_init__(self) -> None:
        _check_fields(self, "video.")
        _positive_int(self.frames, "frames", MAX_FRAMES)
        parse_resolution(self.resolution)
        _finite_number(self.fps, "video.fps", *FPS_RANGE)
        _require(isinstance(self.system_tokens, int) and 0 <= self.system_tokens <= MAX_TOKENS,
                 "video.system_tokens", f"must be an integer within 0..{MAX_TOKENS}, got {self.system_tokens!r}")
        _positive_int(self.max_question_tokens, "video.max_question_tokens", MAX_TOKENS)
        _positive_int(self.min_frames, "video.min_frames", MAX_FRAMES)
        _positive_int(self.max_frames, "video.max_frames", MAX_FRAMES)
        _require(self.min_frames <= self.max_frames, "video.min_frames",
                 f"must not exceed video.max_frames ({self.min_frames} > {self.max_frames})")

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the source frames."""
        return parse_resolution(self.resolution)


@dataclass
class MethodConfig:
    """The attention method and the Spava knobs (paper rules when a size is left at None)."""

    name: str = "spava"  # one of METHODS
    anchor_tokens: Optional[int] = None  # None: a = 128 * ceil((L // 64) / 128); 0 disables the anchor
    # per_block: tokens per KV head each block passes on (None: p = 128 * ceil((L // 128) / 128);
    # apb: L // 64 to 128). global: P, the keys per KV head each host receives in total (None: the
    # rule of planner/partition.py global_passing, a fixed per-host budget); with global a None
    # anchor_tokens is the paper's rule capped at one block (planner/partition.py global_anchor).
    passing_tokens: Optional[int] = None
    passing: str = "per_block"  # one of PASSINGS
    pass_all: bool = False  # pass every token of every block (Spava then equals dense attention)
    hosts_per_gpu: int = 2  # virtual hosts per rank (2 = ZigZag pairs)
    pool_window: int = 5  # max-pool window over selection scores (odd; 1 disables smoothing)
    selection: str = "query_aware"  # "query_aware" (Spava) or "key_norm" (APB stand-in, query-unaware)
    overlap: bool = True  # hide the selection all-gathers behind host-1 attention
    # one of ANCHOR_MODES; ignored by the methods without an anchor (dense, zigzag_ring), like the
    # other Spava-only fields
    anchor: str = "broadcast"

    def __post_init__(self) -> None:
        _check_fields(self, "method.")
        _require(self.name in METHODS, "method", f"unknown method {self.name!r}; choose one of {', '.join(METHODS)}")
        for name in ("anchor_tokens", "passing_tokens"):
            value = getattr(self, name)
            _require(value is None or (isinstance(value, int) and 0 <= value <= MAX_TOKENS), f"method.{name}",
                     f"must be null (paper rule) or an integer within 0..{MAX_TOKENS}, got {value!r}")
        _require(self.passing_tokens is None or self.passing_tokens % 128 == 0, "method.passing_tokens",
                 f"must be a multiple of 128 (selection works in 128-token tiles), got {self.passing_tokens}")
        _positive_int(self.hosts_per_gpu, "method.hosts_per_gpu", 64)
        _require(isinstance(self.pool_window, int) and 1 <= self.pool_window <= MAX_POOL_WINDOW
                 and self.pool_window % 2 == 1, "method.pool_window",
                 f"must be an odd integer within 1..{MAX_POOL_WINDOW} (wider windows smooth a 128-token "
                 f"selection tile away), got {self.pool_window!r}")
        _require(self.selection in SELECTIONS, "method.selection",
                 f"must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        _require(self.anchor in ANCHOR_MODES, "method.anchor",
                 f"must be one of {', '.join(ANCHOR_MODES)}, got {self.anchor!r}")
        _require(self.passing in PASSINGS, "method.passing",
                 f"must be one of {', '.join(PASSINGS)}, got {self.passing!r}")
        if self.passing == "global":
            _require(self.name == "spava", "method.passing",
                     f"global passing is a Spava mode; method={self.name} passes per block (or nothing): "
                     f"use method.passing=per_block")
            _require(not self.pass_all, "method.pass_all",
                     "pass_all passes every block whole, which global passing (a bounded budget) cannot; "
                     "use method.passing=per_block with pass_all=true")


@dataclass
class VisionParallelConfig:
    """How the vision encoder is spread over the ranks (the tower's shape is model.vision)."""

    parallel: str = "frames"  # one of VISION_PARALLELS

    def __post_init__(self) -> None:
        _check_fields(self, "vision.")
        _require(self.parallel in VISION_PARALLELS, "vision.parallel",
                 f"must be one of {', '.join(VISION_PARALLELS)}, got {self.parallel!r}")


@dataclass
class SolverConfig:
    """How virtual hosts are placed on ranks."""

    name: str = "zigzag"  # one of SOLVERS
    exact_max_hosts: int = 16  # the exact solver refuses larger problems (it is exponential)
    iterations: int = 2000  # local_search move budget
    seed: int = 0  # local_search randomness (deterministic for a given seed)

    def __post_init__(self) -> None:
        _check_fields(self, "solver.")
        _require(self.name in SOLVERS, "solver", f"unknown solver {self.name!r}; choose one of {', '.join(SOLVERS)}")
        _positive_int(self.exact_max_hosts, "solver.exact_max_hosts", 64)
        _positive_int(self.iterations, "solver.iterations", MAX_SEARCH_STEPS // SEARCH_MIN_RANKS)
        _require(isinstance(self.seed, int) and self.seed >= 0, "solver.seed", f"must be >= 0, got {self.seed!r}")


@dataclass
class SpavaConfig:
    """The root config: what `spava-plan` composes from conf/config.yaml and the command line.

    Every default lives here (and in the group dataclasses above): the defaults are Qwen2-VL-7B on
    8 x H100 SXM, 256 frames at 720p, Spava, the zigzag solver. The YAML presets only choose values
    (a test checks that composing conf/config.yaml without overrides gives ``SpavaConfig()``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)  # `tune=latency`: let the planner choose the knobs
    vision: VisionParallelConfig = field(default_factory=VisionParallelConfig)  # vision.parallel=frames|one_gpu
    dtype: str = "bf16"  # activation / KV dtype of the run
    kernels: bool = True  # render the plan's Triton kernels next to plan.json

    def __post_init__(self) -> None:
        _check_fields(self, "")
        _check_fields(self.tune, "tune.")  # tune_config.py checks the choices; types, finiteness, text here
        _require(self.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.solver.name == "local_search":  # each move scans the ranks: bound the whole search
            ranks = max(self.topology.gpus, SEARCH_MIN_RANKS)
            _require(self.solver.iterations * ranks <= MAX_SEARCH_STEPS, "solver.iterations",
                     f"{self.solver.iterations:,} moves over {self.topology.gpus} GPUs exceed the search budget "
                     f"(about 2 s); lower solver.iterations to at most {MAX_SEARCH_STEPS // ranks:,}")

    # The command-line shorthands, read back from the one place that holds each value.
    @property
    def gpus(self) -> int:
        return self.topology.gpus

    @property
    def nodes(self) -> Optional[int]:
        return self.topology.nodes

    @property
    def frames(self) -> int:
        return self.video.frames

    @property
    def dtype_bytes(self) -> int:
        return DTYPES[self.dtype]


# Top-level shorthands of the command line (`spava-plan gpus=16 nodes=2 frames=2048`) and the field
# each one sets. They are resolved once, in ``to_config``; a shorthand left out (None) leaves its
# field at the group's value.
SHORTHANDS = {"gpus": ("topology", "gpus"), "nodes": ("topology", "nodes"), "frames": ("video", "frames")}


@dataclass
class CommandLineConfig(SpavaConfig):
    """The schema Hydra composes into (conf/config.yaml's ``spava_schema``): SpavaConfig plus the
    shorthands. Never planned from directly: ``to_config`` folds the shorthands in."""

    gpus: Optional[int] = None  # type: ignore[assignment]  # sets topology.gpus
    nodes: Optional[int] = None  # type: ignore[assignment]  # sets topology.nodes
    frames: Optional[int] = None  # type: ignore[assignment]  # sets video.frames


def to_config(cfg: Any) -> SpavaConfig:
    """A composed OmegaConf/Hydra config (or a plain dict such as a plan's stored config) -> a
    validated SpavaConfig.

    Errors OmegaConf raises (a string where an int belongs, an interpolation that does not
    resolve) become a ConfigError naming the key.
    """
    if type(cfg) is SpavaConfig:
        return cfg
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        if isinstance(cfg, DictConfig):
            data = OmegaConf.to_container(cfg, resolve=True)
        elif isinstance(cfg, CommandLineConfig):
            data = OmegaConf.to_container(OmegaConf.structured(cfg))
        else:
            data = copy.deepcopy(dict(cfg))
        assert isinstance(data, dict)
        _reject_unknown_keys(data, CommandLineConfig, "")
        for short, (group, name) in SHORTHANDS.items():
            value = data.pop(short, None)
            if value is not None:
                data.setdefault(group, {})[name] = value
        structured = OmegaConf.merge(_schema(), data)
        obj = _to_object(structured)
    except ConfigError:
        raise
    except (OmegaConfBaseException, OverflowError, ValueError, TypeError) as exc:
        # OmegaConf's own errors, and a conversion it attempted (an int of 400 digits into a
        # float field raises OverflowError with the key attached)
        key = getattr(exc, "full_key", None) or "config"
        text = str(getattr(exc, "msg", None) or exc).strip().splitlines() or [type(exc).__name__]
        raise ConfigError(text[0], setting=str(key)) from None
    assert type(obj) is SpavaConfig
    return obj


@functools.lru_cache(maxsize=1)
def _schema() -> Any:
    """SpavaConfig as an OmegaConf node, built once (merge copies it)."""
    from omegaconf import OmegaConf

    return OmegaConf.structured(SpavaConfig)


def _to_object(structured: Any) -> Any:
    """OmegaConf.to_object with the dataclasses' own type check switched off (OmegaConf checked)."""
    from omegaconf import OmegaConf

    token = _OMEGACONF_TYPED.set(True)
    try:
        return OmegaConf.to_object(structured)
    finally:
        _OMEGACONF_TYPED.reset(token)


def _reject_unknown_keys(data: Any, cls: type, prefix: str) -> None:
    """A key the schema does not know (e.g. a typo added with +key=) would be dropped silently."""
    if not isinstance(data, dict):
        return
    hints = _field_hints(cls)
    for key in data:
        name = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(f"unknown setting {name!r}; known here: {', '.join(hints)}", setting=name)
        sub = _dataclass_of(hints[key])
        if sub is not None:
            _reject_unknown_keys(data[key], sub, f"{name}.")


def _dataclass_of(hint: Any) -> Any:
    """The dataclass a field holds (Optional[X] included), else None."""
    for candidate in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


def config_to_dict(cfg: SpavaConfig) -> dict:
    """The fully resolved config as plain JSON-able data (stored in plan.json), with the shorthands
    spelled out as a reader of the command line expects them."""
    data = dataclasses.asdict(cfg)
    for short, (group, name) in SHORTHANDS.items():
        data[short] = data[group][name]
    return data


def config_from_dict(data: dict) -> SpavaConfig:
    """Inverse of config_to_dict (runs validation again)."""
    return to_config(data)
