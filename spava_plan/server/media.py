"""A request's video URL -> the video's bytes in a private temp file, under the operator's policy.

    policy = MediaPolicy.from_config(serve_config)
    with fetch_media("data:video/mp4;base64,...", policy) as media:   # MediaError (HTTP 400) if refused
        engine.prepare(media.path, question)                          # the temp file is deleted after

Three kinds of URL, each off unless the operator turned it on (vLLM's flags, secure by default):
  data:video/<type>;base64,...  always on, capped by max_video_bytes (checked before decoding it);
  http(s)://host/...            only for a host in allowed_media_domains; the host is resolved once
                                and every address checked (no loopback, private, link-local,
                                multicast, reserved unless allow_private_media), and the connection
                                goes to that checked address (Host header and TLS SNI name the host,
                                the certificate is verified for it), so DNS cannot rebind around the
                                check; redirects only within the same host (each hop checked again);
                                connect and read each bounded by media_timeout and the whole fetch
                                too; the byte cap enforced while streaming;
  file:///path                  only under allowed_local_media_path: the path is refused lexically
                                (``..``, NUL, outside the root) before the file system is touched,
                                then its real path must stay inside the root (no symlink escape), it
                                must be a regular file (lstat before any open; then opened with
                                O_NOFOLLOW|O_NONBLOCK, so a FIFO or device never blocks, and fstat
                                checked again), and read with a bound.

A refusal outside the policy never says whether the path exists (no file-existence oracle); inside
the allowed root a missing file is named plainly. Each refusal is a MediaError (an InputError)
whose ``reason`` labels the /metrics counter and whose message names the setting or field.

Every URL ends as a copy in a temp file only this process can read (0600), so the runtime never
opens a client-named path itself and the bytes cannot change under it.
"""
from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
import socket
import stat
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import unquote, urljoin, urlsplit

from ..errors import InputError

_DATA_URL = re.compile(r"data:video/[A-Za-z0-9][A-Za-z0-9.+-]{0,63};base64,", re.ASCII)
_CHUNK = 1 << 20
MAX_PATH_CHARS = 4096  # PATH_MAX: a longer file:// path is refused before any system call
MAX_REDIRECTS = 3


class MediaError(InputError):
    """A video URL the policy refuses, or media that cannot be read (HTTP 400)."""

    def __init__(self, message: str, setting: str, reason: str):
        super().__init__(message, setting=setting)
        self.reason = reason


@dataclass(frozen=True)
class MediaPolicy:
    max_bytes: int
    timeout: float
    allowed_domains: tuple[str, ...] = ()
    allow_private: bool = False
    local_root: str | None = None  # a real path (ServeConfig resolved it)

    @classmethod
    def from_config(cls, cfg: Any) -> "MediaPolicy":
        return cls(max_bytes=int(cfg.max_video_bytes), timeout=float(cfg.media_timeout),
                   allowed_domains=tuple(cfg.allowed_media_domains), allow_private=bool(cfg.allow_private_media),
                   local_root=cfg.allowed_local_media_path)


class MediaFile:
    """The fetched video in a private temp file; ``close()`` (or leaving ``with``) deletes it."""

    def __init__(self, path: str, size: int, kind: str):
        self.path, self.size, self.kind = path, size, kind

    def read_bytes(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()

    def close(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "MediaFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def media_from_bytes(data: bytes, kind: str = "bytes") -> MediaFile:
    """Bytes (e.g. sent by rank 0 to the other ranks) -> a private temp file."""
    return _Sink(kind).write_all(data)


class _Sink:
    """A private temp file being written (mkstemp: 0600, O_EXCL), removed again on failure."""

    def __init__(self, kind: str):
        fd, self.path = tempfile.mkstemp(prefix="spava-media-", suffix=".video")
        self.file = os.fdopen(fd, "wb")
        self.size, self.kind = 0, kind

    def write(self, chunk: bytes) -> None:
        self.file.write(chunk)
        self.size += len(chunk)

    def write_all(self, data: bytes) -> MediaFile:
        with self:
            self.write(data)
        return self.done()

    def done(self) -> MediaFile:
        return MediaFile(self.path, self.size, self.kind)

    def __enter__(self) -> "_Sink":
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        self.file.close()
        if exc_type is not None:
            os.unlink(self.path)


def fetch_media(url: str, policy: MediaPolicy, cancelled: Callable[[], bool] = lambda: False) -> MediaFile:
    """The video a request's ``video_url`` names, as a private temp file (MediaError if refused).

    ``cancelled``: polled between chunks of a download (the request timed out or its client left)."""
    if not isinstance(url, str) or not url:
        raise MediaError("must be a non-empty string", "video_url.url", "bad_url")
    head = url[:16].lower()
    if head.startswith("data:"):
        return _data_url(url, policy)
    if head.startswith(("http://", "https://")):
        return _http(url, policy, cancelled)
    if head.startswith("file:"):
        return _local(url, policy)
    raise MediaError("must be a data:video/...;base64 URL, an http(s):// URL of an allowed host "
                     "(allowed_media_domains) or a file:// URL under allowed_local_media_path", "video_url.url", "scheme")


# -- data: ------------------------------------------------------------------------------------------
def _data_url(url: str, policy: MediaPolicy) -> MediaFile:
    m = _DATA_URL.match(url)
    if m is None:
        raise MediaError("a data: URL must be data:video/<type>;base64,<data>", "video_url.url", "data_url")
    payload = url[m.end():]
    limit = -(-policy.max_bytes // 3) * 4  # base64 of max_bytes, checked before decoding anything
    if len(payload) > limit:
        raise MediaError(f"the data: URL holds more than {policy.max_bytes} bytes of video", "max_video_bytes",
                         "too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("the data: URL is not valid base64", "video_url.url", "data_url") from None
    if len(data) > policy.max_bytes:
        raise MediaError(f"the data: URL holds more than {policy.max_bytes} bytes of video", "max_video_bytes",
                         "too_large")
    if not data:
        raise MediaError("the data: URL holds no bytes", "video_url.url", "data_url")
    return media_from_bytes(data, "data")


# -- file:// ----------------------------------------------------------------------------------------
def _outside(root: str) -> MediaError:
    # One message for every path outside the root, present or not: no file-existence oracle.
    return MediaError("file:// URLs must name a regular file inside the folder allowed_local_media_path",
                      "allowed_local_media_path", "local_path")


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _local(url: str, policy: MediaPolicy) -> MediaFile:
    root = policy.local_root
    if root is None:
        raise MediaError("file:// URLs are off on this server (the operator can allow one folder with "
                         "allowed_local_media_path)", "allowed_local_media_path", "local_off")
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise _outside(root)
    try:
        path = unquote(parts.path, errors="strict")
    except UnicodeDecodeError:
        raise _outside(root) from None
    # Lexical checks first: nothing of the file system is touched for a path the policy refuses.
    if (not path.startswith("/") or len(path) > MAX_PATH_CHARS or "\x00" in path
            or ".." in path.split("/") or not _inside(os.path.normpath(path), root)):
        raise _outside(root)
    try:
        real = os.path.realpath(path, strict=True)
    except (OSError, RuntimeError, ValueError):  # missing, a loop, too long: inside the root, say so
        raise MediaError(f"no video file at {path!r}", "video_url.url", "local_missing") from None
    if not _inside(real, root):
        raise _outside(root)  # a symlink out of the root
    try:
        st = os.lstat(real)
    except OSError:
        raise MediaError(f"no video file at {path!r}", "video_url.url", "local_missing") from None
    if not stat.S_ISREG(st.st_mode):  # FIFO, device, socket, directory: refused before any open
        raise MediaError(f"{path!r} is not a regular file", "video_url.url", "local_not_file")
    if st.st_size > policy.max_bytes:
        raise MediaError(f"{path!r} is larger than {policy.max_bytes} bytes", "max_video_bytes", "too_large")
    try:  # O_NOFOLLOW / O_NONBLOCK: if the path was swapped since lstat, nothing follows or blocks
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        raise MediaError(f"cannot read {path!r}", "video_url.url", "local_unreadable") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise MediaError(f"{path!r} is not a regular file", "video_url.url", "local_not_file")
        with _Sink("file") as sink:
            while True:
                chunk = f.read(_CHUNK)
                if not chunk:
                    break
                if sink.size + len(chunk) > policy.max_bytes:  # it grew since lstat
                    raise MediaError(f"{path!r} is larger than {policy.max_bytes} bytes", "max_video_bytes",
                                     "too_large")
                sink.write(chunk)
        return sink.done()


# -- http(s):// -------------------------------------------------------------------------------------
def _public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _resolve(host: str, port: int, policy: MediaPolicy) -> str:
    """The address to connect to: every address the host resolves to is checked (a name with one
    private address among public ones is refused), and the first one is used."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise MediaError(f"cannot resolve the media host {host!r}", "video_url.url", "fetch") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
    if not addresses:
        raise MediaError(f"cannot resolve the media host {host!r}", "video_url.url", "fetch")
    if not policy.allow_private and not all(_public(a) for a in addresses):
        raise MediaError(f"the media host {host!r} resolves to a loopback, private, link-local or multicast "
                         f"address; refused (allow_private_media=true allows it)", "allow_private_media",
                         "private_address")
    return str(addresses[0])


def _check_host(parts: Any, policy: MediaPolicy) -> tuple[str, int]:
    try:
        host, port = (parts.hostname or "").rstrip(".").lower(), parts.port
    except ValueError:
        raise MediaError("the URL's port is not a number", "video_url.url", "bad_url") from None
    if not policy.allowed_domains:
        raise MediaError("http(s) media are off on this server (the operator can list hosts in "
                         "allowed_media_domains)", "allowed_media_domains", "domain")
    if host not in policy.allowed_domains:
        raise MediaError(f"the host {host!r} is not in allowed_media_domains", "allowed_media_domains", "domain")
    if parts.username is not None or parts.password is not None:
        raise MediaError("media URLs must not carry credentials", "video_url.url", "bad_url")
    return host, port or (443 if parts.scheme == "https" else 80)


def _http(url: str, policy: MediaPolicy, cancelled: Callable[[], bool]) -> MediaFile:
    import httpx

    parts = urlsplit(url)
    first_host, _ = _check_host(parts, policy)  # before any socket: a refused host is never resolved
    deadline = time.monotonic() + policy.timeout
    timeout = httpx.Timeout(policy.timeout)
    with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            host, port = _check_host(parts, policy)
            if host != first_host:
                raise MediaError(f"the media URL redirects to another host ({host!r}); refused", "video_url.url",
                                 "redirect")
            ip = _resolve(host, port, policy)
            netloc = f"[{ip}]" if ":" in ip else ip
            pinned = parts._replace(netloc=f"{netloc}:{port}", fragment="").geturl()
            headers = {"Host": parts.netloc.rsplit("@", 1)[-1], "Accept": "video/*, */*;q=0.5"}
            try:
                with client.stream("GET", pinned, headers=headers,
                                   extensions={"sni_hostname": host} if parts.scheme == "https" else {}) as r:
                    if r.is_redirect:
                        location = r.headers.get("location", "")
                        parts = urlsplit(urljoin(parts.geturl(), location))
                        if parts.scheme not in ("http", "https"):
                            raise MediaError("the media URL redirects off http(s); refused", "video_url.url",
                                             "redirect")
                        continue
                    if r.status_code != 200:
                        raise MediaError(f"the media URL answered HTTP {r.status_code}", "video_url.url", "fetch")
                    declared = r.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > policy.max_bytes:
                        raise MediaError(f"the media URL holds more than {policy.max_bytes} bytes",
                                         "max_video_bytes", "too_large")
                    with _Sink("http") as sink:
                        for chunk in r.iter_raw(_CHUNK):
                            if sink.size + len(chunk) > policy.max_bytes:
                                raise MediaError(f"the media URL holds more than {policy.max_bytes} bytes",
                                                 "max_video_bytes", "too_large")
                            if time.monotonic() > deadline:
                                raise MediaError(f"fetching the video took more than {policy.timeout:g} s",
                                                 "media_timeout", "timeout")
                            if cancelled():
                                raise MediaError("the request was cancelled while its video was fetched",
                                                 "request_timeout", "cancelled")
                            sink.write(chunk)
                    if sink.size == 0:
                        raise MediaError("the media URL answered no bytes", "video_url.url", "fetch")
                    return sink.done()
            except httpx.TimeoutException:
                raise MediaError(f"fetching the video took more than {policy.timeout:g} s", "media_timeout",
                                 "timeout") from None
            except httpx.HTTPError as exc:
                raise MediaError(f"cannot fetch the video: {type(exc).__name__}", "video_url.url", "fetch") from None
    raise MediaError(f"the media URL redirects more than {MAX_REDIRECTS} times", "video_url.url", "redirect")
