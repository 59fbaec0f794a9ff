"""Tune every attention launch of a plan before a run, one rank at a time, on the plan's own shapes.

The triton backend tunes a launch on its first call (runtime/backends/triton_gen.py). In a real run
each rank is a process with its own GPU, so that is clean. Emulated ranks are threads sharing one
GPU: a launch tuned there is timed while the other ranks' kernels run on the same device, and the
choice (tile sizes, or cuDNN per segment) follows the noise. So before an emulated run on a GPU,
each rank's schedule launches run here once, alone, on random inputs laid out as the runtime lays
them out (runtime/rank_inputs.py). Each launch is tuned at its first call and recorded in
autotune.json; the run then finds it there.
"""
from __future__ import annotations

import math

import torch

from spava_plan.plan import Plan, attended_in_step

from .backends.base import TaskInput
from .dtypes import TORCH_DTYPES
from .rank_inputs import random_rank_inputs


def _step_view(task: TaskInput, refs, rank: int, world: int, step: int) -> TaskInput | None:
    """The part of a task one ring step attends, as RankAttention._segments picks it
    (spava_plan.plan.attended_in_step); None where it attends nothing in that step."""
    if step < 0:
        return task
    segs = tuple(s for s, r in zip(task.segments, refs) if attended_in_step(r.kind, r.owner, rank, world, step))
    return TaskInput(task.name, task.q, segs) if segs else None


def tune_plan_launches(plan: Plan, backend, device: torch.device | str, seed: int = 0) -> int:
    """Run each rank's "attend" launches once through ``backend`` (tuning the ones not tuned yet);
    returns how many launches ran. Ranks go one after another, so only one rank's inputs are in
    memory at a time."""
    dtype = TORCH_DTYPES[plan.dtype]
    scale = 1.0 / math.sqrt(plan.model.head_dim)
    gen = torch.Generator(device=device).manual_seed(seed)
    launches = 0
    for rank in range(plan.world_size):
        tasks = random_rank_inputs(plan, rank, dtype, device, gen).tasks
        refs = {t.name: t.kv for t in plan.ranks[rank].tasks}
        for op in plan.schedule[rank].ops:
            if op.name != "attend":
                continue
            views = [_step_view(tasks[n], refs[n], rank, plan.world_size, op.step) for n in op.tasks]
            views = [v for v in views if v is not None]
            if views:
                backend.attention(views, scale)
                launches += 1
        del tasks
    return launches
