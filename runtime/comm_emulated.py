"""In-process emulation of a W-rank world on one device (results are labelled emulated).

Two passes (DESIGN.md, "Multi-rank speed on one GPU"):
1. Functional: ``world.run(fn)`` runs ``fn(rank)`` for every rank in its own thread; the ranks'
   communicators exchange real tensors through a shared hub, so the outputs are those of a real
   W-process run (bit-identical: collectives only copy bytes). Every rank logs what it received.
2. Timing: ``world.time(fn)`` runs a functional pass, then replays each rank ALONE: its
   communicator hands back the logged buffers instead of waiting for peers, and marks every
   communication call (CUDA events on GPU, perf_counter on CPU), so each rank's compute is timed
   without interference. runtime/emulated_timeline.py then adds the communication the schedule
   cannot hide, charging each tagged collective the plan's predicted time (and untagged ones
   the plan's ``links``: spava_plan/links.py, the planner's own model).

The parts: runtime/comm_hub.py (the threads' rendezvous), runtime/comm_record.py (the functional
pass's log, the replay's marks), runtime/emulated_timeline.py (the timing model); this file is the
Communicator over them and the world that runs both passes.

A rank that raises aborts the others' pending communication at once with a DistributedError
naming it; a rank that never shows up makes the others time out with the same kind of error.
"""
from __future__ import annotations

import math
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from spava_plan import critical_path
from spava_plan.critical_path import Event
from spava_plan.errors import DistributedError, SpavaError
from spava_plan.links import Links

from .comm import ALL_GATHER, ALL_TO_ALL, BARRIER, BROADCAST, OBJECT, P2P, Communicator, Handle, tensor_bytes
from .comm_hub import _Hub, _sig
from .comm_record import Clock, _Entry, _median_trace, _Pending, _Trace

__all__ = ["Clock", "EmulatedComm", "EmulatedTiming", "EmulatedWorld", "Outcome"]

class EmulatedComm(Communicator):
    """One rank of an EmulatedWorld. Functional mode talks to the hub; replay mode reads the log."""

    emulated = True

    def __init__(self, world: "EmulatedWorld", rank: int):
        self.world, self.rank, self.world_size = world, rank, world.world_size
        self.label = f"emulated {world.world_size}-rank"
        self._hub = world._hub
        self.log: list[_Entry] = []
        self._cursor = 0
        self._trace: _Trace | None = None  # set in replay mode
        self._n_coll = self._n_exchange = 0
        self._n_p2p: dict[tuple[int, int], int] = defaultdict(int)  # blocking sends/recvs per (src, dst)

    # -- bookkeeping --------------------------------------------------------------------------
    def _reset(self, replay: _Trace | None) -> None:
        if replay is None:
            self.log = []
        self._cursor, self._trace, self._n_coll, self._n_exchange = 0, replay, 0, 0
        self._n_p2p.clear()

    def _next_entry(self, kind: str, tag: str, sig: Any) -> _Entry:
        if self._trace is None:
            entry = _Entry(kind, tag, sig)
            self.log.append(entry)
            return entry
        if self._cursor >= len(self.log):
            raise DistributedError(f"rank {self.rank}: the timing replay issued more communication than the "
                                   f"functional pass ({kind} {tag!r}); the timed function must repeat the "
                                   f"same calls", setting="runtime")
        entry = self.log[self._cursor]
        self._cursor += 1
        if (entry.kind, entry.tag, entry.sig) != (kind, tag, sig):
            raise DistributedError(f"rank {self.rank}: the timing replay diverged from the functional pass: "
                                   f"call #{self._cursor - 1} was {entry.kind} {entry.tag!r} {entry.sig} and is "
                                   f"now {kind} {tag!r} {sig}", setting="runtime")
        return entry

    def _coll_key(self) -> tuple:
        k = self._n_coll
        self._n_coll += 1
        return ("c", k)

    def _p2p_key(self, peer: int, direction: str) -> tuple:
        """Matches the n-th send of a to b with the n-th receive of b from a."""
        pair = (self.rank, peer) if direction == "send" else (peer, self.rank)
        k = self._n_p2p[pair]
        self._n_p2p[pair] += 1
        return ("p", pair, k)

    def _cost(self, kind: str, tag: str, nbytes: int) -> float:
        return self.world.cost_us(kind, tag, nbytes)

    def _record(self, typ: str, key: Any, peers: tuple[int, ...], cost: float, enter: Any) -> None:
        assert self._trace is not None
        self._trace.calls.append((typ, key, peers, cost, enter, self._trace.clock.mark()))

    def _everyone(self) -> tuple[int, ...]:
        return tuple(range(self.world_size))

    # -- collectives ---------------------------------------------------------------------------
    def all_gather_into_tensor(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False,
                               tag: str = "") -> Handle | None:
        n = inp.shape[0]
        if out.shape[0] != self.world_size * n or tuple(out.shape[1:]) != tuple(inp.shape[1:]):
            raise DistributedError(f"rank {self.rank}: all_gather {tag!r} output {tuple(out.shape)} does not hold "
                                   f"{self.world_size} x input {tuple(inp.shape)}", setting="runtime")
        entry = self._next_entry(ALL_GATHER, tag, _sig(inp))
        key = self._coll_key()
        trace = self._trace
        if trace is not None:
            enter = trace.clock.mark()
            self._record("start", key, self._everyone(), self._cost(ALL_GATHER, tag, tensor_bytes([inp])), enter)

            def land() -> None:
                at = trace.clock.mark()
                out.copy_(entry.data)  # the logged result; excluded from the rank's compute
                self._record("wait", key, (), 0.0, at)
        else:
            self._hub.deposit(key[1], self.rank, ALL_GATHER, tag, _sig(inp), inp.detach().clone())

            def land() -> None:
                for r, part in enumerate(self._hub.gather(key[1], self.rank)):
                    out.narrow(0, r * n, n).copy_(part)
                entry.data = out.detach().clone()

        if async_op:
            return _Pending(land)
        land()
        return None

    def all_to_all_single(self, out: torch.Tensor, inp: torch.Tensor, out_splits: Sequence[int],
                          in_splits: Sequence[int], tag: str = "") -> None:
        ins, outs = [int(n) for n in in_splits], [int(n) for n in out_splits]
        if (len(ins) != self.world_size or len(outs) != self.world_size or sum(ins) != inp.shape[0]
                or sum(outs) != out.shape[0] or tuple(out.shape[1:]) != tuple(inp.shape[1:])):
            raise DistributedError(f"rank {self.rank}: all_to_all {tag!r} splits (in {ins}, out {outs}) do not fit "
                                   f"input {tuple(inp.shape)} and output {tuple(out.shape)} over {self.world_size} "
                                   f"ranks", setting="runtime")
        sig = (_sig(inp), _sig(out), tuple(ins), tuple(outs))
        entry = self._next_entry(ALL_TO_ALL, tag, sig)
        key = self._coll_key()
        if self._trace is not None:
            enter = self._trace.clock.mark()
            received, busiest = entry.data
            out.copy_(received)
            self._record("sync", key, self._everyone(), self._cost(ALL_TO_ALL, tag, busiest), enter)
            return
        items = self._hub.collective(key[1], self.rank, ALL_TO_ALL, tag, sig, (ins, inp.detach().clone()))
        wrong = [f"rank {s} sends {s_ins[self.rank]} rows, rank {self.rank} expects {outs[s]}"
                 for s, (s_ins, _) in enumerate(items) if s_ins[self.rank] != outs[s]]
        if wrong:
            raise DistributedError(f"rank {self.rank}: all_to_all {tag!r} splits disagree: {'; '.join(wrong)}",
                                   setting="runtime")
        at = 0
        for s, (s_ins, s_inp) in enumerate(items):
            out.narrow(0, at, outs[s]).copy_(s_inp.narrow(0, sum(s_ins[:self.rank]), outs[s]))
            at += outs[s]
        # Charged on the busiest link: the most off-rank rows one rank sends or receives.
        row_bytes = math.prod(inp.shape[1:]) * inp.element_size()
        sent = [sum(n for d, n in enumerate(s_ins) if d != s) for s, (s_ins, _) in enumerate(items)]
        got = [sum(items[s][0][d] for s in range(self.world_size) if s != d) for d in range(self.world_size)]
        entry.data = (out.detach().clone(), max(sent + got) * row_bytes)

    def broadcast(self, t: torch.Tensor, src: int, tag: str = "") -> None:
        entry = self._next_entry(BROADCAST, tag, (_sig(t), src))
        key = self._coll_key()
        if self._trace is not None:
            enter = self._trace.clock.mark()
            t.copy_(entry.data)
            self._record("sync", key, self._everyone(), self._cost(BROADCAST, tag, tensor_bytes([t])), enter)
            return
        mine = t.detach().clone() if self.rank == src else None
        items = self._hub.collective(key[1], self.rank, BROADCAST, tag, (_sig(t), src), mine, root=src)
        t.copy_(items[src])
        entry.data = t.detach().clone()

    def all_gather_object(self, obj: Any) -> list[Any]:
        entry = self._next_entry(OBJECT, "", None)
        key = self._coll_key()
        if self._trace is not None:
            enter = self._trace.clock.mark()
            self._record("sync", key, self._everyone(), self._cost(OBJECT, "", 0), enter)
            return list(entry.data)
        entry.data = self._hub.collective(key[1], self.rank, OBJECT, "", None, obj)
        return list(entry.data)

    def barrier(self) -> None:
        entry = self._next_entry(BARRIER, "", None)
        key = self._coll_key()
        if self._trace is not None:
            enter = self._trace.clock.mark()
            self._record("sync", key, self._everyone(), self._cost(BARRIER, "", 0), enter)
            return
        self._hub.collective(key[1], self.rank, BARRIER, "", None, None)
        entry.data = None

    # -- point to point ------------------------------------------------------------------------
    def exchange(self, send: torch.Tensor, dst: int, recv: torch.Tensor, src: int, tag: str = "") -> Handle:
        entry = self._next_entry(P2P, tag, (_sig(send), dst, _sig(recv), src))
        # Ring steps run in lock step: the k-th exchange of every rank is the same step.
        key = ("x", self._n_exchange)
        self._n_exchange += 1
        trace = self._trace
        if trace is not None:
            enter = trace.clock.mark()
            self._record("start", key, tuple(sorted({src, dst})), self._cost(P2P, tag, tensor_bytes([send])), enter)

            def land() -> None:
                at = trace.clock.mark()
                recv.copy_(entry.data)
                self._record("wait", key, (), 0.0, at)
            return _Pending(land)
        self._hub.post(self.rank, dst, send.detach().clone())

        def land() -> None:
            recv.copy_(self._hub.take(src, self.rank, f"exchange {tag!r} (receive from rank {src})"))
            entry.data = recv.detach().clone()
        return _Pending(land)

    def _send(self, t: torch.Tensor, dst: int, tag: str) -> None:
        self._next_entry("send", tag, (_sig(t), dst))
        key = self._p2p_key(dst, "send")
        if self._trace is not None:
            enter = self._trace.clock.mark()
            self._record("sync", key, (dst,), self._cost(P2P, tag, tensor_bytes([t])), enter)
            return
        self._hub.post(self.rank, dst, t.detach().clone())

    def _recv(self, t: torch.Tensor, src: int, tag: str) -> None:
        entry = self._next_entry("recv", tag, (_sig(t), src))
        key = self._p2p_key(src, "recv")
        if self._trace is not None:
            enter = self._trace.clock.mark()
            t.copy_(entry.data)
            self._record("sync", key, (src,), self._cost(P2P, tag, tensor_bytes([t])), enter)
            return
        t.copy_(self._hub.take(src, self.rank, f"recv {tag!r} from rank {src}"))
        entry.data = t.detach().clone()

    def report_failure(self, exc: BaseException) -> None:
        if not isinstance(exc, DistributedError):
            self._hub.fail(self.rank, exc)


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
        from .comm import plan_comm_costs

        return cls(plan.world_size, timeout_s=timeout_s, costs=plan_comm_costs(plan), links=plan.links)

    def comm(self, rank: int) -> EmulatedComm:
        return self.comms[rank]

    def cost_us(self, kind: str, tag: str, nbytes: int) -> float:
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
            c._reset(None)
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
             functional_passes: int = 2) -> EmulatedTiming:
        """Functional pass, then replay every rank alone ``warmup + repeats`` times, timing each of
        its compute stretches; medians go through the critical-path model.

        ``fn`` must issue the same communication every call. A first, untimed functional call
        absorbs one-time work (RankAttention's first-call agreement between the ranks);
        ``functional_passes=1`` skips it where ``fn`` does that work on every call (a fresh
        RankAttention per call) and the replays' per-stretch medians absorb a slow first replay.
        ``observer`` (optional) gets ``before(rank, i)`` and ``after(rank, i, events)`` around replay
        i of each rank (i < warmup: a warm-up; events: that replay's trace), outside the timed
        stretch with the device synchronised: e.g. to read each rank's peak memory, or to simulate
        every repeat on its own for the spread."""
        for _ in range(max(0, functional_passes - 1)):
            self.run(fn)
        results = self.run(fn)
        dev = torch.device(device) if device is not None else _result_device(results)
        clock = Clock(dev)
        traces: list[list[Event]] = []
        for rank in range(self.world_size):
            runs: list[list[Event]] = []
            for i in range(warmup + repeats):
                clock.sync()
                if observer is not None:
                    observer.before(rank, i)
                trace = _Trace(clock)
                self.comms[rank]._reset(trace)
                fn(rank)
                trace.end = clock.mark()
                clock.sync()
                events = trace.events()
                if observer is not None:
                    observer.after(rank, i, events)
                if i >= warmup:
                    runs.append(events)
                if self.comms[rank]._cursor != len(self.comms[rank].log):
                    raise DistributedError(f"rank {rank}: the timing replay issued fewer communication calls "
                                           f"than the functional pass", setting="runtime")
            traces.append(_median_trace(runs))
        for c in self.comms:
            c._trace = None
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
