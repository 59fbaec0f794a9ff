"""Generated attention kernels (runtime ``triton`` backend) against fp64 references.

On a machine without CUDA these run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1) on small shapes with fp32 inputs: the kernels then do exact fp32 arithmetic,
so the relative error against fp64 stays <= 1e-5 (fp32 rounding over a few hundred keys is ~1e-7;
the margin covers exp2/log2 rounding).
"""
from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from spava_plan.codegen import render_kernels
from spava_plan.hydra_conf import compose_config
from spava_plan.planner.build import build_plan
from spava_plan.runtime.backends.base import KVSegment, TaskInput
from spava_plan.runtime.backends.triton_gen import TritonBackend
from spava_plan.runtime.rank_inputs import random_rank_inputs

FP32_TOL = 1e-5  # fp32 inputs, fp32 accumulation vs fp64: rounding only


# ---- helpers shared with the GPU tests --------------------------------------------------------
def rank_inputs(plan, rank, dtype, device, gen):
    """The tasks of one rank with random inputs, segments as in-place views (runtime/rank_inputs.py)."""
    return random_rank_inputs(plan, rank, dtype, device, gen).tasks


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
    return plan, TritonBackend(kdir, plan_hash=plan.hash, render=partial(render_kernels, plan))


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


def test_whole_rank_in_one_launch(spava_backend):
    """The fused forward: anchor, both hosts and the query partial of a rank in ONE launch, also
    against the torch oracle backend (fp32 in, fp32 out)."""
    plan, backend = spava_backend
    gen = torch.Generator().manual_seed(5)
    tasks = list(rank_inputs(plan, 0, torch.float32, "cpu", gen).values())
    sig = tuple(tuple(s.mask for s in t.segments) for t in tasks)
    assert sig in backend.mod.LAUNCHES  # rendered for the whole rank
    scale = 1 / math.sqrt(plan.model.head_dim)
    _check_tasks(backend, tasks, scale)
    from spava_plan.runtime.backends.torch_ref import TorchBackend

    for (out, lse), (ref_o, ref_l) in zip(backend.attention(tasks, scale), TorchBackend().attention(tasks, scale)):
        assert rel(out, ref_o) <= FP32_TOL and lse_err(lse, ref_l) <= 1e-4


def test_launch_kernels_assert_their_plan_constants(spava_backend):
    """Each launch kernel's tl.static_asserts: the plan's GQA_GROUP and HEAD_DIM, tiles >= 16."""
    plan, backend = spava_backend
    mod = backend.mod
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(5, mod.Q_HEADS, mod.HEAD_DIM, generator=gen)
    k = torch.randn(40, mod.KV_HEADS, mod.HEAD_DIM, generator=gen)
    tasks = [(q, [(k, k, False)], None)]
    kernel = getattr(mod, mod.LAUNCHES[((mod.MASK_FULL,),)])
    shapes = dict(group=mod.GQA_GROUP, head_dim=mod.HEAD_DIM, kv_heads=mod.KV_HEADS)
    from spava_plan.runtime.backends import triton_kernels

    triton_kernels.attend(kernel, tasks, 0.25, mod.INTERPRETER_CONFIG, **shapes)  # the plan's own values pass
    for change, message in [({"group": mod.GQA_GROUP + 1}, "GQA_GROUP"), ({"head_dim": 2 * mod.HEAD_DIM}, "HEAD_DIM")]:
        with pytest.raises(Exception, match=message):
            triton_kernels.attend(kernel, tasks, 0.25, mod.INTERPRETER_CONFIG, **{**shapes, **change})
    with pytest.raises(Exception, match="BLOCK_M >= MIN_DOT"):
        triton_kernels.attend(kernel, tasks, 0.25, (8, 32, 1, 1, 0, 1), **shapes)


@pytest.mark.parametrize("config", [(64, 16, 1, 1, 1, 0), (16, 64, 1, 1, 0, 1)])
def test_tile_shapes_and_tma_path(spava_backend, config):
    """Other tile shapes (BLOCK_M smaller and larger than BLOCK_N) and the tensor-descriptor loads."""
    plan, backend = spava_backend
    gen = torch.Generator().manual_seed(6)
    tasks = rank_inputs(plan, 1, torch.float32, "cpu", gen)
    scale = 1 / math.sqrt(plan.model.head_dim)
    inputs = [(t.q, [(s.k, s.v, s.mask == "causal") for s in t.segments], None) for t in tasks.values()]
    sig = tuple(tuple("causal" if c else "full" for _, _, c in segs) for _, segs, _ in inputs)
    for task, (out, lse) in zip(tasks.values(), backend.mod.attend(backend.mod.LAUNCHES[sig], inputs, scale, config)):
        ref_o, ref_l = reference(task, scale)
        assert rel(out, ref_o) <= FP32_TOL and lse_err(lse, ref_l) <= 1e-4, (task.name, config)


def test_odd_group_and_head_dim(tmp_path):
    """G = 3 (packed rows straddle tiles unevenly) and D = 32."""
    plan = build_plan(compose_config(ODD_GROUP))
    render_kernels(plan, tmp_path)
    backend = TritonBackend(tmp_path, plan_hash=plan.hash, render=partial(render_kernels, plan))
    tasks = list(rank_inputs(plan, 1, torch.float32, "cpu", torch.Generator().manual_seed(8)).values())
    _check_tasks(backend, tasks, 1 / math.sqrt(32))


def _task(name, M, segs, gen, hq=4, hkv=2, d=16, out=None):
    """A task over fresh K/V segments: segs = [(n, mask)], K/V read from one packed buffer."""
    q = torch.randn(M, hq, d, generator=gen)
    buf = torch.randn(sum(n for n, _ in segs) + 3, hkv, 2 * d, generator=gen)
    parts, o = [], 3
    for n, mask in segs:
        parts.append(KVSegment(buf[o:o + n, :, :d], buf[o:o + n, :, d:], mask))
        o += n
    return TaskInput(name, q, tuple(parts), out=out)


def test_groupings_and_structures_the_plan_never_made(spava_backend):
    """Fallbacks stay exact: an unknown grouping runs task by task; an unknown task structure
    (causal segment first, a causal segment with n > M, an empty segment, no rows, no segments)
    runs segment by segment plus the LSE merge; a strided out is written in place."""
    _, backend = spava_backend
    gen = torch.Generator().manual_seed(9)
    big = torch.zeros(40, 8, 16)
    out_view = big[5:25, 2:6]  # (20, 4, 16) with token stride 128 and head stride 16
    tasks = [
        _task("a", 20, [(30, "causal"), (7, "full")], gen, out=out_view),
        _task("b", 9, [(9, "full"), (0, "full"), (33, "causal")], gen),
        _task("c", 0, [(5, "full")], gen),
        _task("d", 6, [], gen),
        _task("e", 12, [(12, "causal")], gen),
    ]
    scale = 0.3
    results = backend.attention(tasks, scale)
    assert results[0][0].data_ptr() == out_view.data_ptr()
    assert big[:5].abs().sum() == 0 and big[25:].abs().sum() == 0  # nothing outside the view
    for task, (out, lse) in zip(tasks, results):
        ref_o, ref_l = reference(task, scale)
        assert out.shape == task.q.shape
        if task.q.shape[0]:
            assert rel(out, ref_o) <= FP32_TOL or ref_o.abs().max() == 0, task.name
            assert lse_err(lse, ref_l) <= 1e-4, task.name
    assert torch.equal(results[3][0], torch.zeros(6, 4, 16)) and torch.isinf(results[3][1]).all()
    # the reversed order of a rendered launch is another grouping: task by task, same numbers
    plan, _ = spava_backend
    ranked = list(rank_inputs(plan, 0, torch.float32, "cpu", gen).values())[::-1]
    for task, (out, _) in zip(ranked, backend.attention(ranked, scale)):
        assert rel(out, reference(task, scale)[0]) <= FP32_TOL


def test_bad_inputs_name_the_values(spava_backend):
    from spava_plan.errors import InputError

    _, backend = spava_backend
    gen = torch.Generator().manual_seed(1)
    with pytest.raises(InputError, match=r"\(M, 4, 16\)"):
        backend.attention([_task("x", 4, [(4, "full")], gen, hq=6)], 0.25)
    with pytest.raises(InputError, match="n=3 < M=4"):
        backend.attention([_task("y", 4, [(3, "causal")], gen)], 0.25)


def test_half_precision_inputs(spava_backend):
    """fp16 in, fp32 accumulation, fp16 out: vs fp64 on the same rounded inputs the error is the
    rounding of P and of the output (~1e-3; bound 3e-3). bf16 is checked on the GPU only
    (test_kernels_gpu.py): the interpreter's bf16 tl.dot is wrong (triton 3.9, checked directly)."""
    _, backend = spava_backend
    for dtype, tol in ((torch.float16, 3e-3),):
        gen = torch.Generator().manual_seed(12)
        t = _task("h", 20, [(33, "full"), (20, "causal")], gen)
        t = TaskInput("h", t.q.to(dtype), tuple(KVSegment(s.k.to(dtype), s.v.to(dtype), s.mask) for s in t.segments))
        out, lse = backend.attention([t], 0.25)[0]
        ref_o, ref_l = reference(t, 0.25)
        assert out.dtype == dtype and rel(out, ref_o) <= tol and lse_err(lse, ref_l) <= 1e-4
