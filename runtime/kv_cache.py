"""One layer's KV cache shard on one rank: the rows the plan assigns it after prefill
(``RankPlan.cache``), plus the decoded tokens on the rank that appends them.

Preallocated with room for ``extra`` decoded tokens, grown geometrically if decoding runs past it
(a local resize: nothing about it is communicated).
"""
from __future__ import annotations

from typing import Sequence

import torch


class KVCacheShard:
    def __init__(self, parts: Sequence[tuple[torch.Tensor, torch.Tensor]], extra: int):
        """``parts``: (k, v) row blocks (n_i, Hkv, D) in cache order; they are copied."""
        first_k = parts[0][0] if parts else None
        self.prefill_tokens = sum(k.shape[0] for k, _ in parts)
        self.length = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._extra = max(int(extra), 0)
        if first_k is not None:
            self._allocate(first_k, self.prefill_tokens + self._extra)
            for k, v in parts:
                self._write(k, v)

    def _allocate(self, like: torch.Tensor, rows: int) -> None:
        shape = (max(rows, 1),) + tuple(like.shape[1:])
        k = torch.empty(shape, dtype=like.dtype, device=like.device)
        v = torch.empty(shape, dtype=like.dtype, device=like.device)
        if self._k is not None and self.length:
            k[: self.length] = self._k[: self.length]
            v[: self.length] = self._v[: self.length]
        self._k, self._v = k, v

    def _write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[0]
        assert self._k is not None
        self._k[self.length: self.length + n] = k
        self._v[self.length: self.length + n] = v
        self.length += n

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[0]
        if self._k is None:
            self._allocate(k, n + self._extra)
        elif self.length + n > self._k.shape[0]:
            self._allocate(k, max(2 * self._k.shape[0], self.length + n))
        self._write(k, v)

    @property
    def k(self) -> torch.Tensor | None:
        """(length, Hkv, D) view of the cached keys (None before anything was cached)."""
        return None if self._k is None else self._k[: self.length]

    @property
    def v(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[: self.length]
