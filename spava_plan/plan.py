"""The Plan: the immutable contract between planner, codegen and runtime.

Everything the runtime needs is here, with every size fixed statically: token segments, which
rank runs which virtual host, the attention tasks of each rank (query rows x KV sources with
their masks), the selection all-gathers, the KV cache shard, the per-layer op schedule and the
cost model's predictions. ``Plan.to_json`` writes ``plan.json`` (schema version, fully resolved
config, content hash); ``load_plan`` reads it back into an equal object and refuses an unknown
schema version or a hash mismatch.

Notation (SPAVA_SPEC.md): W ranks, V virtual hosts, L context tokens, Lq query tokens.
Token positions are global indices into the full prompt sequence [context | query].

Vocabulary of the contract
- Segment: a contiguous, named range of global tokens: the anchor, a context block owned by one
  virtual host (``block``), a ring chunk (``chunk``, zigzag_ring), or the query block.
- KVRef: one source of keys/values for an attention task.
    kind="local":   tokens [start, stop) held in this rank's local K/V buffer.
    kind="passing": the packed selections (K|V, ``keep`` rows per KV head) that the other ranks'
                    hosts sent through collective ``slot``: rows of ranks [rank_start, rank_stop).
                    With a select_scan collective (method.passing=global) ``slot`` is the host's
                    slot on this rank and [0, 1) names the one buffer of its ``keep`` best rows.
    kind="remote":  tokens [start, stop) whose K/V live on rank ``owner`` (ring attention).
    kind="anchor":  tokens [start, stop) of the anchor, which this rank does not run: their K/V
                    arrive every layer through the ``anchor_broadcast`` collective from rank 0
                    (method.anchor=broadcast), into a receive buffer of the anchor's rows.
  mask="full": every query row sees every key. mask="causal": causal with the LAST query row
  aligned to the LAST key (bottom-right); for a query span equal to the key span this is the usual
  causal mask.
- AttnTask: query rows [q_start, q_stop) attending to the concatenation of its KV sources, with
  one softmax over all of them. merge="none": the rows are final. merge="query": the result is a
  partial (out, lse) that is all-gathered and LSE-merged across ranks.
- Collective: a per-layer exchange. kind="select_all_gather": every rank sends the packed
  selection of its host in ``slot``; kind="query_all_gather": (out, lse) partials of the query;
  kind="ring": W-1 point-to-point K/V steps.
  kind="all_reduce" (method=dense_tp): the hidden states of every token summed over the ranks
  (after o_proj: ``reduce_attn``, after the MLP's down projection: ``reduce_mlp``); every rank
  holds the whole sequence and its own heads and MLP columns (spava_plan/tp_shards.py).
  kind="select_scan" (method.passing=global): every host's top ``rows_per_rank`` candidates are
  combined by the prefix scan of spava_plan/passing_scan.py (rounds of sparse all-to-alls whose
  structure follows placement.host_rank), leaving host v the best rows of all hosts < v;
  ``bytes_per_rank`` is the most one rank sends in a round, ``time_us`` the whole scan.
  kind="anchor_broadcast" (method.anchor=broadcast): rank 0 computes the anchor's ``rows_per_rank``
  rows as its own first rows and broadcasts their packed K|V every layer (``bytes_per_rank``: what
  it sends); the other ranks hold no anchor rows and read the K/V as "anchor" sources.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, NamedTuple, get_args

from .config import SpavaConfig, to_config
from .errors import PlanMismatchError
from .links import Links
from .vocab import DTYPE_BYTES, DType, RopeType  # noqa: F401 - part of the plan's vocabulary (shared with config.py)

# 3: ModelSpec carries RoPE (rope_theta, mrope_section, tokens_per_second), tie_word_embeddings and
# the vision tower (ModelSpec.vision): a random-weight model is built from the plan alone.
# 4: ModelSpec.rope_scaling (RoPE type, factor, original max positions): every rank rotates with
# the whole prompt's frequencies (runtime/rope.py).
# 5: method.anchor=broadcast: the "anchor" KV source kind and the "anchor_broadcast" collective
# (the other ranks no longer hold the anchor's rows).
SCHEMA_VERSION = 5

# The closed vocabularies of the contract (plan_load checks every value against them).
SegmentKind = Literal["anchor", "block", "chunk", "query"]
KVKind = Literal["local", "passing", "remote", "anchor"]
Mask = Literal["full", "causal"]
Merge = Literal["none", "query"]
CollectiveKind = Literal["select_all_gather", "query_all_gather", "ring", "select_scan", "all_reduce",
                         "anchor_broadcast"]
OpKind = Literal["compute", "comm_start", "comm_wait"]
Stream = Literal["compute", "comm"]
ComputeOp = Literal["qkv", "out_mlp", "select", "attend", "merge"]
Method = Literal["spava", "apb", "star", "zigzag_ring", "dense", "dense_tp"]
Family = Literal["qwen2_vl", "qwen2_5_vl", "internvl3"]
Selection = Literal["query_aware", "key_norm"]
# Where the vision tower runs (config vision.parallel): every rank its grids, or rank 0 the whole video.
VisionParallel = Literal["frames", "one_gpu"]

SEGMENT_KINDS = get_args(SegmentKind)
KV_KINDS = get_args(KVKind)
MASKS = get_args(Mask)
MERGES = get_args(Merge)
COLLECTIVE_KINDS = get_args(CollectiveKind)

# Settings that say where and how a plan is deployed, not what it computes: they are kept in
# plan.json (``Plan.deployment``) but outside the content hash, so equal computations share one
# hash and one kernel cache. Dotted paths into the resolved config.
# (``tune``: how the knobs were chosen, not what they compute; ``topology.calibration``: where the
# rates came from, the rates themselves are hashed.)
DEPLOYMENT_SETTINGS = ("kernels", "model.checkpoint", "model.init", "model.hf_id", "video.path", "tune",
                       "topology.calibration")


@dataclass(frozen=True)
class Segment:
    name: str  # unique: "anchor", "block3", "chunk5", "query"
    kind: SegmentKind
    start: int  # first global token
    stop: int  # one past the last global token
    host: int = -1  # virtual host owning a block/chunk (-1 for anchor and query)
    keep: int = 0  # tokens per KV head this block passes on to later hosts (0: none)
    # Position-id bounds (inclusive) of the segment's tokens: (t, h, w) M-RoPE components for
    # Qwen2-VL family models, all three equal for 1-D RoPE models.
    pos_min: tuple[int, int, int] = (0, 0, 0)
    pos_max: tuple[int, int, int] = (0, 0, 0)

    @property
    def length(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class KVRef:
    kind: KVKind
    mask: Mask = "full"
    start: int = 0  # local / remote: global token range
    stop: int = 0
    slot: int = -1  # passing: collective slot
    rank_start: int = 0  # passing: rows sent by ranks [rank_start, rank_stop) through that slot
    rank_stop: int = 0
    keep: int = 0  # passing: rows per rank in that slot
    owner: int = -1  # remote: the rank that holds these tokens (anchor: the rank that sends them, 0)

    @property
    def length(self) -> int:
        """Number of keys (per KV head) this source contributes."""
        if self.kind == "passing":
            return (self.rank_stop - self.rank_start) * self.keep
        return self.stop - self.start


def attended_in_step(kind: str, owner: int, rank: int, world: int, step: int) -> bool:
    """Whether ``rank`` attends a KV source of this kind (and owner, for a remote one) in ring step
    ``step``. Step s holds the K/V of rank (rank - s) mod W: local sources belong to step 0, a remote
    one to its owner's step, passing sources to every step. A launch that is not a ring step
    (step < 0) attends every source but remote ones, which only ring steps bring."""
    if step < 0:
        return kind != "remote"
    owner_now = (rank - step) % world
    return kind == "passing" or (kind == "local" and owner_now == rank) or (kind == "remote" and owner == owner_now)


@dataclass(frozen=True)
class AttnTask:
    name: str  # "anchor", "host3", "query", "chunk5"
    q_start: int  # global token range of the query rows
    q_stop: int
    kv: tuple[KVRef, ...]
    merge: Merge = "none"

    @property
    def rows(self) -> int:
        return self.q_stop - self.q_start

    @property
    def keys(self) -> int:
        return sum(ref.length for ref in self.kv)


class SelectBlock(NamedTuple):
    """A block a rank scores and packs for the selection all-gather of ``slot``: tokens
    [start, stop) of one of its hosts, ``keep`` rows per KV head (a named tuple: it is written to
    plan.json as [slot, start, stop, keep])."""

    slot: int
    start: int
    stop: int
    keep: int


@dataclass(frozen=True)
class RankPlan:
    rank: int
    hosts: tuple[int, ...]  # virtual hosts this rank runs, in slot order (slot i -> hosts[i])
    local: tuple[tuple[int, int], ...]  # global token ranges of the local sequence, in local order
    tasks: tuple[AttnTask, ...]  # every attention task of this rank, per layer
    select: tuple[SelectBlock, ...]  # the blocks it selects from
    cache: tuple[tuple[int, int], ...]  # global token ranges of its KV cache shard after prefill
    decode_appends: bool = False  # this rank appends the new tokens' K/V during decode

    @property
    def local_tokens(self) -> int:
        return sum(stop - start for start, stop in self.local)

    def local_offset(self, position: int) -> int:
        """Local buffer row of global token ``position`` (it must be held by this rank)."""
        offset = 0
        for start, stop in self.local:
            if start <= position < stop:
                return offset + position - start
            offset += stop - start
        raise KeyError(f"token {position} is not in rank {self.rank}'s local sequence")


@dataclass(frozen=True)
class Collective:
    name: str
    kind: CollectiveKind
    slot: int = -1  # select_all_gather: which host slot every rank contributes
    rows_per_rank: int = 0  # select_all_gather: keep; query_all_gather: Lq
    bytes_per_rank: int = 0  # bytes each rank contributes per layer
    # Predicted duration of one instance on the plan's topology (the planner's cost model; ring:
    # one point-to-point step). The runtime's emulated communicator charges this for communication
    # it cannot observe.
    time_us: float = 0.0


@dataclass(frozen=True)
class Op:
    """One step of a rank's per-layer schedule, with the cost model's predicted timing.

    The runtime executes a rank's ops in order (every layer repeats them). Vocabulary:
      kind="compute",    name="qkv" | "out_mlp": the model's own per-token work (projections,
                         RoPE, o_proj, MLP); listed for the timeline, the attention layer skips it.
      kind="compute",    name="select": score, top-k and pack every block in RankPlan.select.
      kind="comm_start", name="start:<collective>": launch that collective asynchronously
                         (ring: name="start:ring<step>", step=s sends/receives the K/V of step s).
      kind="comm_wait",  name="wait:<collective>" (ring: "wait:ring<step>"): block on it.
      kind="compute",    name="attend", tasks=(...): ONE fused launch of those attention tasks;
                         ring: step=s restricts the chunk tasks to the keys owned by rank
                         (r - s) mod W, and partials are LSE-merged across steps.
      kind="compute",    name="merge", collective="query": LSE-merge the gathered query partials.
    """

    name: str
    kind: OpKind
    stream: Stream = "compute"
    tasks: tuple[str, ...] = ()  # attention tasks fused into this launch
    collective: str = ""  # collective started / waited on / merged
    step: int = -1  # ring step (zigzag_ring only)
    start_us: float = 0.0
    end_us: float = 0.0
    flops: float = 0.0
    bytes: float = 0.0


@dataclass(frozen=True)
class RankSchedule:
    rank: int
    ops: tuple[Op, ...]  # one layer; every layer repeats it
    layer_us: float = 0.0  # predicted time of one layer on this rank
    exposed_comm_us: float = 0.0  # communication the schedule does not hide, per layer


@dataclass(frozen=True)
class Prediction:
    """Cost-model predictions for the whole prefill (all layers, vision encoder included)."""

    rank_us: tuple[float, ...] = ()  # predicted prefill time per rank
    makespan_us: float = 0.0  # slowest rank (critical path) plus unhidden communication
    vision_us: float = 0.0
    exposed_comm_us: float = 0.0
    peak_memory_bytes: tuple[int, ...] = ()  # per rank
    memory_breakdown: Mapping[str, int] = field(default_factory=dict)  # busiest rank's parts


@dataclass(frozen=True)
class Placement:
    solver: str
    host_rank: tuple[int, ...]  # rank of every virtual host
    host_cost: tuple[float, ...] = ()  # work of every virtual host as the solver saw it
    # work of every rank outside its hosts as the solver saw it (method.anchor=broadcast: rank 0's
    # anchor); empty: none. A rank's load is its base plus its hosts' costs.
    rank_base: tuple[float, ...] = ()
    makespan: float = 0.0
    lower_bound: float = 0.0

    @property
    def gap(self) -> float:
        """Relative distance of the makespan from the lower bound (0 = proven optimal)."""
        return 0.0 if self.lower_bound <= 0 else self.makespan / self.lower_bound - 1.0


@dataclass(frozen=True)
class VisionTowerSpec:
    """The vision encoder's architecture (model.vision.*), as a random-weight model is built from it."""

    patch_size: int  # ViT patch side in pixels
    spatial_merge: int  # patches merged per side into one LLM token
    temporal_patch: int  # frames per temporal grid
    depth: int  # ViT layers
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int  # merger output width (= the LLM's hidden size)
    tile_size: int  # InternVL3: square tile side
    tile_tokens: int  # InternVL3: LLM tokens per tile after pixel shuffle


@dataclass(frozen=True)
class RopeScalingSpec:
    """The language model's RoPE scaling (transformers' rope_type and factor). dynamic rescales the
    frequencies from the largest position of the whole sequence once it passes
    ``original_max_positions`` (the checkpoint's max_position_embeddings), as the stock model does
    over the whole prompt and at every decode step; the runtime does the same on every rank."""

    rope_type: RopeType
    factor: float
    original_max_positions: int


@dataclass(frozen=True)
class ModelSpec:
    """Every model field the runtime reads: the language model's dims, its RoPE and its vision
    tower (a random-weight model is built from this alone: runtime/hf/model.py)."""

    name: str
    family: Family
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    rope_theta: float
    mrope_section: tuple[int, ...]  # t/h/w split of head_dim/2 (Qwen M-RoPE; unused by InternVL3)
    tokens_per_second: int  # Qwen2.5-VL: temporal positions per second of video
    vision: VisionTowerSpec
    rope_scaling: RopeScalingSpec

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_config(cls, m: Any) -> "ModelSpec":
        """From a validated ModelConfig (spava_plan.config; duck-typed: that module imports this one)."""
        v = m.vision
        vision = VisionTowerSpec(patch_size=v.patch_size, spatial_merge=v.spatial_merge, temporal_patch=v.temporal_patch,
                                 depth=v.depth, hidden_size=v.hidden_size, num_heads=v.num_heads,
                                 intermediate_size=v.intermediate_size, out_hidden_size=v.out_hidden_size,
                                 tile_size=v.tile_size, tile_tokens=v.tile_tokens)
        return cls(name=m.name, family=m.family, num_layers=m.num_layers, hidden_size=m.hidden_size,
                   intermediate_size=m.intermediate_size, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
                   head_dim=m.head_dim, vocab_size=m.vocab_size, tie_word_embeddings=bool(m.tie_word_embeddings),
                   rope_theta=float(m.rope_theta), mrope_section=tuple(int(x) for x in m.mrope_section),
                   tokens_per_second=int(m.tokens_per_second), vision=vision,
                   rope_scaling=RopeScalingSpec(rope_type=m.rope_scaling.rope_type,
                                                factor=float(m.rope_scaling.factor),
                                                original_max_positions=int(m.max_position_embeddings)))


@dataclass(frozen=True)
class SelectionSpec:
    """How a host scores its block's tokens and picks the ``keep`` it passes on (the select
    kernels): ``query_aware`` scores keys against the query block (Spava), ``key_norm`` by key
    norm (the query-unaware APB stand-in); scores are max-pooled over ``pool_window`` tokens."""

    score: Selection = "query_aware"
    pool_window: int = 5  # odd; 1 disables smoothing


@dataclass(frozen=True)
class VideoSpec:
    """The prompt the plan was made for, as the runtime builds and checks its input."""

    frames: int  # sampled frames of the input (layout.frames: after padding to whole temporal grids)
    source_size: tuple[int, int]  # (height, width) of the source frames, before the processor's resize
    fps: float  # sampling rate of the frames (temporal positions depend on it)
    system_tokens: int  # tokens before the video
    # question capacity: the query segment is [question | assistant suffix] sized for a question of
    # this many tokens; a shorter one runs on the same plan, padded at the end of the query segment
    # (pad tokens are never keys of a real row: runtime/attention.py, RankAttention.set_prompt_tokens)
    max_question_tokens: int
    spatial_merge: int  # vision patches merged per side into one LLM token
    temporal_patch: int  # frames per temporal grid
    # the processor settings the input is built with (model.vision.*): Qwen's pixel bounds per
    # frame; InternVL3's square tile per frame, its LLM tokens and the frame text around it
    min_pixels: int
    max_pixels: int
    tile_size: int
    tile_tokens: int
    frame_text_tokens: int
    # the frame-size rule the layout assumed (model.vision.cap_pixels_per_frame / max_video_tokens):
    # the runtime passes it to the video processor and refuses a transformers that cannot apply it
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 128000


@dataclass(frozen=True)
class Layout:
    total_tokens: int  # L + Lq
    context_tokens: int  # L
    query_tokens: int  # Lq
    video_tokens: int
    frames: int  # frames after padding
    grid_thw: tuple[int, int, int]  # (temporal grids, merged-token rows, merged-token cols)
    frame_size: tuple[int, int]  # (height, width) after the processor's resize
    anchor_tokens: int  # a
    passing_tokens: int  # p (the budget before the per-block cap)
    virtual_hosts: int  # V
    segments: tuple[Segment, ...]

    def segment(self, name: str) -> Segment:
        for seg in self.segments:
            if seg.name == name:
                return seg
        raise KeyError(name)

    @property
    def blocks(self) -> tuple[Segment, ...]:
        return tuple(s for s in self.segments if s.kind in ("block", "chunk"))


@dataclass(frozen=True)
class Chunking:
    """How the runtime bounds its activations; planner/memory.py assumes exactly these sizes.

    mlp_tokens:   the decoder layers' MLP and RMSNorms (and the final norm) run on at most this
                  many tokens at a time, so no (n, intermediate) tensor and no full-sequence fp32
                  copy of the hidden states exists; prefill logits are the last prompt row's only.
    vision_units: the vision tower encodes at most this many whole units (temporal grids / frame
                  tiles) per call; units never attend to each other, so chunking is exact.
    """

    mlp_tokens: int = 16384
    vision_units: int = 1

    def __post_init__(self) -> None:
        for name in ("mlp_tokens", "vision_units"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"chunking.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class Plan:
    method: Method
    world_size: int
    dtype: DType
    model: ModelSpec
    layout: Layout
    placement: Placement
    ranks: tuple[RankPlan, ...]
    collectives: tuple[Collective, ...]
    schedule: tuple[RankSchedule, ...]
    prediction: Prediction
    selection: SelectionSpec  # the select kernels' settings
    video: VideoSpec  # the prompt the runtime builds and checks
    links: Links  # what communication costs on the plan's topology (the emulated runtime charges it)
    config: Mapping[str, Any]  # the resolved config minus DEPLOYMENT_SETTINGS (for humans and re-planning)
    schema_version: int = SCHEMA_VERSION
    chunking: Chunking = field(default_factory=Chunking)  # activation chunk sizes (planner/memory.py)
    # who runs the vision tower (spava_plan/vision_exchange.py): "frames" is left out of plan.json
    # and its hash, so the plans written before this field keep their bytes (see _hashed)
    vision_parallel: VisionParallel = "frames"
    # DEPLOYMENT_SETTINGS of the config the plan was made from: stored, but neither hashed nor
    # compared (two plans that compute the same thing are equal and share a hash).
    deployment: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def anchor_mode(self) -> str:
        """"broadcast" when rank 0 sends the anchor's K/V (an anchor_broadcast collective), else
        "recompute" (every rank with an anchor runs it; also methods without one)."""
        return "broadcast" if any(c.kind == "anchor_broadcast" for c in self.collectives) else "recompute"

    # -- serialisation -------------------------------------------------------------------------
    def _hashed(self) -> dict:
        """The plan as plain data, fields added after the first plans left out at their defaults."""
        data = _plain(dataclasses.asdict(self))
        if data["vision_parallel"] == "frames":
            del data["vision_parallel"]
        return data

    def to_dict(self) -> dict:
        data = self._hashed()
        data["hash"] = content_hash(data)
        self.__dict__.setdefault("hash", data["hash"])  # fill the cached ``hash`` (the same value)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"

    @functools.cached_property
    def hash(self) -> str:
        """Content hash of the computation (computed once: a Plan is immutable, and every consumer
        asks for it). ``deployment`` is not part of it."""
        return content_hash(self._hashed())

    def resolved_config(self) -> dict:
        """The full resolved config the plan was made from (``config`` plus ``deployment``), for
        re-planning."""
        return merge_config(self.config, self.deployment)

    def source_config(self) -> SpavaConfig:
        """The validated SpavaConfig the plan was made from (``config`` plus ``deployment``), for a
        typed re-plan: ``dataclasses.replace`` on it, then the planner."""
        return to_config(self.resolved_config())

    def save(self, path: str | Path) -> Path:
        """Write plan.json atomically (a temporary file renamed into place)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
        return path

    # -- checks the runtime makes --------------------------------------------------------------
    def check_world(self, world_size: int) -> None:
        if world_size != self.world_size:
            raise PlanMismatchError(
                f"the plan is for {self.world_size} ranks but {world_size} were launched; "
                f"launch {self.world_size} processes or re-plan with gpus={world_size}", setting="gpus")

    def check_model(self, *, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int,
                    hidden_size: int | None = None) -> None:
        seen = dict(num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
        if hidden_size is not None:
            seen["hidden_size"] = hidden_size
        diffs = [f"{k} plan={getattr(self.model, k)} model={v}" for k, v in seen.items()
                 if getattr(self.model, k) != v]
        if diffs:
            raise PlanMismatchError(f"the plan was made for model {self.model.name!r} and does not match "
                                    f"the loaded model ({'; '.join(diffs)}); re-plan with the matching model=",
                                    setting="model")


def _plain(obj: Any) -> Any:
    """Tuples -> lists, mappings -> dicts with sorted keys: the JSON-equal form used for hashing."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def content_hash(data: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a plan dict: everything but 'hash' and 'deployment'."""
    body = {k: v for k, v in data.items() if k not in ("hash", "deployment")}
    # json writes tuples as lists and sorts the (string) keys: the same text as for _plain(body)
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


# -- the config's two parts ---------------------------------------------------------------------
def split_config(resolved: Mapping[str, Any]) -> tuple[dict, dict]:
    """A resolved config dict -> (what it computes, DEPLOYMENT_SETTINGS), both nested dicts."""
    computation = _plain(resolved)
    deployment: dict = {}
    for dotted in DEPLOYMENT_SETTINGS:
        *parents, leaf = dotted.split(".")
        src, dst = computation, deployment
        for key in parents:
            src = src.get(key) if isinstance(src, dict) else None
            dst = dst.setdefault(key, {})
        if isinstance(src, dict) and leaf in src:
            dst[leaf] = src.pop(leaf)
    # Settings added after plans were first written, left out at their defaults so that a plan of
    # the default computation keeps its exact bytes and hash (stored plans, plan-store families and
    # kernel caches stay valid); a config without them reads back as the default.
    for part, dotted, default in ((computation, "method.passing", "per_block"), (deployment, "tune.passing", None),
                                  (computation, "vision.parallel", "frames")):
        group, leaf = dotted.split(".")
        node = part.get(group)
        if isinstance(node, dict) and leaf in node and node[leaf] == default:
            del node[leaf]
            if not node and group == "vision":  # a group that holds only settings added later
                del part[group]
    return computation, deployment


def merge_config(computation: Mapping[str, Any], deployment: Mapping[str, Any]) -> dict:
    """Inverse of split_config."""
    out = _plain(computation)

    def put(dst: dict, src: Mapping[str, Any]) -> None:
        for key, value in src.items():
            if isinstance(value, Mapping):
                put(dst.setdefault(key, {}), value)
            else:
                dst[key] = value

    put(out, deployment)
    return out


def rank_tasks(plan: Plan, rank: int, names: Iterable[str]) -> tuple[AttnTask, ...]:
    """The named attention tasks of one rank, in the given order."""
    by_name = {t.name: t for t in plan.ranks[rank].tasks}
    return tuple(by_name[n] for n in names)
