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

import dataclasses
from typing import NamedTuple, Protocol

from spava_plan import critical_path
from spava_plan.critical_path import Compute, Event, Start, Wait, ring_peers
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


def _reads_anchor(task: AttnTask) -> bool:
    return any(ref.kind == "anchor" for ref in task.kv)


def rank_steps(rank: RankPlan, collectives: tuple[Collective, ...], world: int, overlap: bool) -> list[Step]:
    """The untimed op order of one rank's layer, as Step tuples."""
    names = {c.name: c for c in collectives}
    reduces = [c.name for c in collectives if c.kind == "all_reduce"]
    if reduces:  # dense_tp: attention, then the all-reduce after o_proj; the MLP, then the one after it
        attn, mlp = reduces
        return [_op("qkv"), _op("attend", tasks=tuple(t.name for t in rank.tasks)), _start(attn), _wait(attn),
                _op("out_mlp"), _start(mlp), _wait(mlp)]
    ops: list[Step] = [_op("qkv")]
    if "ring" in names:
        ops += _ring_ops(rank, world)
    else:
        anchor = [n for n, c in names.items() if c.kind == "anchor_broadcast"]
        names = {n: c for n, c in names.items() if c.kind != "anchor_broadcast"}
        body = _anchor_pass_ops(rank, names, overlap)
        if anchor:
            body = _anchor_broadcast_ops(rank, anchor[0], body)
        ops += body
    ops.append(_op("out_mlp"))
    return ops


def _anchor_broadcast_ops(rank: RankPlan, name: str, body: list[Step]) -> list[Step]:
    """method.anchor=broadcast: every rank starts the anchor broadcast right after its qkv (the
    first collective of the layer on every rank, so the collective order agrees). Rank 0 has the
    anchor's K/V then, as its first rows, and sends them at once; a receiving rank waits just
    before its first launch that reads them, so the selection (spava, apb) runs while they arrive.
    Rank 0 waits last (its send completes in the background while it attends). Why per layer
    and not rank 0's whole anchor pass first: the selection and query all-gathers synchronise
    every rank every layer, so the others could not run ahead of rank 0 anyway, and an anchor
    pass first would hold all of them at layer 0 for its whole duration."""
    readers = {t.name for t in rank.tasks if _reads_anchor(t)}
    out = [_start(name)]
    waited = False
    for s in body:
        if not waited and s.name == "attend" and readers & set(s.tasks):
            out.append(_wait(name))
            waited = True
        out.append(s)
    if not waited:
        out.append(_wait(name))
    return out


def rank_ops(rank: RankPlan, collectives: tuple[Collective, ...], world: int, overlap: bool) -> tuple[Op, ...]:
    """The untimed op order of one rank's layer."""
    return tuple(Op(*s) for s in rank_steps(rank, collectives, world, overlap))


def _start(name: str) -> Step:
    return _op(f"start:{name}", "comm_start", stream="comm", collective=name)


def _wait(name: str) -> Step:
    return _op(f"wait:{name}", "comm_wait", stream="comm", collective=name)


def _anchor_pass_ops(rank: RankPlan, names: dict[str, Collective], overlap: bool,
                     arrived: frozenset[int] = frozenset()) -> list[Step]:
    """``arrived``: passing slots whose buffers are already filled (global passing's scan)."""
    ops: list[Step] = []
    selects = [n for n in names if names[n].kind == "select_all_gather"]
    has_query = "query" in names
    if rank.select:
        ops.append(_op("select"))
    scan = [n for n in names if names[n].kind == "select_scan"]
    if scan:
        # Global passing: the scan's rounds each merge what arrived before the next round can
        # start, so the runtime runs them back to back (blocking); every host's passing buffer is
        # then ready, and the rest is the schedule of a plan without selection all-gathers.
        ops += [_start(scan[0]), _wait(scan[0])]
        names = {n: c for n, c in names.items() if c.kind != "select_scan"}
        slots = frozenset(range(len(rank.hosts)))
        return ops + _anchor_pass_ops(dataclasses.replace(rank, select=()), names, overlap, slots)
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
    waited: set[int] = set(arrived)
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
# The model is spava_plan.critical_path (the one the emulated run is timed with too): compute ops
# run back to back on the compute stream; ``comm_start`` issues a collective, whose transfer runs
# on the rank's comm stream once every participant has issued it and finished its earlier
# transfers, so the op's start_us/end_us are the transfer's; ``comm_wait`` stalls the compute
# stream until the transfer is done: start_us = arrival, end_us = resume, and the stall is the
# rank's exposed communication. Every layer repeats the same ops; one layer is simulated with all
# ranks starting at 0 (the collectives synchronise them every layer anyway). This module turns
# the Steps and their cost-model durations into critical_path events and maps the times back.

class Durations(Protocol):
    """Work of the compute steps of a rank (the cost model behind the timeline)."""

    def __call__(self, rank: RankPlan, step: Step) -> Work: ...

    def attend_by_owner(self, rank: RankPlan, tasks: tuple[str, ...]) -> list[tuple[float, float, float]]:
        """One fused launch of ``tasks`` restricted to the keys each rank owns (ring steps), as
        (us, flops, bytes) per owner rank (a launch that finds no keys costs its overhead)."""
        ...
Timing = tuple  # (start_us, end_us, flops, bytes) of one op


class Timeline:
    """The simulated layer: per rank, the timing of every step, layer_us and exposed comm."""

    def __init__(self, timings: list[list[Timing]], layer_us: list[float], exposed_us: list[float]):
        self.timings, self.layer_us, self.exposed_us = timings, layer_us, exposed_us


def simulate(ranks: tuple[RankPlan, ...], steps: list[list[Step]], collectives: tuple[Collective, ...],
             durations: Durations, world: int, record: bool = True) -> Timeline:
    """Time one layer of every rank; ``record=False`` keeps only the per-rank totals. A ring
    schedule takes the model's closed-form ring path (critical_path.simulate_ring: O(W^2) float
    updates instead of W^2 event objects)."""
    ring = [c for c in collectives if c.kind == "ring"]
    if ring and len(collectives) == 1:
        return simulate_ring(ranks, steps, ring[0], durations, world, record)
    return simulate_events(ranks, steps, collectives, durations, world, record)


def layer_events(ranks: tuple[RankPlan, ...], steps: list[list[Step]], collectives: tuple[Collective, ...],
                 durations: Durations, world: int) -> tuple[list[list[Event]], list[list[Work | None]]]:
    """The critical_path events of one layer of every rank, and each compute step's Work (None
    for comm steps). Keys are (collective, ring step); a collective waits for every rank, a ring
    step for the neighbours it exchanges with."""
    coll = {c.name: c for c in collectives}
    everyone = tuple(range(world))  # one tuple shared by every rank's collectives
    traces: list[list[Event]] = []
    works: list[list[Work | None]] = []
    for r, rank in enumerate(ranks):
        events: list[Event] = []
        work: list[Work | None] = []
        for s in steps[r]:
            if s.kind == "compute":
                w = durations(rank, s)
                events.append(Compute(w.us))
                work.append(w)
                continue
            key = (s.collective, s.step)
            if s.kind == "comm_start":
                c = coll[s.collective]
                peers = ring_peers(r, world) if c.kind == "ring" else everyone
                events.append(Start(key, peers, c.time_us))
            else:
                events.append(Wait(key))
            work.append(None)
        traces.append(events)
        works.append(work)
    return traces, works


def simulate_events(ranks: tuple[RankPlan, ...], steps: list[list[Step]], collectives: tuple[Collective, ...],
                    durations: Durations, world: int, record: bool = True) -> Timeline:
    """The general path: every step through critical_path.simulate (``record=False``: totals only)."""
    traces, works = layer_events(ranks, steps, collectives, durations, world)
    line = critical_path.simulate(traces, record=record)
    if not record:
        return Timeline([], list(line.finish_us), list(line.exposed_comm_us))
    moved = {c.name: float(c.bytes_per_rank * (1 if c.kind == "ring" else world)) for c in collectives}
    timings: list[list[Timing]] = []
    for r in range(len(ranks)):
        out: list[Timing] = []
        for s, w, (a, b) in zip(steps[r], works[r], line.timings[r]):
            if w is not None:
                out.append((a, b, w.flops, w.bytes))
            elif s.kind == "comm_start":
                out.append((a, b, 0.0, moved[s.collective]))
            else:
                out.append((a, b, 0.0, 0.0))
        timings.append(out)
    return Timeline(timings, list(line.finish_us), list(line.exposed_comm_us))


def simulate_ring(ranks: tuple[RankPlan, ...], steps: list[list[Step]], ring: Collective,
                  durations: Durations, world: int, record: bool = True) -> Timeline:
    """The ring pattern of ``_ring_ops`` ([qkv] (start s+1, attend s, wait s+1) x W [out_mlp],
    critical_path.ring_events) through the model's closed form. ``record=False`` keeps only the
    per-rank totals."""
    n = len(ranks)
    assert n == world
    for r in range(n):  # the pattern this path assumes
        assert len(steps[r]) == 3 * world and steps[r][0].name == "qkv" and steps[r][-1].name == "out_mlp", r
    first = [durations(ranks[r], steps[r][0]) for r in range(n)]
    last = [durations(ranks[r], steps[r][-1]) for r in range(n)]
    # attend step s of rank r reads the keys owned by rank (r - s) mod W: (us, flops, bytes) by owner
    tables = [durations.attend_by_owner(ranks[r], steps[r][2].tasks) for r in range(n)]
    line = critical_path.simulate_ring([w.us for w in first], [[w[0] for w in t] for t in tables],
                                       [w.us for w in last], ring.time_us, record)
    timings: list[list[Timing]] = []
    if record:
        moved = float(ring.bytes_per_rank)
        for r in range(n):
            t = line.timings[r]
            out: list[Timing] = [(*t[0], first[r].flops, first[r].bytes)]
            i = 1
            for s in range(world):
                if s + 1 < world:
                    out.append((*t[i], 0.0, moved))
                    i += 1
                w = tables[r][(r - s) % world]
                out.append((*t[i], w[1], w[2]))
                i += 1
                if s + 1 < world:
                    out.append((*t[i], 0.0, 0.0))
                    i += 1
            out.append((*t[i], last[r].flops, last[r].bytes))
            timings.append(out)
    return Timeline(timings, list(line.finish_us), list(line.exposed_comm_us))


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
