"""Per-rank work: local sequence, attention tasks, selections, collectives and KV cache shard.

Given a Partition and a host -> rank placement this spells out, for every rank, exactly what
SPAVA_SPEC.md sections 3-7 (and section 8 for the baselines) ask of it, with every size static.
Global passing (section 11) swaps the per-slot selection all-gathers for one ``select_scan``
collective and gives each host one passing source: its slot's buffer of ``keep`` rows.
"""
from __future__ import annotations

import bisect

from spava_plan.passing_scan import message_bytes
from spava_plan.plan import DTYPE_BYTES, AttnTask, Collective, KVRef, ModelSpec, RankPlan, SelectBlock

from . import dense_tp
from .partition import KVSource, Partition, host_kv

QUERY_RANK = 0  # the rank that attends the query's own keys and appends decoded tokens' K/V
# method.anchor=broadcast: the rank that computes the anchor (its first local rows, as under
# recompute) and sends the anchor's K/V to every other rank each layer; the others hold no anchor row.
ANCHOR_RANK = 0


def _runs(sorted_ranks: list[int]) -> list[tuple[int, int]]:
    """[0, 1, 2, 5, 6] -> [(0, 3), (5, 7)]: contiguous rank ranges of an all-gather buffer."""
    runs: list[tuple[int, int]] = []
    for r in sorted_ranks:
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs


def host_slots(host_rank: tuple[int, ...], world: int) -> tuple[list[tuple[int, ...]], list[int]]:
    """(hosts of each rank in ascending order, slot of each host = its index on its rank)."""
    per_rank: list[list[int]] = [[] for _ in range(world)]
    for v, r in enumerate(host_rank):
        per_rank[r].append(v)
    slot = [0] * len(host_rank)
    for hosts in per_rank:
        for s, v in enumerate(hosts):
            slot[v] = s
    return [tuple(h) for h in per_rank], slot


def passing_refs(v: int, host_rank: tuple[int, ...], slot: list[int], keep: int) -> tuple[KVRef, ...]:
    """The passing block of host v: the selections of hosts 0..v-1, as runs of all-gather rows."""
    if keep == 0 or v == 0:
        return ()
    by_slot: dict[int, list[int]] = {}
    for u in range(v):
        by_slot.setdefault(slot[u], []).append(host_rank[u])
    refs = []
    for s in sorted(by_slot):
        for a, b in _runs(sorted(by_slot[s])):
            refs.append(KVRef(kind="passing", mask="full", slot=s, rank_start=a, rank_stop=b, keep=keep))
    return tuple(refs)


def all_passing_refs(host_rank: tuple[int, ...], slot: list[int], keep: int) -> list[tuple[KVRef, ...]]:
    """``passing_refs(v, ...)`` for every host v, in one pass over the hosts: each slot's rows
    are kept as disjoint sorted runs that host v-1 extends or joins, so the cost is the number of
    runs rather than O(V) per host (O(V^2) in all at W=1024)."""
    out: list[tuple[KVRef, ...]] = [()]
    starts: dict[int, list[int]] = {}  # slot -> sorted run starts
    stops: dict[int, dict[int, int]] = {}  # slot -> run start -> run stop
    for v in range(1, len(host_rank)):
        if keep == 0:
            out.append(())
            continue
        s, r = slot[v - 1], host_rank[v - 1]
        lo, ends = starts.setdefault(s, []), stops.setdefault(s, {})
        i = bisect.bisect_right(lo, r)
        start, stop = r, r + 1
        if i > 0 and ends[lo[i - 1]] == r:  # joins the run ending just before it
            start = lo[i - 1]
            del ends[start]
            lo.pop(i - 1)
            i -= 1
        if i < len(lo) and lo[i] == r + 1:  # joins the run starting just after it
            stop = ends.pop(lo[i])
            lo.pop(i)
        lo.insert(i, start)
        ends[start] = stop
        out.append(tuple(KVRef(kind="passing", mask="full", slot=t, rank_start=a, rank_stop=ends_t[a], keep=keep)
                         for t in sorted(starts) for ends_t in (stops[t],) for a in starts[t]))
    return out


def _anchor_slice(anchor: tuple[int, int], rank: int, world: int) -> tuple[int, int] | None:
    """Rank r's share of the anchor for the query: [r*ceil(a/W), (r+1)*ceil(a/W)) within [0, a)."""
    start, stop = anchor
    step = -(-(stop - start) // world)
    lo, hi = start + rank * step, min(stop, start + (rank + 1) * step)
    return (lo, hi) if lo < hi else None


def _local(a: int, b: int, mask: str = "full") -> KVRef:
    return KVRef(kind="local", mask=mask, start=a, stop=b)


def _span_ref(src: KVSource, anchor: tuple[int, int] | None = None) -> KVRef:
    """A span source this rank holds (the anchor, its own block, the query, star's block 0).
    ``anchor``: the span a broadcast anchor covers on a rank that receives it (not ANCHOR_RANK)."""
    assert src.kind == "span"
    mask = "causal" if src.causal else "full"
    if anchor is not None and anchor[0] <= src.start and src.stop <= anchor[1]:
        return _anchor_ref(src.start, src.stop, mask)
    return _local(src.start, src.stop, mask)


def _anchor_ref(a: int, b: int, mask: str = "full") -> KVRef:
    """Anchor tokens [a, b) whose K/V arrive from ANCHOR_RANK (method.anchor=broadcast)."""
    return KVRef(kind="anchor", mask=mask, start=a, stop=b, owner=ANCHOR_RANK)


def _receives_anchor(part: Partition, rank: int) -> bool:
    """This rank reads the anchor's K/V from the broadcast instead of running its rows."""
    return part.broadcast_anchor and rank != ANCHOR_RANK


def _anchor_pass_ranks(part: Partition, host_rank: tuple[int, ...]) -> list[RankPlan]:
    """spava and apb: [anchor | own blocks | query] per rank, passing blocks via all-gathers; with a
    broadcast anchor only ANCHOR_RANK holds the anchor, the others read its K/V as "anchor" sources."""
    W = part.world
    per_rank, slot = host_slots(host_rank, W)
    if part.passing == "global":  # one buffer per host: the scan's result in its slot, keep rows
        passing = [() if v == 0 or not part.keep else
                   (KVRef(kind="passing", mask="full", slot=slot[v], rank_start=0, rank_stop=1, keep=part.keep),)
                   for v in range(len(host_rank))]
    else:
        passing = all_passing_refs(host_rank, slot, part.keep)
    ranks = []
    for r in range(W):
        hosts = per_rank[r]
        local: list[tuple[int, int]] = []
        tasks: list[AttnTask] = []
        received = part.anchor if _receives_anchor(part, r) else None  # anchor K/V from ANCHOR_RANK
        if part.anchor and received is None:
            local.append(part.anchor)
            tasks.append(AttnTask("anchor", *part.anchor, kv=(_local(*part.anchor, "causal"),)))
        for v in hosts:
            local.append(part.blocks[v])
        assert part.query is not None
        local.append(part.query)
        for v in hosts:
            a, b = part.blocks[v]
            # the passing block arrives by all-gathers (its runs of rows); every span is local
            kv = [ref for src in host_kv(part, v)
                  for ref in (passing[v] if src.kind == "passing" else (_span_ref(src, received),))]
            tasks.append(AttnTask(f"host{v}", a, b, kv=tuple(kv)))
        qkv: list[KVRef] = []
        share = _anchor_slice(part.anchor, r, W) if part.anchor else None
        if share:
            qkv.append(_anchor_ref(*share) if received else _local(*share))
        qkv.extend(_local(*part.blocks[v]) for v in hosts)
        if r == QUERY_RANK:
            qkv.append(_local(*part.query, "causal"))
        tasks.append(AttnTask("query", *part.query, kv=tuple(qkv), merge="query"))
        select = tuple(SelectBlock(s, *part.blocks[v], part.keep) for s, v in enumerate(hosts)) if part.keep else ()
        cache = ([share] if share else []) + [part.blocks[v] for v in hosts] + ([part.query] if r == QUERY_RANK else [])
        ranks.append(RankPlan(rank=r, hosts=hosts, local=tuple(local), tasks=tuple(tasks), select=select,
                              cache=tuple(cache), decode_appends=(r == QUERY_RANK)))
    return ranks


def _star_ranks(part: Partition) -> list[RankPlan]:
    """Star: block 0 is the anchor, prepended on ranks > 0 (broadcast: its K/V sent by rank 0 instead);
    no other communication in the context pass."""
    W = part.world
    assert part.query is not None
    first = part.blocks[0]
    ranks = []
    for r in range(W):
        own = part.blocks[r]
        received = first if _receives_anchor(part, r) else None  # block 0's K/V from ANCHOR_RANK
        host = AttnTask(f"host{r}", *own, kv=tuple(_span_ref(src, received) for src in host_kv(part, r)))
        if r == 0 or received:
            local = (own, part.query)
            tasks = [host]
        else:
            local = (first, own, part.query)
            tasks = [AttnTask("anchor", *first, kv=(_local(*first, "causal"),)), host]
        qkv = [_local(*own)] + ([_local(*part.query, "causal")] if r == QUERY_RANK else [])
        tasks.append(AttnTask("query", *part.query, kv=tuple(qkv), merge="query"))
        cache = (own, part.query) if r == QUERY_RANK else (own,)
        ranks.append(RankPlan(rank=r, hosts=(r,), local=local, tasks=tuple(tasks), select=(), cache=cache,
                              decode_appends=(r == QUERY_RANK)))
    return ranks


def _ring_ranks(part: Partition, host_rank: tuple[int, ...]) -> list[RankPlan]:
    """ZigZag ring: chunk c attends chunks j < c fully and itself causally; remote K/V arrive over
    W-1 ring steps.

    A task lists every earlier chunk, so the plan is O(W^2) in size; the KVRef objects are built
    once per chunk and shared between tasks (tuples of the same frozen objects)."""
    W = part.world
    per_rank, _ = host_slots(host_rank, W)
    last_owner = host_rank[len(part.blocks) - 1]
    remote = [KVRef(kind="remote", mask="full", start=a, stop=b, owner=host_rank[j])
              for j, (a, b) in enumerate(part.blocks)]
    chunk_at = {a: j for j, (a, _) in enumerate(part.blocks)}
    chunk_at[part.blocks[-1][1]] = len(part.blocks)
    ranks = []
    for r in range(W):
        chunks = per_rank[r]
        tasks = []
        for c in chunks:
            kv: list[KVRef] = []
            for src in host_kv(part, c):
                if src.causal:  # the chunk itself
                    kv.append(_span_ref(src))
                    continue
                first, stop, at = chunk_at[src.start], chunk_at[src.stop], len(kv)
                kv += remote[first:stop]  # the chunks tiling the span, from their owners
                for j in chunks:  # except this rank's own, which are local
                    if first <= j < stop:
                        kv[at + j - first] = _local(*part.blocks[j])
            tasks.append(AttnTask(f"chunk{c}", *part.blocks[c], kv=tuple(kv)))
        local = tuple(part.blocks[c] for c in chunks)
        ranks.append(RankPlan(rank=r, hosts=chunks, local=local, tasks=tuple(tasks), select=(), cache=local,
                              decode_appends=(r == last_owner)))
    return ranks


class RingSources:
    """Key sources of the ring's chunk tasks grouped by the rank that owns the keys, computed
    from the chunk structure of ``_ring_ranks``: chunk c reads every earlier chunk in full and
    itself causally. Equal to grouping the task's KVRefs by owner in order (a test checks it),
    without walking its O(W) refs: the cost model needs these for all W^2 (rank, step) pairs."""

    def __init__(self, part: Partition, host_rank: tuple[int, ...]):
        per_rank, _ = host_slots(host_rank, part.world)
        assert all(len(c) == 2 for c in per_rank), "the ring holds two chunks per rank"
        self.chunks = per_rank
        self.full = [((b - a, False),) for a, b in part.blocks]
        self.lengths = [b - a for a, b in part.blocks]

    def by_owner(self, chunk: int, rank: int) -> list[tuple[tuple[int, bool], ...]]:
        """Sources of chunk ``chunk`` (held by ``rank``) per owner rank, () where it reads none."""
        full = self.full
        out = [(full[lo] + full[hi] if hi < chunk else full[lo]) if lo < chunk else ()  # lo < hi: sorted
               for lo, hi in self.chunks]
        out[rank] = out[rank] + ((self.lengths[chunk], True),)
        return out


def _dense_ranks(part: Partition) -> list[RankPlan]:
    span = part.blocks[0]
    task = AttnTask("host0", *span, kv=tuple(_span_ref(src) for src in host_kv(part, 0)))
    return [RankPlan(rank=0, hosts=(0,), local=(span,), tasks=(task,), select=(), cache=(span,), decode_appends=True)]


def rank_plans(part: Partition, host_rank: tuple[int, ...]) -> tuple[RankPlan, ...]:
    if part.method in ("spava", "apb"):
        return tuple(_anchor_pass_ranks(part, host_rank))
    if part.method == "star":
        return tuple(_star_ranks(part))
    if part.method == "zigzag_ring":
        return tuple(_ring_ranks(part, host_rank))
    if part.method == "dense":
        return tuple(_dense_ranks(part))
    if part.method == "dense_tp":
        return dense_tp.rank_plans(part)
    raise AssertionError(part.method)


def collectives(part: Partition, model: ModelSpec, dtype_bytes: int) -> tuple[Collective, ...]:
    """Per-layer exchanges with their static sizes (bytes each rank contributes)."""
    if part.method == "dense_tp":
        return dense_tp.collectives(part, model.hidden_size, dtype_bytes)
    out: list[Collective] = []
    hkv, d = model.num_kv_heads, model.head_dim
    if part.keep and part.passing == "global":
        # the scan of spava_plan/passing_scan.py: per round, a rank sends and receives at most
        # one message of keep rows per KV head for each of its hosts
        out.append(Collective("scan", "select_scan", rows_per_rank=part.keep,
                              bytes_per_rank=part.hosts_per_rank * message_bytes(part.keep, hkv, d, dtype_bytes)))
    elif part.keep:
        for s in range(part.hosts_per_rank):
            out.append(Collective(f"select{s}", "select_all_gather", slot=s, rows_per_rank=part.keep,
                                  bytes_per_rank=part.keep * hkv * 2 * d * dtype_bytes))
    if part.query is not None and part.world > 1:
        lq = part.query[1] - part.query[0]
        # (out, lse) partials travel in fp32 so the merge is exact to fp32 rounding
        out.append(Collective("query", "query_all_gather", rows_per_rank=lq,
                              bytes_per_rank=lq * model.num_heads * (d + 1) * DTYPE_BYTES["fp32"]))
    if part.broadcast_anchor:
        # the anchor's packed K|V rows, sent by ANCHOR_RANK every layer (star: block 0 is the anchor)
        a = part.anchor[1] - part.anchor[0] if part.anchor else part.blocks[0][1] - part.blocks[0][0]
        out.append(Collective("anchor", "anchor_broadcast", rows_per_rank=a, bytes_per_rank=a * hkv * 2 * d * dtype_bytes))
    if part.method == "zigzag_ring" and part.world > 1:
        chunk = max(b - a for a, b in part.blocks)
        out.append(Collective("ring", "ring", rows_per_rank=2 * chunk,
                              bytes_per_rank=2 * chunk * hkv * 2 * d * dtype_bytes))
    return tuple(out)
