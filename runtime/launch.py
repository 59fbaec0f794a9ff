"""Run a function on W local processes joined in a torch.distributed group (gloo on CPU).

    outcomes = run_local_world(fn, 3, args=(plan_dict,), timeout_s=20)

``fn(comm, *args)`` runs in each spawned process with a ``TorchDistComm``; it must be a
module-level function (spawn pickles it by name). Results travel back through files (torch.save),
not through shared memory, so a rank that exits early cannot corrupt them. A rank that raises
reports its error to its peers (see runtime/comm/dist.py) before exiting; a rank still alive after the
join deadline is killed and reported as hung. Used by the tests and for small local runs; real
multi-GPU runs go through torchrun and ``TorchDistComm.from_env``.
"""
from __future__ import annotations

import datetime
import os
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .comm.dist import TorchDistComm, free_port


@dataclass(frozen=True)
class RankOutcome:
    rank: int
    ok: bool
    value: Any = None
    error_type: str = ""  # class name of the exception the rank raised
    error: str = ""  # its one-line message
    exitcode: int | None = None
    elapsed_s: float = 0.0  # from launch until the rank finished (or was found dead)


def _worker(rank: int, world: int, port: int, backend: str, timeout_s: float, threads: int, out_dir: str,
            fn: Callable[..., Any], args: Sequence[Any]) -> None:
    torch.set_num_threads(threads)  # W processes share the host's cores; one thread keeps runs reproducible
    path = os.path.join(out_dir, f"rank{rank}.pt")
    comm = None
    try:
        comm = TorchDistComm.init(rank, world, master_port=port, backend=backend, timeout_s=timeout_s,
                                  host_store=False)
        value = fn(comm, *args)
        record = {"ok": True, "value": value}
    except BaseException as exc:  # noqa: BLE001 - every failure is reported to the parent
        if comm is not None:
            comm.report_failure(exc)
        record = {"ok": False, "error_type": type(exc).__name__, "error": str(exc),
                  "traceback": traceback.format_exc()}
    torch.save(record, path + ".tmp")
    os.replace(path + ".tmp", path)
    if comm is not None and record["ok"]:
        comm.close()
    # Leave without running interpreter teardown: gloo's threads may still hold a dead peer's
    # socket, and a clean exit code is all the parent needs.
    os._exit(0 if record["ok"] else 1)


def run_local_world(fn: Callable[..., Any], world_size: int, *, args: Sequence[Any] = (), backend: str = "gloo",
                    timeout_s: float = 60.0, join_timeout_s: float | None = None, threads: int = 1) -> list[RankOutcome]:
    """Spawn ``world_size`` processes running ``fn(comm, *args)``; one RankOutcome per rank."""
    ctx = mp.get_context("spawn")
    port = free_port()
    # The parent hosts the rendezvous store: it outlives every rank, so the peers of a failed
    # rank (rank 0 included) can still read the error it reported.
    store = dist.TCPStore("127.0.0.1", port, None, True, timeout=datetime.timedelta(seconds=timeout_s),
                          wait_for_workers=False)
    deadline_s = join_timeout_s if join_timeout_s is not None else 3 * timeout_s + 30
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="spava-world-") as out_dir:
        procs = [ctx.Process(target=_worker, args=(r, world_size, port, backend, timeout_s, threads, out_dir, fn,
                                                   tuple(args)), name=f"spava-rank-{r}") for r in range(world_size)]
        for p in procs:
            p.start()
        finished = [0.0] * world_size
        pending = set(range(world_size))
        while pending and time.monotonic() - start < deadline_s:
            for r in list(pending):
                if not procs[r].is_alive():
                    finished[r] = time.monotonic() - start
                    pending.discard(r)
            time.sleep(0.02)
        for r in pending:  # still running past the deadline: hung
            procs[r].kill()
        for p in procs:
            p.join()
        outcomes = []
        for r, p in enumerate(procs):
            path = os.path.join(out_dir, f"rank{r}.pt")
            elapsed = finished[r] if r not in pending else deadline_s
            if r in pending:
                outcomes.append(RankOutcome(r, False, error_type="Hung", exitcode=p.exitcode, elapsed_s=elapsed,
                                            error=f"rank {r} was still running after {deadline_s:g} s and was killed"))
            elif os.path.exists(path):
                rec = torch.load(path, weights_only=False)
                outcomes.append(RankOutcome(r, rec["ok"], rec.get("value"), rec.get("error_type", ""),
                                            rec.get("error", ""), p.exitcode, elapsed))
            else:
                outcomes.append(RankOutcome(r, False, error_type="Died", exitcode=p.exitcode, elapsed_s=elapsed,
                                            error=f"rank {r} exited with code {p.exitcode} without a result"))
    del store
    return outcomes


def results_or_raise(outcomes: Sequence[RankOutcome]) -> list[Any]:
    """The per-rank values, or a RuntimeError listing every rank's failure."""
    bad = [o for o in outcomes if not o.ok]
    if bad:
        lines = "; ".join(f"rank {o.rank}: {o.error_type}: {o.error}" for o in bad)
        raise RuntimeError(f"{len(bad)} of {len(outcomes)} ranks failed: {lines}")
    return [o.value for o in outcomes]
