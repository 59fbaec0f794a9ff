"""The exchange of ``method.passing=global``: an exclusive prefix scan of top-P candidate sets over
the virtual hosts, in rounds of sparse all-to-alls (pure Python: the planner, the plan's checks and
the runtime read the same round structure from here).

Host v must end with the P keys (per KV head) of hosts 0..v-1 that score highest for the question,
ranked across all of them, ties broken by position (SPAVA_SPEC.md section 11). Each host first
picks the top P of its own block (its candidates C_v, sorted by (score desc, position asc)); the
global top P of hosts < v is contained in the union of their candidate sets, and "top P of a
union" is associative, so an exclusive scan with that operator gives every host its set:

    round 0 (shift):  host v sends C_v to host v + 1, which takes it as its state Y_{v+1};
    round k >= 1:     offset o = 2^(k-1); host v (v >= 1) sends Y_v to host v + o, which keeps
                      top P of (Y_v | Y_{v+o})   (Hillis-Steele over hosts 1..V-1)

After 1 + ceil(log2(V - 1)) rounds, Y_v = top P of C_0..C_{v-1} for every v >= 1 (host 0 passes
nothing). Every message is exactly P rows per KV head and a host sends and receives at most one
per round, so every buffer has a static size, no score traffic is needed, and no rank moves more
than hosts_per_gpu * P rows per KV head per round: O(P log V) per layer, whatever the data.
(The alternative of publishing every host's scores and moving the chosen rows with one all-to-all
receives exactly P rows per host, but the rank holding a key every later host wants, such as a
needle, must send it to all of them: O(V P) in the worst case, and buffers sized for it.)

Messages are ordered canonically within a (sender rank, receiver rank) pair by the receiving host,
so one ``all_to_all_single`` per round moves them on every communicator.
"""
from __future__ import annotations

import math
from typing import NamedTuple

from .links import ALL_TO_ALL, Links

SIDE_BYTES = 16  # per row and KV head: the candidate's fp32 score and its position, carried as two fp64


class Message(NamedTuple):
    """Host ``src`` sends its state to host ``dst`` in one round (``merge``: dst merges it into its
    own state; otherwise, round 0, it becomes dst's state)."""

    src: int
    dst: int
    merge: bool


def scan_rounds(hosts: int) -> int:
    """Rounds of the scan over ``hosts`` virtual hosts: the shift, then ceil(log2(V - 1))."""
    if hosts <= 1:
        return 0
    return 1 + (math.ceil(math.log2(hosts - 1)) if hosts > 2 else 0)


def round_messages(hosts: int, k: int) -> tuple[Message, ...]:
    """Every message of round ``k``, ordered by receiving host."""
    if k == 0:
        return tuple(Message(v, v + 1, False) for v in range(hosts - 1))
    o = 1 << (k - 1)
    return tuple(Message(w - o, w, True) for w in range(1 + o, hosts))


def rank_round(host_rank: tuple[int, ...], k: int, rank: int
               ) -> tuple[list[list[Message]], list[list[Message]]]:
    """(messages rank sends, per destination rank; messages it receives, per source rank) in round
    ``k``, each list in the canonical order (receiving host ascending)."""
    world = max(host_rank) + 1 if host_rank else 1
    send: list[list[Message]] = [[] for _ in range(world)]
    recv: list[list[Message]] = [[] for _ in range(world)]
    for m in round_messages(len(host_rank), k):
        if host_rank[m.src] == rank:
            send[host_rank[m.dst]].append(m)
        if host_rank[m.dst] == rank:
            recv[host_rank[m.src]].append(m)
    return send, recv


def message_bytes(rows: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Bytes of one message of ``rows`` rows per KV head: K|V in the run dtype plus the side rows."""
    return rows * kv_heads * (2 * head_dim * dtype_bytes + SIDE_BYTES)


def scan_time_us(links: Links, bytes_per_rank: int, hosts: int, world: int) -> float:
    """Predicted duration of the whole scan. Per round two all-to-alls (K|V, then the side rows)
    carry ``bytes_per_rank`` (the busiest rank's messages of a round, K|V and side together), so a
    round costs one transfer of those bytes plus the second call's latency."""
    per_round = links.transfer_us(ALL_TO_ALL, bytes_per_rank, world) + links.transfer_us(ALL_TO_ALL, 0, world)
    return scan_rounds(hosts) * per_round
