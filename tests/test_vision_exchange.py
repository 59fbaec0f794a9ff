"""The frame-parallel encoder's embedding exchange (spava_plan/vision_exchange.py) on real plans of
every method: each rank receives each of its local video tokens exactly once, from the rank that
encoded it, in local order; no sender puts a row in its all-to-all buffer twice (so its memory is
O(own rows), not O(W)); the rows every rank holds go by broadcast. Pure arithmetic, no torch."""
import pytest

from spava_plan.hydra_conf import compose_config
from spava_plan.planner.build import derive
from spava_plan.vision_exchange import vision_exchange

SMALL = ["model=qwen2vl_2b", "gpus=4", "frames=64", "video.resolution=360p"]  # 32 grids of 299 tokens


def _tokens(pieces):
    return [t for _, a, b in pieces for t in range(a, b)]


@pytest.mark.parametrize("anchor", ["broadcast", "recompute"])
@pytest.mark.parametrize("method", ["spava", "spava_pass_all", "zigzag_ring", "star", "apb", "dense"])
def test_every_local_video_token_arrives_once_from_its_encoder(method, anchor):
    extra = ["method=spava", "method.pass_all=true"] if method == "spava_pass_all" else [f"method={method}"]
    d = derive(compose_config(SMALL + extra + [f"method.anchor={anchor}"]))
    ex, W = d.exchange, d.world
    vs, ve = ex.video
    assert (vs, ve) == (d.tokens.video_start, d.tokens.video_stop)
    segment = {s.name: (max(s.start, vs), min(s.stop, ve)) for s in d.layout.segments}
    # a broadcast anchor is on rank 0 alone: then no rows are held by every rank
    shared = None if anchor == "broadcast" else {"spava": "anchor", "spava_pass_all": "anchor", "apb": "anchor",
                                                 "star": "block0"}.get(method)
    if W == 1:  # dense: one rank keeps what it encodes
        assert ex.identity(0) and ex.local_rows(0) == ve - vs
        return
    # the rows every rank holds (the anchor's, star's block 0) are broadcast, the rest all-to-all'd
    assert sorted(set(_tokens(ex.shared))) == (list(range(*segment[shared])) if shared else [])
    for r, rank in enumerate(d.ranks):
        want = [t for a, b in rank.local for t in range(max(a, vs), min(b, ve))]
        got = _tokens(ex.shared) + _tokens(ex.recvs[r])
        assert sorted(got) == sorted(want) and ex.local_rows(r) == len(want), f"rank {r}"
        assert [ex.local_offset(r, t) for t in want] == list(range(len(want)))
        assert ex.in_place(r)  # the planner's local spans ascend: the all-to-all lands in place
        assert all(ex.span(s)[0] <= a < b <= ex.span(s)[1] for s, a, b in ex.shared + ex.recvs[r])
        assert sum(ex.recv_splits(r)) == ex.recv_rows(r)
    for s in range(W):
        sent = _tokens(ex.sends[s])
        assert len(sent) == len(set(sent)) <= ex.own_rows(s)  # no row twice in the send buffer
        assert sorted(ex.sends[s]) == sorted((r, a, b) for r in range(W) for src, a, b in ex.recvs[r] if src == s)
        assert [ex.recv_splits(r)[s] for r in range(W)] == ex.send_splits(s)  # the splits pair up


def test_local_spans_out_of_order_and_partly_shared():
    # video tokens [10, 50) in 4 grids over 2 ranks: rank 0 encodes [10, 30), rank 1 [30, 50)
    ex = vision_exchange(2, 4, 10, 10, [[(35, 50), (0, 15)], [(15, 35), (45, 50)]])
    assert ex.shared == ((1, 45, 50),)  # held by both ranks
    assert ex.recvs == (((0, 10, 15), (1, 35, 45)), ((0, 15, 30), (1, 30, 35)))  # by source, ascending
    assert ex.sends == (((0, 10, 15), (1, 15, 30)), ((0, 35, 45), (1, 30, 35)))  # by destination
    assert not ex.in_place(0) and ex.in_place(1)  # rank 0 receives [10, 15) after [35, 45) in local order
    assert [ex.local_offset(0, t) for t in (35, 49, 10)] == [0, 14, 15]
    assert ex.busiest_rows() == 15  # rank 0 sends rank 1 the 15 rows of [15, 30)
