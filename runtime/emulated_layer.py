"""Time one attention layer of a plan as an emulated W-rank run on one device.

    timing = time_attention_layer(plan, TritonBackend(...), device="cuda")
    print(timing.label, timing.makespan_us)

Each rank's prefill of one layer (selection, attention, merge) is replayed alone on the device
(CUDA events on GPU), and the communication the schedule cannot hide is charged from the plan's
predicted collective times: the DESIGN.md "emulated W-rank" number, never a multi-GPU
measurement. Inputs are fresh random tensors (never zeros), one set per rank, made once.
"""
from __future__ import annotations

from typing import Any

import torch

from spava_plan.plan import Plan

from .attention import RankAttention
from .comm.emulated import EmulatedTiming, EmulatedWorld
from .reference import local_rows


def time_attention_layer(plan: Plan, backend: Any = None, *, device: str | torch.device = "cuda",
                         dtype: torch.dtype = torch.bfloat16, warmup: int = 2, repeats: int = 5,
                         seed: int = 0) -> EmulatedTiming:
    m = plan.model
    n = plan.layout.total_tokens
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(n, h, m.head_dim, generator=gen, device=device, dtype=dtype)
               for h in (m.num_heads, m.num_kv_heads, m.num_kv_heads))
    per_rank = [local_rows(plan, r, q, k, v) for r in range(plan.world_size)]
    del q, k, v
    world = EmulatedWorld.for_plan(plan)
    attns = [RankAttention(plan, r, world.comm(r), backend) for r in range(plan.world_size)]
    return world.time(lambda r: attns[r].prefill(0, *per_rank[r]), warmup=warmup, repeats=repeats, device=device)
