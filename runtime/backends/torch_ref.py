"""The torch reference backend: the oracle every other backend is tested against.

Implements runtime/backends/base.py with plain torch on any device, exact in fp64:
- attention: each KV segment is read in place (a view, never concatenated) and gives a partial
  (out, lse); the partials are LSE-merged, which is the same softmax over the concatenation.
  Scores are computed in fp32 (fp64 when q is fp64).
- lse is returned in fp32, or in fp64 when q is fp64 (an fp32 lse would cap an fp64 merge at
  ~1e-7 relative error, and the pass-all test asks for ~1e-10).
- select: GEMV score against the query mean in fp32, max-pool, top-k per KV head. Ties (frequent
  after max-pooling) go to the EARLIER token, a rule other backends must follow.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .base import KVSegment, TaskInput


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class TorchBackend:
    name = "torch"

    # -- selection -------------------------------------------------------------------------------
    def scores(self, q_query: torch.Tensor, k_block: torch.Tensor, pool_window: int, score: str) -> torch.Tensor:
        """Pooled selection scores (n, Hkv) in fp32."""
        n, hkv, d = k_block.shape
        if score == "query_aware":
            lq, hq, _ = q_query.shape
            # mean over the Lq rows and the G query heads of each KV head: (Hkv, D)
            qbar = q_query.to(torch.float32).reshape(lq, hkv, hq // hkv, d).mean(dim=(0, 2))
            s = torch.einsum("nhd,hd->nh", k_block.to(torch.float32), qbar)  # one GEMV per KV head
        elif score == "key_norm":
            s = torch.linalg.vector_norm(k_block.to(torch.float32), dim=-1)
        else:
            raise ValueError(f"unknown selection score {score!r}")
        if pool_window > 1:
            # max_pool1d pads with -inf, so the window never reaches outside the block
            s = F.max_pool1d(s.t().unsqueeze(1), pool_window, stride=1, padding=pool_window // 2).squeeze(1).t()
        return s

    def select_indices(self, q_query: torch.Tensor, k_block: torch.Tensor, keep: int, pool_window: int,
                       score: str) -> torch.Tensor:
        """(keep, Hkv) int64 token indices into the block, ascending per head."""
        n, hkv, _ = k_block.shape
        assert 0 <= keep <= n, (keep, n)
        if keep == n:
            return torch.arange(n, device=k_block.device).unsqueeze(1).expand(n, hkv)
        s = self.scores(q_query, k_block, pool_window, score)
        # stable descending sort: among equal scores the earlier token comes first
        order = torch.sort(s, dim=0, descending=True, stable=True).indices[:keep]
        return torch.sort(order, dim=0).values

    def select(self, q_query: torch.Tensor, k_block: torch.Tensor, v_block: torch.Tensor, keep: int,
               pool_window: int, score: str) -> torch.Tensor:
        n, hkv, d = k_block.shape
        packed = torch.empty((keep, hkv, 2 * d), dtype=k_block.dtype, device=k_block.device)
        if keep == n:
            packed[..., :d] = k_block
            packed[..., d:] = v_block
            return packed
        idx = self.select_indices(q_query, k_block, keep, pool_window, score).unsqueeze(-1).expand(keep, hkv, d)
        packed[..., :d] = torch.gather(k_block, 0, idx)
        packed[..., d:] = torch.gather(v_block, 0, idx)
        return packed

    def select_blocks(self, q_query: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      blocks: Sequence[tuple[int, int, int]], pool_window: int, score: str) -> list[torch.Tensor]:
        return [self.select(q_query, k[lo:hi], v[lo:hi], keep, pool_window, score) for lo, hi, keep in blocks]

    # -- attention -------------------------------------------------------------------------------
    def _segment(self, q: torch.Tensor, seg: KVSegment, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Partial over one segment: q (M, Hkv, G, D) in the accumulation dtype -> out, lse."""
        m, hkv, g, d = q.shape
        n = seg.k.shape[0]
        acc = q.dtype
        s = torch.einsum("mhgd,nhd->hgmn", q, seg.k.to(acc)) * scale
        if seg.mask == "causal":
            # bottom-right aligned: row i sees key j iff j <= i + (n - M)
            rows = torch.arange(m, device=q.device).unsqueeze(1)
            cols = torch.arange(n, device=q.device).unsqueeze(0)
            s = s.masked_fill(cols > rows + (n - m), float("-inf"))
        elif seg.mask != "full":
            raise ValueError(f"unknown mask {seg.mask!r}")
        top = s.amax(dim=-1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # rows with no visible key
        p = torch.exp(s - top)
        total = p.sum(dim=-1)  # (Hkv, G, M)
        out = torch.einsum("hgmn,nhd->mhgd", p, seg.v.to(acc))
        denom = total.permute(2, 0, 1).unsqueeze(-1)
        out = torch.where(denom > 0, out / denom.clamp_min(torch.finfo(acc).tiny), torch.zeros_like(out))
        lse = (top.squeeze(-1) + torch.log(total)).permute(2, 0, 1)  # log 0 = -inf for empty rows
        return out.reshape(m, hkv * g, d), lse.reshape(m, hkv * g)

    def attention(self, tasks: Sequence[TaskInput], scale: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
        results = []
        for task in tasks:
            m, hq, d = task.q.shape
            acc = _acc_dtype(task.q.dtype)
            parts = []
            for seg in task.segments:
                if seg.k.shape[0] == 0:
                    continue
                hkv = seg.k.shape[1]
                q = task.q.to(acc).reshape(m, hkv, hq // hkv, d)
                parts.append(self._segment(q, seg, scale))
            if not parts:
                out = torch.zeros((m, hq, d), dtype=acc, device=task.q.device)
                lse = torch.full((m, hq), float("-inf"), dtype=acc, device=task.q.device)
            elif len(parts) == 1:
                out, lse = parts[0]
            else:
                out, lse = self._merge(torch.stack([o for o, _ in parts]), torch.stack([l for _, l in parts]))
            out = out.to(task.q.dtype)
            if task.out is not None:
                task.out.copy_(out)
                out = task.out
            results.append((out, lse.to(acc)))
        return results

    # -- merge -----------------------------------------------------------------------------------
    @staticmethod
    def _merge(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """In the inputs' (accumulation) dtype; partials with lse = -inf weigh nothing."""
        top = lses.amax(dim=0)
        safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        w = torch.exp(lses - safe)  # (P, M, H); exp(-inf) = 0
        total = w.sum(dim=0)
        out = (w.unsqueeze(-1) * outs).sum(dim=0)
        out = torch.where(total.unsqueeze(-1) > 0, out / total.clamp_min(torch.finfo(total.dtype).tiny).unsqueeze(-1),
                          torch.zeros_like(out))
        return out, safe + torch.log(total)

    def merge(self, outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        acc = torch.float64 if torch.float64 in (outs.dtype, lses.dtype) else torch.float32
        out, lse = self._merge(outs.to(acc), lses.to(acc))
        return out.to(outs.dtype), lse

    def merge_parts(self, outs, lses) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = outs[0].dtype
        return self.merge(torch.stack([o.to(dtype) for o in outs]), torch.stack([lse.to(lses[0].dtype) for lse in lses]))


def softmax_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
