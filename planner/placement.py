"""Assign virtual hosts to ranks.

Every rank runs exactly ``hosts_per_rank`` hosts, so every selection all-gather slot has one
buffer per rank (equal sizes, one collective per slot). Solvers sit behind one interface,
``place(costs, world, hosts_per_rank, solver) -> Placement``; each reports its makespan, a lower
bound and the gap between them.

- zigzag: the paper's snake order (rank r runs hosts r and V-1-r for two hosts per rank).
- greedy: LPT (longest processing time first) under the cardinality constraint: hosts in
  decreasing cost go to the least-loaded rank that still has room.
- exact: depth-first branch and bound over assignments, proven optimal (its lower bound is its
  makespan); refused above ``solver.exact_max_hosts`` hosts because it is exponential.
- local_search: from the better of zigzag and greedy, seeded pairwise swaps between the busiest
  rank and another rank, accepted when they lower (makespan, sum of squared loads).
  Deterministic for a given ``solver.seed``.

Host costs are the cost model's per-layer time of each host (attention, selection and the
per-token work of its rows), so makespans are microseconds per layer. ``base`` is work a rank has
whatever hosts it runs (method.anchor=broadcast: rank 0 runs the anchor for every rank); every
solver starts the ranks at these loads, so the hosts balance around it.
"""
from __future__ import annotations

import heapq
import random
from typing import Callable, Sequence

from spava_plan.config import SolverConfig
from spava_plan.errors import ConfigError
from spava_plan.plan import Placement


def zigzag_assignment(hosts: int, world: int) -> list[int]:
    """Snake order: host v = s*W + i goes to rank i on even rounds s and W-1-i on odd ones."""
    assert hosts % world == 0, (hosts, world)
    ranks = []
    for v in range(hosts):
        s, i = divmod(v, world)
        ranks.append(i if s % 2 == 0 else world - 1 - i)
    return ranks


Base = Sequence[float]  # per-rank work before any host (empty: none)


def _start_loads(world: int, base: Base = ()) -> list[float]:
    return [float(base[r]) if base else 0.0 for r in range(world)]


def makespan(costs: Sequence[float], host_rank: Sequence[int], world: int, base: Base = ()) -> float:
    loads = _start_loads(world, base)
    for cost, rank in zip(costs, host_rank):
        loads[rank] += cost
    return max(loads)


def lower_bound(costs: Sequence[float], world: int, hosts_per_rank: int, base: Base = ()) -> float:
    """No assignment of ``hosts_per_rank`` hosts per rank beats this makespan.

    The average load, and the sum of the k largest hosts' share: some rank holds the largest host
    plus hosts_per_rank-1 others, at least the smallest ones; and the busiest base plus its rank's
    hosts_per_rank smallest hosts.
    """
    ordered = sorted(costs)
    start = _start_loads(world, base)
    average = (sum(costs) + sum(start)) / world
    cardinality = ordered[-1] + sum(ordered[: hosts_per_rank - 1]) + min(start)
    return max(average, cardinality, max(start) + sum(ordered[:hosts_per_rank]))


def _zigzag(costs: Sequence[float], world: int, hosts_per_rank: int, solver: SolverConfig, base: Base = ()) -> list[int]:
    return zigzag_assignment(len(costs), world)


def _greedy(costs: Sequence[float], world: int, hosts_per_rank: int, solver: SolverConfig, base: Base = ()) -> list[int]:
    """LPT with exactly ``hosts_per_rank`` hosts per rank (ties -> lowest rank, deterministic)."""
    heap = [(load, r) for r, load in enumerate(_start_loads(world, base))]  # (load, rank) of ranks with room
    heapq.heapify(heap)
    count = [0] * world
    host_rank = [0] * len(costs)
    for v in sorted(range(len(costs)), key=lambda v: (-costs[v], v)):
        load, r = heapq.heappop(heap)
        host_rank[v] = r
        count[r] += 1
        if count[r] < hosts_per_rank:
            heapq.heappush(heap, (load + costs[v], r))
    return host_rank


# Branch-and-bound nodes solver=exact may visit. With equal ranks the search meets the lower bound
# almost at once; rank 0's anchor work (method.anchor=broadcast) makes the ranks unequal, the bound
# unreachable and the proof exhaustive (16 hosts on 8 ranks: ~1e8 nodes, minutes of Python). Past
# the budget the best assignment found stands, and the plan's gap (makespan against the lower bound)
# says how far from proven it is.
EXACT_NODE_BUDGET = 200_000


class _Assignment(list):
    """host -> rank, and whether the solver proved it optimal (solver=exact within its budget)."""
    proven = False


def _exact(costs: Sequence[float], world: int, hosts_per_rank: int, solver: SolverConfig, base: Base = ()) -> list[int]:
    """Branch and bound: hosts in decreasing cost, each to a rank with room; ranks in the same
    (load, count) state are interchangeable, so only the first of them is tried. Optimal when the
    search ends within EXACT_NODE_BUDGET nodes (always with equal ranks at the sizes it takes)."""
    n = len(costs)
    if n > solver.exact_max_hosts:
        raise ConfigError(f"solver=exact handles at most solver.exact_max_hosts={solver.exact_max_hosts} virtual "
                          f"hosts but this plan has {n}; use solver=local_search or solver=greedy",
                          setting="solver")
    order = sorted(range(n), key=lambda v: (-costs[v], v))
    best_ranks = _greedy(costs, world, hosts_per_rank, solver, base)
    best = [makespan(costs, best_ranks, world, base)]
    bound = lower_bound(costs, world, hosts_per_rank, base)
    loads = _start_loads(world, base)
    count = [0] * world
    current = [0] * n
    # every host still to place costs at least this; with every slot taken (n = world * hosts_per_rank,
    # as the partition makes it) each rank's free slots are all filled
    smallest = costs[order[-1]] if n and n == world * hosts_per_rank else 0.0
    nodes = [0]

    def search(i: int, peak: float) -> None:
        nodes[0] += 1
        if peak >= best[0] or best[0] <= bound or nodes[0] > EXACT_NODE_BUDGET:
            return  # cannot improve, the incumbent is already proven optimal, or the budget is spent
        if max(loads[r] + (hosts_per_rank - count[r]) * smallest for r in range(world)) >= best[0]:
            return  # every rank still fills its free slots, each with at least the smallest host
        if i == n:
            best[0] = peak
            best_ranks[:] = current
            return
        v = order[i]
        seen = set()
        for r in range(world):
            state = (loads[r], count[r])
            if count[r] == hosts_per_rank or state in seen:
                continue
            seen.add(state)
            loads[r] += costs[v]
            count[r] += 1
            current[v] = r
            search(i + 1, max(peak, loads[r]))
            loads[r] -= costs[v]
            count[r] -= 1

    search(0, max(loads))
    out = _Assignment(best_ranks)
    out.proven = nodes[0] <= EXACT_NODE_BUDGET
    return out


def _objective(loads: Sequence[float]) -> tuple[float, float]:
    return max(loads), sum(x * x for x in loads)


def _local_search(costs: Sequence[float], world: int, hosts_per_rank: int, solver: SolverConfig,
                  base: Base = ()) -> list[int]:
    """Seeded swaps: a host of the busiest rank against a host of a random other rank."""
    starts = [zigzag_assignment(len(costs), world), _greedy(costs, world, hosts_per_rank, solver, base)]
    host_rank = min(starts, key=lambda hr: (makespan(costs, hr, world, base), starts.index(hr)))[:]
    if world == 1:
        return host_rank
    rng = random.Random(solver.seed)
    loads = _start_loads(world, base)
    members: list[list[int]] = [[] for _ in range(world)]
    for v, r in enumerate(host_rank):
        loads[r] += costs[v]
        members[r].append(v)
    best = _objective(loads)
    for _ in range(solver.iterations):
        busiest = max(range(world), key=lambda r: (loads[r], -r))
        other = rng.randrange(world - 1)
        other += other >= busiest  # any rank but the busiest
        a = rng.choice(members[busiest])
        b = rng.choice(members[other])
        delta = costs[b] - costs[a]
        loads[busiest] += delta
        loads[other] -= delta
        trial = _objective(loads)
        if trial < best:
            best = trial
            members[busiest][members[busiest].index(a)] = b
            members[other][members[other].index(b)] = a
            host_rank[a], host_rank[b] = other, busiest
        else:
            loads[busiest] -= delta
            loads[other] += delta
    return host_rank


SOLVERS: dict[str, Callable[[Sequence[float], int, int, SolverConfig, Base], list[int]]] = {
    "zigzag": _zigzag,
    "greedy": _greedy,
    "exact": _exact,
    "local_search": _local_search,
}


def place(costs: Sequence[float], world: int, hosts_per_rank: int, solver: SolverConfig,
          base: Base = ()) -> Placement:
    """``base``: per-rank work before any host (empty, or one value per rank)."""
    assert len(costs) == world * hosts_per_rank, (len(costs), world, hosts_per_rank)
    assert not base or len(base) == world, (len(base), world)
    host_rank = SOLVERS[solver.name](costs, world, hosts_per_rank, solver, base)
    assert sorted(host_rank) == sorted(r for r in range(world) for _ in range(hosts_per_rank)), host_rank
    span = makespan(costs, host_rank, world, base)
    # An assignment proven optimal (solver=exact within its budget): its makespan is the tightest
    # lower bound there is.
    bound = span if getattr(host_rank, "proven", False) else lower_bound(costs, world, hosts_per_rank, base)
    return Placement(solver=solver.name, host_rank=tuple(host_rank), host_cost=tuple(float(c) for c in costs),
                     rank_base=tuple(float(b) for b in base), makespan=span, lower_bound=min(bound, span))
