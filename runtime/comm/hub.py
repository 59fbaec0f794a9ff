"""The rendezvous of an emulated world's rank threads: collectives and P2P mailboxes through shared
memory, with a failed or missing peer turned into one DistributedError on every waiting rank, and
``HubComm``, one rank's plain communicator over it. Knows nothing of timing or replay
(runtime/comm/record.py wraps HubComm for that; runtime/comm/emulated.py drives both)."""
from __future__ import annotations

import math
import threading
import time
from collections import defaultdict, deque
from typing import Any, Callable, Sequence

import torch

from spava_plan.errors import DistributedError

from . import ALL_GATHER, ALL_TO_ALL, BARRIER, BROADCAST, OBJECT, Communicator, Handle

_POLL_S = 0.05  # how often a blocked rank looks for a failed peer


def _sig(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), str(t.dtype))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class _Hub:
    """State shared by the ranks of one world: pending collectives, P2P mailboxes, failures."""

    def __init__(self, world_size: int, timeout_s: float):
        self.W = world_size
        self.timeout_s = timeout_s
        self.cond = threading.Condition()
        self.slots: dict[int, dict] = {}
        self.mail: dict[tuple[int, int], deque] = defaultdict(deque)
        self.failed: tuple[int, str] | None = None

    def reset(self) -> None:
        with self.cond:
            self.slots.clear()
            self.mail.clear()
            self.failed = None

    def fail(self, rank: int, exc: BaseException) -> None:
        with self.cond:
            if self.failed is None:
                self.failed = (rank, _describe(exc))
            self.cond.notify_all()

    def _block(self, rank: int, what: str, ready: Callable[[], bool], missing: Callable[[], list[int]]) -> None:
        """Wait (holding cond) until ready(); abort on a peer's failure or the timeout."""
        deadline = time.monotonic() + self.timeout_s
        while not ready():
            if self.failed is not None and self.failed[0] != rank:
                bad, text = self.failed
                raise DistributedError(f"rank {rank}: {what} aborted because rank {bad} failed: {text}",
                                       setting="runtime")
            left = deadline - time.monotonic()
            if left <= 0:
                raise DistributedError(f"rank {rank}: {what} timed out after {self.timeout_s:g} s waiting for "
                                       f"rank(s) {missing()}", setting="runtime.timeout")
            self.cond.wait(min(left, _POLL_S))

    def deposit(self, index: int, rank: int, kind: str, tag: str, sig: Any, item: Any) -> None:
        """Rank's part of collective #index (a real collective starts when it is issued)."""
        with self.cond:
            slot = self.slots.setdefault(index, {"kind": kind, "tag": tag, "sig": {}, "items": {}, "left": self.W})
            if slot["kind"] != kind:
                first = min(slot["sig"])
                raise DistributedError(
                    f"rank {rank}: ranks disagree on collective #{index}: rank {first} issued {slot['kind']} "
                    f"{slot['tag']!r} but rank {rank} issued {kind} {tag!r}", setting="runtime")
            slot["sig"][rank], slot["items"][rank] = sig, item
            self.cond.notify_all()

    def gather(self, index: int, rank: int, root: int | None = None) -> list[Any]:
        """Every rank's item of collective #index once present (``root``: only that rank's)."""
        with self.cond:
            slot = self.slots[index]
            what = f"{slot['kind']} {slot['tag']!r} (collective #{index})"
            need = [root] if root is not None else list(range(self.W))
            self._block(rank, what, lambda: all(r in slot["items"] for r in need),
                        lambda: [r for r in need if r not in slot["items"]])
            if slot["kind"] == ALL_GATHER and len(set(slot["sig"].values())) > 1:
                sizes = ", ".join(f"rank {r} {s}" for r, s in sorted(slot["sig"].items()))
                raise DistributedError(f"rank {rank}: {what} needs equal sizes on every rank: {sizes}",
                                       setting="runtime")
            items = [slot["items"].get(r) for r in range(self.W)]
            slot["left"] -= 1
            if slot["left"] == 0:
                del self.slots[index]
            return items

    def collective(self, index: int, rank: int, kind: str, tag: str, sig: Any, item: Any,
                   root: int | None = None) -> list[Any]:
        self.deposit(index, rank, kind, tag, sig, item)
        return self.gather(index, rank, root)

    def post(self, src: int, dst: int, item: torch.Tensor) -> None:
        with self.cond:
            self.mail[(src, dst)].append(item)
            self.cond.notify_all()

    def take(self, src: int, dst: int, what: str) -> torch.Tensor:
        with self.cond:
            box = self.mail[(src, dst)]
            self._block(dst, what, lambda: bool(box), lambda: [src])
            return box.popleft()


class Pending:
    """Handle of an emulated asynchronous operation: ``finish`` runs once, at the first wait."""

    def __init__(self, finish: Callable[[], None]):
        self._finish: Callable[[], None] | None = finish

    def wait(self) -> None:
        if self._finish is not None:
            finish, self._finish = self._finish, None
            finish()


def check_all_gather(rank: int, world: int, out: torch.Tensor, inp: torch.Tensor, tag: str) -> None:
    if out.shape[0] != world * inp.shape[0] or tuple(out.shape[1:]) != tuple(inp.shape[1:]):
        raise DistributedError(f"rank {rank}: all_gather {tag!r} output {tuple(out.shape)} does not hold "
                               f"{world} x input {tuple(inp.shape)}", setting="runtime")


def check_all_to_all(rank: int, world: int, out: torch.Tensor, inp: torch.Tensor, out_splits: Sequence[int],
                     in_splits: Sequence[int], tag: str) -> tuple[list[int], list[int]]:
    """The splits as int lists, once they fit the tensors and the world."""
    ins, outs = [int(n) for n in in_splits], [int(n) for n in out_splits]
    if (len(ins) != world or len(outs) != world or sum(ins) != inp.shape[0]
            or sum(outs) != out.shape[0] or tuple(out.shape[1:]) != tuple(inp.shape[1:])):
        raise DistributedError(f"rank {rank}: all_to_all {tag!r} splits (in {ins}, out {outs}) do not fit "
                               f"input {tuple(inp.shape)} and output {tuple(out.shape)} over {world} "
                               f"ranks", setting="runtime")
    return ins, outs


def busiest_link_bytes(splits: Sequence[Sequence[int]], row_bytes: int) -> int:
    """An all-to-all is charged on its busiest link: the most off-rank rows one rank sends or
    receives (``splits[s][d]``: rows rank s sends rank d)."""
    W = len(splits)
    sent = [sum(n for d, n in enumerate(s_ins) if d != s) for s, s_ins in enumerate(splits)]
    got = [sum(splits[s][d] for s in range(W) if s != d) for d in range(W)]
    return max(sent + got) * row_bytes


def row_bytes(t: torch.Tensor) -> int:
    return math.prod(t.shape[1:]) * t.element_size()


class HubComm(Communicator):
    """One rank's communicator over the hub: real tensors between the rank threads, collectives
    matched by their call index (every rank issues them in the same order), P2P by mailbox."""

    emulated = True

    def __init__(self, hub: _Hub, rank: int):
        self.hub, self.rank, self.world_size = hub, rank, hub.W
        self._n_coll = 0

    def _index(self) -> int:
        k = self._n_coll
        self._n_coll += 1
        return k

    def all_gather_into_tensor(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False,
                               tag: str = "") -> Handle | None:
        check_all_gather(self.rank, self.world_size, out, inp, tag)
        index, n = self._index(), inp.shape[0]
        self.hub.deposit(index, self.rank, ALL_GATHER, tag, _sig(inp), inp.detach().clone())

        def land() -> None:
            for r, part in enumerate(self.hub.gather(index, self.rank)):
                out.narrow(0, r * n, n).copy_(part)

        if async_op:
            return Pending(land)
        land()
        return None

    def all_to_all_single(self, out: torch.Tensor, inp: torch.Tensor, out_splits: Sequence[int],
                          in_splits: Sequence[int], tag: str = "") -> None:
        self.all_to_all_splits(out, inp, out_splits, in_splits, tag)

    def all_to_all_splits(self, out: torch.Tensor, inp: torch.Tensor, out_splits: Sequence[int],
                          in_splits: Sequence[int], tag: str = "") -> list[list[int]]:
        """``all_to_all_single``, returning every rank's in_splits (splits[s][d]: rows s sent d)."""
        ins, outs = check_all_to_all(self.rank, self.world_size, out, inp, out_splits, in_splits, tag)
        sig = (_sig(inp), _sig(out), tuple(ins), tuple(outs))
        items = self.hub.collective(self._index(), self.rank, ALL_TO_ALL, tag, sig, (ins, inp.detach().clone()))
        wrong = [f"rank {s} sends {s_ins[self.rank]} rows, rank {self.rank} expects {outs[s]}"
                 for s, (s_ins, _) in enumerate(items) if s_ins[self.rank] != outs[s]]
        if wrong:
            raise DistributedError(f"rank {self.rank}: all_to_all {tag!r} splits disagree: {'; '.join(wrong)}",
                                   setting="runtime")
        at = 0
        for s, (s_ins, s_inp) in enumerate(items):
            out.narrow(0, at, outs[s]).copy_(s_inp.narrow(0, sum(s_ins[:self.rank]), outs[s]))
            at += outs[s]
        return [list(s_ins) for s_ins, _ in items]

    def broadcast(self, t: torch.Tensor, src: int, tag: str = "", async_op: bool = False) -> Handle | None:
        index = self._index()
        mine = t.detach().clone() if self.rank == src else None  # issued now, as a real collective is
        self.hub.deposit(index, self.rank, BROADCAST, tag, (_sig(t), src), mine)

        def land() -> None:
            t.copy_(self.hub.gather(index, self.rank, root=src)[src])

        if async_op:
            return Pending(land)
        land()
        return None

    def all_gather_object(self, obj: Any) -> list[Any]:
        return list(self.hub.collective(self._index(), self.rank, OBJECT, "", None, obj))

    def barrier(self) -> None:
        self.hub.collective(self._index(), self.rank, BARRIER, "", None, None)

    def exchange(self, send: torch.Tensor, dst: int, recv: torch.Tensor, src: int, tag: str = "") -> Handle:
        self.hub.post(self.rank, dst, send.detach().clone())

        def land() -> None:
            recv.copy_(self.hub.take(src, self.rank, f"exchange {tag!r} (receive from rank {src})"))
        return Pending(land)

    def _send(self, t: torch.Tensor, dst: int, tag: str) -> None:
        self.hub.post(self.rank, dst, t.detach().clone())

    def _recv(self, t: torch.Tensor, src: int, tag: str) -> None:
        t.copy_(self.hub.take(src, self.rank, f"recv {tag!r} from rank {src}"))

    def report_failure(self, exc: BaseException) -> None:
        if not isinstance(exc, DistributedError):
            self.hub.fail(self.rank, exc)
