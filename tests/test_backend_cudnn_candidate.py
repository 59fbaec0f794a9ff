"""The cuDNN-per-segment candidate of the triton backend, on the CPU.

aten's cuDNN op needs a GPU, so the plumbing around it (token-major views handed over as
(1, H, S, D), the LSE layout it returns, the merge into the task's out, empty segments) runs here
with a CPU op of the same contract: top-left causal, lse (1, H, M, 1) in natural log. Against it:
dense fp64 attention, the generated kernel on a real plan's launches (the agreement check the tuner
runs before cuDNN may be chosen), and the tuner's table (choice, fallback, version). The real op
is checked on a GPU in tests/test_kernels_gpu.py.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from spava_plan.runtime.backends import cudnn_segments, triton_kernels
from spava_plan.runtime.backends.base import KVSegment, TaskInput
from spava_plan.runtime.backends.cudnn_segments import CUDNN
from spava_plan.runtime.backends.triton_gen import AUTOTUNE_VERSION, Tuner

from test_kernels_attention import FP32_TOL, lse_err, rank_inputs, reference, rel, spava_backend  # noqa: F401


def cpu_op(q4, k4, v4, causal, scale, *, lse_base=math.e, bottom_right=False, calls=None):
    """aten's cuDNN op's contract on the CPU, in fp64: (1, Hq, M, D) out, (1, Hq, M, 1) lse;
    GQA by head groups; causal aligned top-left (row i sees keys j <= i) or, with bottom_right,
    j <= i + n - M. ``calls``: a list that records each call's (M, n, causal)."""
    q, k, v = q4[0].double(), k4[0].double(), v4[0].double()
    g = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
    s = torch.einsum("hmd,hnd->hmn", q, k) * scale
    M, n = s.shape[1:]
    if calls is not None:
        calls.append((M, n, causal))
    if causal:
        s = s.masked_fill(torch.arange(n)[None, :] > torch.arange(M)[:, None] + (n - M if bottom_right else 0),
                          -math.inf)
    lse = torch.logsumexp(s, -1)
    out = torch.einsum("hmn,hnd->hmd", torch.softmax(s, -1), v)
    return out.to(q4.dtype).transpose(0, 1).contiguous().transpose(0, 1)[None], \
        (lse / math.log(lse_base))[None, ..., None].float()


def _rand(*shape, gen):
    return torch.randn(*shape, generator=gen, dtype=torch.float32)


def _checked(task: TaskInput):
    return (task.q, [(s.k, s.v, s.mask == "causal") for s in task.segments], task.out)


@pytest.mark.parametrize("bottom_right", [False, True])
@pytest.mark.parametrize("join", [True, False])
def test_segments_then_merge_equal_one_softmax(join, bottom_right):
    """Full + square-causal segments with GQA (G=3), an empty segment, a one-segment task, an out
    that is a strided view of a bigger buffer: each equals dense attention over its segments, with
    the segments joined or called one by one, under an op of either causal alignment."""
    gen = torch.Generator().manual_seed(0)
    hq, hkv, d, M = 6, 2, 16, 37
    kv = _rand(300, 2, hkv, d, gen=gen)  # one cache: segments are views into it
    q = _rand(M, hq, d, gen=gen)
    big = torch.full((M, hq + 2, d), float("nan"))
    multi = TaskInput("host", q, (KVSegment(kv[:64, 0], kv[:64, 1], "full"),
                                  KVSegment(kv[64:64, 0], kv[64:64, 1], "full"),  # empty
                                  KVSegment(kv[250:290, 0], kv[250:290, 1], "full"),
                                  KVSegment(kv[100:137, 0], kv[100:137, 1], "causal")), out=big[:, 1:hq + 1])
    single = TaskInput("anchor", q[:20], (KVSegment(kv[200:220, 0], kv[200:220, 1], "causal"),))
    nothing = TaskInput("none", q[:5], ())
    scale = 1 / math.sqrt(d)
    calls = []
    res = cudnn_segments.attend([_checked(t) for t in (multi, single, nothing)], scale, join=join,
                                op=lambda *a: cpu_op(*a, bottom_right=bottom_right, calls=calls))
    # the alignment probe's own calls have 16 rows; the tasks' have 37 and 20
    calls = [c for c in calls if c[0] != 16]
    if not join:
        assert calls == [(M, 64, False), (M, 40, False), (M, 37, True), (20, 20, True)]
    elif bottom_right:
        assert calls == [(M, 64 + 40 + 37, True), (20, 20, True)], "one call per task"
    else:
        assert calls == [(M, 64 + 40, False), (M, 37, True), (20, 20, True)], "the full segments joined"
    for task, (out, lse) in zip((multi, single, nothing), res):
        ref_o, ref_l = reference(task, scale)
        assert rel(out, ref_o) <= FP32_TOL if ref_o.norm() > 0 else out.abs().max() == 0, task.name
        assert lse_err(lse, ref_l) <= 1e-4, task.name
        assert out.dtype == task.q.dtype and lse.dtype == torch.float32 and lse.shape == task.q.shape[:2]
    assert res[0][0].data_ptr() == big[:, 1].data_ptr(), "the merge writes into the task's out"
    assert torch.isnan(big[:, 0]).all() and torch.isnan(big[:, -1]).all(), "nothing outside the out view"


def test_the_alignment_probe_tells_the_two_masks_apart():
    for bottom_right in (False, True):
        op = lambda *a, br=bottom_right: cpu_op(*a, bottom_right=br)  # noqa: E731
        assert cudnn_segments.aligns_bottom_right(op, torch.device("cpu"), torch.float32) is bottom_right

    def refuses(*a):
        raise RuntimeError("no causal with M < n")
    assert cudnn_segments.aligns_bottom_right(refuses, torch.device("cpu"), torch.float32) is False


def test_merge_parts_of_two_separate_partials_equals_the_stacked_merge():
    """The pair kernel reads two partials where they lie (strided, one lse a transposed view, as
    cuDNN returns it) and gives what merge() gives on the stacked copies; -inf rows stay empty."""
    gen = torch.Generator().manual_seed(5)
    M, H, d = 19, 4, 16
    a = _rand(H, M, d, gen=gen).transpose(0, 1)  # (M, H, D) with (B, H, S, D) memory
    b = _rand(M, H, d, gen=gen)
    la = _rand(H, M, gen=gen).transpose(0, 1)
    lb = _rand(M, H, gen=gen)
    la[3] = float("-inf")
    la[5], lb[5] = float("-inf"), float("-inf")
    out = torch.full((M, H + 1, d), float("nan"))[:, :H]
    got_o, got_l = triton_kernels.merge_parts([a, b], [la, lb], out=out)
    ref_o, ref_l = triton_kernels.merge(torch.stack([a, b]), torch.stack([la, lb]))
    assert got_o.data_ptr() == out.data_ptr()
    assert rel(got_o, ref_o) <= 1e-6 and torch.equal(torch.isinf(got_l), torch.isinf(ref_l))
    fin = torch.isfinite(ref_l)
    assert (got_l[fin] - ref_l[fin]).abs().max() <= 1e-5
    assert bool((got_o[5] == 0).all()) and bool(torch.isneginf(got_l[5]).all()), "no keys: zeros, -inf"
    one_o, one_l = triton_kernels.merge_parts([a], [la])
    assert torch.equal(one_o, a) and torch.equal(one_l, la)
    with pytest.raises(ValueError):
        triton_kernels.merge_parts([a, b], [la])


def test_eligibility_needs_cuda_16_bit_and_an_alignable_causal_mask():
    gen = torch.Generator().manual_seed(1)
    q, k = _rand(8, 4, 16, gen=gen), _rand(12, 2, 16, gen=gen)
    assert not cudnn_segments.eligible([(q.bfloat16(), [(k[:8].bfloat16(), k[:8].bfloat16(), True)], None)]), \
        "a CPU tensor is never eligible"
    assert not cudnn_segments.eligible([])
    if torch.cuda.is_available():
        qc, kc = q.cuda().bfloat16(), k.cuda().bfloat16()
        assert cudnn_segments.eligible([(qc, [(kc, kc, False), (kc[:8], kc[:8], True)], None)])
        bottom_right = cudnn_segments.aligns_bottom_right(cudnn_segments._aten_op(), qc.device, qc.dtype)
        assert cudnn_segments.eligible([(qc, [(kc, kc, True)], None)]) is bottom_right, \
            "12 keys for 8 rows, causal: only where the op aligns bottom-right"
        assert not cudnn_segments.eligible([(qc.float(), [(kc.float(), kc.float(), False)], None)])


def test_agreement_check_against_the_generated_kernel(spava_backend, monkeypatch):
    """The tuner's gate on a real plan's launches: a right op agrees with the generated kernel, one
    whose lse is in base 2 does not; either way the task outs hold what they held before."""
    plan, backend = spava_backend
    gen = torch.Generator().manual_seed(3)
    tasks = rank_inputs(plan, 1, torch.float32, "cpu", gen)
    scale = 1 / math.sqrt(plan.model.head_dim)
    op = next(o for o in plan.schedule[1].ops if o.name == "attend" and len(o.tasks) > 1)
    launch = [tasks[n] for n in op.tasks]
    checked = [backend._check(TaskInput(t.name, t.q, t.segments, out=torch.full_like(t.q, 7.0))) for t in launch]
    name = backend.mod.LAUNCHES[backend._signature(checked)]
    assert all(not c or k.shape[0] == q.shape[0] for q, segs, _ in checked for k, _, c in segs), \
        "Spava's causal segments are square (cuDNN's top-left mask fits)"

    monkeypatch.setattr(cudnn_segments, "_aten_op", lambda: cpu_op)
    assert backend._cudnn_agrees(name, checked, scale)
    monkeypatch.setattr(cudnn_segments, "_aten_op", lambda: lambda *a: cpu_op(*a, lse_base=2.0))
    assert not backend._cudnn_agrees(name, checked, scale)
    assert all(bool((o == 7.0).all()) for _, _, o in checked), "outs restored after the comparison"


def test_tuner_records_cudnn_and_falls_back_to_the_best_generated(tmp_path):
    times = {(1, 2): 3.0, (3, 4): 2.0, CUDNN: 1.5}
    current = {}

    def timer(fn):
        fn()
        return times[current["cfg"]]

    def run(cfg):
        current["cfg"] = cfg
        if cfg == (9, 9):
            raise RuntimeError("too much shared memory")

    path = tmp_path / "autotune.json"
    tuner = Tuner(path, [(1, 2), (3, 4), (9, 9)], (1, 2), timer=timer)
    assert tuner.tune("H200", "launch_a:bfloat16", run, candidates=[(1, 2), (3, 4), (9, 9), CUDNN]) == CUDNN
    data = json.loads(path.read_text())
    assert data["version"] == AUTOTUNE_VERSION
    entry = data["devices"]["H200"]["launch_a:bfloat16"]
    assert entry["config"] == ["cudnn"] and set(entry["candidates"]) == {"1,2", "3,4", "cudnn"}

    again = Tuner(path, [(1, 2), (3, 4)], (1, 2), timer=timer)
    assert again.get("H200", "launch_a:bfloat16") == CUDNN
    assert again.generated("H200", "launch_a:bfloat16") == (3, 4), "the fastest generated config timed"
    assert again.nearest("H200", "launch_b:bfloat16") == (1, 2), "an untuned launch never inherits cuDNN"

    times[CUDNN] = 9.0
    assert again.tune("H200", "launch_b:bfloat16", run, candidates=[(1, 2), (3, 4), CUDNN]) == (3, 4)
    assert again.nearest("H200", "launch_c:bfloat16") == (3, 4)


def test_a_table_of_another_version_is_tuned_again(tmp_path):
    path = tmp_path / "autotune.json"
    path.write_text(json.dumps({"version": 1, "devices": {"H200": {"k:bfloat16": {"config": [1, 2]}}}}))
    tuner = Tuner(path, [(1, 2)], (1, 2), timer=lambda fn: 1.0)
    assert tuner.get("H200", "k:bfloat16") is None


def _pair_tasks(gen, *, hq=6, hkv=2, d=16, a=20, b=37, outs=True):
    """A launch as rank 0 of a Spava plan makes it: a query task, the anchor (causal over its own
    a keys) and host 0 right after it (the anchor's keys in full, its own b causally), all views of
    one rank's q / k / v / out buffers, k and v packed in one cache as a runtime might hold them."""
    n = a + b + 9
    q = _rand(n, hq, d, gen=gen)
    kv = _rand(n, 2, hkv, d, gen=gen)
    k, v = kv[:, 0], kv[:, 1]
    out = torch.full((n, hq, d), float("nan"))
    seg = lambda lo, hi, mask: KVSegment(k[lo:hi], v[lo:hi], mask)  # noqa: E731
    query = TaskInput("query", q[a + b:], (seg(0, a, "full"), seg(a, a + b, "full"), seg(a + b, n, "causal")))
    anchor = TaskInput("anchor", q[:a], (seg(0, a, "causal"),), out=out[:a] if outs else None)
    host0 = TaskInput("host0", q[a:a + b], (seg(0, a, "full"), seg(a, a + b, "causal")),
                      out=out[a:a + b] if outs else None)
    return [query, anchor, host0], out


@pytest.mark.parametrize("bottom_right", [False, True])
@pytest.mark.parametrize("outs", [True, False])
def test_a_square_pair_of_tasks_is_one_call(bottom_right, outs):
    """The anchor and the host block after it are one square causal call of a + b rows (under an op
    of either alignment), each task's result its rows of it, equal to dense attention, written into
    the task's out where one is given; nothing outside the outs is touched."""
    gen = torch.Generator().manual_seed(7)
    tasks, out = _pair_tasks(gen, outs=outs)
    scale = 1 / math.sqrt(16)
    checked = [_checked(t) for t in tasks]
    assert cudnn_segments.square_pair(checked[1], checked[2]) and not cudnn_segments.square_pair(checked[2], checked[1])
    calls = []
    res = cudnn_segments.attend(checked, scale, op=lambda *a: cpu_op(*a, bottom_right=bottom_right, calls=calls))
    calls = [c for c in calls if c[0] != 16]  # the alignment probe's
    assert (57, 57, True) in calls and (20, 20, True) not in calls and not any(c[0] == 37 for c in calls), calls
    for task, (o, lse) in zip(tasks, res):
        ref_o, ref_l = reference(task, scale)
        assert rel(o, ref_o) <= FP32_TOL and lse_err(lse, ref_l) <= 1e-4, task.name
        assert o.shape == task.q.shape and lse.shape == task.q.shape[:2]
        if task.out is not None:
            assert o.data_ptr() == task.out.data_ptr()
    assert torch.isnan(out[57:]).all() and (outs or torch.isnan(out).all())


@pytest.mark.parametrize("change", ["keys_apart", "other_full_keys", "one_out", "rows_apart", "causal_not_square"])
def test_near_pairs_stay_separate_calls(change):
    """What only looks like a square pair is not joined, and every task is still right."""
    gen = torch.Generator().manual_seed(8)
    tasks, _ = _pair_tasks(gen)
    query, anchor, host0 = tasks
    (full, own) = host0.segments
    k, v = own.k, own.v
    if change == "keys_apart":  # host 0's own keys one row later than the anchor's end
        base_k, base_v = full.k, full.v
        kk = base_k.as_strided((k.shape[0],) + tuple(k.shape[1:]), k.stride(), k.storage_offset() + k.stride(0))
        vv = base_v.as_strided((v.shape[0],) + tuple(v.shape[1:]), v.stride(), v.storage_offset() + v.stride(0))
        host0 = TaskInput("host0", host0.q, (full, KVSegment(kk, vv, "causal")), out=host0.out)
    elif change == "other_full_keys":  # sees a copy of the anchor's keys, not the anchor's own view
        host0 = TaskInput("host0", host0.q, (KVSegment(full.k.clone(), full.v.clone(), "full"), own), out=host0.out)
    elif change == "one_out":
        anchor = TaskInput("anchor", anchor.q, anchor.segments)
    elif change == "rows_apart":
        host0 = TaskInput("host0", host0.q.clone(), host0.segments, out=host0.out)
    else:  # host 0 sees a longer causal segment than its rows: not square
        host0 = TaskInput("host0", host0.q[1:], host0.segments, out=host0.out[1:])
    tasks = [query, anchor, host0]
    checked = [_checked(t) for t in tasks]
    assert not cudnn_segments.square_pair(checked[1], checked[2])
    calls = []
    res = cudnn_segments.attend(checked, 1 / math.sqrt(16), op=lambda *a: cpu_op(*a, bottom_right=True, calls=calls))
    assert (20, 20, True) in calls, "the anchor alone"
    for task, (o, lse) in zip(tasks, res):
        ref_o, ref_l = reference(task, 1 / math.sqrt(16))
        assert rel(o, ref_o) <= FP32_TOL and lse_err(lse, ref_l) <= 1e-4, (change, task.name)


def test_rank_zero_of_a_real_plan_makes_one_square_call(spava_backend):
    """With the runtime's views (rank_inputs, outs for the tasks that are final on this rank), rank
    0's [query, anchor, host 0] launch of a real Spava plan holds a square pair, and the candidate's
    results equal dense attention."""
    plan, _ = spava_backend
    gen = torch.Generator().manual_seed(4)
    tasks = rank_inputs(plan, 0, torch.float32, "cpu", gen)
    scale = 1 / math.sqrt(plan.model.head_dim)
    q_all = tasks["anchor"].q
    q_all = q_all.as_strided((plan.ranks[0].local_tokens, *q_all.shape[1:]), q_all.stride())  # the rank's q
    out = torch.full_like(q_all, float("nan"))
    merges = {t.name: t.merge for t in plan.ranks[0].tasks}
    op = next(o for o in plan.schedule[0].ops if o.name == "attend" and "anchor" in o.tasks)
    launch = []
    for name in op.tasks:
        t = tasks[name]
        lo = (t.q.data_ptr() - q_all.data_ptr()) // (q_all.stride(0) * q_all.element_size())
        launch.append(TaskInput(name, t.q, t.segments, out=out[lo:lo + t.q.shape[0]] if merges[name] == "none" else None))
    checked = [_checked(t) for t in launch]
    pairs = cudnn_segments._pairs(checked)
    assert [(launch[i].name, launch[j].name) for i, j in pairs.items()] == [("anchor", "host0")]
    for task, (o, lse) in zip(launch, cudnn_segments.attend(checked, scale, op=cpu_op)):
        ref_o, ref_l = reference(task, scale)
        assert rel(o, ref_o) <= FP32_TOL and lse_err(lse, ref_l) <= 1e-4, task.name


def test_a_ring_first_step_is_one_square_call():
    """A ZigZagRing rank's first step (its own keys only: its first block causally, its second
    block the first in full and itself causally) is one square pair too, and right."""
    from spava_plan.hydra_conf import compose_config
    from spava_plan.planner.build import build_plan

    plan = build_plan(compose_config(["model=tiny", "gpus=2", "frames=8", "video.resolution=360p",
                                      "method=zigzag_ring", "kernels=false"]))
    scale = 1 / math.sqrt(plan.model.head_dim)
    for rank in range(plan.world_size):
        tasks = rank_inputs(plan, rank, torch.float32, "cpu", torch.Generator().manual_seed(rank))
        step0 = []
        for t in plan.ranks[rank].tasks:  # step 0: the segments this rank holds itself
            segs = tuple(s for s, ref in zip(tasks[t.name].segments, t.kv) if ref.kind == "local")
            step0.append(TaskInput(t.name, tasks[t.name].q, segs))
        checked = [_checked(t) for t in step0]
        assert len(cudnn_segments._pairs(checked)) == 1, rank
        calls = []
        res = cudnn_segments.attend(checked, scale, op=lambda *a: cpu_op(*a, calls=calls))
        rows = sum(t.q.shape[0] for t in step0)
        assert [c for c in calls if c[0] != 16] == [(rows, rows, True)], rank
        for task, (o, lse) in zip(step0, res):
            ref_o, ref_l = reference(task, scale)
            assert rel(o, ref_o) <= FP32_TOL and lse_err(lse, ref_l) <= 1e-4, (rank, task.name)


def test_a_table_tuned_for_another_module_is_tuned_again(tmp_path):
    """Launch names are per module (a re-rendered kernel dir may call another launch attend_3), so
    a table names the module it was tuned for and another module's is not read."""
    path = tmp_path / "autotune.json"
    first = Tuner(path, [(1, 2)], (1, 2), timer=lambda fn: 1.0, module="spava_kernels_aaaa")
    first.tune("H200", "attend_3:bfloat16", lambda cfg: None)
    assert json.loads(path.read_text())["module"] == "spava_kernels_aaaa"
    assert Tuner(path, [(1, 2)], (1, 2), module="spava_kernels_aaaa").get("H200", "attend_3:bfloat16") == (1, 2)
    assert Tuner(path, [(1, 2)], (1, 2), module="spava_kernels_bbbb").get("H200", "attend_3:bfloat16") is None


def test_adjacent_full_segments_are_joined_without_a_copy():
    """A ring step's two blocks of one owner lie one after another in the receive buffer (packed
    K|V rows): joined, they are one view of it, not a copy; segments apart are copied."""
    gen = torch.Generator().manual_seed(9)
    hq, hkv, d, M = 4, 2, 16, 11
    buf = _rand(50, hkv, 2 * d, gen=gen)  # received rows: K in [..., :d], V in [..., d:]
    k, v = buf[..., :d], buf[..., d:]
    q = _rand(M, hq, d, gen=gen)
    seen = []

    def op(q4, k4, v4, causal, scale):
        if q4.shape[2] == M:  # not the alignment probe's call
            seen.append((k4.data_ptr(), v4.data_ptr(), k4.shape[2]))
        return cpu_op(q4, k4, v4, causal, scale)

    scale = 1 / math.sqrt(d)
    for segs, view in (((KVSegment(k[:20], v[:20], "full"), KVSegment(k[20:45], v[20:45], "full")), True),
                       ((KVSegment(k[:20], v[:20], "full"), KVSegment(k[25:45], v[25:45], "full")), False)):
        seen.clear()
        task = TaskInput("chunk", q, segs)
        (out, lse), = cudnn_segments.attend([_checked(task)], scale, op=op)
        n = sum(s.k.shape[0] for s in segs)
        assert [c[2] for c in seen] == [n], "one call over the joined keys"
        assert (seen[0][:2] == (k.data_ptr(), v.data_ptr())) is view
        ref_o, ref_l = reference(task, scale)
        assert rel(out, ref_o) <= FP32_TOL and lse_err(lse, ref_l) <= 1e-4
