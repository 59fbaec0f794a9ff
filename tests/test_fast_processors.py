"""transformers' fast video / image processors (torchvision) as the runtime builds inputs with them
(runtime/hf/inputs.py, runtime/hf/internvl_inputs.py): built from their defaults with no checkpoint,
run with ``device=``, their pixels against the PIL image processor path (a different resize
library: within two uint8 levels after normalisation, 2 / (255 x 0.26) = 0.030, and 1e-3 on
average; 1e-5 where no resampling happens), their grids against the plan's layout for Qwen2-VL,
Qwen2.5-VL and InternVL3, capped and uncapped (issue 29)."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from spava_plan.errors import PlanMismatchError  # noqa: E402
from spava_plan.runtime.hf import inputs as hf_inputs  # noqa: E402
from spava_plan.runtime.hf.model_inputs import Processing  # noqa: E402

pytestmark = pytest.mark.skipif(not hf_inputs.fast_processors_available(),
                                reason="needs torchvision built for this torch (scripts/test.sh installs the pair)")

TWO_LEVELS = 0.031  # two uint8 steps after normalisation (2/255/std, std >= 0.26): bicubic rounding differs
MEAN_TOL = 1e-3
EXACT_TOL = 1e-5  # no resampling: only the float rescale / normalise order differs
SIZE = {"min_pixels": 28 * 28, "max_pixels": 28 * 28 * 16384}


GPU_MAX_TOL = 0.35  # ~24 uint8 levels after normalisation (1 level = 1 / (255 * std) ~ 0.0145)
GPU_MEAN_TOL = 0.0075  # half a level


def frames(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)
    img[:, h // 4: h // 2, w // 4: w // 2] = (230, 30, 90)  # edges as well as noise
    return img


def pil_qwen() -> Processing:
    import transformers

    return Processing(None, transformers.Qwen2VLImageProcessorPil(), None, None, "default", "cpu")


def pil_internvl(tile: int) -> Processing:
    from spava_plan.runtime.hf.internvl_inputs import internvl_image_processor

    return Processing(None, internvl_image_processor(tile, fast=False), None, None, "default", "cpu")


def close(got: torch.Tensor, want: torch.Tensor, max_tol: float, mean_tol: float) -> None:
    assert got.shape == want.shape
    diff = (got.double().cpu() - want.double()).abs()
    assert float(diff.max()) <= max_tol and float(diff.mean()) <= mean_tol, (float(diff.max()), float(diff.mean()))


def test_default_processing_is_the_fast_processors_without_files(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may come from the hub
    import transformers

    qwen = hf_inputs.default_processing(family="qwen2_vl", device="cpu")
    assert isinstance(qwen.video_processor, transformers.Qwen2VLVideoProcessor)
    assert type(qwen.image_processor) is transformers.Qwen2VLImageProcessor and qwen.device == "cpu"
    intern = hf_inputs.default_processing(family="internvl3", tile_size=56, device="cpu")
    assert isinstance(intern.video_processor, transformers.InternVLVideoProcessor)


@pytest.mark.parametrize("shape,max_tol,mean_tol", [((4, 56, 84), EXACT_TOL, EXACT_TOL),  # multiples of 28
                                                    ((5, 100, 150), TWO_LEVELS, MEAN_TOL)])  # resized, odd count
def test_qwen_fast_video_pixels_equal_the_pil_path(shape, max_tol, mean_tol):
    clip = frames(*shape)
    fast = hf_inputs.default_processing(family="qwen2_vl", device="cpu")
    got, grid = hf_inputs.video_pixels(fast, clip, temporal_patch=2, **SIZE)
    want, want_grid = hf_inputs.video_pixels(pil_qwen(), clip, temporal_patch=2, **SIZE)
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    assert grid.tolist() == want_grid.tolist()
    close(got, want, max_tol, mean_tol)


@pytest.mark.parametrize("shape,max_tol,mean_tol", [((3, 56, 56), EXACT_TOL, EXACT_TOL), ((4, 90, 120), TWO_LEVELS,
                                                                                           MEAN_TOL)])
def test_internvl_fast_tiles_equal_the_pil_path(shape, max_tol, mean_tol):
    from spava_plan.runtime.hf.internvl_inputs import frame_pixels

    clip = frames(*shape)
    fast = hf_inputs.default_processing(family="internvl3", tile_size=56, device="cpu")
    got = frame_pixels(fast, clip, 56)
    assert got.shape == (shape[0], 3, 56, 56)
    close(got, frame_pixels(pil_internvl(56), clip, 56), max_tol, mean_tol)


# -- the grid the processor makes is the plan's (issue 29) -----------------------------------------
def plan_for(model: str, frames_n: int, resolution: str, *extra: str):
    from spava_plan.hydra_conf import compose_config
    from spava_plan.planner.build import build_plan

    return build_plan(compose_config([f"model={model}", "gpus=2", f"frames={frames_n}",
                                      f"video.resolution={resolution}", "kernels=false", *extra]))


def processor_grid(plan, clip: np.ndarray) -> tuple[int, int, int]:
    """The fast processor's grid for ``clip`` with the plan's settings, in merged LLM tokens."""
    v = plan.video
    if plan.model.family == "internvl3":
        from spava_plan.runtime.hf.internvl_inputs import frame_pixels

        proc = hf_inputs.default_processing(family="internvl3", tile_size=v.tile_size, device="cpu")
        pixels = frame_pixels(proc, clip, v.tile_size)
        patch = 14
        side = v.tile_size // patch // 2  # pixel shuffle merges 2x2 patches
        assert pixels.shape[-2:] == (v.tile_size, v.tile_size)
        return (int(pixels.shape[0]), side, side)
    proc = hf_inputs.default_processing(family=plan.model.family, device="cpu")
    _, grid = hf_inputs.video_pixels(proc, clip, min_pixels=v.min_pixels, max_pixels=v.max_pixels,
                                     temporal_patch=v.temporal_patch, cap_pixels_per_frame=v.cap_pixels_per_frame,
                                     max_video_tokens=v.max_video_tokens)
    t, h, w = (int(x) for x in grid[0])
    return (t, h // v.spatial_merge, w // v.spatial_merge)


@pytest.mark.parametrize("model", ["qwen2vl_2b", "qwen2_5vl_3b", "internvl3_2b"])
@pytest.mark.parametrize("extra", [(), ("model.vision.cap_pixels_per_frame=true", "model.vision.max_video_tokens=1000")])
def test_the_fast_processor_makes_the_plans_grid(model, extra):
    plan = plan_for(model, 16, "300x500", *extra)
    h, w = plan.video.source_size
    got = processor_grid(plan, frames(plan.video.frames, h, w))
    assert got == tuple(plan.layout.grid_thw)


def test_the_cap_changes_the_frame_and_both_agree():
    """With a small budget the cap binds: the capped plan's frames are smaller than the uncapped one's,
    and the processor makes each plan's own grid (so the rule is not silently the same)."""
    free = plan_for("qwen2vl_2b", 8, "720x1280")
    capped = plan_for("qwen2vl_2b", 8, "720x1280", "model.vision.cap_pixels_per_frame=true",
                      "model.vision.max_video_tokens=4000")
    assert capped.video.cap_pixels_per_frame and not free.video.cap_pixels_per_frame
    assert capped.layout.grid_thw[1] * capped.layout.grid_thw[2] < free.layout.grid_thw[1] * free.layout.grid_thw[2]
    clip = frames(8, 720, 1280)
    assert processor_grid(free, clip) == tuple(free.layout.grid_thw)
    assert processor_grid(capped, clip) == tuple(capped.layout.grid_thw)


def test_a_processor_without_the_cap_keyword_is_refused_for_a_plan_it_cannot_follow():
    """A video processor that takes no cap_pixels_per_frame (InternVL's here; Qwen's after transformers
    removes the keyword) on this transformers (>= 5.22: such a release always caps) cannot make an
    uncapped plan's frames: one error naming the setting."""
    import transformers

    vp = transformers.InternVLVideoProcessor()
    with pytest.raises(PlanMismatchError) as err:
        hf_inputs.cap_keyword(vp, False)
    assert err.value.setting == "model.vision.cap_pixels_per_frame"
    assert hf_inputs.cap_keyword(vp, True, 900) == {"max_video_tokens": 900}
    qwen = transformers.Qwen2VLVideoProcessor()
    assert hf_inputs.cap_keyword(qwen, False) == {"cap_pixels_per_frame": False, "max_video_tokens": 128000}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["qwen2_vl", "internvl3"])
def test_gpu_preprocessing_equals_the_cpu_processor(family):
    from spava_plan.runtime.hf.internvl_inputs import frame_pixels
    from spava_plan.runtime.video_io import frame_buffer

    clip = frame_buffer(6, 100, 150)  # pinned, as decoded
    clip[:] = frames(6, 100, 150)
    gpu = hf_inputs.default_processing(family=family, tile_size=56, device="cuda")
    cpu = hf_inputs.default_processing(family=family, tile_size=56, device="cpu")
    if family == "internvl3":
        got, want = frame_pixels(gpu, clip, 56), frame_pixels(cpu, clip, 56)
    else:
        got, grid = hf_inputs.video_pixels(gpu, clip, temporal_patch=2, **SIZE)
        want, want_grid = hf_inputs.video_pixels(cpu, clip, temporal_patch=2, **SIZE)
        assert grid.tolist() == want_grid.tolist() and grid.device.type == "cpu"
    assert got.device.type == "cuda"
    # torchvision's bicubic resize rounds and clamps its uint8 intermediates on the CPU and not on
    # CUDA: on this test's pure noise with a hard-edged box the overshoot differs by up to ~22 levels
    # at single pixels (H200, torchvision 0.26: max 0.315, mean 0.0036 for Qwen2-VL; max 0.035,
    # mean 0.0026 for InternVL3), while the mean stays under half a level.
    close(got, want, GPU_MAX_TOL, GPU_MEAN_TOL)
