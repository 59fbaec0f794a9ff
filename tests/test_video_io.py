"""Decoding only the sampled frames (runtime/video_io.py): seek to the keyframe before each one and
decode forward. The frames must be the decode-everything path's frames bit for bit (same decoder,
same conversion: a pure copy), for codecs with B-frames and short groups of pictures, repeated and
unordered indices, scaling, and the metadata-only size check."""
from __future__ import annotations

import time

import numpy as np
import pytest

av = pytest.importorskip("av")
pytest.importorskip("torch")

from spava_plan.errors import InputError  # noqa: E402
from spava_plan.runtime import video_io  # noqa: E402


def write_clip(path, frames: int, height: int, width: int, *, codec: str, gop: int, bframes: int, fps: int = 10):
    """Noise with a moving block, every frame different (so a wrong frame cannot pass)."""
    rng = np.random.default_rng(1)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.codec_context.max_b_frames = bframes
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "bf": str(bframes), "g": str(gop), "keyint_min": str(gop)}
        for i in range(frames):
            img = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
            img[: height // 3, (i * 5) % (width - 8):(i * 5) % (width - 8) + 8] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


# mp4 + H.264: the container's index; mpeg4 part 2 (B-frames shown before the keyframe decoded ahead
# of them) and Matroska (its cues list keyframes only): the packets' timestamps.
@pytest.mark.parametrize("codec,gop,bframes,suffix,index", [("libx264", 12, 3, "mp4", "container index"),
                                                            ("mpeg4", 5, 2, "mp4", "packets"),
                                                            ("libx264", 1, 0, "mp4", "container index"),
                                                            ("libx264", 12, 3, "mkv", "packets")])
def test_seeking_decode_equals_decoding_everything(tmp_path, codec, gop, bframes, suffix, index):
    path = write_clip(tmp_path / f"clip_{codec}_{gop}.{suffix}", 90, 48, 64, codec=codec, gop=gop, bframes=bframes)
    total = video_io.probe(path).total_frames
    assert total == 90
    cases = [video_io.sample_indices(total, 8), video_io.sample_indices(total, 30), [0], [total - 1],
             [40, 3, 3, 77, 41, 0, 89, 40]]  # unordered, repeated, adjacent, both ends
    for indices in cases:
        stats: dict = {}
        got = video_io.decode_frames(path, indices, stats=stats, workers=1)
        want = video_io.decode_sequential(path, indices)
        assert stats["path"] == "seek" and stats["index"] == index
        assert got.dtype == np.uint8 and got.shape == (len(indices), 48, 64, 3)
        assert np.array_equal(got, want)  # a pure copy of the same decoder's bytes
    # Every decoded frame is the same as decoding it in place, all 90 of them.
    assert np.array_equal(video_io.decode_frames(path, list(range(total))), video_io.decode_sequential(path, list(range(total))))


def test_only_the_sampled_groups_of_pictures_are_decoded(tmp_path):
    path = write_clip(tmp_path / "long.mp4", 240, 32, 48, codec="libx264", gop=10, bframes=2)
    indices = video_io.sample_indices(240, 4)  # 0, 60, 120, 180: one frame in four groups of 10
    stats: dict = {}
    got = video_io.decode_frames(path, indices, stats=stats, workers=1)
    everything: dict = {}
    want = video_io.decode_sequential(path, indices, stats=everything)
    assert np.array_equal(got, want)
    assert stats["seeks"] == 4
    # each target is a keyframe or a few frames after one (B-frame reordering delays the output)
    assert stats["decoded"] <= 4 * 10 < everything["decoded"] == 181


@pytest.mark.parametrize("workers", [2, 3, 5])
def test_parallel_decoders_give_the_same_frames(tmp_path, workers):
    """Runs of the sampled frames on separate decoders, written into one buffer: the same bytes as
    one pass over everything (unordered and repeated indices, scaling; an index past the end falls
    back to the serial path's leading rows)."""
    path = write_clip(tmp_path / "clip.mp4", 120, 48, 64, codec="libx264", gop=12, bframes=3)
    for indices, size in ((video_io.sample_indices(120, 16), None), ([90, 3, 3, 117, 41, 0, 119, 40, 64, 65, 12, 100, 77], None),
                          (video_io.sample_indices(120, 12), (28, 56))):
        stats: dict = {}
        got = video_io.decode_frames(path, indices, size=size, stats=stats, workers=workers)
        assert stats["path"] == "parallel" and stats["workers"] == workers
        assert np.array_equal(got, video_io.decode_sequential(path, indices, size=size))  # a pure copy
    stats = {}
    got = video_io.decode_frames(path, [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 130], stats=stats, workers=workers)
    assert stats["path"] == "seek" and got.shape[0] == 10


def test_scaled_frames_equal_too(tmp_path):
    path = write_clip(tmp_path / "clip.mp4", 40, 48, 64, codec="libx264", gop=8, bframes=2)
    indices = video_io.sample_indices(40, 6)
    got = video_io.decode_frames(path, indices, size=(28, 56))
    assert got.shape == (6, 28, 56, 3)
    assert np.array_equal(got, video_io.decode_sequential(path, indices, size=(28, 56)))
    frames, info = video_io.read_frames(path, 6, size=(28, 56))
    assert np.array_equal(frames, got) and (info.height, info.width) == (48, 64)


def test_check_clip_reads_metadata_only_and_names_the_setting(tmp_path):
    path = write_clip(tmp_path / "clip.mp4", 60, 48, 64, codec="libx264", gop=10, bframes=0, fps=10)
    info = video_io.check_clip(path, max_frames=60, max_pixels=48 * 64, max_duration_s=6.0)
    assert (info.total_frames, info.height, info.width) == (60, 48, 64)
    for limits, what in (({"max_frames": 59}, "60 frames"), ({"max_pixels": 48 * 64 - 1}, "3072 pixels"),
                         ({"max_duration_s": 5.0}, "6.0 s")):
        with pytest.raises(InputError) as err:
            video_io.check_clip(path, setting="serve.max_video", **limits)
        assert err.value.setting == "serve.max_video" and what in str(err.value)
    with pytest.raises(InputError):
        video_io.check_clip(str(tmp_path / "missing.mp4"))


def test_check_clip_does_not_decode(tmp_path):
    """The check's cost does not grow with the clip: a 60x longer clip is checked as fast (to 50 ms;
    best of 5, the machine may be busy), and faster than decoding its last frame."""
    short = write_clip(tmp_path / "short.mp4", 10, 64, 96, codec="libx264", gop=10, bframes=0)
    long = write_clip(tmp_path / "long.mp4", 600, 64, 96, codec="libx264", gop=600, bframes=0)

    def best(path):
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            video_io.check_clip(path)
            times.append(time.perf_counter() - t0)
        return min(times)

    t_decode = time.perf_counter()
    video_io.decode_sequential(long, [599])
    t_decode = time.perf_counter() - t_decode
    assert best(long) < best(short) + 0.05
    assert best(long) < t_decode


def test_the_buffer_is_pinned_with_cuda():
    import torch

    buf = video_io.frame_buffer(2, 4, 6)
    assert buf.shape == (2, 4, 6, 3) and buf.dtype == np.uint8
    assert torch.from_numpy(buf).is_pinned() == torch.cuda.is_available()


@pytest.mark.parametrize("suffix,index", [("mp4", "container index"), ("mkv", "packets")])
def test_skipping_unsampled_nonref_frames_keeps_the_bytes(tmp_path, suffix, index):
    """Packets whose frame is not sampled are decoded with skip_frame=NONREF: x264's non-reference
    B-frames (3 B-frames, a reference pyramid) are never decoded, the sampled frames (B-frames among
    them) are the decode-everything path's bytes, and fewer frames come out than packets go in."""
    path = write_clip(tmp_path / f"clip.{suffix}", 120, 48, 64, codec="libx264", gop=30, bframes=3)
    rng = np.random.default_rng(7)
    cases = [video_io.sample_indices(120, 8), sorted(rng.choice(120, 20, replace=False).tolist()),
             [29, 31, 58, 59, 61, 119], list(range(0, 120, 3))]
    for indices in cases:
        on: dict = {}
        off: dict = {}
        got = video_io.decode_frames(path, indices, stats=on, workers=1)
        assert on["path"] == "seek" and on["index"] == index
        assert np.array_equal(got, video_io.decode_sequential(path, indices))
        assert np.array_equal(video_io.decode_frames(path, indices, stats=off, workers=1, skip_nonref=False), got)
        assert on["packets"] == off["packets"] == off["decoded"]  # the same packets; all decoded without skipping
        assert on["decoded"] < on["packets"]  # some non-reference frames were skipped
        assert on["decoded"] >= len(set(indices))
    for workers in (2, 3):
        stats: dict = {}
        indices = video_io.sample_indices(120, 16)
        assert np.array_equal(video_io.decode_frames(path, indices, stats=stats, workers=workers),
                              video_io.decode_sequential(path, indices))
        assert stats["path"] == "parallel" and stats["decoded"] < stats["packets"]


def test_decoding_stops_after_the_last_sampled_frame(tmp_path):
    """One group of pictures of 60 frames: frames 2 and 5 cost the packets up to frame 5's (in decode
    order), not the group's."""
    path = write_clip(tmp_path / "clip.mp4", 60, 32, 48, codec="libx264", gop=60, bframes=2)
    stats: dict = {}
    got = video_io.decode_frames(path, [2, 5], stats=stats, workers=1)
    assert np.array_equal(got, video_io.decode_sequential(path, [2, 5]))
    assert stats["seeks"] == 1 and stats["packets"] <= 8


@pytest.mark.parametrize("workers", [1, 3])
def test_a_stopped_decode_ends_between_frames(tmp_path, workers):
    """stop() is asked between frames by every decoder: once it says True, DecodeCancelled comes
    within a frame per decoder, not after the clip (the server's cancelled requests)."""
    import threading

    path = write_clip(tmp_path / "clip.mp4", 150, 32, 48, codec="libx264", gop=50, bframes=2)
    asked = []
    lock = threading.Lock()

    def stop() -> bool:
        with lock:
            asked.append(1)
            return len(asked) > 4

    indices = video_io.sample_indices(150, 30)
    with pytest.raises(video_io.DecodeCancelled):
        video_io.decode_frames(path, indices, workers=workers, stop=stop)
    assert len(asked) <= 4 + workers  # each decoder asks once more at most, then ends
    with pytest.raises(video_io.DecodeCancelled):
        video_io.decode_sequential(path, indices, stop=lambda: True)
    assert video_io.decode_frames(path, indices, workers=workers, stop=lambda: False).shape[0] == 30


def test_decoders_are_shared_by_the_ranks_of_a_node(monkeypatch):
    """Half the cores, at most 8, divided among the torchrun ranks of the node (they decode at once)."""
    monkeypatch.setattr(video_io.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert video_io.decode_workers() == 8
    for ranks, workers in (("2", 4), ("8", 1), ("16", 1)):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", ranks)
        assert video_io.decode_workers() == workers
