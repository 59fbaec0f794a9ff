"""RankAttention on real gloo process groups (W = 2, 3, 4 spawned processes on this CPU).

One launch per world size runs every correctness case, and the parent checks the results against
fp64 dense attention and against the emulated world run on the same inputs (bit-identical: the
emulation only copies bytes, and both sides use one intra-op thread). Separate short launches
check that a rank that raises, dies or stalls makes the others fail with a clear message within
the process-group timeout.

Worker functions live at module level (spawn pickles them by name) and import no planner code.
"""
import functools
import os
import time

import pytest
import torch

from spava_plan.errors import DistributedError, SpavaError
from spava_plan.plan_load import plan_from_dict
from spava_plan.runtime.attention import RankAttention
from spava_plan.runtime.comm.emulated import EmulatedWorld
from spava_plan.runtime.launch import results_or_raise, run_local_world
from spava_plan.runtime.reference import dense_attention, local_rows

TOL = 1e-10  # fp64 end to end: only rounding separates the distributed result from dense attention
SMALL = ("model=tiny", "frames=16", "video.resolution=56x84", "method.anchor_tokens=13")  # 101 tokens
LARGE = ("model=tiny", "frames=100", "video.resolution=112x168")  # 1253 tokens, real top-k selection
EXTRA = 3  # decoded tokens: one step of 1, one of 2
TIMEOUT = 4.0  # process-group timeout of the failure tests (seconds)


def global_inputs(n, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, h, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2))


def run_case(attn, plan, rank, seed):
    """Prefill layer 1, then decode EXTRA tokens: (prefill out, [decode outs])."""
    n = plan.layout.total_tokens
    q, k, v = global_inputs(n + EXTRA, seed)
    out = attn.prefill(1, *local_rows(plan, rank, q[:n], k[:n], v[:n]))
    dec = [attn.decode(1, q[lo:hi], k[lo:hi], v[lo:hi]) for lo, hi in ((n, n + 1), (n + 1, n + EXTRA))]
    return out, dec


def _error(fn):
    try:
        fn()
    except SpavaError as exc:
        return type(exc).__name__, str(exc)
    return None


def a2a_splits(world):
    """Uneven all-to-all sizes with zeros: rank s sends (s + 2d) % 3 rows to rank d."""
    return [[(s + 2 * d) % 3 for d in range(world)] for s in range(world)]


def a2a_case(comm):
    """One uneven all_to_all_single: rank s's rows are numbered 100 s + row."""
    W, r = comm.world_size, comm.rank
    m = a2a_splits(W)
    inp = (torch.arange(sum(m[r]), dtype=torch.float64) + 100 * r).unsqueeze(1).repeat(1, 3)
    out = torch.full((sum(m[s][r] for s in range(W)), 3), -1.0, dtype=torch.float64)
    comm.all_to_all_single(out, inp, [m[s][r] for s in range(W)], m[r], tag="a2a")
    return out


# -- workers (run in the spawned processes) --------------------------------------------------------
def _correctness_worker(comm, cases, other_world_plan):
    results = {"a2a": a2a_case(comm)}
    for name, plan_dict, seed in cases:
        plan = plan_from_dict(plan_dict)
        results[name] = run_case(RankAttention(plan, comm.rank, comm), plan, comm.rank, seed)
    # Bad input, on a group that must stay usable afterwards (no rank may be left hanging).
    plan = plan_from_dict(cases[0][1])
    n = plan.layout.total_tokens
    q, k, v = local_rows(plan, comm.rank, *global_inputs(n, 0))
    bad = {"world": _error(lambda: RankAttention(plan_from_dict(other_world_plan), comm.rank, comm))}
    bad["model"] = _error(lambda: RankAttention(plan, comm.rank, comm).prefill(0, torch.cat([q, q], 1), k, v))
    short = (lambda t: t[:-1]) if comm.rank == 1 else (lambda t: t)
    bad["one_rank_shape"] = _error(lambda: RankAttention(plan, comm.rank, comm).prefill(0, q, short(k), v))
    comm.barrier()
    results["bad"] = bad
    results["alive"] = comm.all_gather(torch.tensor([comm.rank])).flatten().tolist()
    return results


def _failure_worker(comm, plan_dict, mode):
    plan = plan_from_dict(plan_dict)
    n = plan.layout.total_tokens
    q, k, v = local_rows(plan, comm.rank, *global_inputs(n, 0))
    attn = RankAttention(plan, comm.rank, comm)
    attn.prefill(0, q, k, v)  # the first call (agreement between the ranks) succeeds
    if comm.rank == 1 and mode == "raise":
        raise RuntimeError("rank 1 broke on purpose")
    if comm.rank == 1 and mode == "die":
        os._exit(3)
    start = time.monotonic()
    try:
        attn.prefill(1, q, k[:-1] if comm.rank == 1 and mode == "stall" else k, v)
    except SpavaError as exc:
        if comm.rank == 1 and mode == "stall":
            time.sleep(2 * TIMEOUT)  # stay alive without joining: the peers must time out, not hang
        return type(exc).__name__, str(exc), time.monotonic() - start
    return None


# -- parent side -----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def plan_for(*overrides):
    from spava_plan.hydra_conf import compose_config
    from spava_plan.planner.build import build_plan

    return build_plan(compose_config(list(overrides)))


def emulated_case(plan, seed):
    world = EmulatedWorld.for_plan(plan)
    attns = [RankAttention(plan, r, world.comm(r)) for r in range(plan.world_size)]
    return world.run(lambda r: run_case(attns[r], plan, r, seed))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_gloo_world_matches_dense_and_the_emulation(world):
    cases = {
        "pass_all": plan_for(*SMALL, f"gpus={world}", "method.pass_all=true"),
        "zigzag_ring": plan_for(*SMALL, f"gpus={world}", "method=zigzag_ring"),
        "spava": plan_for(*LARGE, f"gpus={world}"),
        "star": plan_for(*LARGE, f"gpus={world}", "method=star"),
        "apb": plan_for(*LARGE, f"gpus={world}", "method=apb"),
    }
    seeds = {name: i + 1 for i, name in enumerate(cases)}
    args = ([(name, p.to_dict(), seeds[name]) for name, p in cases.items()],
            plan_for(*SMALL, f"gpus={world + 1}", "method.pass_all=true").to_dict())
    got = results_or_raise(run_local_world(_correctness_worker, world, args=args, timeout_s=60))

    emulated = {name: emulated_case(p, seeds[name]) for name, p in cases.items()}
    for name, plan in cases.items():
        n, lq = plan.layout.total_tokens, plan.layout.query_tokens
        q, k, v = global_inputs(n + EXTRA, seeds[name])
        ref = dense_attention(q[:n], k[:n], v[:n])
        for r in range(world):
            out, dec = got[r][name]
            emu_out, emu_dec = emulated[name][r]
            # another process (other kernels and thread count, conftest.py): equal up to fp64 rounding
            assert max((a - b).abs().max().item() for a, b in zip([out, *dec], [emu_out, *emu_dec])) < TOL, \
                f"{name} rank {r}: emulated != gloo"
            (want,) = local_rows(plan, r, ref)
            if name in ("pass_all", "zigzag_ring"):  # exact methods: every row
                assert (out - want).abs().max() < TOL, f"{name} rank {r}"
            else:  # approximate methods: the query rows are still exact
                assert (out[-lq:] - want[-lq:]).abs().max() < TOL, f"{name} rank {r}"
            for (lo, hi), d in zip(((n, n + 1), (n + 1, n + EXTRA)), dec):  # decode is exact for all
                assert (d - dense_attention(q[lo:hi], k[:hi], v[:hi], past=lo)).abs().max() < TOL
    a2a_world = EmulatedWorld(world)
    emulated_a2a = a2a_world.run(lambda r: a2a_case(a2a_world.comm(r)))
    m = a2a_splits(world)
    for r in range(world):  # rank r gets, from each s in order, s's rows meant for r
        want = [100.0 * s + sum(m[s][:r]) + i for s in range(world) for i in range(m[s][r])]
        # exact: the all-to-all only copies rows of small integers
        assert got[r]["a2a"][:, 0].tolist() == want and torch.equal(got[r]["a2a"], emulated_a2a[r]), f"a2a rank {r}"
    for r in range(world):
        bad = got[r]["bad"]
        assert bad["world"][0] == "PlanMismatchError" and f"plan is for {world + 1} ranks but {world}" in bad["world"][1]
        assert bad["model"][0] == "PlanMismatchError" and "q has 8 heads" in bad["model"][1]
        kind, text = bad["one_rank_shape"]
        assert kind == "InputError" and ("k has" in text if r == 1 else "rank 1 rejected its input" in text)
        assert got[r]["alive"] == list(range(world))  # the group survived the bad input


def _failure_run(world, mode):
    plan = plan_for(*SMALL, f"gpus={world}", "method.pass_all=true")
    return run_local_world(_failure_worker, world, args=(plan.to_dict(), mode), timeout_s=TIMEOUT)


def test_a_rank_that_raises_fails_the_others_with_its_error():
    outcomes = _failure_run(3, "raise")
    assert not outcomes[1].ok and outcomes[1].error == "rank 1 broke on purpose"
    for r in (0, 2):
        kind, text, elapsed = outcomes[r].value
        assert kind == "DistributedError" and f"rank {r}:" in text
        assert "rank 1 failed: RuntimeError: rank 1 broke on purpose" in text
        assert elapsed < TIMEOUT  # the dead peer's closed socket is seen at once


def test_a_rank_that_dies_is_named_by_the_others():
    outcomes = _failure_run(2, "die")
    assert outcomes[1].exitcode == 3 and outcomes[1].error_type == "Died"
    kind, text, elapsed = outcomes[0].value
    assert kind == "DistributedError" and "rank 1 (pid" in text and "has exited" in text
    assert elapsed < TIMEOUT


def test_a_stalled_rank_makes_the_others_time_out_with_its_error():
    outcomes = _failure_run(2, "stall")
    kind, text, _ = outcomes[1].value
    assert kind == "InputError" and "k has" in text
    kind, text, elapsed = outcomes[0].value
    assert kind == "DistributedError" and f"timed out after {TIMEOUT:g} s" in text
    assert "rank 1 failed: InputError" in text
    assert elapsed < TIMEOUT + 3  # the process-group timeout, plus the blame look-up
    assert DistributedError.__name__ == kind
