"""Model inputs: PyAV decoding, processor inputs, the planner's layout against the processor's, and
the plan-vs-input check. Tiny checkpoints and videos are generated here; nothing is downloaded."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("av")

import model_fixtures as mf  # noqa: E402
from spava_plan.errors import InputError, PlanMismatchError
from spava_plan.runtime.hf import inputs as hf_inputs, model as hf_model
from spava_plan.runtime.video_io import read_frames, sample_indices

FAMILIES = ("qwen2_vl", "qwen2_5_vl")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {f: mf.build_checkpoint(root / f, f) for f in FAMILIES}


@pytest.fixture(scope="module")
def models(ckpts):
    return {f: hf_model.load_checkpoint(str(p), dtype=torch.float32, device="cpu") for f, p in ckpts.items()}


# -- video decoding -----------------------------------------------------------------------------
def test_read_frames_samples_uniformly_and_exactly(tmp_path):
    """Lossless ffv1 frames whose value encodes their index: the decoded sample is exactly the
    frames at transformers' uniform indices floor(i * total / n)."""
    import av

    path = tmp_path / "index.mkv"
    total, n = 11, 4
    with av.open(str(path), mode="w") as c:
        s = c.add_stream("ffv1", rate=5)
        s.width, s.height, s.pix_fmt = 32, 16, "bgr0"
        for i in range(total):
            img = np.full((16, 32, 3), 10 * i, dtype=np.uint8)
            for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    frames, info = read_frames(str(path), n)
    assert info.total_frames == total and (info.height, info.width) == (16, 32)
    assert frames.shape == (n, 16, 32, 3) and frames.dtype == np.uint8
    assert [int(f[0, 0, 0]) // 10 for f in frames] == sample_indices(total, n) == [0, 2, 5, 8]


def test_bad_videos_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="no video file"):
        read_frames(str(tmp_path / "missing.mp4"), 2)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00not a video" * 100)
    with pytest.raises(InputError, match="cannot open|no video stream|cannot decode"):
        read_frames(str(junk), 2)
    short = mf.write_video(tmp_path / "short.mp4", frames=3)
    with pytest.raises(InputError, match="has 3 frames but the plan samples 8"):
        read_frames(str(short), 8)


# -- pixels ---------------------------------------------------------------------------------------
def test_video_patches_of_a_still_clip_equal_the_image_processor(ckpts):
    """Two identical frames form one temporal grid; the model's image processor repeats a still
    image over the temporal patch, so both must give identical patches in identical order."""
    proc = hf_inputs.load_processing(str(ckpts["qwen2_vl"]))
    img = np.random.default_rng(0).integers(0, 256, size=(60, 90, 3), dtype=np.uint8)
    size = {"shortest_edge": 28 * 28, "longest_edge": 28 * 28 * 1024}
    video, grid = hf_inputs.frames_to_video_patches(proc.image_processor, np.stack([img, img]), size=size,
                                                    temporal_patch=2)
    ref = proc.image_processor(images=[img], size=size, return_tensors="pt")
    assert grid.tolist() == ref["image_grid_thw"].tolist()
    assert torch.equal(video, ref["pixel_values"].float())


# -- planner layout == processor layout -----------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("frames, size, fps", [(12, (56, 84), 2.0), (7, (84, 112), 1.5)])
def test_planner_layout_equals_the_processor(tmp_path, ckpts, models, family, frames, size, fps):
    """Token counts, segment bounds and EVERY token's M-RoPE position: the planner's layout
    (planner/layout.py) equals the model's processor + get_rope_index for the same video."""
    from spava_plan.planner.layout import token_layout
    from spava_plan.config import to_config

    video = mf.write_video(tmp_path / "v.mp4", frames=frames + 2, height=size[0], width=size[1])
    inputs = mf.tiny_inputs(ckpts[family], video, frames, family, fps=fps)
    plan = mf.tiny_plan(inputs, family, 2, frames, f"{size[0]}x{size[1]}", "method.pass_all=true",
                        "method.anchor_tokens=16", fps=fps)
    positions = hf_inputs.global_position_ids(models[family], inputs)
    hf_inputs.check_against_plan(plan, inputs, positions)  # raises on any difference
    assert plan.layout.total_tokens == inputs.total_tokens
    assert plan.layout.video_tokens == inputs.video_tokens
    cfg = to_config(plan.config)
    layout = token_layout(cfg.model, cfg.video)
    planned = torch.tensor([layout.position(i) for i in range(inputs.total_tokens)]).T
    assert torch.equal(planned, positions)


def test_mismatches_name_the_setting(tmp_path, ckpts, models):
    family = "qwen2_vl"
    video = mf.write_video(tmp_path / "v.mp4", frames=12)
    inputs = mf.tiny_inputs(ckpts[family], video, 12, family)
    positions = hf_inputs.global_position_ids(models[family], inputs)
    ok = ("method.pass_all=true", "method.anchor_tokens=8")
    wrong_res = mf.tiny_plan(inputs, family, 2, 12, "112x112", *ok)
    with pytest.raises(PlanMismatchError, match="video.resolution"):
        hf_inputs.check_against_plan(wrong_res, inputs, positions)
    longer = mf.tiny_inputs(ckpts[family], video, 12, family, question=mf.QUESTION + " Answer in detail, please.")
    plan = mf.tiny_plan(inputs, family, 2, 12, "56x84", *ok)
    with pytest.raises(PlanMismatchError, match="holds at most .*video.max_question_tokens=.*replan=true"):
        hf_inputs.check_against_plan(plan, longer, hf_inputs.global_position_ids(models[family], longer))
    with pytest.raises(PlanMismatchError, match="model"):
        hf_model.check_model(mf.tiny_plan(inputs, family, 2, 12, "56x84", *ok, "model.num_layers=3"), models[family])
    with pytest.raises(PlanMismatchError, match="qwen2_5_vl"):
        hf_model.check_model(mf.tiny_plan(inputs, "qwen2_5_vl", 2, 12, "56x84", *ok), models[family])


@pytest.mark.parametrize("question, match", [("   ", "empty"), ("look <|video_pad|> here", "special token")])
def test_bad_questions(ckpts, question, match):
    proc = hf_inputs.load_processing(str(ckpts["qwen2_vl"]))
    with pytest.raises(InputError, match=match):
        hf_inputs.prompt_text(proc, question)


def test_bad_checkpoints(tmp_path):
    with pytest.raises(InputError, match="no checkpoint directory"):
        hf_model.load_checkpoint(str(tmp_path / "nope"), dtype=torch.float32, device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no config.json"):
        hf_model.load_checkpoint(str(tmp_path / "empty"), dtype=torch.float32, device="cpu")
    broken = mf.build_checkpoint(tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"garbage" * 64)
    with pytest.raises(InputError, match="cannot load the weights"):
        hf_model.load_checkpoint(str(broken), dtype=torch.float32, device="cpu")
