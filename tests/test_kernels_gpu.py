"""Generated kernels on a real GPU (H100/H200): bf16 against fp32 references.

Skipped without CUDA. Plans are built from the config dataclasses directly (the GPU machine has no
hydra). Outputs are poisoned with NaN before each run and inputs are fresh random normals.
Tolerances: bf16 attention vs an fp32 reference on the same (bf16-rounded) inputs differs by the
bf16 rounding of P and of the output, ~4e-3 relative: bound 1e-2 (the issue's bar).
"""
from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from spava_plan.codegen import render_kernels
from spava_plan.config import ModelConfig, SpavaConfig, TopologyConfig, VideoConfig
from spava_plan.planner.build import build_plan
from spava_plan.runtime.backends.base import TaskInput
from spava_plan.runtime.backends.torch_ref import TorchBackend
from spava_plan.runtime.backends.triton_gen import TritonBackend

from test_kernels_attention import lse_err, rank_inputs, reference, rel  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BF16_TOL = 1e-2  # bf16 P and output rounding vs fp32 (see module docstring)
MODELS = {  # Qwen2.5-VL-3B and -7B attention shapes: G = 8 and G = 7 (not a power of two)
    "3b": dict(name="qwen2_5vl_3b", family="qwen2_5_vl", num_layers=36, hidden_size=2048, num_heads=16,
               num_kv_heads=2, intermediate_size=11008),
    "7b": dict(name="qwen2_5vl_7b", family="qwen2_5_vl", num_layers=28, hidden_size=3584, num_heads=28,
               num_kv_heads=4, intermediate_size=18944),
}


def gpu_plan(model: str, gpus: int = 4, frames: int = 16, resolution: str = "720p"):
    cfg = SpavaConfig(model=ModelConfig(**MODELS[model]), topology=TopologyConfig(gpus=gpus),
                      video=VideoConfig(frames=frames, resolution=resolution))
    return build_plan(cfg)


@pytest.fixture(scope="module", params=["3b", "7b"])
def case(request, tmp_path_factory):
    plan = gpu_plan(request.param)
    kdir = tmp_path_factory.mktemp(f"kernels_{request.param}")
    render_kernels(plan, kdir)
    return plan, TritonBackend(kdir, plan_hash=plan.hash, render=partial(render_kernels, plan), tune=False)


def _poisoned(tasks):
    """Outs as the runtime gives them: the task's own rows of one rank-wide buffer (tasks adjacent
    in q have adjacent outs), NaN until written. The tasks' q are rows of one tensor (rank_inputs)."""
    base = min(tasks, key=lambda t: t.q.data_ptr()).q
    offsets = [(t.q.data_ptr() - base.data_ptr()) // (base.stride(0) * base.element_size()) for t in tasks]
    rows = max(o + t.q.shape[0] for o, t in zip(offsets, tasks))
    buf = torch.full((rows, *base.shape[1:]), float("nan"), dtype=base.dtype, device=base.device)
    return [TaskInput(t.name, t.q, t.segments, out=buf[o:o + t.q.shape[0]]) for o, t in zip(offsets, tasks)]


def _fp32(task):
    from spava_plan.runtime.backends.base import KVSegment

    return TaskInput(task.name, task.q.float(), tuple(KVSegment(s.k.float(), s.v.float(), s.mask) for s in task.segments))


@pytest.mark.parametrize("which", ["fused", "schedule"])
@pytest.mark.parametrize("last", [False, True])
def test_rank_attention_bf16(case, which, last):
    """First and last rank (the query's own keys live on rank 0), one launch for the whole rank or
    the schedule's launches."""
    plan, backend = case
    scale = 1 / math.sqrt(plan.model.head_dim)
    oracle = TorchBackend()
    for rank in ([plan.world_size - 1] if last else [0]):
        gen = torch.Generator().manual_seed(10 * rank + (which == "fused"))  # fresh inputs per run
        tasks = rank_inputs(plan, rank, torch.bfloat16, "cuda", gen)
        groups = ([list(tasks)] if which == "fused" else
                  [list(op.tasks) for op in plan.schedule[rank].ops if op.name == "attend"])
        for names in groups:
            inputs = _poisoned([tasks[n] for n in names])
            results = backend.attention(inputs, scale)
            for task, (out, lse) in zip(inputs, results):
                assert out.data_ptr() == task.out.data_ptr() and not torch.isnan(out).any(), task.name
                ref_o, ref_l = oracle.attention([_fp32(task)], scale)[0]
                assert rel(out, ref_o) <= BF16_TOL, (rank, task.name, rel(out, ref_o))
                assert lse_err(lse, ref_l) <= 1e-3, (rank, task.name)  # both from fp32 scores


@pytest.mark.parametrize("join", [True, False])
@pytest.mark.parametrize("last", [False, True])
def test_cudnn_candidate_bf16(case, last, join):
    """The tuner's cuDNN candidate (runtime/backends/cudnn_segments.py, aten's cuDNN op on a task's
    joined segments or segment by segment, rank 0's anchor and host 0 as one square call where
    joined, then the merge into the task's out) on each schedule
    launch: eligible (Spava's causal segments are square), and the same function as the fp32
    oracle; the backend's agreement gate passes."""
    from spava_plan.runtime.backends import cudnn_segments

    plan, backend = case
    scale = 1 / math.sqrt(plan.model.head_dim)
    oracle = TorchBackend()
    rank = plan.world_size - 1 if last else 0
    tasks = rank_inputs(plan, rank, torch.bfloat16, "cuda", torch.Generator().manual_seed(40 + rank))
    for op in plan.schedule[rank].ops:
        if op.name != "attend":
            continue
        inputs = _poisoned([tasks[n] for n in op.tasks])
        checked = [backend._check(t) for t in inputs]
        assert cudnn_segments.eligible(checked), op.tasks
        if "anchor" in op.tasks and rank == 0:  # anchor + host 0: one square causal call
            assert len(cudnn_segments._pairs(checked)) == 1, op.tasks
        assert backend._cudnn_agrees(backend.mod.LAUNCHES[backend._signature(checked)], checked, scale), op.tasks
        for task, (out, lse) in zip(inputs, cudnn_segments.attend(checked, scale, join=join)):
            assert out.data_ptr() == task.out.data_ptr() and not torch.isnan(out).any(), task.name
            ref_o, ref_l = oracle.attention([_fp32(task)], scale)[0]
            assert rel(out, ref_o) <= BF16_TOL, (rank, task.name, rel(out, ref_o))
            assert lse_err(lse, ref_l) <= 1e-3, (rank, task.name)


def test_cudnn_alignment_probe_and_non_square_causal():
    """Which alignment aten's cuDNN op gives a causal M < n call is probed, not assumed: where it
    is bottom-right, a non-square causal segment (APB's, a ring's) is eligible and exact; where it
    is top-left, such a launch is refused."""
    from spava_plan.runtime.backends import cudnn_segments
    from spava_plan.runtime.backends.base import KVSegment

    gen = torch.Generator(device="cuda").manual_seed(7)
    M, n, hq, hkv, d = 300, 1000, 8, 2, 128
    q = torch.randn(M, hq, d, device="cuda", generator=gen).bfloat16()
    k, v = (torch.randn(n, hkv, d, device="cuda", generator=gen).bfloat16() for _ in range(2))
    task = TaskInput("apb", q, (KVSegment(k[:200], v[:200], "full"), KVSegment(k[200:], v[200:], "causal")))
    checked = [(q, [(k[:200], v[:200], False), (k[200:], v[200:], True)], None)]
    bottom_right = cudnn_segments.aligns_bottom_right(cudnn_segments._aten_op(), q.device, q.dtype)
    print("cuDNN causal alignment for M < n:", "bottom-right" if bottom_right else "top-left")
    assert cudnn_segments.eligible(checked) is bottom_right
    if bottom_right:
        (out, lse), = cudnn_segments.attend(checked, 1 / math.sqrt(d))
        ref_o, ref_l = TorchBackend().attention([_fp32(task)], 1 / math.sqrt(d))[0]
        assert rel(out, ref_o) <= BF16_TOL and lse_err(lse, ref_l) <= 1e-3


@pytest.mark.parametrize("config", [(128, 64, 8, 3, 1, 0), (128, 128, 8, 3, 1, 1), (64, 64, 4, 3, 0, 1)])
def test_whole_rank_each_config(case, config):
    """Every tile shape / load path the tuner may pick computes the same function (TMA=1: K/V tiles
    through device-made tensor descriptors)."""
    plan, backend = case
    scale = 1 / math.sqrt(plan.model.head_dim)
    tasks = rank_inputs(plan, 0, torch.bfloat16, "cuda", torch.Generator().manual_seed(sum(config)))
    inputs = [(t.q, [(s.k, s.v, s.mask == "causal") for s in t.segments], torch.full_like(t.q, float("nan")))
              for t in tasks.values()]
    sig = tuple(tuple("causal" if c else "full" for _, _, c in segs) for _, segs, _ in inputs)
    results = backend.mod.attend(backend.mod.LAUNCHES[sig], inputs, scale, config)
    oracle = TorchBackend()
    for task, (out, lse) in zip(tasks.values(), results):
        assert not torch.isnan(out).any(), task.name
        ref_o, ref_l = oracle.attention([_fp32(task)], scale)[0]
        assert rel(out, ref_o) <= BF16_TOL, (config, task.name, rel(out, ref_o))
        assert lse_err(lse, ref_l) <= 1e-3, (config, task.name)


def test_fp32_inputs_use_ieee_dots(case):
    """fp32 inputs run the dots in IEEE fp32 (not tf32): error at fp32 rounding (1e-5)."""
    plan, backend = case
    scale = 1 / math.sqrt(plan.model.head_dim)
    gen = torch.Generator().manual_seed(7)
    tasks = rank_inputs(plan, 0, torch.float32, "cpu", gen)
    small = [TaskInput(t.name, t.q[:40].cuda(), tuple(type(s)(s.k[:300].cuda(), s.v[:300].cuda(), s.mask)
                                                       for s in t.segments[-1:]))
             for t in tasks.values() if t.segments[-1].mask == "causal" and t.q.shape[0] >= 40]
    for task, (out, _) in zip(small, backend.attention(small, scale)):
        ref_o, _ = reference(task, scale)
        assert rel(out, ref_o) <= 1e-5, (task.name, rel(out, ref_o))


def test_select_matches_oracle(case):
    """Same tokens as the torch oracle except where two pooled fp32 scores are within rounding
    (bf16 inputs, fp32 GEMVs summed in different orders: ~1e-6 relative) of the threshold."""
    plan, backend = case
    rp = plan.ranks[0]
    gen = torch.Generator(device="cuda").manual_seed(3)
    m = plan.model
    oracle = TorchBackend()
    for _slot, start, stop, keep in rp.select:
        n = stop - start
        q = torch.randn(plan.layout.query_tokens, m.num_heads, m.head_dim, generator=gen, device="cuda").bfloat16()
        k = torch.randn(n, m.num_kv_heads, m.head_dim, generator=gen, device="cuda").bfloat16()
        v = torch.randn(n, m.num_kv_heads, m.head_dim, generator=gen, device="cuda").bfloat16()
        idx = backend.mod.select_indices(q, k, keep, 5, "query_aware").long()  # (Hkv, keep)
        ref = oracle.select_indices(q, k, keep, 5, "query_aware").T  # (Hkv, keep)
        scores = oracle.scores(q, k, 5, "query_aware").T  # (Hkv, n)
        for h in range(m.num_kv_heads):
            a, b = set(idx[h].tolist()), set(ref[h].tolist())
            thr = scores[h].sort(descending=True).values[keep - 1]
            for j in a ^ b:
                assert abs(scores[h, j] - thr) <= 1e-4 * thr.abs().clamp_min(1.0), (h, j)
        packed = torch.full((keep, m.num_kv_heads, 2 * m.head_dim), float("nan"), device="cuda",
                            dtype=torch.bfloat16)
        backend.mod.gather(idx.int(), k, v, packed)
        for h in range(m.num_kv_heads):
            assert torch.equal(packed[:, h, :m.head_dim], k[idx[h], h])
            assert torch.equal(packed[:, h, m.head_dim:], v[idx[h], h])


def test_merge_bf16(case):
    plan, backend = case
    m = plan.model
    P = plan.world_size
    outs = torch.randn(P, 37, m.num_heads, m.head_dim, device="cuda").bfloat16()
    lses = torch.randn(P, 37, m.num_heads, device="cuda") * 3
    lses[0, :5] = -math.inf
    out, lse = backend.merge(outs, lses)
    ref_o, ref_l = TorchBackend().merge(outs.double(), lses.double())
    assert out.dtype == torch.bfloat16 and rel(out, ref_o) <= BF16_TOL
    assert lse_err(lse, ref_l) <= 1e-5  # fp32 log-sum-exp of ~W terms
