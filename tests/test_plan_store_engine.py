"""The server's request path answers every clip length (issue 24 item 3): a 1-frame, a 4 s and a
24 s clip at 168x112 on the tiny model (random weights) with gpus=2, through the object spava-serve
drives (spava_plan.entry.session.Session: prepare -> backend -> generate on emulated ranks, as serve.py's
worker runs it). Each gets a plan from the store, named by its method, that runs on its own rank
count; the two short clips get an exact method (planner/fit.py). The tokens themselves are the
runtime's business (tests/test_model_*.py compare each method with a reference); here every clip
must be answered at all, which today's store refuses (HTTP 400)."""
from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("av")

import model_fixtures as mf  # noqa: E402
from spava_plan.config import METHODS  # noqa: E402
from spava_plan.entry.session import Sampling, Session  # noqa: E402
from spava_plan.entry.run_config import compose_entry_config  # noqa: E402
from spava_plan.runtime.comm.emulated import EmulatedWorld  # noqa: E402

H, W = 112, 168
CLIPS = {"1 frame": (1, 25), "4 s": (40, 10), "24 s": (240, 10)}


def _answer(engine: Session, prepared, tokens: int = 3):
    backend = engine.backend(prepared, rank_threads=True)
    world = EmulatedWorld.for_plan(prepared.plan, timeout_s=120)
    results = world.run(lambda rank: engine.generate(prepared, world.comm(rank), backend,
                                                     Sampling(max_tokens=tokens), None))
    return results[0].tokens


def test_every_clip_length_answers_with_its_method(tmp_path):
    cfg = compose_entry_config("serve", ["model=tiny", "model.init=random", "gpus=2", "dtype=fp32", "backend=torch",
                                         f"plan_dir={tmp_path / 'plans'}"])
    engine = Session(cfg, 2)
    for name, (n, fps) in CLIPS.items():
        clip = mf.write_video(tmp_path / f"{n}.mp4", frames=n, height=H, width=W, fps=fps)
        prepared = engine.prepare(str(clip), "What happens in this video?")
        plan = prepared.plan
        assert plan.method in METHODS and tuple(plan.layout.frame_size) == (H, W), name
        tokens = _answer(engine, prepared)
        assert len(tokens) == 3, name
        if name != "24 s":  # too short for Spava's blocks: an exact method was fitted
            assert plan.method in ("dense", "zigzag_ring"), (name, plan.method)
        if name == "1 frame":
            assert plan.world_size == 1  # one temporal grid: one rank encodes it
