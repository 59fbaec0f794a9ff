"""Decode a video file into RGB frames with PyAV, sampled as the model's processor samples.

Which frames: transformers' Qwen2-VL / Qwen2.5-VL video processor rule (spava_plan.video_meta):
indices ``arange(0, total, total / n)`` over the whole clip, with n fixed by the plan (``read_frames``)
or by a rate (``read_clip``: ``video.fps`` within the processor's min/max frame bounds). The
sampled frames' real rate (``VideoInfo.sampled_fps``) is what Qwen2.5-VL's temporal M-RoPE ids
must use, so a 30 s clip and a 3 min clip sampled to the same frame count get different, correct
temporal positions. Frames are decoded in one streaming pass and only the sampled ones are
converted and kept, so a long high-resolution clip never sits in memory whole. Every failure is an
InputError naming the ``video`` setting.

Decoding only what is sampled (``decode_frames``): the frames are indexed first, from the
container's own index when it lists every frame (mp4: read from the header, no packet read) or else
from the demuxed packets' timestamps (``_Index``), then for each sampled frame the decoder seeks to
the nearest keyframe at or before it and decodes forward to it; sampled
frames that follow each other inside one group of pictures share one forward pass. The packets are
given to the decoder one by one, each known by its presentation timestamp: those up to the pass's
last sampled frame only (then the decoder is drained), and those whose frame is not sampled with
``skip_frame = "NONREF"``, so a frame nothing refers to (x264's non-reference B-frames) is never
decoded. A ``stop()`` callable is asked between packets (DecodeCancelled). Decoding is
threaded (FFmpeg's frame + slice threads, ``thread_type = "AUTO"``). Each frame is converted once,
straight into its slot of one preallocated uint8 buffer (page-locked when CUDA is available, so the
copy to the GPU is a DMA). The frames are the ones the decode-everything path returns, bit for bit:
the same decoder and the same conversion, only the frames in between are never decoded. A stream
whose packets state no timestamps, or whose decoded frames do not land on the indexed ones, is
decoded in one sequential pass instead (the same frames, slower).

Why PyAV and not torchcodec: PyAV ships its own FFmpeg in the wheel and is already the planner's
metadata reader (spava_plan/video_meta.py), so it installs everywhere; torchcodec is built against
one torch release (the same lock-step as torchvision, which is what keeps CI's torch choice narrow)
and needs system FFmpeg libraries. PyAV's seek + threaded decode gives the same frame access.

``check_clip`` refuses an oversize clip from its container metadata alone (no decode), for the
server and spava-run to call before decoding anything.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Callable

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


def read_frames(path: str, num_frames: int, size: tuple[int, int] | None = None, *,
                stop: Callable[[], bool] | None = None,
                only: tuple[int, int] | None = None) -> tuple[np.ndarray, VideoInfo]:
    """``num_frames`` uniformly sampled frames as uint8 (num_frames, H, W, 3) RGB, plus file info:
    only the sampled frames are decoded (``decode_frames``), into one buffer (pinned when CUDA is available).

    ``size``: (height, width) to scale each sampled frame to while converting it (FFmpeg's
    scaler), e.g. a plan family's frame size for a clip of another resolution
    (plan_store.StoredPlan.frame_size); None keeps the clip's size.
    ``stop``: asked between frames (decode_frames); True ends the decode with DecodeCancelled.
    ``only`` = (first, last): decode only the sampled frames [first, last) (one rank's temporal grids
    under torchrun, video_decode=own); the other rows of the buffer are zero. The container's frame
    count is trusted then (every rank samples by it without a word to the others): a clip that
    decodes to fewer frames is refused, naming video_decode.
    Raises InputError when the file is missing, unreadable, or has fewer frames than asked for.
    """
    info = probe(path)
    if info.total_frames < num_frames:
        raise InputError(f"{path!r} has {info.total_frames} frames but the plan samples {num_frames}; use a "
                         f"longer video or re-plan with frames<={info.total_frames}", setting="video")
    if only is not None:
        return _read_own(path, info, num_frames, size, stop, only), info
    frames = decode_frames(path, sample_indices(info.total_frames, num_frames), size, stop=stop)
    if len(frames) < num_frames:
        # The container over-reported its frame count: count by decoding and sample again.
        counted = _count_frames(path)
        info = VideoInfo(info.path, counted, info.fps, info.height, info.width)  # type: ignore[call-arg]
        if counted < num_frames:
            raise InputError(f"{path!r} decodes to {counted} frames but the plan samples {num_frames}; use a "
                             f"longer video or re-plan with frames<={counted}", setting="video")
        frames = decode_frames(path, sample_indices(counted, num_frames), size, stop=stop)
    return frames, info


def _read_own(path: str, info: VideoInfo, num_frames: int, size: tuple[int, int] | None,
              stop: Callable[[], bool] | None, only: tuple[int, int]) -> np.ndarray:
    """The sampled frames [first, last) decoded into their rows of a zeroed (num_frames, H, W, 3) buffer.
    np.zeros, not the pinned frame_buffer: the OS hands out zero pages lazily, so the other ranks'
    rows cost neither time nor memory unless something reads them (only the processor of InternVL3
    or the per-frame pixel cap does; the own frames' copy to the GPU is 1/W of the clip)."""
    first, last = int(only[0]), int(only[1])
    if not 0 <= first <= last <= num_frames:
        raise ValueError(f"frames {first}..{last} are not within the {num_frames} sampled")
    h, w = (int(size[0]), int(size[1])) if size is not None else (info.height, info.width)
    out = np.zeros((num_frames, h, w, 3), dtype=np.uint8)
    if last > first:
        got = decode_frames(path, sample_indices(info.total_frames, num_frames)[first:last], size, stop=stop)
        if got.shape[0] != last - first or got.shape[1:3] != (h, w):
            raise InputError(f"{path!r} decodes to fewer frames than its container states ({info.total_frames}), "
                             f"so the ranks cannot each decode their own; use video_decode=all", setting="video_decode")
        out[first:last] = got
    return out


def check_clip(path: str, *, max_frames: int | None = None, max_pixels: int | None = None,
               max_duration_s: float | None = None, setting: str = "video") -> VideoInfo:
    """The clip's container metadata (frames, size, rate; no decode), refused with one InputError
    naming ``setting`` when it holds more frames, more pixels per frame or more seconds than allowed
    (None: no bound). Cheap enough to run on every request before any decoding."""
    info = probe_clip(path, setting=setting)
    if max_frames is not None and info.total_frames > max_frames:
        raise InputError(f"{path!r} has {info.total_frames} frames, more than the {max_frames} allowed",
                         setting=setting)
    if max_pixels is not None and info.height * info.width > max_pixels:
        raise InputError(f"{path!r} has {info.width}x{info.height} frames ({info.height * info.width} pixels), "
                         f"more than the {max_pixels} allowed", setting=setting)
    if max_duration_s is not None and info.duration_s > max_duration_s:
        raise InputError(f"{path!r} lasts {info.duration_s:.1f} s, more than the {max_duration_s:g} s allowed",
                         setting=setting)
    return info


def frame_buffer(frames: int, height: int, width: int) -> np.ndarray:
    """One uint8 (frames, height, width, 3) buffer, page-locked when CUDA is available (a numpy view
    of a pinned torch tensor: torch.from_numpy on it is pinned too)."""
    try:
        import torch
    except ImportError:  # decoding needs no torch; only the pinning does
        return np.empty((frames, height, width, 3), dtype=np.uint8)
    pin = torch.cuda.is_available()
    return torch.empty((frames, height, width, 3), dtype=torch.uint8, pin_memory=pin).numpy()


SEEK_MIN_SKIP = 8  # frames a seek must skip to be worth the decoder flush


class _NotIndexed(Exception):
    """The stream cannot be decoded by seeking (no timestamps, or frames off the index)."""


class DecodeCancelled(Exception):
    """``stop()`` said stop between two frames (the request's client left, or request_timeout passed):
    the decoders end there instead of finishing the clip."""


def decode_workers() -> int:
    """Decoders run at once for one clip: half the cores this process may use, at most 8 (each also
    runs FFmpeg's own frame threads), shared by the torchrun ranks of this node (LOCAL_WORLD_SIZE:
    they decode at the same time, each its own frames). One on a 2-core machine: the serial path."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        ranks = 1
    return max(1, min(8, cores // 2 // ranks))


def decode_frames(path: str, indices: list[int], size: tuple[int, int] | None = None,
                  stats: dict | None = None, workers: int | None = None, *, skip_nonref: bool = True,
                  stop: Callable[[], bool] | None = None) -> np.ndarray:
    """Frames ``indices`` (in the order given; an index may repeat) of the clip, converted to RGB
    (scaled to ``size`` = (height, width) when given), as one uint8 (len(indices), H, W, 3) buffer.
    Fewer rows than asked when the clip holds fewer frames than an index (the caller re-counts).
    ``stats`` (a dict) receives "decoded" (frames the decoder produced), "packets" (given to it),
    "seeks" and "path" ("seek", "parallel" or "sequential").

    ``skip_nonref`` (default): packets between a seek's keyframe and a sampled frame whose frame is not
    sampled are decoded with FFmpeg's ``skip_frame = "NONREF"`` (``_decode_seeking``): the same
    sampled bytes, fewer frames decoded. ``stop``: called between frames by every decoder; True
    ends the decode with DecodeCancelled (a cancelled request does not finish its clip).

    ``workers`` (default ``decode_workers()``) > 1: the sorted sampled frames are cut into that many
    runs, each decoded by its own container and decoder on its own thread (FFmpeg releases the GIL
    while it decodes) straight into its rows of the one buffer. Where the keyframes lie far apart
    (2 s groups of pictures: each sampled frame costs tens of decoded ones), one decoder is the
    bottleneck: an H200 machine's 16 cores decoded 64 frames of a 2-minute 1440p clip in about
    4 s with one. The frames are the same bytes either way (the same decoder on the same packets)."""
    stats = {} if stats is None else stats
    workers = decode_workers() if workers is None else max(1, int(workers))
    if workers > 1 and len(set(indices)) >= 2 * workers:
        out = _decode_parallel(path, indices, size, stats, workers, skip_nonref, stop)
        if out is not None:
            stats["path"] = "parallel"
            return out
    return _decode_one(path, indices, size, stats, skip_nonref, stop)


def _decode_parallel(path: str, indices: list[int], size: tuple[int, int] | None, stats: dict,
                     workers: int, skip_nonref: bool, stop: Callable[[], bool] | None) -> np.ndarray | None:
    """``workers`` decoders over runs of the sorted sampled frames, into one buffer; None when the
    clip's metadata or a run does not allow it (the caller decodes serially: the same frames)."""
    from concurrent.futures import ThreadPoolExecutor

    info = probe(path)
    if info.total_frames <= 0 or max(indices) >= info.total_frames:
        return None  # indices past the end: the serial path returns the leading rows found
    h, w = (int(size[0]), int(size[1])) if size is not None else (info.height, info.width)
    out = frame_buffer(len(indices), h, w)
    order = sorted(set(int(i) for i in indices))
    runs = [order[k * len(order) // workers:(k + 1) * len(order) // workers] for k in range(workers)]
    rows: dict[int, list[int]] = {}
    for slot, idx in enumerate(indices):
        rows.setdefault(int(idx), []).append(slot)

    def run(frames: list[int]) -> dict:
        part: dict = {}
        got = _decode_one(path, frames, size, part, skip_nonref, stop)
        if got.shape[0] != len(frames) or got.shape[1:3] != (h, w):
            raise _NotIndexed  # metadata and decoded frames disagree: decode serially instead
        for j, idx in enumerate(frames):
            for r in rows[idx]:
                out[r] = got[j]
        return part

    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="spava-decode") as pool:
            parts = list(pool.map(run, [r for r in runs if r]))
    except _NotIndexed:
        return None
    stats["decoded"] = sum(p.get("decoded", 0) for p in parts)
    stats["seeks"] = sum(p.get("seeks", 0) for p in parts)
    stats["packets"] = sum(p.get("packets", 0) for p in parts)
    stats["workers"] = len(parts)
    return out


def _decode_one(path: str, indices: list[int], size: tuple[int, int] | None, stats: dict,
                skip_nonref: bool = True, stop: Callable[[], bool] | None = None) -> np.ndarray:
    """One container and one (threaded) decoder: seeking, else one sequential pass."""
    for container_index in (True, False):  # the header's index, else the packets' timestamps
        container = _open(path)
        try:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # frame + slice threads: the same frames, decoded in parallel
            try:
                out = _decode_seeking(container, stream, indices, size, stats, container_index, skip_nonref, stop)
                stats["path"] = "seek"
                return out
            except _NotIndexed:
                pass
        except (InputError, DecodeCancelled):
            raise
        except Exception as exc:
            raise InputError(f"cannot decode {path!r}: {_first_line(exc)}", setting="video") from None
        finally:
            container.close()
    stats["path"] = "sequential"
    return decode_sequential(path, indices, size, stats, stop=stop)


class _Index:
    """Where each frame lies in presentation order (the decode-everything path's numbering) and where
    the keyframes are, for seeking; ``positions`` maps a packet's (and its frame's) presentation
    timestamp to its position. Two sources:

    - the container's own index (``stream.index_entries``: mp4 / mov read it from the file header,
      no packet is read) when it lists every frame: a keyframe's position in decode order is its
      position in presentation order (a closed group of pictures). The index holds decode
      timestamps; FFmpeg seeks by presentation timestamp, so the seek aims just before the next
      keyframe's decode time (a keyframe is shown no earlier than it is decoded and before the next
      one is decoded). The positions of a group's frames are learnt as its packets are demuxed
      after a seek (``_packets_from``: the group's timestamps in order, checked against the index,
      so an open group of pictures or an odd stream falls back);
    - otherwise the packets, demuxed (not decoded): every frame's presentation timestamp.
    """

    def __init__(self, container, stream, container_index: bool = True):
        entries = _entry_list(stream) if container_index else None
        self.positions: dict[int, int] = {}
        if entries is not None:
            kept = [e for e in entries if not e.is_discard]  # edit-list frames the decoder never outputs
            self.total = len(kept)
            dts = [(i, int(e.timestamp)) for i, e in enumerate(kept) if e.is_keyframe]
            # (position, seek target, shown no earlier than, shown before)
            ends = [d for _, d in dts[1:]] + [None]
            self.keys = [(i, (end - 1) if end is not None else d + (1 << 40), d, end)
                         for (i, d), end in zip(dts, ends)]
            self.from_packets = False
            self.source = "container index"
        else:
            pts: list[int] = []
            keys: list[int] = []
            for packet in container.demux(stream):
                if packet.size == 0:  # the end-of-stream flush packet
                    continue
                if packet.pts is None:
                    raise _NotIndexed
                pts.append(int(packet.pts))
                if packet.is_keyframe:
                    keys.append(int(packet.pts))
            pts.sort()
            if len(set(pts)) != len(pts):
                raise _NotIndexed
            self.total = len(pts)
            self.positions = {t: i for i, t in enumerate(pts)}
            self.keys = sorted((self.positions[k], k, k, k + 1) for k in set(keys))
            self.from_packets = True
            self.source = "packets"
        if not self.keys or self.keys[0][0] != 0:
            raise _NotIndexed  # no keyframe to start from

    def key_before(self, position: int) -> tuple:
        """(position, seek timestamp, shown from, shown before) of the last keyframe at or before
        ``position``."""
        import bisect

        return self.keys[bisect.bisect_right([k[0] for k in self.keys], position) - 1]

    def position(self, frame) -> int:
        """A decoded frame's position, by its timestamp (its packet's)."""
        if frame.pts is None or int(frame.pts) not in self.positions:
            raise _NotIndexed
        return self.positions[int(frame.pts)]


def _entry_list(stream) -> list | None:
    """The container's index entries when they list every frame of the stream (else None)."""
    try:
        entries = list(stream.index_entries)
    except (AttributeError, TypeError):  # PyAV before index_entries
        return None
    frames = int(stream.frames or 0)
    return entries if entries and frames > 0 and len(entries) == frames else None


def _is_key(packet, key: tuple) -> bool:
    """The packet is the keyframe ``key`` a seek aimed at."""
    _, _, low, high = key
    return bool(packet.is_keyframe) and packet.pts is not None and int(packet.pts) >= low and (
        high is None or int(packet.pts) < high)


def _packets_from(container, stream, index: _Index, key: tuple):
    """(packet, position) in decode order from the keyframe ``key`` on, after a seek to it; the
    position is None for a packet whose frame the decoder does not output (edit-list discard). With
    the container's index the packets are read one group of pictures ahead: the group's
    timestamps, sorted, give its frames' positions, checked against the index (the group holds as
    many frames as the index says, and none is shown before its keyframe or after the next one)."""
    demux = (p for p in container.demux(stream) if p.size > 0)  # size 0: the end-of-stream flush packet
    first = next(demux, None)
    if first is None or not _is_key(first, key):
        raise _NotIndexed  # the seek did not land on the indexed keyframe
    if index.from_packets:
        for p in itertools.chain([first], demux):
            if p.pts is None or int(p.pts) not in index.positions:
                raise _NotIndexed
            yield p, index.positions[int(p.pts)]
        return
    k = index.keys.index(key)
    pending = first
    while pending is not None:
        group, pending = [pending], None
        for packet in demux:
            if packet.pts is None:
                raise _NotIndexed
            if packet.is_keyframe:
                pending = packet
                break
            group.append(packet)
        start = index.keys[k][0]
        end = index.keys[k + 1][0] if k + 1 < len(index.keys) else index.total
        shown = sorted(int(p.pts) for p in group if not p.is_discard)
        if (len(shown) != end - start or shown[0] != int(group[0].pts) or len(set(shown)) != len(shown)
                or (pending is not None and (not _is_key(pending, index.keys[k + 1]) or shown[-1] >= int(pending.pts)))):
            raise _NotIndexed
        index.positions.update((t, start + r) for r, t in enumerate(shown))
        for p in group:
            yield p, None if p.is_discard else index.positions[int(p.pts)]
        k += 1


def _decode_seeking(container, stream, indices: list[int], size: tuple[int, int] | None, stats: dict,
                    container_index: bool = True, skip_nonref: bool = True,
                    stop: Callable[[], bool] | None = None) -> np.ndarray:
    """The sampled frames by seeking: for each run of them (those close enough to decode in one
    forward pass), seek to the keyframe before the first, give the decoder the packets up to the
    last one's (in decode order: every frame a sampled one refers to comes before it), then drain
    the decoder; nothing after the run's last sampled frame is decoded. With ``skip_nonref`` a
    packet whose frame is not sampled is decoded with ``skip_frame = "NONREF"``: a frame no other
    frame refers to (most B-frames) is skipped, the ones the sampled frames are predicted from are
    decoded as ever, so the sampled frames are the same bytes."""
    scale = {} if size is None else {"height": int(size[0]), "width": int(size[1])}
    index = _Index(container, stream, container_index)
    stats["index"] = index.source
    slots: dict[int, list[int]] = {}
    for slot, idx in enumerate(indices):
        slots.setdefault(int(idx), []).append(slot)
    targets = sorted(i for i in slots if i < index.total)
    ctx = stream.codec_context
    out: np.ndarray | None = None
    stats["decoded"] = stats["seeks"] = stats["packets"] = 0

    def take(frame, wanted: set[int]) -> None:
        nonlocal out
        stats["decoded"] += 1
        pos = index.position(frame)
        if pos not in wanted:
            return
        wanted.discard(pos)
        if out is None:
            h, w = (int(size[0]), int(size[1])) if size is not None else (frame.height, frame.width)
            out = frame_buffer(len(indices), h, w)
        rows = slots[pos]
        out[rows[0]] = frame.to_ndarray(format="rgb24", **scale)
        for r in rows[1:]:
            out[r] = out[rows[0]]

    t = 0
    while t < len(targets):
        key = index.key_before(targets[t])
        # One forward pass while the next sampled frame's keyframe lies before it or close after
        # the last one: a seek drains the threaded decoder, about as costly as a few frames decoded.
        end = t + 1
        while end < len(targets) and index.key_before(targets[end])[0] - targets[end - 1] <= SEEK_MIN_SKIP:
            end += 1
        run = set(targets[t:end])
        unfed, wanted = set(run), set(run)
        container.seek(key[1], stream=stream, backward=True, any_frame=False)
        stats["seeks"] += 1
        for packet, pos in _packets_from(container, stream, index, key):
            if stop is not None and stop():
                raise DecodeCancelled
            if skip_nonref:
                ctx.skip_frame = "DEFAULT" if pos in run else "NONREF"
            stats["packets"] += 1
            for frame in ctx.decode(packet):
                take(frame, wanted)
            unfed.discard(pos)
            if not unfed:
                break
        ctx.skip_frame = "DEFAULT"
        for frame in ctx.decode(None):  # drain: the frames still in the decoder's threads and reorder buffer
            take(frame, wanted)
        ctx.flush_buffers()  # ready for the next seek's packets
        if wanted:
            raise _NotIndexed  # a sampled frame never came out where the index put it
        t = end
    if out is None:
        return np.empty((0, 0, 0, 3), dtype=np.uint8)
    got = sum(len(slots[i]) for i in targets)
    if got < len(indices):  # some index lies past the indexed frames: return the leading ones found
        keep = sorted(r for i in targets for r in slots[i])
        if keep != list(range(got)):
            raise _NotIndexed
        return out[:got]
    return out


def decode_sequential(path: str, indices: list[int], size: tuple[int, int] | None = None,
                      stats: dict | None = None, stop: Callable[[], bool] | None = None) -> np.ndarray:
    """The decode-everything path: one pass over the stream, keeping the frames at ``indices``.
    The reference ``decode_frames`` must equal, and its fallback for streams it cannot index."""
    scale = {} if size is None else {"height": int(size[0]), "width": int(size[1])}
    slots: dict[int, list[int]] = {}
    for slot, idx in enumerate(indices):
        slots.setdefault(int(idx), []).append(slot)
    last = max(indices)
    out: np.ndarray | None = None
    filled: list[int] = []
    stats = {} if stats is None else stats
    stats["seeks"] = 0
    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if stop is not None and stop():
                raise DecodeCancelled
            stats["decoded"] = i + 1
            if i in slots:
                if out is None:
                    h, w = (int(size[0]), int(size[1])) if size is not None else (frame.height, frame.width)
                    out = frame_buffer(len(indices), h, w)
                rows = slots[i]
                out[rows[0]] = frame.to_ndarray(format="rgb24", **scale)
                for r in rows[1:]:
                    out[r] = out[rows[0]]
                filled += rows
            if i >= last:
                break
    except (InputError, DecodeCancelled):
        raise
    except Exception as exc:
        raise InputError(f"cannot decode {path!r}: {_first_line(exc)}", setting="video") from None
    finally:
        container.close()
    if out is None:
        return np.empty((0, 0, 0, 3), dtype=np.uint8)
    filled.sort()
    return out[:len(filled)] if filled == list(range(len(filled))) else out[np.array(filled)]
