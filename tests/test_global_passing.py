"""method.passing=global against an independent fp64 reference of its selection.

The reference below is written from SPAVA_SPEC.md sections 4, 6 and 11, not from the runtime: per
KV head, score every key of every block by its dot product with the query-mean vector, max-pool
inside the block, then host v's passing keys are the P best of ALL keys of hosts < v (ties broken
by the earlier position); host v's rows attend [those keys | anchor | own block causally], anchor
rows the anchor causally, query rows everything causally. One dense masked softmax per row block
in fp64. The runtime runs the prefix scan of spava_plan/passing_scan.py instead (candidates,
rounds of all-to-alls, merges): the two must choose the same keys and give the same rows.

Emulated worlds of 2..16 ranks here; real gloo process groups (W = 2, 3, 4) further down.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

from spava_plan.passing_scan import rank_round, round_messages, scan_rounds
from spava_plan.plan_load import plan_from_dict
from spava_plan.runtime.attention import RankAttention
from spava_plan.runtime.comm.emulated import EmulatedWorld
from spava_plan.runtime.launch import results_or_raise, run_local_world
from spava_plan.runtime.reference import local_rows

TOL = 1e-10  # fp64 end to end: the kept keys are the same, only summation order differs
TINY = ("model=tiny", "video.resolution=112x168")  # 24 tokens per temporal grid of 2 frames
# frames giving every block at least 128 tokens (one selection tile) at each world size
FRAMES = {2: 100, 3: 100, 4: 100, 8: 184, 16: 360}


@functools.lru_cache(maxsize=None)
def plan_for(*overrides):
    from spava_plan.hydra_conf import compose_config
    from spava_plan.planner.build import build_plan

    return build_plan(compose_config(list(overrides)))


def global_plan(world: int, passing: int = 128, *extra: str):
    return plan_for(*TINY, f"frames={FRAMES[world]}", f"gpus={world}", "method.passing=global",
                    f"method.passing_tokens={passing}", *extra)


def inputs(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, h, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2))


# -- the reference ---------------------------------------------------------------------------------
def reference_choice(plan, q, k) -> dict[int, list[list[int]]]:
    """host v -> per KV head, the sorted global positions of its P passing keys (the question is
    every row of q after the context: a shorter prompt than the plan's is passed cut)."""
    lay = plan.layout
    ctx, lq = lay.context_tokens, q.shape[0] - lay.context_tokens
    hkv, g, d = plan.model.num_kv_heads, plan.model.group, plan.model.head_dim
    w = plan.selection.pool_window
    qbar = q[ctx:].reshape(lq, hkv, g, d).mean(dim=(0, 2))  # (Hkv, D)
    blocks = sorted((s for s in lay.segments if s.kind == "block"), key=lambda s: s.host)
    keep = blocks[0].keep
    pooled = []  # per block: (n, Hkv) pooled scores, -inf outside the block
    for b in blocks:
        raw = (k[b.start:b.stop] * qbar).sum(-1)  # (n, Hkv)
        n = raw.shape[0]
        pooled.append(torch.stack([raw[max(0, j - w // 2):min(n, j + w // 2 + 1)].amax(0) for j in range(n)]))
    out = {}
    for v in range(1, len(blocks)):
        heads = []
        for h in range(hkv):
            cands = [(-float(pooled[u][j, h]), blocks[u].start + j) for u in range(v) for j in range(blocks[u].length)]
            heads.append(sorted(p for _, p in sorted(cands)[:keep]))
        out[v] = heads
    return out


def reference_rows(plan, q, k, v, choice) -> torch.Tensor:
    """(N, Hq, D) outputs of global passing, one masked dense softmax per row block."""
    lay = plan.layout
    n, hkv, g, d = q.shape[0], plan.model.num_kv_heads, plan.model.group, plan.model.head_dim
    kk, vv = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    pos = torch.arange(n)
    out = torch.empty_like(q)
    a = lay.anchor_tokens
    spans = [(0, a, None)] if a else []
    spans += [(s.start, s.stop, s.host) for s in lay.segments if s.kind == "block"]
    spans.append((lay.context_tokens, n, "query"))
    for lo, hi, host in spans:
        rows = pos[lo:hi].unsqueeze(1)
        if host is None:  # anchor rows: the anchor, causally
            vis = (pos < a) & (pos <= rows)
            mask = vis.unsqueeze(0).expand(hkv * g, -1, -1)
        elif host == "query":  # exact causal attention over everything
            mask = (pos <= rows).unsqueeze(0).expand(hkv * g, -1, -1)
        else:
            own = (pos >= lo) & (pos <= rows)
            base = own | (pos < a)
            per_head = []
            for h in range(hkv):
                chosen = torch.zeros(n, dtype=torch.bool)
                if host > 0:
                    chosen[choice[host][h]] = True
                per_head.append(base | chosen)
            mask = torch.stack(per_head).repeat_interleave(g, dim=0)
        s = torch.einsum("mhd,nhd->hmn", q[lo:hi], kk) / math.sqrt(d)
        p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
        out[lo:hi] = torch.einsum("hmn,nhd->mhd", p, vv)
    return out


# -- the scan's structure ----------------------------------------------------------------------------
@pytest.mark.parametrize("hosts", [1, 2, 3, 4, 5, 8, 9, 33, 2048])
def test_scan_rounds_give_every_host_exactly_the_earlier_hosts(hosts):
    covered = [set() for _ in range(hosts)]
    for k in range(scan_rounds(hosts)):
        new = [set(c) for c in covered]
        for m in round_messages(hosts, k):
            new[m.dst] = (covered[m.dst] | covered[m.src]) if m.merge else {m.src}
            assert m.merge == (k > 0) and max(covered[m.src], default=-1) < min(covered[m.dst], default=hosts)
        covered = new
    assert covered == [set(range(v)) for v in range(hosts)]
    if hosts > 2:
        assert scan_rounds(hosts) == 1 + math.ceil(math.log2(hosts - 1))


def test_every_rank_sends_and_receives_at_most_one_message_per_host_per_round():
    host_rank = tuple(r for r in range(8) for _ in range(2))  # any placement, two hosts per rank
    for k in range(scan_rounds(16)):
        for r in range(8):
            send, recv = rank_round(host_rank, k, r)
            assert sum(map(len, send)) <= 2 and sum(map(len, recv)) <= 2


# -- emulated worlds ---------------------------------------------------------------------------------
def run_emulated(plan, q, k, v):
    world = EmulatedWorld.for_plan(plan, timeout_s=120)
    attns = [RankAttention(plan, r, world.comm(r)) for r in range(plan.world_size)]
    outs = world.run(lambda r: attns[r].prefill(0, *local_rows(plan, r, q, k, v)))
    return outs, [a.passing_positions() for a in attns]


def check_against_reference(plan, outs, positions, q, k, v):
    choice = reference_choice(plan, q, k)
    ref = reference_rows(plan, q, k, v, choice)
    seen = set()
    for r, rp in enumerate(plan.ranks):
        for host, got in positions[r].items():
            want = torch.tensor(choice[host]).T  # (P, Hkv)
            assert torch.equal(got.sort(dim=0).values, want), f"rank {r} host {host}: other keys chosen"
            seen.add(host)
        (want,) = local_rows(plan, r, ref)
        err = (outs[r] - want).abs().max().item()
        assert err < TOL, f"rank {r}: {err:.2e}"
    assert seen == set(range(1, plan.layout.virtual_hosts))


@pytest.mark.parametrize("world", [2, 8, 16])
def test_emulated_global_passing_matches_the_reference(world):
    plan = global_plan(world)
    q, k, v = inputs(plan.layout.total_tokens, seed=world)
    outs, positions = run_emulated(plan, q, k, v)
    check_against_reference(plan, outs, positions, q, k, v)


def test_a_budget_larger_than_one_block_is_capped_and_still_exact():
    plan = global_plan(2, 384, "solver=greedy")  # blocks of 272 tokens: keep 256; another placement
    assert plan.layout.blocks[0].keep == 256 and plan.placement.solver == "greedy"
    q, k, v = inputs(plan.layout.total_tokens, seed=7)
    outs, positions = run_emulated(plan, q, k, v)
    check_against_reference(plan, outs, positions, q, k, v)


def test_global_plan_round_trips_and_passes_a_bounded_budget():
    plan = global_plan(16)
    again = plan_from_dict(plan.to_dict())
    assert again == plan and again.hash == plan.hash
    (scan,) = [c for c in plan.collectives if c.kind == "select_scan"]
    assert not any(c.kind == "select_all_gather" for c in plan.collectives)
    for rp in plan.ranks:
        for t in rp.tasks:
            passing = [ref for ref in t.kv if ref.kind == "passing"]
            assert sum(ref.length for ref in passing) == (scan.rows_per_rank if t.name not in ("anchor", "query",
                                                                                                  "host0") else 0)


def test_global_passing_refuses_what_it_cannot_do():
    from spava_plan.errors import ConfigError
    from spava_plan.hydra_conf import compose_config

    with pytest.raises(ConfigError, match="method.pass_all"):
        compose_config([*TINY, "method.passing=global", "method.pass_all=true"])
    with pytest.raises(ConfigError, match="method.passing"):
        compose_config([*TINY, "method=apb", "method.passing=global"])
    with pytest.raises(ConfigError, match="method.passing"):
        compose_config([*TINY, "method.passing=everything"])


# -- real gloo process groups ----------------------------------------------------------------------
def _gloo_worker(comm, plan_dict, seed):
    plan = plan_from_dict(plan_dict)
    q, k, v = inputs(plan.layout.total_tokens, seed)
    attn = RankAttention(plan, comm.rank, comm)
    out = attn.prefill(0, *local_rows(plan, comm.rank, q, k, v))
    return out, attn.passing_positions()


@pytest.mark.parametrize("world", [2, 3, 4])
def test_gloo_global_passing_matches_the_reference(world):
    plan = global_plan(world)
    seed = 10 + world
    got = results_or_raise(run_local_world(_gloo_worker, world, args=(plan.to_dict(), seed), timeout_s=120))
    q, k, v = inputs(plan.layout.total_tokens, seed)
    check_against_reference(plan, [o for o, _ in got], [p for _, p in got], q, k, v)


def test_decode_after_global_prefill_is_exact():
    """The KV cache is the same as per_block's (every token once): decode stays exact attention."""
    from spava_plan.runtime.reference import dense_attention

    plan = global_plan(3)
    n = plan.layout.total_tokens
    q, k, v = inputs(n + 2, seed=5)
    world = EmulatedWorld.for_plan(plan, timeout_s=120)
    attns = [RankAttention(plan, r, world.comm(r)) for r in range(plan.world_size)]

    def run(r):
        attns[r].prefill(0, *local_rows(plan, r, q[:n], k[:n], v[:n]))
        return attns[r].decode(0, q[n:], k[n:], v[n:])

    want = dense_attention(q, k, v)[n:]
    for r, got in enumerate(world.run(run)):
        assert (got - want).abs().max() < TOL, f"rank {r}"


def test_scan_buffers_are_what_the_memory_model_charges():
    """planner/memory.py charges the scan 4 messages per host + a 2-message merge per rank: at
    least what the runtime allocates."""
    from spava_plan.planner.memory import _comm_buffers

    plan = global_plan(8)
    (scan,) = [c for c in plan.collectives if c.kind == "select_scan"]
    for r, rp in enumerate(plan.ranks):
        attn = RankAttention(plan, r, EmulatedWorld(plan.world_size).comm(r))
        bufs = attn.scan.buffers(2, 32, torch.bfloat16, torch.device("cpu"))
        held = sum(t.numel() * t.element_size() for t in bufs.values())
        merge = 2 * scan.bytes_per_rank // len(rp.hosts)
        charged, _ = _comm_buffers(plan.collectives, plan.world_size, len(rp.hosts))
        assert held + merge <= charged, (r, held, charged)


def test_global_passing_on_the_generated_kernels(tmp_path):
    """The generated Triton kernels read the scan's passing buffers like any passing segment:
    fp32 kernels against the fp64 reference, rounding only."""
    pytest.importorskip("triton")
    from spava_plan.codegen import render_kernels
    from spava_plan.runtime.backends.triton_gen import TritonBackend

    from test_question_range import _Locked

    plan = global_plan(2)
    render_kernels(plan, tmp_path)
    backend = _Locked(TritonBackend(tmp_path, plan_hash=plan.hash, tune=False,
                                    render=functools.partial(render_kernels, plan)))
    q, k, v = inputs(plan.layout.total_tokens, seed=3)
    world = EmulatedWorld.for_plan(plan, timeout_s=600)
    attns = [RankAttention(plan, r, world.comm(r), backend) for r in range(plan.world_size)]
    outs = world.run(lambda r: attns[r].prefill(0, *(x.float() for x in local_rows(plan, r, q, k, v))))
    ref = reference_rows(plan, q, k, v, reference_choice(plan, q, k))
    for r, out in enumerate(outs):
        (want,) = local_rows(plan, r, ref)
        # 1e-4: fp32 kernels; the fp32 inputs rank the same keys (no two candidates of these
        # random inputs lie within fp32 rounding of the cut)
        assert out.dtype == torch.float32 and (out.double() - want).abs().max() < 1e-4, f"rank {r}"


def _tampered(plan, edit):
    import copy
    import json

    from spava_plan.plan import content_hash

    data = copy.deepcopy(json.loads(plan.to_json()))
    edit(data)
    data["hash"] = content_hash(data)  # a consistent hash: only the plan's own checks can refuse it
    return data


def _passing_ref(data):
    return next(ref for t in data["ranks"][1]["tasks"] for ref in t["kv"] if ref["kind"] == "passing")


@pytest.mark.parametrize("edit, field", [
    (lambda d: _passing_ref(d).update(rank_stop=2), "kv"),  # a scan buffer is one [0, 1) run
    (lambda d: _passing_ref(d).update(keep=256), "keep"),
    (lambda d: d["collectives"][0].update(time_us=1.0), "time_us"),
    (lambda d: d["config"]["method"].update(passing="per_block"), "collectives"),
    (lambda d: d["collectives"].append(dict(d["collectives"][0], name="scan2")), "kind"),
])
def test_load_refuses_an_inconsistent_global_plan(edit, field):
    from spava_plan.errors import PlanFormatError

    plan = global_plan(2)
    assert plan.collectives[0].kind == "select_scan"
    with pytest.raises(PlanFormatError, match=field):
        plan_from_dict(_tampered(plan, edit))


def test_single_rank_mode_and_the_emulated_timing_pass_run_a_global_plan(tmp_path, capsys):
    """The paths the GPU measurements take: one rank alone (runtime/solo.py fills the scan's
    messages with random rows) through the whole model, and the emulated timing replay."""
    from spava_plan.entry import run
    from spava_plan.hydra_conf import compose_config
    from spava_plan.planner.build import build_plan

    plan = build_plan(compose_config(["model=tiny", "gpus=3", "frames=32", "video.resolution=224x224",
                                      "method.passing=global", "kernels=false"]))
    path = plan.save(tmp_path / "plan.json")
    rc = run.main([f"plan={path}", "model.init=random", "rank=2", "max_new_tokens=2", "device=cpu"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "single-rank (rank 2 of 3 alone" in out.out

    plan = global_plan(4)
    q, k, v = inputs(plan.layout.total_tokens, seed=1)
    world = EmulatedWorld.for_plan(plan, timeout_s=120)
    attns = [RankAttention(plan, r, world.comm(r)) for r in range(plan.world_size)]
    timing = world.time(lambda r: attns[r].prefill(0, *local_rows(plan, r, q, k, v)), repeats=1)
    assert len(timing.rank_compute_us) == 4 and timing.makespan_us > 0 and "emulated" in timing.label


@pytest.mark.parametrize("extra", [("method.overlap=false",), ("method.hosts_per_gpu=3",), ("method.hosts_per_gpu=1",),
                                   ("solver=local_search",)])
def test_other_schedules_and_host_counts_match_the_reference(extra):
    plan = plan_for(*TINY, "frames=184", "gpus=3", "method.passing=global", "method.passing_tokens=128", *extra)
    q, k, v = inputs(plan.layout.total_tokens, seed=21)
    outs, positions = run_emulated(plan, q, k, v)
    check_against_reference(plan, outs, positions, q, k, v)


def test_default_plans_do_not_carry_the_new_settings():
    """A per_block plan is written as before global passing existed (same bytes and hash): the
    new settings at their defaults are left out of its config, and read back as the defaults."""
    plan = plan_for(*TINY, "frames=100", "gpus=3")
    assert "passing" not in plan.config["method"] and "passing" not in plan.deployment.get("tune", {})
    assert plan_from_dict(plan.to_dict()).hash == plan.hash
    glob = global_plan(3)
    assert glob.config["method"]["passing"] == "global"


def test_a_shorter_question_on_a_global_plan_is_exact_for_its_real_rows():
    """The server pads a shorter question at the end of the query block: the selection ranks keys
    by the real query rows only, and every real row equals the reference on the unpadded prompt."""
    plan = global_plan(3)
    n = plan.layout.total_tokens
    real = n - 4
    q, k, v = inputs(n, seed=33)
    world = EmulatedWorld.for_plan(plan, timeout_s=120)
    attns = [RankAttention(plan, r, world.comm(r)) for r in range(plan.world_size)]
    for a in attns:
        a.set_prompt_tokens(real)
    outs = world.run(lambda r: attns[r].prefill(0, *local_rows(plan, r, q, k, v)))
    choice = reference_choice(plan, q[:real], k[:real])
    ref = reference_rows(plan, q[:real], k[:real], v[:real], choice)
    for r, a in enumerate(attns):
        for host, got in a.passing_positions().items():
            assert torch.equal(got.sort(dim=0).values, torch.tensor(choice[host]).T), f"rank {r} host {host}"
        idx = torch.cat([torch.arange(lo, hi) for lo, hi in plan.ranks[r].local])
        keep = idx < real
        err = (outs[r][keep] - ref[idx[keep]]).abs().max().item()
        assert err < TOL, f"rank {r}: {err:.2e}"
