"""spava-serve with its limits turned on and down: auth, allowed media hosts, body and video caps,
CORS, request_timeout, header/body read timeouts, and graceful shutdown (SIGTERM during a stream:
the stream finishes, new connections are refused, every rank exits 0; also as a gloo world the way
torchrun launches it). One server process per configuration; the shutdown test runs last and ends it."""
from __future__ import annotations

import signal
import socket
import subprocess
import time

import pytest

pytest.importorskip("transformers")
pytest.importorskip("av")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import model_fixtures as mf  # noqa: E402
from serve_fixtures import FRAMES, Server, ask, clip_web_server, data_url, messages  # noqa: E402

KEY = "test-key-0123456789"
BODY_CAP = 300_000


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-limits")
    mf.build_checkpoint(root / "ckpt", "qwen2_vl")
    (root / "media").mkdir()
    mf.write_video(root / "media" / "clip.mp4", frames=2 * FRAMES, height=56, width=84)
    return root


@pytest.fixture(scope="module")
def web(root):
    """An HTTP server on 127.0.0.1 serving the clip, and a redirect to another name of this host."""
    with clip_web_server((root / "media" / "clip.mp4").read_bytes()) as url:
        yield url


@pytest.fixture(scope="module")
def server(root):
    srv = Server(root, f"api_key={KEY}", "allowed_media_domains=[127.0.0.1,localhost]", "allow_private_media=true",
                 f"max_body_bytes={BODY_CAP}", "max_video_bytes=200000", "request_timeout=10", "header_timeout=2",
                 "read_timeout=2", "allowed_origins=[http://app.test]", "queue_size=2", api_key=KEY, local=False)
    yield srv
    srv.stop()


def auth() -> dict:
    return {"authorization": f"Bearer {KEY}"}


def test_every_endpoint_but_health_needs_the_key(server, root):
    for path in ("/v1/models", "/metrics"):
        assert httpx.get(server.url + path, timeout=30).status_code == 401
        assert httpx.get(server.url + path, timeout=30, headers={"authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(server.url + path, timeout=30, headers=auth()).status_code == 200
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200
    anonymous = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong-key", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        anonymous.chat.completions.create(model="tiny", messages=messages(root / "media" / "clip.mp4"), max_tokens=2)
    assert ask(server, data_url(root / "media" / "clip.mp4"), max_tokens=2).usage.completion_tokens >= 1
    metrics = httpx.get(server.url + "/metrics", timeout=30, headers=auth()).text
    assert 'spava_refusals_total{reason="unauthorized"}' in metrics


def test_a_listed_host_is_fetched_and_a_redirect_to_another_host_refused(server, root, web):
    by_http = ask(server, f"{web}/clip.mp4").choices[0].message.content
    assert by_http == ask(server, data_url(root / "media" / "clip.mp4")).choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="redirects to another host"):
        ask(server, f"{web}/elsewhere.mp4")
    with pytest.raises(openai.BadRequestError, match="allowed_local_media_path"):
        ask(server, root / "media" / "clip.mp4")  # file:// stays off: this server allows no folder


def test_bodies_and_videos_over_their_caps_are_refused(server, root):
    big = {"model": "tiny", "messages": messages(root / "media" / "clip.mp4", "why " * (BODY_CAP // 4))}
    r = httpx.post(server.url + "/v1/chat/completions", json=big, timeout=30, headers=auth())
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]
    video = "data:video/mp4;base64," + "A" * 270_000  # 202,500 bytes > max_video_bytes, body < max_body_bytes
    with pytest.raises(openai.BadRequestError, match="max_video_bytes"):
        ask(server, video)


def test_cors_answers_only_the_listed_origin(server):
    def preflight(origin):
        return httpx.options(server.url + "/v1/chat/completions", timeout=30, headers={
            "origin": origin, "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type"})

    assert preflight("http://app.test").headers.get("access-control-allow-origin") == "http://app.test"
    assert "access-control-allow-origin" not in preflight("http://evil.test").headers


def test_request_timeout_answers_or_504s_in_time(server, root):
    body = {"model": "tiny", "messages": messages(data_url(root / "media" / "clip.mp4")), "max_tokens": 4000,
            "temperature": 1.0, "seed": 5}
    started = time.monotonic()
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60, headers=auth())
    elapsed = time.monotonic() - started
    assert r.status_code in (200, 504) and elapsed < 15, (r.status_code, elapsed)
    if r.status_code == 504:
        assert "request_timeout" in r.json()["error"]["message"]
    deadline = time.monotonic() + 15  # the cancelled work stops at its next token
    while True:
        try:
            assert ask(server, data_url(root / "media" / "clip.mp4"), max_tokens=2).usage.completion_tokens >= 1
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_half_sent_requests_are_dropped_after_the_read_timeouts(server):
    """300 connections whose headers never end (slowloris; beyond max_connections too) are closed
    after header_timeout (2 s), without a response; then one whose body never ends gets 408 after
    read_timeout (2 s); then the server answers as before."""
    port = int(server.url.rsplit(":", 1)[1])
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    socks = []
    try:
        for _ in range(300):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(head)
            socks.append(s)
        started = time.monotonic()
        for s in socks:
            s.settimeout(max(0.1, started + 8 - time.monotonic()))
            try:
                assert s.recv(1024) == b""  # closed by the server, no response
            except ConnectionResetError:
                pass
        assert time.monotonic() - started < 8
        body = socket.create_connection(("127.0.0.1", port), timeout=10)
        socks.append(body)
        body.sendall(head + b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n{\"mess")
        body.settimeout(8)
        assert body.recv(4096).startswith(b"HTTP/1.1 408")
    finally:
        for s in socks:
            s.close()
    assert httpx.get(server.url + "/v1/models", timeout=30, headers=auth()).status_code == 200


def test_the_next_request_is_prepared_while_one_runs(server, root):
    """prefetch=1 (the default): request B is fetched, decoded and planned while A generates. B's
    response headers name its plan, so they come only after its preparation: when they arrive, A
    (300 greedy tokens, several seconds) still holds its place in the queue."""
    clip = data_url(root / "media" / "clip.mp4")
    first = {"model": "tiny", "messages": messages(clip), "max_tokens": 300, "stream": True}
    second = {"model": "tiny", "messages": messages(clip, "What happens?"), "max_tokens": 2, "stream": True}
    with httpx.Client(timeout=60, headers=auth()) as client:
        with client.stream("POST", server.url + "/v1/chat/completions", json=first) as a:
            lines = a.iter_lines()
            next(line for line in lines if '"content": "' in line and '"content": ""' not in line)  # A generates
            with client.stream("POST", server.url + "/v1/chat/completions", json=second) as b:
                assert b.status_code == 200 and b.headers["x-spava-plan"]
                depth = httpx.get(server.url + "/metrics", timeout=30, headers=auth()).text
                assert "spava_queue_depth 2.0" in depth, [x for x in depth.splitlines() if "queue" in x]
                assert any(line.startswith("data: [DONE]") for line in b.iter_lines())


def _stream_through_sigterm(srv: Server, video: str) -> tuple[int, str | None]:
    """A streaming request; SIGTERM to every process of ``srv`` once its first chunk arrived (the
    request is admitted and running; 300 greedy tokens take seconds). Returns (chunks, finish_reason)."""
    stream = srv.client.chat.completions.create(model="tiny", messages=messages(video), max_tokens=300, stream=True)
    chunks, finish = 0, None
    for chunk in stream:
        chunks += 1
        if chunks == 1:
            for p in srv.procs:
                p.send_signal(signal.SIGTERM)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    return chunks, finish


def _refused_or_503(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=5).status_code == 503
    except httpx.ConnectError:
        return True


def test_sigterm_during_a_stream_finishes_it_then_exits_0(server, root):
    """Runs last in this module: it ends the module's server."""
    chunks, finish = _stream_through_sigterm(server, data_url(root / "media" / "clip.mp4"))
    assert finish in ("stop", "length") and chunks >= 3  # role, content..., the finish with usage
    assert _refused_or_503(server.url)
    assert server.procs[0].wait(timeout=60) == 0, server.stderr()[-3000:]
    err = server.stderr()
    assert "signal 15: finishing the requests in flight" in err and "Traceback" not in err, err[-3000:]


def test_sigterm_under_a_gloo_world_every_rank_exits_0(root):
    """Two ranks launched as torchrun launches them; torchrun forwards SIGTERM to every worker."""
    srv = Server(root, "timeout=30", "heartbeat=1", ranks=2)
    try:
        chunks, finish = _stream_through_sigterm(srv, str(root / "media" / "clip.mp4"))
        assert finish in ("stop", "length")
        codes = [p.wait(timeout=60) for p in srv.procs]
        assert codes == [0, 0], [srv.stderr(r)[-2000:] for r in range(2)]
    except subprocess.TimeoutExpired:
        pytest.fail(f"a rank did not exit: {[p.poll() for p in srv.procs]}")
    finally:
        srv.stop()
