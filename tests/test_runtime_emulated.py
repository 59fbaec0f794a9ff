"""RankAttention on the in-process emulated world: exactness against dense attention, decode,
failures, bad input, and the timing pass. (The same code on real gloo process groups:
test_runtime_dist.py.)"""
import functools
import time

import pytest
import torch

from spava_plan.errors import DistributedError, InputError, PlanMismatchError
from spava_plan.runtime.attention import RankAttention
from spava_plan.links import ALL_TO_ALL, Links
from spava_plan.runtime.comm.emulated import EmulatedWorld
from spava_plan.critical_path import Sync
from spava_plan.runtime.reference import assemble, dense_attention, local_rows

TOL = 1e-10  # fp64 end to end: segment softmaxes, LSE merges and all-gathers only add rounding

# 101 tokens (64 context + 37 query), an explicit odd anchor: blocks of a few tokens, nothing a
# multiple of 128, uneven local token counts across ranks.
SMALL = ("model=tiny", "frames=16", "video.resolution=56x84", "method.anchor_tokens=13")
# 1253 tokens: blocks of 136-272 tokens, so real top-k selection happens (keep = 128).
LARGE = ("model=tiny", "frames=100", "video.resolution=112x168")


@functools.lru_cache(maxsize=None)
def plan_for(*overrides):
    from spava_plan.hydra_conf import compose_config
    from spava_plan.planner.build import build_plan

    return build_plan(compose_config(list(overrides)))


@functools.lru_cache(maxsize=None)
def inputs(n, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 16, generator=g, dtype=dtype), torch.randn(n, 2, 16, generator=g, dtype=dtype),
            torch.randn(n, 2, 16, generator=g, dtype=dtype))


def prefill_all(plan, q, k, v, layer=0, world=None):
    world = world or EmulatedWorld.for_plan(plan, timeout_s=30)
    attns = [RankAttention(plan, r, world.comm(r)) for r in range(plan.world_size)]
    outs = world.run(lambda r: attns[r].prefill(layer, *local_rows(plan, r, q, k, v)))
    return outs, attns, world


def query_rows_identical(plan, outs):
    lq = plan.layout.query_tokens
    return all(torch.equal(outs[0][-lq:], o[-lq:]) for o in outs)


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("variant", [("method.pass_all=true",),
                                     ("method.pass_all=true", "method.anchor_tokens=0"),
                                     ("method.pass_all=true", "method.hosts_per_gpu=3", "method.overlap=false"),
                                     ("method=zigzag_ring",)])
def test_exact_methods_equal_dense(world, variant):
    plan = plan_for(*SMALL, f"gpus={world}", *variant)
    q, k, v = inputs(plan.layout.total_tokens)
    outs, _, _ = prefill_all(plan, q, k, v)
    ref = dense_attention(q, k, v)
    for r, out in enumerate(outs):
        (want,) = local_rows(plan, r, ref)
        assert (out - want).abs().max() < TOL, f"rank {r}"
    if plan.method != "zigzag_ring":
        assert query_rows_identical(plan, outs)  # every rank merges the same gathered partials


def test_zigzag_ring_on_the_generated_kernels_equals_dense(tmp_path):
    """The ring's per-step accumulation through the triton backend (fp32 accumulator merged with
    each step's output in place, triton_kernels.merge_parts) over 3 ranks: fp32 kernels vs fp64
    dense attention, rounding only."""
    pytest.importorskip("triton")
    from spava_plan.codegen import render_kernels
    from spava_plan.runtime.backends.triton_gen import TritonBackend

    from test_question_range import _Locked

    plan = plan_for(*SMALL, "gpus=3", "method=zigzag_ring")
    render_kernels(plan, tmp_path)
    backend = _Locked(TritonBackend(tmp_path, plan_hash=plan.hash, render=functools.partial(render_kernels, plan), tune=False))
    q, k, v = inputs(plan.layout.total_tokens)
    world = EmulatedWorld.for_plan(plan, timeout_s=300)
    attns = [RankAttention(plan, r, world.comm(r), backend) for r in range(plan.world_size)]
    outs = world.run(lambda r: attns[r].prefill(0, *(x.float() for x in local_rows(plan, r, q, k, v))))
    ref = dense_attention(q, k, v)
    for r, out in enumerate(outs):
        (want,) = local_rows(plan, r, ref)
        assert out.dtype == torch.float32 and (out.double() - want).abs().max() < 1e-4, f"rank {r}"


def test_spava_selection_batched_on_the_generated_kernels_equals_block_by_block(tmp_path):
    """Real top-k selection (LARGE: keep = 128 of 136-272 tokens) of both blocks of every rank in
    one launch per step through the triton backend gives the prefill of selecting each block alone,
    bit for bit (the kernels' own selection is checked against the fp64 reference in
    test_kernels_select.py)."""
    pytest.importorskip("triton")
    from spava_plan.codegen import render_kernels
    from spava_plan.runtime.backends.triton_gen import TritonBackend

    from test_question_range import _Locked

    class BlockByBlock(_Locked):
        def select_blocks(self, q, k, v, blocks, pool_window, score):
            return [self.select(q, k[lo:hi], v[lo:hi], keep, pool_window, score) for lo, hi, keep in blocks]

    plan = plan_for(*LARGE, "gpus=2")
    assert all(len(r.select) == 2 and all(s.keep < s.stop - s.start for s in r.select) for r in plan.ranks)
    render_kernels(plan, tmp_path)
    triton = TritonBackend(tmp_path, plan_hash=plan.hash, render=functools.partial(render_kernels, plan), tune=False)
    q, k, v = (x.float() for x in inputs(plan.layout.total_tokens))
    outs = []
    for backend in (_Locked(triton), BlockByBlock(triton)):
        world = EmulatedWorld.for_plan(plan, timeout_s=300)
        attns = [RankAttention(plan, r, world.comm(r), backend) for r in range(plan.world_size)]
        outs.append(world.run(lambda r: attns[r].prefill(0, *local_rows(plan, r, q, k, v))))
    for r in range(plan.world_size):
        assert torch.equal(outs[0][r], outs[1][r]), f"rank {r}"


def test_any_placement_the_plan_describes_is_followed():
    """Hosts placed off the zigzag snake: passing blocks read non-contiguous rank runs of a slot."""
    import dataclasses

    from spava_plan.hydra_conf import compose_config
    from spava_plan.plan import RankSchedule
    from spava_plan.planner.layout import token_layout
    from spava_plan.planner.partition import partition
    from spava_plan.planner.ranks import rank_plans
    from spava_plan.planner.schedule import rank_ops

    cfg = compose_config([*SMALL, "gpus=3", "method.pass_all=true"])
    plan = plan_for(*SMALL, "gpus=3", "method.pass_all=true")
    host_rank = (0, 2, 1, 0, 1, 2)  # host 2's passing block: slot 0 of ranks 0 and 2, not 1
    ranks = rank_plans(partition(token_layout(cfg.model, cfg.video), cfg.method, 3), host_rank)
    plan = dataclasses.replace(plan, ranks=ranks, placement=dataclasses.replace(plan.placement, host_rank=host_rank),
                               schedule=tuple(RankSchedule(r.rank, rank_ops(r, plan.collectives, 3, True))
                                              for r in ranks))
    assert [(ref.rank_start, ref.rank_stop) for t in ranks[1].tasks if t.name == "host2"
            for ref in t.kv if ref.kind == "passing"] == [(0, 1), (2, 3)]
    q, k, v = inputs(plan.layout.total_tokens)
    outs, _, _ = prefill_all(plan, q, k, v)
    ref = dense_attention(q, k, v)
    assert all((o - local_rows(plan, r, ref)[0]).abs().max() < TOL for r, o in enumerate(outs))


def test_dense_plan_on_one_rank():
    plan = plan_for(*SMALL, "gpus=1", "method=dense")
    q, k, v = inputs(plan.layout.total_tokens)
    outs, _, _ = prefill_all(plan, q, k, v)
    assert (outs[0] - dense_attention(q, k, v)).abs().max() < TOL


@pytest.mark.parametrize("world, variant", [(2, ()), (4, ()), (3, ("method.selection=key_norm",)),
                                            (2, ("method.passing_tokens=0",)), (4, ("method=apb",)),
                                            (3, ("method=star",))])
def test_query_rows_are_exact_for_approximate_methods(world, variant):
    plan = plan_for(*LARGE, f"gpus={world}", *variant)
    q, k, v = inputs(plan.layout.total_tokens)
    outs, _, _ = prefill_all(plan, q, k, v)
    lq = plan.layout.query_tokens
    ref = dense_attention(q, k, v)[-lq:]  # no causal mask on context keys for the query
    assert all((o[-lq:] - ref).abs().max() < TOL for o in outs)
    assert query_rows_identical(plan, outs)
    if plan.method == "spava" and "method.passing_tokens=0" not in variant:
        assert plan.ranks[0].select and plan.ranks[0].select[0][3] < plan.layout.blocks[0].length  # real top-k


@pytest.mark.parametrize("variant", [(*LARGE, "gpus=3"), (*SMALL, "gpus=4", "method=zigzag_ring"),
                                     (*SMALL, "gpus=2", "method=star")])
def test_decode_is_exact_and_identical_on_every_rank(variant):
    plan = plan_for(*variant)
    n = plan.layout.total_tokens
    q, k, v = inputs(n + 3, seed=1)
    outs, attns, world = prefill_all(plan, q[:n], k[:n], v[:n], layer=1)
    # the cache shards hold every prompt token exactly once
    assert sum(a.kv_cache(1)[0].shape[0] for a in attns) == n
    for lo, hi in ((n, n + 1), (n + 1, n + 3)):  # one token, then two at once
        new = world.run(lambda r: attns[r].decode(1, q[lo:hi], k[lo:hi], v[lo:hi]))
        ref = dense_attention(q[lo:hi], k[:hi], v[:hi], past=lo)
        assert all(torch.equal(new[0], o) for o in new)
        assert (new[0] - ref).abs().max() < TOL
    assert sum(a.kv_cache(1)[0].shape[0] for a in attns) == n + 3


def test_static_buffers_are_reused_across_layers():
    plan = plan_for(*LARGE, "gpus=2")
    q, k, v = inputs(plan.layout.total_tokens)
    world = EmulatedWorld.for_plan(plan)
    attns = [RankAttention(plan, r, world.comm(r)) for r in range(2)]
    ptrs = []
    for layer in (0, 1):
        world.run(lambda r: attns[r].prefill(layer, *local_rows(plan, r, q, k, v)))
        ptrs.append({n: b.data_ptr() for n, b in attns[0]._buffers[(torch.float64, torch.device("cpu"))].items()})
    assert ptrs[0] == ptrs[1]
    keep = plan.collectives[0].rows_per_rank
    assert attns[0]._buffers[(torch.float64, torch.device("cpu"))]["select0"].shape == (2 * keep, 2, 32)


# -- failures --------------------------------------------------------------------------------------
def test_a_raising_rank_aborts_the_others_at_once():
    plan = plan_for(*SMALL, "gpus=3", "method.pass_all=true")
    q, k, v = inputs(plan.layout.total_tokens)
    world = EmulatedWorld.for_plan(plan, timeout_s=60)
    attns = [RankAttention(plan, r, world.comm(r)) for r in range(3)]

    def fn(r):
        if r == 1:
            raise RuntimeError("disk on fire")
        return attns[r].prefill(0, *local_rows(plan, r, q, k, v))

    start = time.monotonic()
    outcomes = world.run_outcomes(fn)
    assert time.monotonic() - start < 10  # far below the 60 s timeout: no waiting it out
    assert isinstance(outcomes[1].error, RuntimeError)
    for r in (0, 2):
        assert isinstance(outcomes[r].error, DistributedError)
        assert "rank 1 failed: RuntimeError: disk on fire" in str(outcomes[r].error)
    with pytest.raises(RuntimeError, match="disk on fire"):  # run() re-raises the root cause
        world.run(fn)


def test_a_missing_rank_times_out_with_its_name():
    plan = plan_for(*SMALL, "gpus=2", "method.pass_all=true")
    q, k, v = inputs(plan.layout.total_tokens)
    world = EmulatedWorld.for_plan(plan, timeout_s=1.0)
    attns = [RankAttention(plan, r, world.comm(r)) for r in range(2)]
    outcomes = world.run_outcomes(lambda r: attns[r].prefill(0, *local_rows(plan, r, q, k, v)) if r == 0 else None)
    assert isinstance(outcomes[0].error, DistributedError)
    assert "timed out after 1 s waiting for rank(s) [1]" in str(outcomes[0].error)


def test_all_to_all_with_disagreeing_splits_fails_and_is_charged_on_the_busiest_link():
    links = Links(gbps=100.0, latency_us=2.0)
    world = EmulatedWorld(3, timeout_s=10, links=links)
    sends = [[0, 1, 0], [2, 0, 0], [3, 0, 1]]  # rows rank s sends rank d: rank 0 receives 5 off-rank

    def fn(r):
        out = torch.empty(sum(sends[s][r] for s in range(3)), 4)
        world.comm(r).all_to_all_single(out, torch.zeros(sum(sends[r]), 4), [sends[s][r] for s in range(3)], sends[r])

    charged = []

    class Observer:
        def before(self, rank, i):
            pass

        def after(self, rank, i, events):
            charged.append(sum(e.cost_us for e in events if isinstance(e, Sync)))

    world.time(fn, warmup=0, repeats=1, observer=Observer(), functional_passes=1)
    # 5 rows of 4 fp32 values into rank 0, the most any rank sends or receives off-rank
    assert charged == [pytest.approx(links.transfer_us(ALL_TO_ALL, 5 * 16, 3))] * 3
    assert charged[0] == pytest.approx(2 * 2.0 + 80 / 1e5)

    def wrong(r):  # rank 1 expects 1 row from rank 0, which sends it none
        out = torch.empty(1 if r == 1 else 0, 4)
        world.comm(r).all_to_all_single(out, torch.zeros(0, 4), [0, 0, 0] if r != 1 else [1, 0, 0], [0, 0, 0])

    errors = [o.error for o in world.run_outcomes(wrong)]
    assert isinstance(errors[1], DistributedError) and "rank 0 sends 0 rows, rank 1 expects 1" in str(errors[1])


# -- bad input -------------------------------------------------------------------------------------
def test_plan_for_another_world_size():
    plan = plan_for(*SMALL, "gpus=3", "method.pass_all=true")
    world = EmulatedWorld(2)
    with pytest.raises(PlanMismatchError, match="plan is for 3 ranks but 2 were launched"):
        RankAttention(plan, 0, world.comm(0))


def run_bad(plan, make):
    """Every rank calls prefill with make(rank) -> (q, k, v); returns the per-rank errors."""
    world = EmulatedWorld.for_plan(plan, timeout_s=30)
    attns = [RankAttention(plan, r, world.comm(r)) for r in range(plan.world_size)]
    return [o.error for o in world.run_outcomes(lambda r: attns[r].prefill(0, *make(r)))]


def test_plan_for_another_model_names_the_heads_on_every_rank():
    plan = plan_for(*SMALL, "gpus=2", "method.pass_all=true")
    q, k, v = inputs(plan.layout.total_tokens)
    errors = run_bad(plan, lambda r: (torch.cat([q, q], 1)[: plan.ranks[r].local_tokens],
                                      *local_rows(plan, r, k, v)))
    for e in errors:
        assert isinstance(e, PlanMismatchError) and "q has 8 heads" in str(e) and "'tiny'" in str(e)


def test_wrong_dtype_on_every_rank():
    plan = plan_for(*SMALL, "gpus=2", "method.pass_all=true")  # planned for bf16
    q, k, v = inputs(plan.layout.total_tokens)
    errors = run_bad(plan, lambda r: tuple(t.half() for t in local_rows(plan, r, q, k, v)))
    assert all(isinstance(e, InputError) and "dtype float16 does not match the plan's dtype=bf16" in str(e)
               for e in errors)


def test_wrong_shape_on_one_rank_fails_every_rank_without_hanging():
    plan = plan_for(*SMALL, "gpus=3", "method.pass_all=true")
    q, k, v = inputs(plan.layout.total_tokens)

    def make(r):
        ql, kl, vl = local_rows(plan, r, q, k, v)
        return (ql, kl[:-1], vl) if r == 1 else (ql, kl, vl)

    errors = run_bad(plan, make)
    assert isinstance(errors[1], InputError) and "rank 1 prefill layer 0: k has" in str(errors[1])
    for r in (0, 2):
        assert isinstance(errors[r], InputError) and "rank 1 rejected its input" in str(errors[r])


def test_layer_out_of_range_and_decode_before_prefill():
    plan = plan_for(*SMALL, "gpus=2", "method.pass_all=true")
    q, k, v = inputs(plan.layout.total_tokens)
    world = EmulatedWorld.for_plan(plan)
    attns = [RankAttention(plan, r, world.comm(r)) for r in range(2)]
    errors = [o.error for o in world.run_outcomes(lambda r: attns[r].prefill(5, *local_rows(plan, r, q, k, v)))]
    assert all(isinstance(e, InputError) and "layer 5 is outside" in str(e) for e in errors)
    errors = [o.error for o in world.run_outcomes(lambda r: attns[r].decode(0, q[:1], k[:1], v[:1]))]
    assert all(isinstance(e, InputError) and "before its prefill" in str(e) for e in errors)


# -- timing pass -----------------------------------------------------------------------------------
def test_timing_pass_times_every_rank_and_charges_unhidden_communication():
    plan = plan_for(*LARGE, "gpus=2")
    q, k, v = inputs(plan.layout.total_tokens, dtype=torch.float32)
    for cost in (0.0, 1e6):
        world = EmulatedWorld.for_plan(plan)
        world.costs.update({c.name: cost for c in plan.collectives})
        attns = [RankAttention(plan, r, world.comm(r)) for r in range(2)]
        timing = world.time(lambda r: attns[r].prefill(0, *local_rows(plan, r, q, k, v)), warmup=1, repeats=2)
        assert timing.label == "emulated 2-rank on cpu"
        assert all(t > 0 for t in timing.rank_compute_us)
        assert timing.makespan_us >= max(timing.rank_compute_us)
        if cost:  # 1 s collectives cannot hide behind ~ms of compute
            assert timing.makespan_us >= 1e6 and min(timing.exposed_comm_us) > 0
        else:  # free communication: only waiting for the slower rank can add to the compute
            assert timing.makespan_us <= sum(timing.rank_compute_us) + 1e-6
        ref = assemble(plan, timing.results)
        assert torch.equal(ref[-plan.layout.query_tokens:], timing.results[0][-plan.layout.query_tokens:])


def test_time_attention_layer_reports_an_emulated_critical_path():
    from spava_plan.runtime.emulated_layer import time_attention_layer

    plan = plan_for(*LARGE, "gpus=4")
    timing = time_attention_layer(plan, device="cpu", dtype=torch.float32, warmup=1, repeats=1)
    assert timing.label == "emulated 4-rank on cpu" and len(timing.rank_finish_us) == 4
    assert timing.makespan_us == max(timing.rank_finish_us) >= max(timing.rank_compute_us) > 0
