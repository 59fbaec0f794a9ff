"""Bounded activations: the chunking that planner/memory.py assumes, applied to a Hugging Face model.

A transformation on the built model (no modeling file is copied): ``install(model, chunking)``
wraps, per instance,
- every decoder layer's MLP and both of its RMSNorms, and the language model's final norm, so
  they run on at most ``chunking.mlp_tokens`` rows at a time and write into one preallocated
  output. Without it a 170K-token rank holds the MLP's gate, up and product (3 x n x
  intermediate, about 7 GB each for Qwen2-VL-7B) and every RMSNorm makes two full-sequence fp32
  copies of the hidden states;
- the vision tower's forward, so it encodes at most ``chunking.vision_units`` whole temporal
  grids per call and copies each chunk's merged embeddings into one preallocated output. The
  tower never attends across grids, so this is the same computation, call by call. Each call
  gets its grid's position ids, window order and ``cu_seqlens`` precomputed once per grid shape
  (runtime/vision/static.py: no host round trip per call), so the wrapped tower takes
  ``grid_thw`` on the host (``takes_host_grid``).
Prefill logits are the last prompt row's only (runtime/generate.py), so the LM head never sees
more than one row per call and needs no chunking.

Every wrapped module computes each row from that row alone, so a chunked result equals the
unchunked one up to the GEMM library picking a different blocking for fewer rows (exact in the
arithmetic, not always in the last bit: tests/test_runtime_chunking.py states the tolerance).
Idempotent; ``uninstall`` restores the stock forwards.
"""
from __future__ import annotations

import types
from typing import Any, Callable

import torch

from spava_plan.plan import Chunking

from . import static as vision_static
from ..hf.attention import language_model
from .tower import vision_module

_MARK = "_spava_chunk_forward"  # the stock forward, kept on a wrapped module


def _rows_chunked(stock: Callable[[torch.Tensor], torch.Tensor], rows: int) -> Callable[..., torch.Tensor]:
    """forward(x) over (..., n, hidden) in chunks of ``rows`` along n (a row-wise module whose
    output has the input's leading shape)."""

    def forward(self: torch.nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        n = x.shape[-2] if x.dim() >= 2 else 1
        if x.dim() < 2 or n <= rows:
            return stock(x, *args, **kwargs)
        residual = kwargs.pop("residual", None)  # runtime/vision_fused's MLP adds it: x's rows, chunked alike
        out = None
        for start in range(0, n, rows):
            m = min(rows, n - start)
            if residual is not None:
                kwargs["residual"] = residual.narrow(-2, start, m)
            part = stock(x.narrow(-2, start, m), *args, **kwargs)
            if out is None:  # the output dtype / width come from the module (norms may cast)
                out = part.new_empty(tuple(x.shape[:-2]) + (n, part.shape[-1]))
            out.narrow(-2, start, part.shape[-2]).copy_(part)
            del part
        return out

    return forward


def _wrap(module: torch.nn.Module, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    stock = module.__dict__.get(_MARK) or module.forward
    setattr(module, _MARK, stock)
    module.forward = types.MethodType(make(stock), module)


def _unwrap(module: torch.nn.Module) -> None:
    if _MARK in module.__dict__:
        module.__dict__.pop("forward", None)
        delattr(module, _MARK)


def _vision_chunked(stock: Callable[..., Any], units: int) -> Callable[..., Any]:
    """The tower's forward(pixels, grid_thw) over at most ``units`` temporal grids per call. The
    output keeps the stock type; ``pooler_output`` holds every chunk's merged embeddings (the
    per-patch ``last_hidden_state`` of a chunk is not kept: nothing downstream reads it)."""

    def forward(self: torch.nn.Module, pixels: torch.Tensor, grid_thw: torch.Tensor, **kwargs: Any) -> Any:
        call = vision_static.precomputed(self, stock)
        grids = vision_static.grid_rows(grid_thw)
        if sum(t for t, _, _ in grids) <= units:
            return call(pixels, grid_thw=grid_thw, **kwargs)
        merge = int(self.spatial_merge_size) ** 2
        total = sum(t * h * w // merge for t, h, w in grids)
        out, first, row, at = None, None, 0, 0
        for t, h, w in grids:
            for t0 in range(0, t, units):
                tc = min(units, t - t0)
                n = tc * h * w
                chunk_grid = torch.tensor([[tc, h, w]], dtype=grid_thw.dtype)  # host: see vision_static
                res = call(pixels.narrow(0, row, n), grid_thw=chunk_grid, **kwargs)
                emb = res if isinstance(res, torch.Tensor) else res.pooler_output
                if out is None:
                    out, first = emb.new_empty((total, emb.shape[-1])), res
                out.narrow(0, at, emb.shape[0]).copy_(emb)
                row, at = row + n, at + emb.shape[0]
                del res, emb
        if isinstance(first, torch.Tensor):
            return out
        first.pooler_output = out
        first.last_hidden_state = None
        return first

    return forward


ROW_MODULES = ("mlp", "input_layernorm", "post_attention_layernorm")  # row-wise parts of a decoder layer


def takes_host_grid(visual: Any) -> bool:
    """Whether ``visual``'s forward is this module's wrapper (grid_thw best left on the host)."""
    return _MARK in getattr(visual, "__dict__", {})


def _qwen_vision(model: Any) -> torch.nn.Module | None:
    """The Qwen2-VL / Qwen2.5-VL tower (forward(pixels, grid_thw) over temporal grids), else None."""
    try:
        visual = vision_module(model)
    except AttributeError:
        return None
    return visual if hasattr(visual, "spatial_merge_size") else None


def _decoder_layers(model: Any) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    lm = language_model(model)
    return lm, list(lm.layers)


def install(model: Any, chunking: Chunking) -> Any:
    """Chunk the MLPs, RMSNorms and vision tower of ``model`` as ``chunking`` says; returns it."""
    if getattr(model, "_spava_chunking", None) == chunking:
        return model
    rows = int(chunking.mlp_tokens)
    lm, layers = _decoder_layers(model)
    for layer in layers:
        for name in ROW_MODULES:
            if getattr(layer, name, None) is not None:
                _wrap(getattr(layer, name), lambda stock: _rows_chunked(stock, rows))
    if getattr(lm, "norm", None) is not None:
        _wrap(lm.norm, lambda stock: _rows_chunked(stock, rows))
    visual = _qwen_vision(model)
    if visual is not None:  # other towers (InternVL3's) are not chunked here yet
        _wrap(visual, lambda stock: _vision_chunked(stock, int(chunking.vision_units)))
    model._spava_chunking = chunking
    return model


def uninstall(model: Any) -> Any:
    """The stock forwards again (the unchunked reference in tests)."""
    lm, layers = _decoder_layers(model)
    for layer in layers:
        for name in ROW_MODULES:
            if getattr(layer, name, None) is not None:
                _unwrap(getattr(layer, name))
    if getattr(lm, "norm", None) is not None:
        _unwrap(lm.norm)
    visual = _qwen_vision(model)
    if visual is not None:
        _unwrap(visual)
    model.__dict__.pop("_spava_chunking", None)
    return model
