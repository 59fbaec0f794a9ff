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


def _exact(costs: Sequence[float], world: int, hosts_per_rank: int, solver: SolverConfig, base: Base = ()) -> list[int]:
    """Branch and bound: hosts in decreasing cost, each to a rank with room; ranks in the same
    (load, count) state are interchangeable, so only the first of them is tried."""
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

    def search(i: int, peak: float) -> None:
        if peak >= best[0] or best[0] <= bound:
            return  # cannot improve, or the incumbent is already proven optimal
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
    return list(best_ranks)


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
    # The exact solver proves optimality: its makespan is the tightest lower bound there is.
    bound = span if solver.name == "exact" else lower_bound(costs, world, hosts_per_rank, base)
    return Placement(solver=solver.name, host_rank=tuple(host_rank), host_cost=tuple(float(c) for c in costs),
                     rank_base=tuple(float(b) for b in base), makespan=span, lower_bound=min(bound, span))
