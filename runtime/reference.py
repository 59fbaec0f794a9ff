"""Global <-> rank-local token bookkeeping and the naive dense reference the runtime is tested
against (tests, fidelity harness, examples).

``dense_attention`` materialises the full score matrix with an explicit mask and torch.softmax:
deliberately unlike the backends (no segments, no LSE merging), so it checks them rather than
repeating them. Use fp64 inputs for reference results.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from spava_plan.plan import Plan, RankPlan


def local_index(rank_plan: RankPlan, device: torch.device | str | None = None) -> torch.Tensor:
    """Global token index of every local row of a rank, in local order (int64)."""
    return torch.cat([torch.arange(a, b, device=device) for a, b in rank_plan.local]) if rank_plan.local \
        else torch.zeros(0, dtype=torch.long, device=device)


def local_rows(plan: Plan, rank: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Slice global token-major tensors (N, ...) to one rank's local sequence."""
    idx = local_index(plan.ranks[rank], tensors[0].device)
    return tuple(t.index_select(0, idx) for t in tensors)


def assemble(plan: Plan, outs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Global (N, ...) tensor from every rank's local outputs; a row held by several ranks (the
    anchor, the query) is taken from the lowest rank."""
    n = plan.layout.total_tokens
    first = outs[0]
    full = torch.full((n,) + tuple(first.shape[1:]), float("nan"), dtype=first.dtype, device=first.device)
    for r in reversed(range(plan.world_size)):
        full[local_index(plan.ranks[r], first.device)] = outs[r]
    return full


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                    past: int = 0) -> torch.Tensor:
    """Softmax attention of q (M, Hq, D) over k/v (n, Hkv, D), GQA by repeating KV heads.

    ``causal``: query row i is token ``past + i`` and sees keys 0..past+i (past = n - M for the
    last M tokens of a sequence)."""
    m, hq, d = q.shape
    n, hkv, _ = k.shape
    g = hq // hkv
    kk, vv = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = torch.einsum("mhd,nhd->hmn", q, kk) / math.sqrt(d)
    if causal:
        rows = torch.arange(m, device=q.device).unsqueeze(1) + past
        s = s.masked_fill(torch.arange(n, device=q.device).unsqueeze(0) > rows, float("-inf"))
    return torch.einsum("hmn,nhd->mhd", torch.softmax(s, dim=-1), vv)


def dense_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Causal attention probabilities (Hq, N, N) of a whole sequence (fidelity metrics)."""
    m, hq, d = q.shape
    g = hq // k.shape[1]
    s = torch.einsum("mhd,nhd->hmn", q, k.repeat_interleave(g, dim=1)) / math.sqrt(d)
    s = s.masked_fill(torch.ones(m, m, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(s, dim=-1)
