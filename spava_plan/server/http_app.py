"""spava-serve's HTTP side: the FastAPI app, its guards, and the uvicorn settings that bound it.

    POST /v1/chat/completions   application/json only (415), at most max_body_bytes read (413)
                                within read_timeout (408), typed (serve_api: 400 naming the field),
                                ``model`` the served one (404), then queued (429 when full) and
                                answered within request_timeout (504); streaming as SSE
    GET  /v1/models, /metrics   (with api_key: ``Authorization: Bearer <key>``, else 401)
    GET  /health                open; 503 {"status": "warming up"} until the plans are warm,
                                503 {"status": "shutting down"} once a signal arrived

Bounded by construction: uvicorn's limit_concurrency (max_connections: more get 503),
timeout_keep_alive, h11's header size cap, and ``GuardedH11`` below for the one bound uvicorn has
no setting for (a connection whose request headers do not arrive within header_timeout is closed:
300 half-sent requests cannot pin the server). The body's own read deadline is read_timeout.
Every response names the method and the plan that served it: ``system_fingerprint`` (plan hash),
``usage.method`` and the ``X-Spava-Method`` header.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import Any

from ..entry.run_config import MAX_NEW_TOKENS
from .api import RequestError, parse_body
from .jobs import Job

log = logging.getLogger("spava_plan.server.serve")

try:  # FastAPI resolves the handler's annotations by name in this module's globals
    from fastapi import Request
except ImportError:  # the serve extra is missing: serve._serve_http says so in one line
    Request = Any  # type: ignore[misc,assignment]


def error_body(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
          headers: dict | None = None) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(error_body(status, message, kind, param), status_code=status, headers=headers)


class BearerAuth:
    """ASGI middleware: every path but /health needs ``Authorization: Bearer <key>`` (compared in
    constant time); else 401, counted as a refusal."""

    def __init__(self, app: Any, key: str, refused: Any):
        self.app, self.key, self.refused = app, key.encode(), refused

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") == "/health" or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                given = value
        scheme, _, token = given.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        self.refused("unauthorized")
        body = json.dumps(error_body(401, "a valid API key is required: Authorization: Bearer <api_key>",
                                     "authentication_error")).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def guarded_h11(header_timeout: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose request headers have not all arrived
    within ``header_timeout`` seconds of it opening or of its previous response (slowloris)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11(H11Protocol):
        _header_timer: Any = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete):
                self.transport.close()  # nothing is running for it: drop it without a response

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:
                self._disarm()  # the headers are in; the body has read_timeout

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11


def uvicorn_config(app: Any, cfg: Any) -> Any:
    import uvicorn

    return uvicorn.Config(app, host=cfg.host, port=cfg.port, log_config=None, access_log=False,
                          http=guarded_h11(cfg.header_timeout), limit_concurrency=cfg.max_connections,
                          timeout_keep_alive=cfg.keep_alive_timeout, h11_max_incomplete_event_size=64 * 1024,
                          timeout_graceful_shutdown=max(1, int(cfg.timeout)))


async def _read_body(http: Any, limit: int, timeout: float) -> bytes:
    """The body, at most ``limit`` bytes (RequestError 413 past it, while reading) within
    ``timeout`` seconds (408)."""
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(f"the body is larger than max_body_bytes ({limit} bytes)", "max_body_bytes", 413)
    chunks, size = [], 0

    async def read() -> None:
        nonlocal size
        async for chunk in http.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(f"the body is larger than max_body_bytes ({limit} bytes)", "max_body_bytes", 413)
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise RequestError(f"the body did not arrive within read_timeout ({timeout:g} s)", "read_timeout",
                           408) from None
    return b"".join(chunks)


def _usage(data: dict) -> dict:
    return {"prompt_tokens": data["prompt_tokens"], "completion_tokens": data["completion_tokens"],
            "total_tokens": data["prompt_tokens"] + data["completion_tokens"], "method": data["method"]}


def build_app(worker: Any, model_name: str, cfg: Any) -> Any:
    from fastapi import FastAPI
    from fastapi.responses import PlainTextResponse, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    app = FastAPI(title="spava-serve", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = worker.metrics

    def refuse(status: int, reason: str, message: str, kind: str = "invalid_request_error",
               param: str | None = None) -> Any:
        metrics.refused(reason)
        metrics.requests.labels(str(status)).inc()
        return error(status, message, kind, param)

    def _status(code: int, status: str) -> Any:
        from fastapi.responses import JSONResponse

        return JSONResponse({"status": status}, status_code=code)

    @app.get("/health")
    async def health() -> Any:
        if worker.fatal is not None:
            return error(503, worker.fatal, "server_error")
        if worker.draining:
            return _status(503, "shutting down")
        if not worker.ready.is_set():
            return _status(503, "warming up")
        return {"status": "ok", "ranks": worker.engine.world_size, "queue": worker.admitted,
                "warm_plans": worker.warm}

    @app.get("/v1/models")
    async def models() -> Any:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "spava-plan"}]}

    @app.get("/metrics")
    async def prometheus() -> Any:
        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat(http: Request) -> Any:
        if worker.draining:
            return refuse(503, "shutting_down", "the server is shutting down", "server_error")
        if not worker.ready.is_set():
            return refuse(503, "warming_up", "the server is warming up; retry when /health says ok", "server_error")
        media_type = http.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type != "application/json":
            return refuse(415, "content_type", "the body must be application/json")
        try:
            raw = await _read_body(http, cfg.max_body_bytes, cfg.read_timeout)
            req = parse_body(raw, MAX_NEW_TOKENS, model_name)
        except RequestError as exc:
            reason = {413: "body_too_large", 408: "body_timeout", 404: "model_not_found"}.get(exc.status, "bad_request")
            kind = "not_found_error" if exc.status == 404 else "invalid_request_error"
            return refuse(exc.status, reason, str(exc), kind, param=exc.field)
        job = Job(req, asyncio.get_running_loop(), asyncio.Queue(), deadline=time.monotonic() + cfg.request_timeout)
        if not worker.admit(job):
            return refuse(429, "busy", f"the server is busy ({cfg.queue_size} requests queued); retry later",
                          "rate_limit_error")
        watcher = asyncio.create_task(_watch_disconnect(http, job))
        try:
            kind, data = await job.next_event()
            if kind == "error":
                return error(*data)
            headers = {"X-Spava-Method": data["method"], "X-Spava-Plan": data["plan"]}
            if req.stream:
                watcher.cancel()  # StreamingResponse listens for the disconnect itself
                return StreamingResponse(_sse(job, model_name), media_type="text/event-stream", headers=headers)
            text_parts: list[str] = []
            while True:
                kind, data = await job.next_event()
                if kind == "delta":
                    text_parts.append(data)
                elif kind == "error":
                    return error(*data)
                else:
                    break
        finally:
            watcher.cancel()
        # system_fingerprint: the plan that answered (OpenAI's field for "the backend configuration").
        return _json({"id": job.id, "object": "chat.completion", "created": int(job.created), "model": model_name,
                      "system_fingerprint": data["plan"],
                      "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text_parts)},
                                   "finish_reason": data["finish_reason"]}],
                      "usage": _usage(data), "timings": data.get("timings", {})}, headers)

    def _json(body: dict, headers: dict) -> Any:
        from fastapi.responses import JSONResponse

        return JSONResponse(body, headers=headers)

    if cfg.allowed_origins:  # CORS only for the origins the operator listed (none: no CORS headers at all)
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"])
    if cfg.api_key:
        app.add_middleware(BearerAuth, key=cfg.api_key, refused=metrics.refused)  # inside CORS: preflights pass
    return app


async def _watch_disconnect(http: Any, job: Any) -> None:
    """A non-streaming client that hangs up cancels its request (the body is read: the next
    message uvicorn delivers is the disconnect)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            if not job.finished:
                log.info("client of %s disconnected; cancelling it", job.id)
                job.cancel("disconnected")
            return


async def _sse(job: Any, model_name: str) -> Any:
    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None, plan: str | None = None,
              timings: dict | None = None) -> str:
        data: dict = {"id": job.id, "object": "chat.completion.chunk", "created": int(job.created),
                      "model": model_name, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if plan is not None:
            data["system_fingerprint"] = plan
        if usage is not None:
            data["usage"] = usage
        if timings:  # the request's stages in ms (a spava extension, like vLLM's extra fields)
            data["timings"] = timings
        return f"data: {json.dumps(data)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, data = await job.next_event()
            if kind == "delta":
                yield chunk({"content": data})
            elif kind == "error":
                yield f"data: {json.dumps(error_body(data[0], data[1]))}\n\n"
                break
            else:
                yield chunk({}, data["finish_reason"], _usage(data), data["plan"], data.get("timings"))
                break
        yield "data: [DONE]\n\n"
    except asyncio.CancelledError:  # the client went away: one line, not a traceback
        if not job.finished:
            log.info("client of streaming %s disconnected; cancelling it", job.id)
        raise
    finally:  # a running request stops after its current token
        job.cancel("disconnected")
