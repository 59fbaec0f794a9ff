"""Per-rank, per-layer op lists: the fused runtime schedule (see ``spava_plan.plan.Op``), and the
predicted timeline of every op.

With overlap on, Spava's order hides the selection all-gathers behind attention that needs only
local data (SPAVA_SPEC.md section 5): select -> start every selection all-gather -> query partial
(local keys only) -> start the query all-gather -> each host's attention as soon as the slots its
passing block reads have arrived -> merge the query. Without overlap, every wait comes first and
one fused launch serves every task.

The order is produced once as light ``Step`` named tuples (the first six fields of ``Op``, so
``Op(*step)`` is the untimed op): a zigzag_ring plan has W steps on each of W ranks, and the
timing engine must not pay for W^2 dataclass objects when only the prediction is wanted
(baselines in a comparison). ``timed_ops`` materialises the Op objects of a plan.
"""
from __future__ import annotations

from typing import NamedTuple, Protocol

from spava_plan.plan import AttnTask, Collective, Op, OpKind, RankPlan, RankSchedule, Stream

from .cost import Work

class Step(NamedTuple):
    """An untimed op: the leading fields of ``Op``, in Op's order (``Op(*step)``). A named tuple,
    not a dataclass: a zigzag_ring plan has W^2 of them."""

    name: str
    kind: OpKind = "compute"
    stream: Stream = "compute"
    tasks: tuple[str, ...] = ()
    collective: str = ""
    step: int = -1


def _op(name: str, kind: OpKind = "compute", stream: Stream = "compute", tasks: tuple[str, ...] = (),
        collective: str = "", step: int = -1) -> Step:
    return Step(name, kind, stream, tasks, collective, step)


def _slots(task: AttnTask) -> set[int]:
    return {ref.slot for ref in task.kv if ref.kind == "passing"}


def rank_steps(rank: RankPlan, collectives: tuple[Collective, ...], world: int, overlap: bool) -> list[Step]:
    """The untimed op order of one rank's layer, as Step tuples."""
    names = {c.name: c for c in collectives}
    ops: list[Step] = [_op("qkv")]
    if "ring" in names:
        ops += _ring_ops(rank, world)
    else:
        ops += _anchor_pass_ops(rank, names, overlap)
    ops.append(_op("out_mlp"))
    return ops


def rank_ops(rank: RankPlan, collectives: tuple[Collective, ...], world: int, overlap: bool) -> tuple[Op, ...]:
    """The untimed op order of one rank's layer."""
    return tuple(Op(*s) for s in rank_steps(rank, collectives, world, overlap))


def _start(name: str) -> Step:
    return _op(f"start:{name}", "comm_start", stream="comm", collective=name)


def _wait(name: str) -> Step:
    return _op(f"wait:{name}", "comm_wait", stream="comm", collective=name)


def _anchor_pass_ops(rank: RankPlan, names: dict[str, Collective], overlap: bool) -> list[Step]:
    ops: list[Step] = []
    selects = [n for n in names if names[n].kind == "select_all_gather"]
    has_query = "query" in names
    if rank.select:
        ops.append(_op("select"))
    query = [t for t in rank.tasks if t.merge == "query"]
    context = [t for t in rank.tasks if t.merge == "none"]
    if not overlap:
        for n in selects:
            ops += [_start(n), _wait(n)]
        ops.append(_op("attend", tasks=tuple(t.name for t in context + query)))
        if has_query:
            ops += [_start("query"), _wait("query"), _op("merge", collective="query")]
        return ops
    ops += [_start(n) for n in selects]
    # First launch: the query partial plus every task that needs no passing block (the anchor,
    # host 0), so the query all-gather starts early and the first wait has the most cover.
    waited: set[int] = set()
    first = query + [t for t in context if not _slots(t)]
    if first:
        ops.append(_op("attend", tasks=tuple(t.name for t in first)))
    if has_query:
        ops.append(_start("query"))
    pending = [t for t in context if t not in first]
    while pending:
        # Launch every task whose passing slots have all arrived; otherwise wait for the next slot.
        ready = [t for t in pending if _slots(t) <= waited]
        if ready:
            ops.append(_op("attend", tasks=tuple(t.name for t in ready)))
            pending = [t for t in pending if t not in ready]
            continue
        slot = min(set().union(*(_slots(t) for t in pending)) - waited)
        ops.append(_wait(f"select{slot}"))
        waited.add(slot)
    for s in sorted({names[n].slot for n in selects} - waited):
        ops.append(_wait(f"select{s}"))  # every started collective is waited on
    if has_query:
        ops += [_wait("query"), _op("merge", collective="query")]
    return ops


def _ring_ops(rank: RankPlan, world: int) -> list[Step]:
    """W steps; step s attends the K/V owned by rank (r - s) mod W while step s+1's arrive."""
    chunks = tuple(t.name for t in rank.tasks)
    # The comm steps are the same on every rank: share the tuples (W^2 of them in a plan).
    return [_op("attend", "compute", "compute", chunks, "", op.step) if op.kind == "compute" else op
            for op in _ring_template(world)]


_RING_TEMPLATES: dict[int, list[Step]] = {}


def _ring_template(world: int) -> list[Step]:
    if world not in _RING_TEMPLATES:
        ops: list[Step] = []
        for step in range(world):
            if step + 1 < world:
                ops.append(_op(f"start:ring{step + 1}", "comm_start", "comm", (), "ring", step + 1))
            ops.append(_op("attend", "compute", "compute", (), "", step))
            if step + 1 < world:
                ops.append(_op(f"wait:ring{step + 1}", "comm_wait", "comm", (), "ring", step + 1))
        _RING_TEMPLATES.clear()  # keep one: a process plans one world size at a time
        _RING_TEMPLATES[world] = ops
    return _RING_TEMPLATES[world]


# -- timing ---------------------------------------------------------------------------------------
# Two streams per rank. Compute ops run back to back on the compute stream. ``comm_start`` launches
# a collective at the compute stream's current time; the transfer itself runs on the comm stream
# once every participant has launched it and finished its earlier transfers (NCCL serialises one
# communicator's collectives), so the op's start_us/end_us are the transfer's. ``comm_wait``
# stalls the compute stream until the transfer is done: start_us = arrival, end_us = resume, and
# the stall is the rank's exposed communication. Every layer repeats the same ops; one layer is
# simulated with all ranks starting at 0 (the collectives synchronise them every layer anyway).

class Durations(Protocol):
    """Work of the compute steps of a rank (the cost model behind the timeline)."""

    def __call__(self, rank: RankPlan, step: Step) -> Work: ...

    def attend_by_owner(self, rank: RankPlan, tasks: tuple[str, ...]) -> list[tuple[float, float, float]]:
        """One fused launch of ``tasks`` restricted to the keys each rank owns (ring steps), as
        (us, flops, bytes) per owner rank (a launch that finds no keys costs its overhead)."""
        ...
Timing = tuple  # (start_us, end_us, flops, bytes) of one op


def _participants(kind: str, rank: int, world: int) -> tuple[int, ...]:
    """Ranks whose launch a rank's instance of a collective waits for."""
    if kind == "ring":  # receive from rank - 1, send to rank + 1
        return tuple(sorted({(rank - 1) % world, rank, (rank + 1) % world}))
    return tuple(range(world))


class Timeline:
    """The simulated layer: per rank, the timing of every step, layer_us and exposed comm."""

    def __init__(self, timings: list[list[Timing]], layer_us: list[float], exposed_us: list[float]):
        self.timings, self.layer_us, self.exposed_us = timings, layer_us, exposed_us


def simulate(ranks: tuple[RankPlan, ...], steps: list[list[Step]], collectives: tuple[Collective, ...],
             durations: Durations, world: int, record: bool = True) -> Timeline:
    """Time one layer of every rank (see the comment above for the model). Ring schedules take
    an equivalent step-synchronous path (same model, O(W^2) float updates instead of O(W^2)
    event-loop iterations); tests check it against the general engine."""
    ring = [c for c in collectives if c.kind == "ring"]
    if ring and len(collectives) == 1:
        return simulate_ring(ranks, steps, ring[0], durations, world, record)
    return simulate_events(ranks, steps, collectives, durations, world)


def simulate_events(ranks: tuple[RankPlan, ...], steps: list[list[Step]], collectives: tuple[Collective, ...],
                    durations: Durations, world: int) -> Timeline:
    """The general engine: every rank advances until it waits on a collective that some
    participant has not launched yet; launches that complete a group time its transfer."""
    coll = {c.name: c for c in collectives}
    n = len(ranks)
    idx = [0] * n
    now = [0.0] * n  # compute stream time of each rank
    comm_free = [0.0] * n  # when each rank's comm stream is next idle
    stalled = [0.0] * n
    timed: list[list[Timing | None]] = [[None] * len(s) for s in steps]
    launches: dict[tuple[str, int], dict[int, tuple[float, int]]] = {}  # key -> rank -> (time, step index)
    done: dict[tuple[str, int], dict[int, float]] = {}  # key -> rank -> completion

    def resolve(key: tuple[str, int], rank: int) -> None:
        """Time the transfers of ``key`` that ``rank``'s launch may have unblocked."""
        c = coll[key[0]]
        seen = launches[key]
        finished = done.setdefault(key, {})
        ring = c.kind == "ring"
        moved = float(c.bytes_per_rank * (1 if ring else world))
        for r in (_participants("ring", rank, world) if ring else (rank,)):
            if r not in seen or r in finished:
                continue
            group = _participants(c.kind, r, world)
            if (any(p not in seen for p in group) if ring else len(seen) < world):
                continue
            launched = max(seen[p][0] for p in group)
            members = (r,) if ring else group
            begin = max(launched, max(comm_free[m] for m in members))
            end = begin + c.time_us
            for m in members:
                finished[m] = end
                comm_free[m] = end
                timed[m][seen[m][1]] = (begin, end, 0.0, moved)

    remaining = sum(len(s) for s in steps)
    while remaining:
        progressed = remaining
        for r in range(n):
            rank_steps_ = steps[r]
            rank = ranks[r]
            i = idx[r]
            t = now[r]
            while i < len(rank_steps_):
                s = rank_steps_[i]
                kind = s.kind
                if kind == "compute":
                    w = durations(rank, s)
                    timed[r][i] = (t, t + w.us, w.flops, w.bytes)
                    t += w.us
                elif kind == "comm_start":
                    key = (s.collective, s.step)
                    launches.setdefault(key, {})[r] = (t, i)
                    resolve(key, r)
                else:
                    end = done.get((s.collective, s.step), {}).get(r)
                    if end is None:
                        break  # blocked until the other participants launch it
                    resume = max(t, end)
                    stalled[r] += resume - t
                    timed[r][i] = (t, resume, 0.0, 0.0)
                    t = resume
                i += 1
                remaining -= 1
            idx[r] = i
            now[r] = t
        assert remaining < progressed, "schedule deadlock: a collective is waited on but never launched by all"
    for r in range(n):
        assert all(x is not None for x in timed[r]), f"rank {r}: a started collective never ran"
    return Timeline(timed, now, stalled)  # type: ignore[arg-type]


def simulate_ring(ranks: tuple[RankPlan, ...], steps: list[list[Step]], ring: Collective,
                  durations: Durations, world: int, record: bool = True) -> Timeline:
    """The ring pattern of ``_ring_ops``: [qkv] (start s+1, attend s, wait s+1) x W [out_mlp].

    Step s+1's transfer on rank r begins once ranks r-1, r, r+1 have launched it and r's comm
    stream is free; every rank launches step s+1 right after finishing its wait for step s, so the
    whole ring advances one step at a time. ``record=False`` keeps only the per-rank totals."""
    n = len(ranks)
    assert n == world
    for r in range(n):  # the pattern this path assumes
        assert len(steps[r]) == 3 * world and steps[r][0].name == "qkv" and steps[r][-1].name == "out_mlp", r
    # Work values are read by index: the attend tables hold plain (us, flops, bytes) tuples.
    first = [durations(ranks[r], steps[r][0]) for r in range(n)]
    last = [durations(ranks[r], steps[r][-1]) for r in range(n)]
    # attend step s of rank r reads the keys owned by rank (r - s) mod W
    tables = [durations.attend_by_owner(ranks[r], steps[r][2].tasks) for r in range(n)]
    now = [w[0] for w in first]
    comm_free = [0.0] * n
    stalled = [0.0] * n
    timings: list[list[Timing]] = [[(0.0, w[0], w[1], w[2])] for w in first] if record else []
    dur = ring.time_us
    moved = float(ring.bytes_per_rank)
    for s in range(world):
        more = s + 1 < world
        launch = now[:]
        for r in range(n):
            w = tables[r][(r - s) % world]
            if record:
                if more:
                    timings[r].append(())  # the transfer's timing, filled below
                timings[r].append((now[r], now[r] + w[0], w[1], w[2]))
            now[r] += w[0]
        if not more:
            break
        for r in range(n):
            begin = max(launch[r - 1], launch[r], launch[(r + 1) % n], comm_free[r])
            end = begin + dur
            comm_free[r] = end
            t = now[r]
            if end > t:
                stalled[r] += end - t
                now[r] = end
            if record:
                timings[r][-2] = (begin, end, 0.0, moved)
                timings[r].append((t, now[r], 0.0, 0.0))
    for r in range(n):
        if record:
            timings[r].append((now[r], now[r] + last[r][0], last[r][1], last[r][2]))
        now[r] += last[r][0]
    return Timeline(timings, now, stalled)


def rank_schedules(ranks: tuple[RankPlan, ...], steps: list[list[Step]], timeline: Timeline,
                   with_ops: bool = True) -> tuple[RankSchedule, ...]:
    """RankSchedule of every rank; ``with_ops=False`` keeps only the per-layer totals (for
    predictions that are never serialised, e.g. baselines at large W)."""
    out = []
    for r, rank in enumerate(ranks):
        ops = tuple(Op(*s, *t) for s, t in zip(steps[r], timeline.timings[r])) if with_ops else ()
        out.append(RankSchedule(rank=rank.rank, ops=ops, layer_us=timeline.layer_us[r],
                                exposed_comm_us=timeline.exposed_us[r]))
    return tuple(out)
