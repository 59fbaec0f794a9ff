"""Frame-parallel ViT (SPAVA_SPEC.md section 2) against the model's own single-process encoder.

Here the ranks are emulated as threads (runtime/comm_emulated.py); tests/test_model_spava.py
repeats the comparison across real gloo processes."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("av")

import model_fixtures as mf  # noqa: E402
from spava_plan.errors import InputError
from spava_plan.runtime import hf_model
from spava_plan.runtime.comm_emulated import EmulatedWorld
from spava_plan.runtime.vision_parallel import (check_grids, encode_video, encode_video_parallel, grid_ranges,
                                                vision_module)


def test_grid_ranges_are_contiguous_and_balanced():
    assert grid_ranges(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert grid_ranges(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(InputError, match="frames>=6"):
        check_grids(2, 3, temporal_patch=2)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_frame_parallel_vit_equals_single_process(tmp_path, family):
    # 112x112 gives 4x4 merged tokens per grid: several Qwen2.5-VL attention windows per grid.
    ckpt = mf.build_checkpoint(tmp_path / "ckpt", family)
    video = mf.write_video(tmp_path / "v.mp4", frames=10, height=112, width=112)
    inputs = mf.tiny_inputs(ckpt, video, 10, family)  # 5 temporal grids
    model = hf_model.load_checkpoint(str(ckpt), dtype=torch.float64, device="cpu")
    visual = vision_module(model)
    with torch.inference_mode():
        ref = encode_video(visual, inputs.pixel_values_videos, inputs.video_grid_thw)
        # the model's own path (get_video_features) agrees with the reference we compare against
        stock = torch.cat(list(model.model.get_video_features(inputs.pixel_values_videos,
                                                              inputs.video_grid_thw).pooler_output))
    assert torch.equal(ref, stock)
    for world_size in (2, 3):
        world = EmulatedWorld(world_size, timeout_s=60)

        def rank_fn(rank: int) -> torch.Tensor:
            with torch.inference_mode():
                return encode_video_parallel(visual, inputs.pixel_values_videos, inputs.video_grid_thw,
                                             world.comm(rank), merge=2)

        for out in world.run(rank_fn):
            # fp64: the same per-grid computation, only the number of rows per GEMM differs
            torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
