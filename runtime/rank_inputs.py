"""Random inputs of one rank, laid out as the runtime views them: for kernel tests and benchmarks.

Local q/k/v are (N_local, H, D) buffers; each passing all-gather buffer is (W, keep, Hkv, 2D) with
K = [..., :D] and V = [..., D:], and so is each remote (ring) segment's (n, Hkv, 2D) buffer. A
task's segments are in-place views of these buffers (local segments are row slices, passing
segments rows of an all-gather buffer), as RankAttention builds them, so a kernel sees the strides
it sees in a real run.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from spava_plan.plan import Plan

from .backends.base import KVSegment, TaskInput


@dataclass
class RankInputs:
    tasks: dict[str, TaskInput]  # by task name
    q_query: torch.Tensor | None  # the query task's rows (None when this rank holds no query)
    select_blocks: list[tuple[torch.Tensor, torch.Tensor, int]]  # (k, v, keep) per selection block
    # the same blocks as the runtime hands them to backend.select_blocks: the local K, V and
    # (first local row, stop row, keep) per block
    local_kv: tuple[torch.Tensor, torch.Tensor] | None = None
    select_rows: list[tuple[int, int, int]] | None = None


def random_rank_inputs(plan: Plan, rank: int, dtype: torch.dtype, device: torch.device | str,
                       gen: torch.Generator) -> RankInputs:
    """Standard-normal inputs of ``rank``, drawn in fp32 on ``gen``'s device, then moved to
    ``device`` and cast to ``dtype``."""
    rp, m = plan.ranks[rank], plan.model
    D, hq, hkv, W = m.head_dim, m.num_heads, m.num_kv_heads, plan.world_size
    n = rp.local_tokens

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=gen.device, dtype=torch.float32).to(device=device,
                                                                                              dtype=dtype)

    q, k, v = rand(n, hq, D), rand(n, hkv, D), rand(n, hkv, D)
    keep = {c.slot: c.rows_per_rank for c in plan.collectives if c.kind == "select_all_gather"}
    passing = {s: rand(W, kp, hkv, 2 * D) for s, kp in keep.items()}
    for c in plan.collectives:  # global passing: one buffer of keep rows per host slot ([0, 1))
        if c.kind == "select_scan":
            passing.update({s: rand(1, c.rows_per_rank, hkv, 2 * D) for s in range(len(rp.hosts))})

    def segment(ref) -> KVSegment:
        if ref.kind == "local":
            a = rp.local_offset(ref.start)
            return KVSegment(k[a:a + ref.length], v[a:a + ref.length], ref.mask)
        if ref.kind in ("remote", "anchor"):  # a ring step's / the broadcast anchor's packed K|V rows, as received
            rows = rand(ref.length, hkv, 2 * D)
            return KVSegment(rows[..., :D], rows[..., D:], ref.mask)
        if ref.kind != "passing":
            raise ValueError(f"unknown segment kind {ref.kind!r}")
        rows = passing[ref.slot][ref.rank_start:ref.rank_stop].reshape(-1, hkv, 2 * D)
        return KVSegment(rows[..., :D], rows[..., D:], ref.mask)

    tasks = {}
    for t in rp.tasks:
        a = rp.local_offset(t.q_start)
        tasks[t.name] = TaskInput(t.name, q[a:a + t.rows], tuple(segment(r) for r in t.kv))
    query = next((t for t in rp.tasks if t.merge == "query"), None)
    blocks, rows = [], []
    for _slot, start, stop, kp in rp.select:
        a = rp.local_offset(start)
        blocks.append((k[a:a + stop - start], v[a:a + stop - start], kp))
        rows.append((a, a + stop - start, kp))
    return RankInputs(tasks, tasks[query.name].q if query else None, blocks, (k, v), rows)
