"""Single-rank mode: rank r of a W-rank plan, alone on one device, with its real work and memory.

``SoloComm(rank, world)`` is a communicator with no peers. Every operation fills what this rank
would RECEIVE with random values of the right shape and dtype, and keeps what it contributes
itself (its own slot of an all-gather, its own split of an all-to-all, a broadcast it sources):
passing blocks, query partials (out, lse), visual-embedding rows, decode partials and ring K/V all
arrive as random tensors in the buffers the runtime allocated for them. So the rank runs exactly
its plan's compute on buffers of exactly the real sizes: its time is the rank's compute time
(no communication waits; the fills are HBM-bound and take microseconds) and its peak memory is
the real rank's (NCCL's own workspace, outside torch's allocator, excepted). Its output tokens
are meaningless; every output of this mode says "single-rank".

Integer tensors (the broadcast token id) receive 0, a valid id in every vocabulary. Control data
(``all_gather_object``) are answered as if every peer agreed with this rank.

``solo_inputs`` builds the model inputs of a random-weight run without the processor: random text
ids around the video, and pixels only for the temporal grids this rank encodes (the rest of the
pixel tensor holds only those grids: ``ModelInputs.pixel_grids``, so a 32768-frame video costs no host memory).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from spava_plan.plan import Plan
from spava_plan.vision_exchange import plan_vision_exchange

from .comm import Communicator, DoneHandle, Handle
from .hf.inputs import ModelInputs, _inputs


def _fill(t: torch.Tensor) -> None:
    """Random contents for data that would come from a peer."""
    if t.numel() == 0:
        return
    if t.is_floating_point():
        t.normal_()
    else:
        t.zero_()


class SoloComm(Communicator):
    """One rank of ``world_size`` with random data in place of every peer's."""

    emulated = True

    def __init__(self, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        self.rank, self.world_size = rank, world_size
        self.label = f"single-rank (rank {rank} of {world_size} alone; its peers' data are random)"

    def all_gather_into_tensor(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False,
                               tag: str = "") -> Handle | None:
        n = inp.shape[0]
        _fill(out)
        out.narrow(0, self.rank * n, n).copy_(inp)
        return DoneHandle() if async_op else None

    def all_to_all_single(self, out: torch.Tensor, inp: torch.Tensor, out_splits: Sequence[int],
                          in_splits: Sequence[int], tag: str = "") -> None:
        _fill(out)
        mine = int(in_splits[self.rank])
        if mine:  # what this rank sends itself lands in its own slot
            out.narrow(0, sum(int(s) for s in out_splits[:self.rank]), mine).copy_(
                inp.narrow(0, sum(int(s) for s in in_splits[:self.rank]), mine))

    def all_reduce(self, t: torch.Tensor, tag: str = "reduce") -> None:
        """The peers' sum arrives as one random tensor (this rank's own share is kept)."""
        peers = torch.empty_like(t)
        _fill(peers)
        t.add_(peers)

    def broadcast(self, t: torch.Tensor, src: int, tag: str = "", async_op: bool = False) -> Handle | None:
        if src != self.rank:
            _fill(t)
        return DoneHandle() if async_op else None

    def exchange(self, send: torch.Tensor, dst: int, recv: torch.Tensor, src: int, tag: str = "") -> Handle:
        if src == self.rank:
            recv.copy_(send)
        else:
            _fill(recv)
        return DoneHandle()

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj] * self.world_size

    def barrier(self) -> None:
        return None

    def close(self) -> None:
        return None

    def _send(self, t: torch.Tensor, dst: int, tag: str) -> None:
        return None

    def _recv(self, t: torch.Tensor, src: int, tag: str) -> None:
        _fill(t)


def solo_inputs(plan: Plan, hf_config: Any, rank: int, seed: int = 0) -> ModelInputs:
    """Random-weight inputs in the plan's exact layout for rank ``rank``: random text ids (below the
    special ids) around one contiguous video, and random pixels in this rank's temporal grids only.
    The ids and grid are the plan's, so ``check_against_plan`` holds."""
    merge, tp = plan.video.spatial_merge, plan.video.temporal_patch
    patch = int(hf_config.vision_config.patch_size)  # pixel rows must fit the loaded tower
    t, rows, cols = plan.layout.grid_thw
    grid = torch.tensor([[t, rows * merge, cols * merge]], dtype=torch.long)
    lay = plan.layout
    video_start = plan.video.system_tokens  # [system ids | vision_start] then the video, as synthetic_inputs
    gen = torch.Generator().manual_seed(seed)
    specials = [int(getattr(hf_config, k)) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                     "vision_end_token_id")]
    text_hi = min(int(hf_config.text_config.vocab_size), min(specials))
    vid = int(hf_config.video_token_id)
    ids = torch.randint(0, text_hi, (lay.total_tokens,), generator=gen)
    ids[video_start - 1] = int(hf_config.vision_start_token_id)
    ids[video_start: video_start + lay.video_tokens] = vid
    ids[video_start + lay.video_tokens] = int(hf_config.vision_end_token_id)
    per_grid = rows * merge * cols * merge
    # Only this rank's grids (the only ones it reads): the whole video's pixels would be 92 GB of host
    # memory at 8192 frames of 720p, and 369 GB at 32768. dense_tp: every rank encodes every grid
    # (with its shard of the tower).
    g0, g1 = (0, t) if plan.method == "dense_tp" else plan_vision_exchange(plan).grids[rank]
    pixels = torch.empty(((g1 - g0) * per_grid, 3 * tp * patch * patch), dtype=torch.float32)
    pixels.uniform_(-1.8, 2.1, generator=gen)  # the processor's normalised range
    inputs = _inputs(ids.unsqueeze(0), pixels, grid, vid, family=plan.model.family, fps=plan.video.fps,
                     temporal_patch=tp, merge=merge, patch=patch)
    return dataclasses.replace(inputs, pixel_grids=(g0, g1))
