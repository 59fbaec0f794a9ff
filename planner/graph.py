"""The block graph of a plan: a networkx DiGraph of what moves where, with FLOPs and bytes.

Nodes (string ids, so node-link JSON stays readable):
- ``seg:<name>``: a token segment (anchor, block v / chunk c, query), with its token range;
- ``task:<rank>:<name>``: one attention task of one rank, with rows, keys and FLOPs
  (4 * pairs * D * Hq, pairs as in planner/cost.py);
- ``select:<rank>``: the selection (score, pool, top-k, pack) of that rank's blocks;
- ``coll:<name>``: ONE node per collective (select all-gathers, query all-gather, ring), so the
  graph stays O(V): a rank's contribution is an edge in, a reader's share an edge out;
- ``merge:query``: the LSE merge of the query partials.
Edges carry ``bytes`` per layer and ``kind`` (kinds joined by "+" when one edge carries several,
each with its own ``<kind>_bytes``): q rows, kv_local, block_keys (a selection's read), selection
(the packed selection sent), passing / remote K/V read, partial / partials (query (out, lse)),
send (a chunk entering the ring).
"""
from __future__ import annotations

import bisect
import json

import networkx as nx

from spava_plan.config import DTYPES
from spava_plan.plan import Plan

from .cost import LSE_BYTES, visible_pairs


def _link(g: nx.DiGraph, u: str, v: str, kind: str, nbytes: float) -> None:
    """Add bytes of one kind to edge u -> v (a task reads its q rows and K/V from the same
    segment: one edge, bytes per kind kept apart)."""
    if g.has_edge(u, v):
        data = g.edges[u, v]
        data["bytes"] += nbytes
        data[f"{kind}_bytes"] = data.get(f"{kind}_bytes", 0.0) + nbytes
        if kind not in data["kind"].split("+"):
            data["kind"] += f"+{kind}"
    else:
        g.add_edge(u, v, kind=kind, bytes=nbytes, **{f"{kind}_bytes": nbytes})


def build_graph(plan: Plan, plan_hash: str = "") -> nx.DiGraph:
    m = plan.model
    dt = DTYPES[plan.dtype]
    kv_row = m.num_kv_heads * m.head_dim * dt  # one token's K (or V) bytes
    q_row = m.num_heads * m.head_dim * dt
    g = nx.DiGraph(method=plan.method, world=plan.world_size, model=m.name, plan_hash=plan_hash)
    spans = {}
    covering = _Covering(plan)
    for seg in plan.layout.segments:
        g.add_node(f"seg:{seg.name}", type="segment", kind=seg.kind, start=seg.start, stop=seg.stop,
                   tokens=seg.length, host=seg.host, keep=seg.keep)
        spans[(seg.start, seg.stop)] = seg.name
    by_name = {c.name: c for c in plan.collectives}
    for c in plan.collectives:
        g.add_node(f"coll:{c.name}", type="collective", kind=c.kind, slot=c.slot, rows_per_rank=c.rows_per_rank,
                   bytes_per_rank=c.bytes_per_rank, time_us=c.time_us, world=plan.world_size)
    if "query" in by_name:
        g.add_node("merge:query", type="merge", rows=plan.layout.query_tokens, parts=plan.world_size)
        _link(g, "coll:query", "merge:query", "partials", float(by_name["query"].bytes_per_rank * plan.world_size))

    for rank in plan.ranks:
        r = rank.rank
        if rank.select:
            select = f"select:{r}"
            g.add_node(select, type="select", rank=r, blocks=len(rank.select))
            for slot, start, stop, keep in rank.select:
                _link(g, f"seg:{spans[(start, stop)]}", select, "block_keys", float((stop - start) * kv_row))
                _link(g, select, f"coll:select{slot}", "selection", float(keep * 2 * kv_row))
        for task in rank.tasks:
            node = f"task:{r}:{task.name}"
            pairs = 0.0
            local: dict[str, float] = {}
            moved: dict[str, float] = {}  # collective -> K/V bytes this task reads from it
            for ref in task.kv:
                n = ref.length
                pairs += visible_pairs(task.rows, n, ref.mask == "causal")
                if ref.kind == "local":
                    local_seg = covering(ref.start, ref.stop)
                    local[local_seg] = local.get(local_seg, 0.0) + n * 2 * kv_row
                else:
                    if ref.kind == "anchor":  # the broadcast anchor's K/V from rank 0
                        coll = "anchor"
                    elif ref.kind != "passing":
                        coll = "ring"
                    else:  # global passing fills every slot's buffer through the one scan
                        coll = "scan" if "scan" in by_name else f"select{ref.slot}"
                    moved[coll] = moved.get(coll, 0.0) + n * 2 * kv_row
            g.add_node(node, type="task", rank=r, name=task.name, rows=task.rows, keys=task.keys, merge=task.merge,
                       flops=4.0 * pairs * m.head_dim * m.num_heads)
            _link(g, f"seg:{covering(task.q_start, task.q_stop)}", node, "q", float(task.rows * q_row))
            for seg, nbytes in local.items():
                _link(g, f"seg:{seg}", node, "kv_local", nbytes)
            for coll, nbytes in moved.items():
                _link(g, f"coll:{coll}", node, {"ring": "remote", "anchor": "anchor"}.get(coll, "passing"), nbytes)
            if task.merge == "query" and "query" in by_name:
                _link(g, node, "coll:query", "partial", float(task.rows * m.num_heads * (m.head_dim + 1) * LSE_BYTES))
    if "anchor" in by_name:  # rank 0 sends the anchor's K/V (method.anchor=broadcast)
        c = by_name["anchor"]
        _link(g, f"seg:{covering(0, c.rows_per_rank)}", "coll:anchor", "send", float(c.bytes_per_rank))
    if "ring" in by_name:  # every chunk's K/V enters the ring once
        for seg in plan.layout.segments:
            if seg.kind == "chunk":
                _link(g, f"seg:{seg.name}", "coll:ring", "send", float(seg.length * 2 * kv_row))
    return g


class _Covering:
    """Name of the segment containing tokens [start, stop) (an anchor slice names the anchor)."""

    def __init__(self, plan: Plan):
        self.segments = sorted(plan.layout.segments, key=lambda s: s.start)
        self.starts = [s.start for s in self.segments]

    def __call__(self, start: int, stop: int) -> str:
        seg = self.segments[bisect.bisect_right(self.starts, start) - 1]
        assert seg.start <= start and stop <= seg.stop, f"no segment covers [{start}, {stop})"
        return seg.name


def graph_json(g: nx.DiGraph) -> str:
    """networkx node-link JSON of the graph."""
    return json.dumps(nx.node_link_data(g, edges="edges"), indent=1, sort_keys=True) + "\n"
