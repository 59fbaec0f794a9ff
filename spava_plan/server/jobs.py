"""A request between spava-serve's HTTP side (event loop) and its worker threads, and the metrics.

A Job carries its deadline (request_timeout from admission): the HTTP side stops waiting at the
deadline and answers 504, and the worker checks ``job.stopped()`` between its stages (fetch,
probe, each decoded frame of the video's decoders, prepare, each generated token), so the work behind a timed-out or abandoned request ends at
the next stage boundary instead of running on.
"""
from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .api import ChatRequest


@dataclass
class Job:
    request: ChatRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    deadline: float  # time.monotonic() by which it must be answered
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    created: float = field(default_factory=time.time)
    cancelled: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = ""
    released: bool = False  # its place in the queue is free again
    finished: bool = False  # its last event was sent
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage before the GPUs (fetch, decode, ...)
    prepared_at: float | None = None  # time.perf_counter() when it was ready for the GPUs

    def emit(self, kind: str, data: Any = None) -> None:
        if kind in ("done", "error"):
            self.finished = True
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, data))
        except RuntimeError:  # the event loop is closed (server stopped): nobody is waiting any more
            pass

    def cancel(self, reason: str) -> None:
        if not self.cancelled.is_set():
            self.cancel_reason = reason
            self.cancelled.set()

    def stopped(self) -> bool:
        """The worker's check between stages: cancelled, or past the deadline."""
        if not self.cancelled.is_set() and time.monotonic() > self.deadline:
            self.cancel("timeout")
        return self.cancelled.is_set()

    async def next_event(self) -> tuple[str, Any]:
        """The next event, or a 504 error at the deadline (the job is cancelled then)."""
        try:
            return await asyncio.wait_for(self.events.get(), max(0.0, self.deadline - time.monotonic()))
        except asyncio.TimeoutError:
            self.cancel("timeout")
            self.finished = True
            return "error", (504, "the request took longer than request_timeout; it was cancelled")


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("spava_requests", "Chat completion requests by outcome", ["status"],
                                registry=self.registry)
        self.refusals = Counter("spava_refusals", "Requests refused, by reason (auth, limits, media policy...)",
                                ["reason"], registry=self.registry)
        self.ttft = Histogram("spava_time_to_first_token_seconds", "From admission to the first token",
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=self.registry)
        self.decode = Histogram("spava_decode_tokens_per_second", "Decode speed of a request",
                                buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000), registry=self.registry)
        self.prepare = Histogram("spava_prepare_seconds", "Fetch, probe, decode and preprocessing of a request",
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=self.registry)
        self.queue = Gauge("spava_queue_depth", "Requests admitted and not finished", registry=self.registry)
        self.tokens = Counter("spava_generated_tokens", "Completion tokens", registry=self.registry)

    def refused(self, reason: str) -> None:
        self.refusals.labels(reason).inc()
