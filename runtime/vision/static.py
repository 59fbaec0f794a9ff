"""The Qwen ViT's grid-derived inputs, computed once per grid shape and handed to the tower.

Before its first block the Qwen2-VL / Qwen2.5-VL tower derives from ``grid_thw`` its rotary
position ids, the full-attention ``cu_seqlens``, Qwen2.5-VL's window order and window
``cu_seqlens``, and the longest piece of each (transformers' ``vision_utils``). That code reads
``grid_thw`` back to the host (``.tolist()``, ``.item()``), builds the window order on the CPU
and indexes GPU tensors with it: every call, the host first waits for the GPU to drain (the
pixel upload just queued), then the GPU idles while the host builds indices (one rank at 64
frames 1440p on an H200: 14-18 ms of idle GPU in the vision stage, mostly here).

These tensors depend on the grid shape alone, which the plan fixes. transformers (5.17 on) lets a
caller pass each of them precomputed (``position_ids``, ``cu_seqlens``, ``max_seqlen``,
``window_index``, ``cu_window_seqlens``, ``max_window_seqlen``: its helpers pop them from the
forward's kwargs). ``precomputed(stock)`` wraps a tower forward so that it computes them once per
(grid, device) with transformers' own helpers on the host, keeps them on the device, and passes
them on every call: the same values, so the same output (tests/test_vision_static.py), and the
tower's launches queue behind the pixel upload without one host round trip. The host copies of
the ``cu_seqlens`` ride on the device tensors, where runtime/vision_attention reads them.

A tower whose forward does not read these helpers (older transformers, InternViT) runs as it is.
"""
from __future__ import annotations

import inspect
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .attention import HOST_LIST

_CACHE_SIZE = 8  # grid shapes kept per tower: a video's chunk of vision_units grids, and its remainder
_GRID_ROWS = "_spava_grid_rows"  # a device grid_thw's rows, kept on the host


@dataclass
class GridInputs:
    grid: torch.Tensor  # grid_thw on the device (the stock forward receives it; nothing reads it back)
    tensors: dict[str, torch.Tensor]  # device tensors keyed by the names transformers' helpers pop
    host_cu: dict[str, torch.Tensor]  # "max_seqlen" / "max_window_seqlen" -> its cu_seqlens on the host


def _helpers() -> Any:
    try:
        from transformers import vision_utils
    except ImportError:  # transformers before the precomputable helpers
        return None
    return vision_utils


def _reads(visual: torch.nn.Module) -> set[str]:
    """The precomputable helpers the tower's forward calls (empty: it takes none of these inputs)."""
    code = getattr(inspect.unwrap(type(visual).forward), "__code__", None)
    names = set(code.co_names) if code is not None else set()
    return names & {"get_vision_position_ids", "get_vision_attention_seqlens", "get_vision_window_index"}


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    out = t.to(device)
    if t.dim() == 1 and t.dtype in (torch.int32, torch.int64):
        setattr(out, HOST_LIST, [int(x) for x in t.tolist()])  # read by vision_attention; t is on the host: no sync
    return out


def _compute(visual: torch.nn.Module, rows: tuple[tuple[int, int, int], ...], device: torch.device,
             reads: set[str]) -> GridInputs:
    vu = _helpers()
    grid = torch.tensor(rows, dtype=torch.int64)
    merge = int(visual.spatial_merge_size)
    tensors: dict[str, torch.Tensor] = {}
    host_cu: dict[str, torch.Tensor] = {}
    if "get_vision_position_ids" in reads:
        tensors["position_ids"] = vu.get_vision_position_ids(grid, merge)
    if "get_vision_attention_seqlens" in reads:
        tensors["cu_seqlens"] = host_cu["max_seqlen"] = vu.get_vision_cu_seqlens(grid)
    if "get_vision_window_index" in reads:
        index, cu = vu.get_vision_window_index(grid, spatial_merge_size=merge, window_size=int(visual.window_size),
                                               patch_size=int(visual.patch_size))
        tensors["window_index"], tensors["cu_window_seqlens"] = index, cu
        host_cu["max_window_seqlen"] = cu
    on_device = grid.to(device)
    setattr(on_device, _GRID_ROWS, rows)
    return GridInputs(grid=on_device, tensors={k: _on(v, device) for k, v in tensors.items()}, host_cu=host_cu)


def grid_inputs(visual: torch.nn.Module, rows: tuple[tuple[int, int, int], ...], device: torch.device
                ) -> GridInputs | None:
    """The precomputed inputs of ``visual`` for a grid, from its cache; None where the tower takes none."""
    reads = _reads(visual)
    if not reads or _helpers() is None:
        return None
    cache: OrderedDict = visual.__dict__.setdefault("_spava_grid_inputs", OrderedDict())
    key = (rows, str(device))
    hit = cache.get(key)
    if hit is None:
        hit = cache[key] = _compute(visual, rows, device, reads)
        while len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return hit


def grid_rows(grid_thw: torch.Tensor) -> tuple[tuple[int, int, int], ...]:
    """(t, h, w) per video (pass grid_thw on the host: a device tensor is read back, a sync)."""
    rows = getattr(grid_thw, _GRID_ROWS, None)  # our own device grids carry them
    return rows if rows is not None else tuple(tuple(int(x) for x in r) for r in grid_thw.tolist())


def precomputed(visual: torch.nn.Module, stock: Callable[..., Any]) -> Callable[..., Any]:
    """``stock`` (the tower's forward(pixels, grid_thw, **kwargs), bound) called with the grid's
    precomputed inputs on the pixels' device (computed on the first call for that grid shape).
    ``grid_thw`` may be on the host (best: nothing to read back) or on the device."""

    def forward(pixels: torch.Tensor, grid_thw: torch.Tensor, **kwargs: Any) -> Any:
        ready = grid_inputs(visual, grid_rows(grid_thw), pixels.device)
        if ready is None or any(k in kwargs for k in ready.tensors):
            return stock(pixels, grid_thw=grid_thw.to(pixels.device), **kwargs)
        vu = _helpers()
        extra = dict(ready.tensors)
        for name, cu in ready.host_cu.items():  # None unless flash-style attention is configured now
            value = vu.get_max_seqlen(cu, visual.config)
            if value is not None:
                extra[name] = int(value)
        return stock(pixels, grid_thw=ready.grid, **kwargs, **extra)

    return forward
