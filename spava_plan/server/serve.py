"""`spava-serve`: an OpenAI-compatible HTTP server answering questions about videos under plans.

    torchrun --nproc-per-node W -m spava_plan.server.serve model.checkpoint=PATH gpus=W port=8000   # NCCL / gloo
    spava-serve model=tiny model.init=random gpus=2 port=8123      # W ranks emulated in one process

The model is loaded once per rank. Rank 0 serves (FastAPI + uvicorn, like vLLM and SGLang; the
HTTP side, its guards and limits are spava_plan/server/http_app.py, the typed request spava_plan/server/api.py, the media
policy media.py; docs/serving.md is the operator's page):

    POST /v1/chat/completions  one user message with a {"type": "video_url", "video_url": {"url": ...}} part
                               (data:video/...;base64, http(s) of allowed_media_domains, file:// under
                               allowed_local_media_path) and text; max_tokens, temperature, top_p, seed,
                               stop, stream (SSE)
    GET  /v1/models, /health, /metrics (Prometheus: requests, refusals by reason, TTFT, decode tokens/s,
                               queue depth)

Two worker threads on rank 0 (torch stays off the event loop), so the GPUs do not wait for the next
request's CPU work: the prefetch thread takes admitted requests in order and fetches the video (a
private temp file), checks its container metadata against max_frames / max_pixels (before any
decoding), decodes, tokenizes and picks the plan (Session.prepare); up to ``prefetch`` prepared
requests wait for the GPU thread, which runs them one at a time across the ranks. Every admitted
request counts in the queue bound (queue_size + 1: HTTP 429 beyond), prepared ones included, so
their memory is bounded too. A bad request (refused URL, unreadable video, too long a question, no
plan) is a 400 from rank 0 that never reaches the other ranks.

Under torchrun, rank 0 sends each request's video bytes to the other ranks with the request
(all_gather_object), and each writes them to its own private temp file and prepares the same way:
one fetch, so every rank sees identical bytes (a URL fetched W times may answer differently, and
ranks that prepared different inputs would hang in their collectives), the media policy runs in
one place, and ranks on other nodes need neither network access to the media host nor the
allowed folder. The cost is the clip's bytes over the process group once per request (padded to
the largest object by all_gather_object), small next to the frames' activations.

Between requests rank 0 pings the others every ``heartbeat`` seconds, so a rank that dies or hangs
makes every rank exit with one line naming it within the process-group ``timeout``. A client that
disconnects (streaming or not) or a request past ``request_timeout`` (HTTP 504) is cancelled at
the worker's next stage boundary (fetch chunk, each decoded frame of every decoder, prepare, each token).

Start: /health answers 503 {"status": "warming up"} until the plans it serves are loaded, their
backends built and run once (spava_plan/server/warmup.py). Shutdown: SIGTERM or SIGINT makes rank 0 stop
accepting (the listening socket closes; /health and new requests on open connections get 503),
finish the requests it admitted (a stream completes), send stop to the other ranks, and every rank
exits 0 within ``timeout`` (the other ranks ignore the signals torchrun forwards and leave on stop).

The HTTP side is the optional extra ``pip install .[serve]``.
"""
from __future__ import annotations

import gc
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from typing import Any, Sequence

from ..entry import process_env  # noqa: F401, I001 - first: the environment torch's OpenMP reads as it loads

import torch  # noqa: E402

from ..errors import DistributedError, InputError, SpavaError  # noqa: E402
from ..entry.launching import agree, fail, hydra_main, launch_mode
from .media import MediaError, MediaPolicy, fetch_media, media_from_bytes
from ..plan_load import load_plan
from ..runtime.comm.dist import TorchDistComm
from ..runtime.comm.emulated import EmulatedWorld
from ..runtime.video_io import DecodeCancelled
from .http_app import build_app, uvicorn_config
from .jobs import Job, Metrics
from .warmup import plan_of, synthetic_request, warm_keys
from ..entry.session import Sampling, Session
from ..video_meta import probe_clip

log = logging.getLogger("spava_plan.server.serve")
PROG = "spava-serve"
_PING, _STOP = "ping", "stop"


def method_name(plan: Any) -> str:
    method = plan.method
    kind = getattr(method, "kind", None) or getattr(method, "name", None) or method
    return str(getattr(kind, "value", kind))


def check_clip(path: str, cfg: Any) -> None:
    """The clip's container metadata against max_pixels / max_frames, before anything is decoded."""
    try:
        info = probe_clip(path, setting="video_url")
    except InputError as exc:
        text = str(exc).replace(repr(path), "the file").replace(path, "the file")  # our temp file: not the client's
        raise MediaError(text, "video_url.url", "unreadable_video") from None
    if info.height * info.width > cfg.max_pixels:
        raise MediaError(f"the video's frames are {info.width}x{info.height} ({info.height * info.width} pixels), "
                         f"more than max_pixels ({cfg.max_pixels})", "max_pixels", "too_many_pixels")
    if info.total_frames > cfg.max_frames:
        raise MediaError(f"the video has {info.total_frames} frames, more than max_frames ({cfg.max_frames})",
                         "max_frames", "too_many_frames")


class Worker:
    """Rank 0's request loop: a prefetch thread prepares, a GPU thread runs one request at a time
    over all ranks."""

    def __init__(self, engine: Session, cfg: Any, comm: Any, metrics: Metrics):
        self.engine, self.cfg, self.comm, self.metrics = engine, cfg, comm, metrics
        self.policy = MediaPolicy.from_config(cfg)
        self.jobs: queue.Queue = queue.Queue()  # admitted, not prepared (bounded by admit())
        self.prepared: queue.Queue = queue.Queue(maxsize=max(1, cfg.prefetch))
        self.admitted = 0
        self.lock = threading.Lock()
        self.fatal: str | None = None
        self.draining = False  # a signal arrived: no new requests
        self.ready = threading.Event()  # the plans are warm
        self.warm = 0
        self.thread = threading.Thread(target=self._loop, name="spava-gpu", daemon=True)
        self.prefetcher = (threading.Thread(target=self._prefetch_loop, name="spava-prefetch", daemon=True)
                           if cfg.prefetch > 0 else None)

    def start(self) -> None:
        self.thread.start()
        if self.prefetcher is not None:
            self.prefetcher.start()

    def stop(self) -> None:
        """Finish what was admitted, then stop the other ranks (called once the HTTP side is done)."""
        self.jobs.put(None)
        self.thread.join(timeout=self.cfg.timeout)

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
            self.metrics.refused(getattr(exc, "reason", "bad_input"))
            self._finish(job, "error", (400, str(exc)))
            return
        log.exception("request %s failed %s", job.id, stage)
        self.metrics.requests.labels("500").inc()
        self._finish(job, "error", (500, f"{type(exc).__name__}: {exc}"))

    def _abandon(self, job: Job) -> None:
        """A job cancelled before or between stages (its client left, or it timed out: the HTTP
        side answered 504 already)."""
        status = "504" if job.cancel_reason == "timeout" else "cancelled"
        self.metrics.requests.labels(status).inc()
        self._finish(job, "error", (504, "the request took longer than request_timeout; it was cancelled"))

    # -- the prefetch thread ------------------------------------------------------------------
    def _prefetch_loop(self) -> None:
        while True:
            job = self.jobs.get()
            item = None if job is None else self._prepare(job)
            if job is None or item is not None:
                self.prepared.put(item)  # blocks while `prefetch` prepared requests wait
            if job is None:
                return

    def _prepare(self, job: Job) -> tuple | None:
        """Fetch, check, decode and preprocess one request; None when it was answered already."""
        req = job.request
        if job.stopped():
            self._abandon(job)
            return None
        started = time.perf_counter()
        media = None
        try:
            media = fetch_media(req.video_url, self.policy, job.stopped)
            fetched = time.perf_counter()
            check_clip(media.path, self.cfg)
            if job.stopped():
                raise _Stopped
            prepared = self.engine.prepare(media.path, req.question, stop=job.stopped)
        except (_Stopped, DecodeCancelled):  # cancelled between stages, or between two decoded frames
            media.close()
            self._abandon(job)
            return None
        except Exception as exc:  # noqa: BLE001 - a bad or failing request must not take the server down
            if media is not None:
                media.close()
            if job.stopped():
                self._abandon(job)
            else:
                self._reject(job, exc, "while preparing")
            return None
        now = time.perf_counter()
        self.metrics.prepare.observe(now - started)
        job.stages = {"fetch": fetched - started, "decode": prepared.decode_s,
                      "preprocess": max(0.0, now - fetched - prepared.decode_s)}  # metadata check, processor, plan
        job.prepared_at = now
        job.emit("plan", {"plan": prepared.plan.hash[:16], "method": method_name(prepared.plan)})
        return job, prepared, media, started

    # -- the GPU thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._warmup()
            self.ready.set()
            source = self.prepared if self.prefetcher is not None else self.jobs
            while True:
                try:
                    item = source.get(timeout=self.cfg.heartbeat)
                except queue.Empty:
                    if self.comm is not None:  # idle: check that every rank is still there
                        self.comm.all_gather_object(_PING)
                    continue
                if item is None:
                    break
                if self.prefetcher is None:
                    item = self._prepare(item)
                    if item is None:
                        continue
                job, prepared, media, started = item
                try:
                    self._run(job, prepared, media, started)
                finally:
                    media.close()
                    self._done(job)
                    del prepared, item
                    self._free()
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

    def _free(self) -> None:
        """Give a finished request's memory back (its activations, KV cache and frames)."""
        gc.collect()
        if getattr(self.engine.device, "type", "cpu") == "cuda":
            torch.cuda.empty_cache()

    def _warmup(self) -> None:
        keys = warm_keys(self.engine, self.cfg.warmup_plans)
        if self.comm is not None:
            self.comm.all_gather_object({"warmup": keys})
        for key in keys:
            started = time.perf_counter()
            try:
                warm_one(self.engine, plan_of(self.engine, key), self.comm)
            except DistributedError:
                raise
            except SpavaError as exc:  # a family plan this world cannot run: requests will not get it either
                log.warning("not warmed: %s (%s)", key, exc)
                continue
            self.warm += 1
            log.info("warm: %s in %.1f s", key, time.perf_counter() - started)

    def _run(self, job: Job, prepared: Any, media: Any, started: float) -> None:
        req = job.request
        if job.stopped():
            self._abandon(job)
            return
        try:
            backend = self.engine.backend(prepared, rank_threads=self.comm is None)
        except Exception as exc:  # noqa: BLE001 - a bad or failing request must not take the server down
            self._reject(job, exc, "while building its backend")
            return
        state = {"text": "", "sent": 0, "finish": None, "first": None}
        run_started = time.perf_counter()

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
            if job.stopped():
                state["finish"] = state["finish"] or "cancelled"
            return state["finish"] is None

        self.peers_prepare_s = 0.0
        try:
            if self.comm is None:
                result = self._run_emulated(prepared, backend, req.sampling, on_token)
            else:
                request = {"video": media.read_bytes(), "question": req.question, "sampling": req.sampling.__dict__}
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
        done = time.perf_counter()
        # Per-request stages in ms (what a user waits for, as benchmarks/serve_load.py reads them):
        # queue = prepared, waiting for the GPUs; first_token = request admitted -> first token.
        queued = run_started - (job.prepared_at if job.prepared_at is not None else run_started)
        # Under torchrun the other ranks decode and preprocess their frames after rank 0 sent them the
        # request (peers_prepare, part of the preprocessing a user waits for; not GPU time).
        peers = {"peers_prepare": self.peers_prepare_s} if self.comm is not None else {}
        stages = {**job.stages, **peers, "queue": queued,
                  "vision": t.vision_s, "prefill": t.prefill_s,
                  "first_token": (state["first"] or done) - started,
                  "generate": done - run_started - self.peers_prepare_s}
        timings = {f"{k}_ms": round(v * 1e3, 3) for k, v in stages.items()}
        if t.decode_tokens_per_s > 0:
            self.metrics.decode.observe(t.decode_tokens_per_s)
        self.metrics.tokens.inc(len(tokens))
        if finish == "cancelled":
            self._abandon(job) if job.cancel_reason == "timeout" else self.metrics.requests.labels("cancelled").inc()
        else:
            self.metrics.requests.labels("200").inc()
        self._finish(job, "done", {"finish_reason": "stop" if finish == "cancelled" else finish, "tokens": tokens,
                                   "plan": prepared.plan.hash[:16], "method": method_name(prepared.plan),
                                   "prompt_tokens": self.engine.prompt_tokens(prepared),
                                   "completion_tokens": len(tokens), "text": text, "timings": timings})

    def _run_emulated(self, prepared: Any, backend: Any, sampling: Sampling, on_token: Any) -> Any:
        return run_emulated(self.engine, prepared, backend, sampling, on_token, self.cfg.timeout)

    def _run_dist(self, prepared: Any, backend: Any, sampling: Sampling, on_token: Any, request: dict) -> Any:
        started = time.perf_counter()
        self.comm.all_gather_object(request)
        agree(self.comm, None)  # the other ranks prepare the same request; one failing fails it
        self.peers_prepare_s = time.perf_counter() - started  # their decode + processor, before any GPU work
        return self.engine.generate(prepared, self.comm, backend, sampling, on_token)


class _Stopped(Exception):
    """The job was cancelled between two stages of its preparation."""


def run_emulated(engine: Session, prepared: Any, backend: Any, sampling: Sampling, on_token: Any,
                 timeout: float) -> Any:
    world = EmulatedWorld.for_plan(prepared.plan, timeout_s=timeout)
    results = world.run(lambda rank: engine.generate(prepared, world.comm(rank), backend, sampling,
                                                     on_token if rank == 0 else _always))
    return results[0]


def warm_one(engine: Session, plan: Any, comm: Any) -> None:
    """One plan's backend built and run once for one token on every rank (serve_warmup)."""
    error: SpavaError | None = None
    prepared = backend = None
    try:
        prepared = synthetic_request(engine, plan)
        backend = engine.backend(prepared, rank_threads=comm is None)
    except DistributedError:
        raise
    except SpavaError as exc:
        error = exc
    if comm is None:
        if error is not None:
            raise error
        run_emulated(engine, prepared, backend, Sampling(max_tokens=1), _always, engine.cfg.timeout)
        return
    agree(comm, error)
    engine.generate(prepared, comm, backend, Sampling(max_tokens=1), _always)


def _always(tokens: list[int]) -> bool:
    return True


def follower_loop(engine: Session, comm: Any) -> None:
    """Ranks other than 0: wait for rank 0's next message (warm-up, request, ping), run it, repeat
    until stop.

    Ctrl-C / SIGTERM (torchrun forwards them to every worker) are left to rank 0: it finishes what
    it admitted and sends stop, so the ranks leave together; if rank 0 is gone instead, the next
    collective fails and this rank exits naming it."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    while True:
        msg = comm.all_gather_object(None)[0]
        if msg == _STOP:
            return
        if msg == _PING:
            continue
        if "warmup" in msg:
            for key in msg["warmup"]:
                try:
                    warm_one(engine, plan_of(engine, key), comm)
                except DistributedError:
                    raise
                except SpavaError:
                    continue  # rank 0 logs it and goes on
            continue
        error: SpavaError | None = None
        prepared = backend = None
        media = media_from_bytes(msg["video"], "rank 0")
        try:
            try:
                prepared = engine.prepare(media.path, msg["question"])
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
        finally:
            media.close()
            del prepared
            gc.collect()


# -- process entry -------------------------------------------------------------------------------------
def serve(cfg: Any) -> int:
    """Load the model on every rank; rank 0 serves HTTP, the others follow. Returns the exit code."""
    mode = launch_mode(cfg.comm)
    comm = None
    rank = 0
    if mode == "dist":
        comm = TorchDistComm.from_env(timeout_s=cfg.timeout)
        rank = comm.rank
        world = comm.world_size
        local = int(os.environ.get("LOCAL_RANK", rank))
    else:
        world, local = int(cfg.gpus) if not cfg.plan else _plan_world(cfg.plan), None
    if os.path.exists(cfg.plan_dir) and not os.path.isdir(cfg.plan_dir):
        return fail(InputError(f"must be a folder (a plan family), got the file {cfg.plan_dir!r}",
                                setting="plan_dir"), rank if comm is not None else None, PROG)
    if rank == 0:
        _check_port(cfg.host, cfg.port)  # before minutes of model loading
    try:
        error: SpavaError | None = None
        engine = None
        try:
            engine = Session(cfg, world, local, rank=rank if comm is not None else None)
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
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(address)
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", setting="port") from None


def _plan_world(path: str) -> int:
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
    app = build_app(worker, name, cfg)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not worker.draining:
                log.info("signal %d: finishing the requests in flight, then stopping", sig)
            worker.draining = True  # /health and requests on open connections: 503
            super().handle_exit(sig, frame)

    server = Server(uvicorn_config(app, cfg))
    # uvicorn re-raises the signal it stopped for once it is done; a handler of ours makes that a
    # no-op, so the process ends with its own exit code (0) instead of dying by the signal.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    worker.start()
    log.info("serving %s on http://%s:%d (%d ranks, %s; auth %s)", name, cfg.host, cfg.port, engine.world_size,
             comm.label if comm is not None else "emulated in one process", "on" if cfg.api_key else "off")
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind
        raise InputError(f"could not listen on {cfg.host}:{cfg.port} (in use, or not an address of this host)",
                         setting="port") from None
    finally:
        worker.draining = True
        worker.stop()
    if not server.started:
        raise InputError(f"could not listen on {cfg.host}:{cfg.port} (in use?)", setting="port")
    log.info("stopped")
    if comm is not None:
        comm.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return hydra_main("serve", lambda cfg, out_dir, rank: serve(cfg), PROG, argv)


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console_main()
