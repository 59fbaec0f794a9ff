"""Schemas of the two deployment entry points, `spava-run` and `spava-serve` (Hydra apps).

Both compose the same config tree as `spava-plan` (conf/: model, topology, video, method, solver
groups and the gpus/nodes/frames shorthands) plus their own options, typed and validated here once:

    RunConfig    the planner's schema (CommandLineConfig: groups and shorthands, inherited) + plan=,
                 question=, max_new_tokens, backend, device, dtype, comm, timeout, seed, replan,
                 emulated_timing, rank, warmup, tune_only              (conf/run.yaml)
    ServeConfig  RunConfig + host, port, queue_size, plan_dir, plan_on_the_fly, and the request path's
                 policy and bounds: api_key, allowed_origins, allowed_media_domains, allow_private_media,
                 allowed_local_media_path, max_video_bytes, media_timeout, max_frames, max_pixels,
                 max_body_bytes, max_connections, header/read/keep_alive timeouts, request_timeout,
                 warmup_plans, prefetch                                          (conf/serve.yaml)

``video=PATH`` keeps its old meaning on these commands: when the value is not an option of the video
config group it is rewritten to ``video.path=PATH`` (``argv_shorthands``).

No torch import here (composing a run config is as light as composing a plan config).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import unicodedata
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any, List, Optional, Sequence

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..config import MAX_TEXT, SHORTHANDS, CommandLineConfig, DTYPES, SpavaConfig, _check_fields, to_config
from ..errors import ConfigError, InputError
from ..hydra_conf import CONFIG_MODULE, hydra_error, register_schema

CHOICES = {
    "backend": ("auto", "torch", "triton"),
    "device": ("auto", "cpu", "cuda"),
    "dtype": ("plan", "bf16", "fp16", "fp32", "fp64"),
    "comm": ("auto", "dist", "emulated"),
    "video_decode": ("own", "all"),
}
# Ceilings: beyond these a value is a typo, not a workload (DESIGN.md: bound every knob that drives
# time or size). The decode KV cache is allocated for max_new_tokens up front, so an unbounded value
# would end in an allocator failure instead of a clear line.
MAX_NEW_TOKENS = 32768
MAX_TIMEOUT_S = 7 * 24 * 3600.0
MAX_QUEUE = 4096
MAX_QUESTION_CHARS = MAX_TEXT  # as any text setting


def _require(ok: bool, setting: str, message: str) -> None:
    if not ok:
        raise ConfigError(message, setting=setting)


@dataclass
class RunConfig(CommandLineConfig):
    """`spava-run`: the planner's config tree (CommandLineConfig: its groups and shorthands, by
    inheritance) plus the options of one run. ``plan_config()`` is the planner's part, validated by
    the planner's own schema."""

    # -- the planner's fields whose meaning a run widens ----------------------------------------
    dtype: str = "plan"  # plan | bf16 | fp16 | fp32 | fp64 (fp64: torch backend only)
    kernels: bool = False  # a plan made for the input renders its kernels on demand, not next to it
    # -- the run -------------------------------------------------------------------------------
    plan: Optional[str] = None  # plan.json from spava-plan; null: plan from this config for the input
    question: Optional[str] = None  # the question about the video (video=PATH is video.path)
    max_new_tokens: int = 32  # tokens to generate (the first one comes from prefill)
    replan: bool = False  # plan again when the input does not match the plan (saved next to the output)
    backend: str = "auto"  # auto | torch | triton (auto: triton on CUDA, the torch reference otherwise)
    device: str = "auto"  # auto | cpu | cuda
    comm: str = "auto"  # auto (torchrun -> torch.distributed, else emulated) | dist | emulated
    timeout: float = 300.0  # seconds a rank waits for its peers before failing (process-group timeout)
    # Under torchrun: each rank decodes and preprocesses only the sampled frames of its own temporal
    # grids (own: 1/W of the decode and processor; no rank reads another's pixels) or every frame (all).
    # Emulated ranks share one process and always decode every frame (its parallel decoders split them).
    video_decode: str = "own"
    seed: int = 0  # random weights / pixels / synthetic prompts (model.init=random)
    emulated_timing: bool = False  # one process: also report the emulated W-rank time to first token
    rank: Optional[int] = None  # single-rank mode: run only rank R of the plan here (runtime/solo.py)
    warmup: bool = False  # one untimed pass (one token) before the timed run: the timings exclude compiles
    tune_only: bool = False  # render (CPU) / tune and compile (GPU) the plan's kernels on this device, then exit

    def __post_init__(self) -> None:
        # The question is free text: checked below, not by the field checks' printable rule.
        question, self.question = self.question, None
        try:
            _check_fields(self, "")
        finally:
            self.question = question
        _fold_shorthands(self)
        for key, options in CHOICES.items():
            value = getattr(self, key)
            _require(value in options, key, f"must be one of {', '.join(options)}, got {value!r}")
        _require(1 <= self.max_new_tokens <= MAX_NEW_TOKENS, "max_new_tokens",
                 f"must be >= 1 and at most {MAX_NEW_TOKENS} (the decode cache is allocated for it up front), "
                 f"got {self.max_new_tokens}")
        _require(math.isfinite(self.timeout) and 0 < self.timeout <= MAX_TIMEOUT_S, "timeout",
                 f"must be a number of seconds > 0 and at most {MAX_TIMEOUT_S:g} (7 days), got {self.timeout!r}")
        _require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        _require(self.rank is None or self.rank >= 0, "rank", f"must be >= 0 (a rank of the plan), got {self.rank}")
        _require(self.model.init == "random" or bool(self.model.checkpoint), "model.checkpoint",
                 "is required: a checkpoint folder or a Hugging Face model id in the local cache "
                 "(or model.init=random for random weights)")
        _require(not self.tune_only or bool(self.plan), "tune_only", "needs plan=PATH: the plan whose kernels to tune")
        if self.question is not None:
            check_question(self.question)
        self.plan_config()  # the planner's part, validated by its own schema (e.g. the solver's budget)

    # -- derived ---------------------------------------------------------------------------------
    def plan_config(self) -> SpavaConfig:
        """The planner's config for planning on the fly (no plan=): SpavaConfig's fields of this
        config; the run's dtype picks the planned activation dtype (fp64 is planned as fp32, plan as
        bf16); kernels are rendered on demand."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(SpavaConfig)}
        data = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in data.items()}
        data["dtype"] = self.dtype if self.dtype in DTYPES else ("fp32" if self.dtype == "fp64" else "bf16")
        data["kernels"] = False
        return to_config(data)


# Request-path ceilings of spava-serve (serve_media / serve_http): beyond them a value is a typo.
MAX_VIDEO_BYTES = 64 * 2 ** 30
MAX_CONNECTIONS = 100_000
DEFAULT_VIDEO_BYTES = 256 * 2 ** 20


def data_url_bytes(video_bytes: int) -> int:
    """Body bytes a data: URL of ``video_bytes`` needs: base64 (4 per 3) plus 1 MiB for the rest."""
    return -(-video_bytes // 3) * 4 + 2 ** 20


def _fold_shorthands(cfg: CommandLineConfig) -> None:
    """The shorthands (config.SHORTHANDS: gpus=, nodes=, frames=) into their groups (which validate
    them), and the groups' values mirrored back, as spava-plan's to_config resolves them."""
    by_group: dict[str, dict[str, Any]] = {}
    for short, (group, name) in SHORTHANDS.items():
        if getattr(cfg, short) is not None:
            by_group.setdefault(group, {})[name] = getattr(cfg, short)
    for group, values in by_group.items():
        setattr(cfg, group, dataclasses.replace(getattr(cfg, group), **values))
    for short, (group, name) in SHORTHANDS.items():
        setattr(cfg, short, getattr(getattr(cfg, group), name))


def check_question(question: str, setting: str = "question") -> None:
    """Free text in any script: right-to-left marks, zero-width joiners (emoji) and other format
    characters (Unicode Cf) are text; control characters (Cc: NUL, escape sequences, newlines) and
    lone surrogates are not."""
    _require(len(question) <= MAX_QUESTION_CHARS, setting,
             f"must be at most {MAX_QUESTION_CHARS} characters, got {len(question)}")
    bad = next((c for c in question if unicodedata.category(c) in ("Cc", "Cs")), None)
    _require(bad is None, setting, f"must not contain control characters, got {bad!r} at position "
                                   f"{question.find(bad) if bad is not None else -1}")


@dataclass
class ServeConfig(RunConfig):
    """`spava-serve`: a run config whose requests come over HTTP (OpenAI-compatible API).

    Secure by default: no file:// (allowed_local_media_path unset), no http(s) media
    (allowed_media_domains empty), no private/loopback addresses, no CORS; every request bounded in
    bytes (max_body_bytes, max_video_bytes), frames and pixels (from the clip's metadata, before
    decoding) and time (header_timeout, read_timeout, media_timeout, request_timeout)."""

    host: str = "127.0.0.1"  # address rank 0 listens on (0.0.0.0: every interface)
    port: int = 8000
    served_model_name: Optional[str] = None  # the "model" of /v1/models (default: model.name); others get 404
    queue_size: int = 8  # requests waiting behind the running one; more get HTTP 429
    # A plan family (index.json, e.g. a `spava-plan -m ...` sweep root) to pick the smallest fitting
    # plan from; plans made on the fly are added to it under cache/ (relative: to the working directory).
    plan_dir: str = "plans"
    plan_on_the_fly: bool = True  # false: a video that no plan of plan_dir holds is refused (HTTP 400)
    max_cached_plans: int = 16  # plans planned on the fly kept in plan_dir/cache (least recently used evicted)
    max_plan_tokens: int = 1048576  # a larger plan is never planned on the fly (HTTP 400; plan it with spava-plan)
    request_timeout: float = 600.0  # seconds one request may take in all (fetch..decode); then HTTP 504
    heartbeat: float = 10.0  # seconds between idle checks of the peer ranks (torchrun)
    # -- who may call, and from where ---------------------------------------------------------
    api_key: Optional[str] = None  # null: $SPAVA_API_KEY when set; then every endpoint but /health needs it
    allowed_origins: List[str] = field(default_factory=list)  # CORS origins (none: no CORS headers)
    # -- media a request may name (video_url) -------------------------------------------------
    allowed_media_domains: List[str] = field(default_factory=list)  # http(s) hosts (none: http(s) off)
    allow_private_media: bool = False  # let http(s) media resolve to loopback/private/link-local addresses
    allowed_local_media_path: Optional[str] = None  # file:// only under this folder (null: file:// off)
    max_video_bytes: int = DEFAULT_VIDEO_BYTES  # one video, however it arrives
    media_timeout: float = 30.0  # seconds to connect to and to fetch an http(s) video
    max_frames: int = 108_000  # frames in the clip's container (1 h at 30 fps); more: 400 before decoding
    max_pixels: int = 3840 * 2160  # pixels of one frame (4K); more: 400 before decoding
    # -- the connection -----------------------------------------------------------------------
    max_body_bytes: Optional[int] = None  # null: enough for a max_video_bytes data: URL; more: 413
    max_connections: int = 64  # open connections and requests (uvicorn limit_concurrency); more: 503
    header_timeout: float = 10.0  # seconds for a request's headers to arrive; then the connection is closed
    read_timeout: float = 60.0  # seconds for a request's body to arrive; then 408
    keep_alive_timeout: int = 5  # seconds an idle keep-alive connection stays open (uvicorn timeout_keep_alive)
    # -- start and overlap --------------------------------------------------------------------
    warmup_plans: int = 4  # family plans (beside plan=) loaded and run once before /health says ready
    prefetch: int = 1  # requests fetched, decoded and preprocessed while another runs (0: one at a time)

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.rank is None, "rank", "is spava-run's single-rank mode; a server runs every rank of its plans")
        _require(not self.tune_only, "tune_only", "is spava-run's: run `spava-run plan=PATH tune_only=true` before "
                                                  "starting the server")
        _require(1 <= self.port <= 65535, "port", f"must be within 1..65535, got {self.port}")
        _require(bool(self.host.strip()), "host", "must not be empty")
        _require(0 <= self.queue_size <= MAX_QUEUE, "queue_size", f"must be within 0..{MAX_QUEUE}, got {self.queue_size}")
        for key in ("request_timeout", "heartbeat", "media_timeout", "header_timeout", "read_timeout"):
            value = getattr(self, key)
            _require(math.isfinite(value) and 0 < value <= MAX_TIMEOUT_S, key,
                     f"must be a number of seconds > 0 and at most {MAX_TIMEOUT_S:g}, got {value!r}")
        _require(self.heartbeat < self.timeout, "heartbeat",
                 f"must be below timeout ({self.heartbeat:g} >= {self.timeout:g}): idle ranks check on each other "
                 f"more often than the process group gives up on them")
        _require(1 <= self.keep_alive_timeout <= 3600, "keep_alive_timeout",
                 f"must be within 1..3600 seconds, got {self.keep_alive_timeout}")
        if self.api_key is None:
            self.api_key = os.environ.get("SPAVA_API_KEY") or None
        if self.api_key is not None:
            _require(len(self.api_key) >= 8 and self.api_key.isprintable() and " " not in self.api_key, "api_key",
                     "must be at least 8 printable characters without spaces (or null for no authentication)")
        for origin in self.allowed_origins:
            _require(origin == "*" or origin.startswith(("http://", "https://")), "allowed_origins",
                     f"lists origins like https://app.example.com (or '*'), got {origin!r}")
        domains = []
        for host in self.allowed_media_domains:
            h = host.strip().lower().rstrip(".")
            _require(bool(h) and not any(c in h for c in "/:@ ?#"), "allowed_media_domains",
                     f"lists host names (no scheme, path or port), got {host!r}")
            domains.append(h)
        self.allowed_media_domains = domains
        if self.allowed_local_media_path is not None:
            root = os.path.realpath(os.path.expanduser(self.allowed_local_media_path))
            _require(os.path.isdir(root), "allowed_local_media_path",
                     f"must be an existing folder, got {self.allowed_local_media_path!r}")
            _require(root != "/", "allowed_local_media_path", "must not be the root of the file system")
            self.allowed_local_media_path = root
        _require(1 <= self.max_video_bytes <= MAX_VIDEO_BYTES, "max_video_bytes",
                 f"must be within 1..{MAX_VIDEO_BYTES}, got {self.max_video_bytes}")
        if self.max_body_bytes is None:
            self.max_body_bytes = data_url_bytes(self.max_video_bytes)
        _require(2 ** 10 <= self.max_body_bytes <= 2 * MAX_VIDEO_BYTES, "max_body_bytes",
                 f"must be within 1024..{2 * MAX_VIDEO_BYTES}, got {self.max_body_bytes}")
        _require(1 <= self.max_frames <= 10 ** 8, "max_frames", f"must be within 1..10^8, got {self.max_frames}")
        _require(1 <= self.max_pixels <= 2 ** 31, "max_pixels", f"must be within 1..2^31, got {self.max_pixels}")
        _require(2 <= self.max_connections <= MAX_CONNECTIONS, "max_connections",
                 f"must be within 2..{MAX_CONNECTIONS}, got {self.max_connections}")
        _require(0 <= self.warmup_plans <= 1024, "warmup_plans", f"must be within 0..1024, got {self.warmup_plans}")
        _require(0 <= self.prefetch <= 16, "prefetch", f"must be within 0..16, got {self.prefetch}")


# -- composition ---------------------------------------------------------------------------------
SCHEMAS = {"run": ("spava_run_schema", RunConfig), "serve": ("spava_serve_schema", ServeConfig)}


def register_schemas() -> None:
    register_schema()
    for name, cls in SCHEMAS.values():
        ConfigStore.instance().store(name=name, node=cls)


def video_options() -> set[str]:
    """Names of the video config group's options (conf/video/*.yaml)."""
    root = files(CONFIG_MODULE).joinpath("video")
    return {p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml")}


def argv_shorthands(argv: Sequence[str]) -> list[str]:
    """``video=PATH`` (a file, not a video group option) -> ``video.path=PATH``; ``question=TEXT``
    quoted for Hydra's override grammar (free text: any script, spaces, quotes, ``${``), unless the
    value is quoted already; the rest unchanged."""
    options = video_options()
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key == "video" and value not in options and "," not in value:
            arg = f"video.path={value}"
        elif sep and key == "question" and not _hydra_quoted(value):
            arg = f"question={hydra_quote(value)}"
        out.append(arg)
    return out


def _hydra_quoted(value: str) -> bool:
    return len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""


def hydra_quote(text: str) -> str:
    """``text`` as one single-quoted Hydra override value that composes back to exactly ``text``:
    quotes (and the backslashes before them, or at the end) escaped, ``${`` kept literal instead of
    an OmegaConf interpolation."""
    body = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    body = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, body)
    body = body.replace("${", "\\\\\\${")  # Hydra unescapes one level, OmegaConf the next
    return f"'{body}'"


def to_entry_config(cfg: Any, kind: str) -> RunConfig:
    """A composed Hydra config -> a validated RunConfig / ServeConfig (ConfigError naming the key)."""
    cls = SCHEMAS[kind][1]
    if isinstance(cfg, cls):
        return cfg
    try:
        data = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else cfg
        data.pop("hydra", None)
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), data))
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "config"
        raise ConfigError(f"{exc.msg if hasattr(exc, 'msg') else exc}".splitlines()[0], setting=str(key)) from None
    assert isinstance(obj, cls)
    return obj


def compose_entry_config(kind: str, overrides: Sequence[str] = ()) -> RunConfig:
    """conf/<kind>.yaml with command-line style overrides (for library use and tests)."""
    register_schemas()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = compose(config_name=kind, overrides=argv_shorthands(overrides))
    except ConfigError:
        raise
    except Exception as exc:  # Hydra's override / missing-config errors
        raise hydra_error(exc) from None
    return to_entry_config(cfg, kind)


def resolve_checkpoint(name: str | None) -> str | None:
    """A checkpoint folder, or a Hugging Face model id found in the local HF cache (never downloaded)
    -> the folder. InputError naming model.checkpoint when it is neither."""
    if not name or os.path.isdir(name):
        return name
    if os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise InputError(f"no checkpoint directory at {name!r}", setting="model.checkpoint")
    try:
        # Optional (the serve extra), and only for a model id: imported where it is needed.
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id=name, local_files_only=True)
    except ImportError:
        raise InputError(f"no checkpoint directory at {name!r} (huggingface_hub is not installed to look the "
                         f"id up in the local cache)", setting="model.checkpoint") from None
    except Exception as exc:  # noqa: BLE001 - not cached (LocalEntryNotFoundError) or a bad id
        raise InputError(f"no checkpoint directory at {name!r}, and it is not a model in the local Hugging Face "
                         f"cache ({type(exc).__name__}); download it first (huggingface-cli download {name})",
                         setting="model.checkpoint") from None
