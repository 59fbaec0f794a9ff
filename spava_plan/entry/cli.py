"""`spava-plan`: the planning command (a Hydra app).

    spava-plan model=qwen2vl gpus=8 frames=2048
    spava-plan -m gpus=2,4,8 frames=256,1024,2048 method=spava,zigzag_ring

Each job writes plan.json, report.md, graph.json, schedule.json, timeline.png, trace.json and (with
kernels=true) kernels/ into its Hydra job directory (with tune=..., also tuning.csv, tuning.md and
pareto.png), then prints a short comparison table and the path. A multirun also gets summary.csv,
summary.md, sweep.png and index.json at the sweep root (SweepSummary callback); it exits 0 when at
least one job planned (a job that did not is a row saying why), 2 when none did.

This is one of the two entry points allowed to wire the stages together (config -> planner ->
codegen). Errors a user can fix print one line naming the setting on stderr and exit with code 2,
without a traceback and without leaving partial artifacts: everything is built in a temporary
directory inside the job directory and moved into place only when all of it succeeded; a job
directory that Hydra created for a failed job is removed again.
"""
from __future__ import annotations

import csv
import io
import json
import os
import pickle
import shutil
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Sequence

import hydra
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from yaml import YAMLError

from ..codegen.render import render_kernels
from ..config import to_config
from ..errors import ConfigError, InfeasiblePlanError, SpavaError
from ..hydra_conf import (CONFIG_MODULE, CONFIG_NAME, check_config_dirs, compose_config, hydra_error, method_preset,
                         register_schema, remove_empty_dirs, with_method)
from .plan_store import INDEX_NAME, entry_for, write_index
from ..planner import timeline
from ..planner import tune as tuning
from ..planner.build import assemble, derive
from ..planner.compare import COMPARED, compare, row_name
from ..planner.fit import fit_config
from ..planner.graph import build_graph, graph_json
from ..planner.report import (SUMMARY_COLUMNS, failed_row, report_markdown, schedule_json, summary_markdown, summary_row,
                             summary_table, warning_line)
from ..planner.sweep import render_sweep, sweep_plot_data, with_swept_columns
from ..planner.timeline import predicted_trace
from ..planner.tune import advice, chosen_config, tune
from ..video_meta import plan_for_clip

ARTIFACTS = ("plan.json", "report.md", "graph.json", "schedule.json", "timeline.png", "trace.json")
KERNEL_ARTIFACTS = ("kernels",)  # kernels=true
TUNE_ARTIFACTS = ("tuning.csv", "tuning.md", "pareto.png")  # tune=...
SWEEP_ARTIFACTS = ("summary.csv", "summary.md", "sweep.png", "index.json")  # -m, at the sweep root
_FAILURES: list[str] = []  # one line per failed job of this process (exit code 2 at the end)
_INDEX: list[Any] = []  # plan_store.PlanEntry of each planned job of a sweep (index.json at its root)
_CRASHES: list[str] = []  # jobs of a sweep that hit a bug (traceback printed; exit code 1 at the end)
_PLANNED: list[str] = []  # jobs of this process that planned (a sweep exits 0 when there is one)


class TimelineWorker:
    """Draws timeline.png in a forked child process.

    Importing matplotlib and drawing take about as long as everything else the command does, so
    on POSIX the child is forked at start-up (before Hydra runs, no threads exist yet): it imports
    matplotlib while the parent composes the config and plans, then draws the data the parent
    sends through a pipe. Without fork (or when the child fails) the parent draws in-process.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.pid = 0
        self._pipe = -1
        if not enabled or not hasattr(os, "fork"):
            return
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: never returns
            os.close(write)
            os._exit(self._child(read))
        os.close(read)
        self.pid, self._pipe = pid, write

    @staticmethod
    def _child(read: int) -> int:
        try:
            timeline.preload()
            with os.fdopen(read, "rb") as pipe:
                payload = pipe.read()
            if payload:  # empty: the parent planned nothing (an error) or drew it itself
                data, path = pickle.loads(payload)
                timeline.render(data, path)
            return 0
        except BaseException:  # noqa: BLE001 - report to the parent through the exit status
            return 1

    def render(self, plan: Any, path: Path) -> None:
        """Draw (or hand to the child) timeline.png; ``wait`` must follow before it is used."""
        data = timeline.timeline_data(plan)
        self._path = path
        if self._pipe < 0:
            timeline.render(data, path)
            return
        pipe, self._pipe = self._pipe, -1
        try:
            with os.fdopen(pipe, "wb") as out:
                out.write(pickle.dumps((data, str(path))))
            self._data = data
        except OSError:  # the child is gone (it could not even import matplotlib): draw here
            self.close()
            timeline.render(data, path)

    def wait(self) -> None:
        """Wait for the child; if it failed, draw in-process (which raises the real error)."""
        if self.pid:
            self.close()
            if self._status != 0 and getattr(self, "_data", None) is not None:
                timeline.render(self._data, self._path)

    def close(self) -> None:
        """Release the child (it exits without drawing if nothing was sent)."""
        if self._pipe >= 0:
            os.close(self._pipe)
            self._pipe = -1
        if self.pid:
            _, status = os.waitpid(self.pid, 0)
            self._status = os.waitstatus_to_exitcode(status)
            self.pid = 0


_WORKER: TimelineWorker | None = None  # set by main() for single runs
LAST_SEARCH_ADVICE: dict[str, str] = {}  # method -> what to change, after the last job's `tune=` search


# -- one job ----------------------------------------------------------------------------------------
def plan_job(task_cfg: Any, out_dir: Path, worker: TimelineWorker | None = None,
             given: Sequence[str] = ()) -> tuple[Any, Any, list, str]:
    """Plan one config and write its artifacts into ``out_dir`` (all or nothing). ``given``: the
    command-line overrides (a tuned plan's "plan it again" command carries them).

    Returns (plan, cfg, method rows, plan hash); after a search, the advice for the warning is in
    ``LAST_SEARCH_ADVICE``."""
    cfg = to_config(task_cfg)
    if cfg.video.path:  # plan for that clip: frames and resolution from its metadata (PyAV, no decode)

        cfg = plan_for_clip(cfg)
        if cfg.tune.target is None:  # a clip too short for the method gets one that holds it (planner/fit.py)

            cfg, fit_notes = fit_config(cfg)
            for note in fit_notes:
                print(f"note: {note}")
    tuned, known = None, {}
    LAST_SEARCH_ADVICE.clear()
    if cfg.tune.target is not None:  # `tune=...`: the planner chooses the knobs (planner/tune.py)


        base, tuned = cfg, tune(cfg, method_preset, known)
        cfg = chosen_config(tuned)
        LAST_SEARCH_ADVICE.update(advice(tuned, base))
    main = derive(cfg)  # raises a SpavaError (bad size, does not fit) before anything is written
    rows = compare(main, {m: with_method(cfg, m) for m in COMPARED if m != row_name(cfg)}, known)
    known.clear()
    plan = assemble(main)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".spava-plan-", dir=out_dir))
    try:
        plan_hash = _write_artifacts(plan, cfg, rows, tmp, worker or TimelineWorker(enabled=False),
                                     LAST_SEARCH_ADVICE or None)
        if tuned is not None:
            (tmp / "tuning.csv").write_text(tuning.tuning_csv(tuned))
            (tmp / "tuning.md").write_text(tuning.tuning_markdown(tuned, base, given))
            with open(tmp / "report.md", "a") as report:
                report.write(f"\nThese knobs were chosen by `tune={tuned.target}` ({tuning.describe(tuned)}); "
                             "tuning.md lists every candidate and why it was not chosen, pareto.png plots them.\n")
            tuning.render_pareto(tuning.pareto_data(tuned), tmp / "pareto.png")
            print(tuning.describe(tuned))
        for name in sorted(os.listdir(tmp)):
            target = out_dir / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)  # a previous run's kernels/ in a reused directory
            os.replace(tmp / name, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return plan, cfg, rows, plan_hash


def _write_artifacts(plan: Any, cfg: Any, rows: list, tmp: Path, worker: TimelineWorker,
                     search: dict | None = None) -> str:
    worker.render(plan, tmp / "timeline.png")  # first: the child draws while the rest is written
    try:
        plan_hash = _write_rest(plan, cfg, rows, tmp, search)
    except BaseException:
        worker.close()  # the child must be done with ``tmp`` before it is removed
        raise
    worker.wait()
    return plan_hash


def _write_rest(plan: Any, cfg: Any, rows: list, tmp: Path, search: dict | None = None) -> str:
    data = plan.to_dict()  # computes the content hash once; same text as Plan.to_json()
    plan_hash = data["hash"]
    (tmp / "plan.json").write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    del data
    (tmp / "schedule.json").write_text(schedule_json(plan))

    (tmp / "trace.json").write_text(predicted_trace(plan))
    (tmp / "graph.json").write_text(graph_json(build_graph(plan, plan_hash)))
    (tmp / "report.md").write_text(report_markdown(plan, cfg, rows, plan_hash, search))
    if cfg.kernels:
        render_kernels(plan, tmp / "kernels")
    return plan_hash


def _discard_job_dir(out_dir: Path, hydra_subdir: str | None) -> None:
    """Remove what Hydra wrote for a failed job (its config snapshot) and the job directory and
    its parents up to the working directory while they are empty."""
    if hydra_subdir:
        shutil.rmtree(out_dir / hydra_subdir, ignore_errors=True)
    remove_empty_dirs(out_dir)


def _task(task_cfg: Any) -> dict:
    """The Hydra task function: plan, write, print; a SpavaError becomes one line on stderr."""
    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    job = str(hc.job.num) if multirun else "0"

    # unresolved: an override may itself hold an interpolation that fails (model.name=${oc.env:NOPE})
    task_overrides = OmegaConf.to_container(hc.overrides.task, resolve=False)
    overrides = " ".join(task_overrides)
    where = f"job #{job} ({overrides}): " if multirun else ""
    try:
        try:
            plan, cfg, rows, plan_hash = plan_job(task_cfg, out_dir, None if multirun else _WORKER,
                                                  [str(o) for o in task_overrides])
        except OSError as exc:  # the output directory cannot be written (a file in the way, no space...)
            raise output_dir_error(exc, "hydra.sweep.dir" if multirun else "hydra.run.dir") from None
    except SpavaError as exc:
        _discard_job_dir(out_dir, hc.output_subdir)
        hint = ""
        if isinstance(exc, InfeasiblePlanError) and "does not fit" in str(exc) and "tune=" not in overrides:
            hint = "; or let the planner search for knobs that fit: tune=latency (or tune=memory)"
        # in a sweep the cell becomes a row and the sweep can still exit 0: say "not planned"
        line = f"spava-plan: {'not planned' if multirun else 'error'}: {where}{exc}{hint}"
        print(line, file=sys.stderr, flush=True)
        _FAILURES.append(line)

        return {**failed_row(job, overrides, str(exc), _config_or_none(task_cfg)),
                "_overrides": _override_values(task_overrides)}
    except Exception as exc:  # a bug; in a sweep the other jobs and the summary still run
        if not multirun:
            raise

        _discard_job_dir(out_dir, hc.output_subdir)
        traceback.print_exc()
        line = f"spava-plan: internal error: {where}{type(exc).__name__}: {exc}"
        print(line, file=sys.stderr, flush=True)
        _CRASHES.append(line)

        return {**failed_row(job, overrides, f"internal error: {type(exc).__name__}", _config_or_none(task_cfg)),
                "_overrides": _override_values(task_overrides)}

    mine = next(r for r in rows if r.planned)
    _PLANNED.append(job)  # read by main() of this same module, like _FAILURES
    if multirun:
        from . import cli as canonical  # under `python -m spava_plan.entry.cli` this module is __main__, the callback's is not

        canonical._INDEX.append(entry_for(plan, out_dir, hc.sweep.dir))
        print(f"#{job} {overrides}: {plan.method} {mine.prefill_us / 1e3:,.1f} ms predicted prefill -> {out_dir}")
    else:
        lay = plan.layout
        print(f"{cfg.model.name}: {lay.total_tokens:,} tokens ({lay.frames} frames, {lay.virtual_hosts} blocks) "
              f"on {plan.world_size} x {cfg.topology.name}; plan {plan_hash[:12]}")
        print(summary_table(rows))

        warning = warning_line(rows, LAST_SEARCH_ADVICE or None)
        if warning:
            print(warning)
        for note in capped_notes(plan, cfg):
            print(f"note: {note}")
        print(f"artifacts: {out_dir}")
    return {**summary_row(job, plan, cfg, rows, str(out_dir)), "_overrides": _override_values(task_overrides),
            "_methods": {r.method: r.prefill_us / 1e3 for r in rows if not r.error}}


def _config_or_none(task_cfg: Any) -> Any:
    """The job's validated config, for the coordinates of a failed sweep cell (None when the
    config itself is what failed)."""
    try:
        return to_config(task_cfg)
    except Exception:  # noqa: BLE001 - the row then shows the overrides as typed
        return None


def _override_values(overrides: Any) -> dict[str, str]:
    """key -> value of a job's command-line overrides (for the sweep's per-key columns)."""
    out = {}
    # unresolved, as _task reads them: an override may hold an interpolation that fails
    items = OmegaConf.to_container(overrides, resolve=False) if OmegaConf.is_config(overrides) else overrides
    for item in items:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


def capped_notes(plan: Any, cfg: Any) -> list[str]:
    """What the planner capped rather than refused, said out loud: a method.passing_tokens larger
    than a block passes the block's whole 128-token tiles (k = min(p, 128 * floor(B_min / 128)),
    SPAVA_SPEC.md section 4; the paper rule's p is capped the same way by design, without a note)."""
    lay = plan.layout
    keep = lay.blocks[0].keep if lay.blocks else 0
    if cfg.method.passing_tokens is not None and lay.passing_tokens > keep and plan.method in ("spava", "apb"):
        return [f"method.passing_tokens: passing budget p = {lay.passing_tokens:,} capped to k = {keep:,} tokens "
                f"per block (the smallest block's whole 128-token tiles)"]
    return []


def output_dir_error(exc: OSError, setting: str) -> SpavaError:
    where = f" {exc.filename}" if exc.filename else ""
    return ConfigError(f"cannot write the output directory{where}: {exc.strerror or exc}", setting=setting)


# -- multirun summary ------------------------------------------------------------------------------
class SweepSummary(Callback):
    """Collects each job's summary row and writes summary.csv + summary.md at the sweep root.

    Rows travel through the jobs' return values, so this needs an in-process launcher (Hydra's
    default basic launcher)."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        value = getattr(job_return, "_return_value", None)  # not .return_value: it re-raises
        if isinstance(value, dict):
            self.rows.append(value)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        if not self.rows:
            return
        root = Path(str(config.hydra.sweep.dir)).resolve()
        root.mkdir(parents=True, exist_ok=True)
        jobs = sorted(self.rows, key=lambda r: int(r["job"]))
        rows, columns = with_swept_columns(jobs, SUMMARY_COLUMNS)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        _atomic_write(root / "summary.csv", text.getvalue())
        md = summary_markdown(rows, columns)
        _atomic_write(root / "summary.md", md)
        if _INDEX:  # the sweep is a plan family: spava_plan.entry.plan_store.PlanStore(root, ...) serves from it

            write_index(root, _INDEX)
            print(f"plan index: {root / INDEX_NAME} ({len(_INDEX)} plans)")
        print(md, end="")
        plot = sweep_plot_data(jobs)
        if plot is not None:
            render_sweep(plot, root / "sweep.png")
        print(f"summary: {root / 'summary.csv'}" + (f" (plot: {root / 'sweep.png'})" if plot is not None else ""))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# -- entry point -----------------------------------------------------------------------------------
def _is_multirun(args: list[str]) -> bool:
    return any(a in ("-m", "--multirun") for a in args) or any(
        a.replace(" ", "") in ("hydra.mode=MULTIRUN",) for a in args)


def _prevalidate_sweep(args: list[str]) -> None:
    """Compose every job of a sweep before any runs, so a bad value in a sweep list fails the
    whole command up front instead of after earlier jobs wrote their artifacts."""
    overrides = [a for a in args if not a.startswith("-") and not a.startswith(("hydra.", "hydra/", "+hydra"))]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        jobs = BasicSweeper.split_arguments(parsed, None)[0]
    except Exception:  # a sweep syntax this check does not expand (e.g. glob): Hydra reports it
        return
    for job in jobs:
        compose_config(job)


def main() -> None:
    """Console script `spava-plan`."""
    args = sys.argv[1:]
    # Let Hydra's exceptions reach this function instead of being printed with a stack trace.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    register_schema()
    global _WORKER
    app = hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name=CONFIG_NAME, version_base="1.3")(_task)
    multirun = _is_multirun(args)
    informational = any(a in ("-h", "--help", "--hydra-help", "--info", "-c", "--cfg", "--shell-completion",
                              "-sc") or a.startswith("--info") for a in args)
    _WORKER = TimelineWorker(enabled=not multirun and not informational)
    try:
        check_config_dirs(args)  # before Hydra reads a user's YAML (alias bombs, FIFOs, bad syntax)
        if multirun:
            _prevalidate_sweep(args)
        app()
    except SpavaError as exc:
        print(f"spava-plan: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except MissingConfigException as exc:  # an IOError: before OSError, or it reads as an output-dir error
        print(f"spava-plan: error: {hydra_error(exc)}", file=sys.stderr)
        sys.exit(2)
    except YAMLError as exc:  # a YAML file check_config_dirs did not see (e.g. hydra.searchpath)

        print(f"spava-plan: error: {ConfigError(f'malformed YAML: {str(exc).splitlines()[0]}', 'overrides')}",
              file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except OSError as exc:  # Hydra could not create the run / sweep directory
        print(f"spava-plan: error: {output_dir_error(exc, 'hydra.sweep.dir' if multirun else 'hydra.run.dir')}",
              file=sys.stderr)
        sys.exit(2)
    except (OmegaConfBaseException, Exception) as exc:
        if not isinstance(exc, (HydraException, OmegaConfBaseException)):
            raise  # a bug, not a user error: keep the traceback
        print(f"spava-plan: error: {hydra_error(exc)}", file=sys.stderr)
        sys.exit(2)
    finally:
        _WORKER.close()
    if _CRASHES:
        sys.exit(1)
    # A sweep is a table: a cell that does not plan (gpus=2 frames=2048 does not fit) is a row
    # that says why, not a failed command. It exits 0 when at least one cell planned, 2 when none
    # did; a single run exits 2 on its error.
    if _FAILURES and not (multirun and _PLANNED):
        sys.exit(2)


if __name__ == "__main__":
    main()
