"""What each rank of a tensor-parallel dense model (method=dense_tp) holds: the one statement of the
shards, read by the planner (cost, memory) and the runtime (weight slicing, runtime/tensor_parallel.py).

Megatron-style, as vLLM's tensor_parallel_size=W lays a model out:
- language model: rank r holds q heads [r Hq/W, (r+1) Hq/W) (W must divide Hq). KV heads are
  sharded the same way when W divides Hkv; when Hkv < W and Hkv divides W, each rank holds the one
  KV head its q heads read, so each KV head is replicated W/Hkv times (vLLM's rule); otherwise W
  is refused. MLP gate/up columns and down rows [r I/W, (r+1) I/W) (W must divide I). o_proj takes
  the rows of the rank's q heads. Two all-reduces of the hidden states per layer.
- vision tower: heads and MLP columns split as evenly as possible (the ViT widths of the real
  towers are not all multiples of 8: Qwen2.5-VL's MLP is 3420 wide), so a rank may hold one head
  or column more than another, or none when W exceeds the tower's heads; two all-reduces per block.
  Patch embedding and the merger / projector are replicated (every rank computes them in full).
Pure Python: the planner imports no torch.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import InfeasiblePlanError

Span = tuple[int, int]


@dataclass(frozen=True)
class TPShard:
    rank: int
    world: int
    q_heads: Span  # query heads of the language model
    kv_heads: Span  # its KV heads (one replicated head when kv_replicated)
    kv_replicated: bool
    mlp: Span  # MLP gate/up columns = down rows
    vit_heads: Span  # vision-tower heads
    vit_mlp: Span  # vision-tower MLP columns

    @property
    def num_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def intermediate(self) -> int:
        return self.mlp[1] - self.mlp[0]

    @property
    def vit_num_heads(self) -> int:
        return self.vit_heads[1] - self.vit_heads[0]

    @property
    def vit_intermediate(self) -> int:
        return self.vit_mlp[1] - self.vit_mlp[0]


def balanced(n: int, world: int, rank: int) -> Span:
    """Rank ``rank``'s share of n items split as evenly as possible: the first n % W ranks get one
    more, so rank 0 (which adds the row-parallel biases) always holds some when n >= 1."""
    q, rem = divmod(n, world)
    start = rank * q + min(rank, rem)
    return start, start + q + (rank < rem)


def check_tp(num_heads: int, num_kv_heads: int, intermediate: int, world: int) -> None:
    """Refuse a W the language model cannot be sharded over, naming gpus."""
    if num_heads % world:
        raise InfeasiblePlanError(f"method=dense_tp shards the {num_heads} query heads over the GPUs, but gpus={world} "
                                  f"does not divide them; use gpus dividing {num_heads}", setting="gpus")
    if intermediate % world:
        raise InfeasiblePlanError(f"method=dense_tp shards the MLP's {intermediate} columns over the GPUs, but "
                                  f"gpus={world} does not divide them; use gpus dividing {intermediate}",
                                  setting="gpus")
    if num_kv_heads % world and world % num_kv_heads:
        raise InfeasiblePlanError(f"method=dense_tp shards or replicates the {num_kv_heads} KV heads, but gpus={world} "
                                  f"neither divides them nor is a multiple of them", setting="gpus")


def tp_shard(num_heads: int, num_kv_heads: int, intermediate: int, vit_heads: int, vit_intermediate: int,
             world: int, rank: int) -> TPShard:
    check_tp(num_heads, num_kv_heads, intermediate, world)
    hq = num_heads // world
    q = (rank * hq, (rank + 1) * hq)
    if num_kv_heads % world == 0:
        hkv = num_kv_heads // world
        kv, replicated = (rank * hkv, (rank + 1) * hkv), False
    else:  # W/Hkv ranks share a KV head: the one their q heads read (q heads per KV head: Hq / Hkv)
        head = q[0] // (num_heads // num_kv_heads)
        kv, replicated = (head, head + 1), True
    i = intermediate // world
    return TPShard(rank, world, q, kv, replicated, (rank * i, (rank + 1) * i), balanced(vit_heads, world, rank),
                   balanced(vit_intermediate, world, rank))


def model_shards(model, world: int) -> tuple[TPShard, ...]:
    """Every rank's shard of a plan's ModelSpec or a config's ModelConfig (same field names)."""
    vis = model.vision
    return tuple(tp_shard(model.num_heads, model.num_kv_heads, model.intermediate_size, vis.num_heads,
                          vis.intermediate_size, world, r) for r in range(world))
