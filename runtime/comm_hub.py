"""The rendezvous of an emulated world's rank threads: collectives and P2P mailboxes through shared
memory, with a failed or missing peer turned into one DistributedError on every waiting rank.
Knows nothing of timing or replay (runtime/comm_emulated.py drives it)."""
from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from typing import Any, Callable

import torch

from spava_plan.errors import DistributedError

from .comm import ALL_GATHER

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
