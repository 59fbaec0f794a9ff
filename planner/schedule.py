"""Per-rank, per-layer op lists: the fused runtime schedule (see ``spava_plan.plan.Op``).

With overlap on, Spava's order hides the selection all-gathers behind attention that needs only
local data (SPAVA_SPEC.md section 5): select -> start every selection all-gather -> query partial
(local keys only) -> start the query all-gather -> each host's attention as soon as the slots its
passing block reads have arrived -> merge the query. Without overlap, every wait comes first and
one fused launch serves every task.
"""
from __future__ import annotations

from spava_plan.plan import AttnTask, Collective, Op, RankPlan


def _slots(task: AttnTask) -> set[int]:
    return {ref.slot for ref in task.kv if ref.kind == "passing"}


def rank_ops(rank: RankPlan, collectives: tuple[Collective, ...], world: int, overlap: bool) -> tuple[Op, ...]:
    """The untimed op order of one rank's layer."""
    names = {c.name: c for c in collectives}
    ops: list[Op] = [Op("qkv", "compute")]
    if "ring" in names:
        ops += _ring_ops(rank, world)
    else:
        ops += _anchor_pass_ops(rank, names, overlap)
    ops.append(Op("out_mlp", "compute"))
    return tuple(ops)


def _start(name: str) -> Op:
    return Op(f"start:{name}", "comm_start", stream="comm", collective=name)


def _wait(name: str) -> Op:
    return Op(f"wait:{name}", "comm_wait", stream="comm", collective=name)


def _anchor_pass_ops(rank: RankPlan, names: dict[str, Collective], overlap: bool) -> list[Op]:
    ops: list[Op] = []
    selects = [n for n in names if names[n].kind == "select_all_gather"]
    has_query = "query" in names
    if rank.select:
        ops.append(Op("select", "compute"))
    query = [t for t in rank.tasks if t.merge == "query"]
    context = [t for t in rank.tasks if t.merge == "none"]
    if not overlap:
        for n in selects:
            ops += [_start(n), _wait(n)]
        ops.append(Op("attend", "compute", tasks=tuple(t.name for t in context + query)))
        if has_query:
            ops += [_start("query"), _wait("query"), Op("merge", "compute", collective="query")]
        return ops
    ops += [_start(n) for n in selects]
    # First launch: the query partial plus every task that needs no passing block (the anchor,
    # host 0), so the query all-gather starts early and the first wait has the most cover.
    waited: set[int] = set()
    first = query + [t for t in context if not _slots(t)]
    if first:
        ops.append(Op("attend", "compute", tasks=tuple(t.name for t in first)))
    if has_query:
        ops.append(_start("query"))
    pending = [t for t in context if t not in first]
    while pending:
        # Launch every task whose passing slots have all arrived; otherwise wait for the next slot.
        ready = [t for t in pending if _slots(t) <= waited]
        if ready:
            ops.append(Op("attend", "compute", tasks=tuple(t.name for t in ready)))
            pending = [t for t in pending if t not in ready]
            continue
        slot = min(set().union(*(_slots(t) for t in pending)) - waited)
        ops.append(_wait(f"select{slot}"))
        waited.add(slot)
    for s in sorted({names[n].slot for n in selects} - waited):
        ops.append(_wait(f"select{s}"))  # every started collective is waited on
    if has_query:
        ops += [_wait("query"), Op("merge", "compute", collective="query")]
    return ops


def _ring_ops(rank: RankPlan, world: int) -> list[Op]:
    """W steps; step s attends the K/V owned by rank (r - s) mod W while step s+1's arrive."""
    chunks = tuple(t.name for t in rank.tasks)
    ops: list[Op] = []
    for step in range(world):
        if step + 1 < world:
            ops.append(Op(f"start:ring{step + 1}", "comm_start", stream="comm", collective="ring", step=step + 1))
        ops.append(Op("attend", "compute", tasks=chunks, step=step))
        if step + 1 < world:
            ops.append(Op(f"wait:ring{step + 1}", "comm_wait", stream="comm", collective="ring", step=step + 1))
    return ops
