"""Boundary checks of the attention runtime: the plan against the launched world, and input
tensors against the plan. Each failure is one SpavaError line naming what differs and the values
seen, so every rank can report it (and the peers can quote it) instead of hanging.
"""
from __future__ import annotations

import torch

from spava_plan.errors import InputError, PlanMismatchError
from spava_plan.plan import Plan

from .dtypes import TORCH_DTYPES

# Wider float types than the plan's are accepted: reference and fidelity runs use fp32/fp64.
_WIDER = (torch.float32, torch.float64)


def check_world(plan: Plan, rank: int, world_size: int) -> None:
    plan.check_world(world_size)
    if not 0 <= rank < plan.world_size:
        raise PlanMismatchError(f"rank {rank} is outside the plan's {plan.world_size} ranks", setting="gpus")


def allowed_dtypes(plan: Plan) -> tuple[torch.dtype, ...]:
    mine = TORCH_DTYPES[plan.dtype]
    return (mine,) + tuple(d for d in _WIDER if d != mine)


def check_layer(plan: Plan, layer: int) -> None:
    if not isinstance(layer, int) or not 0 <= layer < plan.model.num_layers:
        raise InputError(f"layer {layer!r} is outside the plan's model {plan.model.name!r} "
                         f"({plan.model.num_layers} layers)", setting="layer")


def check_qkv(plan: Plan, rank: int, rows: int, q: object, k: object, v: object, what: str) -> None:
    """q (rows, Hq, D), k/v (rows, Hkv, D), one float dtype the plan allows, one device."""
    m = plan.model
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"rank {rank} {what}: {name} must be a torch.Tensor, got {type(t).__name__}",
                             setting=name)
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
    for name, t, heads in (("q", q, m.num_heads), ("k", k, m.num_kv_heads), ("v", v, m.num_kv_heads)):
        if t.dim() != 3:
            raise InputError(f"rank {rank} {what}: {name} must be (tokens, heads, head_dim), got shape "
                             f"{tuple(t.shape)}", setting=name)
        if t.shape[1] != heads or t.shape[2] != m.head_dim:
            raise PlanMismatchError(
                f"rank {rank} {what}: {name} has {t.shape[1]} heads of dim {t.shape[2]} but the plan was made for "
                f"model {m.name!r} ({heads} heads of dim {m.head_dim}); re-plan with the matching model=",
                setting="model")
        if t.shape[0] != rows:
            raise InputError(f"rank {rank} {what}: {name} has {t.shape[0]} tokens but the plan gives this rank "
                             f"{rows}", setting=name)
    dtypes = {q.dtype, k.dtype, v.dtype}
    if len(dtypes) > 1:
        raise InputError(f"rank {rank} {what}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})",
                         setting="dtype")
    if q.dtype not in allowed_dtypes(plan):
        names = ", ".join(str(d).replace("torch.", "") for d in allowed_dtypes(plan))
        raise InputError(f"rank {rank} {what}: dtype {str(q.dtype).replace('torch.', '')} does not match the "
                         f"plan's dtype={plan.dtype} (accepted: {names})", setting="dtype")
    devices = {q.device, k.device, v.device}
    if len(devices) > 1:
        raise InputError(f"rank {rank} {what}: q, k, v are on different devices {sorted(map(str, devices))}",
                         setting="device")
