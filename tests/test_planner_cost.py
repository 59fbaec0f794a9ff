"""The roofline cost model against hand-computed references and published model sizes."""
import math

import pytest

from spava_plan.config import ModelConfig, TopologyConfig
from spava_plan.hydra_conf import compose_config
from spava_plan.planner.build import derive
from spava_plan.planner.cost import ATTN_TILE_ROWS, CostModel, visible_pairs
from spava_plan.planner.memory import llm_params
from spava_plan.planner.vision import vision_params, vision_unit

H100 = TopologyConfig()


def _brute_pairs(rows: int, keys: int, causal: bool) -> int:
    # row i of M sees key j of n iff j <= i + n - M (bottom-right aligned)
    return sum(1 for i in range(rows) for j in range(keys) if not causal or j <= i + keys - rows)


@pytest.mark.parametrize("rows, keys", [(1, 1), (5, 5), (3, 8), (8, 3), (7, 20), (20, 7)])
@pytest.mark.parametrize("causal", [False, True])
def test_visible_pairs_match_brute_force(rows, keys, causal):
    assert visible_pairs(rows, keys, causal) == _brute_pairs(rows, keys, causal)


def test_attention_is_compute_bound_for_big_tasks_and_memory_bound_for_few_rows():
    m = ModelConfig()  # Qwen2-VL-7B: Hq 28, Hkv 4, D 128
    cost = CostModel(m, H100, 2, 8)
    rows = keys = 8192
    big = cost.attention(rows, ((keys, True),))
    flops = 4 * (rows * (rows + 1) / 2) * 128 * 28
    assert big.flops == pytest.approx(flops, rel=1e-12)
    assert big.us == pytest.approx(flops / (H100.attention_tflops * 1e6), rel=1e-12)  # 8192 is whole tiles
    # 37 query rows against 100K keys: reading K and V dominates (memory roofline)
    small = cost.attention(37, ((100_000, False),))
    nbytes = (2 * 37 * 28 * 128 + 2 * 100_000 * 4 * 128) * 2
    compute = 4 * 37 * 100_000 * 128 * 28 * (ATTN_TILE_ROWS / 37) / (H100.attention_tflops * 1e6)
    assert small.us == pytest.approx(max(nbytes / (H100.hbm_gbps * 1e3), compute), rel=1e-12)
    assert small.bytes == nbytes


def test_gemm_roofline():
    cost = CostModel(ModelConfig(), H100, 2, 8)
    w = cost.gemm(16384, 3584, 18944)
    assert w.flops == 2 * 16384 * 3584 * 18944
    assert w.us == pytest.approx(w.flops / (H100.gemm_tflops * 1e6), rel=1e-12)  # compute bound
    one = cost.gemm(1, 3584, 18944)  # one token: reading the weight matrix dominates
    assert one.us == pytest.approx((3584 * 18944 + 3584 + 18944) * 2 / (H100.hbm_gbps * 1e3), rel=1e-12)


def test_collectives_latency_plus_bandwidth_and_nodes():
    cost = CostModel(ModelConfig(), H100, 2, 8)
    mb = 1 << 20
    assert cost.all_gather(mb) == pytest.approx(15.0 * 3 + 7 * mb / (360.0 * 1e3), rel=1e-12)
    assert CostModel(ModelConfig(), H100, 2, 1).all_gather(mb) == 0.0  # one rank: nothing moves
    two_nodes = TopologyConfig(gpus=16, nodes=2)
    cross = CostModel(ModelConfig(), two_nodes, 2, 16)
    assert cross.links.spans_nodes and cross.all_gather(mb) == pytest.approx(15.0 * 4 + 15 * mb / (45.0 * 1e3), rel=1e-12)
    assert cross.p2p(mb) == pytest.approx(15.0 + mb / (45.0 * 1e3), rel=1e-12)
    # broadcast / all-to-all (bytes of the busiest link): one transfer plus log2(W) latencies
    assert cross.broadcast(mb) == cross.all_to_all(mb) == pytest.approx(15.0 * 4 + mb / (45.0 * 1e3), rel=1e-12)
    assert CostModel(ModelConfig(), H100, 2, 1).broadcast(mb) == 0.0


def test_vision_exchange_time_is_the_broadcasts_plus_the_all_to_all():
    # method.anchor=recompute: every rank holds the anchor, so its video rows are broadcast
    cfg = compose_config(["model=qwen2_5vl_3b", "gpus=8", "frames=64", "video.resolution=1440p",
                          "method.anchor=recompute"])
    d = derive(cfg)
    ex, row = d.exchange, cfg.model.hidden_size * cfg.dtype_bytes
    cost = CostModel(cfg.model, cfg.topology, cfg.dtype_bytes, 8)
    # rank 0's 4 grids (18564 tokens) hold the whole anchor: one broadcast of its video rows
    (src, a, b), = ex.shared
    assert src == 0 and b == d.layout.segment("anchor").stop
    link, latency = cfg.topology.intra_node_gbps * 1e3, cfg.topology.link_latency_us
    busiest = ex.busiest_rows()
    want = 2 * latency * 3 + ((b - a) + busiest) * row / link  # two collectives of log2(8) latencies
    assert cost.vision_exchange(ex, row) == pytest.approx(want, rel=1e-12)
    # each rank moves about its two blocks' video, not the 7 other ranks' 18564 rows each
    assert busiest < 2 * 18564
    unit = vision_unit(cfg.model, d.tokens.grid_thw)
    assert d.prediction.vision_us == pytest.approx(4 * cost.vision_unit(unit).us + want, rel=1e-12)
    # the default broadcast anchor lives on rank 0 alone: no video row is broadcast, only the all-to-all
    b = derive(compose_config(["model=qwen2_5vl_3b", "gpus=8", "frames=64", "video.resolution=1440p"]))
    assert not b.exchange.shared
    assert cost.vision_exchange(b.exchange, row) == pytest.approx(2 * latency * 3 / 2 + b.exchange.busiest_rows() * row / link,
                                                                  rel=1e-12)


@pytest.mark.parametrize("name, published", [
    # Hugging Face safetensors totals of the *-Instruct checkpoints
    ("qwen2vl", 8_291_375_616),
    ("qwen2vl_2b", 2_208_985_600),
    ("qwen2_5vl_3b", 3_754_622_976),
    ("qwen2_5vl_7b", 8_292_166_656),
])
def test_parameter_counts_match_the_published_checkpoints(name, published):
    cfg = compose_config([f"model={name}"])
    total = llm_params(cfg) + vision_params(cfg.model)
    # within 1e-4: a few norm / bias vectors of the patch embed and merger are approximated
    assert total == pytest.approx(published, rel=1e-4)


def test_internvl3_parameter_count():
    cfg = compose_config(["model=internvl3_2b"])
    # InternVL3-2B is published as 2.09B (InternViT-300M + projector + Qwen2.5-1.5B); 1% for rounding
    assert llm_params(cfg) + vision_params(cfg.model) == pytest.approx(2.09e9, rel=0.01)


def test_vision_unit_and_time_scale_with_patches():
    cfg = compose_config(["model=qwen2vl", "video.resolution=720p"])
    unit = vision_unit(cfg.model, (4, 26, 46))
    assert unit.tokens == 26 * 46 and unit.patches == 4 * 26 * 46 and unit.units == 4
    cost = CostModel(cfg.model, cfg.topology, 2, 8)
    t = cost.vision_unit(unit)
    P, T, h, inter = unit.patches, unit.tokens, 1280, 5120
    blocks = 2 * P * (3 * h * h + h * h + 2 * h * inter) * 32  # qkv, proj, fc1 + fc2 in 32 blocks
    embed = 2 * P * (3 * 2 * 14 * 14) * h  # Conv3d patch embed as a GEMM
    merger = 2 * T * (4 * h) * (4 * h) + 2 * T * (4 * h) * 3584
    attention = 4 * P * P * h * 32  # full attention within the grid, every block
    assert t.flops == pytest.approx(blocks + embed + merger + attention, rel=1e-12)
    assert math.isfinite(t.us) and t.us > t.flops / (H100.gemm_tflops * 1e6)
