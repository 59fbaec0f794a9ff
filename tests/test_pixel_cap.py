"""The per-frame pixel cap as the planner applies it (model.vision.cap_pixels_per_frame, issue 29):
the plan records the rule, the frame size follows transformers' capped resize (its own smart_resize
with the budget share its video processor computes), and a plan with the cap reads back equal.
The fast video processor itself is run against the plan in tests/test_fast_processors.py."""
from __future__ import annotations

import pytest

from spava_plan.hydra_conf import compose_config
from spava_plan.planner.build import build_plan


def plan(*extra: str):
    return build_plan(compose_config(["model=qwen2vl_2b", "gpus=2", "frames=16", "video.resolution=720x1280",
                                      "kernels=false", *extra]))


@pytest.mark.parametrize("tokens", [2000, 8000, 128000])
def test_the_capped_frame_is_transformers_capped_resize(tokens):
    smart = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl").smart_resize
    p = plan("model.vision.cap_pixels_per_frame=true", f"model.vision.max_video_tokens={tokens}")
    v = p.video
    assert v.cap_pixels_per_frame and v.max_video_tokens == tokens
    # Qwen2VLVideoProcessor.resize with cap_pixels_per_frame=True, written out (factor 28, 16 frames)
    budget = max(min(v.max_pixels, int(tokens * 28 * 28 * 0.9) * v.temporal_patch // 16), int(v.min_pixels * 1.05))
    h, w = smart(720, 1280, 28, v.min_pixels, budget)
    assert tuple(p.layout.frame_size) == (h, w)
    assert tuple(p.layout.grid_thw) == (8, h // 28, w // 28)


def test_uncapped_is_the_default_and_the_cap_shrinks_frames():
    free, capped = plan(), plan("model.vision.cap_pixels_per_frame=true", "model.vision.max_video_tokens=2000")
    assert not free.video.cap_pixels_per_frame
    assert capped.layout.video_tokens < free.layout.video_tokens
    assert free.hash != capped.hash


def test_a_capped_plan_reads_back_equal(tmp_path):
    from spava_plan.plan_load import load_plan

    p = plan("model.vision.cap_pixels_per_frame=true", "model.vision.max_video_tokens=2000")
    path = tmp_path / "plan.json"
    path.write_text(p.to_json())
    back = load_plan(path)
    assert back == p and back.video.cap_pixels_per_frame and back.video.max_video_tokens == 2000


def test_a_zero_budget_is_refused_naming_the_setting():
    from spava_plan.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        plan("model.vision.cap_pixels_per_frame=true", "model.vision.max_video_tokens=0")
    assert err.value.setting == "model.vision.max_video_tokens"
