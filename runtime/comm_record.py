"""Record and replay of one rank's communication: the functional pass logs what each call received
(``_Entry``); the timing replay hands it back and marks every call on the device clock (``_Trace``),
giving the events the one timeline model (spava_plan/critical_path.py) times."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from spava_plan.critical_path import Compute, Event, Start, Sync, Wait

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
class _Entry:
    """One communication call as logged in the functional pass (what the rank received)."""

    kind: str
    tag: str
    sig: Any
    data: Any = None


class _Trace:
    """Replay-mode recorder: the rank's comm calls with their enter/exit marks."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.calls: list[tuple[str, Any, tuple[int, ...], float, Any, Any]] = []  # (type, key, peers, cost, enter, exit)
        self.begin = clock.mark()
        self.end: Any = None

    def events(self) -> list[Event]:
        out: list[Event] = []
        at = self.begin
        for typ, key, peers, cost, enter, leave in self.calls:
            out.append(Compute(self.clock.between_us(at, enter)))
            out.append(Start(key, peers, cost) if typ == "start" else Wait(key) if typ == "wait"
                       else Sync(key, peers, cost))
            at = leave
        out.append(Compute(self.clock.between_us(at, self.end)))
        return out


class _Pending:
    """Handle of an emulated asynchronous operation."""

    def __init__(self, finish: Callable[[], None]):
        self._finish: Callable[[], None] | None = finish

    def wait(self) -> None:
        if self._finish is not None:
            finish, self._finish = self._finish, None
            finish()


def _median_trace(runs: Sequence[Sequence[Event]]) -> list[Event]:
    """Element-wise median of the compute stretches of structurally identical traces."""
    out: list[Event] = []
    for events in zip(*runs):
        first = events[0]
        out.append(Compute(statistics.median(e.us for e in events)) if isinstance(first, Compute) else first)
    return out
