"""Peak memory per rank: its parts, the KV cache shard, and the errors when a plan does not fit."""
import pytest

from spava_plan.errors import InfeasiblePlanError
from spava_plan.hydra_conf import compose_config
from spava_plan.planner.build import derive
from spava_plan.planner.memory import ALLOCATOR_SLACK, GIB, PARTS, usable_bytes
from spava_plan.planner.vision import chunk_activation_elements, unit_pixel_elements, vision_unit

SMALL = ["model=qwen2vl_2b", "gpus=4", "frames=64", "video.resolution=360p"]


@pytest.mark.parametrize("method", ["spava", "zigzag_ring", "apb", "star", "dense"])
def test_every_token_is_cached_exactly_once(method):
    cfg = compose_config(SMALL + [f"method={method}"])
    d = derive(cfg)
    covered = sorted(span for rank in d.ranks for span in rank.cache)
    pos = 0
    for start, stop in covered:  # contiguous, no overlap, no gap
        assert start == pos, covered
        pos = stop
    assert pos == d.layout.total_tokens
    m = cfg.model
    per_token = m.num_layers * 2 * m.num_kv_heads * m.head_dim * cfg.dtype_bytes
    for rank, mem in zip(d.ranks, d.memory):
        assert mem["kv_cache"] == per_token * sum(b - a for a, b in rank.cache)


def test_peak_is_weights_plus_the_larger_stage():
    d = derive(compose_config(SMALL))
    for mem in d.memory:
        llm = mem["kv_cache"] + mem["activations"] + mem["passing"] + mem["gather"]
        assert mem["peak"] == mem["weights"] + max(mem["vision_stage"], llm)
        assert set(PARTS) <= set(mem)
    assert d.prediction.peak_memory_bytes == tuple(m["peak"] for m in d.memory)


def test_passing_buffers_are_the_all_gather_outputs():
    cfg = compose_config(SMALL)
    d = derive(cfg)
    m = cfg.model
    keep = d.layout.blocks[0].keep
    row = m.num_kv_heads * 2 * m.head_dim * cfg.dtype_bytes  # one token's packed K|V
    # two slots, and the broadcast anchor's buffer (rank 0 packs what it sends, the others receive)
    expected = 2 * d.world * keep * row + d.layout.anchor_tokens * row
    assert d.layout.anchor_tokens > 0 and all(mem["passing"] == expected for mem in d.memory)


def _vision_stage_parts(d, r):
    """The vision stage rebuilt from its parts: the larger of the encoding (pixels of the rank's
    units, one chunk's activations, own embeddings) and the exchange (own embeddings, send buffer
    and the local video rows; every plan here lands the all-to-all in place)."""
    cfg, ex = d.cfg, d.exchange
    row = cfg.model.hidden_size * cfg.dtype_bytes
    unit = vision_unit(cfg.model, d.tokens.grid_thw)
    assert ex.in_place(r) and unit.tokens == ex.tokens_per_grid
    units = min(d.chunking.vision_units, ex.own_rows(r) // unit.tokens)
    encode = ((ex.own_rows(r) // unit.tokens) * unit_pixel_elements(cfg.model, unit)
              + chunk_activation_elements(cfg.model, unit, units)) * cfg.dtype_bytes + ex.own_rows(r) * row
    exchange = 0 if ex.identity(r) else (ex.own_rows(r) + ex.send_rows(r) + ex.local_rows(r)) * row
    return max(encode, exchange)


def test_vision_stage_holds_own_and_local_rows_not_the_whole_video():
    d = derive(compose_config(SMALL))
    for r, mem in enumerate(d.memory):
        assert mem["vision_stage"] == _vision_stage_parts(d, r)
    dense = derive(compose_config(SMALL + ["method=dense"]))  # one rank: no exchange buffers
    ex = dense.exchange
    row = dense.cfg.model.hidden_size * dense.cfg.dtype_bytes
    assert ex.identity(0) and dense.memory[0]["vision_stage"] == _vision_stage_parts(dense, 0)


def test_1024_gpus_of_131072_frames_plan_once_vision_is_exchanged_not_gathered():
    """The all-gather put all 78M visual embeddings on every GPU (vision stage 525 GiB): this
    plan failed on the vision stage. With the exchange each rank holds its own 64 grids, what it
    sends and its local video rows (anchor + two blocks): about 11 GiB, and the plan fits."""
    # Every rank holds the 1.2M-token anchor: its activations (measured terms, planner/memory.py)
    # need about 87 GiB, more than an H100 has; an H200 holds it.
    cfg = compose_config(["gpus=1024", "frames=131072", "method.passing_tokens=1024", "topology=h200"])
    d = derive(cfg)
    assert d.fits
    ex = d.exchange
    for r in (0, 1, 16, 511, 1023):  # anchor encoders, the first non-anchor one, middle, last
        assert d.memory[r]["vision_stage"] == _vision_stage_parts(d, r)
        assert ex.local_rows(r) <= d.ranks[r].local_tokens and ex.send_rows(r) <= ex.own_rows(r)
    video = ex.video[1] - ex.video[0]
    assert max(ex.local_rows(r) for r in range(d.world)) < video / 50  # O(local), not O(video)
    assert max(m["vision_stage"] for m in d.memory) < 12 * GIB
    busiest = max(range(d.world), key=lambda r: d.memory[r]["peak"])
    assert d.memory[busiest]["peak"] > d.memory[busiest]["vision_stage"] + d.memory[busiest]["weights"]


def test_more_gpus_shrink_the_cache_shard():
    small = derive(compose_config(["gpus=2", "frames=256", "video.resolution=360p"]))
    big = derive(compose_config(["gpus=8", "frames=256", "video.resolution=360p"]))
    assert max(m["kv_cache"] for m in big.memory) < max(m["kv_cache"] for m in small.memory) / 3


@pytest.mark.parametrize("overrides, setting", [
    (["gpus=2", "frames=8192"], "gpus"),  # the KV cache shard of a 4.9M-token prompt on 2 GPUs
    (["method=dense", "frames=4096"], "frames"),  # one GPU: only a shorter input helps
    (["topology.memory_gib=10"], "topology"),  # 7 GiB usable, 15.4 GiB of weights
])
def test_infeasible_plans_name_the_setting(overrides, setting):
    cfg = compose_config(overrides)
    with pytest.raises(InfeasiblePlanError) as info:
        derive(cfg)
    err = info.value
    assert err.setting == setting and "\n" not in str(err) and "GiB" in str(err)
    assert f"{usable_bytes(cfg) / GIB:.1f} GiB usable" in str(err)
    d = derive(cfg, require_fit=False)  # the same plan without the check says why
    assert not d.fits and max(d.prediction.peak_memory_bytes) * (1 + ALLOCATOR_SLACK) > usable_bytes(cfg)
