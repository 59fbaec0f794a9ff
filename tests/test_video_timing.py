"""Frame sampling and temporal timing as the model's processor does them, on generated clips of
different lengths and frame rates.

The reference is transformers' own code: its PyAV loader (``read_video_pyav``) with its Qwen2-VL
video processor's ``sample_frames`` rule. That processor module imports torchvision, which the CPU
test machines lack, so the test compiles the ``sample_frames`` function from transformers' source
file as it is (no copy of the rule in this repository) and calls it with the processor's class
defaults. Frames are compared bit for bit (the same decoder produces them: a pure copy).
"""
from __future__ import annotations

import ast
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("av")
transformers = pytest.importorskip("transformers")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import model_fixtures as mf  # noqa: E402
from spava_plan.runtime.video_io import read_clip, read_frames  # noqa: E402
from spava_plan.video_meta import frames_for_rate, probe_clip  # noqa: E402

# (frames in the file, its frame rate): 3 s at 10 fps, 2 s at 30 fps, 10 s at 5 fps, a clip with
# fewer frames than the processor's minimum, and 40 s at 1 fps
CLIPS = [(30, 10), (60, 30), (50, 5), (3, 4), (40, 1)]


def _processor_sample_frames():
    """transformers' Qwen2VLVideoProcessor.sample_frames, compiled from its source file, bound to the
    processor's class defaults (fps as the caller passes it)."""
    from transformers import video_utils

    src = Path(video_utils.__file__).parent / "models" / "qwen2_vl" / "video_processing_qwen2_vl.py"
    tree = ast.parse(src.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Qwen2VLVideoProcessor")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "sample_frames")
    defaults = {t.id: ast.literal_eval(n.value) for n in cls.body if isinstance(n, ast.Assign)
                for t in n.targets if isinstance(t, ast.Name) and t.id in ("temporal_patch_size", "min_frames",
                                                                           "max_frames")}
    module = ast.Module(body=[fn], type_ignores=[])
    scope = {"math": math, "torch": torch, "VideoMetadata": video_utils.VideoMetadata}
    exec(compile(ast.fix_missing_locations(module), str(src), "exec"), scope)
    me = SimpleNamespace(num_frames=None, fps=None, **defaults)
    assert defaults == {"temporal_patch_size": 2, "min_frames": 4, "max_frames": 768}
    return lambda metadata, **kw: scope["sample_frames"](me, metadata, **kw)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    return {(n, fps): mf.write_video(root / f"c{n}_{fps}.mp4", frames=n, height=32, width=48, fps=fps)
            for n, fps in CLIPS}


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("rate", [2.0, 0.5])
def test_fps_sampling_equals_the_processor(clips, clip, rate):
    from transformers.video_utils import read_video_pyav

    sample = _processor_sample_frames()
    path = str(clips[clip])
    info = probe_clip(path)
    assert (info.total_frames, info.fps, info.height, info.width) == (clip[0], clip[1], 32, 48)
    n = frames_for_rate(info.total_frames, info.fps, rate)
    if n == 0:  # fewer frames than one temporal patch after the bounds: the processor samples none
        assert clip == (3, 4) or n == 0
        return
    want, meta = read_video_pyav(path, sample_indices_fn=lambda metadata, **k: sample(metadata, fps=rate))
    got, got_info = read_clip(path, fps=rate)
    assert got.shape == want.shape and np.array_equal(got, want)
    assert math.isclose(got_info.sampled_fps(len(got)), meta.sampled_fps, rel_tol=1e-12)


@pytest.mark.parametrize("clip", CLIPS[:3])
def test_count_sampling_equals_the_processor(clips, clip):
    from transformers.video_utils import read_video_pyav

    sample = _processor_sample_frames()
    path = str(clips[clip])
    want, meta = read_video_pyav(path, sample_indices_fn=lambda metadata, **k: sample(metadata, num_frames=8))
    got, info = read_frames(path, 8)
    assert np.array_equal(got, want) and math.isclose(info.sampled_fps(8), meta.sampled_fps, rel_tol=1e-12)


def test_temporal_positions_follow_the_clips_real_timing(tmp_path):
    """A 30 s and a 3 min clip sampled to the same 8 frames: Qwen2.5-VL's seconds per grid is the
    processor's (temporal_patch / sampled_fps) for each, and the temporal ids span 6x further for
    the longer clip, while a plan's video.fps no longer decides them."""
    from transformers.video_utils import read_video_pyav

    from spava_plan.runtime.hf import inputs as hf_inputs, model as hf_model

    sample = _processor_sample_frames()
    ckpt = mf.build_checkpoint(tmp_path / "ckpt", "qwen2_5_vl")
    model = hf_model.load_checkpoint(str(ckpt), dtype=torch.float32, device="cpu")
    proc = hf_inputs.load_processing(str(ckpt))
    spans = []
    for seconds in (30, 180):
        path = str(mf.write_video(tmp_path / f"v{seconds}.mp4", frames=seconds, height=56, width=84, fps=1))
        frames, info = read_frames(path, 8)
        inputs = hf_inputs.build_inputs(proc, frames, mf.QUESTION, family="qwen2_5_vl", min_pixels=28 * 28,
                                        max_pixels=28 * 28 * 16384, temporal_patch=2, merge=2,
                                        fps=info.sampled_fps(8))
        _, meta = read_video_pyav(path, sample_indices_fn=lambda metadata, **k: sample(metadata, num_frames=8))
        # transformers' Qwen2_5_VLProcessor: second_per_grid_ts = temporal_patch_size / sampled_fps
        assert math.isclose(float(inputs.second_per_grid_ts[0]), 2 / meta.sampled_fps, rel_tol=1e-6)
        positions = hf_inputs.global_position_ids(model, inputs)
        video = positions[0, inputs.video_mask]
        grids = int(inputs.video_grid_thw[0, 0])
        per_grid = video.numel() // grids
        t_ids = video.reshape(grids, per_grid)[:, 0] - video[0]
        step = 2 * float(inputs.second_per_grid_ts[0])  # tokens_per_second (2) x seconds per grid
        assert t_ids.tolist() == [int(g * step) for g in range(grids)]
        spans.append(int(t_ids[-1]))
    assert spans[1] == 6 * spans[0]


# -- spava-plan video.path=clip.mp4 -------------------------------------------------------------------
PLAN = ["model=tiny", "gpus=2", "method.pass_all=true", "method.anchor_tokens=8", "kernels=false"]


def test_plan_for_a_clip_takes_frames_and_size_from_its_metadata(clips, tmp_path):
    from spava_plan.entry.cli import plan_job
    from spava_plan.hydra_conf import compose_config

    path = clips[(50, 5)]  # 10 s at 5 fps: the processor samples 20 frames at 2 per second
    plan, cfg, _, _ = plan_job(compose_config([*PLAN, f"video.path={path}"]), tmp_path / "a")
    assert (cfg.video.frames, cfg.video.resolution) == (20, "32x48") and plan.layout.frames == 20
    slow, _, _, _ = plan_job(compose_config([*PLAN, f"video.path={path}", "video.fps=0.5"]), tmp_path / "b")
    assert slow.layout.frames == 4  # 5 frames at 0.5 per second, floored to the temporal patch
    # 2 frames: 1 grid for 2 GPUs, too short for frame-parallel vision: planned on one rank (planner/fit.py)
    short, _, _, _ = plan_job(compose_config([*PLAN, f"video.path={path}", "video.fps=0.25", "video.min_frames=2"]),
                              tmp_path / "c")
    assert short.layout.frames == 2 and short.world_size == 1
    assert (tmp_path / "a" / "plan.json").is_file()


def test_a_missing_or_unreadable_clip_is_one_line_and_exit_2(tmp_path):
    import subprocess
    import sys

    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video" * 50)
    for clip, match in ((tmp_path / "missing.mp4", "no video file at"), (junk, "cannot open .* as a video")):
        res = subprocess.run([sys.executable, "-m", "spava_plan.entry.cli", *PLAN, f"video.path={clip}",
                              "hydra.run.dir=out"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
        assert "video.path" in lines[0] and __import__("re").search(match, lines[0]), lines[0]
        assert not (tmp_path / "out" / "plan.json").exists()


def test_without_pyav_the_error_names_the_extra(monkeypatch, clips):
    import sys

    from spava_plan.errors import InputError

    monkeypatch.setitem(sys.modules, "av", None)  # import av -> ImportError
    with pytest.raises(InputError, match=r"video.path: .*needs PyAV.*spava-plan\[video\]"):
        probe_clip(clips[(30, 10)])


def test_a_clip_scaled_to_a_family_plans_frame_size_gets_its_grid(clips, tmp_path):
    """PlanStore picks a larger plan for a small clip; its frames scaled to the plan's frame size
    give exactly the plan's token grid through the processor."""
    from spava_plan.entry.plan_store import PlanStore
    from spava_plan.runtime.hf import inputs as hf_inputs

    store = PlanStore(tmp_path / "family", [*PLAN, "video.resolution=56x84"])
    chosen = store.choose(frames=8, height=56, width=84, question_tokens=5)  # planned on the fly
    clip = clips[(30, 10)]  # 32x48: smaller than the plan's frames
    assert store.choose(frames=6, height=32, width=48, question_tokens=5).plan.hash == chosen.plan.hash
    # the 3 s clip at video.fps=2 samples 6 frames of 32x48: the same plan holds it
    assert store.choose_for_clip(clip, question_tokens=5).plan.hash == chosen.plan.hash
    frames, _ = read_frames(str(clip), chosen.frames, size=chosen.frame_size)
    assert frames.shape == (8, *chosen.frame_size, 3)
    vis = chosen.plan.config["model"]["vision"]
    _, grid = hf_inputs.video_pixels(hf_inputs.default_processing(), frames, min_pixels=vis["min_pixels"],
                                     max_pixels=vis["max_pixels"], temporal_patch=2)
    lay = chosen.plan.layout
    assert (int(grid[0, 0]), int(grid[0, 1]) // 2, int(grid[0, 2]) // 2) == tuple(lay.grid_thw)
