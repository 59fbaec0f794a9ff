"""The one timeline model (spava_plan/critical_path.py): the ring fast path against the general
engine, rank relabelling, and the cost of collectives at large W. Hand-made traces:
test_runtime_timeline.py; the planner's and the emulated run's use of it: test_planner_schedule.py
and test_runtime_timeline.py."""
import random
import time

import pytest

from spava_plan.critical_path import (Compute, Start, Sync, Wait, ring_events, ring_peers, simulate, simulate_ring,
                                      spans)


def _random_ring(rng, W):
    first = [rng.uniform(0, 50) for _ in range(W)]
    last = [rng.uniform(0, 50) for _ in range(W)]
    # uneven: empty steps (a launch that finds no keys), and ranks up to 100x slower than others
    attend = [[rng.choice([0.0, rng.uniform(0, 100) * rng.choice([1, 100])]) for _ in range(W)] for _ in range(W)]
    return first, attend, last, rng.choice([0.0, rng.uniform(0, 80), 1e4])


@pytest.mark.parametrize("seed", range(4))
def test_ring_fast_path_is_the_general_engine(seed):
    rng = random.Random(seed)
    for _ in range(60):
        first, attend, last, cost = _random_ring(rng, rng.randint(1, 9))
        for record in (False, True):
            # exact: the same additions in the same order, and max() is exact
            assert simulate_ring(first, attend, last, cost, record) == simulate(ring_events(first, attend, last, cost),
                                                                               record)


def test_ring_fast_path_holds_when_peers_finish_their_transfers_late():
    # The general engine also waits for each peer's earlier transfer; the closed form only for the
    # rank's own stream. Rank 1 computes 1000x longer than its neighbours, so its transfers end
    # last: since a rank issues step s+1 only after its wait on step s, both agree.
    W = 4
    attend = [[1.0] * W, [1000.0] * W, [1.0] * W, [3.0, 0.0, 7.0, 1.0]]
    first, last = [1.0, 5.0, 0.0, 2.0], [1.0] * W
    fast = simulate_ring(first, attend, last, 50.0, record=True)
    assert fast == simulate(ring_events(first, attend, last, 50.0), record=True)
    assert max(fast.exposed_comm_us) > 0 and fast.finish_us[1] > fast.finish_us[0]


def test_ring_peers():
    assert ring_peers(0, 5) == (0, 1, 4) and ring_peers(1, 2) == (0, 1) and ring_peers(0, 1) == (0,)


def _random_traces(rng, W):
    """Collectives (async or blocking) in one order on every rank, and ring-like exchanges."""
    n = rng.randint(1, 6)
    kinds = [rng.choice(["async", "sync", "p2p"]) for _ in range(n)]
    costs = [rng.choice([0.0, rng.uniform(0, 50)]) for _ in range(n)]
    traces = []
    for r in range(W):
        events, pending = [], []
        for k in range(n):
            if rng.random() < 0.7:
                events.append(Compute(rng.uniform(0, 40)))
            peers = ring_peers(r, W) if kinds[k] == "p2p" else tuple(range(W))
            if kinds[k] == "sync":
                events += [Wait(p) for p in pending] + [Sync(k, peers, costs[k])]
                pending = []
                continue
            events.append(Start(k, peers, costs[k]))
            pending.append(k)
            if rng.random() < 0.5:
                events += [Compute(rng.uniform(0, 40))] * (rng.random() < 0.7) + [Wait(pending.pop(0))]
        traces.append(events + [Wait(p) for p in pending] + [Compute(rng.uniform(0, 5))])
    return traces


def test_relabelling_ranks_relabels_the_result():
    """The result is a function of the traces, not of the order the engine visits the ranks in."""
    rng = random.Random(7)
    for _ in range(200):
        W = rng.randint(1, 6)
        traces = _random_traces(rng, W)
        perm = list(range(W))
        rng.shuffle(perm)  # rank r becomes perm[r]; ring peers move with it only when W <= 3
        if W > 3 and any(isinstance(e, Start) and len(e.peers) < W for t in traces for e in t):
            perm = [(r + 1) % W for r in range(W)]  # a rotation keeps ring neighbours
        moved = [None] * W
        for r, t in enumerate(traces):
            moved[perm[r]] = [e if isinstance(e, (Compute, Wait)) else
                              type(e)(e.key, tuple(sorted(perm[p] for p in e.peers)), e.cost_us) for e in t]
        a, b = simulate(traces, record=True), simulate(moved, record=True)
        assert [a.finish_us[r] for r in range(W)] == [b.finish_us[perm[r]] for r in range(W)]
        assert [a.exposed_comm_us[r] for r in range(W)] == [b.exposed_comm_us[perm[r]] for r in range(W)]
        for r in range(W):  # every span lies inside the rank's timeline
            assert all(0 <= s[3] <= s[4] <= a.finish_us[r] + 1e-9 for s in spans(traces, a) if s[0] == r and s[1] != "comm")


def test_a_collective_is_resolved_once_not_once_per_rank():
    # 4096 ranks x 4 collectives: O(W) per collective is ~10^5 steps (well under a second even on a
    # loaded 2-core CI machine); once per rank, O(W^2), would be ~7 x 10^7 and take tens of seconds.
    W = 4096
    everyone = tuple(range(W))
    traces = [[Compute(1.0 + r % 7)] + [e for k in range(4) for e in (Start(k, everyone, 5.0), Compute(2.0), Wait(k))]
              for r in range(W)]
    t0 = time.perf_counter()
    line = simulate(traces)
    assert time.perf_counter() - t0 < 10.0  # generous: the O(W^2) engine takes ~30 s or more
    # the slowest rank issues the first at 7 us; each next one at the previous one's end (its
    # 2 us of compute hide under the 5 us transfer)
    assert line.finish_us == (7.0 + 4 * 5.0,) * W and line.exposed_comm_us[0] == (12.0 - 3.0) + 3 * (5.0 - 2.0)


def test_a_communication_nobody_else_issues_is_reported():
    with pytest.raises(ValueError, match="never"):
        simulate([[Start("a", (0, 1), 1.0), Compute(1.0)], [Compute(1.0)]])
    with pytest.raises(ValueError, match="twice"):
        simulate([[Start("a", (0,), 1.0), Start("a", (0,), 1.0)]])
