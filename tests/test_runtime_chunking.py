"""The chunking planner/memory.py assumes (runtime/vision/chunking.py) computes what the stock model does,
and really runs in chunks; the chunk sizes come from the plan."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from spava_plan.hydra_conf import compose_config  # noqa: E402
from spava_plan.plan import Chunking  # noqa: E402
from spava_plan.plan_load import load_plan  # noqa: E402
from spava_plan.planner.build import build_plan  # noqa: E402
from spava_plan.runtime.vision import chunking
from spava_plan.runtime.hf import model as hf_model  # noqa: E402
from spava_plan.runtime.hf.attention import language_model  # noqa: E402
from spava_plan.runtime.vision.parallel import encode_video  # noqa: E402
from spava_plan.runtime.vision.tower import vision_module  # noqa: E402

TINY_25 = ("model.family=qwen2_5_vl", "model.name=tiny_25", "model.tokens_per_second=2")
# fp64, one process, one thread count: the chunked and stock paths differ only where the GEMM
# library blocks fewer rows differently, a few ulps of fp64.
TOL = dict(rtol=1e-10, atol=1e-12)


def _model(family: str):
    extra = TINY_25 if family == "qwen2_5_vl" else ()
    plan = build_plan(compose_config(["model=tiny", "gpus=2", "frames=32", "video.resolution=224x224",
                                      "kernels=false", *extra]))
    return plan, hf_model.random_model(plan.model, dtype=torch.float64, device="cpu", seed=1)


def _max_rows(module: torch.nn.Module, seen: list[int]):
    return module.register_forward_hook(lambda m, inp, out: seen.append(int(inp[0].reshape(-1, inp[0].shape[-1]).shape[0])))


def test_plan_carries_the_chunk_sizes_and_round_trips(tmp_path):
    plan, _ = _model("qwen2_vl")
    assert plan.chunking.mlp_tokens == 16384 and plan.chunking.vision_units >= 1
    plan.save(tmp_path / "plan.json")
    assert load_plan(tmp_path / "plan.json").chunking == plan.chunking
    with pytest.raises(ValueError, match="mlp_tokens"):
        Chunking(mlp_tokens=0)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_chunked_language_model_equals_the_stock_one(family):
    _, model = _model(family)
    lm = language_model(model)
    n, h = 53, lm.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(1, n, h, dtype=torch.float64, generator=gen)
    pos = torch.arange(n).view(1, 1, n).expand(3, 1, n)
    with torch.inference_mode():
        stock = lm(inputs_embeds=emb, position_ids=pos, use_cache=False).last_hidden_state
        chunking.install(model, Chunking(mlp_tokens=8, vision_units=1))
        rows: list[int] = []
        hooks = [_max_rows(lm.layers[0].mlp.gate_proj, rows)]
        chunked = lm(inputs_embeds=emb, position_ids=pos, use_cache=False).last_hidden_state
        for hk in hooks:
            hk.remove()
    assert rows and max(rows) <= 8, rows  # really in chunks of the plan's size
    assert all(chunking._MARK in m.__dict__ for m in (lm.norm, lm.layers[1].input_layernorm,
                                                       lm.layers[1].post_attention_layernorm))
    torch.testing.assert_close(chunked, stock, **TOL)
    chunking.uninstall(model)
    assert "forward" not in lm.layers[0].mlp.__dict__


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_chunked_vision_tower_equals_the_stock_one(family):
    _, model = _model(family)
    visual = vision_module(model)
    t, hp, wp = 5, 8, 8  # 5 temporal grids of 8x8 patches (Qwen2.5-VL: several windows per grid)
    dim = 3 * 2 * 14 * 14
    gen = torch.Generator().manual_seed(2)
    pixels = torch.randn(t * hp * wp, dim, dtype=torch.float64, generator=gen)
    grid = torch.tensor([[t, hp, wp]])
    with torch.inference_mode():
        stock = encode_video(visual, pixels, grid)
        chunking.install(model, Chunking(mlp_tokens=16384, vision_units=2))
        rows: list[int] = []
        hook = _max_rows(visual.patch_embed, rows)
        chunked = encode_video(visual, pixels, grid)
        hook.remove()
    assert rows == [2 * hp * wp, 2 * hp * wp, hp * wp], rows  # whole grids, at most 2 per call
    assert chunked.shape == stock.shape and stock.shape[0] == t * hp * wp // 4
    torch.testing.assert_close(chunked, stock, **TOL)


def test_runner_installs_the_plans_chunking():
    from spava_plan.runtime.attention import RankAttention
    from spava_plan.runtime.backends.torch_ref import TorchBackend
    from spava_plan.runtime.generate import RankRunner
    from spava_plan.runtime.solo import SoloComm

    plan, model = _model("qwen2_vl")
    comm = SoloComm(0, plan.world_size)
    RankRunner(model, plan, comm, lambda: RankAttention(plan, 0, comm, TorchBackend()), "cpu")
    assert model._spava_chunking == plan.chunking
    assert "forward" in language_model(model).layers[0].mlp.__dict__
