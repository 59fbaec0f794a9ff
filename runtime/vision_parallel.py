"""Frame-parallel vision encoder (SPAVA_SPEC.md section 2).

The Qwen2-VL / Qwen2.5-VL ViT never attends across temporal grids (its attention is cut at every
grid by ``cu_seqlens``; Qwen2.5-VL's windows also stay inside one grid), so rank r encodes a
contiguous range of temporal grids with the model's own ``visual`` module, and one all-gather gives
every rank all visual embeddings. The result equals the single-process encoder up to the
floating-point effect of batching fewer rows (tests/test_model_vision.py bounds it).

Ranks' ranges differ by at most one grid; the all-gather moves equal-size buffers padded to the
longest range (the padding rows are dropped after the gather).
"""
from __future__ import annotations

from typing import Any

import torch

from spava_plan.errors import InputError

from .comm import Communicator


def grid_ranges(grids: int, world: int) -> list[tuple[int, int]]:
    """Rank r encodes temporal grids [start, stop): grids // W each, one more for the first grids % W."""
    base, extra = divmod(grids, world)
    out, pos = [], 0
    for r in range(world):
        n = base + (1 if r < extra else 0)
        out.append((pos, pos + n))
        pos += n
    return out


def check_grids(grids: int, world: int, temporal_patch: int) -> None:
    """Every rank encodes at least one temporal grid: a shorter video is a user error."""
    if grids < world:
        raise InputError(f"the video gives {grids} temporal grids ({grids * temporal_patch} frames) but "
                         f"{world} ranks each encode at least one; use frames>={world * temporal_patch} "
                         f"or fewer ranks", setting="frames")


def visual_embeddings(visual: torch.nn.Module, pixels: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """The model's ViT + merger on one video: (t*h*w/merge^2, hidden). Works whether ``visual``
    returns a tensor (older transformers) or an output with ``pooler_output`` (5.x)."""
    param = next(visual.parameters())
    out = visual(pixels.to(device=param.device, dtype=param.dtype), grid_thw=grid_thw.to(param.device))
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:  # pragma: no cover - a transformers version we have not seen
        raise TypeError(f"unexpected output {type(out).__name__} from the vision encoder")
    return pooled if isinstance(pooled, torch.Tensor) else torch.cat(list(pooled))


def encode_video_parallel(visual: torch.nn.Module, pixels: torch.Tensor, grid_thw: torch.Tensor,
                          comm: Communicator, merge: int, temporal_patch: int = 2) -> torch.Tensor:
    """Every rank returns the embeddings of ALL video tokens (t*h*w/merge^2, hidden). ``pixels`` may
    stay on the host: only this rank's grids are moved to the encoder's device."""
    t, h, w = (int(x) for x in grid_thw[0])
    W = comm.world_size
    check_grids(t, W, temporal_patch)
    patches_per_grid = h * w
    tokens_per_grid = patches_per_grid // (merge * merge)
    start, stop = grid_ranges(t, W)[comm.rank]
    mine = pixels[start * patches_per_grid: stop * patches_per_grid]
    grid = torch.tensor([[stop - start, h, w]], dtype=grid_thw.dtype, device=grid_thw.device)
    emb = visual_embeddings(visual, mine, grid)
    if W == 1:
        return emb
    longest = -(-t // W) * tokens_per_grid
    buf = emb.new_zeros((longest, emb.shape[1]))
    buf[: emb.shape[0]] = emb
    gathered = comm.all_gather(buf, tag="vision")  # (W, longest, hidden)
    parts = [gathered[r, : (b - a) * tokens_per_grid] for r, (a, b) in enumerate(grid_ranges(t, W))]
    return torch.cat(parts)


def encode_video(visual: torch.nn.Module, pixels: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """The single-process encoder (the reference the parallel one is tested against)."""
    return visual_embeddings(visual, pixels, grid_thw)


def vision_module(model: Any) -> torch.nn.Module:
    """The ViT of a Qwen2-VL / Qwen2.5-VL model (``model.model.visual`` in transformers 5, ``model.visual``
    in older releases)."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "visual"):
        return inner.visual
    return model.visual
