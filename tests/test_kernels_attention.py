"""Generated attention kernels (runtime ``triton`` backend) against fp64 references.

On a machine without CUDA these run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1) on small shapes with fp32 inputs: the kernels then do exact fp32 arithmetic,
so the relative error against fp64 stays <= 1e-5 (fp32 rounding over a few hundred keys is ~1e-7;
the margin covers exp2/log2 rounding).
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from spava_plan.codegen import render_kernels
from spava_plan.hydra_conf import compose_config
from spava_plan.planner.build import build_plan
from spava_plan.runtime.backends.base import KVSegment, TaskInput
from spava_plan.runtime.backends.triton_gen import TritonBackend

FP32_TOL = 1e-5  # fp32 inputs, fp32 accumulation vs fp64: rounding only


# ---- helpers shared with the GPU tests --------------------------------------------------------
def rank_inputs(plan, rank, dtype, device, gen):
    """Random local q/k/v and passing buffers of one rank, and its tasks as the runtime views them:
    local segments are slices of the (N_local, Hkv, D) buffers, passing segments are rows of the
    (W, keep, Hkv, 2D) all-gather buffers with K = [..., :D], V = [..., D:]."""
    rp, m = plan.ranks[rank], plan.model
    D, hq, hkv, W = m.head_dim, m.num_heads, m.num_kv_heads, plan.world_size
    n = rp.local_tokens

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)

    q, k, v = rand(n, hq, D), rand(n, hkv, D), rand(n, hkv, D)
    keep = {c.slot: c.rows_per_rank for c in plan.collectives if c.kind == "select_all_gather"}
    passing = {s: rand(W, kp, hkv, 2 * D) for s, kp in keep.items()}

    def segment(ref):
        if ref.kind == "local":
            a = rp.local_offset(ref.start)
            return KVSegment(k[a:a + ref.length], v[a:a + ref.length], ref.mask)
        assert ref.kind == "passing"
        rows = passing[ref.slot][ref.rank_start:ref.rank_stop].reshape(-1, hkv, 2 * D)
        return KVSegment(rows[..., :D], rows[..., D:], ref.mask)

    tasks = {}
    for t in rp.tasks:
        a = rp.local_offset(t.q_start)
        tasks[t.name] = TaskInput(t.name, q[a:a + t.rows], tuple(segment(r) for r in t.kv))
    return tasks


def reference(task: TaskInput, scale: float):
    """Dense fp64 attention over the concatenated segments with the explicit mask."""
    q = task.q.double().cpu()
    M, hq, _ = q.shape
    if not task.segments:
        return torch.zeros_like(q), torch.full((M, hq), -math.inf, dtype=torch.float64)
    ks = torch.cat([s.k.double().cpu() for s in task.segments])
    vs = torch.cat([s.v.double().cpu() for s in task.segments])
    masks = []
    for s in task.segments:
        n = s.k.shape[0]
        i, j = torch.arange(M)[:, None], torch.arange(n)[None, :]
        masks.append(j <= i + n - M if s.mask == "causal" else torch.ones(M, n, dtype=torch.bool))
    mask = torch.cat(masks, 1)
    g = hq // ks.shape[1]
    kk, vv = ks.repeat_interleave(g, 1), vs.repeat_interleave(g, 1)
    s = torch.einsum("mhd,nhd->hmn", q, kk) * scale
    s = s.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return torch.einsum("hmn,nhd->mhd", p, vv), lse.T


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def lse_err(a, b):
    """Max |difference| of finite lse entries; -inf entries must match exactly."""
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    fin = torch.isfinite(b)
    return (a[fin] - b[fin]).abs().max().item() if fin.any() else 0.0


# ---- plans --------------------------------------------------------------------------------------
# tiny model (Hq=4, Hkv=2, D=16), 2 GPUs, 8 frames of 360p: anchor 128, four ~271-token blocks,
# keep 128: every segment kind (passing runs, anchor, causal own block, query) appears.
SPAVA = ["model=tiny", "gpus=2", "frames=8", "video.resolution=360p"]
# G=3 (not a power of two) and D=32
ODD_GROUP = SPAVA + ["model.num_heads=6", "model.num_kv_heads=2", "model.head_dim=32", "model.mrope_section=[4,6,6]"]


@pytest.fixture(scope="module")
def spava_backend(tmp_path_factory):
    plan = build_plan(compose_config(SPAVA))
    kdir = tmp_path_factory.mktemp("kernels")
    render_kernels(plan, kdir)
    return plan, TritonBackend(kdir, plan_hash=plan.hash)


def _check_tasks(backend, tasks, scale, tol=FP32_TOL):
    results = backend.attention(tasks, scale)
    assert len(results) == len(tasks)
    for task, (out, lse) in zip(tasks, results):
        ref_o, ref_l = reference(task, scale)
        assert out.dtype == task.q.dtype and lse.dtype == torch.float32
        assert rel(out, ref_o) <= tol, (task.name, rel(out, ref_o))
        assert lse_err(lse, ref_l) <= 1e-4, (task.name, lse_err(lse, ref_l))  # lse ~ 10: 1e-5 relative


@pytest.mark.parametrize("rank", [0, 1])
def test_schedule_launches_match_reference(spava_backend, rank):
    """Every fused launch the schedule makes, with the runtime's views, equals dense attention."""
    plan, backend = spava_backend
    gen = torch.Generator().manual_seed(rank)
    tasks = rank_inputs(plan, rank, torch.float32, "cpu", gen)
    scale = 1 / math.sqrt(plan.model.head_dim)
    for op in plan.schedule[rank].ops:
        if op.name == "attend":
            names = set(backend.mod.LAUNCHES.values())
            sig = tuple(tuple(s.mask for s in tasks[n].segments) for n in op.tasks)
            assert backend.mod.LAUNCHES[sig] in names  # rendered for exactly this launch
            _check_tasks(backend, [tasks[n] for n in op.tasks], scale)
