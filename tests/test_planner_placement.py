"""Placement solvers against brute-force optima: constraint, makespan, lower bound and gap."""
import itertools
import random
import time

import pytest

from spava_plan.config import SolverConfig
from spava_plan.errors import SpavaError
from spava_plan.planner.placement import lower_bound, makespan, place, zigzag_assignment


def _optimum(costs, world, k):
    """Brute force over every assignment with exactly k hosts per rank."""
    best = float("inf")
    slots = [r for r in range(world) for _ in range(k)]
    for perm in set(itertools.permutations(slots)):
        best = min(best, makespan(costs, perm, world))
    return best


def _instances(n: int):
    rng = random.Random(7)
    for _ in range(n):
        world = rng.choice([2, 3, 4])
        k = rng.choice([1, 2]) if world < 4 else 2
        yield [rng.uniform(1, 100) for _ in range(world * k)], world, k


@pytest.mark.parametrize("costs, world, k", list(_instances(12)))
def test_solvers_respect_the_constraint_and_bounds(costs, world, k):
    opt = _optimum(costs, world, k)
    assert lower_bound(costs, world, k) <= opt + 1e-9
    for name in ("zigzag", "greedy", "exact", "local_search"):
        p = place(costs, world, k, SolverConfig(name=name, iterations=300, seed=3))
        assert sorted(p.host_rank) == sorted(r for r in range(world) for _ in range(k)), name
        assert p.makespan == pytest.approx(makespan(costs, p.host_rank, world))
        assert p.lower_bound <= p.makespan + 1e-9 and p.makespan >= opt - 1e-9, name
        assert p.gap == pytest.approx(p.makespan / p.lower_bound - 1.0)
        if name == "exact":  # proven optimal: gap 0
            assert p.makespan == pytest.approx(opt) and p.gap == 0.0


def test_greedy_is_lpt_with_cardinality():
    # LPT by hand: 9 -> r0, 8 -> r1, 7 -> r1 (lighter), 1 -> r0 (r1 is full)
    p = place([9, 8, 7, 1], 2, 2, SolverConfig(name="greedy"))
    assert p.host_rank == (0, 1, 1, 0) and p.makespan == 15


def test_local_search_is_deterministic_and_never_worse_than_its_starts():
    rng = random.Random(11)
    for _ in range(5):
        world, k = 16, 2
        costs = [rng.uniform(1, 10) ** 2 for _ in range(world * k)]
        cfg = SolverConfig(name="local_search", iterations=500, seed=5)
        a, b = place(costs, world, k, cfg), place(costs, world, k, cfg)
        assert a == b  # same seed, same placement
        start = min(makespan(costs, zigzag_assignment(world * k, world), world),
                    place(costs, world, k, SolverConfig(name="greedy")).makespan)
        assert a.makespan <= start + 1e-9


def test_zigzag_balances_linear_passing_work():
    # host v's passing work grows linearly in v: the snake pairs (v, V-1-v) have equal sums
    world = 8
    costs = [100.0 + 10.0 * v for v in range(2 * world)]
    p = place(costs, world, 2, SolverConfig(name="zigzag"))
    assert p.host_rank[:world] == tuple(range(world)) and p.host_rank[world:] == tuple(reversed(range(world)))
    assert p.gap == pytest.approx(0.0, abs=1e-12)


def test_exact_refuses_large_problems_naming_the_solver():
    with pytest.raises(SpavaError, match=r"solver.*exact_max_hosts=4"):
        place([1.0] * 8, 4, 2, SolverConfig(name="exact", exact_max_hosts=4))


def test_exact_with_rank_zeros_anchor_work_is_optimal_when_small_and_bounded_when_not():
    """method.anchor=broadcast gives rank 0 base work: the ranks are no longer interchangeable, so
    the proof can be exhaustive. Small: exact equals brute force. 16 hosts on 8 ranks: it stops at
    its node budget with an assignment no worse than greedy's, its gap stated against the bound."""
    rng = random.Random(3)
    costs = [rng.uniform(1, 10) for _ in range(6)]
    base = [7.0, 0.0, 0.0]
    best = min(makespan(costs, hr, 3, base) for hr in itertools.product(range(3), repeat=6)
               if all(hr.count(r) == 2 for r in range(3)))
    p = place(costs, 3, 2, SolverConfig(name="exact"), base)
    assert p.makespan == pytest.approx(best) and p.lower_bound == p.makespan
    big = [rng.uniform(1, 10) for _ in range(16)]
    big_base = [25.0] + [0.0] * 7
    t0 = time.perf_counter()
    ex = place(big, 8, 2, SolverConfig(name="exact"), big_base)
    assert time.perf_counter() - t0 < 60
    greedy = place(big, 8, 2, SolverConfig(name="greedy"), big_base)
    assert ex.makespan <= greedy.makespan + 1e-9 and ex.lower_bound <= ex.makespan
