"""Frame-parallel vision encoder (SPAVA_SPEC.md section 2) with a targeted exchange.

The Qwen2-VL / Qwen2.5-VL ViT never attends across temporal grids (its attention is cut at every
grid by ``cu_seqlens``; Qwen2.5-VL's windows also stay inside one grid), so rank r encodes a
contiguous range of temporal grids with the model's own ``visual`` module. Instead of all-gathering
every embedding to every rank, each rank then receives only the video tokens of its own local
sequence, in local order (spava_plan/vision_exchange.py: broadcasts of the rows every rank holds,
one uneven all_to_all_single for the rest; every size fixed by the plan). The exchange only copies
rows, so each rank's rows are the single-process encoder's at its tokens up to the floating-point
effect of batching fewer grids per call, which is none in fp64 on CPU (tests/test_model_vision.py
compares bit for bit).

InternVL3: InternViT encodes each frame's tile alone (one image per batch row), so rank r encodes
a contiguous range of frames with the model's own ``get_image_features`` (ViT, drop the class
token, pixel shuffle, MLP projector); ``pixels`` then hold one (3, tile, tile) image per frame.
"""
from __future__ import annotations

import torch

from spava_plan.errors import InputError, PlanMismatchError
from spava_plan.vision_exchange import VisionExchange, vision_encoders

from .chunking import takes_host_grid
from ..comm import Communicator


def check_grids(grids: int, world: int, temporal_patch: int, parallel: str = "frames") -> None:
    """Every encoding rank (every rank; vision.parallel=one_gpu: rank 0) encodes at least one
    temporal grid: a shorter video is a user error."""
    if grids < vision_encoders(world, parallel):
        raise InputError(f"the video gives {grids} temporal grids ({grids * temporal_patch} frames) but "
                         f"{world} ranks each encode at least one; use frames>={world * temporal_patch} "
                         f"or fewer ranks", setting="frames")


def to_device(pixels: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Host pixels on the encoder's device in its dtype: copied as they are, then cast there.

    ``pixels.to(device=cuda, dtype=bf16)`` in one call casts on the HOST first (torch converts on
    the source side of a blocking host-to-device copy), into a new pageable buffer that the copy
    then stages, throwing away the page-locking of pinned pixels: 34-48 ms for one rank's 349 MB
    at 64 frames 1440p on an H200. Copied first (an asynchronous DMA when the pixels are pinned)
    and cast on the GPU: 6.5 ms (benchmarks/profile_rank.py)."""
    if pixels.device == device:
        return pixels.to(dtype)
    return pixels.to(device, non_blocking=pixels.is_pinned()).to(dtype)


def visual_embeddings(visual: torch.nn.Module, pixels: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """The model's ViT + merger on one video: (t*h*w/merge^2, hidden). Works whether ``visual``
    returns a tensor (older transformers) or an output with ``pooler_output`` (5.x)."""
    param = next(visual.parameters())
    grid = grid_thw.cpu() if takes_host_grid(visual) else grid_thw.to(param.device)  # see runtime/vision_static
    out = visual(to_device(pixels, param.device, param.dtype), grid_thw=grid)
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:  # pragma: no cover - a transformers version we have not seen
        raise TypeError(f"unexpected output {type(out).__name__} from the vision encoder")
    return pooled if isinstance(pooled, torch.Tensor) else torch.cat(list(pooled))


def encode_video_parallel(visual: torch.nn.Module, pixels: torch.Tensor, grid_thw: torch.Tensor,
                          comm: Communicator, exchange: VisionExchange, merge: int,
                          temporal_patch: int = 2, hidden: int | None = None,
                          pixel_grids: tuple[int, int] | None = None) -> torch.Tensor:
    """This rank's local video embeddings: (local video tokens, hidden), rows in local order.
    ``pixels`` may stay on the host: only this rank's grids are moved to the encoder's device.
    A rank the exchange gives no grids (vision.parallel=one_gpu: every rank but 0) runs no
    encoder and only receives; it needs ``hidden``, the embeddings' width (the LLM's hidden size).
    ``pixel_grids``: the temporal grids [g0, g1) that ``pixels`` holds (None: all of them)."""
    t, h, w = (int(x) for x in grid_thw[0])
    W, rank, ex = comm.world_size, comm.rank, exchange
    check_grids(t, sum(1 for a, b in ex.grids if b > a), temporal_patch)
    if ex.world != W:
        raise PlanMismatchError(f"the vision exchange is planned for {ex.world} ranks but {W} run it; re-plan with "
                                f"gpus={W}", setting="gpus")
    if (t, h * w // (merge * merge)) != (ex.grids[-1][1], ex.tokens_per_grid):
        raise PlanMismatchError(f"the video gives {t} temporal grids of {h * w // (merge * merge)} tokens but the "
                                f"plan has {ex.grids[-1][1]} of {ex.tokens_per_grid}; re-plan for this video",
                                setting="video.resolution")
    start, stop = ex.grids[rank]
    if start < stop:
        g0, g1 = pixel_grids or (0, t)
        if not g0 <= start < stop <= g1:
            raise PlanMismatchError(f"rank {rank} encodes temporal grids [{start}, {stop}) but its pixels hold grids "
                                    f"[{g0}, {g1}) only", setting="gpus")
        rows = pixels.shape[0] // (g1 - g0)  # pixel rows per grid: its patches (Qwen) or its one tile (InternVL)
        grid = torch.tensor([[stop - start, h, w]], dtype=grid_thw.dtype, device=grid_thw.device)
        emb = visual_embeddings(visual, pixels[(start - g0) * rows: (stop - g0) * rows], grid)
    else:  # nothing to encode: an empty block of rows in the encoder's dtype, on its device
        assert hidden is not None, "a rank without grids needs the embeddings' width (hidden=)"
        param = next(visual.parameters())
        emb = torch.empty((0, hidden), dtype=param.dtype, device=param.device)
    if ex.identity(rank):
        return emb
    first = ex.span(rank)[0]
    out = emb.new_empty((ex.local_rows(rank), emb.shape[1]))
    for src, a, b in ex.shared:  # rows every rank holds: straight into each rank's local rows
        view = out.narrow(0, ex.local_offset(rank, a), b - a)
        if src == rank:
            view.copy_(emb[a - first: b - first])
        comm.broadcast(view, src, tag="vision")
    mine = [emb[a - first: b - first] for _, a, b in ex.sends[rank]]
    send = torch.cat(mine) if mine else emb.new_empty((0, emb.shape[1]))
    del emb, mine  # the shared rows are in ``out`` and the rows this rank sends in ``send``
    got, n = ex.recvs[rank], ex.recv_rows(rank)
    if ex.in_place(rank):
        at = ex.local_offset(rank, got[0][1]) if got else 0
        comm.all_to_all_single(out[at: at + n], send, ex.recv_splits(rank), ex.send_splits(rank), tag="vision")
        return out
    staged = out.new_empty((n, out.shape[1]))
    comm.all_to_all_single(staged, send, ex.recv_splits(rank), ex.send_splits(rank), tag="vision")
    rows = [torch.arange(o, o + b - a, device=out.device) for _, a, b in got for o in (ex.local_offset(rank, a),)]
    out.index_copy_(0, torch.cat(rows), staged)
    return out


def encode_video(visual: torch.nn.Module, pixels: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """The single-process encoder (the reference the parallel one is tested against)."""
    return visual_embeddings(visual, pixels, grid_thw)
