"""Plan every method on the same video and model, so the report compares identical work.

Dense runs on one GPU, every other method on the configured W; all go through planner/build.py
with the same cost model. Baselines are planned with ``require_fit=False`` (a baseline that does
not fit the device is reported as such, with its predicted time for a device that had room) and
without per-op detail (only their totals are reported).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from spava_plan.config import SpavaConfig
from spava_plan.errors import SpavaError

from .build import Derived, derive

COMPARED = ("spava", "zigzag_ring", "apb", "star", "dense")


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


def _row(d: Derived, planned: bool) -> MethodRow:
    p = d.prediction
    return MethodRow(method=d.part.method, gpus=d.world, prefill_us=p.makespan_us, rank_us_min=min(p.rank_us),
                     rank_us_max=max(p.rank_us), exposed_comm_us=p.exposed_comm_us,
                     peak_bytes=max(p.peak_memory_bytes), fits=d.fits, gap=d.placement.gap, planned=planned)


def compare(main: Derived, configs: Mapping[str, SpavaConfig]) -> list[MethodRow]:
    """Rows for the planned method (``main``) and every method in ``configs`` (COMPARED order),
    with speedups against dense and zigzag_ring where those could be planned."""
    rows: dict[str, MethodRow] = {main.part.method: _row(main, True)}
    for name in COMPARED:
        if name in rows or name not in configs:
            continue
        try:
            rows[name] = _row(derive(configs[name], require_fit=False, detail=False), False)
        except SpavaError as exc:
            rows[name] = MethodRow(method=name, error=str(exc))
    dense, ring = rows.get("dense"), rows.get("zigzag_ring")
    out = []
    for name in COMPARED:
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
