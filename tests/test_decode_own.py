"""Under torchrun each rank decodes only the sampled frames of its own temporal grids
(``video_decode=own``, the default; issue 25): on gloo with W=2 real rank processes, every rank's
frames are the bytes a full decode gives, the rest of its buffer is zero, and the pixel rows its
vision reads equal those of a rank that decoded every frame (``video_decode=all``). The tiny model
with random weights; the end-to-end answer under own decoding is tests/test_model_run.py's gloo run,
compared there with the emulated run (which decodes every frame)."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("av")

import model_fixtures as mf  # noqa: E402

WORKER = """
import json, sys
import numpy as np, torch
from spava_plan.entry.run_config import compose_entry_config
from spava_plan.runtime import video_io
from spava_plan.runtime.comm.dist import TorchDistComm
from spava_plan.entry.session import Session

clip, out = sys.argv[1], sys.argv[2]
comm = TorchDistComm.from_env(backend="gloo", timeout_s=120)
args = ["model=tiny", "model.init=random", "gpus=2", "frames=8", "video.resolution=56x84", "dtype=fp32",
        "backend=torch", "video=" + clip]
got = {}
for mode in ("own", "all"):
    cfg = compose_entry_config("run", args + ["video_decode=" + mode])
    session = Session(cfg, 2, comm.rank, rank=comm.rank)
    prepared = session.prepare_run()
    got[mode] = (session._own_frames(prepared.plan, 8), prepared.inputs.pixel_values_videos)
own, pixels = got["own"]
assert got["all"][0] is None  # video_decode=all: every frame
frames, _ = video_io.read_frames(clip, 8, only=own)
full, _ = video_io.read_frames(clip, 8)
first, last = own
rows = pixels.shape[0] // 4  # 8 frames: 4 temporal grids of 2
g0, g1 = first // 2, last // 2
report = {"rank": comm.rank, "own": own,
          "frames_equal": bool(np.array_equal(frames[first:last], full[first:last])),
          "rest_zero": bool(not frames[:first].any() and not frames[last:].any()),
          "rows_max_diff": float((pixels[g0 * rows:g1 * rows] - got["all"][1][g0 * rows:g1 * rows]).abs().max())}
every = comm.all_gather_object(report)
if comm.rank == 0:
    open(out, "w").write(json.dumps(every))
comm.close()
"""


def test_each_rank_decodes_its_own_frames_on_gloo(tmp_path):
    clip = mf.write_video(tmp_path / "clip.mp4", frames=40, height=56, width=84, fps=10, codec="libx264")
    out = tmp_path / "report.json"
    results = mf.launch(lambda r: ["-c", WORKER, str(clip), str(out)], 2, cwd=tmp_path, timeout=240)
    for rank, (rc, _, err) in enumerate(results):
        assert rc == 0, f"rank {rank}:\n{err[-3000:]}"
    reports = json.loads(out.read_text())
    assert [r["own"] for r in reports] == [[0, 4], [4, 8]]  # two grids of two frames each
    for r in reports:
        assert r["frames_equal"] and r["rest_zero"], r
        assert r["rows_max_diff"] <= 1e-6, r  # the same frames through the same processor


def test_emulated_ranks_and_single_rank_worlds_decode_every_frame(tmp_path):
    from spava_plan.errors import ConfigError
    from spava_plan.entry.run_config import compose_entry_config
    from spava_plan.entry.session import Session

    clip = mf.write_video(tmp_path / "clip.mp4", frames=40, height=56, width=84, fps=10)
    cfg = compose_entry_config("run", ["model=tiny", "model.init=random", "gpus=2", "frames=8",
                                       "video.resolution=56x84", "dtype=fp32", f"video={clip}"])
    session = Session(cfg, 2)  # emulated: one process holds every rank
    assert session._own_frames(session.base, 8) is None
    with pytest.raises(ConfigError, match="video_decode: must be one of own, all"):
        compose_entry_config("run", ["model=tiny", "video_decode=some"])
