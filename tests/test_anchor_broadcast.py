"""method.anchor=broadcast (rank 0 sends the anchor's K/V every layer, the other ranks hold no
anchor row) against method.anchor=recompute (every rank runs the anchor): the same attention, in
fp64, on emulated worlds of 2, 3 and 8 ranks and on real gloo process groups of 2 and 3; pass-all
still equals dense attention; and the planner charges rank 0 for the anchor and predicts less time."""
import functools

import pytest
import torch

from spava_plan.plan_load import plan_from_dict
from spava_plan.runtime.attention import RankAttention
from spava_plan.runtime.comm.emulated import EmulatedWorld
from spava_plan.runtime.launch import results_or_raise, run_local_world
from spava_plan.runtime.reference import assemble, dense_attention, local_rows

TOL = 1e-10
SMALL = ("model=tiny", "frames=16", "video.resolution=56x84", "method.anchor_tokens=13")  # 101 tokens
LARGE = ("model=tiny", "frames=100", "video.resolution=112x168")  # 1253 tokens, real top-k selection
WIDE = ("model=tiny", "frames=200", "video.resolution=112x168")  # 2.4K tokens: 16 selecting blocks at W=8
EXTRA = 3  # decoded tokens: one step of 1, one of 2
HEADLINE = ("model=qwen2_5vl_3b", "gpus=8", "frames=64", "video.resolution=1440p", "topology=h100_sxm")


@functools.lru_cache(maxsize=None)
def plan_for(*overrides):
    from spava_plan.hydra_conf import compose_config
    from spava_plan.planner.build import build_plan

    return build_plan(compose_config(list(overrides)))


def global_inputs(n, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, h, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2))


def run_case(attn, plan, rank, seed, layers=2):
    """Prefill ``layers`` layers (fresh inputs each), then decode EXTRA tokens on the last one."""
    n = plan.layout.total_tokens
    outs = []
    for layer in range(layers):
        q, k, v = global_inputs(n + EXTRA, seed + layer)
        outs.append(attn.prefill(layer, *local_rows(plan, rank, q[:n], k[:n], v[:n])))
    dec = [attn.decode(layers - 1, q[lo:hi], k[lo:hi], v[lo:hi]) for lo, hi in ((n, n + 1), (n + 1, n + EXTRA))]
    return outs, dec


def emulated(plan, seed):
    world = EmulatedWorld.for_plan(plan, timeout_s=60)
    attns = [RankAttention(plan, r, world.comm(r)) for r in range(plan.world_size)]
    return world.run(lambda r: run_case(attns[r], plan, r, seed))


def compare(broadcast, recompute, got_b, got_r):
    """Every row (assembled from the ranks) and every rank's decode outputs agree."""
    for layer in range(len(got_b[0][0])):
        full_b = assemble(broadcast, [o[0][layer] for o in got_b])
        full_r = assemble(recompute, [o[0][layer] for o in got_r])
        assert (full_b - full_r).abs().max() < TOL, f"layer {layer}"
    for r, (b, rc) in enumerate(zip(got_b, got_r)):
        for db, dr in zip(b[1], rc[1]):
            assert (db - dr).abs().max() < TOL, f"decode rank {r}"


def _anchor_span(plan):
    return (0, next(c for c in plan.collectives if c.kind == "anchor_broadcast").rows_per_rank)


@pytest.mark.parametrize("world", [2, 3, 8])
@pytest.mark.parametrize("method", ["spava", "apb", "star"])
def test_broadcast_equals_recompute_emulated(method, world):
    prompt = WIDE if world == 8 else LARGE
    broadcast = plan_for(*prompt, f"gpus={world}", f"method={method}")
    recompute = plan_for(*prompt, f"gpus={world}", f"method={method}", "method.anchor=recompute")
    assert broadcast.anchor_mode == "broadcast" and recompute.anchor_mode == "recompute"
    a, b = _anchor_span(broadcast)
    for rp in broadcast.ranks[1:]:  # the other ranks hold no anchor row and run no anchor task
        assert all(stop <= a or start >= b for start, stop in rp.local) and "anchor" not in {t.name for t in rp.tasks}
        assert rp.local_tokens < recompute.ranks[rp.rank].local_tokens
    assert broadcast.ranks[0].local[0] == (a, b)  # rank 0 computes it, as its first rows
    compare(broadcast, recompute, emulated(broadcast, 7), emulated(recompute, 7))


@pytest.mark.parametrize("world", [2, 3, 8])
def test_pass_all_with_a_broadcast_anchor_equals_dense(world):
    plan = plan_for(*SMALL, f"gpus={world}", "method.pass_all=true")
    assert plan.anchor_mode == "broadcast"
    n = plan.layout.total_tokens
    got = emulated(plan, 3)
    for layer in range(2):
        q, k, v = global_inputs(n + EXTRA, 3 + layer)
        ref = dense_attention(q[:n], k[:n], v[:n])
        for r, (outs, dec) in enumerate(got):
            (want,) = local_rows(plan, r, ref)
            assert (outs[layer] - want).abs().max() < TOL, f"layer {layer} rank {r}"
    for (lo, hi), d in zip(((n, n + 1), (n + 1, n + EXTRA)), got[0][1]):  # decode from every rank's cache
        assert (d - dense_attention(q[lo:hi], k[:hi], v[:hi], past=lo)).abs().max() < TOL


def _gloo_worker(comm, cases):
    out = {}
    for name, plan_dict, seed in cases:
        plan = plan_from_dict(plan_dict)
        out[name] = run_case(RankAttention(plan, comm.rank, comm), plan, comm.rank, seed)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_broadcast_equals_recompute_on_gloo(world):
    plans = {}
    for method in ("spava", "apb", "star"):
        plans[f"{method}-broadcast"] = plan_for(*LARGE, f"gpus={world}", f"method={method}")
        plans[f"{method}-recompute"] = plan_for(*LARGE, f"gpus={world}", f"method={method}", "method.anchor=recompute")
    plans["pass_all"] = plan_for(*SMALL, f"gpus={world}", "method.pass_all=true")
    cases = [(name, p.to_dict(), 11) for name, p in plans.items()]
    got = results_or_raise(run_local_world(_gloo_worker, world, args=(cases,), timeout_s=60))
    for method in ("spava", "apb", "star"):
        b, r = f"{method}-broadcast", f"{method}-recompute"
        compare(plans[b], plans[r], [g[b] for g in got], [g[r] for g in got])
        # and the same as the emulated world (another process: equal up to fp64 rounding)
        compare(plans[b], plans[b], [g[b] for g in got], emulated(plans[b], 11))
    plan = plans["pass_all"]
    n = plan.layout.total_tokens
    q, k, v = global_inputs(n + EXTRA, 12)  # the last prefilled layer's inputs
    ref = dense_attention(q[:n], k[:n], v[:n])
    for rank, g in enumerate(got):
        (want,) = local_rows(plan, rank, ref)
        assert (g["pass_all"][0][1] - want).abs().max() < TOL, f"pass_all rank {rank}"


def test_the_headline_plan_charges_rank_0_and_predicts_less_than_recompute():
    from spava_plan.hydra_conf import compose_config
    from spava_plan.planner.build import anchor_work, derive
    from spava_plan.planner.cost import CostModel

    for method in ("spava", "apb", "star"):
        d_b = derive(compose_config([*HEADLINE, f"method={method}"]))
        d_r = derive(compose_config([*HEADLINE, f"method={method}", "method.anchor=recompute"]))
        assert d_b.prediction.makespan_us < d_r.prediction.makespan_us, method
        anchor = next(c for c in d_b.collectives if c.kind == "anchor_broadcast")
        assert anchor.bytes_per_rank > 0 and anchor.time_us > 0
        a = anchor.rows_per_rank
        for r in range(1, d_b.world):  # the others drop the anchor's rows and receive its K/V instead
            assert d_b.ranks[r].local_tokens == d_r.ranks[r].local_tokens - a
            assert d_b.memory[r]["passing"] == d_r.memory[r]["passing"] + anchor.bytes_per_rank
        assert d_b.ranks[0].local == d_r.ranks[0].local  # rank 0 runs the anchor as before
        for r in range(d_b.world):
            names = [s.name for s in d_b.steps[r]]
            assert names[:2] == ["qkv", "start:anchor"] and "wait:anchor" in names
    # spava's placement balances the hosts around rank 0's anchor work
    d = derive(compose_config(list(HEADLINE)))
    cfg = d.cfg
    work = anchor_work(d.part, CostModel(cfg.model, cfg.topology, cfg.dtype_bytes, d.world)).us
    pl = d.placement
    rank0 = sum(c for c, r in zip(pl.host_cost, pl.host_rank) if r == 0)
    assert work > 0 and pl.makespan >= rank0 + work - 1e-9


def test_methods_without_an_anchor_ignore_the_setting():
    for method in ("dense", "zigzag_ring"):
        for mode in ("broadcast", "recompute"):
            plan = plan_for(*SMALL, "gpus=2", f"method={method}", f"method.anchor={mode}")
            assert plan.anchor_mode == "recompute"
