"""Assign virtual hosts to ranks.

Every rank runs exactly ``hosts_per_rank`` hosts, so every selection all-gather slot has one
buffer per rank (equal sizes, one collective per slot). Solvers sit behind one interface,
``place(costs, world, hosts_per_rank, solver) -> Placement``; each reports its makespan, a lower
bound and the gap between them.

- zigzag: the paper's snake order (rank r runs hosts r and V-1-r for two hosts per rank).
"""
from __future__ import annotations

from typing import Callable, Sequence

from spava_plan.config import SolverConfig
from spava_plan.plan import Placement


def zigzag_assignment(hosts: int, world: int) -> list[int]:
    """Snake order: host v = s*W + i goes to rank i on even rounds s and W-1-i on odd ones."""
    assert hosts % world == 0, (hosts, world)
    ranks = []
    for v in range(hosts):
        s, i = divmod(v, world)
        ranks.append(i if s % 2 == 0 else world - 1 - i)
    return ranks


def makespan(costs: Sequence[float], host_rank: Sequence[int], world: int) -> float:
    loads = [0.0] * world
    for cost, rank in zip(costs, host_rank):
        loads[rank] += cost
    return max(loads)


def lower_bound(costs: Sequence[float], world: int, hosts_per_rank: int) -> float:
    """No assignment of ``hosts_per_rank`` hosts per rank beats this makespan.

    The average load, and the sum of the k largest hosts' share: some rank holds the largest host
    plus hosts_per_rank-1 others, at least the smallest ones.
    """
    ordered = sorted(costs)
    average = sum(costs) / world
    cardinality = ordered[-1] + sum(ordered[: hosts_per_rank - 1])
    return max(average, cardinality)


def _zigzag(costs: Sequence[float], world: int, hosts_per_rank: int, solver: SolverConfig) -> list[int]:
    return zigzag_assignment(len(costs), world)


SOLVERS: dict[str, Callable[[Sequence[float], int, int, SolverConfig], list[int]]] = {
    "zigzag": _zigzag,
}


def place(costs: Sequence[float], world: int, hosts_per_rank: int, solver: SolverConfig) -> Placement:
    assert len(costs) == world * hosts_per_rank, (len(costs), world, hosts_per_rank)
    host_rank = SOLVERS[solver.name](costs, world, hosts_per_rank, solver)
    assert sorted(host_rank) == sorted(r for r in range(world) for _ in range(hosts_per_rank)), host_rank
    return Placement(solver=solver.name, host_rank=tuple(host_rank), host_cost=tuple(float(c) for c in costs),
                     makespan=makespan(costs, host_rank, world),
                     lower_bound=lower_bound(costs, world, hosts_per_rank))
