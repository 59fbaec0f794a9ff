"""spava-serve test helpers: a real server process (or a gloo world of them) on a free port of
127.0.0.1, waited for with a bounded deadline, always stopped; the tiny model's common options."""
from __future__ import annotations

import contextlib
import http.server
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai

import model_fixtures as mf

FRAMES = 8
COMMON = ["model=tiny", "model.init=checkpoint", "gpus=2", f"frames={FRAMES}", "dtype=fp32", "backend=torch"]


def env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1")
    return env


class Server:
    """spava-serve in its own process(es); ``stop()`` always ends them."""

    def __init__(self, root, *extra: str, ranks: int = 0, start_timeout: float = 180.0, api_key: str = "none",
                 local: bool = True):
        from spava_plan.runtime.comm.dist import free_port

        self.port = free_port()
        args = ["-m", "spava_plan.server.serve", *COMMON, f"model.checkpoint={root / 'ckpt'}", f"port={self.port}",
                f"plan_dir={root / 'plans'}", *extra]
        if local:  # file:// under root/media (off otherwise, as by default)
            args.append(f"allowed_local_media_path={root / 'media'}")
        self.health: list = []  # what /health answered while the server started
        self.procs = []
        self.logs = []
        if ranks:  # gloo world launched the way torchrun launches its workers
            master = free_port()
            for r in range(ranks):
                log = open(root / f"serve-{self.port}-rank{r}.err", "w+")
                self.logs.append(log)
                self.procs.append(subprocess.Popen([sys.executable, *args], cwd=str(root),
                                                   env=mf.dist_env(r, ranks, master), stdout=subprocess.DEVNULL,
                                                   stderr=log))
        else:
            log = open(root / f"serve-{self.port}.err", "w+")
            self.logs.append(log)
            self.procs.append(subprocess.Popen([sys.executable, *args], cwd=str(root), env=env(),
                                               stdout=subprocess.DEVNULL, stderr=log))
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                self.stop()
                raise AssertionError(f"the server exited at start:\n{self.stderr()[-3000:]}")
            try:
                r = httpx.get(self.url + "/health", timeout=2)
                self.health.append((r.status_code, r.json().get("status")))
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            self.stop()
            raise AssertionError(f"the server did not come up in {start_timeout} s:\n{self.stderr()[-3000:]}")
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, timeout=120, max_retries=0)

    def stderr(self, rank: int = 0) -> str:
        log = self.logs[rank]
        log.flush()
        log.seek(0)
        return log.read()

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def messages(video, question=mf.QUESTION):
    """One user message: a path becomes a file:// URL; data:/http(s) URLs are used as they are."""
    url = str(video) if str(video).startswith(("data:", "http://", "https://", "file:")) else f"file://{video}"
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": question}]}]




def data_url(path) -> str:
    import base64

    with open(path, "rb") as f:
        return "data:video/mp4;base64," + base64.b64encode(f.read()).decode()


def ask(server, video, question=mf.QUESTION, raw: bool = False, **kw):
    """A chat completion through the openai client (``raw``: with the HTTP response's headers)."""
    kw.setdefault("max_tokens", 6)
    create = server.client.chat.completions.with_raw_response.create if raw else server.client.chat.completions.create
    return create(model="tiny", messages=messages(video, question), **kw)


@contextlib.contextmanager
def clip_web_server(clip: bytes, seen: list[str] | None = None):
    """An HTTP server on 127.0.0.1 serving ``clip`` at any path, and at /elsewhere.mp4 a redirect to
    another name of this host (localhost); yields its base URL. ``seen`` collects the paths asked for."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            if seen is not None:
                seen.append(self.path)
            if self.path == "/elsewhere.mp4":
                self.send_response(302)
                self.send_header("Location", f"http://localhost:{self.server.server_port}/clip.mp4")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(clip)))
            self.end_headers()
            self.wfile.write(clip)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}"
    finally:
        httpd.shutdown()
        httpd.server_close()
