"""`spava-run` (``python -m spava_plan.entry.run``): answer a question about a video with Qwen2-VL /
Qwen2.5-VL / InternVL3 under a plan (a Hydra app).

    torchrun --nproc-per-node W -m spava_plan.entry.run plan=PATH model.checkpoint=PATH video=PATH question="..."
    spava-run plan=PATH ...        # one process: W ranks emulated as threads
    spava-run model=tiny model.init=random gpus=2 video=clip.mp4 ...   # no plan=: plan for this input
    spava-run plan=PATH tune_only=true    # tune / compile the plan's kernels on this device, exit 0

The options are the config tree of `spava-plan` plus the run options of ``RunConfig``
(spava_plan/entry/run_config.py). ``rank=R`` runs only rank R of the plan on this device (runtime/solo.py:
its time and peak memory are the real rank's, its answer is not); ``warmup=true`` runs one untimed
pass first. A plan made for the input (``replan=true``, or no ``plan=``) is saved as plan.json in
the run's output directory (hydra.run.dir) and reported.

This module is the command line and its launch modes only; the work is spava_plan.entry.session's. User
errors print one line on every rank and exit with code 2; a failed peer never makes the others hang;
Ctrl-C / SIGTERM stop every rank with one line (exit 130 / 143).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from . import process_env  # noqa: F401, I001 - first: the environment torch's OpenMP reads as it loads

import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from . import progress  # noqa: E402
from ..errors import InputError, SpavaError
from .launching import agree, fail, hydra_main, launch_mode, remove_if_empty, stop_cleanly, torchrun_rank
from ..plan_load import load_plan
from .run_config import RunConfig
from ..runtime.comm.dist import TorchDistComm
from ..runtime.comm.emulated import EmulatedWorld
from ..runtime.generate import GenerationResult
from ..runtime.solo import SoloComm
from .backends import kernel_backend, tune_launches
from .session import Prepared, Session, select_device
from ..trace import write_emulated_trace

PROG = "spava-run"


def report(session: Session, prepared: Prepared, result: GenerationResult, label: str, backend: str) -> str:
    cfg, plan = session.cfg, prepared.plan
    lay = plan.layout
    if prepared.processing.tokenizer is not None:
        answer = session.decode_text(result.tokens).strip()
    else:
        answer = "token ids " + " ".join(map(str, result.tokens))
    t = result.timing
    lines = [f"answer: {answer}"]
    lines += [f"note: {n}" for n in prepared.notes]
    lines.append(f"plan: {plan.method}, {plan.world_size} ranks, {lay.total_tokens} tokens "
                 f"({lay.video_tokens} video, {lay.query_tokens} query), model {plan.model.name}, "
                 f"backend {backend}, {label}")
    lines.append(f"timing (rank 0): model load {prepared.load_s:.2f} s | input {prepared.input_s:.3f} s | vision "
                 f"{t.vision_s:.3f} s | prefill {t.prefill_s:.3f} s | first token {t.first_token_s:.3f} s | decode "
                 f"{t.decode_tokens_per_s:.1f} tokens/s ({t.decode_tokens} tokens, max_new_tokens={cfg.max_new_tokens})")
    return "\n".join(lines)


def _warm_up(session: Session, prepared: Prepared, run_one: Callable[[], object]) -> None:
    """warmup=true: one untimed pass of one token (compiles, tuning, allocator growth) first."""
    if session.cfg.warmup:
        with progress.step("one untimed warm-up pass (warmup=true)"):
            run_one()
        prepared.notes.append("the timings follow one untimed warm-up pass of one token (warmup=true)")


def run_emulated(cfg: RunConfig, out_dir: str | None) -> int:
    try:
        world_size = load_plan(cfg.plan).world_size if cfg.plan else int(cfg.topology.gpus)
        session = Session(cfg, world_size, out_dir=out_dir)
        prepared = session.prepare_run()
        backend = session.backend(prepared, rank_threads=True)
        world = EmulatedWorld.for_plan(prepared.plan, timeout_s=cfg.timeout)
        world_size = prepared.plan.world_size  # a short input's plan may hold fewer ranks (planner/fit.py)
        session.save_plan(prepared)
        _warm_up(session, prepared, lambda: world.run(lambda r: session.run(prepared, world.comm(r), backend, 1)))
        with progress.step(f"vision, prefill and {cfg.max_new_tokens} new tokens on {world_size} emulated ranks"):
            results = world.run(lambda rank: session.run(prepared, world.comm(rank), backend))
        timing = None
        if cfg.emulated_timing:
            # Time to first token, each rank replayed alone (the same calls every time: one token).
            timing = world.time(lambda rank: session.run(prepared, world.comm(rank), backend, 1),
                                device=prepared.device)
    except SpavaError as exc:
        return fail(exc, None, PROG)
    label = f"emulated {world_size}-rank (ranks share one device as threads: wall-clock, not a {world_size}-GPU time)"
    print(report(session, prepared, results[0], label, backend.name), flush=True)
    if timing is not None:
        ranks = ", ".join(f"{us / 1e3:.2f}" for us in timing.rank_compute_us)
        print(f"{timing.label}: time to first token {timing.makespan_us / 1e3:.2f} ms on the critical path "
              f"(each rank alone: {ranks} ms; exposed communication up to {max(timing.exposed_comm_us) / 1e3:.2f} ms, "
              f"charged from the plan's topology; median of {timing.repeats})", flush=True)
        # beside plan= or, planned for this input, beside the plan saved in the output directory
        print(write_emulated_trace(cfg.plan or os.path.join(out_dir or ".", "plan.json"), timing), flush=True)
    return 0


def run_distributed(cfg: RunConfig, out_dir: str | None) -> int:
    rank = int(os.environ.get("RANK", "0"))
    if cfg.emulated_timing:
        return fail(InputError("is for one process (comm=emulated); under torchrun the timing is measured",
                               setting="emulated_timing"), rank, PROG)
    try:
        comm = TorchDistComm.from_env(timeout_s=cfg.timeout)
    except SpavaError as exc:
        return fail(exc, rank, PROG)
    try:
        error: SpavaError | None = None
        session = prepared = backend = None
        if comm.rank != 0:  # one progress bar per launch, not one per rank
            hf_logging.disable_progress_bar()
        try:
            session = Session(cfg, comm.world_size, int(os.environ.get("LOCAL_RANK", rank)), out_dir=out_dir,
                              rank=comm.rank)
            prepared = session.prepare_run()
        except SpavaError as exc:
            error = exc
        agree(comm, error)
        assert session is not None and prepared is not None
        # Every rank decodes and preprocesses (its own frames: video_decode=own) before the GPUs start:
        # the slowest one is what the run waits for, so rank 0's report names it.
        inputs = comm.all_gather_object(prepared.input_s)
        slowest = max(range(len(inputs)), key=lambda r: inputs[r])
        prepared.notes.append(f"input on every rank (video_decode={cfg.video_decode}): slowest {inputs[slowest]:.3f} s "
                              f"(rank {slowest}), rank 0 {inputs[0]:.3f} s")
        # Rank 0 first: it renders the plan's kernels (triton) that the other ranks then load, so no
        # two processes write the kernel directory at once.
        for turn in (True, False):
            error = None
            if (comm.rank == 0) == turn:
                try:
                    backend = session.backend(prepared)
                except SpavaError as exc:
                    error = exc
            agree(comm, error)
        _warm_up(session, prepared, lambda: session.run(prepared, comm, backend, 1))
        if comm.rank == 0:
            session.save_plan(prepared)
            with progress.step(f"vision, prefill and {cfg.max_new_tokens} new tokens on {comm.label}"):
                result = session.run(prepared, comm, backend)
            print(report(session, prepared, result, comm.label, backend.name), flush=True)
        else:
            session.run(prepared, comm, backend)
        comm.barrier()
        comm.close()
        return 0
    except SpavaError as exc:
        code = fail(exc, comm.rank, PROG)
        # Every rank fails here, in no fixed order: tearing the group down would race with the
        # peers (rank 0 may already have taken the store away), and gloo's threads then abort the
        # process at exit instead of returning 2. The line is printed; leave without teardown.
        sys.stdout.flush()
        os._exit(code)
    except Exception as exc:
        comm.report_failure(exc)  # a bug on this rank: the peers fail now, naming it, not at the timeout
        raise


def run_single_rank(cfg: RunConfig) -> int:
    """``rank=R``: rank R of the plan alone on this device (runtime/solo.py), labelled single-rank."""
    try:
        if not cfg.plan:
            raise InputError("is required with rank=R: the plan whose rank runs alone", setting="plan")
        world_size = load_plan(cfg.plan).world_size
        if cfg.rank >= world_size:
            raise InputError(f"the plan has ranks 0..{world_size - 1}, got {cfg.rank}", setting="rank")
        if cfg.emulated_timing:
            raise InputError("is for the emulated W-rank run; rank=R times the one rank itself",
                             setting="emulated_timing")
        session = Session(cfg, world_size)
        prepared = session.prepare_run(solo_rank=cfg.rank)
        backend = session.backend(prepared)
        comm = SoloComm(cfg.rank, world_size)
        _warm_up(session, prepared, lambda: session.run(prepared, comm, backend, 1))
        if prepared.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(prepared.device)
        result = session.run(prepared, comm, backend)
    except SpavaError as exc:
        return fail(exc, cfg.rank, PROG)
    text = report(session, prepared, result, comm.label, backend.name)
    text = text.replace("answer:", "answer (single-rank, random peers: meaningless):", 1)
    print(text.replace("timing (rank 0)", f"timing (rank {cfg.rank}, single-rank)"), flush=True)
    if prepared.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(prepared.device)
        predicted = prepared.plan.prediction.peak_memory_bytes[cfg.rank]
        print(f"memory (rank {cfg.rank}, single-rank): peak {peak / 2**30:.2f} GiB allocated "
              f"(torch.cuda.max_memory_allocated); the plan predicts {predicted / 2**30:.2f} GiB", flush=True)
    return 0


def run_tune_only(cfg: RunConfig, rank: int | None) -> int:
    """``tune_only=true``: the plan's kernels rendered and loaded and, on a GPU, every attention
    launch tuned and compiled (recorded in the kernel dir's autotune.json, which the next run
    reuses); no model, no input. Under torchrun rank 0 does it (one writer of the kernel dir)."""
    if rank:
        return 0
    try:
        plan = load_plan(cfg.plan)
        plan_dir = Path(cfg.plan).resolve().parent
        if not os.access(plan_dir, os.W_OK):
            raise InputError(f"the plan's folder {str(plan_dir)!r} is not writable: tuned kernels are kept in its "
                             f"kernels/ for the runs after this one", setting="plan")
        device = select_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")) if rank is not None else None)
        if cfg.backend == "torch" or cfg.dtype == "fp64":
            raise InputError("tune_only=true tunes the triton kernels (bf16/fp16/fp32); leave backend=auto and a "
                             "dtype other than fp64", setting="backend" if cfg.backend == "torch" else "dtype")
        backend = kernel_backend("triton", plan, plan_dir, device, torch.float32,
                                 load_only=device.type != "cuda")
        launches = tune_launches(plan, backend, device) if device.type == "cuda" and backend.tuning else 0
    except SpavaError as exc:
        return fail(exc, rank, PROG)
    what = (f"{launches} attention launches tuned and compiled on {device}" if device.type == "cuda" else
            f"kernels rendered and loaded on {device} (no GPU: nothing to tune or compile)")
    print(f"tune_only: {what}; kernel dir {backend.kernel_dir}", flush=True)
    return 0


def _discard_partial(cfg: RunConfig, out_dir: str) -> None:
    """After a stop: the temporary files of an atomic write cut short (plan.json and
    trace_emulated.json are written to NAME.tmp and renamed), then an empty output directory."""
    folders = [Path(out_dir)] + ([Path(cfg.plan).parent] if cfg.plan else [])
    for folder in folders:
        for name in ("plan.json.tmp", "trace_emulated.json.tmp"):
            (folder / name).unlink(missing_ok=True)
    remove_if_empty(out_dir)


def _task(cfg: RunConfig, out_dir: str, rank: int | None) -> int:
    """spava-run's task: validate the options, then run (torchrun: one rank; else W emulated ranks)."""
    with stop_cleanly(PROG, rank, cleanup=lambda: _discard_partial(cfg, out_dir)):
        if cfg.tune_only:
            return run_tune_only(cfg, rank)
        mode = launch_mode(cfg.comm)
        if cfg.rank is not None:
            return run_single_rank(cfg)
        # Only rank 0 saves into the output directory (the other ranks' directories stay empty).
        return run_distributed(cfg, out_dir if not rank else None) if mode == "dist" else run_emulated(cfg, out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """Console script `spava-run`."""
    with stop_cleanly(PROG, torchrun_rank()):  # also while Hydra composes and the modules load
        return hydra_main("run", _task, PROG, argv)


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console_main()
