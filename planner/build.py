"""config -> Plan: the planner's one entry point.

    layout (tokens) -> partition (segments) -> placement (hosts -> ranks) -> rank plans
    -> collectives -> schedule + predictions -> Plan
"""
from __future__ import annotations

from spava_plan.config import SpavaConfig, config_to_dict
from spava_plan.plan import Layout, ModelSpec, Plan, Prediction, RankSchedule, Segment

from .layout import TokenLayout, token_layout
from .partition import Partition, partition
from .placement import place
from .ranks import collectives, rank_plans
from .schedule import rank_ops


def model_spec(cfg: SpavaConfig) -> ModelSpec:
    m = cfg.model
    return ModelSpec(name=m.name, family=m.family, num_layers=m.num_layers, hidden_size=m.hidden_size,
                     intermediate_size=m.intermediate_size, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
                     head_dim=m.head_dim, vocab_size=m.vocab_size)


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


def host_work(part: Partition) -> list[float]:
    """Attention work of each virtual host in score-matrix entries (rows x keys it attends)."""
    work = []
    anchor = part.anchor_tokens if part.anchor else 0
    for v, (a, b) in enumerate(part.blocks):
        rows = b - a
        passing = v * part.keep
        work.append(float(rows * (passing + anchor) + rows * (rows + 1) / 2))
    return work


def build_plan(cfg: SpavaConfig) -> Plan:
    tokens = token_layout(cfg.model, cfg.video)
    part = partition(tokens, cfg.method, cfg.topology.gpus)
    spec = model_spec(cfg)
    placement = place(host_work(part), part.world, part.hosts_per_rank, cfg.solver)
    layout = Layout(total_tokens=tokens.total_tokens, context_tokens=tokens.context_tokens,
                    query_tokens=tokens.query_tokens, video_tokens=tokens.video_tokens, frames=tokens.frames,
                    grid_thw=tokens.grid_thw, frame_size=tokens.frame_size, anchor_tokens=part.anchor_tokens,
                    passing_tokens=part.passing_tokens, virtual_hosts=part.virtual_hosts,
                    segments=segments(tokens, part))
    ranks = rank_plans(part, placement.host_rank)
    colls = collectives(part, spec, cfg.dtype_bytes)
    schedule = tuple(RankSchedule(rank=r.rank, ops=rank_ops(r, colls, part.world, cfg.method.overlap)) for r in ranks)
    return Plan(method=part.method, world_size=part.world, dtype=cfg.dtype, model=spec, layout=layout,
                placement=placement, ranks=ranks, collectives=colls, schedule=schedule, prediction=Prediction(),
                config=config_to_dict(cfg))
