"""Property test over random configurations: the planner returns either a valid plan whose
invariants hold, or a SpavaError (a one-line user error naming a setting) - never anything else."""
import itertools
from collections import Counter

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from spava_plan.config import MethodConfig, SolverConfig, SpavaConfig, TopologyConfig, VideoConfig
from spava_plan.errors import SpavaError
from spava_plan.hydra_conf import compose_config
from spava_plan.planner.build import assemble, derive
from spava_plan.planner.layout import apb_passing, paper_passing
from spava_plan.planner.memory import usable_bytes
from spava_plan.planner.placement import makespan

MODELS = {name: compose_config([f"model={name}"]).model
          for name in ("tiny", "qwen2vl_2b", "qwen2_5vl_3b", "internvl3_2b")}

resolutions = st.one_of(st.sampled_from(["360p", "480p", "720p"]),
                        st.builds(lambda h, w: f"{h}x{w}", st.integers(1, 1200), st.integers(1, 1200)))


@st.composite
def raw_configs(draw):
    """Keyword arguments of the config dataclasses (constructed in the test: validation is one
    of the outcomes under test)."""
    return dict(
        model=draw(st.sampled_from(sorted(MODELS))),
        gpus=draw(st.integers(1, 40)),
        gpus_per_node=draw(st.sampled_from([1, 2, 4, 8])),
        memory_gib=draw(st.sampled_from([16.0, 80.0, 141.0])),
        frames=draw(st.integers(1, 400)),
        resolution=draw(resolutions),
        system_tokens=draw(st.integers(0, 40)),
        question_tokens=draw(st.integers(1, 80)),
        method=draw(st.sampled_from(["spava"] * 4 + ["apb", "star", "zigzag_ring", "dense"])),  # spava: most knobs
        anchor_tokens=draw(st.one_of(st.none(), st.integers(0, 4000))),
        passing_tokens=draw(st.one_of(st.none(), st.integers(0, 30).map(lambda k: 128 * k))),
        pass_all=draw(st.booleans()),
        hosts_per_gpu=draw(st.integers(1, 3)),
        overlap=draw(st.booleans()),
        solver=draw(st.sampled_from(["zigzag", "greedy", "exact", "local_search"])),
        seed=draw(st.integers(0, 5)),
    )


def _config(raw) -> SpavaConfig:
    return SpavaConfig(
        model=MODELS[raw["model"]],
        topology=TopologyConfig(gpus=raw["gpus"], gpus_per_node=raw["gpus_per_node"], memory_gib=raw["memory_gib"]),
        video=VideoConfig(frames=raw["frames"], resolution=raw["resolution"], system_tokens=raw["system_tokens"],
                          max_question_tokens=raw["question_tokens"]),
        method=MethodConfig(name=raw["method"], anchor_tokens=raw["anchor_tokens"],
                            passing_tokens=raw["passing_tokens"], pass_all=raw["pass_all"],
                            hosts_per_gpu=raw["hosts_per_gpu"], overlap=raw["overlap"]),
        solver=SolverConfig(name=raw["solver"], iterations=60, seed=raw["seed"]))


def _check_segments(plan):
    lay = plan.layout
    pos = 0
    for seg in sorted(lay.segments, key=lambda s: s.start):  # every token in exactly one segment
        assert seg.start == pos and seg.stop > seg.start, lay.segments
        pos = seg.stop
    assert pos == lay.total_tokens == lay.context_tokens + lay.query_tokens
    if plan.method in ("spava", "apb", "star"):
        q = lay.segment("query")
        assert (q.start, q.stop) == (lay.context_tokens, lay.total_tokens)


def _check_placement(plan):
    pl, W = plan.placement, plan.world_size
    per = len(plan.ranks[0].hosts)
    assert set(Counter(pl.host_rank).values()) == {per} and len(pl.host_rank) == W * per
    base = pl.rank_base or (0.0,) * W  # method.anchor=broadcast: rank 0's anchor work
    assert not pl.rank_base or (pl.rank_base[0] > 0 and not any(pl.rank_base[1:]))
    loads = [base[rank.rank] + sum(pl.host_cost[v] for v in rank.hosts) for rank in plan.ranks]
    assert max(loads) == pytest.approx(pl.makespan, rel=1e-12)
    assert sum(loads) / W <= pl.lower_bound * (1 + 1e-12) and pl.lower_bound <= pl.makespan * (1 + 1e-12)
    # balanced within the reported gap: the busiest rank is at most (1 + gap) x the lower bound
    assert max(loads) <= pl.lower_bound * (1 + pl.gap) * (1 + 1e-9) + 1e-9
    if len(pl.host_cost) <= 6:  # the lower bound never exceeds the true optimum
        slots = [r for r in range(W) for _ in range(per)]
        opt = min(makespan(pl.host_cost, p, W, pl.rank_base) for p in set(itertools.permutations(slots)))
        assert pl.lower_bound <= opt * (1 + 1e-12)


def _check_passing(plan, cfg):
    if plan.method not in ("spava", "apb"):
        return
    blocks = plan.layout.blocks
    keep = blocks[0].keep
    assert all(b.keep == keep for b in blocks)
    L = plan.layout.context_tokens
    rule = paper_passing(L) if plan.method == "spava" else apb_passing(L)
    p = rule if cfg.method.passing_tokens is None else cfg.method.passing_tokens
    if cfg.method.pass_all:
        assert all(b.length == keep for b in blocks)  # every token passes: equal blocks
    else:
        assert keep == (min(p, 128 * (min(b.length for b in blocks) // 128)) if p else 0)
    m, dt = cfg.model, cfg.dtype_bytes
    for c in plan.collectives:
        if c.kind == "select_all_gather":
            assert c.rows_per_rank == keep and c.bytes_per_rank == keep * m.num_kv_heads * 2 * m.head_dim * dt
    for rank in plan.ranks:
        for task in rank.tasks:
            if task.name.startswith("host"):  # host v passes the selections of hosts 0..v-1
                v = int(task.name[4:])
                assert sum(r.length for r in task.kv if r.kind == "passing") == v * keep


def _check_schedule_and_memory(plan, cfg):
    for sched, rank in zip(plan.schedule, plan.ranks):
        started, arrived = set(), set()
        slot_of = {f"select{s}": s for s in range(8)}
        tasks = {t.name: t for t in rank.tasks}
        for op in sched.ops:
            if op.kind == "comm_start":
                started.add((op.collective, op.step))
            elif op.kind == "comm_wait":
                assert (op.collective, op.step) in started
                started.discard((op.collective, op.step))
                if op.collective in slot_of:
                    arrived.add(slot_of[op.collective])
            elif op.name == "attend":  # a launch reads only passing slots that have arrived
                needed = {r.slot for t in op.tasks for r in tasks[t].kv if r.kind == "passing"}
                assert needed <= arrived, (op, arrived)
        assert not started
    cached = sorted(s for rank in plan.ranks for s in rank.cache)
    assert sum(b - a for a, b in cached) == plan.layout.total_tokens
    assert max(plan.prediction.peak_memory_bytes) <= usable_bytes(cfg)
    assert plan.prediction.makespan_us == max(plan.prediction.rank_us) > 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw_configs())
def test_random_configs_plan_or_fail_cleanly(raw):
    try:
        cfg = _config(raw)
        plan = assemble(derive(cfg))
    except SpavaError as exc:
        assert "\n" not in str(exc) and exc.setting, exc
        event(f"error naming {exc.setting}")
        return
    event(f"planned {plan.method}")
    _check_segments(plan)
    _check_placement(plan)
    _check_passing(plan, cfg)
    _check_schedule_and_memory(plan, cfg)
