"""Chrome / Perfetto trace files (trace.json) of a per-rank timeline, predicted or measured.

One writer for both: the planner's predicted schedule (planner/timeline.py) and an emulated
run's measured timeline (spava_plan/critical_path.py via spava_plan.entry.run) become the same kind
of file, so both open side by side in https://ui.perfetto.dev or chrome://tracing. Pure Python,
no torch: it lives in the core, which planner and runtime may both import.

Format: the Trace Event Format's JSON object form, "X" (complete) events with microsecond ``ts``
and ``dur``; one process per rank (or group of ranks), one thread per lane (compute, comm), named
by "M" metadata events.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping


@dataclass(frozen=True)
class Span:
    """One bar of a timeline: ``process`` (e.g. "rank 3") x ``lane`` (e.g. "compute")."""

    process: str
    lane: str
    name: str
    start_us: float
    dur_us: float
    category: str = ""
    args: Mapping[str, Any] = field(default_factory=dict)


def chrome_trace(spans: Iterable[Span], metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The trace as a JSON-able dict; processes and lanes are numbered in first-seen order, so the
    same spans always give the same file."""
    pids: dict[str, int] = {}
    tids: dict[tuple[str, str], int] = {}
    events: list[dict[str, Any]] = []
    body: list[dict[str, Any]] = []
    for s in spans:
        if s.process not in pids:
            pid = pids[s.process] = len(pids)
            events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": s.process}})
            events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}})
        pid = pids[s.process]
        if (s.process, s.lane) not in tids:
            tid = tids[(s.process, s.lane)] = sum(1 for p, _ in tids if p == s.process)
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": s.lane}})
        event = {"ph": "X", "name": s.name, "cat": s.category or s.lane, "pid": pid, "tid": tids[(s.process, s.lane)],
                 "ts": round(float(s.start_us), 3), "dur": round(max(0.0, float(s.dur_us)), 3)}
        if s.args:
            event["args"] = dict(s.args)
        body.append(event)
    return {"traceEvents": events + body, "displayTimeUnit": "ms", "otherData": dict(metadata or {})}


def trace_json(spans: Iterable[Span], metadata: Mapping[str, Any] | None = None) -> str:
    return json.dumps(chrome_trace(spans, metadata), separators=(",", ":")) + "\n"


def write_trace(path: str | Path, spans: Iterable[Span], metadata: Mapping[str, Any] | None = None) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(trace_json(spans, metadata))
    tmp.replace(path)
    return path


def rank_groups(world: int, most: int) -> list[tuple[int, int]]:
    """[start, stop) rank ranges: one per rank up to ``most`` ranks, else ``most`` contiguous,
    near-equal groups (a 1024-rank timeline is shown as ``most`` lanes, each its slowest rank)."""
    if world <= most:
        return [(r, r + 1) for r in range(world)]
    base, extra = divmod(world, most)
    out, start = [], 0
    for g in range(most):
        stop = start + base + (1 if g < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def group_label(start: int, stop: int, shown: int | None = None) -> str:
    if stop - start == 1:
        return f"rank {start}"
    return f"ranks {start}-{stop - 1}" + ("" if shown is None else f" (slowest: {shown})")


def emulated_spans(spans: Iterable[tuple[int, str, str, float, float]], world: int, most: int = 64) -> list[Span]:
    """Spans of an emulated run's measured timeline (spava_plan.critical_path.spans:
    (rank, lane, name, start_us, end_us)); with more than ``most`` ranks, each group of ranks
    is shown by its slowest rank."""
    by_rank: dict[int, list[tuple[int, str, str, float, float]]] = {}
    for s in spans:
        by_rank.setdefault(s[0], []).append(s)
    finish = {r: max((s[4] for s in v), default=0.0) for r, v in by_rank.items()}
    out = []
    for a, b in rank_groups(world, most):
        shown = max(range(a, b), key=lambda r: (finish.get(r, 0.0), -r))
        label = group_label(a, b, shown)
        for rank, lane, name, start, end in by_rank.get(shown, []):
            out.append(Span(label, lane, name, start, end - start, lane))
    return out


def write_emulated_trace(plan_path: str | Path, timing: Any) -> str:
    """Write an emulated run's measured timeline (a runtime EmulatedTiming) as trace_emulated.json
    beside the plan (where its predicted trace.json is), else in the working directory; returns
    the line to print."""
    spans = emulated_spans(timing.spans, len(timing.rank_compute_us))
    meta = {"source": f"{timing.label}: measured compute, communication charged from the plan's topology",
            "device": timing.device, "repeats": timing.repeats, "units": "microseconds"}
    for folder in (Path(plan_path).parent, Path.cwd()):
        try:
            path = write_trace(folder / "trace_emulated.json", spans, meta)
        except OSError:
            continue
        return f"trace of the emulated run: {path} (open it beside the plan's trace.json in https://ui.perfetto.dev)"
    return "trace of the emulated run: not written (neither the plan's directory nor the working directory is writable)"
