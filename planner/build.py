"""config -> Plan: the planner's one entry point.

    layout (tokens) -> partition (segments) -> host costs (cost model) -> placement (hosts -> ranks)
    -> rank plans -> collectives (timed) -> schedule (ordered, then timed) -> vision encoder
    -> memory -> Prediction -> Plan

Every method goes through the same path, so baselines are planned and costed exactly like Spava.
Solvers apply to Spava; the baselines keep their fixed placements (zigzag_ring: rank r holds
chunks r and 2W-1-r; apb and star: block r on rank r; dense: one rank), which is the snake order
of ``zigzag`` with 2 or 1 hosts per rank. dense_tp (planner/dense_tp.py): the whole prompt on every
rank, each with its shard of the model's heads and MLP columns (its cost model is the shard's).
"""
from __future__ import annotations

import dataclasses
import gc
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from spava_plan.config import SolverConfig, SpavaConfig, config_to_dict
from spava_plan.errors import InfeasiblePlanError
from spava_plan.passing_scan import scan_rounds
from spava_plan.plan import (Chunking, Collective, Layout, ModelSpec, Placement, Plan, Prediction, RankPlan, Segment,
                             SelectionSpec, VideoSpec, split_config)
from spava_plan.vision_exchange import VisionExchange, frame_tile_spans, plan_encoders, vision_exchange

from . import dense_tp
from .cost import KERNELS, ZERO, CostModel, Work, topology_links
from .layout import TokenLayout, token_layout
from .memory import check_fits, fits_device, plan_chunking, rank_memory, weight_bytes
from .partition import Partition, check_vision_units, host_kv, partition
from .placement import place
from .ranks import ANCHOR_RANK, RingSources, collectives, rank_plans
from .schedule import Step, Timeline, rank_schedules, rank_steps, simulate
from .vision import vision_unit

FIXED_PLACEMENT = SolverConfig(name="zigzag")


def model_spec(cfg: SpavaConfig) -> ModelSpec:
    return ModelSpec.from_config(cfg.model)


def _segment(tokens: TokenLayout, name: str, kind: str, span: tuple[int, int], host: int = -1, keep: int = 0) -> Segment:
    lo, hi = tokens.position_bounds(*span)
    return Segment(name=name, kind=kind, start=span[0], stop=span[1], host=host, keep=keep, pos_min=lo, pos_max=hi)


def segments(tokens: TokenLayout, part: Partition) -> tuple[Segment, ...]:
    out = []
    if part.anchor:
        out.append(_segment(tokens, "anchor", "anchor", part.anchor))
    for v, span in enumerate(part.blocks):
        out.append(_segment(tokens, f"{part.block_kind}{v}", part.block_kind, span, host=v, keep=part.keep))
    if part.query is not None:
        out.append(_segment(tokens, "query", "query", part.query))
    return tuple(out)


def host_costs(part: Partition, cost: CostModel, query_tokens: int) -> list[float]:
    """Per-layer time (us) of each virtual host's own work, independent of where it is placed:
    its attention task over the sources of ``host_kv``, the selection of its block and the
    per-token work of its rows."""
    out = []
    for v, (a, b) in enumerate(part.blocks):
        rows = b - a
        sources = tuple((s.keys(part.keep), s.causal) for s in host_kv(part, v))
        work = cost.attention(rows, sources) + cost.layer_tokens(rows)
        if part.keep:
            work = work + cost.select(rows, part.keep, query_tokens)
            if part.passing == "global":
                work = work + cost.scan_merge(part.keep).times(scan_rounds(part.virtual_hosts))
        out.append(work.us)
    return out


def shared_anchor_rows(part: Partition) -> int:
    """Rows of the anchor every rank attends (0: none): spava / apb's anchor, Star's block 0."""
    if part.anchor:
        return part.anchor[1] - part.anchor[0]
    if part.method == "star" and part.world > 1:
        return part.blocks[0][1] - part.blocks[0][0]  # Star's anchor is block 0
    return 0


def anchor_work(part: Partition, cost: CostModel) -> Work:
    """Per-layer work of the anchor's own rows (their causal attention and per-token work): what
    method.anchor=broadcast leaves to rank 0 alone, and what every other rank then saves."""
    return cost.anchor(shared_anchor_rows(part))


def rank_base(part: Partition, cost: CostModel) -> tuple[float, ...]:
    """Per-layer work of each rank outside its hosts, as the placement balances it: with a
    broadcast anchor, rank 0 alone runs the anchor (under recompute every rank does, which moves
    no host). Star's rank 0 runs block 0 as its own host, so it has no extra work."""
    if not part.broadcast_anchor or part.anchor is None:
        return ()
    return tuple(anchor_work(part, cost).us if r == ANCHOR_RANK else 0.0 for r in range(part.world))


def _task_sources(rank: RankPlan) -> dict[str, dict[int, tuple[tuple[int, bool], ...]]]:
    """task name -> owner rank -> key sources (keys, causal); passing sources count as local.
    (A ring plan has O(W) sources per task, so this loop is kept tight.)"""
    out: dict[str, dict[int, tuple[tuple[int, bool], ...]]] = {}
    me = rank.rank
    for task in rank.tasks:
        by_owner: dict[int, list[tuple[int, bool]]] = {}
        for ref in task.kv:
            owner, keys = (ref.owner if ref.kind == "remote" else me), ref.length
            src = by_owner.get(owner)
            if src is None:
                by_owner[owner] = [(keys, ref.mask == "causal")]
            else:
                src.append((keys, ref.mask == "causal"))
        out[task.name] = {o: tuple(v) for o, v in by_owner.items()}
    return out


class _Durations:
    """Work of every compute op of the schedule (see spava_plan.plan.Op), from the cost model."""

    def __init__(self, cost: CostModel, world: int, query_tokens: int, ring: RingSources | None = None,
                 scan_rounds: int = 0):
        self.cost, self.world, self.lq, self.ring = cost, world, query_tokens, ring
        self.scan_rounds = scan_rounds  # rounds of the global-passing scan (0: none)
        self._rank_cache: dict[int, tuple[dict, dict]] = {}
        self.launch = cost.launch_us
        self._launch = Work(KERNELS["attend"] * cost.launch_us)  # one fused attention launch

    def _rank(self, rank: RankPlan) -> tuple[dict, dict]:
        hit = self._rank_cache.get(rank.rank)
        if hit is None:
            rows = {t.name: t.rows for t in rank.tasks}
            if self.ring is not None:
                sources = {f"chunk{c}": self.ring.by_owner(c, rank.rank) for c in rank.hosts}
            else:
                sources = _task_sources(rank)
            hit = self._rank_cache[rank.rank] = (rows, sources)
        return hit

    def attend_by_owner(self, rank: RankPlan, tasks: tuple[str, ...]) -> list[tuple[float, float, float]]:
        rows, sources = self._rank(rank)
        attention = self.cost.attention
        base = self._launch
        if self.ring is not None:  # lists indexed by owner: one entry per rank, W^2 in all
            table = [tuple(base)] * self.world
            for t in tasks:
                n = rows[t]
                table = [(a[0] + w[0], a[1] + w[1], a[2] + w[2])
                         for a, w in zip(table, [attention(n, src) for src in sources[t]])]
            return table  # type: ignore[return-value]
        out = [tuple(base)] * self.world
        for owner in range(self.world):
            ws = [attention(rows[t], sources[t][owner]) for t in tasks if owner in sources[t]]
            if ws:
                out[owner] = (base[0] + sum(w[0] for w in ws), sum(w[1] for w in ws), sum(w[2] for w in ws))
        return out  # type: ignore[return-value]

    def __call__(self, rank: RankPlan, step: Step) -> Work:
        cost, launch, name = self.cost, self.launch, step.name
        if name == "attend":
            rows, sources = self._rank(rank)
            owner = rank.rank if step.step < 0 else (rank.rank - step.step) % self.world
            work = self._launch
            for task in step.tasks:
                src = sources[task]
                work = work + cost.attention(rows[task], src[owner] if self.ring is not None else src.get(owner, ()))
            return work
        if name == "qkv":
            return cost.qkv(rank.local_tokens) + Work(KERNELS["qkv"] * launch)
        if name == "out_mlp":
            return cost.out_mlp(rank.local_tokens) + Work(KERNELS["out_mlp"] * launch)
        if name == "select":
            work = ZERO
            for _, start, stop, keep in rank.select:
                work = work + cost.select(stop - start, keep, self.lq) + Work(KERNELS["select_block"] * launch)
                if self.scan_rounds:  # global passing: the host merges one message per scan round
                    work = work + (cost.scan_merge(keep) + Work(KERNELS["scan_merge"] * launch)).times(self.scan_rounds)
            return work
        if name == "merge":
            return cost.merge(self.lq, self.world) + Work(KERNELS["merge"] * launch)
        raise AssertionError(f"no cost for compute op {name!r}")


def _timed_collectives(colls: tuple[Collective, ...], cost: CostModel, hosts: int) -> tuple[Collective, ...]:
    out = []
    for c in colls:
        if c.kind == "select_scan":
            t = cost.scan(c.bytes_per_rank, hosts)
        elif c.kind == "all_reduce":
            t = cost.all_reduce(c.bytes_per_rank)
        elif c.kind == "anchor_broadcast":
            t = cost.broadcast(c.bytes_per_rank)
        else:
            t = cost.p2p(c.bytes_per_rank) if c.kind == "ring" else cost.all_gather(c.bytes_per_rank)
        out.append(Collective(c.name, c.kind, c.slot, c.rows_per_rank, c.bytes_per_rank, time_us=t))
    return tuple(out)


@dataclass(frozen=True)
class Derived:
    """Everything the planner derives for one config, before the Plan object is assembled."""

    cfg: SpavaConfig
    tokens: TokenLayout
    part: Partition
    layout: Layout
    placement: Placement
    ranks: tuple[RankPlan, ...]
    collectives: tuple[Collective, ...]
    steps: list
    timeline: Timeline
    prediction: Prediction
    memory: list  # per rank: {part: bytes} (memory.PARTS and "peak")
    fits: bool  # every rank's peak fits the device
    exchange: VisionExchange  # who sends which visual embeddings to whom after the encoder
    chunking: Chunking = field(default_factory=Chunking)  # the runtime's activation chunks (memory.py)

    @property
    def world(self) -> int:
        return self.part.world


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: a large plan allocates millions of small acyclic
    tuples, and the collector would rescan them over and over (it doubles the planning time of
    a 1024-GPU ring). Reference counting still frees everything."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def derive(cfg: SpavaConfig, *, require_fit: bool = True, detail: bool = True) -> Derived:
    with _gc_paused():
        return _derive(cfg, require_fit=require_fit, detail=detail)


def _derive(cfg: SpavaConfig, *, require_fit: bool, detail: bool) -> Derived:
    """Plan ``cfg`` up to its predictions; with ``require_fit`` an InfeasiblePlanError is raised
    when a rank's peak memory exceeds the device (comparisons plan baselines with it off and
    report it instead). ``detail=False`` skips the per-op timeline (only totals are kept), for
    predictions that will not be assembled into a Plan."""
    tokens = token_layout(cfg.model, cfg.video)
    part = partition(tokens, cfg.method, cfg.topology.gpus)
    world = part.world
    tp = dense_tp.is_tp(part.method)  # every rank holds the whole prompt and its shard of the model
    if not tp:
        check_vision_units(tokens, world, cfg.model.vision.temporal_patch, cfg.vision.parallel)
    cost = dense_tp.layer_cost_model(cfg, world)
    solver = cfg.solver if part.method == "spava" else FIXED_PLACEMENT
    if tp:
        placement = dense_tp.placement(host_costs(part, cost, tokens.query_tokens)[0])
    else:
        placement = place(host_costs(part, cost, tokens.query_tokens), world, part.hosts_per_rank, solver,
                          rank_base(part, cost))
    layout = Layout(total_tokens=tokens.total_tokens, context_tokens=tokens.context_tokens,
                    query_tokens=tokens.query_tokens, video_tokens=tokens.video_tokens, frames=tokens.frames,
                    grid_thw=tokens.grid_thw, frame_size=tokens.frame_size, anchor_tokens=part.anchor_tokens,
                    passing_tokens=part.passing_tokens, virtual_hosts=part.virtual_hosts,
                    segments=segments(tokens, part))
    ranks = rank_plans(part, placement.host_rank)
    colls = _timed_collectives(collectives(part, model_spec(cfg), cfg.dtype_bytes), cost, part.virtual_hosts)
    steps = [rank_steps(r, colls, world, cfg.method.overlap) for r in ranks]
    ring = RingSources(part, placement.host_rank) if part.method == "zigzag_ring" else None
    rounds = scan_rounds(part.virtual_hosts) if any(c.kind == "select_scan" for c in colls) else 0
    durations = _Durations(cost, world, tokens.query_tokens, ring, rounds)
    timeline = simulate(ranks, steps, colls, durations, world, record=detail)

    # Frame-parallel vision encoder: rank r encodes T // W units (+1 for the first T % W ranks),
    # (vision.parallel=one_gpu: rank 0 encodes all T), then each rank receives the embeddings of
    # its own local video tokens only (the same exchange the runtime builds from the Plan:
    # spava_plan.vision_exchange.plan_vision_exchange). The slowest encoder sets the stage's time.
    unit = vision_unit(cfg.model, tokens.grid_thw)
    grids = tokens.grid_thw[0]
    tiles = None
    if cfg.model.family == "internvl3":  # frame text between the tiles: plan in embedding-row space
        tiles = frame_tile_spans(tokens.video_start, grids, tokens.tokens_per_grid, cfg.model.vision.frame_text_tokens)
    exchange = vision_exchange(world, grids, tokens.tokens_per_grid, tokens.video_start, [r.local for r in ranks],
                               tiles, plan_encoders(world, cfg.vision.parallel, part.method))
    chunking = plan_chunking(unit)
    if tp:  # every rank encodes every unit with its shard of the tower; its all-reduces are the exposed part
        vision_us, exchange_us = dense_tp.vision_us(cfg, cost, unit)
        weights = dense_tp.weight_bytes(cfg, world)
        stage = dense_tp.vision_stage_bytes(cfg, world, unit, chunking.vision_units)
        shard_cfg = dataclasses.replace(cfg, model=cost.model)
        memory = [rank_memory(shard_cfg, r, colls, world, unit, exchange, weights, chunking, vision_stage=stage)
                  for r in ranks]
    else:
        exchange_us = cost.vision_exchange(exchange, cfg.model.hidden_size * cfg.dtype_bytes)
        most = max(b - a for a, b in exchange.grids)
        vision_us = most * cost.vision_unit(unit).us + exchange_us
        weights = weight_bytes(cfg)
        memory = [rank_memory(cfg, r, colls, world, unit, exchange, weights, chunking) for r in ranks]
    fits = fits_device(cfg, max(m["peak"] for m in memory))
    if require_fit and not fits:
        check_fits(cfg, part.method, world, memory)
    layers = cfg.model.num_layers
    rank_us = tuple(vision_us + layers * t for t in timeline.layer_us)
    critical = max(range(world), key=lambda r: rank_us[r])
    busiest = max(range(world), key=lambda r: memory[r]["peak"])
    prediction = Prediction(rank_us=rank_us, makespan_us=rank_us[critical], vision_us=vision_us,
                            exposed_comm_us=exchange_us + layers * timeline.exposed_us[critical],
                            peak_memory_bytes=tuple(m["peak"] for m in memory),
                            memory_breakdown=dict(memory[busiest]))
    return Derived(cfg, tokens, part, layout, placement, ranks, colls, steps, timeline, prediction, memory, fits,
                   exchange, chunking)


# A ring plan lists every ring step of every rank: O(W^2) ops (about 1.3 GB of plan.json at 1024
# GPUs). Beyond this many GPUs its plan is refused; its prediction (compare, tune) stays available.
MAX_RING_PLAN_GPUS = 128


def check_plan_size(method: str, world: int) -> None:
    """Refuse a plan whose materialised form would be too large to write and load."""
    if method == "zigzag_ring" and world > MAX_RING_PLAN_GPUS:
        raise InfeasiblePlanError(
            f"method=zigzag_ring lists every ring step (O(W^2) ops: about {1.3 * (world / 1024) ** 2:.1f} GB of "
            f"plan.json at {world} GPUs); plan it on at most {MAX_RING_PLAN_GPUS} GPUs", setting="gpus")


def assemble(d: Derived) -> Plan:
    """The immutable Plan of a derivation, with every op of the timed schedule."""
    assert all(len(t) == len(s) for t, s in zip(d.timeline.timings, d.steps)) and d.timeline.timings, \
        "assemble() needs a derivation made with detail=True"
    check_plan_size(d.part.method, d.world)
    computation, deployment = split_config(config_to_dict(d.cfg))
    video, vision = d.cfg.video, d.cfg.model.vision
    return Plan(method=d.part.method, world_size=d.world, dtype=d.cfg.dtype, model=model_spec(d.cfg),
                layout=d.layout, placement=d.placement, ranks=d.ranks, collectives=d.collectives,
                schedule=rank_schedules(d.ranks, d.steps, d.timeline), prediction=d.prediction,
                selection=SelectionSpec(score=d.cfg.method.selection, pool_window=d.cfg.method.pool_window),
                video=VideoSpec(frames=video.frames, source_size=video.size, fps=float(video.fps),
                                system_tokens=video.system_tokens, max_question_tokens=video.max_question_tokens,
                                spatial_merge=vision.spatial_merge, temporal_patch=vision.temporal_patch,
                                min_pixels=vision.min_pixels, max_pixels=vision.max_pixels,
                                tile_size=vision.tile_size, tile_tokens=vision.tile_tokens,
                                frame_text_tokens=vision.frame_text_tokens,
                                cap_pixels_per_frame=vision.cap_pixels_per_frame,
                                max_video_tokens=vision.max_video_tokens),
                links=topology_links(d.cfg.topology, d.world), config=computation, deployment=deployment,
                chunking=d.chunking, vision_parallel=d.cfg.vision.parallel)


def build_plan(cfg: SpavaConfig, *, require_fit: bool = True) -> Plan:
    """config -> Plan (raises a SpavaError naming the setting when no plan satisfies it)."""
    d = derive(cfg, require_fit=require_fit)
    with _gc_paused():
        return assemble(d)
