"""Peak memory per rank: its parts, the KV cache shard, and the errors when a plan does not fit."""
import pytest

from spava_plan.errors import InfeasiblePlanError
from spava_plan.hydra_conf import compose_config
from spava_plan.planner.build import derive
from spava_plan.planner.memory import GIB, PARTS, usable_bytes

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
    expected = 2 * d.world * keep * m.num_kv_heads * 2 * m.head_dim * cfg.dtype_bytes  # two slots
    assert all(mem["passing"] == expected for mem in d.memory)


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
    assert not d.fits and max(d.prediction.peak_memory_bytes) > usable_bytes(cfg)
