"""The one model of communication time: how long a collective takes on the plan's links.

The planner (planner/cost.py) times every collective of the plan with it, and the emulated
runtime (runtime/comm/emulated.py) charges the communication it cannot observe with the same
``Links`` that the plan carries, so the prediction and the emulated timing cannot disagree.

    all_gather: ceil(log2 W) latencies (NCCL's tree/PAT algorithms) + (W - 1) shares of
                ``bytes_per_rank`` through each GPU's link (the ring bandwidth term);
    broadcast:  pipelined tree, about one full transfer + ceil(log2 W) latencies;
    all_to_all: ``bytes_per_rank`` = the busiest rank's off-rank bytes (every pair moves at once),
                as one transfer + ceil(log2 W) latencies;
    p2p:        one latency + one transfer (a ring step of ring attention);
    all_reduce: ring reduce-scatter + all-gather of ``bytes_per_rank`` (the whole tensor):
                2 ceil(log2 W) latencies + 2 (W - 1) / W of it through each GPU's link;
    object, barrier: ceil(log2 W) latencies (control messages).

Bandwidth is the NVLink rate when the plan's ranks sit in one node and the per-GPU network rate
once they span nodes (the slowest link paces a ring). Pure Python: the core imports no torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

CommKind = Literal["all_gather", "all_to_all", "broadcast", "p2p", "object", "barrier", "all_reduce"]
ALL_GATHER: CommKind = "all_gather"
ALL_TO_ALL: CommKind = "all_to_all"
BROADCAST: CommKind = "broadcast"
P2P: CommKind = "p2p"
OBJECT: CommKind = "object"
BARRIER: CommKind = "barrier"
ALL_REDUCE: CommKind = "all_reduce"


@dataclass(frozen=True)
class Links:
    """The links a plan's collectives run over (a typed field of the Plan)."""

    gbps: float  # per-GPU bandwidth, GB/s: NVLink within one node, the network across nodes
    latency_us: float  # fixed cost per collective step
    spans_nodes: bool = False  # the plan's ranks sit in more than one node (informational)

    def transfer_us(self, kind: CommKind, bytes_per_rank: float, world: int) -> float:
        """Predicted duration of one communication of ``kind`` among ``world`` ranks."""
        if world <= 1:
            return 0.0
        link = self.gbps * 1e3  # bytes per microsecond
        if kind == P2P:
            return self.latency_us + bytes_per_rank / link
        steps = self.latency_us * math.ceil(math.log2(world))
        if kind == ALL_GATHER:
            return steps + (world - 1) * bytes_per_rank / link
        if kind in (BROADCAST, ALL_TO_ALL):
            return steps + bytes_per_rank / link
        if kind in (OBJECT, BARRIER):
            return steps
        if kind == ALL_REDUCE:
            return 2 * steps + 2 * (world - 1) / world * bytes_per_rank / link
        raise ValueError(f"unknown communication kind {kind!r}")


def plan_links(*, world: int, gpus: int, nodes: int, gpus_per_node: int, intra_node_gbps: float,
               inter_node_gbps: float, link_latency_us: float) -> Links:
    """The links of a plan on ``world`` ranks of a topology with ``gpus`` GPUs on ``nodes`` nodes
    (a plan may use fewer ranks than the topology has GPUs, e.g. dense on one)."""
    used_nodes = 1 if world <= 1 else (nodes if world == gpus else -(-world // gpus_per_node))
    spans = used_nodes > 1
    return Links(gbps=float(inter_node_gbps if spans else intra_node_gbps), latency_us=float(link_latency_us),
                 spans_nodes=spans)
