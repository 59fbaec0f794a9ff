"""Calibrate a topology's effective rates from measured per-rank, per-phase times.

The planner's cost model (planner/cost.py) charges every op max(FLOPs / rate, bytes / HBM) plus a
launch overhead; its per-rank phase times f (vision encoder, LLM prefill) are therefore, piece by
piece, linear and homogeneous of degree 1 in theta = (1/gemm_tflops, 1/attention_tflops,
1/hbm_gbps, launch_overhead_us):  f(theta) = sum_j share_j, share_j = theta_j * df/dtheta_j.
The shares come from the planner itself (finite differences of derive(), no formula copied here).
Fitting new rates is then a linear least-squares problem in the scale factors s_j (theta_j ->
s_j * theta_j): minimise sum_i ((sum_j s_j share_ij - measured_i) / rank_total_i)^2 (errors
relative to the rank's whole time: each phase weighs as it does in the time to first token;
relative to the phase itself, overhead-bound small phases would dominate) with every rate at or
below its physical ceiling
(see ceilings()), solved exactly by trying every subset of free parameters (4 parameters: 15
subsets). Three rounds, since a changed rate can move an op across its roofline ridge. Communication rates are not fitted: the emulated runs charge communication
from the plan's own topology, so these measurements carry no information about the links.

Rows: each emulated method's ranks, three phases each: the vision encoder, the attention (the
kernel backend's calls, timed with CUDA events: attention, selection, merge) and the rest of the
LLM prefill (the HF model's projections, norms, MLP, embeddings). The dense
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
PHASES = ("vision_us", "attention_us", "rest_us")  # the fitted rows: each measured per rank
ATTENTION_OPS = ("attend", "select", "merge")  # the schedule's ops the runtime's kernel backend runs
EPS = 1e-3  # relative step of the finite differences (far below any roofline ridge crossing)


def with_rates(cfg: Any, rates: dict[str, float]) -> Any:
    return dataclasses.replace(cfg, topology=dataclasses.replace(cfg.topology, **rates))


def predicted_phases(cfg: Any) -> dict:
    """Per-rank predicted compute of each phase (us) and the makespan: vision = the rank's
    temporal grids x the cost of one (derive() charges the largest share to every rank); the LLM
    prefill split into attention (the schedule's attend / select / merge ops) and the rest (qkv,
    out_mlp: projections, norms, MLP), each x layers; lm = their sum (exposed communication
    excluded: the measured phases are compute only)."""
    from spava_plan.planner import dense_tp
    from spava_plan.planner.build import derive
    from spava_plan.planner.cost import CostModel
    from spava_plan.planner.vision import vision_unit

    d = derive(cfg, require_fit=False, detail=True)
    W = d.world
    unit = vision_unit(cfg.model, d.tokens.grid_thw)
    units = [unit.units // W + (1 if r < unit.units % W else 0) for r in range(W)]
    per_unit = CostModel(cfg.model, cfg.topology, cfg.dtype_bytes, W).vision_unit(unit).us
    if dense_tp.is_tp(cfg.method.name):  # every unit on every rank with its shard (its all-reduces are comm)
        total, reduce = dense_tp.vision_us(cfg, dense_tp.layer_cost_model(cfg, W), unit)
        units, per_unit = [1] * W, total - reduce
    layers = cfg.model.num_layers
    attention, rest = [], []
    for steps, timings in zip(d.steps, d.timeline.timings):
        a = sum(t[1] - t[0] for st, t in zip(steps, timings) if st.kind == "compute" and st.name in ATTENTION_OPS)
        b = sum(t[1] - t[0] for st, t in zip(steps, timings) if st.kind == "compute" and st.name not in ATTENTION_OPS)
        attention.append(layers * a)
        rest.append(layers * b)
    return {"vision_us": [n * per_unit for n in units], "attention_us": attention, "rest_us": rest,
            "lm_us": [a + b for a, b in zip(attention, rest)], "makespan_us": d.prediction.makespan_us,
            "exposed_comm_us": d.prediction.exposed_comm_us}


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
    out = {ph: [[0.0] * len(PARAMS) for _ in base[ph]] for ph in PHASES + ("lm_us",)}
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


def ceilings(topology: Any) -> dict[str, float]:
    """Physical upper bounds of the fitted rates: the datasheet bf16 peak for both matrix rates and
    the preset's measured copy bandwidth for memory (an effective rate can be lower, never higher)."""
    return {"gemm_tflops": float(topology.peak_tflops), "attention_tflops": float(topology.peak_tflops),
            "hbm_gbps": float(topology.hbm_gbps)}


def fit(rows: list[tuple[Any, str, int, float, float]], base: dict[str, float], ceiling: dict[str, float],
        iterations: int = 3) -> dict:
    """rows: (cfg, phase, rank, measured_us, norm_us). Bounded least squares on the residuals
    relative to ``norm_us`` (the rank's whole measured time: every rank of every cell weighs
    alike, and within a rank each phase by its size, as it weighs in the time to first token):
    every rate stays at or below its ``ceiling`` (theta_j >= 1 / ceiling_j, i.e. scale s_j >= a
    lower bound; s = lb + t with t >= 0 makes it a non-negative problem), launch overhead >= 0.
    A rate that ends at its ceiling is reported: the rows would have liked it faster, which
    means the cost model charges that work elsewhere (e.g. GEMMs as memory traffic)."""
    rates = dict(base)
    history = []
    for _ in range(iterations):
        cache: dict[int, dict] = {}
        A, y = [], []
        for cfg, phase, rank, measured, norm in rows:
            if id(cfg) not in cache:
                cache[id(cfg)] = shares(cfg, rates)
            A.append([v / norm for v in cache[id(cfg)][phase][rank]])
            y.append(measured / norm)
        # scale s_j moves theta_j -> s_j theta_j; rate <= ceiling <=> s_j >= rate / ceiling
        lb = [rates[p] / ceiling[p] if p in ceiling else 0.0 for p in PARAMS]
        target = [t - sum(a * b for a, b in zip(row, lb)) for row, t in zip(A, y)]
        t = nnls(A, target)
        scales = [b + x for b, x in zip(lb, t)]
        for p, scale in zip(PARAMS, scales):
            rates = _theta_scaled(rates, p, scale) if scale > 0 else {**rates, p: 0.0}
        history.append({"scales": dict(zip(PARAMS, scales)), "rates": dict(rates)})
    at_ceiling = [p for p in ceiling if rates[p] >= ceiling[p] * (1 - 1e-6)]
    notes = [f"{p} ended at its ceiling ({ceiling[p]:g}): the rows would have it faster" for p in at_ceiling]
    return {"rates": rates, "history": history, "notes": notes, "rows": len(rows), "ceilings": ceiling}


def relative_error(predicted: float, measured: float) -> float:
    return (predicted - measured) / measured if measured > 0 else math.nan
