"""A clip's metadata and the model processor's frame sampling rule (core: torch-free, no decode).

Used by the planner's entry point (``spava-plan video.path=clip.mp4``: frames and resolution come
from the file) and by the runtime (runtime/video_io.py decodes the frames this rule picks).

Sampling follows transformers' Qwen2-VL / Qwen2.5-VL video processor (``sample_frames``) exactly:
  by rate:  n = total / clip_fps * fps, bounded to [min_frames, min(max_frames, total) floored to
            the temporal patch], then floored to a multiple of the temporal patch;
  by count: n = round(num_frames / temporal_patch) * temporal_patch;
  indices:  arange(0, total, total / n), truncated to integers (uniform over the whole clip).
The sampled frames' real rate, n / total * clip_fps (transformers' ``VideoMetadata.sampled_fps``),
is what Qwen2.5-VL's temporal M-RoPE ids use: ``second_per_grid = temporal_patch / sampled_fps``.

PyAV is imported only when a clip is probed; it is an optional extra (``pip install
'spava-plan[video]'``), and without it probing fails with one line saying so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

# transformers' Qwen2VLVideoProcessor defaults (min_frames, max_frames)
PROCESSOR_MIN_FRAMES = 4
PROCESSOR_MAX_FRAMES = 768


@dataclass(frozen=True)
class ClipInfo:
    path: str
    total_frames: int  # frames in the file (from the container; see probe_clip)
    fps: float  # the file's average frame rate
    height: int
    width: int

    @property
    def duration_s(self) -> float:
        return self.total_frames / self.fps if self.fps > 0 else 0.0

    def sampled_fps(self, frames: int) -> float:
        """Real rate of ``frames`` frames sampled uniformly over the whole clip."""
        return frames / self.total_frames * self.fps


def frames_for_rate(total_frames: int, clip_fps: float, fps: float, *, min_frames: int = PROCESSOR_MIN_FRAMES,
                    max_frames: int = PROCESSOR_MAX_FRAMES, temporal_patch: int = 2) -> int:
    """How many frames the processor samples from a clip at ``fps`` frames per second (0 when the
    clip is shorter than one temporal patch)."""
    if clip_fps <= 0:
        raise InputError("the clip does not state its frame rate, which fps-based sampling needs", setting="video")
    cap = math.floor(min(max_frames, total_frames) / temporal_patch) * temporal_patch
    n = total_frames / clip_fps * fps
    n = min(max(n, min_frames), cap, total_frames)
    return int(math.floor(n / temporal_patch) * temporal_patch)


def sample_indices(total_frames: int, frames: int) -> list[int]:
    """The processor's frame indices: arange(0, total, total / frames) truncated to integers."""
    if frames <= 0 or frames > total_frames:
        raise InputError(f"cannot sample {frames} frames from a clip of {total_frames}", setting="frames")
    step = total_frames / frames
    return [int(i * step) for i in range(frames)]


def _import_av():
    try:
        import av
    except ImportError:
        raise InputError("reading a video file needs PyAV, an optional extra: pip install 'spava-plan[video]' "
                         "(or pip install av)", setting="video.path") from None
    return av


def probe_clip(path: str | Path, setting: str = "video.path") -> ClipInfo:
    """Frame count, rate and size from the container's metadata, without decoding the clip.

    The frame count is the stream's (as transformers' PyAV loader reads it); a container that does
    not store it gets duration x rate. InputError naming ``setting`` for a missing or unreadable file."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"no video file at {str(path)!r}", setting=setting)
    av = _import_av()
    try:
        container = av.open(str(p))
    except Exception as exc:  # PyAV raises a family of FFmpeg errors; all mean "unreadable"
        raise InputError(f"cannot open {str(path)!r} as a video: {_first_line(exc)}", setting=setting) from None
    try:
        if not container.streams.video:
            raise InputError(f"{str(path)!r} has no video stream", setting=setting)
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        total = int(stream.frames or 0)
        if total <= 0 and fps > 0:
            if stream.duration is not None and stream.time_base is not None:
                seconds = float(stream.duration * stream.time_base)
            else:
                seconds = (container.duration or 0) / 1e6  # av.time_base: microseconds
            total = int(round(seconds * fps))
        height, width = int(stream.codec_context.height), int(stream.codec_context.width)
    finally:
        container.close()
    if total <= 0 or height <= 0 or width <= 0:
        raise InputError(f"{str(path)!r} states no frame count, duration or size; re-encode it (e.g. to mp4)",
                         setting=setting)
    return ClipInfo(path=str(path), total_frames=total, fps=fps, height=height, width=width)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def plan_for_clip(cfg):
    """``cfg`` (a SpavaConfig with video.path set) with video.frames and video.resolution taken from
    the clip: the frames the model's processor samples at video.fps, and the clip's size."""
    import dataclasses

    video = cfg.video
    info = probe_clip(video.path)
    tp = 1 if cfg.model.family == "internvl3" else cfg.model.vision.temporal_patch
    frames = frames_for_rate(info.total_frames, info.fps, video.fps, min_frames=video.min_frames,
                             max_frames=video.max_frames, temporal_patch=tp)
    frames = max(frames, 1)  # a clip shorter than one temporal patch: its frame, padded by repeating it
    resolved = dataclasses.replace(video, frames=frames, resolution=f"{info.height}x{info.width}")
    return dataclasses.replace(cfg, video=resolved)  # the frames= shorthand follows video.frames
