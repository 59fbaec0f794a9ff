"""Request-path load test: drive a running `spava-serve` with the `openai` client as users see it.

    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --clips 2min-1440p --requests 10 \
        --concurrency 1,4 --out benchmarks/results/<date>-h200-serve-64f1440p.json

Clips are real encoded videos, generated once with PyAV into ``--clip-dir`` (reused when present):
presets ``2min-1440p`` (120 s of 2560x1440 at 30 fps: 64 frames at the server's video.fps and
max_frames), ``30min-720p`` (1800 s of 1280x720: 768 frames), ``short-720p`` (10 s), ``tiny`` (4 s
of 84x56 at 4 fps, the CPU smoke test), or ``NAME=SECONDSxHEIGHTxWIDTH@FPS`` for any other size.
The content is synthetic (moving shapes over noise, so every frame differs and the encoder cannot
skip them), encoded with libx264 (a keyframe every 2 s, B-frames on), the way camera clips are.

Each run sends ``--requests`` requests (cycling through the clips), first sequentially, then with
each ``--concurrency`` K > 1 clients at once (K threads, each with its own client). Media go as
``data:video/mp4;base64,...`` URLs (``--media data``, the default) or as ``file://`` paths the server
reads itself (``--media file``: the clips must lie under the server's allowed_local_media_path).

Per request it records the client's wall-clock TTFT (request sent -> first content token of the
stream), total time, completion tokens and decode tokens/s (tokens after the first over the time
after the first), and the server's own per-request stage timings when it reports them: a
``timings`` object in the final stream chunk, stage -> milliseconds (``fetch_ms``, ``decode_ms``
(the video), ``preprocess_ms``, ``peers_prepare_ms`` (under torchrun: the other ranks' decode and
processor of their own frames, after rank 0's), ``vision_ms``, ``prefill_ms``, ``first_token_ms``, ``generate_ms``
(the token loop); ``*_s`` values are converted), and for sequential runs the change of every Prometheus
``*_seconds_sum`` series of ``/metrics`` over the request (a stage the response does not report).

The JSON has every request, per run p50 / p95 request TTFT and videos per minute, and a
``summary``: request_ttft_p50_ms, prefill_ttft_ms, preprocess_ms, first_request_ttft_ms,
tenth_request_ttft_ms, gpu_idle_share (null where the server reports nothing to compute it from).
``gpu_idle_share`` is, over the most concurrent run, 1 - (the requests' GPU stages: vision +
prefill + generate, summed) / (the run's wall time): the time the GPUs wait between requests.
"""
from __future__ import annotations

import argparse
import base64
import json
import math
import re
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PRESETS = {  # name: (seconds, height, width, fps)
    "2min-1440p": (120.0, 1440, 2560, 30),
    "30min-720p": (1800.0, 720, 1280, 30),
    "short-720p": (10.0, 720, 1280, 30),
    "tiny": (4.0, 56, 84, 4),
}
# Stage names read from the server's timings (after the unit suffix is dropped): "decode" is the
# video's decode (the per-request list: fetch, decode, preprocess, vision, prefill, first
# token), the token loop is "generate" (or "decode_tokens").
GPU_STAGES = ("vision", "prefill", "generate", "decode_tokens", "token_decode")
# decode + processor, as the issue counts it; peers_prepare: under torchrun, the other ranks' own
# decode + processor after rank 0 sent them the request
PREPROCESS_STAGES = ("decode", "video_decode", "decode_video", "preprocess", "peers_prepare")
QUESTION = "What happens in this video? Answer in one sentence."


@dataclass(frozen=True)
class ClipSpec:
    name: str
    seconds: float
    height: int
    width: int
    fps: int

    @property
    def frames(self) -> int:
        return max(1, int(round(self.seconds * self.fps)))


def parse_clip(text: str) -> ClipSpec:
    """A preset name or NAME=SECONDSxHEIGHTxWIDTH@FPS."""
    if text in PRESETS:
        return ClipSpec(text, *PRESETS[text])
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)=([0-9.]+)x([0-9]+)x([0-9]+)@([0-9]+)", text)
    if not m:
        raise SystemExit(f"serve_load: --clips: {text!r} is neither a preset ({', '.join(PRESETS)}) nor "
                         f"NAME=SECONDSxHEIGHTxWIDTH@FPS")
    spec = ClipSpec(m[1], float(m[2]), int(m[3]), int(m[4]), int(m[5]))
    if spec.height < 16 or spec.width < 16 or spec.height % 2 or spec.width % 2 or spec.frames < 2:
        raise SystemExit(f"serve_load: --clips: {text!r} needs even sides of at least 16 pixels and 2+ frames")
    return spec


# libx264 as the clips are encoded: a keyframe every 2 s, 2 B-frames (x264's fastest preset otherwise).
SERVE_X264 = {"preset": "ultrafast", "bf": "2", "crf": "28"}
# A web / phone clip as x264 encodes it by default (keyframes up to 250 frames apart, 3 B-frames with
# a reference pyramid, CABAC, deblocking), at a fast preset; benchmarks/decode_speed.py's second kind.
WEB_X264 = {"preset": "veryfast"}


def make_clip(spec: ClipSpec, directory: Path, x264: dict[str, str] | None = None) -> Path:
    """The clip's file in ``directory``, encoded once (an existing file of the same name is reused).
    ``x264``: libx264 options in place of SERVE_X264 (and its 2 s keyframe interval); the file name
    then carries their tag, so clips of both kinds sit side by side."""
    import av
    import numpy as np

    directory.mkdir(parents=True, exist_ok=True)
    tag = "" if x264 is None else "-" + "-".join(f"{k}{v}" for k, v in sorted(x264.items()))
    path = directory / f"{spec.name}-{spec.width}x{spec.height}-{spec.frames}f{tag}.mp4"
    if path.is_file() and path.stat().st_size > 0:
        return path
    tmp = path.with_suffix(".part.mp4")
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 48, size=(spec.height, spec.width, 3), dtype=np.uint8)
    ys = np.arange(spec.height, dtype=np.int32)[:, None]
    xs = np.arange(spec.width, dtype=np.int32)[None, :]
    box = max(8, min(spec.height, spec.width) // 6)
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=spec.fps)
        stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, "yuv420p"
        stream.options = dict(SERVE_X264, g=str(2 * spec.fps)) if x264 is None else dict(x264)
        stream.thread_type = "AUTO"
        for i in range(spec.frames):
            img = np.roll(noise, i * 3, axis=1)
            img[..., 2] = ((xs + ys + 4 * i) % 256).astype(np.uint8)  # a moving gradient
            x = (i * 11) % max(1, spec.width - box)
            y = (i * 5) % max(1, spec.height - box)
            img[y:y + box, x:x + box] = (230, 40, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)
    return path


def media_url(path: Path, media: str) -> str:
    if media == "file":
        return path.resolve().as_uri()
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


# -- server-reported timings ---------------------------------------------------------------------------
def stage_ms(timings: Any) -> dict[str, float]:
    """A server ``timings`` object as stage -> milliseconds (``x_ms`` kept, ``x_s`` / ``x_seconds`` scaled)."""
    out: dict[str, float] = {}
    if not isinstance(timings, dict):
        return out
    for key, value in timings.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        k = str(key)
        for suffix, scale in (("_ms", 1.0), ("_seconds", 1000.0), ("_s", 1000.0)):
            if k.endswith(suffix):
                out[k[: -len(suffix)]] = float(value) * scale
                break
        else:
            out[k] = float(value)  # unitless: taken as milliseconds (the schema's unit)
    return out


def scrape(url: str) -> dict[str, float]:
    """Every ``*_seconds_sum`` / ``*_seconds_count`` sample of /metrics (labels joined into the name)."""
    import httpx

    try:
        text = httpx.get(url.rstrip("/") + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*_seconds_(?:sum|count))(\{[^}]*\})?\s+([0-9.eE+-]+|NaN)$", line)
        if m and m[3] != "NaN":
            out[m[1] + (m[2] or "")] = float(m[3])
    return out


def metric_stages(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Per-request milliseconds of each histogram the request added one observation to."""
    out: dict[str, float] = {}
    for key, total in after.items():
        if "_seconds_sum" not in key:
            continue
        count_key = key.replace("_seconds_sum", "_seconds_count")
        added = after.get(count_key, 0.0) - before.get(count_key, 0.0)
        if added >= 1:
            name = key.split("{")[0][: -len("_seconds_sum")]
            name = re.sub(r"^spava_(serve_)?", "", name)
            out[name] = (total - before.get(key, 0.0)) / added * 1000.0
    return out


# -- one request ---------------------------------------------------------------------------------------
@dataclass
class Result:
    clip: str
    run: str  # "sequential" or "concurrent-K"
    index: int  # order of sending within the run
    started_s: float  # since the run's start
    ttft_ms: float | None = None
    total_ms: float | None = None
    completion_tokens: int | None = None
    decode_tokens_per_s: float | None = None
    server_ms: dict[str, float] = field(default_factory=dict)  # the response's timings
    metrics_ms: dict[str, float] = field(default_factory=dict)  # /metrics deltas (sequential only)
    error: str | None = None


def ask(client: Any, model: str, url: str, question: str, max_tokens: int) -> tuple[float | None, float, int | None,
                                                                                     float | None, dict[str, float]]:
    """(ttft_ms, total_ms, completion tokens, decode tokens/s, server timings) of one streamed request."""
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                             {"type": "text", "text": question}]}]
    t0 = time.perf_counter()
    first = last = None
    deltas = 0
    usage_tokens = None
    timings: dict[str, float] = {}
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0.0,
                                            stream=True)
    for chunk in stream:
        data = chunk.to_dict() if hasattr(chunk, "to_dict") else dict(chunk)
        for choice in data.get("choices") or []:
            if (choice.get("delta") or {}).get("content"):
                now = time.perf_counter()
                first = now if first is None else first
                last = now
                deltas += 1
        if data.get("usage"):
            usage_tokens = int(data["usage"].get("completion_tokens") or 0)
        if data.get("timings"):
            timings = stage_ms(data["timings"])
    total = time.perf_counter() - t0
    tokens = usage_tokens if usage_tokens is not None else deltas
    rate = (tokens - 1) / (last - first) if first is not None and last is not None and last > first and tokens > 1 \
        else None
    return (None if first is None else (first - t0) * 1000.0), total * 1000.0, tokens, rate, timings


def run(args: argparse.Namespace, clips: list[tuple[ClipSpec, str]], concurrency: int) -> dict:
    import openai

    name = "sequential" if concurrency == 1 else f"concurrent-{concurrency}"
    results: list[Result] = []
    lock = threading.Lock()
    order = iter(range(args.requests))
    start = time.perf_counter()

    def worker() -> None:
        client = openai.OpenAI(base_url=args.url.rstrip("/") + "/v1", api_key="none", timeout=args.timeout,
                               max_retries=0)
        while True:
            with lock:
                i = next(order, None)
            if i is None:
                return
            spec, url = clips[i % len(clips)]
            res = Result(spec.name, name, i, time.perf_counter() - start)
            before = scrape(args.url) if concurrency == 1 else {}
            try:
                res.ttft_ms, res.total_ms, res.completion_tokens, res.decode_tokens_per_s, res.server_ms = ask(
                    client, args.model, url, args.question, args.max_tokens)
            except Exception as exc:  # noqa: BLE001 - a failed request is recorded, the run goes on
                res.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if concurrency == 1:
                res.metrics_ms = metric_stages(before, scrape(args.url))
            with lock:
                results.append(res)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    results.sort(key=lambda r: r.index)
    ttfts = [r.ttft_ms for r in results if r.ttft_ms is not None]
    ok = [r for r in results if r.error is None]
    return {"run": name, "concurrency": concurrency, "wall_s": wall, "requests": [asdict(r) for r in results],
            "failed": len(results) - len(ok), "request_ttft_p50_ms": percentile(ttfts, 50),
            "request_ttft_p95_ms": percentile(ttfts, 95),
            "videos_per_minute": len(ok) / wall * 60.0 if wall > 0 else None,
            "gpu_idle_share": idle_share(ok, wall)}


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def stages(r: Result) -> dict[str, float]:
    """The request's stage times: the response's timings, else its /metrics deltas."""
    return {**r.metrics_ms, **r.server_ms}


def idle_share(results: list[Result], wall_s: float) -> float | None:
    busy = 0.0
    for r in results:
        s = stages(r)
        found = [s[k] for k in s if k in GPU_STAGES]
        if not found:
            return None  # the server does not report its GPU stages
        busy += sum(found)
    if wall_s <= 0:
        return None
    return max(0.0, 1.0 - busy / 1000.0 / wall_s)


def median_stage(results: list[dict], names: tuple[str, ...]) -> float | None:
    values = []
    for r in results:
        s = {**r["metrics_ms"], **r["server_ms"]}
        picked = [s[k] for k in s if k in names]
        if picked:
            values.append(sum(picked))
    return statistics.median(values) if values else None


def summary(runs: list[dict]) -> dict:
    seq = next((r for r in runs if r["concurrency"] == 1), runs[0])
    reqs = seq["requests"]
    ttft = [r["ttft_ms"] for r in reqs]
    busiest = max(runs, key=lambda r: r["concurrency"])
    return {"request_ttft_p50_ms": seq["request_ttft_p50_ms"],
            "prefill_ttft_ms": median_stage(reqs, ("prefill", "prefill_ttft", "ttft_prefill")),
            "preprocess_ms": median_stage(reqs, PREPROCESS_STAGES),
            "first_request_ttft_ms": ttft[0] if ttft else None,
            "tenth_request_ttft_ms": ttft[9] if len(ttft) >= 10 else None,
            "gpu_idle_share": busiest["gpu_idle_share"],
            "videos_per_minute": {r["run"]: r["videos_per_minute"] for r in runs}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="the server, e.g. http://127.0.0.1:8000 (required unless --make-clips-only)")
    p.add_argument("--make-clips-only", action="store_true",
                   help="encode the clips into --clip-dir and exit (while a server starts, say)")
    p.add_argument("--model", default="spava", help="the model name sent (the server answers with its own)")
    p.add_argument("--clips", default="2min-1440p", help="comma-separated presets or NAME=SECONDSxHEIGHTxWIDTH@FPS")
    p.add_argument("--clip-dir", default="benchmarks/clips", help="where the clips are generated once")
    p.add_argument("--requests", type=int, default=10, help="requests per run")
    p.add_argument("--concurrency", default="1,4", help="comma-separated client counts (1 = sequential)")
    p.add_argument("--media", choices=("data", "file"), default="data", help="data: base64 URLs or file:// paths")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--question", default=QUESTION)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--out", default=None, help="write the JSON here (else stdout)")
    args = p.parse_args(argv)
    if args.requests < 1:
        p.error("--requests must be at least 1")
    try:
        levels = sorted({int(x) for x in args.concurrency.split(",") if x.strip()})
    except ValueError:
        p.error("--concurrency must be comma-separated integers")
    if not levels or levels[0] < 1:
        p.error("--concurrency needs client counts of at least 1")
    specs = [parse_clip(c.strip()) for c in args.clips.split(",") if c.strip()]
    if args.make_clips_only:
        for s in specs:
            print(make_clip(s, Path(args.clip_dir)))
        return 0
    if not args.url:
        p.error("--url is required")
    t0 = time.perf_counter()
    clips = [(s, media_url(make_clip(s, Path(args.clip_dir)), args.media)) for s in specs]
    prepared_s = time.perf_counter() - t0
    runs = [run(args, clips, k) for k in levels]
    out = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
           "url": args.url, "media": args.media, "clips": [asdict(s) | {"frames": s.frames} for s in specs],
           "clip_prepare_s": prepared_s, "max_tokens": args.max_tokens, "runs": runs, "summary": summary(runs)}
    text = json.dumps(out, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    s = out["summary"]
    for r in runs:
        print(f"{r['run']}: {len(r['requests']) - r['failed']}/{len(r['requests'])} ok, request TTFT p50 "
              f"{_ms(r['request_ttft_p50_ms'])} p95 {_ms(r['request_ttft_p95_ms'])}, "
              f"{_num(r['videos_per_minute'])} videos/min, GPU idle {_num(r['gpu_idle_share'])}", file=sys.stderr)
    print(f"summary: prefill {_ms(s['prefill_ttft_ms'])}, preprocess {_ms(s['preprocess_ms'])}, first request "
          f"{_ms(s['first_request_ttft_ms'])}, tenth {_ms(s['tenth_request_ttft_ms'])}", file=sys.stderr)
    return 0 if all(r["failed"] == 0 for r in runs) else 1


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f} ms"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


if __name__ == "__main__":
    sys.exit(main())
