"""Frame-parallel ViT (SPAVA_SPEC.md section 2) with the targeted embedding exchange, against the
model's own single-process encoder: every rank must end with exactly the rows of its local video
tokens, in local order.

Here the ranks are emulated as threads (runtime/comm/emulated.py); tests/test_model_spava.py
repeats the comparison across real gloo processes and checks that both agree bit for bit."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("av")

import model_fixtures as mf  # noqa: E402
from spava_plan.errors import InputError
from spava_plan.hydra_conf import compose_config
from spava_plan.planner.build import assemble, derive
from spava_plan.planner.cost import CostModel
from spava_plan.runtime.hf import model as hf_model
from spava_plan.runtime.comm.emulated import EmulatedWorld
from spava_plan.critical_path import Sync
from spava_plan.runtime.hf.inputs import local_indices
from spava_plan.runtime.vision.parallel import check_grids, encode_video, encode_video_parallel
from spava_plan.runtime.vision.tower import vision_module
from spava_plan.vision_exchange import grid_ranges, plan_vision_exchange, vision_exchange

# 112x112 gives 4x4 merged tokens per grid (several Qwen2.5-VL attention windows per grid); 10
# frames give 5 grids. An anchor of 24 tokens holds the first 9 video tokens, recomputed on every
# rank, so the shared rows' broadcast and the all-to-all both run (with the default
# method.anchor=broadcast only rank 0 holds the anchor's rows: tests/test_model_spava.py, W=3).
FRAMES, RESOLUTION = 10, "112x112"
EXTRA = ("method.pass_all=true", "method.anchor_tokens=24", "method.anchor=recompute")
# Per-rank ViT rows against the whole video's: the Qwen2.5-VL tower's RMSNorm rounds through fp32, so a
# different batching can show at fp32 resolution relative to rows of magnitude ~1.
VIDEO_ATOL = 1e-5


def test_grid_ranges_are_contiguous_and_balanced():
    assert grid_ranges(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert grid_ranges(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(InputError, match="frames>=6"):
        check_grids(2, 3, temporal_patch=2)


def _setup(tmp_path, family, dtype=torch.float64):
    ckpt = mf.build_checkpoint(tmp_path / "ckpt", family)
    video = mf.write_video(tmp_path / "v.mp4", frames=FRAMES, height=112, width=112)
    inputs = mf.tiny_inputs(ckpt, video, FRAMES, family)
    model = hf_model.load_checkpoint(str(ckpt), dtype=dtype, device="cpu")
    return inputs, model, vision_module(model)


def _run(visual, inputs, world, exchange):
    def rank_fn(rank: int) -> torch.Tensor:
        with torch.inference_mode():
            return encode_video_parallel(visual, inputs.pixel_values_videos, inputs.video_grid_thw,
                                         world.comm(rank), exchange, merge=2)
    return rank_fn


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_each_rank_gets_exactly_its_local_video_rows(tmp_path, family):
    inputs, model, visual = _setup(tmp_path, family)
    with torch.inference_mode():
        ref = encode_video(visual, inputs.pixel_values_videos, inputs.video_grid_thw)
        # the model's own path (get_video_features) agrees with the reference we compare against
        stock = torch.cat(list(model.model.get_video_features(inputs.pixel_values_videos,
                                                              inputs.video_grid_thw).pooler_output))
    assert torch.equal(ref, stock)
    for world_size in (2, 3):
        plan = mf.tiny_plan(inputs, family, world_size, FRAMES, RESOLUTION, *EXTRA)
        exchange = plan_vision_exchange(plan)
        assert exchange.shared and all(exchange.in_place(r) for r in range(world_size))
        world = EmulatedWorld(world_size, timeout_s=60)
        for rank, out in enumerate(world.run(_run(visual, inputs, world, exchange))):
            rows = mf.local_video_rows(inputs, local_indices(plan.ranks[rank]))
            # fp64 and an exchange that only copies rows; but a rank batches fewer grids per call,
            # and GEMM kernels may block other batch sizes differently: rounding only
            assert (out - ref[rows]).abs().max().item() <= VIDEO_ATOL, f"W={world_size} rank {rank}"

    # Local spans out of ascending order (the Plan contract allows it): the all-to-all output is
    # staged and scattered; rank 1 holds a piece of rank 0's range as well (broadcast to both).
    s = inputs.video_start
    locals_ = [[(s + 40, s + 80), (0, s + 8)], [(s + 8, s + 40), (s + 70, s + 80)]]
    exchange = vision_exchange(2, FRAMES // 2, 16, s, locals_)
    assert exchange.shared == ((1, s + 70, s + 80),) and not exchange.in_place(0) and exchange.in_place(1)
    world = EmulatedWorld(2, timeout_s=60)
    for rank, out in enumerate(world.run(_run(visual, inputs, world, exchange))):
        want = torch.cat([ref[max(a, s) - s: b - s] for a, b in locals_[rank]])
        assert (out - want).abs().max().item() <= VIDEO_ATOL, f"rank {rank}"  # as above


def test_emulated_exchange_is_charged_what_the_planner_predicts(tmp_path):
    """The vision exchange's communication time: the planner's prediction (CostModel) and the
    emulated run's charge (runtime/comm/__init__.py's formula on the bytes actually moved) agree."""
    inputs, _, visual = _setup(tmp_path, "qwen2_vl", dtype=torch.float32)  # the plan's dtype: same bytes
    cfg = compose_config(mf.tiny_overrides(inputs, "qwen2_vl", 3, FRAMES, RESOLUTION, *EXTRA))
    d = derive(cfg)
    plan = assemble(d)
    assert d.exchange == plan_vision_exchange(plan)  # planner and runtime build the same exchange
    predicted = CostModel(cfg.model, cfg.topology, cfg.dtype_bytes, 3).vision_exchange(
        d.exchange, cfg.model.hidden_size * cfg.dtype_bytes)
    charged: list[float] = []

    class Observer:
        def before(self, rank: int, i: int) -> None:
            pass

        def after(self, rank: int, i: int, events: list) -> None:
            charged.append(sum(e.cost_us for e in events if isinstance(e, Sync)))

    world = EmulatedWorld.for_plan(plan)
    world.time(_run(visual, inputs, world, d.exchange), warmup=0, repeats=1, observer=Observer(),
               functional_passes=1)
    assert predicted > 0 and len(charged) == 3
    assert all(c == pytest.approx(predicted, rel=1e-12) for c in charged)  # same formula, same bytes
