"""The block graph: O(V) size, one node per collective, FLOPs and bytes consistent with the plan."""
import json

import networkx as nx
import pytest

from spava_plan.hydra_conf import compose_config
from spava_plan.planner.build import build_plan
from spava_plan.planner.graph import build_graph, graph_json

SMALL = ["model=qwen2vl_2b", "frames=64", "video.resolution=360p"]


@pytest.mark.parametrize("method, gpus", [("spava", 64), ("zigzag_ring", 16), ("apb", 8), ("star", 8), ("dense", 1)])
def test_graph_is_linear_in_the_hosts(method, gpus):
    plan = build_plan(compose_config(SMALL + [f"gpus={gpus}", f"method={method}", "frames=512"]))
    g = build_graph(plan)
    V = plan.layout.virtual_hosts
    colls = [n for n, t in g.nodes(data="type") if t == "collective"]
    assert sorted(colls) == sorted(f"coll:{c.name}" for c in plan.collectives)  # one node each
    # segments + 4 tasks and a selection per rank + collectives + merge; a few edges per node
    assert g.number_of_nodes() <= V + 2 + 5 * plan.world_size + len(colls) + 1
    assert g.number_of_edges() <= 10 * (V + 2)


@pytest.mark.parametrize("method", ["spava", "zigzag_ring", "apb", "star", "dense"])
def test_task_flops_equal_the_schedules_attention_flops(method):
    plan = build_plan(compose_config(SMALL + ["gpus=4", f"method={method}"]))
    g = build_graph(plan)
    graph = sum(d["flops"] for _, d in g.nodes(data=True) if d["type"] == "task")
    schedule = sum(op.flops for s in plan.schedule for op in s.ops if op.name == "attend")
    assert graph == pytest.approx(schedule, rel=1e-12)


def test_passing_edges_carry_v_times_keep_keys():
    cfg = compose_config(SMALL + ["gpus=4"])
    plan = build_plan(cfg)
    g = build_graph(plan)
    m = cfg.model
    keep = plan.layout.blocks[0].keep
    row = m.num_kv_heads * 2 * m.head_dim * cfg.dtype_bytes  # one passed token's K|V
    for rank in plan.ranks:
        for v in rank.hosts:
            node = f"task:{rank.rank}:host{v}"
            passed = sum(d.get("passing_bytes", 0.0) for _, _, d in g.in_edges(node, data=True))
            assert passed == v * keep * row, (rank.rank, v)


def test_node_link_json_round_trips():
    plan = build_plan(compose_config(SMALL + ["gpus=4"]))
    g = build_graph(plan, "abc")
    back = nx.node_link_graph(json.loads(graph_json(g)), edges="edges")
    assert dict(back.nodes(data=True)) == dict(g.nodes(data=True))
    assert {(u, v): d for u, v, d in back.edges(data=True)} == {(u, v): d for u, v, d in g.edges(data=True)}
    assert back.graph["plan_hash"] == "abc"
