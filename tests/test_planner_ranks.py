"""The fast paths of planner/ranks.py against their direct definitions."""
import random

import pytest

from spava_plan.hydra_conf import compose_config
from spava_plan.planner.build import _task_sources, derive
from spava_plan.planner.placement import zigzag_assignment
from spava_plan.planner.ranks import RingSources, all_passing_refs, host_slots, passing_refs


def _placements():
    rng = random.Random(4)
    for trial in range(60):
        world, k = rng.randint(1, 9), rng.randint(1, 3)
        if trial % 3 == 0 and k == 2:
            yield tuple(zigzag_assignment(world * k, world))
        else:
            hr = [r for r in range(world) for _ in range(k)]
            rng.shuffle(hr)
            yield tuple(hr)


@pytest.mark.parametrize("host_rank", list(_placements()))
def test_incremental_passing_runs_equal_the_definition(host_rank):
    world = max(host_rank) + 1
    _, slot = host_slots(host_rank, world)
    fast = all_passing_refs(host_rank, slot, 128)
    assert [fast[v] for v in range(len(host_rank))] == [passing_refs(v, host_rank, slot, 128)
                                                        for v in range(len(host_rank))]


@pytest.mark.parametrize("gpus", [1, 2, 3, 6])
def test_ring_sources_equal_the_tasks_refs_grouped_by_owner(gpus):
    d = derive(compose_config(["model=qwen2vl_2b", f"gpus={gpus}", "frames=32", "video.resolution=360p",
                               "method=zigzag_ring"]))
    ring = RingSources(d.part, d.placement.host_rank)
    for rank in d.ranks:
        grouped = _task_sources(rank)
        for c in rank.hosts:
            fast = ring.by_owner(c, rank.rank)
            assert {o: s for o, s in enumerate(fast) if s} == grouped[f"chunk{c}"]


def test_fewer_temporal_grids_than_ranks_is_refused_at_planning_time():
    # frame-parallel vision needs one grid per rank (the runtime refuses the same input)
    from spava_plan.errors import InfeasiblePlanError
    from spava_plan.hydra_conf import compose_config
    from spava_plan.planner.build import build_plan

    with pytest.raises(InfeasiblePlanError, match=r"frames>=8") as err:
        build_plan(compose_config(["model=tiny", "gpus=4", "frames=6", "video.resolution=56x84",
                                   "method.pass_all=true"]))
    assert err.value.setting == "frames"
    build_plan(compose_config(["model=tiny", "gpus=4", "frames=8", "video.resolution=56x84", "method.pass_all=true"]))
