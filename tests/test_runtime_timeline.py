"""The emulated critical-path model on hand-made traces (exact arithmetic, no torch)."""
import pytest

from spava_plan.links import ALL_GATHER, ALL_TO_ALL, BROADCAST, P2P, plan_links
from spava_plan.critical_path import Compute, Start, Sync, Wait, simulate

ALL = (0, 1)


def test_hidden_collective_costs_nothing_and_exposed_one_is_charged():
    # rank 0 issues at 10, computes 50 more; the collective (30) starts when rank 1 joins at 20
    t = simulate([[Compute(10), Start("g", ALL, 30), Compute(50), Wait("g")],
                  [Compute(20), Start("g", ALL, 30), Compute(5), Wait("g")]])
    assert t.finish_us == (60, 50)  # rank 0: hidden (ends 50 < 60); rank 1 stalls 50 - 25 = 25
    assert t.exposed_comm_us == (0, 25)
    assert t.compute_us == (60, 25)
    assert t.makespan_us == 60


def test_comm_stream_serialises_collectives_and_sync_blocks():
    t = simulate([[Start("a", ALL, 10), Start("b", ALL, 10), Wait("b"), Sync("c", ALL, 1)],
                  [Start("a", ALL, 10), Start("b", ALL, 10), Wait("b"), Sync("c", ALL, 1)]])
    assert t.finish_us == (21, 21)  # b waits for a on the comm stream: 10 + 10, then c: +1


def test_p2p_waits_only_for_its_peers():
    t = simulate([[Start("x", (1, 2), 5), Wait("x")], [Compute(100), Start("x", (0, 2), 5), Wait("x")],
                  [Start("x", (0, 1), 5), Wait("x")]])
    assert t.finish_us == (105, 105, 105)


def test_deadlocked_traces_are_reported():
    with pytest.raises(ValueError, match="deadlock"):
        simulate([[Sync("g", ALL, 1)], [Sync("h", ALL, 1)]])  # the ranks disagree on the collective


def test_transfer_formula():
    rates = dict(gpus_per_node=4, intra_node_gbps=100.0, inter_node_gbps=10.0, link_latency_us=2.0)
    node = plan_links(world=4, gpus=4, nodes=1, **rates)
    # 1 MB per rank over 4 GPUs in one node: 3 shares of 1e6 B at 1e5 B/us, 2 latencies of 2 us
    assert node.transfer_us(ALL_GATHER, 1_000_000, 4) == pytest.approx(3 * 10 + 2 * 2)
    two_nodes = plan_links(world=8, gpus=8, nodes=2, **rates)
    assert two_nodes.spans_nodes and two_nodes.transfer_us(P2P, 1_000_000, 8) == pytest.approx(2 + 100)
    # broadcast and all-to-all: one transfer of the (busiest link's) bytes, 2 latencies on 4 GPUs
    assert node.transfer_us(BROADCAST, 1_000_000, 4) == pytest.approx(10 + 2 * 2)
    assert node.transfer_us(ALL_TO_ALL, 1_000_000, 4) == pytest.approx(10 + 2 * 2)
    assert node.transfer_us(ALL_GATHER, 123, 1) == 0.0
    # a plan on fewer ranks than the topology has GPUs (dense on one): the nodes its ranks use
    assert not plan_links(world=4, gpus=8, nodes=2, **rates).spans_nodes



# -- one model: the planner's prediction and the emulated timing --------------------------------
class VirtualClock:
    """A device clock that moves only when the test says a compute op ran (no real time)."""

    def __init__(self):
        self.now = 0.0

    def mark(self):
        return self.now

    def between_us(self, a, b):
        return b - a

    def sync(self):
        pass


@pytest.mark.parametrize("overrides", [
    ("gpus=4",), ("gpus=4", "method.overlap=false"), ("gpus=3", "method=apb"), ("gpus=4", "method=star"),
    ("gpus=3", "method=zigzag_ring"), ("gpus=5", "method=zigzag_ring"), ("gpus=2", "solver=greedy"),
])
def test_emulated_replay_of_the_planned_durations_gives_the_planned_layer(overrides):
    """Each rank replays its planned ops on the emulated world: compute ops advance a virtual
    clock by their planned duration, comm ops issue the runtime's calls (tagged all-gathers, ring
    exchanges). The emulated timing, charged with the plan's collective times, must be the
    planner's layer: the same model (spava_plan.critical_path) on the same inputs."""
    import torch

    from spava_plan.hydra_conf import compose_config
    from spava_plan.planner.build import build_plan
    from spava_plan.runtime.comm.emulated import EmulatedWorld

    # slow links: communication is exposed on some ranks, so stalls are compared too
    plan = build_plan(compose_config(["model=qwen2vl_2b", "frames=64", "video.resolution=360p",
                                      "topology.intra_node_gbps=2", *overrides]))
    W = plan.world_size
    clock = VirtualClock()
    world = EmulatedWorld.for_plan(plan, timeout_s=30)

    def fn(r):
        comm, pending = world.comm(r), {}
        for op in plan.schedule[r].ops:
            if op.kind == "compute":
                clock.now += op.end_us - op.start_us
            elif op.kind == "comm_start" and op.collective == "ring":
                pending[(op.collective, op.step)] = comm.exchange(torch.zeros(1), (r + 1) % W, torch.zeros(1),
                                                                  (r - 1) % W, tag="ring")
            elif op.kind == "comm_start":
                pending[(op.collective, op.step)] = comm.all_gather_into_tensor(
                    torch.zeros(W), torch.full((1,), float(r)), async_op=True, tag=op.collective)
            else:
                pending.pop((op.collective, op.step)).wait()
        assert not pending

    timing = world.time(fn, warmup=0, repeats=1, functional_passes=1, clock=clock)
    planned = [s.layer_us for s in plan.schedule]
    exposed = [s.exposed_comm_us for s in plan.schedule]
    # rel 1e-9: consecutive compute ops are one stretch between two clock marks (sums re-associated)
    assert timing.rank_finish_us == pytest.approx(planned, rel=1e-9, abs=1e-9)
    assert timing.exposed_comm_us == pytest.approx(exposed, rel=1e-9, abs=1e-9)
    if W > 1:
        assert max(exposed) > 0  # the comparison covers stalls, not only compute
