"""Record and replay of one rank's communication, the two halves of an emulated timing run.

- ``RecordingComm`` (the functional pass): the plain hub communicator (runtime/comm/hub.py), plus
  a log of what every call received (``Entry``).
- ``ReplayComm`` (the timing replay of one rank alone): hands the logged results back instead of
  waiting for peers, checks that the rank issues the same calls, and marks each call on the
  device clock. ``events()`` turns the marks into the events of the one timeline model
  (spava_plan/critical_path.py): measured compute between calls, each call with its peers and
  its cost (``cost(kind, tag, nbytes)``: the plan's numbers, chosen by the world).
"""
from __future__ import annotations

import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from spava_plan.critical_path import Compute, Event, Start, Sync, Wait
from spava_plan.errors import DistributedError

from . import ALL_GATHER, ALL_TO_ALL, BARRIER, BROADCAST, OBJECT, P2P, Communicator, Handle, tensor_bytes
from .hub import HubComm, Pending, _sig, busiest_link_bytes, check_all_gather, check_all_to_all, row_bytes

SEND, RECV = "send", "recv"  # blocking P2P halves (their cost is the P2P formula's)


class Clock:
    """Marks on the device timeline: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def between_us(self, a: Any, b: Any) -> float:
        if self.cuda:
            return float(a.elapsed_time(b)) * 1e3
        return (b - a) * 1e6

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


@dataclass
class Entry:
    """One communication call as logged in the functional pass: its kind, tag and signature (the
    replay must repeat them) and what the rank received."""

    kind: str
    tag: str
    sig: Any
    data: Any = None


def _a2a_sig(out: torch.Tensor, inp: torch.Tensor, ins: list[int], outs: list[int]) -> tuple:
    return (_sig(inp), _sig(out), tuple(ins), tuple(outs))


class RecordingComm(Communicator):
    """The functional pass of one rank: every call goes to the hub; what it received is logged."""

    emulated = True

    def __init__(self, inner: HubComm):
        self.inner, self.rank, self.world_size = inner, inner.rank, inner.world_size
        self.log: list[Entry] = []

    def _entry(self, kind: str, tag: str, sig: Any) -> Entry:
        entry = Entry(kind, tag, sig)
        self.log.append(entry)
        return entry

    def all_gather_into_tensor(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False,
                               tag: str = "") -> Handle | None:
        handle = self.inner.all_gather_into_tensor(out, inp, async_op=True, tag=tag)
        entry = self._entry(ALL_GATHER, tag, _sig(inp))

        def land() -> None:
            handle.wait()  # type: ignore[union-attr]
            entry.data = out.detach().clone()

        if async_op:
            return Pending(land)
        land()
        return None

    def all_to_all_single(self, out: torch.Tensor, inp: torch.Tensor, out_splits: Sequence[int],
                          in_splits: Sequence[int], tag: str = "") -> None:
        splits = self.inner.all_to_all_splits(out, inp, out_splits, in_splits, tag)
        ins, outs = [int(n) for n in in_splits], [int(n) for n in out_splits]
        self._entry(ALL_TO_ALL, tag, _a2a_sig(out, inp, ins, outs)).data = (out.detach().clone(), splits)

    def broadcast(self, t: torch.Tensor, src: int, tag: str = "", async_op: bool = False) -> Handle | None:
        handle = self.inner.broadcast(t, src, tag, async_op=True)
        entry = self._entry(BROADCAST, tag, (_sig(t), src))

        def land() -> None:
            handle.wait()  # type: ignore[union-attr]
            entry.data = t.detach().clone()

        if async_op:
            return Pending(land)
        land()
        return None

    def all_gather_object(self, obj: Any) -> list[Any]:
        got = self.inner.all_gather_object(obj)
        self._entry(OBJECT, "", None).data = got
        return list(got)

    def barrier(self) -> None:
        self.inner.barrier()
        self._entry(BARRIER, "", None)

    def exchange(self, send: torch.Tensor, dst: int, recv: torch.Tensor, src: int, tag: str = "") -> Handle:
        handle = self.inner.exchange(send, dst, recv, src, tag)
        entry = self._entry(P2P, tag, (_sig(send), dst, _sig(recv), src))

        def land() -> None:
            handle.wait()
            entry.data = recv.detach().clone()
        return Pending(land)

    def _send(self, t: torch.Tensor, dst: int, tag: str) -> None:
        self.inner._send(t, dst, tag)
        self._entry(SEND, tag, (_sig(t), dst))

    def _recv(self, t: torch.Tensor, src: int, tag: str) -> None:
        self.inner._recv(t, src, tag)
        self._entry(RECV, tag, (_sig(t), src)).data = t.detach().clone()

    def report_failure(self, exc: BaseException) -> None:
        self.inner.report_failure(exc)


class ReplayComm(Communicator):
    """The timing replay of one rank alone over the log of its functional pass.

    Each call is marked on ``clock`` when it enters and when it returns (a wait: around copying
    the logged result in, which is not the rank's compute). Keys match a communication across
    ranks: a collective by its call index, an exchange (one ring step, in lock step on every
    rank) by its index, a blocking send/receive by its index between the two ranks."""

    emulated = True

    def __init__(self, log: list[Entry], rank: int, world_size: int, clock: Clock,
                 cost: Callable[[str, str, int], float]):
        self.log, self.rank, self.world_size = log, rank, world_size
        self.clock, self.cost = clock, cost
        self._cursor = self._n_coll = self._n_exchange = 0
        self._n_p2p: dict[tuple[int, int], int] = defaultdict(int)
        self.calls: list[tuple[str, Any, tuple[int, ...], float, Any, Any]] = []  # (type, key, peers, cost, enter, exit)
        self.begin = clock.mark()
        self.end: Any = None

    # -- the log --------------------------------------------------------------------------------
    def _next(self, kind: str, tag: str, sig: Any) -> Entry:
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

    def check_complete(self) -> None:
        """After the replay: the rank issued every call of its functional pass."""
        if self._cursor != len(self.log):
            raise DistributedError(f"rank {self.rank}: the timing replay issued fewer communication calls "
                                   f"than the functional pass", setting="runtime")

    # -- keys and marks -------------------------------------------------------------------------
    def _coll_key(self) -> tuple:
        self._n_coll += 1
        return ("c", self._n_coll - 1)

    def _p2p_key(self, peer: int, direction: str) -> tuple:
        """Matches the n-th send of a to b with the n-th receive of b from a."""
        pair = (self.rank, peer) if direction == SEND else (peer, self.rank)
        self._n_p2p[pair] += 1
        return ("p", pair, self._n_p2p[pair] - 1)

    def _everyone(self) -> tuple[int, ...]:
        return tuple(range(self.world_size))

    def _mark(self, typ: str, key: Any, peers: tuple[int, ...], cost: float, enter: Any) -> None:
        self.calls.append((typ, key, peers, cost, enter, self.clock.mark()))

    def _sync(self, key: Any, peers: tuple[int, ...], cost: float, enter: Any) -> None:
        self._mark("sync", key, peers, cost, enter)

    def _start(self, key: Any, peers: tuple[int, ...], cost: float, deliver: Callable[[], None]) -> Pending:
        """An asynchronous call: marked now, and its wait is marked around ``deliver``."""
        self._mark("start", key, peers, cost, self.clock.mark())

        def land() -> None:
            at = self.clock.mark()
            deliver()  # the logged result; excluded from the rank's compute
            self._mark("wait", key, (), 0.0, at)
        return Pending(land)

    # -- the calls ------------------------------------------------------------------------------
    def all_gather_into_tensor(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False,
                               tag: str = "") -> Handle | None:
        check_all_gather(self.rank, self.world_size, out, inp, tag)
        entry = self._next(ALL_GATHER, tag, _sig(inp))
        pending = self._start(self._coll_key(), self._everyone(), self.cost(ALL_GATHER, tag, tensor_bytes([inp])),
                              lambda: out.copy_(entry.data))
        if async_op:
            return pending
        pending.wait()
        return None

    def all_to_all_single(self, out: torch.Tensor, inp: torch.Tensor, out_splits: Sequence[int],
                          in_splits: Sequence[int], tag: str = "") -> None:
        ins, outs = check_all_to_all(self.rank, self.world_size, out, inp, out_splits, in_splits, tag)
        entry = self._next(ALL_TO_ALL, tag, _a2a_sig(out, inp, ins, outs))
        key, enter = self._coll_key(), self.clock.mark()
        received, splits = entry.data
        out.copy_(received)
        self._sync(key, self._everyone(), self.cost(ALL_TO_ALL, tag, busiest_link_bytes(splits, row_bytes(inp))),
                   enter)

    def broadcast(self, t: torch.Tensor, src: int, tag: str = "", async_op: bool = False) -> Handle | None:
        entry = self._next(BROADCAST, tag, (_sig(t), src))
        if async_op:
            return self._start(self._coll_key(), self._everyone(), self.cost(BROADCAST, tag, tensor_bytes([t])),
                               lambda: t.copy_(entry.data))
        key, enter = self._coll_key(), self.clock.mark()
        t.copy_(entry.data)
        self._sync(key, self._everyone(), self.cost(BROADCAST, tag, tensor_bytes([t])), enter)
        return None

    def all_gather_object(self, obj: Any) -> list[Any]:
        entry = self._next(OBJECT, "", None)
        key, enter = self._coll_key(), self.clock.mark()
        self._sync(key, self._everyone(), self.cost(OBJECT, "", 0), enter)
        return list(entry.data)

    def barrier(self) -> None:
        self._next(BARRIER, "", None)
        key, enter = self._coll_key(), self.clock.mark()
        self._sync(key, self._everyone(), self.cost(BARRIER, "", 0), enter)

    def exchange(self, send: torch.Tensor, dst: int, recv: torch.Tensor, src: int, tag: str = "") -> Handle:
        entry = self._next(P2P, tag, (_sig(send), dst, _sig(recv), src))
        # Ring steps run in lock step: the k-th exchange of every rank is the same step.
        key = ("x", self._n_exchange)
        self._n_exchange += 1
        return self._start(key, tuple(sorted({src, dst})), self.cost(P2P, tag, tensor_bytes([send])),
                           lambda: recv.copy_(entry.data))

    def _send(self, t: torch.Tensor, dst: int, tag: str) -> None:
        self._next(SEND, tag, (_sig(t), dst))
        key, enter = self._p2p_key(dst, SEND), self.clock.mark()
        self._sync(key, (dst,), self.cost(P2P, tag, tensor_bytes([t])), enter)

    def _recv(self, t: torch.Tensor, src: int, tag: str) -> None:
        entry = self._next(RECV, tag, (_sig(t), src))
        key, enter = self._p2p_key(src, RECV), self.clock.mark()
        t.copy_(entry.data)
        self._sync(key, (src,), self.cost(P2P, tag, tensor_bytes([t])), enter)

    # -- the result -----------------------------------------------------------------------------
    def events(self) -> list[Event]:
        """The replay as timeline events: Compute between calls, then each call (needs ``end``)."""
        out: list[Event] = []
        at = self.begin
        for typ, key, peers, cost, enter, leave in self.calls:
            out.append(Compute(self.clock.between_us(at, enter)))
            out.append(Start(key, peers, cost) if typ == "start" else Wait(key) if typ == "wait"
                       else Sync(key, peers, cost))
            at = leave
        out.append(Compute(self.clock.between_us(at, self.end)))
        return out


def median_trace(runs: Sequence[Sequence[Event]]) -> list[Event]:
    """Element-wise median of the compute stretches of structurally identical traces."""
    out: list[Event] = []
    for events in zip(*runs):
        first = events[0]
        out.append(Compute(statistics.median(e.us for e in events)) if isinstance(first, Compute) else first)
    return out
