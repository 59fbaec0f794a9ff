"""`spava-serve`: an OpenAI-compatible HTTP server answering questions about videos under plans.

    torchrun --nproc-per-node W -m spava_plan.serve model.checkpoint=PATH gpus=W port=8000   # NCCL / gloo
    spava-serve model=tiny model.init=random gpus=2 port=8123      # W ranks emulated in one process

The model is loaded once per rank. Rank 0 serves (FastAPI + uvicorn, like vLLM and SGLang):

    POST /v1/chat/completions  messages with {"type": "video_url", "video_url": {"url": "file:///clip.mp4"}}
                               and text parts; max_tokens, temperature, top_p, seed, stop, stream (SSE)
    GET  /v1/models, /health, /metrics (Prometheus: requests, TTFT, decode tokens/s, queue depth)

Requests run one at a time across the ranks (a worker thread on rank 0 takes them from a bounded
queue: HTTP 429 when full). Rank 0 prepares a request first (decode, tokenize, plan), so a bad
request (unreadable video, too long a question, no plan and planning on the fly off) is a 400 that
never reaches the other ranks; then it sends the request (paths and numbers only) to the other
ranks, which prepare it the same way, and all run it. Between requests rank 0 pings the others every
``heartbeat`` seconds, so a rank that dies or hangs makes every rank exit with one line naming it
within the process-group ``timeout`` (restart with torchrun's ``--max-restarts``). A client that
disconnects mid-stream cancels its request: rank 0 tells the ranks to stop after the current token.

The HTTP side is the optional extra ``pip install .[serve]``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence
from urllib.parse import unquote, urlparse

from .errors import DistributedError, InputError, SpavaError
from .launching import agree, fail, hydra_main, launch_mode
from .session import Sampling, Session

try:  # FastAPI resolves the handler's annotations by name in this module's globals
    from fastapi import Request
except ImportError:  # the serve extra is missing: _serve_http says so in one line
    Request = Any  # type: ignore[misc,assignment]

log = logging.getLogger("spava_plan.serve")
PROG = "spava-serve"
_PING, _STOP = "ping", "stop"


# -- the request body --------------------------------------------------------------------------------
@dataclass
class ChatRequest:
    video: str
    question: str
    sampling: Sampling
    stop: list[str]
    stream: bool
    model: str


def _bad(message: str) -> InputError:
    return InputError(message, setting="request")


def parse_chat(body: Any, max_tokens_cap: int) -> ChatRequest:
    """An OpenAI chat-completions body -> ChatRequest (InputError: HTTP 400)."""
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list")
    videos: list[str] = []
    texts: list[str] = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise _bad("each message needs a role of system, user or assistant")
        if m["role"] != "user":
            continue  # the plan's prompt layout has the model's own system prompt
        content = m.get("content")
        if isinstance(content, str):
            texts.append(content)
            continue
        if not isinstance(content, list):
            raise _bad("a message's content must be a string or a list of parts")
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "video_url" and isinstance(part.get("video_url"), dict) and isinstance(
                    part["video_url"].get("url"), str):
                videos.append(part["video_url"]["url"])
            else:
                raise _bad(f"unsupported content part {str(kind)!r}; use 'text' and 'video_url' parts")
    if len(videos) != 1:
        raise _bad(f"a request needs exactly one video_url part, got {len(videos)}")
    url = urlparse(videos[0])
    if url.scheme != "file" or url.netloc not in ("", "localhost"):
        raise _bad("video_url must be a file:// URL of a video on the server (file:///path/clip.mp4)")
    question = "\n".join(t for t in texts if t.strip()).strip()
    if not question:
        raise _bad("the request has no question text")

    def number(key: str, default: float, lo: float, hi: float) -> float:
        value = body.get(key, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (lo <= value <= hi):
            raise _bad(f"'{key}' must be a number within {lo:g}..{hi:g}, got {value!r}")
        return float(value)

    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 16))
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= max_tokens_cap:
        raise _bad(f"'max_tokens' must be an integer within 1..{max_tokens_cap}, got {max_tokens!r}")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63):
        raise _bad(f"'seed' must be a non-negative integer, got {seed!r}")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise _bad("'stop' must be a string or a list of up to 4 non-empty strings")
    sampling = Sampling(max_tokens=max_tokens, temperature=number("temperature", 0.0, 0.0, 2.0),
                        top_p=number("top_p", 1.0, 1e-6, 1.0), seed=seed)
    return ChatRequest(unquote(url.path), question, sampling, stop, bool(body.get("stream", False)),
                       str(body.get("model") or ""))


# -- jobs between the HTTP side and the worker ------------------------------------------------------
@dataclass
class Job:
    request: ChatRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    created: float = field(default_factory=time.time)
    cancelled: threading.Event = field(default_factory=threading.Event)
    released: bool = False  # its place in the queue is free again

    def emit(self, kind: str, data: Any = None) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, data))


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("spava_requests", "Chat completion requests by outcome", ["status"],
                                registry=self.registry)
        self.ttft = Histogram("spava_time_to_first_token_seconds", "From admission to the first token",
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=self.registry)
        self.decode = Histogram("spava_decode_tokens_per_second", "Decode speed of a request",
                                buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000), registry=self.registry)
        self.queue = Gauge("spava_queue_depth", "Requests admitted and not finished", registry=self.registry)
        self.tokens = Counter("spava_generated_tokens", "Completion tokens", registry=self.registry)


class Worker:
    """Rank 0's request loop: one request at a time over all ranks (a thread; torch stays off the
    event loop)."""

    def __init__(self, engine: Session, cfg: Any, comm: Any, metrics: Metrics):
        self.engine, self.cfg, self.comm, self.metrics = engine, cfg, comm, metrics
        self.jobs: queue.Queue = queue.Queue()
        self.admitted = 0
        self.lock = threading.Lock()
        self.fatal: str | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="spava-worker", daemon=True)

    def admit(self, job: Job) -> bool:
        with self.lock:
            if self.fatal is not None or self.admitted >= self.cfg.queue_size + 1:
                return False
            self.admitted += 1
            self.metrics.queue.set(self.admitted)
        self.jobs.put(job)
        return True

    def _done(self, job: Job) -> None:
        """Release the job's place in the queue (once), before its client can see the answer: a
        client that sends its next request right after the last event must not get 429."""
        with self.lock:
            if job.released:
                return
            job.released = True
            self.admitted -= 1
            self.metrics.queue.set(self.admitted)

    def _finish(self, job: Job, kind: str, data: Any) -> None:
        self._done(job)
        job.emit(kind, data)

    def _reject(self, job: Job, exc: Exception, stage: str) -> None:
        """A request's own failure: 400 for a SpavaError (bad input), 500 for a bug; the server goes on."""
        if isinstance(exc, SpavaError):
            self.metrics.requests.labels("400").inc()
            self._finish(job, "error", (400, str(exc)))
            return
        log.exception("request %s failed %s", job.id, stage)
        self.metrics.requests.labels("500").inc()
        self._finish(job, "error", (500, f"{type(exc).__name__}: {exc}"))

    def _loop(self) -> None:
        try:
            while not self.stopping.is_set():
                try:
                    job = self.jobs.get(timeout=self.cfg.heartbeat)
                except queue.Empty:
                    if self.comm is not None:  # idle: check that every rank is still there
                        self.comm.all_gather_object(_PING)
                    continue
                if job is None:
                    break
                try:
                    self._run(job)
                finally:
                    self._done(job)
            if self.comm is not None:
                self.comm.all_gather_object(_STOP)
        except DistributedError as exc:  # a rank died or hung: the whole server goes, naming it
            self.fatal = str(exc)
            fail(exc, 0, PROG)
            sys.stdout.flush()
            os._exit(2)
        except BaseException as exc:  # noqa: BLE001 - a bug outside a request: no server without its worker
            log.exception("the request worker failed")
            self.fatal = f"{type(exc).__name__}: {exc}"
            if self.comm is not None:
                self.comm.report_failure(exc)
            os._exit(1)

    def _run(self, job: Job) -> None:
        req = job.request
        if job.cancelled.is_set():
            self.metrics.requests.labels("cancelled").inc()
            return
        started = time.perf_counter()
        try:
            prepared = self.engine.prepare(req.video, req.question)
            backend = self.engine.backend(prepared, rank_threads=self.comm is None)
        except DistributedError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bad or failing request must not take the server down
            self._reject(job, exc, "while preparing")
            return
        state = {"text": "", "sent": 0, "finish": None, "first": None}
        deadline = time.monotonic() + self.cfg.request_timeout

        def on_token(tokens: list[int]) -> bool:
            if state["first"] is None:
                state["first"] = time.perf_counter()
                self.metrics.ttft.observe(state["first"] - started)
            if state["finish"] is not None:
                return False
            text = self.engine.decode_text(tokens)
            for s in req.stop:
                at = text.find(s)
                if at >= 0:
                    text, state["finish"] = text[:at], "stop"
            # Hold back a tail that may still become a stop string or a multi-byte character.
            hold = max((len(s) - 1 for s in req.stop), default=0)
            safe = len(text) if state["finish"] else max(state["sent"], len(text) - hold)
            if not state["finish"]:  # an incomplete UTF-8 character decodes as U+FFFD until complete
                safe = min(safe, len(text.rstrip("\ufffd")))
            if safe > state["sent"]:
                job.emit("delta", text[state["sent"]:safe])
                state["sent"] = safe
            state["text"] = text
            if job.cancelled.is_set() or time.monotonic() > deadline:
                state["finish"] = state["finish"] or "cancelled"
            return state["finish"] is None

        request = {"video": req.video, "question": req.question, "sampling": req.sampling.__dict__}
        try:
            if self.comm is None:
                result = self._run_emulated(prepared, backend, req.sampling, on_token)
            else:
                result = self._run_dist(prepared, backend, req.sampling, on_token, request)
        except DistributedError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bad or failing request must not take the server down
            self._reject(job, exc, "while running")
            return
        tokens = result.tokens
        text = state["text"]
        if state["sent"] < len(text):
            job.emit("delta", text[state["sent"]:])
        finish = state["finish"] or ("stop" if tokens and tokens[-1] in self.engine.eos else "length")
        t = result.timing
        if t.decode_tokens_per_s > 0:
            self.metrics.decode.observe(t.decode_tokens_per_s)
        self.metrics.tokens.inc(len(tokens))
        self.metrics.requests.labels("cancelled" if finish == "cancelled" else "200").inc()
        self._finish(job, "done", {"finish_reason": "stop" if finish == "cancelled" else finish, "tokens": tokens,
                          "plan": prepared.plan.hash[:16],
                          "prompt_tokens": self.engine.prompt_tokens(prepared), "completion_tokens": len(tokens),
                          "text": text})

    def _run_emulated(self, prepared: Any, backend: Any, sampling: Sampling, on_token: Any) -> Any:
        from .runtime.comm_emulated import EmulatedWorld

        world = EmulatedWorld.for_plan(prepared.plan, timeout_s=self.cfg.timeout)
        results = world.run(lambda rank: self.engine.generate(prepared, world.comm(rank), backend, sampling,
                                                              on_token if rank == 0 else _always))
        return results[0]

    def _run_dist(self, prepared: Any, backend: Any, sampling: Sampling, on_token: Any, request: dict) -> Any:
        self.comm.all_gather_object(request)
        agree(self.comm, None)  # the other ranks prepare the same request; one failing fails it
        return self.engine.generate(prepared, self.comm, backend, sampling, on_token)


def _always(tokens: list[int]) -> bool:
    return True


def follower_loop(engine: Session, comm: Any) -> None:
    """Ranks other than 0: wait for rank 0's next request (or ping), run it, repeat until stop.

    Ctrl-C / SIGTERM (torchrun forwards them to every worker) are left to rank 0: its server shuts
    down and sends stop, so the ranks leave together; if rank 0 is gone instead, the next
    collective fails and this rank exits naming it."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    while True:
        msg = comm.all_gather_object(None)[0]
        if msg == _STOP:
            return
        if msg == _PING:
            continue
        error: SpavaError | None = None
        prepared = backend = None
        try:
            prepared = engine.prepare(msg["video"], msg["question"])
            backend = engine.backend(prepared)
        except DistributedError:
            raise
        except SpavaError as exc:
            error = exc
        try:
            agree(comm, error)
        except DistributedError:
            raise
        except SpavaError:
            continue  # rank 0 answers the client with the error; wait for the next request
        try:
            engine.generate(prepared, comm, backend, Sampling(**msg["sampling"]), _always)
        except DistributedError:
            raise
        except SpavaError as exc:  # e.g. out of memory on this rank: the peers see the collective fail
            comm.report_failure(exc)
            raise DistributedError(f"rank {comm.rank}: {exc}", setting="runtime") from None


# -- the HTTP app ---------------------------------------------------------------------------------------
def build_app(worker: Worker, model_name: str) -> Any:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from .run_config import MAX_NEW_TOKENS

    app = FastAPI(title="spava-serve")
    metrics = worker.metrics

    def error(status: int, message: str, kind: str = "invalid_request_error") -> Any:
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)

    @app.get("/health")
    async def health() -> Any:
        if worker.fatal is not None:
            return error(503, worker.fatal, "server_error")
        return {"status": "ok", "ranks": worker.engine.world_size, "queue": worker.admitted}

    @app.get("/v1/models")
    async def models() -> Any:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "spava-plan"}]}

    @app.get("/metrics")
    async def prometheus() -> Any:
        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat(http: Request) -> Any:
        try:
            body = json.loads(await http.body())
        except (ValueError, UnicodeDecodeError):
            metrics.requests.labels("400").inc()
            return error(400, "the body is not valid JSON")
        try:
            req = parse_chat(body, MAX_NEW_TOKENS)
        except InputError as exc:
            metrics.requests.labels("400").inc()
            return error(400, str(exc))
        job = Job(req, asyncio.get_running_loop(), asyncio.Queue())
        if not worker.admit(job):
            metrics.requests.labels("429").inc()
            return error(429, f"the server is busy ({worker.cfg.queue_size} requests queued); retry later",
                         "rate_limit_error")
        if req.stream:
            return StreamingResponse(_sse(job, model_name), media_type="text/event-stream")
        try:
            text_parts: list[str] = []
            while True:
                kind, data = await job.events.get()
                if kind == "delta":
                    text_parts.append(data)
                elif kind == "error":
                    return error(*data)
                else:
                    break
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        # system_fingerprint: the plan that answered (OpenAI's field for "the backend configuration").
        return {"id": job.id, "object": "chat.completion", "created": int(job.created), "model": model_name,
                "system_fingerprint": data["plan"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text_parts)},
                             "finish_reason": data["finish_reason"]}],
                "usage": {"prompt_tokens": data["prompt_tokens"], "completion_tokens": data["completion_tokens"],
                          "total_tokens": data["prompt_tokens"] + data["completion_tokens"]}}

    return app


async def _sse(job: Job, model_name: str) -> Any:
    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None, plan: str | None = None) -> str:
        data: dict = {"id": job.id, "object": "chat.completion.chunk", "created": int(job.created),
                      "model": model_name, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if plan is not None:
            data["system_fingerprint"] = plan
        if usage is not None:
            data["usage"] = usage
        return f"data: {json.dumps(data)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, data = await job.events.get()
            if kind == "delta":
                yield chunk({"content": data})
            elif kind == "error":
                yield f"data: {json.dumps({'error': {'message': data[1], 'code': data[0]}})}\n\n"
                break
            else:
                usage = {"prompt_tokens": data["prompt_tokens"], "completion_tokens": data["completion_tokens"],
                         "total_tokens": data["prompt_tokens"] + data["completion_tokens"]}
                yield chunk({}, data["finish_reason"], usage, data["plan"])
                break
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or we are done): a running request stops after this token
        job.cancelled.set()


# -- process entry -------------------------------------------------------------------------------------
def serve(cfg: Any) -> int:
    """Load the model on every rank; rank 0 serves HTTP, the others follow. Returns the exit code."""
    mode = launch_mode(cfg.comm)
    comm = None
    rank = 0
    if mode == "dist":
        from .runtime.comm_dist import TorchDistComm

        comm = TorchDistComm.from_env(timeout_s=cfg.timeout)
        rank = comm.rank
        world = comm.world_size
        local = int(os.environ.get("LOCAL_RANK", rank))
    else:
        world, local = int(cfg.gpus) if not cfg.plan else _plan_world(cfg.plan), None
    if rank == 0:
        _check_port(cfg.host, cfg.port)  # before minutes of model loading
    try:
        error: SpavaError | None = None
        engine = None
        try:
            engine = Session(cfg, world, local)
        except SpavaError as exc:
            error = exc
        if comm is not None:
            agree(comm, error)
        elif error is not None:
            raise error
        assert engine is not None
        if rank != 0:
            follower_loop(engine, comm)
            comm.close()
            return 0
        return _serve_http(engine, cfg, comm)
    except SpavaError as exc:
        code = fail(exc, rank if comm is not None else None, PROG)
        if comm is not None:  # leave without tearing the group down (see run.run_distributed)
            comm.report_failure(exc)
            sys.stdout.flush()
            os._exit(code)
        return code


def _check_port(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(address)
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", setting="port") from None


def _plan_world(path: str) -> int:
    from .plan_load import load_plan

    return load_plan(path).world_size


def _serve_http(engine: Session, cfg: Any, comm: Any) -> int:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise InputError(f"the HTTP side is not installed ({exc.name}); pip install 'spava-plan[serve]'",
                         setting="serve") from None

    metrics = Metrics()
    worker = Worker(engine, cfg, comm, metrics)
    name = cfg.served_model_name or engine.base.model.name
    app = build_app(worker, name)
    worker.thread.start()
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    log.info("serving %s on http://%s:%d (%d ranks, %s)", name, cfg.host, cfg.port, engine.world_size,
             comm.label if comm is not None else "emulated in one process")
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down for: a normal stop
        log.info("stopped")
    except SystemExit:  # uvicorn exits when it cannot bind
        raise InputError(f"could not listen on {cfg.host}:{cfg.port} (in use, or not an address of this host)",
                         setting="port") from None
    finally:
        worker.stopping.set()
        worker.jobs.put(None)
        worker.thread.join(timeout=cfg.timeout)
    if not server.started:
        raise InputError(f"could not listen on {cfg.host}:{cfg.port} (in use?)", setting="port")
    if comm is not None:
        comm.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return hydra_main("serve", lambda cfg, out_dir, rank: serve(cfg), PROG, argv)


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console_main()
