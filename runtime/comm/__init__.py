"""The communicator interface the runtime talks to, and the one formula for communication time.

Two implementations:
- ``TorchDistComm`` (runtime/comm/dist.py): torch.distributed, NCCL on GPU and gloo on CPU, with
  process-group timeouts; a failed or dead peer becomes a DistributedError naming the ranks.
- ``EmulatedWorld`` / ``EmulatedComm`` (runtime/comm/emulated.py): all W ranks in one process (one
  thread per rank) on one device; a functional pass exchanges real data, a timing pass replays
  each rank alone and charges the communication the schedule cannot hide with the plan's own
  numbers (``Collective.time_us``, ``Plan.links``; results are labelled emulated).

Every rank must issue its collectives in the same order (the usual torch.distributed rule); P2P
exchanges pair up in call order between the two peers. ``tag`` names the plan's collective
("select0", "query", "ring", ...) so the emulator can charge its predicted time; it has no effect
on a real process group.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Protocol, Sequence

import torch

# Communication kinds as the timing model sees them (spava_plan/links.py).
from spava_plan.links import ALL_GATHER, ALL_REDUCE, ALL_TO_ALL, BARRIER, BROADCAST, OBJECT, P2P  # noqa: F401

# Tags of all-reduces (dense_tp's hidden states) start with this: the emulator charges them by their
# bytes with the all-reduce formula (the MLP and the ViT run them per chunk, not per plan collective).
REDUCE_TAG = "reduce"


class Handle(Protocol):
    def wait(self) -> None:
        ...


class DoneHandle:
    """The handle of an operation that already completed (world size 1, blocking fallbacks)."""

    def wait(self) -> None:
        return None


class Communicator(ABC):
    """One rank's view of the world. ``emulated`` is True when ranks are not separate processes."""

    rank: int
    world_size: int
    emulated: bool = False
    label: str = ""

    @abstractmethod
    def all_gather_into_tensor(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False,
                               tag: str = "") -> Handle | None:
        """out (W * n, ...) <- the inp (n, ...) of every rank, in rank order. Equal sizes on every
        rank (the plan fixes them). With async_op a handle is returned: ``out`` is valid after
        ``handle.wait()`` and ``inp`` must not change before it."""

    @abstractmethod
    def all_to_all_single(self, out: torch.Tensor, inp: torch.Tensor, out_splits: Sequence[int],
                          in_splits: Sequence[int], tag: str = "") -> None:
        """Blocking, uneven: rows [sum(in_splits[:d]), +in_splits[d]) of ``inp`` go to rank d, and
        ``out`` holds what every rank sent here, in rank order (out_splits[s] rows from rank s).
        in_splits[d] on rank s must equal out_splits[s] on rank d (the plan fixes both)."""

    @abstractmethod
    def broadcast(self, t: torch.Tensor, src: int, tag: str = "", async_op: bool = False) -> Handle | None:
        """In place: every rank's ``t`` becomes rank ``src``'s. With async_op a handle is returned:
        ``t`` holds rank ``src``'s data after ``handle.wait()`` (on ``src``: must not change before it)."""

    @abstractmethod
    def exchange(self, send: torch.Tensor, dst: int, recv: torch.Tensor, src: int, tag: str = "") -> Handle:
        """Asynchronous P2P pair (one ring step): send ``send`` to ``dst`` and receive ``recv`` from
        ``src``. Both complete at ``handle.wait()``; ``send`` must not change before it."""

    @abstractmethod
    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order (small control data only)."""

    @abstractmethod
    def barrier(self) -> None:
        ...

    def report_failure(self, exc: BaseException) -> None:
        """Tell the peers why this rank is about to fail, so their errors can name it."""

    # -- derived operations ---------------------------------------------------------------------
    def all_gather(self, t: torch.Tensor, tag: str = "") -> torch.Tensor:
        """(W, *t.shape): every rank's ``t`` stacked in rank order."""
        one = t.contiguous().reshape((1,) + tuple(t.shape))
        out = torch.empty((self.world_size,) + tuple(t.shape), dtype=t.dtype, device=t.device)
        self.all_gather_into_tensor(out, one, tag=tag)
        return out

    def all_reduce(self, t: torch.Tensor, tag: str = REDUCE_TAG) -> None:
        """In place: ``t`` becomes the sum of every rank's ``t``, the same on every rank. This default
        all-gathers and sums in rank order (so the emulated world needs nothing new); a process
        group runs its own all-reduce (runtime/comm/dist.py). ``tag`` starts with REDUCE_TAG."""
        assert tag.startswith(REDUCE_TAG), tag
        every = self.all_gather(t, tag=tag)
        torch.sum(every, dim=0, out=t)

    def send(self, t: torch.Tensor, dst: int, tag: str = "") -> None:
        """Blocking send; pairs with the peer's ``recv`` (implemented as a one-sided exchange)."""
        self._send(t, dst, tag)

    def recv(self, t: torch.Tensor, src: int, tag: str = "") -> None:
        """Blocking receive into ``t``."""
        self._recv(t, src, tag)

    @abstractmethod
    def _send(self, t: torch.Tensor, dst: int, tag: str) -> None:
        ...

    @abstractmethod
    def _recv(self, t: torch.Tensor, src: int, tag: str) -> None:
        ...


# -- communication time: the plan's numbers (spava_plan/links.py is the one model) ----------------
def plan_comm_costs(plan: Any) -> dict[str, float]:
    """tag -> predicted microseconds of the plan's collectives (``Collective.time_us``, which the
    planner computed with the plan's ``links``; ring: per step)."""
    return {c.name: float(c.time_us) for c in plan.collectives}


def tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
