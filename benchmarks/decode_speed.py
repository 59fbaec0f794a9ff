"""Video decode speed of the request path (runtime/video_io.decode_frames) on this machine's CPUs.

    python benchmarks/decode_speed.py --clips 2min-1440p --kind serve,web --frames 64 --workers 1,8
    python benchmarks/decode_speed.py --clip-file my.mp4 --frames 64 --workers 1,2 --check

Clips come from benchmarks/serve_load.py's generator (the same presets and NAME=SECONDSxHEIGHTxWIDTH@FPS
specs, encoded once into ``--clip-dir``): ``--kind serve`` is the load test's encoding (a keyframe
every 2 s, 2 B-frames), ``--kind web`` x264's defaults at a fast preset (keyframes up to 250 frames
apart, 3 B-frames with a reference pyramid), as a web or phone clip comes. ``--clip-file`` adds any
existing file.

``--ranks W`` (W > 1) also times what one torchrun rank decodes with ``video_decode=own``: the sampled
frames of its own temporal grids (grids of ``--temporal-patch`` frames split as the plan splits
them, spava_plan.vision_exchange.grid_ranges), each rank alone on the machine, one line per rank
(``rank``, ``own``): against the whole decode, which every rank does with ``video_decode=all`` (and
which rank 0 would do before broadcasting the frames).

For each clip and decoder count it decodes the processor's ``--frames`` sampled frames
``--repeat`` times (the best time is kept: the first pass also pays the page cache) and prints one
JSON line: seconds (wall clock), cpu_s (CPU time of every thread of the process: the decode's work,
which a machine shared with other jobs does not inflate as it does the wall clock), sampled frames
per second, the frames the decoders produced, the packets they were given, the seeks, and the path
taken. ``--skip-nonref off`` decodes every packet between a
seek's keyframe and its sampled frame (video_io's behaviour before non-reference frames were
skipped), for the before / after comparison. ``--check`` also decodes the whole stream once and
asserts the sampled frames' bytes are the same.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_load import WEB_X264, make_clip, parse_clip  # noqa: E402

from spava_plan.runtime import video_io  # noqa: E402
from spava_plan.vision_exchange import grid_ranges  # noqa: E402


def measure(path: str, frames: int, workers: int, repeat: int, skip_nonref: bool,
            own: tuple[int, int] | None = None) -> dict:
    info = video_io.probe(path)
    indices = video_io.sample_indices(info.total_frames, frames)
    if own is not None:
        indices = indices[own[0]:own[1]]
    best, cpu, stats = None, None, {}
    for _ in range(repeat):
        run: dict = {}
        t0, c0 = time.perf_counter(), time.process_time()
        out = video_io.decode_frames(path, indices, stats=run, workers=workers, skip_nonref=skip_nonref)
        took, used = time.perf_counter() - t0, time.process_time() - c0
        if best is None or took < best:
            best, stats = took, run
        cpu = used if cpu is None else min(cpu, used)
    return {"clip": Path(path).name, "size": f"{info.width}x{info.height}", "clip_frames": info.total_frames,
            "sampled": len(indices), "workers": workers, "skip_nonref": skip_nonref, "seconds": round(best, 4),
            "cpu_s": round(cpu, 4),
            "sampled_per_s": round(len(indices) / best, 2), "decoded": stats.get("decoded"),
            "packets": stats.get("packets"), "seeks": stats.get("seeks"), "path": stats.get("path"),
            "shape": list(out.shape), **({} if own is None else {"own": list(own)})}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", default="", help="comma-separated serve_load presets or NAME=SECONDSxHEIGHTxWIDTH@FPS")
    p.add_argument("--kind", default="serve,web", help="comma-separated encodings of --clips: serve, web")
    p.add_argument("--clip-file", action="append", default=[], help="an existing video file (repeatable)")
    p.add_argument("--clip-dir", default="benchmarks/clips", help="where the clips are generated once")
    p.add_argument("--frames", type=int, default=64, help="sampled frames (the processor's rule)")
    p.add_argument("--workers", default="1", help="comma-separated decoder counts")
    p.add_argument("--skip-nonref", choices=("on", "off", "both"), default="both")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--check", action="store_true", help="assert the bytes equal a full decode's")
    p.add_argument("--ranks", type=int, default=1, help="W > 1: also each rank's own frames (video_decode=own)")
    p.add_argument("--temporal-patch", type=int, default=2, help="frames per temporal grid (Qwen2-VL: 2)")
    args = p.parse_args(argv)
    kinds = [k.strip() for k in args.kind.split(",") if k.strip()]
    if any(k not in ("serve", "web") for k in kinds):
        p.error("--kind takes serve and/or web")
    paths = list(args.clip_file)
    for spec in (parse_clip(c.strip()) for c in args.clips.split(",") if c.strip()):
        paths += [str(make_clip(spec, Path(args.clip_dir), None if k == "serve" else WEB_X264)) for k in kinds]
    if not paths:
        p.error("give --clips or --clip-file")
    skips = {"on": [True], "off": [False], "both": [False, True]}[args.skip_nonref]
    for path in paths:
        if args.check:
            info = video_io.probe(path)
            indices = video_io.sample_indices(info.total_frames, args.frames)
            want = video_io.decode_sequential(path, indices)
            for skip in skips:
                assert np.array_equal(video_io.decode_frames(path, indices, workers=1, skip_nonref=skip), want), path
        for workers in (int(w) for w in args.workers.split(",") if w.strip()):
            for skip in skips:
                print(json.dumps(measure(path, args.frames, workers, args.repeat, skip)), flush=True)
                if args.ranks > 1:
                    tp = args.temporal_patch
                    for rank, (g0, g1) in enumerate(grid_ranges(args.frames // tp, args.ranks)):
                        print(json.dumps({"rank": rank, **measure(path, args.frames, workers, args.repeat, skip,
                                                                  (g0 * tp, g1 * tp))}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
