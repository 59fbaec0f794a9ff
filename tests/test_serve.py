"""`spava-serve` end to end: a real server process on 127.0.0.1 (tiny checkpoint, tiny clips made with
PyAV here), real HTTP with the `openai` client. Every server is started on a free port, waited for
with a bounded deadline and always stopped; request loops are bounded."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

pytest.importorskip("transformers")
pytest.importorskip("av")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import model_fixtures as mf  # noqa: E402

from serve_fixtures import COMMON, FRAMES, Server, ask, clip_web_server, data_url  # noqa: E402
from serve_fixtures import env as _env  # noqa: E402
from serve_fixtures import messages as _messages  # noqa: E402


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    mf.build_checkpoint(root / "ckpt", "qwen2_vl")
    (root / "media").mkdir()  # the server's allowed_local_media_path
    mf.write_video(root / "media" / "clip.mp4", frames=2 * FRAMES, height=56, width=84)  # 4 s at 4 fps: 8 frames at video.fps=2
    # The checkpoint as a model id in a local Hugging Face cache (the layout huggingface_hub writes).
    snap = root / "hub" / "models--spava--tiny" / "snapshots" / "0123abcd"
    snap.parent.mkdir(parents=True)
    snap.symlink_to(root / "ckpt", target_is_directory=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0123abcd")
    return root


@pytest.fixture(scope="module")
def server(root):
    srv = Server(root, "queue_size=0")
    yield srv
    srv.stop()


_ask = ask


def _answers_again(server, root, why: str) -> None:
    """queue_size=0: the one place frees within 15 s once the request holding it is cancelled."""
    deadline = time.monotonic() + 15
    while True:
        try:
            assert _ask(server, root / "media" / "clip.mp4", max_tokens=2).usage.completion_tokens >= 1
            return
        except openai.RateLimitError:
            assert time.monotonic() < deadline, why
            time.sleep(0.2)


def test_greedy_answer_equals_spava_run_and_streaming_matches(server, root):
    out = _ask(server, root / "media" / "clip.mp4")
    text, usage = out.choices[0].message.content, out.usage
    assert usage.completion_tokens >= 1 and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # spava-run on the same inputs (it plans for the clip from the same config) answers the same;
    # its checkpoint given as a model id found in the local Hugging Face cache.
    p = subprocess.run([sys.executable, "-m", "spava_plan.entry.run", *COMMON, "model.checkpoint=spava/tiny",
                        f"video={root / 'media' / 'clip.mp4'}", f"question={mf.QUESTION}", "max_new_tokens=6"],
                       cwd=str(root), env={**_env(), "HF_HUB_CACHE": str(root / "hub")}, capture_output=True,
                       text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    answer = re.search(r"^answer: (.*)$", p.stdout, re.M).group(1)
    decoded = re.search(r"\((\d+) tokens, max_new_tokens=6\)", p.stdout)
    assert answer == text.strip() and int(decoded.group(1)) + 1 == usage.completion_tokens, (p.stdout, text)
    saved = re.search(r"the plan made for this input is saved at (\S+)", p.stdout)
    assert saved and os.path.isfile(saved.group(1))
    # Streaming (server-sent events) delivers the same text in pieces, then usage.
    chunks = list(_ask(server, root / "media" / "clip.mp4", stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text and chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_seeded_sampling_is_reproducible(server, root):
    a = _ask(server, root / "media" / "clip.mp4", temperature=1.0, top_p=0.9, seed=7, max_tokens=8)
    b = _ask(server, root / "media" / "clip.mp4", temperature=1.0, top_p=0.9, seed=7, max_tokens=8)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.completion_tokens == b.usage.completion_tokens


def test_questions_of_different_lengths(server, root):
    short = _ask(server, root / "media" / "clip.mp4", "What happens?")
    long = _ask(server, root / "media" / "clip.mp4", mf.QUESTION + " Describe the colours.")
    assert short.usage.prompt_tokens < long.usage.prompt_tokens
    assert short.usage.completion_tokens >= 1 and long.usage.completion_tokens >= 1
    # One plan (its hash is the response's system_fingerprint) holds both: video.max_question_tokens.
    assert short.system_fingerprint and short.system_fingerprint == long.system_fingerprint
    index = json.loads((root / "plans" / "index.json").read_text())
    assert [p["hash"][:16] for p in index["plans"]] == [short.system_fingerprint]


def test_bad_requests_get_400_and_the_server_goes_on(server, root):
    junk = root / "media" / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 64)
    with pytest.raises(openai.BadRequestError, match="cannot open the file as a video"):
        _ask(server, junk)
    with pytest.raises(openai.BadRequestError, match="no video file"):  # inside the allowed root: said plainly
        _ask(server, root / "media" / "missing.mp4")
    with pytest.raises(openai.BadRequestError, match="video.max_question_tokens"):
        _ask(server, root / "media" / "clip.mp4", "why " * 200)
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                   timeout=30)
    assert r.status_code == 400 and "video_url" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": _messages(root / "media" / "clip.mp4"),
                                                              "max_tokens": 10 ** 9}, timeout=30)
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    assert _ask(server, root / "media" / "clip.mp4").usage.completion_tokens >= 1


def test_full_queue_gives_429_and_a_disconnect_cancels(server, root):
    """queue_size=0: while one request runs, the next is refused; closing the stream cancels the
    running request, and the server answers the next one."""
    body = {"model": "tiny", "messages": _messages(root / "media" / "clip.mp4"), "max_tokens": 4000, "stream": True,
            "temperature": 1.0, "seed": 1}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", server.url + "/v1/chat/completions", json=body) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith("data:"))  # the request is running
            r = httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2},
                           timeout=30)
            assert r.status_code == 429, r.text
        # leaving the block closed the connection mid-stream: the request stops after its current
        # token (about 80 tokens/s here; uncancelled, its 4000 tokens would take about a minute)
    _answers_again(server, root, "the cancelled request kept running")
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    assert re.search(r'spava_requests_total\{status="429"\} [1-9]', metrics)
    assert re.search(r'spava_requests_total\{status="cancelled"\} [1-9]', metrics)
    assert "spava_time_to_first_token_seconds_bucket" in metrics and "spava_queue_depth" in metrics


def test_models_and_health(server):
    assert [m.id for m in server.client.models.list().data] == ["tiny"]
    assert httpx.get(server.url + "/health", timeout=10).json()["ranks"] == 2


def test_gloo_server_answers_like_the_emulated_one_and_a_dead_rank_stops_it(server, root):
    expected = _ask(server, root / "media" / "clip.mp4").choices[0].message.content
    srv = Server(root, "timeout=20", "heartbeat=1", ranks=2)
    try:
        answer = _ask(srv, root / "media" / "clip.mp4")  # each rank decodes its own frames (video_decode=own)
        assert answer.choices[0].message.content == expected
        timings = answer.model_extra["timings"]  # rank 1's decode + processor is a stage of its own
        assert timings["peers_prepare_ms"] > 0 and timings["decode_ms"] > 0, timings
        srv.procs[1].kill()  # rank 1 dies while the server idles
        try:
            srv.procs[0].wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail("rank 0 kept running after rank 1 died")
        err = srv.stderr(0)
        assert srv.procs[0].returncode == 2, err[-3000:]
        assert re.search(r"spava-serve: \[rank 0\] error: .*rank 1", err), err[-3000:]
        assert "Traceback" not in err, err[-3000:]
    finally:
        srv.stop()


# -- media, policy and malformed input on the default (secure) settings -----------------------------------
def test_data_url_answers_like_the_same_clip_by_file_url_and_names_its_method(server, root):
    clip = root / "media" / "clip.mp4"
    by_data = _ask(server, data_url(clip), raw=True)
    by_file = _ask(server, clip).choices[0].message.content
    out = by_data.parse()
    assert out.choices[0].message.content == by_file  # same process, same thread count: same greedy tokens
    assert by_data.headers["x-spava-method"] == out.usage.method == "spava"
    assert out.system_fingerprint and by_data.headers["x-spava-plan"] == out.system_fingerprint


def test_paths_outside_the_root_fifos_and_folders_are_refused_without_opening(server, root, tmp_path):
    outside = tmp_path / "secret.mp4"
    outside.write_bytes((root / "media" / "clip.mp4").read_bytes())  # a real video, outside the root
    link = root / "media" / "link-out.mp4"
    link.symlink_to(outside)
    fifo_in, fifo_out = root / "media" / "fifo.mp4", tmp_path / "fifo.mp4"
    os.mkfifo(fifo_in)
    os.mkfifo(fifo_out)
    try:
        messages = set()
        for video in ("/etc/passwd", "/root/nope.mp4", f"{root}/media/../media/../../{tmp_path.name}/secret.mp4",
                      link, fifo_out, tmp_path):
            started = time.monotonic()
            with pytest.raises(openai.BadRequestError) as info:
                _ask(server, video)
            assert time.monotonic() - started < 5  # a FIFO opened for reading would block here
            messages.add(info.value.body["message"])
        assert len(messages) == 1 and "allowed_local_media_path" in messages.pop()  # no file-existence oracle
        for video in (fifo_in, root / "media"):
            with pytest.raises(openai.BadRequestError, match="not a regular file"):
                _ask(server, video)
    finally:
        link.unlink()
        fifo_in.unlink()


@pytest.fixture(scope="module")
def web(root):
    """An HTTP server on 127.0.0.1 serving the clip (and a redirect to another host name)."""
    seen: list[str] = []
    with clip_web_server((root / "media" / "clip.mp4").read_bytes(), seen) as url:
        yield url, seen


def test_http_media_are_refused_by_default_without_a_socket(server, web):
    url, seen = web
    seen.clear()
    with pytest.raises(openai.BadRequestError, match="allowed_media_domains"):
        _ask(server, f"{url}/clip.mp4")
    assert seen == []


def test_text_plain_is_415_and_no_cors_headers_by_default(server, root):
    body = json.dumps({"model": "tiny", "messages": _messages(root / "media" / "clip.mp4")})
    r = httpx.post(server.url + "/v1/chat/completions", content=body, timeout=30,
                   headers={"content-type": "text/plain", "origin": "http://evil.test"})
    assert r.status_code == 415 and "access-control-allow-origin" not in r.headers
    r = httpx.options(server.url + "/v1/chat/completions", timeout=30, headers={
        "origin": "http://evil.test", "access-control-request-method": "POST"})
    assert "access-control-allow-origin" not in r.headers


def test_an_8k_clip_is_refused_from_its_metadata_within_a_second(server, root):
    clip = root / "media" / "8k.mp4"
    mf.write_video(clip, frames=2, height=4320, width=7680)
    started = time.monotonic()
    with pytest.raises(openai.BadRequestError, match="max_pixels"):
        _ask(server, clip)
    assert time.monotonic() - started < 1.0


def test_malformed_bodies_are_400_never_500(server, root):
    post = lambda raw: httpx.post(server.url + "/v1/chat/completions", content=raw, timeout=30,  # noqa: E731
                                  headers={"content-type": "application/json"})
    ok = {"model": "tiny", "messages": _messages(root / "media" / "clip.mp4")}
    for raw in (b"[" * 100_000 + b"]" * 100_000,  # deeply nested
                b'{"messages": [' + b"{" * 50_000 + b"}" * 50_000 + b"]}",
                json.dumps({**ok, "messages": _messages(root / "media" / ("a" * 10_000))}).encode(),  # long path
                json.dumps({**ok, "messages": _messages(root / "media" / "clip.mp4", "why\ud800?")}).encode(),
                "\ud800".encode("utf-8", "surrogatepass"), b"\xff\xfe\x00", b"null", b"{}",
                json.dumps({**ok, "stream": "false"}).encode(), json.dumps({**ok, "n": 3}).encode()):
        r = post(raw)
        assert r.status_code == 400, (raw[:80], r.status_code, r.text[:300])
        assert r.json()["error"]["code"] == 400
    assert post(json.dumps({**ok, "model": "gpt-4o"}).encode()).status_code == 404
    assert httpx.get(server.url + "/" + "x" * 10_000, timeout=30).status_code == 404
    assert _ask(server, root / "media" / "clip.mp4").usage.completion_tokens >= 1
    assert "Traceback" not in server.stderr()


def test_a_non_streaming_client_that_hangs_up_is_cancelled(server, root):
    """queue_size=0: the abandoned request would hold the one place for about a minute. Greedy: the
    tiny random model's greedy answer runs past 300 tokens without an end token (sampled ones may
    end within the 3 s the client waits, on an idle machine)."""
    body = {"model": "tiny", "messages": _messages(root / "media" / "clip.mp4"), "max_tokens": 4000,
            "temperature": 0.0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=3))
    _answers_again(server, root, "the abandoned request kept running")
    err = server.stderr()
    assert "disconnected; cancelling it" in err and "Traceback" not in err, err[-3000:]


def test_health_says_warming_up_until_the_plans_ran_once(server, root):
    """A server over a plan family (the plans the module's server made on the fly for its clips, in
    plan_dir) warms them before /health says ready; one without plan= or a family has none to warm."""
    assert "warm: " not in server.stderr()  # no plan=, and plan_dir was empty when it started
    assert any((root / "plans").rglob("plan.json")), "the module's server planned nothing on the fly"
    again = Server(root, "queue_size=0")
    try:
        err = again.stderr()
        warm = re.search(r"warm: (\S+) in ([0-9.]+) s", err)
        assert warm, err[-3000:]
        before = again.health[:-1]
        assert all(h == (503, "warming up") for h in before), again.health
        if float(warm.group(2)) > 1.5:  # /health was polled every 0.5 s while it warmed
            assert before, again.health
    finally:
        again.stop()


def test_a_plan_dir_that_is_a_file_is_refused_at_start(root):
    p = subprocess.run([sys.executable, "-m", "spava_plan.server.serve", "model=tiny", f"plan_dir={root / 'media' / 'clip.mp4'}"],
                       cwd=str(root), env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1].startswith("spava-serve: error: plan_dir") and "Traceback" not in p.stderr


def test_serve_config_errors_are_one_line(root):
    p = subprocess.run([sys.executable, "-m", "spava_plan.server.serve", "model=tiny", "queue_size=-1"], cwd=str(root),
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("spava-serve: error: queue_size")
    assert "Traceback" not in p.stderr


def test_parse_body_refuses_what_it_cannot_serve():
    from spava_plan.server.api import RequestError, parse_body

    ok = {"messages": _messages("/tmp/a.mp4"), "stop": "x", "seed": 3, "temperature": 0.5, "unknown_field": 1}
    req = parse_body(json.dumps(ok).encode(), 100)
    assert req.video_url == "file:///tmp/a.mp4" and req.stop == ["x"] and req.sampling.seed == 3
    for bad, field in (({**ok, "temperature": 5}, "temperature"), ({**ok, "top_p": 0}, "top_p"),
                       ({**ok, "seed": -1}, "seed"), ({**ok, "max_tokens": 0}, "max_tokens"),
                       ({**ok, "stream": "false"}, "stream"), ({**ok, "max_tokens": True}, "max_tokens"),
                       ({**ok, "n": 2}, "n"), ({**ok, "tools": [{"type": "function"}]}, "tools"),
                       ({**ok, "logprobs": True}, "logprobs"), ({**ok, "response_format": {"type": "json_object"}},
                                                                "response_format"),
                       ({**ok, "messages": [{"role": "system", "content": "be brief"}, *ok["messages"]]}, "messages"),
                       ({**ok, "messages": [*ok["messages"], {"role": "assistant", "content": "a"},
                                            *ok["messages"]]}, "messages"),
                       ({**ok, "messages": []}, "messages"), ([1, 2], "body"), ({**ok, "stop": [""]}, "stop"),
                       ({**ok, "messages": [{"role": "user", "content": [{"type": "video_url",
                                                                          "video_url": {"url": 7}}]}]},
                        "messages[0].content[0].video_url.url")):
        with pytest.raises(RequestError) as info:
            parse_body(json.dumps(bad).encode(), 100)
        assert info.value.field == field and info.value.status == 400, (bad, str(info.value))
    with pytest.raises(RequestError) as info:
        parse_body(json.dumps({**ok, "model": "other"}).encode(), 100, "tiny")
    assert info.value.status == 404
    for raw in (b"[" * 100_000, json.dumps({**ok, "messages": _messages("/a.mp4", "why\ud800")}).encode(),
                "\ud800".encode("utf-8", "surrogatepass"),
                b"\xff\xfe", b""):
        with pytest.raises(RequestError):
            parse_body(raw, 100)
    json.dumps(req.sampling.__dict__)  # travels to the other ranks as plain data
