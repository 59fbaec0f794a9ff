"""In-process emulation of a W-rank world on one device (results are labelled emulated).

Two passes (DESIGN.md, "Multi-rank speed on one GPU"):
1. Functional: ``world.run(fn)`` runs ``fn(rank)`` for every rank in its own thread; the ranks'
   communicators exchange real tensors through a shared hub, so the outputs are those of a real
   W-process run (bit-identical: collectives only copy bytes). Every rank logs what it received.
2. Timing: ``world.time(fn)`` runs a functional pass, then replays each rank ALONE: its
   communicator hands back the logged buffers instead of waiting for peers, and marks every
   communication call (CUDA events on GPU, perf_counter on CPU), so each rank's compute is timed
   without interference. The one timeline model (spava_plan/critical_path.py, the planner's too)
   then adds the communication the schedule cannot hide, charging each tagged collective the
   plan's predicted time (and untagged ones the plan's ``links``: spava_plan/links.py).

The parts: runtime/comm/hub.py (the threads' rendezvous and the plain communicator over it),
runtime/comm/record.py (the functional pass's recording communicator, the replay's one); this
file holds the world that runs both passes, and ``EmulatedComm``, the communicator a rank's code
holds: it forwards to the communicator of the current pass, which the world chooses once per pass.

A rank that raises aborts the others' pending communication at once with a DistributedError
naming it; a rank that never shows up makes the others time out with the same kind of error.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from spava_plan import critical_path
from spava_plan.critical_path import Event
from spava_plan.errors import DistributedError, SpavaError
from spava_plan.links import Links

from . import (ALL_GATHER, ALL_REDUCE, ALL_TO_ALL, BARRIER, BROADCAST, OBJECT, P2P, REDUCE_TAG, Communicator, Handle,
                   plan_comm_costs)
from .hub import HubComm, _Hub
from .record import Clock, RecordingComm, ReplayComm, median_trace

__all__ = ["Clock", "EmulatedComm", "EmulatedTiming", "EmulatedWorld", "Outcome"]


class EmulatedComm(Communicator):
    """One rank of an EmulatedWorld, as the rank's code holds it (e.g. inside a RankAttention made
    once): every call goes to ``active``, the pass's communicator (a RecordingComm over the hub
    in a functional pass, a ReplayComm in a timing replay), set by the world."""

    emulated = True

    def __init__(self, world: "EmulatedWorld", rank: int):
        self.rank, self.world_size = rank, world.world_size
        self.label = f"emulated {world.world_size}-rank"
        self.active: Communicator = RecordingComm(HubComm(world._hub, rank))

    def all_gather_into_tensor(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False,
                               tag: str = "") -> Handle | None:
        return self.active.all_gather_into_tensor(out, inp, async_op=async_op, tag=tag)

    def all_to_all_single(self, out: torch.Tensor, inp: torch.Tensor, out_splits: Sequence[int],
                          in_splits: Sequence[int], tag: str = "") -> None:
        self.active.all_to_all_single(out, inp, out_splits, in_splits, tag=tag)

    def broadcast(self, t: torch.Tensor, src: int, tag: str = "", async_op: bool = False) -> Handle | None:
        return self.active.broadcast(t, src, tag=tag, async_op=async_op)

    def exchange(self, send: torch.Tensor, dst: int, recv: torch.Tensor, src: int, tag: str = "") -> Handle:
        return self.active.exchange(send, dst, recv, src, tag=tag)

    def all_gather_object(self, obj: Any) -> list[Any]:
        return self.active.all_gather_object(obj)

    def barrier(self) -> None:
        self.active.barrier()

    def _send(self, t: torch.Tensor, dst: int, tag: str) -> None:
        self.active._send(t, dst, tag)

    def _recv(self, t: torch.Tensor, src: int, tag: str) -> None:
        self.active._recv(t, src, tag)

    def report_failure(self, exc: BaseException) -> None:
        self.active.report_failure(exc)


@dataclass(frozen=True)
class Outcome:
    """What one emulated rank returned or raised."""

    rank: int
    value: Any = None
    error: BaseException | None = None


@dataclass(frozen=True)
class EmulatedTiming:
    """Per-rank compute timed alone + unhidden communication charged from the plan's topology."""

    label: str  # "emulated W-rank on <device>": never a measured multi-GPU number
    device: str
    rank_compute_us: tuple[float, ...]  # each rank replayed alone (median of each compute stretch)
    rank_finish_us: tuple[float, ...]  # simulated finish with communication it cannot hide
    exposed_comm_us: tuple[float, ...]
    makespan_us: float  # slowest rank: the critical path
    repeats: int
    results: list = field(default_factory=list, compare=False)  # the functional pass's return values
    spans: tuple = field(default=(), compare=False)  # the timeline model's spans (critical_path.spans)


class EmulatedWorld:
    """W ranks in one process. ``costs`` maps a tag (the plan's collective names) to predicted
    microseconds; untagged communication is charged by the plan's ``links`` (spava_plan/links.py)."""

    def __init__(self, world_size: int, *, timeout_s: float = 60.0, costs: Mapping[str, float] | None = None,
                 links: Links | None = None):
        if world_size < 1:
            raise SpavaError(f"an emulated world needs at least one rank, got {world_size}", setting="gpus")
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.costs = dict(costs or {})
        self.links = links
        self._hub = _Hub(world_size, timeout_s)
        self.comms = [EmulatedComm(self, r) for r in range(world_size)]

    @classmethod
    def for_plan(cls, plan: Any, *, timeout_s: float = 60.0) -> "EmulatedWorld":
        return cls(plan.world_size, timeout_s=timeout_s, costs=plan_comm_costs(plan), links=plan.links)

    def comm(self, rank: int) -> EmulatedComm:
        return self.comms[rank]

    def cost_us(self, kind: str, tag: str, nbytes: int) -> float:
        if tag.startswith(REDUCE_TAG) and self.links is not None:  # all-reduces: by their bytes (per chunk)
            return self.links.transfer_us(ALL_REDUCE, nbytes, self.world_size)
        if tag in self.costs:
            return self.costs[tag]
        if self.links is None:
            return 0.0
        return self.links.transfer_us(kind if kind in (ALL_GATHER, ALL_TO_ALL, BROADCAST, P2P, OBJECT, BARRIER) else P2P,
                                      nbytes, self.world_size)

    # -- functional pass ---------------------------------------------------------------------------
    def run_outcomes(self, fn: Callable[[int], Any]) -> list[Outcome]:
        """Run fn(rank) on every rank in its own thread; never raises for a rank's failure."""
        self._hub.reset()
        for c in self.comms:
            c.active = RecordingComm(HubComm(self._hub, c.rank))
        outcomes: list[Outcome | None] = [None] * self.world_size

        def body(rank: int) -> None:
            try:
                outcomes[rank] = Outcome(rank, value=fn(rank))
            except BaseException as exc:  # noqa: BLE001 - reported to the peers, re-raised by run()
                self.comms[rank].report_failure(exc)
                outcomes[rank] = Outcome(rank, error=exc)

        threads = [threading.Thread(target=body, args=(r,), name=f"emulated-rank-{r}", daemon=True)
                   for r in range(self.world_size)]
        # One intra-op thread per rank thread: W thread pools on a few cores oversubscribe them
        # (spinning OpenMP workers), and one thread matches what each process of a real run uses.
        intra = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            torch.set_num_threads(intra)
        return [o if o is not None else Outcome(r, error=RuntimeError("rank thread vanished"))
                for r, o in enumerate(outcomes)]

    def run(self, fn: Callable[[int], Any]) -> list[Any]:
        """fn(rank) on every rank; returns the per-rank results or raises the failure's root cause
        (the first rank that failed on its own, not one aborted because of it)."""
        outcomes = self.run_outcomes(fn)
        failed = [o for o in outcomes if o.error is not None]
        if failed:
            root = next((o for o in failed if not isinstance(o.error, DistributedError)), failed[0])
            raise root.error
        return [o.value for o in outcomes]

    # -- timing pass -------------------------------------------------------------------------------
    def time(self, fn: Callable[[int], Any], *, warmup: int = 1, repeats: int = 3,
             device: torch.device | str | None = None, observer: Any = None,
             functional_passes: int = 2, clock: Any = None) -> EmulatedTiming:
        """Functional pass, then replay every rank alone ``warmup + repeats`` times, timing each of
        its compute stretches; medians go through the critical-path model.

        ``fn`` must issue the same communication every call. A first, untimed functional call
        absorbs one-time work (RankAttention's first-call agreement between the ranks);
        ``functional_passes=1`` skips it where ``fn`` does that work on every call (a fresh
        RankAttention per call) and the replays' per-stretch medians absorb a slow first replay.
        ``observer`` (optional) gets ``before(rank, i)`` and ``after(rank, i, events)`` around replay
        i of each rank (i < warmup: a warm-up; events: that replay's trace), outside the timed
        stretch with the device synchronised: e.g. to read each rank's peak memory, or to simulate
        every repeat on its own for the spread. ``clock`` replaces the device clock (a Clock-like
        object with mark, between_us and sync; tests use a virtual one)."""
        for _ in range(max(0, functional_passes - 1)):
            self.run(fn)
        results = self.run(fn)
        logs = [c.active.log for c in self.comms]  # type: ignore[attr-defined]
        dev = torch.device(device) if device is not None else _result_device(results)
        clock = clock or Clock(dev)
        traces: list[list[Event]] = []
        try:
            for rank in range(self.world_size):
                runs: list[list[Event]] = []
                for i in range(warmup + repeats):
                    clock.sync()
                    if observer is not None:
                        observer.before(rank, i)
                    replay = ReplayComm(logs[rank], rank, self.world_size, clock, self.cost_us)
                    self.comms[rank].active = replay
                    fn(rank)
                    replay.end = clock.mark()
                    clock.sync()
                    events = replay.events()
                    if observer is not None:
                        observer.after(rank, i, events)
                    if i >= warmup:
                        runs.append(events)
                    replay.check_complete()
                traces.append(median_trace(runs))
        finally:  # back to functional passes over the hub
            for c in self.comms:
                c.active = RecordingComm(HubComm(self._hub, c.rank))
        line = critical_path.simulate(traces, record=True)
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
        return EmulatedTiming(label=f"emulated {self.world_size}-rank on {name}", device=name,
                              rank_compute_us=line.compute_us,
                              rank_finish_us=line.finish_us, exposed_comm_us=line.exposed_comm_us,
                              makespan_us=line.makespan_us, repeats=repeats, results=results,
                              spans=tuple(critical_path.spans(traces, line)))


def _result_device(results: Sequence[Any]) -> torch.device:
    def find(x: Any) -> torch.device | None:
        if isinstance(x, torch.Tensor):
            return x.device
        if isinstance(x, (list, tuple)):
            for y in x:
                d = find(y)
                if d is not None:
                    return d
        if isinstance(x, dict):
            return find(list(x.values()))
        return None

    for r in results:
        d = find(r)
        if d is not None:
            return d
    return torch.device("cpu")
