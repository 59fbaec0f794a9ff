"""The ViT's grid-derived inputs computed once per grid shape (runtime/vision/static.py): the tower
gives what the stock tower gives, really receives them precomputed, and computes them once."""
from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("transformers")
vision_utils = pytest.importorskip("transformers.vision_utils")

from spava_plan.hydra_conf import compose_config  # noqa: E402
from spava_plan.plan import Chunking  # noqa: E402
from spava_plan.planner.build import build_plan  # noqa: E402
from spava_plan.runtime.vision import chunking, attention as vision_attention, static as vision_static
from spava_plan.runtime.hf import model as hf_model  # noqa: E402
from spava_plan.runtime.vision.parallel import encode_video  # noqa: E402
from spava_plan.runtime.vision.tower import vision_module  # noqa: E402

TINY_25 = ("model.family=qwen2_5_vl", "model.name=tiny_25", "model.tokens_per_second=2")
TOL = dict(rtol=1e-10, atol=1e-12)  # fp64, one process: the same arithmetic in the same order


def _tower(family: str):
    extra = TINY_25 if family == "qwen2_5_vl" else ()
    plan = build_plan(compose_config(["model=tiny", "gpus=2", "frames=32", "video.resolution=224x224",
                                      "kernels=false", *extra]))
    model = hf_model.random_model(plan.model, dtype=torch.float64, device="cpu", seed=3)
    return model, vision_module(model)


def _pixels(t: int, hp: int, wp: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(t * hp * wp, 3 * 2 * 14 * 14, dtype=torch.float64, generator=gen)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("flash_named", [False, True])
def test_precomputed_inputs_give_the_stock_tower_output(family, flash_named):
    model, visual = _tower(family)
    if flash_named:  # the batched ViT attention: transformers then wants max_seqlen too
        vision_attention.install(model)
    t, hp, wp = 3, 8, 12  # Qwen2.5-VL: windows of unequal sizes inside each grid
    pixels, grid = _pixels(t, hp, wp), torch.tensor([[t, hp, wp]])
    with torch.inference_mode():
        stock = encode_video(visual, pixels, grid)
        out = vision_static.precomputed(visual, visual.forward)(pixels, grid)
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
    torch.testing.assert_close(out, stock, **TOL)


def test_the_tower_receives_them_and_they_are_computed_once(monkeypatch):
    model, visual = _tower("qwen2_5_vl")
    vision_attention.install(model)
    modeling = sys.modules[type(visual).__module__]
    popped: list[str] = []

    keys = {"get_vision_position_ids": "position_ids", "get_vision_attention_seqlens": "cu_seqlens",
            "get_vision_window_index": "window_index", "get_max_seqlen": None}

    def spy(name):
        stock = getattr(modeling, name)

        def helper(*args, kwargs=None, **kw):
            key = keys[name] or kw.get("kwarg_name", "max_seqlen")
            popped.append(name if (kwargs or {}).get(key) is not None else f"{name} computed")
            return stock(*args, kwargs=kwargs, **kw)
        monkeypatch.setattr(modeling, name, helper)

    for name in keys:
        spy(name)
    computed = []
    real = vision_static._compute
    monkeypatch.setattr(vision_static, "_compute", lambda *a: computed.append(a[1]) or real(*a))
    chunking.install(model, Chunking(mlp_tokens=16384, vision_units=2))
    t, hp, wp = 5, 8, 8
    with torch.inference_mode():
        for _ in range(2):
            encode_video(visual, _pixels(t, hp, wp), torch.tensor([[t, hp, wp]]))
    assert set(popped) == set(keys), popped  # every helper found its input precomputed (none computed)
    assert computed == [((2, hp, wp),), ((1, hp, wp),)], computed  # two chunk shapes, each once
    inputs = vision_static.grid_inputs(visual, ((2, hp, wp),), torch.device("cpu"))
    cu = inputs.tensors["cu_window_seqlens"]
    assert cu._spava_host_list == cu.tolist()  # what the batched attention reads instead of a sync
    chunking.uninstall(model)


def test_a_tower_without_the_helpers_runs_as_it_is():
    class Plain(torch.nn.Module):
        def forward(self, pixels, grid_thw):
            return pixels * 2

    plain = Plain()
    assert vision_static.grid_inputs(plain, ((1, 2, 2),), torch.device("cpu")) is None
    out = vision_static.precomputed(plain, plain.forward)(torch.ones(4, 3), torch.tensor([[1, 2, 2]]))
    assert torch.equal(out, torch.full((4, 3), 2.0))
