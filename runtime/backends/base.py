"""The kernel-backend interface every attention backend implements.

Two backends: ``torch`` (runtime/backends/torch_ref.py, the oracle: runs anywhere, fp32/fp64) and
``triton`` (runtime/backends/triton_gen.py: loads the kernels codegen rendered for the plan).
The runtime's attention layer calls only these operations, so backends are swappable and
every one is tested against the torch reference.

Conventions (all backends):
- Token-major tensors: q (M, Hq, D); k, v (N, Hkv, D); views with any strides are allowed (K/V
  segments are read in place, never concatenated). GQA: query head h uses KV head h // G.
- A task's keys are the concatenation of its segments in order, under ONE softmax with scale
  ``scale`` (1/sqrt(D)). Segment mask "full": every row sees every key; "causal": row i of M sees
  key j of n iff j <= i + (n - M) (bottom-right aligned; n >= M).
- lse is the natural-log sum-exp of the scaled scores per (row, head), fp32 (fp64 when the inputs
  are fp64, so an fp64 merge stays exact); out is normalised. A row with no visible key has
  out = 0 and lse = -inf.
- Packed selections: (keep, Hkv, 2D) with K in [..., :D] and V in [..., D:], post-RoPE.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence

if TYPE_CHECKING:  # the interface itself needs no torch at import time
    from torch import Tensor


@dataclass(frozen=True)
class KVSegment:
    k: "Tensor"  # (n, Hkv, D)
    v: "Tensor"  # (n, Hkv, D)
    mask: str  # "full" | "causal"


@dataclass(frozen=True)
class TaskInput:
    name: str
    q: "Tensor"  # (M, Hq, D)
    segments: tuple[KVSegment, ...]
    out: "Tensor | None" = None  # (M, Hq, D) destination (written in place when given)


class KernelBackend(Protocol):
    name: str

    def select(self, q_query: "Tensor", k_block: "Tensor", v_block: "Tensor", keep: int, pool_window: int,
               score: str) -> "Tensor":
        """Pick ``keep`` keys per KV head of one block and pack them, returns (keep, Hkv, 2D).

        score="query_aware": s[j, h] = <k[j, h], qbar[h]> in fp32 where qbar[h] is the mean of
        q_query over its Lq rows and the G query heads of KV head h (one GEMV per KV head); then a
        max-pool along j (window ``pool_window``, stride 1, same padding, -inf outside the block);
        then the top ``keep`` per head (ties go to the earlier token), packed in ascending token
        order.
        score="key_norm": s[j, h] = ||k[j, h]||_2 (query-unaware, the APB stand-in), same pooling.
        keep == len(block): every token, in order (no scoring needed).
        """
        ...

    def select_blocks(self, q_query: "Tensor", k: "Tensor", v: "Tensor", blocks: Sequence[tuple[int, int, int]],
                      pool_window: int, score: str) -> list["Tensor"]:
        """``select`` of each block (lo, hi, keep) of rows k/v[lo:hi], in block order: one rank's
        passing blocks of a layer, which a backend may run together (the triton one: one launch
        per step for all of them)."""
        ...

    def attention(self, tasks: Sequence[TaskInput], scale: float) -> list[tuple["Tensor", "Tensor"]]:
        """Run several attention tasks (one fused launch where the backend can), returns
        [(out (M, Hq, D) in q's dtype, lse (M, Hq) fp32, fp64 for fp64 inputs)] in task order."""
        ...

    def merge(self, outs: "Tensor", lses: "Tensor") -> tuple["Tensor", "Tensor"]:
        """LSE-merge partials: outs (P, M, Hq, D), lses (P, M, Hq) -> (out (M, Hq, D), lse (M, Hq)),
        computed in fp32 (fp64 when given fp64); out is returned in outs' dtype."""
        ...

    def merge_parts(self, outs: Sequence["Tensor"], lses: Sequence["Tensor"]) -> tuple["Tensor", "Tensor"]:
        """merge() of partials given as lists, which may differ in dtype (a ring's fp32 accumulator
        and a step's bf16 output): no stacked copy is made where the backend can avoid it; out is
        returned in outs[0]'s dtype."""
        ...
