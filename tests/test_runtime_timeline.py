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

