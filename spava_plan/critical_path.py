"""The one timeline model: per-rank compute and communication on two streams, and the exposed
communication (the planner's predicted schedule and an emulated run's timing both come from here).

Each rank is a list of events:
  Compute(us)                  compute on the rank's compute stream, back to back
  Start(key, peers, cost_us)   an asynchronous communication is issued (takes no compute time)
  Wait(key)                    the compute stream stalls until that communication is done
  Sync(key, peers, cost_us)    a blocking communication (Start + Wait)
``key`` names the same communication on every rank (planner: (collective, ring step); emulated
run: its call index); ``peers`` are the ranks whose issue it needs (every rank for a
collective; the rank itself may be listed or not).

Model: a communication issued at time t on rank r is *ready* on r once r issued it and the
previous communication on r's single comm stream has finished there (NCCL runs one
communicator's calls in order). Its transfer on r begins when r and every peer are ready for
it, and lasts ``cost_us``. A wait resumes compute at max(now, transfer end); the stall is the
rank's exposed communication.

Cost: a communication whose peers are every rank (a collective) is resolved once for all ranks,
O(W) per collective, not once per rank (O(W^2)): planning at 1024 GPUs depends on it. A
point-to-point step (a ring) is resolved per rank over its few peers.

``simulate_ring`` is a closed-form fast path of THE SAME model for the zigzag ring pattern
(``ring_events``), used where W^2 events would be too many (ring baselines at 1024 GPUs); tests
check it against ``simulate`` on random inputs. Pure Python, no torch: the core, which planner
and runtime both import.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Hashable, Sequence, Union


@dataclass(frozen=True, slots=True)
class Compute:
    us: float


@dataclass(frozen=True, slots=True)
class Start:
    key: Hashable
    peers: tuple[int, ...]
    cost_us: float


@dataclass(frozen=True, slots=True)
class Wait:
    key: Hashable


@dataclass(frozen=True, slots=True)
class Sync:
    key: Hashable
    peers: tuple[int, ...]
    cost_us: float


Event = Union[Compute, Start, Wait, Sync]
Interval = tuple[float, float]  # (start_us, end_us)


@dataclass(frozen=True)
class Timeline:
    """The simulated ranks. ``timings[r][i]`` (only with ``record=True``) is event i of rank r:
    Compute: when it runs; Start and Sync: the transfer on this rank's comm stream; Wait: from
    the wait to the resume (its length is the stall; a Sync's stall runs from its call to
    max(call, transfer end))."""

    finish_us: tuple[float, ...]  # per rank: when its last event ends
    compute_us: tuple[float, ...]  # per rank: sum of its compute
    exposed_comm_us: tuple[float, ...]  # per rank: time stalled in waits
    timings: tuple[tuple[Interval, ...], ...] = ()

    @property
    def makespan_us(self) -> float:
        return max(self.finish_us, default=0.0)


class _Transfer:
    """One communication as resolved for the ranks that share its peer group: a collective's
    one instance for every rank, or one rank's instance of a point-to-point step."""

    __slots__ = ("owners", "missing", "begin", "cost")

    def __init__(self, cost: float, missing: int):
        self.owners: list[int] = []  # the ranks whose instance this is
        self.missing = missing  # members not yet ready
        self.begin = 0.0  # the latest ready time seen so far
        self.cost = cost


def simulate(traces: Sequence[Sequence[Event]], record: bool = False) -> Timeline:
    """Time every rank's events (the model above); ``record`` keeps each event's (start, end).
    Raises ValueError on traces that cannot complete (a wait on a communication some peer never
    issues, a key issued twice on one rank)."""
    W = len(traces)
    clock = [0.0] * W
    compute = [0.0] * W
    exposed = [0.0] * W
    pos = [0] * W
    timed: list[list[Interval | None]] = [[None] * len(t) for t in traces] if record else []
    issued: dict[tuple[Hashable, int], tuple[float, int]] = {}  # (key, rank) -> (issue time, event index)
    stream: list[deque[Hashable]] = [deque() for _ in range(W)]  # issued, not finished, in order
    stream_free = [0.0] * W  # when the last finished transfer on the rank's comm stream ended
    ready: dict[tuple[Hashable, int], float] = {}  # (key, rank) -> ready time
    units: dict[Hashable, dict[frozenset[int] | None, _Transfer]] = {}  # key -> peer group -> transfer
    member_of: dict[tuple[Hashable, int], list[_Transfer]] = {}  # small groups a rank belongs to
    finished: dict[tuple[Hashable, int], float] = {}  # (key, rank) -> transfer end on that rank
    blocked: dict[int, Hashable] = {}  # rank -> key it waits on
    runnable: deque[int] = deque(range(W))

    def group_of(peers: tuple[int, ...], rank: int) -> frozenset[int] | None:
        if len(peers) >= W:  # every rank (peers are distinct ranks): no O(W) set per rank
            return None
        g = frozenset(peers) | {rank}
        return None if len(g) == W else g

    def unit_ready(u: _Transfer, at: float) -> None:
        u.missing -= 1
        if at > u.begin:
            u.begin = at
        if u.missing == 0:
            end = u.begin + u.cost
            for o in u.owners:
                finish(u, o, end)

    def finish(u: _Transfer, rank: int, end: float) -> None:
        key = stream[rank].popleft()  # only the head of a rank's stream can be ready
        finished[(key, rank)] = end
        stream_free[rank] = end
        if record:
            timed[rank][issued[(key, rank)][1]] = (u.begin, end)
        if blocked.get(rank) == key:
            del blocked[rank]
            runnable.append(rank)
        if stream[rank]:  # the next issued transfer on this rank's stream is now ready
            mark_ready(stream[rank][0], rank)

    def mark_ready(key: Hashable, rank: int) -> None:
        at = max(issued[(key, rank)][0], stream_free[rank])
        ready[(key, rank)] = at
        by_group = units[key]
        every = by_group.get(None)
        if every is not None:
            unit_ready(every, at)
        for u in member_of.get((key, rank), ()):
            unit_ready(u, at)

    def issue(rank: int, key: Hashable, peers: tuple[int, ...], cost: float, index: int) -> None:
        if (key, rank) in issued:
            raise ValueError(f"rank {rank} issued communication {key!r} twice")
        issued[(key, rank)] = (clock[rank], index)
        group = group_of(peers, rank)
        by_group = units.setdefault(key, {})
        u = by_group.get(group)
        if u is None:
            if group is None:
                u = _Transfer(cost, W)
            else:  # count the members that are already ready for this key
                u = _Transfer(cost, len(group))
                for m in group:
                    if m != rank:
                        member_of.setdefault((key, m), []).append(u)
                        at = ready.get((key, m))
                        if at is not None:
                            u.missing -= 1
                            u.begin = max(u.begin, at)
                member_of.setdefault((key, rank), []).append(u)
            by_group[group] = u
        u.owners.append(rank)
        stream[rank].append(key)
        if len(stream[rank]) == 1:
            mark_ready(key, rank)

    while runnable:
        r = runnable.popleft()
        events, i, t = traces[r], pos[r], clock[r]
        while i < len(events):
            ev = events[i]
            if type(ev) is Compute:
                if record:
                    timed[r][i] = (t, t + ev.us)
                t += ev.us
                compute[r] += ev.us
            elif type(ev) is Start:
                clock[r] = t
                issue(r, ev.key, ev.peers, ev.cost_us, i)
            else:
                if type(ev) is Sync and (ev.key, r) not in issued:
                    clock[r] = t
                    issue(r, ev.key, ev.peers, ev.cost_us, i)
                end = finished.get((ev.key, r))
                if end is None:
                    if (ev.key, r) not in issued:
                        raise ValueError(f"rank {r} waits on communication {ev.key!r} it never issued")
                    blocked[r] = ev.key
                    break  # resumed when the transfer finishes
                if end > t:
                    exposed[r] += end - t
                    resume = end
                else:
                    resume = t
                if record and type(ev) is Wait:  # a Sync keeps its transfer (see Timeline)
                    timed[r][i] = (t, resume)
                t = resume
            i += 1
        pos[r], clock[r] = i, t
    stuck = {r: traces[r][pos[r]] for r in range(W) if pos[r] < len(traces[r])}
    if stuck:
        raise ValueError(f"the rank traces deadlock (ranks wait on communication a peer never issues): {stuck}")
    unwaited = [(r, k) for r in range(W) for k in stream[r]]
    if unwaited:
        raise ValueError(f"communication issued but never completed (a peer never issues it): {unwaited[:4]}")
    return Timeline(tuple(clock), tuple(compute), tuple(exposed),
                    tuple(tuple(t) for t in timed) if record else ())  # type: ignore[arg-type]


def spans(traces: Sequence[Sequence[Event]], line: Timeline) -> list[tuple[int, str, str, float, float]]:
    """(rank, lane, name, start_us, end_us) of every compute stretch, stall and transfer of a
    timeline simulated with ``record=True`` (for a trace.json: spava_plan.trace.emulated_spans)."""
    out: list[tuple[int, str, str, float, float]] = []
    for r, events in enumerate(traces):
        t = 0.0
        for ev, (a, b) in zip(events, line.timings[r]):
            if type(ev) is Compute:
                out.append((r, "compute", "compute", a, b))
                t = b
            elif type(ev) is Start:
                out.append((r, "comm", key_name(ev.key), a, b))
            elif type(ev) is Wait:
                if b > a:
                    out.append((r, "compute", f"wait {key_name(ev.key)}", a, b))
                t = b
            else:
                out.append((r, "comm", key_name(ev.key), a, b))
                if b > t:
                    out.append((r, "compute", f"wait {key_name(ev.key)}", t, b))
                    t = b
    return out


def key_name(key: Hashable) -> str:
    return "/".join(str(k) for k in key) if isinstance(key, tuple) else str(key)


# -- the ring pattern ------------------------------------------------------------------------------
# zigzag_ring (SPAVA_SPEC.md section 8) on W ranks, per rank r:
#   Compute(first) then, for s = 0 .. W-1: [Start(("ring", s+1), {r-1, r, r+1}, cost)] Compute(attend
#   of step s) [Wait(("ring", s+1))] (the bracketed events only while s + 1 < W), then Compute(last).
# Step s of rank r attends the keys owned by rank (r - s) mod W while step s+1's arrive from r - 1.

RING = "ring"


def ring_peers(rank: int, world: int) -> tuple[int, ...]:
    """A ring step receives from rank - 1 and sends to rank + 1."""
    return tuple(sorted({(rank - 1) % world, rank, (rank + 1) % world}))


def ring_events(first_us: Sequence[float], attend_us: Sequence[Sequence[float]], last_us: Sequence[float],
                transfer_us: float) -> list[list[Event]]:
    """The ring pattern as events: ``attend_us[r][o]`` is rank r's attention over the keys owned
    by rank o (step s reads owner (r - s) mod W); ``transfer_us`` is one step's transfer."""
    W = len(first_us)
    out = []
    for r in range(W):
        peers = ring_peers(r, W)
        events: list[Event] = [Compute(first_us[r])]
        for s in range(W):
            if s + 1 < W:
                events.append(Start((RING, s + 1), peers, transfer_us))
            events.append(Compute(attend_us[r][(r - s) % W]))
            if s + 1 < W:
                events.append(Wait((RING, s + 1)))
        events.append(Compute(last_us[r]))
        out.append(events)
    return out


def simulate_ring(first_us: Sequence[float], attend_us: Sequence[Sequence[float]], last_us: Sequence[float],
                  transfer_us: float, record: bool = False) -> Timeline:
    """``simulate(ring_events(...), record)`` in closed form: O(W^2) float updates, no event objects.

    Why it is the same model: every rank issues step s+1 right after its wait for step s, so when
    step s+1 is issued each peer's previous transfer has already finished; the transfer of step
    s+1 on rank r therefore begins at max(issue times of r-1, r, r+1, end of r's step s), and the
    whole ring advances one step at a time."""
    W = len(first_us)
    now = [float(x) for x in first_us]
    compute = now[:]
    comm_free = [0.0] * W
    stalled = [0.0] * W
    timings: list[list[Interval]] = [[(0.0, now[r])] for r in range(W)] if record else []
    for s in range(W):
        more = s + 1 < W
        launch = now[:]
        for r in range(W):
            us = attend_us[r][(r - s) % W]
            if record:
                if more:
                    timings[r].append((0.0, 0.0))  # the transfer, filled below
                timings[r].append((now[r], now[r] + us))
            now[r] += us
            compute[r] += us
        if not more:
            break
        for r in range(W):
            begin = max(launch[r - 1], launch[r], launch[(r + 1) % W], comm_free[r])
            end = begin + transfer_us
            comm_free[r] = end
            t = now[r]
            if end > t:
                stalled[r] += end - t
                now[r] = end
            if record:
                timings[r][-2] = (begin, end)
                timings[r].append((t, now[r]))
    for r in range(W):
        if record:
            timings[r].append((now[r], now[r] + last_us[r]))
        now[r] += last_us[r]
        compute[r] += last_us[r]
    return Timeline(tuple(now), tuple(compute), tuple(stalled), tuple(tuple(t) for t in timings))
