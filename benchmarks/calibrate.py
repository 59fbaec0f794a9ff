"""Calibrate a topology's effective rates from measured per-rank, per-phase times.

The planner's cost model (planner/cost.py) charges every op max(FLOPs / rate, bytes / HBM) plus a
launch overhead; its per-rank phase times f (vision encoder, LLM prefill) are therefore, piece by
piece, linear and homogeneous of degree 1 in theta = (1/gemm_tflops, 1/attention_tflops,
1/hbm_gbps, launch_overhead_us):  f(theta) = sum_j share_j, share_j = theta_j * df/dtheta_j.
The shares come from the planner itself (finite differences of derive(), no formula copied here).
Fitting new rates is then a linear least-squares problem in the scale factors s_j (theta_j ->
s_j * theta_j): minimise sum_i ((sum_j s_j share_ij - measured_i) / measured_i)^2 with s >= 0
(relative errors, so short and long phases weigh alike), solved exactly by trying every subset
of free parameters (4 parameters: 15 subsets). Twice, since a changed rate can move an op across
its roofline ridge. Communication rates are not fitted: the emulated runs charge communication
from the plan's own topology, so these measurements carry no information about the links.

Rows: each emulated method's ranks (Triton kernels + the HF model's own layers). The dense
baselines run SDPA kernels the planner's single attention rate does not describe (FLASH ~330,
cuDNN ~560 TFLOP/s on an H200 against ~495 for the generated kernels); they are predicted with
the fitted rates and reported, not fitted.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Sequence

PARAMS = ("gemm_tflops", "attention_tflops", "hbm_gbps", "launch_overhead_us")
EPS = 1e-3  # relative step of the finite differences (far below any roofline ridge crossing)
ZERO_SCALE = 1e-3  # a fitted scale below this means the parameter explains nothing (see fit)


def with_rates(cfg: Any, rates: dict[str, float]) -> Any:
    return dataclasses.replace(cfg, topology=dataclasses.replace(cfg.topology, **rates))


def predicted_phases(cfg: Any) -> dict:
    """Per-rank predicted compute of each phase (us) and the makespan: vision = the rank's
    temporal grids x the cost of one (derive() charges the largest share to every rank), LLM =
    layers x (layer time - exposed communication)."""
    from spava_plan.planner.build import derive
    from spava_plan.planner.cost import CostModel
    from spava_plan.planner.vision import vision_unit

    d = derive(cfg, require_fit=False, detail=False)
    W = d.world
    unit = vision_unit(cfg.model, d.tokens.grid_thw)
    units = [unit.units // W + (1 if r < unit.units % W else 0) for r in range(W)]
    per_unit = CostModel(cfg.model, cfg.topology, cfg.dtype_bytes, W).vision_unit(unit).us
    layers = cfg.model.num_layers
    return {"vision_us": [n * per_unit for n in units],
            "lm_us": [layers * (t - e) for t, e in zip(d.timeline.layer_us, d.timeline.exposed_us)],
            "makespan_us": d.prediction.makespan_us}


def rates_of(cfg: Any) -> dict[str, float]:
    return {p: float(getattr(cfg.topology, p)) for p in PARAMS}


def _theta_scaled(rates: dict[str, float], param: str, factor: float) -> dict[str, float]:
    """Rates with theta_param multiplied by ``factor`` (rates are 1/theta except the launch cost)."""
    out = dict(rates)
    out[param] = rates[param] * factor if param == "launch_overhead_us" else rates[param] / factor
    return out


def shares(cfg: Any, rates: dict[str, float]) -> dict[str, list[list[float]]]:
    """phase -> per rank -> [share_j for j in PARAMS] at ``rates``."""
    base = predicted_phases(with_rates(cfg, rates))
    out = {ph: [[0.0] * len(PARAMS) for _ in base[ph]] for ph in ("vision_us", "lm_us")}
    for j, p in enumerate(PARAMS):
        bumped = predicted_phases(with_rates(cfg, _theta_scaled(rates, p, 1.0 + EPS)))
        for ph in out:
            for r, (a, b) in enumerate(zip(base[ph], bumped[ph])):
                out[ph][r][j] = (b - a) / EPS
    return out


def _lstsq(A: Sequence[Sequence[float]], y: Sequence[float]) -> list[float]:
    """Ordinary least squares (at most 4 unknowns)."""
    import numpy as np

    a, b = np.asarray(A, dtype=float), np.asarray(y, dtype=float)
    sol, *_ = np.linalg.lstsq(a, b, rcond=None)
    return [float(x) for x in sol]


def nnls(A: list[list[float]], y: list[float]) -> list[float]:
    """min ||A s - y|| with s >= 0, exactly, by trying every subset of free columns."""
    n = len(A[0])
    best, best_res = [0.0] * n, sum(v * v for v in y)
    for k in range(1, n + 1):
        for cols in itertools.combinations(range(n), k):
            if all(all(abs(A[i][c]) < 1e-12 for i in range(len(A))) for c in cols):
                continue
            sol = _lstsq([[row[c] for c in cols] for row in A], y)
            if any(v < 0 for v in sol):
                continue
            s = [0.0] * n
            for c, v in zip(cols, sol):
                s[c] = v
            res = sum((sum(a * x for a, x in zip(row, s)) - t) ** 2 for row, t in zip(A, y))
            if res < best_res - 1e-15:
                best, best_res = s, res
    return best


def fit(rows: list[tuple[Any, str, int, float]], base: dict[str, float], iterations: int = 2) -> dict:
    """rows: (cfg, phase, rank, measured_us). Returns the fitted rates and the fit's details.

    A parameter the non-negative fit drives to zero (its share does not help to explain the
    measurements) is not identified by these rows: it keeps its current rate and the others are
    refitted without it."""
    rates = dict(base)
    notes: list[str] = []
    history = []
    for _ in range(iterations):
        cache: dict[int, dict] = {}
        A, y = [], []
        for cfg, phase, rank, measured in rows:
            if id(cfg) not in cache:
                cache[id(cfg)] = shares(cfg, rates)
            A.append([v / measured for v in cache[id(cfg)][phase][rank]])  # relative residuals
            y.append(1.0)
        free = list(range(len(PARAMS)))
        scales = [1.0] * len(PARAMS)
        while free:
            target = [t - sum(row[j] for j in range(len(PARAMS)) if j not in free) for row, t in zip(A, y)]
            s = nnls([[row[j] for j in free] for row in A], target)
            zero = [j for j, v in zip(free, s) if v < ZERO_SCALE]
            if not zero:
                for j, v in zip(free, s):
                    scales[j] = v
                break
            for j in zero:
                notes.append(f"{PARAMS[j]}: not identified by these rows (the fit drives it to zero); kept at "
                             f"{rates[PARAMS[j]]:.4g}")
                free.remove(j)
        for p, scale in zip(PARAMS, scales):
            rates = _theta_scaled(rates, p, scale)
        history.append({"scales": dict(zip(PARAMS, scales)), "rates": dict(rates)})
    return {"rates": rates, "history": history, "notes": list(dict.fromkeys(notes)), "rows": len(rows)}


def relative_error(predicted: float, measured: float) -> float:
    return (predicted - measured) / measured if measured > 0 else math.nan
