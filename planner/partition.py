"""Cut a prompt into the segments one method works on: anchor, context blocks (one per virtual
host) or ring chunks, and the query block, with the static passing size of every block.

Sizes follow SPAVA_SPEC.md sections 3-4 and 8. One deliberate refinement: the passing size is
uniform over blocks, k = min(p, 128 * floor(B_min / 128)), so every selection all-gather moves
equal-size buffers (the spec's per-block k_i differs only when balanced block lengths straddle a
multiple of 128). With ``pass_all`` the anchor absorbs the (L - a) mod V remainder so that every
block, hence every all-gather buffer, has the same length; Spava then equals exact attention.

``method.passing=global`` (SPAVA_SPEC.md section 11) keeps the segments but changes what ``keep``
means: each host receives ONE buffer of the ``keep`` best keys of all earlier hosts (a fixed
per-host budget, global_passing) instead of every earlier block's ``keep``; its default anchor is
capped at one block (global_anchor).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from spava_plan.config import MethodConfig
from spava_plan.errors import InfeasiblePlanError

from .layout import TokenLayout, apb_passing, balanced_split, paper_anchor, paper_passing

MIN_SELECT_BLOCK = 128  # selection keeps whole 128-token tiles: a block needs at least one


@dataclass(frozen=True)
class Partition:
    method: str
    world: int  # ranks W this method runs on (dense: 1)
    hosts_per_rank: int
    anchor: tuple[int, int] | None  # global span of the anchor (every rank holds it)
    blocks: tuple[tuple[int, int], ...]  # one span per virtual host (ring: per chunk)
    block_kind: str  # "block" or "chunk"
    keep: int  # tokens per KV head every block passes on (0: no passing)
    query: tuple[int, int] | None  # the query block span (None when it is inside the chunks)
    anchor_tokens: int
    passing_tokens: int  # the budget p before the per-block cap
    # "per_block": host v reads the ``keep`` selections of every host < v (v * keep keys);
    # "global": host v reads one buffer of the ``keep`` best keys of all hosts < v (the scan of
    # spava_plan/passing_scan.py), so its passing block does not grow with v.
    passing: str = "per_block"
    # method.anchor where the anchor is shared by several ranks (spava / apb with an anchor, star
    # on more than one GPU), else "recompute": "broadcast" leaves the anchor's rows on rank 0 only,
    # which sends their K/V every layer (ranks.py, the anchor_broadcast collective).
    anchor_mode: str = "recompute"

    @property
    def broadcast_anchor(self) -> bool:
        return self.anchor_mode == "broadcast"

    @property
    def virtual_hosts(self) -> int:
        return len(self.blocks)


class KVSource(NamedTuple):
    """One key source of a virtual host's attention task. ``passing``: the selections of hosts
    [start, stop) (keep keys each); ``span``: the prompt's tokens [start, stop)."""

    kind: str  # "passing" or "span"
    start: int
    stop: int
    causal: bool = False

    def keys(self, keep: int) -> int:
        return (self.stop - self.start) * (keep if self.kind == "passing" else 1)


def host_kv(part: Partition, v: int) -> tuple[KVSource, ...]:
    """The keys virtual host v attends, the one statement of each method's sources (SPAVA_SPEC.md
    sections 4 and 8) that the host cost model and the rank plans both read; empty sources are left
    out.

    spava/apb: the selections of hosts 0..v-1, the anchor (apb: and the query) fully, its block
    causally. star: block 0 fully (host v > 0), its block causally. zigzag_ring: every earlier chunk
    (the prefix [0, a)) fully, itself causally. dense: one host, the whole prompt causally.
    """
    a, b = part.blocks[v]
    out: list[KVSource] = []
    if part.method in ("spava", "apb"):
        if part.keep and v:
            # global: one buffer of ``keep`` keys, written as the one-host span [v-1, v)
            out.append(KVSource("passing", v - 1, v) if part.passing == "global" else KVSource("passing", 0, v))
        if part.anchor:
            out.append(KVSource("span", *part.anchor))
        if part.method == "apb":
            assert part.query is not None
            out.append(KVSource("span", *part.query))  # APB embeds the query in the anchor
    elif part.method == "star":
        if v:
            out.append(KVSource("span", *part.blocks[0]))
    elif part.method == "zigzag_ring":
        if a:
            out.append(KVSource("span", 0, a))  # the chunks before it tile [0, a)
    out.append(KVSource("span", a, b, causal=True))
    return tuple(out)


def _blocks_for(layout: TokenLayout, method: MethodConfig, world: int, hosts: int, anchor: int,
                passing: int) -> tuple[int, tuple[tuple[int, int], ...], int]:
    """(anchor, blocks, keep) for the anchor + passing methods (spava, apb)."""
    L = layout.context_tokens
    V = world * hosts
    if anchor >= L:
        raise InfeasiblePlanError(f"the anchor ({anchor} tokens) covers the whole context ({L} tokens); "
                                  f"lower method.anchor_tokens or raise frames", setting="method.anchor_tokens")
    if method.pass_all:
        anchor += (L - anchor) % V  # equal blocks -> equal all-gather buffers
        if L - anchor < V:
            raise InfeasiblePlanError(f"{V} virtual hosts need at least one context token each but the context "
                                      f"has {L - anchor} after the anchor; lower gpus or method.hosts_per_gpu",
                                      setting="gpus")
        blocks = tuple(balanced_split(anchor, L, V))
        return anchor, blocks, blocks[0][1] - blocks[0][0]
    b_min = (L - anchor) // V
    if passing > 0 and b_min < MIN_SELECT_BLOCK:
        raise InfeasiblePlanError(
            f"{V} virtual hosts ({world} GPUs x {hosts}) leave {b_min} context tokens per block but selection "
            f"needs at least {MIN_SELECT_BLOCK}; lower gpus or method.hosts_per_gpu, or raise frames",
            setting="gpus")
    if b_min < 1:
        raise InfeasiblePlanError(f"{V} virtual hosts leave no context tokens per block; lower gpus or "
                                  f"method.hosts_per_gpu, or raise frames", setting="gpus")
    keep = min(passing, MIN_SELECT_BLOCK * (b_min // MIN_SELECT_BLOCK)) if passing > 0 else 0
    return anchor, tuple(balanced_split(anchor, L, V)), keep


# method.passing=global: the fixed per-host budget P (keys per KV head a host receives in total)
# when method.passing_tokens is left at None. Chosen from benchmarks/fidelity.py (results in
# benchmarks/results/2026-12-04-cpu-fidelity-global.md): see global_passing.
GLOBAL_PASSING_TOKENS = 4096


def global_passing(block_tokens: int) -> int:
    """Default P of global passing: a fixed budget of GLOBAL_PASSING_TOKENS keys per KV head,
    never more than one (tile-rounded) block. Not the per-block length rule: P does not grow with
    L or with the hosts, so per-host passing work stays flat as GPUs and frames grow together."""
    return min(GLOBAL_PASSING_TOKENS, MIN_SELECT_BLOCK * (block_tokens // MIN_SELECT_BLOCK))


def global_anchor(context_tokens: int, hosts: int) -> int:
    """Default anchor of global passing: the paper's a = L/64 rule (to 128), capped at one block's
    length (Star's anchor is one block), so the anchor stops growing with L once blocks are
    shorter than L/64 (at more than 32 virtual hosts)."""
    block = 128 * -(-(context_tokens // hosts) // 128)
    return min(paper_anchor(context_tokens), block)


def check_vision_units(layout: TokenLayout, world: int, temporal_patch: int, parallel: str = "frames") -> None:
    """Frame-parallel vision: every rank encodes at least one temporal grid (InternVL3: frame);
    vision.parallel=one_gpu encodes them all on rank 0, so any count will do."""
    units = layout.grid_thw[0]
    if parallel == "frames" and world > 1 and units < world:
        raise InfeasiblePlanError(f"the video gives {units} temporal grids but frame-parallel vision needs one per "
                                  f"rank ({world}); use frames>={world * temporal_patch} or fewer gpus",
                                  setting="frames")


def partition(layout: TokenLayout, method: MethodConfig, gpus: int) -> Partition:
    L, total = layout.context_tokens, layout.total_tokens
    query = (L, total)
    name = method.name
    if name in ("spava", "apb"):
        hosts = method.hosts_per_gpu if name == "spava" else 1  # APB: one block per GPU, no ZigZag
        glob = method.passing == "global"
        if method.anchor_tokens is not None:
            anchor = method.anchor_tokens
        else:
            anchor = global_anchor(L, gpus * hosts) if glob else paper_anchor(L)
        if method.passing_tokens is not None:
            passing = method.passing_tokens
        elif glob:
            passing = global_passing(max(0, L - anchor) // (gpus * hosts))
        else:
            passing = paper_passing(L) if name == "spava" else apb_passing(L)
        anchor, blocks, keep = _blocks_for(layout, method, gpus, hosts, anchor, passing)
        mode = method.anchor if anchor > 0 and gpus > 1 else "recompute"
        return Partition(name, gpus, hosts, (0, anchor) if anchor > 0 else None, blocks, "block", keep, query,
                         anchor, passing, method.passing, mode)
    if name == "star":
        if L < gpus:
            raise InfeasiblePlanError(f"star needs one context token per GPU but L={L} < gpus={gpus}", setting="gpus")
        blocks = tuple(balanced_split(0, L, gpus))
        # Star's anchor is the first block itself, prepended on every other rank.
        return Partition(name, gpus, 1, None, blocks, "block", 0, query, blocks[0][1], 0,
                         anchor_mode=method.anchor if gpus > 1 else "recompute")
    if name == "zigzag_ring":
        if total < 2 * gpus:
            raise InfeasiblePlanError(f"zigzag_ring needs 2 tokens per GPU but the prompt has {total} for "
                                      f"gpus={gpus}", setting="gpus")
        chunks = tuple(balanced_split(0, total, 2 * gpus))
        return Partition(name, gpus, 2, None, chunks, "chunk", 0, None, 0, 0)
    if name == "dense":
        return Partition(name, 1, 1, None, ((0, total),), "block", 0, None, 0, 0)
    if name == "dense_tp":  # the whole prompt on every rank (planner/dense_tp.py): one block, host 0
        return Partition(name, gpus, 1, None, ((0, total),), "block", 0, None, 0, 0)
    raise AssertionError(f"method {name!r} passed validation but has no partition")
