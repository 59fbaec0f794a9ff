"""Plan every method on the same video and model, so the report compares identical work.

Dense runs on one GPU, every other method (dense_tp included) on the configured W; all go through planner/build.py
with the same cost model. Baselines are planned with ``require_fit=False`` (a baseline that does
not fit the device is reported as such, with its predicted time for a device that had room) and
without per-op detail (only their totals are reported).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from spava_plan.compared_rows import COMPARED, ONE_GPU_RING, row_name, row_setting  # noqa: F401 - the rows' names
from spava_plan.config import SpavaConfig
from spava_plan.errors import SpavaError

from .build import Derived, derive
from .cost import KERNELS
from .dense_tp import layer_cost_model


@dataclass(frozen=True)
class MethodRow:
    method: str
    gpus: int = 0
    prefill_us: float = 0.0  # predicted prefill makespan (vision encoder included)
    rank_us_min: float = 0.0  # fastest / slowest rank's predicted prefill
    rank_us_max: float = 0.0
    exposed_comm_us: float = 0.0
    peak_bytes: int = 0  # busiest rank's peak memory
    fits: bool = False  # every rank fits the device
    gap: float = 0.0  # placement solver's gap (makespan / lower bound - 1)
    speedup_vs_dense: float | None = None
    speedup_vs_ring: float | None = None
    planned: bool = False  # the method the user asked for
    error: str = ""  # why the method could not be planned at all (then the numbers are unset)
    phases: dict = field(default_factory=dict)  # critical rank's predicted time by phase (us), see phases()


PHASES = ("vision encoder", "attention", "per-token layers", "exposed communication")


def phases(d: Derived) -> dict[str, float]:
    """The critical rank's predicted prefill split into phases (us): the vision encoder (its
    embedding exchange counted as communication), the per-token work of the layers (norms, q/k/v,
    o_proj, MLP), attention (with selection and merging) and the communication the schedule
    cannot hide. Same cost model as the prediction; the four add up to the makespan."""
    p = d.prediction
    r = max(range(d.world), key=lambda i: p.rank_us[i])
    cfg = d.cfg
    cost = layer_cost_model(cfg, d.world)  # dense_tp: the rank's shard of the model
    n = d.ranks[r].local_tokens
    layers = cfg.model.num_layers
    per_token = layers * (cost.qkv(n).us + cost.out_mlp(n).us
                          + (KERNELS["qkv"] + KERNELS["out_mlp"]) * cost.launch_us)
    exposed = p.exposed_comm_us
    vision = p.vision_us
    attention = max(0.0, p.rank_us[r] - vision - per_token - layers * d.timeline.exposed_us[r])
    return {"vision encoder": vision - (exposed - layers * d.timeline.exposed_us[r]), "attention": attention,
            "per-token layers": per_token, "exposed communication": exposed}


def _row(d: Derived, planned: bool) -> MethodRow:
    p = d.prediction
    return MethodRow(method=row_name(d.cfg), gpus=d.world, prefill_us=p.makespan_us, rank_us_min=min(p.rank_us),
                     rank_us_max=max(p.rank_us), exposed_comm_us=p.exposed_comm_us,
                     peak_bytes=max(p.peak_memory_bytes), fits=d.fits, gap=d.placement.gap, planned=planned,
                     phases=phases(d))


def compare(main: Derived, configs: Mapping[str, SpavaConfig],
            known: Mapping[str, Derived] | None = None) -> list[MethodRow]:
    """Rows for the planned method (``main``) and every method in ``configs`` (COMPARED order),
    with speedups against dense and zigzag_ring where those could be planned. ``known`` maps
    repr(config) to derivations already made (by `tune`) so they are not planned twice."""
    mine = row_name(main.cfg)
    rows: dict[str, MethodRow] = {mine: _row(main, True)}
    for name in COMPARED:
        if name in rows or name not in configs:
            continue
        try:
            d = (known or {}).get(repr(configs[name]))
            rows[name] = _row(d if d is not None else derive(configs[name], require_fit=False, detail=False), False)
        except SpavaError as exc:
            rows[name] = MethodRow(method=name, error=str(exc))
    dense, ring = rows.get("dense"), rows.get("zigzag_ring")
    out = []
    for name in COMPARED if mine in COMPARED else (mine, *COMPARED):
        if name not in rows:
            continue
        row = rows[name]
        if not row.error:
            row = MethodRow(**{**row.__dict__,
                               "speedup_vs_dense": _ratio(dense, row), "speedup_vs_ring": _ratio(ring, row)})
        out.append(row)
    return out


def _ratio(base: MethodRow | None, row: MethodRow) -> float | None:
    if base is None or base.error or row.prefill_us <= 0:
        return None
    return base.prefill_us / row.prefill_us
