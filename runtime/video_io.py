"""Decode a video file into RGB frames with PyAV, sampled as the model's processor samples.

Which frames: transformers' Qwen2-VL / Qwen2.5-VL video processor rule (spava_plan.video_meta):
indices ``arange(0, total, total / n)`` over the whole clip, with n fixed by the plan (``read_frames``)
or by a rate (``read_clip``: ``video.fps`` within the processor's min/max frame bounds). The
sampled frames' real rate (``VideoInfo.sampled_fps``) is what Qwen2.5-VL's temporal M-RoPE ids
must use, so a 30 s clip and a 3 min clip sampled to the same frame count get different, correct
temporal positions. Frames are decoded in one streaming pass and only the sampled ones are
converted and kept, so a long high-resolution clip never sits in memory whole. Every failure is an
InputError naming the ``video`` setting.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from spava_plan.errors import InputError
from spava_plan.video_meta import ClipInfo, frames_for_rate, probe_clip
from spava_plan.video_meta import sample_indices as _processor_indices

VideoInfo = ClipInfo  # the file's metadata: total_frames, fps, height, width, duration_s, sampled_fps(n)


def sample_indices(total: int, num: int) -> list[int]:
    """Uniform indices over [0, total): the rule transformers' ``sample_frames`` uses."""
    return _processor_indices(total, num)


def _open(path: str):
    import av

    p = Path(path)
    if not p.is_file():
        raise InputError(f"no video file at {path!r}", setting="video")
    try:
        container = av.open(str(p))
    except Exception as exc:  # PyAV raises a family of FFmpeg errors; all mean "unreadable"
        raise InputError(f"cannot open {path!r} as a video: {_first_line(exc)}", setting="video") from None
    if not container.streams.video:
        container.close()
        raise InputError(f"{path!r} has no video stream", setting="video")
    return container


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _count_frames(path: str) -> int:
    """Count frames by decoding (containers may omit or misreport the count)."""
    container = _open(path)
    try:
        return sum(1 for _ in container.decode(video=0))
    except Exception as exc:
        raise InputError(f"cannot decode {path!r}: {_first_line(exc)}", setting="video") from None
    finally:
        container.close()


def probe(path: str) -> VideoInfo:
    """The file's metadata (container values; the frame count by decoding when it states none)."""
    try:
        return probe_clip(path, setting="video")
    except InputError as exc:
        if "states no frame count" not in str(exc):
            raise
    container = _open(path)  # no count, duration or rate in the container: count by decoding
    try:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        height, width = int(stream.codec_context.height), int(stream.codec_context.width)
    finally:
        container.close()
    total = _count_frames(path)
    if total <= 0 or height <= 0 or width <= 0:
        raise InputError(f"{path!r} holds no decodable frames", setting="video")
    return VideoInfo(path=str(path), total_frames=total, fps=fps, height=height, width=width)


def read_clip(path: str, *, fps: float, min_frames: int = 4, max_frames: int = 768,
              temporal_patch: int = 2) -> tuple[np.ndarray, VideoInfo]:
    """Frames sampled at ``fps`` per second as the processor samples them (count from the rate within
    [min_frames, max_frames], floored to the temporal patch), plus the file's info."""
    info = probe(path)
    n = frames_for_rate(info.total_frames, info.fps, fps, min_frames=min_frames, max_frames=max_frames,
                        temporal_patch=temporal_patch)
    if n < 1:
        raise InputError(f"{path!r} has {info.total_frames} frames, fewer than one temporal patch "
                         f"({temporal_patch})", setting="video")
    return read_frames(path, n)


def read_frames(path: str, num_frames: int, size: tuple[int, int] | None = None) -> tuple[np.ndarray, VideoInfo]:
    """``num_frames`` uniformly sampled frames as uint8 (num_frames, H, W, 3) RGB, plus file info.

    ``size``: (height, width) to scale each sampled frame to while converting it (FFmpeg's
    scaler), e.g. a plan family's frame size for a clip of another resolution
    (plan_store.StoredPlan.frame_size); None keeps the clip's size.
    Raises InputError when the file is missing, unreadable, or has fewer frames than asked for.
    """
    info = probe(path)
    if info.total_frames < num_frames:
        raise InputError(f"{path!r} has {info.total_frames} frames but the plan samples {num_frames}; use a "
                         f"longer video or re-plan with frames<={info.total_frames}", setting="video")
    frames = _decode(path, sample_indices(info.total_frames, num_frames), size)
    if len(frames) < num_frames:
        # The container over-reported its frame count: count by decoding and sample again.
        counted = _count_frames(path)
        info = VideoInfo(info.path, counted, info.fps, info.height, info.width)  # type: ignore[call-arg]
        if counted < num_frames:
            raise InputError(f"{path!r} decodes to {counted} frames but the plan samples {num_frames}; use a "
                             f"longer video or re-plan with frames<={counted}", setting="video")
        frames = _decode(path, sample_indices(counted, num_frames), size)
    return np.stack(frames), info


def _decode(path: str, indices: list[int], size: tuple[int, int] | None = None) -> list[np.ndarray]:
    scale = {} if size is None else {"height": int(size[0]), "width": int(size[1])}
    wanted: dict[int, int] = {}
    for idx in indices:  # an index may repeat only if total < num (refused above); count anyway
        wanted[idx] = wanted.get(idx, 0) + 1
    last = max(indices)
    out: list[np.ndarray] = []
    container = _open(path)
    try:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                rgb = frame.to_ndarray(format="rgb24", **scale)
                out.extend([rgb] * wanted[i])
            if i >= last:
                break
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"cannot decode {path!r}: {_first_line(exc)}", setting="video") from None
    finally:
        container.close()
    return out
