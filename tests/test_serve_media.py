"""spava_plan.server.media: every kind of video URL against the policy, with real files, a real FIFO and a
real HTTP server on 127.0.0.1 (no model, no server process: these run in about a second)."""
from __future__ import annotations

import base64
import http.server
import os
import socket
import threading
import time

import pytest

from spava_plan.server.media import MediaError, MediaPolicy, fetch_media, media_from_bytes

VIDEO = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8  # any bytes: media never parses them


def policy(**kw) -> MediaPolicy:
    return MediaPolicy(**{"max_bytes": 4096, "timeout": 5.0, **kw})


def refused(url: str, pol: MediaPolicy, reason: str, setting: str | None = None) -> MediaError:
    with pytest.raises(MediaError) as info:
        fetch_media(url, pol)
    assert info.value.reason == reason, str(info.value)
    if setting:
        assert info.value.setting == setting and setting in str(info.value), str(info.value)
    return info.value


# -- data: ---------------------------------------------------------------------------------------------
def test_data_url_round_trips_into_a_private_temp_file_deleted_after():
    url = "data:video/mp4;base64," + base64.b64encode(VIDEO).decode()
    with fetch_media(url, policy(max_bytes=len(VIDEO))) as media:
        assert open(media.path, "rb").read() == VIDEO
        assert os.stat(media.path).st_mode & 0o077 == 0  # only this user can read it
        path = media.path
    assert not os.path.exists(path)


def test_data_url_over_the_cap_or_malformed_is_refused():
    big = "data:video/mp4;base64," + base64.b64encode(VIDEO + b"x" * 3).decode()
    refused(big, policy(max_bytes=len(VIDEO)), "too_large", "max_video_bytes")
    refused("data:video/mp4;base64,@@@@", policy(), "data_url")
    refused("data:text/html;base64,AAAA", policy(), "data_url")
    refused("data:video/mp4,plain", policy(), "data_url")
    refused("gopher://x/clip.mp4", policy(), "scheme", "video_url.url")


# -- file:// -------------------------------------------------------------------------------------------
@pytest.fixture()
def root(tmp_path):
    allowed = tmp_path / "media"
    allowed.mkdir()
    (allowed / "clip.mp4").write_bytes(VIDEO)
    (allowed / "sub").mkdir()
    outside = tmp_path / "secret.mp4"
    outside.write_bytes(b"secret")
    (allowed / "link-out.mp4").symlink_to(outside)
    (allowed / "link-in.mp4").symlink_to(allowed / "clip.mp4")
    os.mkfifo(allowed / "fifo.mp4")
    os.mkfifo(tmp_path / "fifo-out.mp4")
    return allowed


def test_file_urls_are_off_by_default(root):
    err = refused(f"file://{root}/clip.mp4", policy(), "local_off", "allowed_local_media_path")
    assert "allowed_local_media_path" in str(err)


def test_a_file_inside_the_root_is_read_and_a_symlink_inside_is_followed(root):
    pol = policy(local_root=str(root))
    for name in ("clip.mp4", "link-in.mp4"):
        with fetch_media(f"file://{root}/{name}", pol) as media:
            assert media.read_bytes() == VIDEO


def test_paths_outside_the_root_get_one_message_whether_they_exist_or_not(root):
    pol = policy(local_root=str(root))
    messages = {str(refused(url, pol, "local_path", "allowed_local_media_path")) for url in (
        "file:///etc/passwd", "file:///no/such/file.mp4", f"file://{root}/../secret.mp4",
        f"file://{root}/sub/../../secret.mp4", f"file://{root}/link-out.mp4", f"file://{root.parent}/fifo-out.mp4",
        "file://otherhost/etc/passwd", f"file://{root}/" + "a" * 10_000, f"file://{root}/%00x")}
    assert len(messages) == 1, messages  # no file-existence oracle


def test_fifo_directory_and_missing_inside_the_root_are_refused_without_blocking(root):
    pol = policy(local_root=str(root))
    started = time.monotonic()
    refused(f"file://{root}/fifo.mp4", pol, "local_not_file")  # a blocking open would hang here
    assert time.monotonic() - started < 2
    refused(f"file://{root}/sub", pol, "local_not_file")
    refused(f"file://{root}", pol, "local_not_file")
    err = refused(f"file://{root}/missing.mp4", pol, "local_missing")
    assert "no video file" in str(err)


def test_a_file_over_the_cap_is_refused_before_it_is_read(root):
    refused(f"file://{root}/clip.mp4", policy(local_root=str(root), max_bytes=len(VIDEO) - 1), "too_large",
            "max_video_bytes")


# -- http(s):// ----------------------------------------------------------------------------------------
class _Handler(http.server.BaseHTTPRequestHandler):
    hosts: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        type(self).hosts.append(self.headers.get("Host", ""))
        if self.path.startswith("/redirect-other"):
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{self.server.server_port}/clip.mp4")
            self.end_headers()
            return
        if self.path.startswith("/redirect-same"):
            self.send_response(302)
            self.send_header("Location", "/clip.mp4")
            self.end_headers()
            return
        if self.path.startswith("/missing"):
            self.send_error(404)
            return
        body = VIDEO * (8 if self.path.startswith("/big") else 1)
        self.send_response(200)
        self.send_header("Content-Type", "video/mp4")
        if not self.path.startswith("/big-chunked"):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def web():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_port
    server.shutdown()
    server.server_close()


def test_http_is_off_by_default_and_only_listed_hosts_are_fetched(web):
    _Handler.hosts.clear()
    refused(f"http://127.0.0.1:{web}/clip.mp4", policy(), "domain", "allowed_media_domains")
    refused(f"http://127.0.0.1:{web}/clip.mp4", policy(allowed_domains=("example.com",)), "domain")
    assert _Handler.hosts == []  # refused without a socket


def test_a_listed_host_on_a_private_address_needs_allow_private_media(web):
    _Handler.hosts.clear()
    refused(f"http://127.0.0.1:{web}/clip.mp4", policy(allowed_domains=("127.0.0.1",)), "private_address",
            "allow_private_media")
    assert _Handler.hosts == []
    with fetch_media(f"http://127.0.0.1:{web}/clip.mp4",
                     policy(allowed_domains=("127.0.0.1",), allow_private=True)) as media:
        assert media.read_bytes() == VIDEO


def test_redirects_stay_on_the_host_and_caps_hold_while_streaming(web):
    pol = policy(allowed_domains=("127.0.0.1", "localhost"), allow_private=True)
    refused(f"http://127.0.0.1:{web}/redirect-other", pol, "redirect")
    with fetch_media(f"http://127.0.0.1:{web}/redirect-same", pol) as media:
        assert media.read_bytes() == VIDEO
    refused(f"http://127.0.0.1:{web}/big", pol, "too_large", "max_video_bytes")  # by Content-Length
    refused(f"http://127.0.0.1:{web}/big-chunked", pol, "too_large", "max_video_bytes")  # while streaming
    refused(f"http://127.0.0.1:{web}/missing", pol, "fetch")


def test_the_connection_goes_to_the_checked_address(web, monkeypatch):
    """A name is resolved once, by the policy check, and the socket goes to that address with the
    name in the Host header: a second lookup (DNS rebinding) is never made. The name below exists
    only in this test's resolver, so httpx could not reach it by resolving it itself."""
    real = socket.getaddrinfo
    lookups = []

    def resolver(host, *args, **kw):
        if host == "media.test":
            lookups.append(host)
            return real("127.0.0.1", *args, **kw)
        return real(host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    _Handler.hosts.clear()
    refused(f"http://media.test:{web}/clip.mp4", policy(allowed_domains=("media.test",)), "private_address")
    with fetch_media(f"http://media.test:{web}/clip.mp4",
                     policy(allowed_domains=("media.test",), allow_private=True)) as media:
        assert media.read_bytes() == VIDEO
    assert lookups == ["media.test", "media.test"] and _Handler.hosts == [f"media.test:{web}"]


def test_a_stalled_server_times_out():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts the connection, never answers
    try:
        started = time.monotonic()
        refused(f"http://127.0.0.1:{listener.getsockname()[1]}/clip.mp4",
                policy(allowed_domains=("127.0.0.1",), allow_private=True, timeout=1.0), "timeout", "media_timeout")
        assert time.monotonic() - started < 4
    finally:
        listener.close()


def test_bytes_for_another_rank_land_in_a_private_file():
    with media_from_bytes(VIDEO) as media:
        assert media.read_bytes() == VIDEO and media.size == len(VIDEO)
