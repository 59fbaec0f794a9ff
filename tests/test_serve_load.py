"""benchmarks/serve_load.py: its clip generation, its arithmetic, and a CPU smoke run against a real
tiny `spava-serve` (data: URLs and file:// paths under allowed_local_media_path, sequential and two
clients at once). The smoke run needs the server's data: URL support (the server branch)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import serve_load  # noqa: E402


def test_clip_presets_and_custom_sizes():
    assert serve_load.parse_clip("2min-1440p") == serve_load.ClipSpec("2min-1440p", 120.0, 1440, 2560, 30)
    assert serve_load.parse_clip("30min-720p").frames == 54000
    spec = serve_load.parse_clip("mine=3x64x96@8")
    assert (spec.name, spec.seconds, spec.height, spec.width, spec.fps, spec.frames) == ("mine", 3.0, 64, 96, 8, 24)
    for bad in ("nope", "x=3x63x96@8", "x=0.1x64x96@8"):
        with pytest.raises(SystemExit):
            serve_load.parse_clip(bad)


def test_clips_are_real_videos_made_once(tmp_path):
    pytest.importorskip("av")
    from spava_plan.runtime.video_io import probe, read_frames

    spec = serve_load.parse_clip("c=2x48x64@10")
    path = serve_load.make_clip(spec, tmp_path)
    info = probe(str(path))
    assert (info.total_frames, info.height, info.width) == (20, 48, 64) and abs(info.fps - 10) < 1e-6
    frames, _ = read_frames(str(path), 4)
    assert len({f.tobytes() for f in frames}) == 4  # every sampled frame differs
    stamp = path.stat().st_mtime_ns
    assert serve_load.make_clip(spec, tmp_path) == path and path.stat().st_mtime_ns == stamp  # reused
    url = serve_load.media_url(path, "data")
    assert url.startswith("data:video/mp4;base64,") and len(url) > path.stat().st_size
    assert serve_load.media_url(path, "file") == path.resolve().as_uri()


def test_timings_percentiles_and_idle_share():
    assert serve_load.stage_ms({"prefill_ms": 12.5, "decode_s": 0.25, "vision_seconds": 1, "queue": 3,
                                "bad": "x", "nan_ms": float("nan")}) == {"prefill": 12.5, "decode": 250.0,
                                                                          "vision": 1000.0, "queue": 3.0}
    assert serve_load.percentile([], 50) is None
    assert serve_load.percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert math.isclose(serve_load.percentile([float(i) for i in range(1, 21)], 95), 19.05)
    before = {"spava_prefill_seconds_sum": 1.0, "spava_prefill_seconds_count": 2.0}
    after = {"spava_prefill_seconds_sum": 1.5, "spava_prefill_seconds_count": 3.0, "spava_vision_seconds_sum": 0.1,
             "spava_vision_seconds_count": 1.0}
    got = serve_load.metric_stages(before, after)
    assert math.isclose(got["prefill"], 500.0) and math.isclose(got["vision"], 100.0)
    # two requests, each 0.3 s on the GPUs (the video's decode is not GPU time), over a 1 s run: 40% idle
    rs = [serve_load.Result("c", "concurrent-2", i, 0.0, server_ms={"vision": 100.0, "prefill": 150.0, "generate": 50.0,
                                                                           "decode": 400.0})
          for i in range(2)]
    assert math.isclose(serve_load.idle_share(rs, 1.0), 0.4)
    assert serve_load.idle_share([serve_load.Result("c", "sequential", 0, 0.0)], 1.0) is None


# -- the smoke run against a real server ---------------------------------------------------------------
def test_smoke_run_against_a_tiny_server(tmp_path):
    for mod in ("transformers", "av", "fastapi", "uvicorn", "openai", "httpx"):
        pytest.importorskip(mod)
    import model_fixtures as mf
    from test_serve import FRAMES, Server

    root = tmp_path
    mf.build_checkpoint(root / "ckpt", "qwen2_vl")
    clips = root / "clips"
    clips.mkdir()
    # The tiny model's clip: 4 s at 4 fps, sampled to the plan's frames at video.fps=2.
    assert serve_load.PRESETS["tiny"] == (4.0, 56, 84, 4) and FRAMES == 8
    server = Server(root, "queue_size=4", f"allowed_local_media_path={clips}", local=False)
    try:
        for media in ("data", "file"):
            out = root / f"load-{media}.json"
            rc = serve_load.main(["--url", server.url, "--model", "tiny", "--clips", "tiny", "--clip-dir", str(clips),
                                  "--requests", "3", "--concurrency", "1,2", "--media", media, "--max-tokens", "4",
                                  "--timeout", "300", "--out", str(out)])
            report = json.loads(out.read_text())
            errors = [r["error"] for run in report["runs"] for r in run["requests"] if r["error"]]
            assert rc == 0 and not errors, (errors, server.stderr()[-3000:])
            assert [run["run"] for run in report["runs"]] == ["sequential", "concurrent-2"]
            for run in report["runs"]:
                assert len(run["requests"]) == 3 and run["videos_per_minute"] > 0
                for r in run["requests"]:
                    assert 0 < r["ttft_ms"] <= r["total_ms"] and r["completion_tokens"] >= 1
            s = report["summary"]
            assert set(s) >= {"request_ttft_p50_ms", "prefill_ttft_ms", "preprocess_ms", "first_request_ttft_ms",
                              "tenth_request_ttft_ms", "gpu_idle_share"}
            assert s["first_request_ttft_ms"] == report["runs"][0]["requests"][0]["ttft_ms"]
            assert s["tenth_request_ttft_ms"] is None  # 3 requests
            assert s["request_ttft_p50_ms"] > 0
            # the server reports each request's stages, so the prefill and preprocessing are known
            assert s["prefill_ttft_ms"] > 0 and s["preprocess_ms"] > 0 and 0 <= s["gpu_idle_share"] <= 1
    finally:
        server.stop()
