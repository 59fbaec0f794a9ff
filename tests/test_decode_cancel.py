"""A cancelled request stops its video decode between frames (issue 25): the server's prefetch
worker hands the request's ``job.stopped`` to Session.prepare, every decoder asks it between two
frames, and a request whose client left mid-decode ends there (answered as cancelled), instead of
decoding the rest of its clip first. Real parts throughout: the tiny model's Session (random
weights, gpus=2), the server's Worker and Job, a file:// clip fetched by the media policy."""
from __future__ import annotations

import asyncio
import sys
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("av")
pytest.importorskip("prometheus_client")

import model_fixtures as mf  # noqa: E402
from spava_plan.entry.run_config import compose_entry_config  # noqa: E402
from spava_plan.runtime import video_io  # noqa: E402
from spava_plan.server.serve import Worker  # noqa: E402
from spava_plan.server.api import ChatRequest  # noqa: E402
from spava_plan.server.jobs import Job, Metrics  # noqa: E402
from spava_plan.entry.session import Sampling, Session  # noqa: E402

FRAMES = 200  # the clip's; the plan samples 16 of them, spread over every group of pictures


def _asked_by_a_decoder() -> bool:
    return sys._getframe(2).f_code.co_filename.endswith("video_io.py")


class HangsUpMidDecode(Job):
    """A Job whose client hangs up after the video's decoders asked ``after`` times."""

    after = 3
    decode_asks = 0

    def stopped(self) -> bool:
        if _asked_by_a_decoder():
            self.decode_asks += 1
            if self.decode_asks > self.after:
                self.cancel("disconnected")
        return super().stopped()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("cancel")
    cfg = compose_entry_config("serve", ["model=tiny", "model.init=random", "gpus=2", "dtype=fp32", "backend=torch",
                                         f"plan_dir={root / 'plans'}", f"allowed_local_media_path={root}",
                                         "video.frames=16", "video.resolution=56x84"])
    clip = mf.write_video(root / "clip.mp4", frames=FRAMES, height=56, width=84, fps=10)
    return Session(cfg, 2), cfg, clip


def test_session_prepare_asks_stop_between_frames(engine):
    session, _, clip = engine
    asks = []

    def stop() -> bool:
        asks.append(1)
        return len(asks) > 2

    with pytest.raises(video_io.DecodeCancelled):
        session.prepare(str(clip), "What happens?", stop=stop)
    assert 3 <= len(asks) <= 3 + video_io.decode_workers()  # then every decoder ends at its next frame
    prepared = session.prepare(str(clip), "What happens?", stop=lambda: False)  # not cancelled: decoded in full
    assert prepared.decode_s > 0


def test_a_client_that_hangs_up_mid_decode_ends_the_decode(engine):
    session, cfg, clip = engine
    loop = asyncio.new_event_loop()
    try:
        request = ChatRequest(video_url=f"file://{clip}", question="What happens?", sampling=Sampling(max_tokens=2),
                              stop=[], stream=False, model="spava")
        job = HangsUpMidDecode(request=request, loop=loop, events=asyncio.Queue(), deadline=time.monotonic() + 600)
        metrics = Metrics()
        worker = Worker(session, cfg, None, metrics)
        assert worker.admit(job)
        worker.jobs.get_nowait()
        assert worker._prepare(job) is None  # abandoned: nothing goes to the GPUs
        kind, _ = loop.run_until_complete(asyncio.wait_for(job.events.get(), 10))
        assert kind == "error" and job.cancel_reason == "disconnected" and job.released
        assert job.after < job.decode_asks <= job.after + 1 + video_io.decode_workers()
        assert metrics.requests.labels("cancelled")._value.get() == 1
    finally:
        loop.close()
