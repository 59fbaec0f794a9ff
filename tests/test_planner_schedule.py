"""The timed per-rank schedule: op order semantics, stream invariants, overlap, ring fast path."""
import pytest

from spava_plan.hydra_conf import compose_config
from spava_plan.planner.build import _Durations, build_plan, derive
from spava_plan.planner.cost import CostModel
from spava_plan.planner.schedule import simulate_events

HEADLINE = ["model=qwen2_5vl_3b", "gpus=8", "frames=64", "video.resolution=1440p"]
SMALL = ["model=qwen2vl_2b", "gpus=4", "frames=64", "video.resolution=360p"]
METHODS = ["spava", "zigzag_ring", "apb", "star", "dense"]


def _plan(*overrides):
    return build_plan(compose_config(list(overrides)))


@pytest.mark.parametrize("anchor", ["broadcast", "recompute"])
def test_spava_order_hides_host2_passing_behind_host1_attention(anchor):
    plan = _plan(*SMALL, f"method.anchor={anchor}")
    V = plan.layout.virtual_hosts
    for sched in plan.schedule:
        r = sched.rank
        names = [(op.name, op.tasks) for op in sched.ops]
        # broadcast: ranks other than 0 run no anchor task; they wait for its K/V just before
        # their first launch, rank 0 (which sends it) at the end of its attention
        has_anchor = r == 0 or anchor == "recompute"
        first = ("query", "anchor", "host0") if r == 0 else ("query", "anchor") if has_anchor else ("query",)
        start = [("start:anchor", ())] if anchor == "broadcast" else []
        wait = [("wait:anchor", ())] if anchor == "broadcast" else []
        head = [("qkv", ()), *start, ("select", ()), ("start:select0", ()), ("start:select1", ()),
                *(wait if r else []), ("attend", first), ("start:query", ())]
        if r == 0:  # host 0 has no passing block: it joins the first launch
            middle = [("wait:select0", ()), ("wait:select1", ()), ("attend", (f"host{V - 1}",))]
        elif r == V // 2 - 1:  # host V/2 reads only slot 0 (hosts 0..V/2-1): one launch for both
            middle = [("wait:select0", ()), ("attend", (f"host{r}", f"host{r + 1}")), ("wait:select1", ())]
        else:
            middle = [("wait:select0", ()), ("attend", (f"host{r}",)), ("wait:select1", ()),
                      ("attend", (f"host{V - 1 - r}",))]
        end = [("wait:query", ()), ("merge", ()), *(wait if r == 0 else []), ("out_mlp", ())]
        assert names == head + middle + end, r


def test_headline_passing_is_fully_hidden():
    plan = _plan(*HEADLINE, "method.anchor=recompute")
    for sched in plan.schedule:
        stalls = {op.name: op.end_us - op.start_us for op in sched.ops if op.kind == "comm_wait"}
        # host-2's passing all-gather finishes during host-1 attention (milliseconds vs ~0.1 ms)
        assert stalls["wait:select1"] == 0.0 and stalls["wait:select0"] == 0.0, (sched.rank, stalls)


def test_headline_broadcast_anchor_costs_the_others_little_waiting():
    """With the anchor broadcast, rank 0 reaches its first collectives later than the others (its
    qkv includes the anchor's rows): they wait for it, but for well under 1% of a layer."""
    plan = _plan(*HEADLINE)
    for sched in plan.schedule:
        stalls = {op.name: op.end_us - op.start_us for op in sched.ops if op.kind == "comm_wait"}
        assert stalls["wait:select1"] == 0.0 and sum(stalls.values()) < 0.01 * sched.layer_us, (sched.rank, stalls)


@pytest.mark.parametrize("method", METHODS)
def test_stream_invariants(method):
    plan = _plan(*SMALL, f"method={method}")
    colls = {c.name: c for c in plan.collectives}
    for sched in plan.schedule:
        t, stall, comm_end = 0.0, 0.0, 0.0
        transfers = {}
        for op in sched.ops:
            if op.kind == "comm_start":
                # the transfer starts after its launch and after the previous transfer on this rank
                assert op.start_us >= t - 1e-9 and op.start_us >= comm_end - 1e-9, op
                assert op.end_us - op.start_us == pytest.approx(colls[op.collective].time_us)
                comm_end = op.end_us
                transfers[(op.collective, op.step)] = op.end_us
                continue
            assert op.start_us == pytest.approx(t), op  # the compute stream runs back to back
            assert op.end_us >= op.start_us
            if op.kind == "comm_wait":
                done = transfers.pop((op.collective, op.step))  # only waits on a started transfer
                assert op.end_us == pytest.approx(max(op.start_us, done))
                stall += op.end_us - op.start_us
            t = op.end_us
        assert not transfers, "every started collective is waited on"
        assert sched.layer_us == pytest.approx(t) and sched.exposed_comm_us == pytest.approx(stall)


def test_collective_times_come_from_the_cost_model():
    cfg = compose_config(SMALL)
    plan = build_plan(cfg)
    cost = CostModel(cfg.model, cfg.topology, cfg.dtype_bytes, plan.world_size)
    for c in plan.collectives:
        want = cost.broadcast(c.bytes_per_rank) if c.kind == "anchor_broadcast" else cost.all_gather(c.bytes_per_rank)
        assert c.time_us == pytest.approx(want) and c.time_us > 0


def test_overlap_never_exposes_more_communication():
    on = _plan(*SMALL, "topology.intra_node_gbps=5")  # slow links make the difference visible
    off = _plan(*SMALL, "topology.intra_node_gbps=5", "method.overlap=false")
    assert max(s.exposed_comm_us for s in on.schedule) < max(s.exposed_comm_us for s in off.schedule)
    assert on.prediction.makespan_us < off.prediction.makespan_us


@pytest.mark.parametrize("gpus", [2, 3, 5])
def test_ring_fast_path_equals_the_event_engine(gpus):
    cfg = compose_config(["model=qwen2vl_2b", f"gpus={gpus}", "frames=32", "video.resolution=360p",
                          "method=zigzag_ring", "topology.intra_node_gbps=20"])
    d = derive(cfg)
    cost = CostModel(cfg.model, cfg.topology, cfg.dtype_bytes, d.world)
    ref = simulate_events(d.ranks, d.steps, d.collectives, _Durations(cost, d.world, d.tokens.query_tokens), d.world)
    assert ref.layer_us == d.timeline.layer_us and ref.exposed_us == d.timeline.exposed_us  # exact
    assert ref.timings == d.timeline.timings


def test_dense_is_three_ops_on_one_rank():
    plan = _plan(*SMALL, "method=dense")
    assert plan.world_size == 1 and [op.name for op in plan.schedule[0].ops] == ["qkv", "attend", "out_mlp"]
    assert plan.schedule[0].exposed_comm_us == 0.0
