"""The communicator interface the runtime talks to, and the one formula for communication time.

Two implementations:
- ``TorchDistComm`` (runtime/comm_dist.py): torch.distributed, NCCL on GPU and gloo on CPU, with
  process-group timeouts; a failed or dead peer becomes a DistributedError naming the ranks.
- ``EmulatedWorld`` / ``EmulatedComm`` (runtime/comm_emulated.py): all W ranks in one process (one
  thread per rank) on one device; a functional pass exchanges real data, a timing pass replays
  each rank alone and charges the communication the schedule cannot hide (results are labelled
  emulated).

Every rank must issue its collectives in the same order (the usual torch.distributed rule); P2P
exchanges pair up in call order between the two peers. ``tag`` names the plan's collective
("select0", "query", "ring", ...) so the emulator can charge its predicted time; it has no effect
on a real process group.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Mapping, Protocol, Sequence

import torch

# Collective kinds as the timing model sees them.
ALL_GATHER = "all_gather"
ALL_TO_ALL = "all_to_all"
BROADCAST = "broadcast"
P2P = "p2p"
OBJECT = "object"
BARRIER = "barrier"


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
    def broadcast(self, t: torch.Tensor, src: int, tag: str = "") -> None:
        """In place: every rank's ``t`` becomes rank ``src``'s."""

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


# -- communication time: the single place the runtime models it -----------------------------------
def link_gbps(topology: Mapping[str, Any], world_size: int) -> float:
    """Per-GPU bandwidth (GB/s) a collective over ``world_size`` ranks runs at: NVLink inside one
    node, the network as soon as the ranks span nodes (the slowest link paces a ring)."""
    per_node = int(topology.get("gpus_per_node", 8))
    nodes = topology.get("nodes")
    spans_nodes = (nodes is not None and int(nodes) > 1) or world_size > per_node
    return float(topology["inter_node_gbps"] if spans_nodes else topology["intra_node_gbps"])


def transfer_time_us(kind: str, bytes_per_rank: int, world_size: int, topology: Mapping[str, Any]) -> float:
    """Predicted duration of one communication on the topology.

    all_gather: (W-1) shares through each GPU's link (ring bandwidth term) plus log2(W)
                latencies (NCCL's tree/PAT algorithms), as in the planner's cost model.
    all_to_all: ``bytes_per_rank`` = the largest off-rank bytes one rank sends or receives (the
                busiest link; every pair moves at once) plus log2(W) latencies, as for the other
                collectives.
    broadcast: pipelined tree, about one full transfer plus log2(W) latencies.
    p2p: one transfer of ``bytes_per_rank`` (one ring step of ring attention).
    object / barrier: latency only (control messages).
    """
    if world_size <= 1:
        return 0.0
    latency = float(topology.get("link_latency_us", 0.0))
    per_byte_us = 1.0 / (link_gbps(topology, world_size) * 1e3)  # GB/s -> bytes per microsecond
    if kind == ALL_GATHER:
        return math.ceil(math.log2(world_size)) * latency + (world_size - 1) * bytes_per_rank * per_byte_us
    if kind == ALL_TO_ALL:
        return math.ceil(math.log2(world_size)) * latency + bytes_per_rank * per_byte_us
    if kind == BROADCAST:
        return math.ceil(math.log2(world_size)) * latency + bytes_per_rank * per_byte_us
    if kind == P2P:
        return latency + bytes_per_rank * per_byte_us
    if kind in (OBJECT, BARRIER):
        return math.ceil(math.log2(world_size)) * latency
    raise ValueError(f"unknown communication kind {kind!r}")


def plan_comm_costs(plan: Any) -> dict[str, float]:
    """tag -> predicted microseconds for the plan's collectives: ``Collective.time_us`` where the
    planner filled it, else the formula above from bytes_per_rank (ring: per step)."""
    topology = plan.config["topology"]
    kinds = {"select_all_gather": ALL_GATHER, "query_all_gather": ALL_GATHER, "ring": P2P}
    costs = {}
    for c in plan.collectives:
        costs[c.name] = float(c.time_us) if c.time_us > 0 else transfer_time_us(
            kinds[c.kind], c.bytes_per_rank, plan.world_size, topology)
    return costs


def tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
