"""What the deployment entry points (`spava-run`, `spava-serve`) share about being launched: the
Hydra app around a task, the launch mode (torchrun or emulated ranks), process-wide settings, one
error line per failure, ranks agreeing on a set-up failure, and a clean stop on Ctrl-C / SIGTERM.

Nothing here loads a model or a plan: torch is imported by the callers, not by this module.
"""
from __future__ import annotations

import faulthandler
import os
import signal
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from . import process_env, progress
from ..errors import InputError, SpavaError
from ..hydra_conf import CONFIG_MODULE, check_config_dirs, hydra_error, remove_empty_dirs
from .run_config import argv_shorthands, register_schemas, to_entry_config

# A task: (typed entry config, Hydra's job directory, torchrun rank or None) -> exit code.
Task = Callable[[Any, str, "int | None"], int]


def fail(exc: SpavaError, rank: int | None, prog: str) -> int:
    """One line on stderr (on a line of its own: open progress bars are closed first)."""
    progress.close_bars()
    where = "" if rank is None else f"[rank {rank}] "
    print(f"{prog}: {where}error: {exc}", file=sys.stderr, flush=True)
    return exc.exit_code


def agree(comm: Any, error: SpavaError | None) -> None:
    """All ranks learn whether any failed during set-up, and all fail with the same first error."""
    seen = comm.all_gather_object(None if error is None else (type(error).__name__, str(error)))
    if error is not None:
        raise error
    bad = [(r, e) for r, e in enumerate(seen) if e is not None]
    if bad:
        r, (_, text) = bad[0]
        raise InputError(f"rank {r} failed: {text}", setting="runtime")


def launch_mode(comm: str) -> str:
    """dist under torchrun (or comm=dist), else emulated; InputError for impossible combinations."""
    under_torchrun = torchrun_rank() is not None
    mode = comm if comm != "auto" else ("dist" if under_torchrun else "emulated")
    if mode == "dist" and not under_torchrun:
        raise InputError("comm=dist needs torchrun (RANK/WORLD_SIZE are not set)", setting="comm")
    if mode == "emulated" and under_torchrun and int(os.environ["WORLD_SIZE"]) > 1:
        raise InputError("comm=emulated runs in one process; do not launch it with torchrun", setting="comm")
    return mode


def torchrun_rank() -> int | None:
    rank = os.environ.get("RANK", "")
    return int(rank) if rank.isdigit() and os.environ.get("WORLD_SIZE", "").isdigit() else None


def prepare_process(comm_option: str) -> None:
    """Process-wide settings: the environment defaults of process_env (a no-op when that module was
    imported before torch, as the entry modules do) and Python stacks on a native crash."""
    process_env.apply([f"comm={comm_option}"], os.environ)
    # A rank killed by a signal from native code (NCCL/gloo abort, segfault) prints every thread's
    # Python stack to stderr: under torchrun that is often the only clue which call it was in.
    if not faulthandler.is_enabled():
        try:
            faulthandler.enable()
        except (AttributeError, ValueError, OSError):  # stderr without a file descriptor: no stacks
            pass


def remove_if_empty(out_dir: str | None) -> None:
    """Hydra creates the run directory up front; leave none behind when nothing was saved in it."""
    remove_empty_dirs(out_dir)


# -- a clean stop ------------------------------------------------------------------------------------
class Interrupted(BaseException):
    """SIGINT / SIGTERM arrived (a BaseException, like KeyboardInterrupt: no ``except Exception``
    on the way up swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


@contextmanager
def stop_cleanly(prog: str, rank: int | None, cleanup: Callable[[], None] = lambda: None) -> Iterator[None]:
    """Ctrl-C or SIGTERM inside the block: ``cleanup()``, one line on stderr, and the process ends
    with 128 + the signal (130 for SIGINT, 143 for SIGTERM) through ``os._exit``. A normal exit
    would join the emulated ranks' threads (still computing) and tear down gloo's native threads,
    which aborts the process ("terminate called without an active exception"). Outputs are only
    ever written whole (plan.json through a rename), so nothing half-written is left behind.
    Only the main thread can install the handlers; elsewhere the block runs unchanged."""
    try:
        old = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    except (Interrupted, KeyboardInterrupt) as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        for s in old:  # a second Ctrl-C while stopping must not print a traceback either
            signal.signal(s, signal.SIG_IGN)
        try:
            cleanup()
        finally:
            progress.close_bars()
            where = "" if rank is None else f"[rank {rank}] "
            name = signal.Signals(signum).name
            print(f"{prog}: {where}stopped by {name} (exit {128 + signum}); nothing more was written",
                  file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(128 + signum)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


# -- the Hydra app -----------------------------------------------------------------------------------
def hydra_main(config_name: str, body: Task, prog: str, argv: Sequence[str] | None = None) -> int:
    """Run ``body(cfg, out_dir, rank)`` as the Hydra task over conf/<config_name>.yaml with this
    process's arguments (cfg: the typed entry config; out_dir: Hydra's job directory, removed again
    when nothing was saved in it). Hydra / OmegaConf / SpavaError failures become one line and exit
    code 2 (on every rank); otherwise the body's exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    rank = torchrun_rank()
    code = [0]  # Hydra's task returns nothing to its caller: the body's exit code comes back here

    def task(hydra_cfg: Any) -> None:
        out_dir = str(HydraConfig.get().runtime.output_dir)
        try:
            progress.quiet_library_bars()
            code[0] = body(to_entry_config(hydra_cfg, config_name), out_dir, rank)
        except SpavaError as exc:
            code[0] = fail(exc, rank, prog)
        finally:
            remove_if_empty(out_dir)

    comm = next((a.split("=", 1)[1] for a in args if a.startswith("comm=")), "auto")
    prepare_process(comm)
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra's exceptions reach this function, not a stack trace
    register_schemas()
    try:
        check_config_dirs(args)  # a user's --config-dir YAML before Hydra reads it (alias bombs, FIFOs)
        sys.argv = [sys.argv[0], *argv_shorthands(args)]
        app = hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name=config_name, version_base="1.3")(task)
        app()
    except SpavaError as exc:
        return fail(exc, rank, prog)
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (HydraException, OmegaConfBaseException) as exc:  # anything else is a bug: keep its traceback
        return fail(hydra_error(exc), rank, prog)
    return code[0]
