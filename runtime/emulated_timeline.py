"""Critical-path model for an emulated W-rank run: measured compute + communication it cannot hide.

Each rank's trace (recorded while the rank was replayed alone) is a list of events:
  Compute(us)                        measured compute between two communication calls
  Start(key, peers, cost_us)         an asynchronous communication is issued
  Wait(key)                          the rank blocks until that communication is done
  Sync(key, peers, cost_us)          a blocking communication (Start + Wait)
``key`` matches the same communication across ranks (collectives: their call index; P2P: the
exchange index); ``peers`` are the ranks it waits for (every rank for a collective).

Model: a communication issued at t on a rank starts on that rank's single comm stream once the
previous one there finished; it ends ``cost_us`` after the LAST participant started it (a
collective cannot finish before every rank joined). A wait stalls the rank until then; the stall
is the exposed communication. The result is the per-rank finish time; the makespan is the slowest
rank. Pure Python, no torch: testable on its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Sequence, Union


@dataclass(frozen=True)
class Compute:
    us: float


@dataclass(frozen=True)
class Start:
    key: Hashable
    peers: tuple[int, ...]
    cost_us: float


@dataclass(frozen=True)
class Wait:
    key: Hashable


@dataclass(frozen=True)
class Sync:
    key: Hashable
    peers: tuple[int, ...]
    cost_us: float


Event = Union[Compute, Start, Wait, Sync]


@dataclass(frozen=True)
class Timeline:
    finish_us: tuple[float, ...]  # per rank: when its last event ends
    compute_us: tuple[float, ...]  # per rank: sum of its compute
    exposed_comm_us: tuple[float, ...]  # per rank: time stalled in waits
    # (rank, lane, name, start_us, end_us) of every compute stretch, stall and transfer, for a
    # trace.json of the run (spava_plan.trace.emulated_spans)
    spans: tuple[tuple[int, str, str, float, float], ...] = field(default=(), compare=False)

    @property
    def makespan_us(self) -> float:
        return max(self.finish_us, default=0.0)


def simulate(traces: Sequence[Sequence[Event]]) -> Timeline:
    W = len(traces)
    issue: dict[tuple[Hashable, int], float] = {}  # (key, rank) -> time the rank issued it
    prev: dict[tuple[Hashable, int], Hashable | None] = {}  # previous comm on the rank's stream
    info: dict[tuple[Hashable, int], tuple[tuple[int, ...], float]] = {}  # peers, cost
    done: dict[tuple[Hashable, int], float] = {}
    last: list[Hashable | None] = [None] * W
    pos, clock = [0] * W, [0.0] * W
    compute, exposed = [0.0] * W, [0.0] * W
    spans: list[tuple[int, str, str, float, float]] = []

    def finish(key: Hashable, rank: int) -> float | None:
        """When communication ``key`` completes on ``rank`` (None: a peer has not issued it yet)."""
        if (key, rank) in done:
            return done[(key, rank)]
        peers, cost = info[(key, rank)]
        begin = 0.0
        for p in set(peers) | {rank}:
            if (key, p) not in issue:
                return None
            before = prev[(key, p)]
            ready = 0.0 if before is None else finish(before, p)
            if ready is None:
                return None
            begin = max(begin, issue[(key, p)], ready)
        done[(key, rank)] = begin + cost
        spans.append((rank, "comm", _name(key), begin, begin + cost))
        return done[(key, rank)]

    def issue_on(rank: int, key: Hashable, peers: tuple[int, ...], cost: float) -> None:
        if (key, rank) in issue:
            raise ValueError(f"rank {rank} issued communication {key!r} twice")
        issue[(key, rank)], prev[(key, rank)], info[(key, rank)] = clock[rank], last[rank], (peers, cost)
        last[rank] = key

    while any(pos[r] < len(traces[r]) for r in range(W)):
        progressed = False
        for r in range(W):
            while pos[r] < len(traces[r]):
                ev = traces[r][pos[r]]
                if isinstance(ev, Compute):
                    spans.append((r, "compute", "compute", clock[r], clock[r] + ev.us))
                    clock[r] += ev.us
                    compute[r] += ev.us
                elif isinstance(ev, Start):
                    issue_on(r, ev.key, ev.peers, ev.cost_us)
                else:
                    if isinstance(ev, Sync) and (ev.key, r) not in issue:
                        issue_on(r, ev.key, ev.peers, ev.cost_us)
                    end = finish(ev.key, r)
                    if end is None:
                        break  # blocked on a peer: let the other ranks advance
                    exposed[r] += max(0.0, end - clock[r])
                    if end > clock[r]:
                        spans.append((r, "compute", f"wait {_name(ev.key)}", clock[r], end))
                    clock[r] = max(clock[r], end)
                pos[r] += 1
                progressed = True
        if not progressed:
            stuck = {r: traces[r][pos[r]] for r in range(W) if pos[r] < len(traces[r])}
            raise ValueError(f"the rank traces deadlock (ranks wait on communication a peer never issues): {stuck}")
    return Timeline(tuple(clock), tuple(compute), tuple(exposed), tuple(spans))


def _name(key: Hashable) -> str:
    return "/".join(str(k) for k in key) if isinstance(key, tuple) else str(key)
