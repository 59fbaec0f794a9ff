"""Batched variable-length attention for the Qwen2-VL / Qwen2.5-VL vision tower (no Python loop).

With ``attn_implementation="sdpa"`` transformers' ViT splits the patch sequence at every
``cu_seqlens`` boundary and calls SDPA once per piece: at 1440p a Qwen2.5-VL temporal grid has 299
windows of at most 64 patches, so 64 frames make about 270K tiny SDPA calls in the 28 window
layers, CPU-bound (seconds of launch overhead). Only the flash-attention code path hands the whole
``cu_seqlens`` to the attention function. ``install(model)`` registers one function, under a name
that routes the ViT through that path (transformers checks for "flash" in the name), which groups
the pieces by length and runs ONE SDPA call per distinct length (a batch of equal windows: 4 lengths
at most for a window grid, 1 for the full-attention layers). Every piece still attends only to
itself, through the same SDPA kernels (whatever ``torch.nn.attention.sdpa_kernel`` selects), so the
result equals the stock per-piece loop (tests/test_benchmark_prefill.py checks it on a tiny model).

Only the vision tower's config is switched; the language model keeps its own implementation.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F

from . import window as vision_window
from .tower import vision_module

ATTN_NAME = "spava_vit_flash_batched"  # must contain "flash": the ViT's varlen code path keys on it
_CACHE_SIZE = 8  # distinct cu_seqlens seen recently (window and full layers of a few videos)


class _Groups:
    """Rows of the patch sequence grouped by piece length: [(length, pieces, rows or (start, stop))]."""

    def __init__(self, cu: list[int], device: torch.device):
        starts = {}
        for a, b in zip(cu[:-1], cu[1:]):
            if b > a:
                starts.setdefault(b - a, []).append(a)
        self.groups: list[tuple[int, int, Any]] = []
        for length, first in starts.items():
            if all(s == first[0] + i * length for i, s in enumerate(first)):  # one contiguous run: a slice
                self.groups.append((length, len(first), (first[0], first[0] + len(first) * length)))
            else:
                base = torch.tensor(first, dtype=torch.long)
                rows = (base[:, None] + torch.arange(length)[None, :]).reshape(-1).to(device)
                self.groups.append((length, len(first), rows))


_groups: "OrderedDict[tuple, _Groups]" = OrderedDict()
HOST_LIST = "_spava_host_list"  # the attribute a cu_seqlens tensor keeps its host values in


def _host_list(cu_seqlens: torch.Tensor) -> list[int]:
    """``cu_seqlens`` as a host list, read once per tensor object. The tower computes its two
    cu_seqlens once per forward and hands the same tensors to all 32 blocks; a ``.tolist()`` in
    every block made the host wait for the GPU to drain, 32 times per call, and the GPU then wait
    for the host's next launches (one rank at 64 frames 1440p on an H200: the vision stage's idle
    GPU time went from 20.2 to 14-18 ms). The list rides on the tensor itself, so it lives exactly
    as long as the tensor (nobody writes cu_seqlens in place)."""
    cu = getattr(cu_seqlens, HOST_LIST, None)
    if cu is None:
        cu = [int(x) for x in cu_seqlens.tolist()]
        setattr(cu_seqlens, HOST_LIST, cu)
    return cu


def _grouping(cu_seqlens: torch.Tensor, device: torch.device) -> _Groups:
    cu = _host_list(cu_seqlens)
    key = (tuple(cu), str(device))
    hit = _groups.get(key)
    if hit is None:
        hit = _groups[key] = _Groups(cu, device)
        while len(_groups) > _CACHE_SIZE:
            _groups.popitem(last=False)
    else:
        _groups.move_to_end(key)
    return hit


def batched_varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: Any = None, scaling: float | None = None, dropout: float = 0.0,
                             cu_seq_lens_q: torch.Tensor | None = None, cu_seq_lens_k: torch.Tensor | None = None,
                             is_causal: bool = False, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention-interface signature: query/key/value (1, H, S, D) of the packed patch
    sequence, pieces given by ``cu_seq_lens_q`` (== ``cu_seq_lens_k``); returns ((1, S, H, D), None)."""
    if cu_seq_lens_q is None or attention_mask is not None or is_causal or dropout:
        raise RuntimeError("the batched vision attention takes packed non-causal pieces (cu_seqlens), no mask")
    if cu_seq_lens_k is not None and cu_seq_lens_k is not cu_seq_lens_q and not torch.equal(cu_seq_lens_k,
                                                                                            cu_seq_lens_q):
        raise RuntimeError("the batched vision attention needs the same pieces for queries and keys")
    _, heads, seq, dim = query.shape
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (S, H, D) views
    groups = _grouping(cu_seq_lens_q, query.device).groups
    longest = max((length for length, _, _ in groups), default=0)
    if getattr(module, "_spava_window_kernel", False) and query.is_cuda:
        if longest <= vision_window.MAX_WINDOW:  # window layers: one Triton launch, no gather/scatter
            out = vision_window.window_attention(q, k, v, cu_seq_lens_q, longest, scaling)
            return out.unsqueeze(0), None
    out = torch.empty((seq, heads, dim), dtype=query.dtype, device=query.device)
    for length, pieces, rows in groups:
        if isinstance(rows, tuple):
            parts = [t[rows[0]:rows[1]] for t in (q, k, v)]
        else:
            parts = [t.index_select(0, rows) for t in (q, k, v)]
        # (pieces * length, H, D) -> (pieces, H, length, D): one batch of equal pieces
        qb, kb, vb = (p.reshape(pieces, length, heads, dim).transpose(1, 2) for p in parts)
        ob = F.scaled_dot_product_attention(qb, kb, vb, scale=scaling).transpose(1, 2).reshape(-1, heads, dim)
        if isinstance(rows, tuple):
            out[rows[0]:rows[1]] = ob
        else:
            out.index_copy_(0, rows, ob)
    return out.unsqueeze(0), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, batched_varlen_attention)


def install(model: Any) -> Any:
    """Route ``model``'s vision tower through the batched function (idempotent); returns the model."""
    if getattr(model.config, "model_type", None) == "internvl":
        return model  # InternViT attends over one whole tile: transformers' sdpa call is already one launch
    register()
    vision_module(model).config._attn_implementation = ATTN_NAME
    return model


def uninstall(model: Any, implementation: str = "sdpa") -> Any:
    """Back to transformers' own implementation (the per-piece loop for sdpa)."""
    vision_module(model).config._attn_implementation = implementation
    return model
