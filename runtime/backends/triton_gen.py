"""The ``triton`` kernel backend: runs the kernels codegen rendered for the plan.

The kernel dir (``kernels/`` beside plan.json) holds the generated module, its manifest and
``autotune.json``. A plan folder is data, never code: the module imported is the one this
installation renders from the plan (load_kernels), so every caller passes ``render`` (a callable
that writes a plan's kernels into a dir; the runtime never imports codegen), e.g.
``TritonBackend(dir, plan_hash=plan.hash, render=functools.partial(render_kernels, plan))``.

attention(): the tasks' mask structure picks one fused launch kernel of the module (LAUNCHES);
a grouping the plan never made runs task by task, and a task structure it never made runs
segment by segment through the one-segment kernels plus the LSE merge (slower, still exact).
Block sizes come from autotune.json for this device; a launch not tuned yet is tuned on first use
on a GPU (each candidate timed with triton.testing.do_bench, median) and recorded there. Where a
launch is eligible (cudnn_segments.eligible: CUDA, 16-bit, causal segments square or the op
bottom-right aligned) cuDNN (a task's segments joined into one or two calls, a square pair of tasks
into one) plus the LSE merge is one more candidate, taken only after its output agreed with the
generated kernel's on that launch's own inputs.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import secrets
import stat
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable, Sequence

import torch

from spava_plan.errors import InputError, PlanMismatchError

from ..dtypes import PLAN_TORCH_DTYPES
from . import cudnn_segments, triton_kernels
from .base import TaskInput
from .cudnn_segments import CUDNN

_DTYPES = PLAN_TORCH_DTYPES  # the kernels serve every plan dtype
AUTOTUNE_VERSION = 4  # 2: cuDNN is a candidate; 3: it joins a task's segments (fewer, faster calls);
# 4: a square pair of tasks (anchor + first host) is one cuDNN call, and the table names the module it
# was tuned for: a table of another version, or of another module (a re-rendered kernel dir, whose
# launch names may stand for other launches), is tuned again
# cuDNN's output must agree with the generated kernel's before it may be chosen: both are bf16
# attention from the same inputs in fp32 arithmetic (seen: 3.6e-3 vs 3.1e-3 relative to fp32 each)
CUDNN_AGREE_REL = 2e-2
CUDNN_AGREE_LSE = 2e-2


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_MODULE_FILE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}\.py\Z")  # a plain file name, no directory part
_TRUSTED: list[tempfile.TemporaryDirectory] = []  # this process's own render dir (created on first load)
_TRUSTED_LOCK = threading.Lock()


def _trusted_dir() -> Path:
    """A directory only this process writes (mkdtemp: mode 0700; removed at exit). The modules the
    backend imports are rendered here, never taken from a kernel dir: that may have arrived with a
    plan from another machine, or be shared with other users."""
    with _TRUSTED_LOCK:
        if not _TRUSTED:
            _TRUSTED.append(tempfile.TemporaryDirectory(prefix="spava-kernels-"))
        return Path(tempfile.mkdtemp(dir=_TRUSTED[0].name))


def user_kernel_dir(plan_hash: str) -> Path:
    """The kernel dir for a plan whose own folder is not to be written (read-only, or a run that
    re-planned): this user's, one per plan, the same on every run, so the launches tuned on the
    first run are found in its autotune.json on the next (a fresh temporary dir per run tuned them
    all again). Under $SPAVA_CACHE_DIR, else $XDG_CACHE_HOME/spava_plan, else ~/.cache/spava_plan;
    created private (0700). What it holds is checked like any kernel dir (load_kernels)."""
    if not isinstance(plan_hash, str) or not re.fullmatch(r"[0-9a-f]{64}", plan_hash):
        raise AssertionError(f"not a plan hash: {plan_hash!r}")
    root = os.environ.get("SPAVA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "spava_plan")
    path = Path(root) / "kernels" / plan_hash[:16]
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the kernel cache dir {str(path)!r} ({exc.strerror}); set SPAVA_CACHE_DIR "
                         f"to a writable directory", setting="kernels") from None
    return path


def load_kernels(kernel_dir: Path, *, render: Callable[[Path], object], plan_hash: str | None = None):
    """Import the plan's generated module, as this installation renders it (a plan folder is data).

    ``render(dir)`` writes the plan's kernels into ``dir`` (codegen's render_kernels: the runtime
    never imports codegen). It renders into this process's private dir first; that rendering is
    what gets imported. The kernel dir beside the plan is then checked against it: absent, or
    rendered by another installation or for another plan (its manifest's cache key differs): it is
    rendered again in place. Holding the same key but other bytes (an edited module), or naming a
    module that is not a plain file name inside it: refused, in one line naming the kernel dir,
    before anything is imported."""
    kernel_dir = Path(kernel_dir)
    fresh = _trusted_dir()
    render(fresh)
    manifest = _read_manifest(fresh)
    if manifest is None or not _MODULE_FILE.match(str(manifest.get("module"))):
        raise AssertionError(f"render() wrote no valid manifest into {fresh}")  # a programming error
    if plan_hash and manifest.get("plan_hash") != plan_hash:
        raise PlanMismatchError(f"the kernels rendered for {str(kernel_dir)!r} are for plan "
                                f"{str(manifest.get('plan_hash'))[:16]} but the run uses plan {plan_hash[:16]}",
                                setting="kernels")
    key, path = str(manifest["cache_key"]), fresh / manifest["module"]
    _check_kernel_dir(kernel_dir, key, path.name, path.read_bytes(), render)
    name = f"spava_kernels_{key[:16]}"  # the key covers the plan and everything the module depends on
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module  # one import per process, shared by every backend instance
    return module


_MAX_JSON = 16 << 20  # a manifest or autotune table is a few KB
_MAX_MODULE = 16 << 20  # a generated module is tens of KB


def _small_file(path: Path, limit: int) -> bytes:
    """A regular file's bytes, refused (OSError) when it is anything else (a FIFO would block the
    read forever) or over ``limit`` bytes."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
        raise OSError(f"{path} is not a regular file of at most {limit} bytes")
    return Path(path).read_bytes()


def _read_manifest(kernel_dir: Path) -> dict | None:
    try:
        data = json.loads(_small_file(kernel_dir / "manifest.json", _MAX_JSON))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _check_kernel_dir(kernel_dir: Path, key: str, module: str, expected: bytes,
                      render: Callable[[Path], object]) -> None:
    """Refuse a tampered kernel dir; render a missing or stale one again (see load_kernels)."""
    manifest = _read_manifest(kernel_dir)
    if manifest is not None:
        named = manifest.get("module")
        if not isinstance(named, str) or not _MODULE_FILE.match(named):
            raise InputError(f"the kernel dir {str(kernel_dir)!r} is refused: its manifest.json names the module "
                             f"{str(named)[:200]!r}, not a file name inside it (nothing was imported); delete the "
                             f"kernel dir to have it rendered again", setting="kernels")
        if manifest.get("cache_key") == key:
            try:
                body = _small_file(kernel_dir / named, _MAX_MODULE)
            except OSError:
                body = None
            if body is not None and (named != module or body != expected):
                raise InputError(f"the kernel dir {str(kernel_dir)!r} is refused: its module {named!r} is not what "
                                 f"this installation renders from the plan (edited?; nothing was imported); delete "
                                 f"the kernel dir to have it rendered again", setting="kernels")
            if body is not None:
                return  # this installation's rendering of this plan: nothing to write
    try:
        render(kernel_dir)  # absent or stale (another installation, version or plan): rendered again in place
    except OSError:
        pass  # a read-only kernel dir: the module imported is the private rendering in any case


class Tuner:
    """Configs per (device, launch, dtype): read from / recorded in autotune.json.

    A config is a generated kernel's block sizes (an integer tuple, ``fields``) or CUDNN. ``module``
    names the kernel module the launches belong to (its import name carries its sha256)."""

    def __init__(self, path: Path, candidates: Sequence[tuple[int, ...]], default: tuple[int, ...],
                 timer: Callable[[Callable[[], object]], float] | None = None, module: str = ""):
        self.path = Path(path)
        self.module = module
        self.timer = timer or _do_bench
        self.candidates = tuple(tuple(c) for c in candidates)
        self.default = tuple(default)
        self.table: dict = self._read()

    def _read(self) -> dict:
        """The table for this module, entries that are not well-formed configs left out (the file
        may have come with a plan: it is data, read as such)."""
        try:
            data = json.loads(_small_file(self.path, _MAX_JSON))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("version") != AUTOTUNE_VERSION or data.get("module", "") != self.module:
            return {}  # another version's or another module's table: tune again (and overwrite it)
        devices = data.get("devices")
        if not isinstance(devices, dict):
            return {}
        return {dev: {key: e for key, e in launches.items() if self._valid(e)}
                for dev, launches in devices.items() if isinstance(launches, dict)}

    def _valid(self, entry: object) -> bool:
        if not isinstance(entry, dict) or not isinstance(entry.get("config"), list):
            return False
        cfg, timed = tuple(entry["config"]), entry.get("candidates", {})
        ints = len(cfg) == len(self.default) and all(type(x) is int and 0 <= x <= 1 << 16 for x in cfg)
        return (ints or cfg == CUDNN) and isinstance(timed, dict) and all(
            isinstance(c, str) and re.fullmatch(r"[0-9]{1,6}(,[0-9]{1,6})*|cudnn", c)
            and type(t) in (int, float) for c, t in timed.items())

    def get(self, device: str, key: str) -> tuple[int, ...] | None:
        entry = self.table.get(device, {}).get(key)
        return tuple(entry["config"]) if entry else None

    def nearest(self, device: str, key: str) -> tuple[int, ...]:
        """For a launch not tuned here: the generated config most launches of this dtype chose on
        this device (never CUDNN: the launch may not be eligible, and nothing checked it)."""
        dtype = key.rsplit(":", 1)[-1]
        chosen = [tuple(e["config"]) for k, e in sorted(self.table.get(device, {}).items())
                  if k.rsplit(":", 1)[-1] == dtype and tuple(e["config"]) != CUDNN]
        return max(chosen, key=chosen.count) if chosen else self.default

    def generated(self, device: str, key: str) -> tuple[int, ...]:
        """The fastest generated config timed for this launch (where CUDNN won but a later call of
        the launch is not eligible for it), else nearest()."""
        timed = self.table.get(device, {}).get(key, {}).get("candidates", {})
        ints = {tuple(int(x) for x in c.split(",")): t for c, t in timed.items() if c != ",".join(CUDNN)}
        return min(ints, key=ints.get) if ints else self.nearest(device, key)

    def tune(self, device: str, key: str, run: Callable[[tuple], object],
             candidates: Sequence[tuple] | None = None) -> tuple[int, ...]:
        timings = {}
        for cfg in (self.candidates if candidates is None else tuple(tuple(c) for c in candidates)):
            try:
                run(cfg)  # compile + check it launches at all (too much shared memory fails here)
                timings[cfg] = self.timer(lambda: run(cfg))
            except Exception:  # noqa: BLE001 - a candidate that cannot compile or launch is skipped
                continue
        if not timings:
            return self.default
        best = min(timings, key=timings.get)
        self.table = self._read()  # other ranks may have recorded launches meanwhile
        self.table.setdefault(device, {})[key] = {
            "config": list(best), "ms": round(timings[best], 4),
            "fields": ["BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "TMA", "GROUPED"],  # or ["cudnn"]
            "candidates": {",".join(map(str, c)): round(t, 4)
                           for c, t in sorted(timings.items(), key=lambda ct: tuple(map(str, ct[0])))},
        }
        text = json.dumps({"version": AUTOTUNE_VERSION, "module": self.module, "devices": self.table},
                          indent=1, sort_keys=True) + "\n"
        tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(8)}.tmp")
        try:  # atomic, through an exclusively created temporary file (a planted link is not followed)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, self.path)
        except OSError:
            tmp.unlink(missing_ok=True)  # a read-only kernel dir: keep the choice in memory for this process
        return best


def _do_bench(fn: Callable[[], object]) -> float:
    import triton.testing

    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


class TritonBackend:
    name = "triton"

    def __init__(self, kernel_dir: str | Path, *, render: Callable[[Path], object], plan_hash: str | None = None,
                 tune: bool = True, configs: Sequence[tuple[int, ...]] | None = None, cudnn: bool = True,
                 autotune: str | Path | None = None, timer: Callable[[Callable[[], object]], float] | None = None):
        """render: writes the plan's kernels into a dir (load_kernels; required: nothing from the
        kernel dir is imported unchecked); tune: time the candidates of a launch not in
        autotune.json yet (else use nearest()); configs: the generated tile configs the tuner may
        try (default: all of the module's); cudnn: whether cuDNN per segment is a candidate where a
        launch is eligible; autotune: the table's path (default: autotune.json in the kernel dir);
        timer: how a candidate is timed (default: triton.testing.do_bench, median)."""
        self.kernel_dir = Path(kernel_dir)
        self.mod = load_kernels(self.kernel_dir, plan_hash=plan_hash, render=render)
        self.tuning = tune
        self.cudnn = cudnn
        self.tuner = Tuner(Path(autotune) if autotune else self.kernel_dir / "autotune.json",
                           configs or self.mod.ATTENTION_CONFIGS,
                           self.mod.DEFAULT_CONFIG, timer=timer, module=self.mod.__name__)
        self._configs: dict[tuple, tuple] = {}
        self._fallbacks: dict[tuple, tuple[int, ...]] = {}  # a generated config where cfg is CUDNN
        self._choosing = threading.Lock()  # emulated ranks are threads: one launch tuned once, by one

    # -- checks at the boundary --------------------------------------------------------------------
    def _check(self, task: TaskInput) -> tuple:
        q = task.q
        hq, d, hkv = self.mod.Q_HEADS, self.mod.HEAD_DIM, self.mod.KV_HEADS
        if q.dim() != 3 or q.shape[1] != hq or q.shape[2] != d:
            raise InputError(f"task {task.name!r}: q has shape {tuple(q.shape)} but the kernels were rendered for "
                             f"(M, {hq}, {d})", setting="plan")
        if q.dtype not in _DTYPES:
            raise InputError(f"task {task.name!r}: the triton backend takes bf16/fp16/fp32, got {q.dtype}",
                             setting="dtype")
        M = q.shape[0]
        segs = []
        for i, seg in enumerate(task.segments):
            k, v = seg.k, seg.v
            if k.shape != v.shape or k.dim() != 3 or k.shape[1:] != (hkv, d):
                raise InputError(f"task {task.name!r} segment {i}: k {tuple(k.shape)} / v {tuple(v.shape)}, "
                                 f"expected (n, {hkv}, {d}) each", setting="plan")
            if k.dtype != q.dtype or v.dtype != q.dtype:
                raise InputError(f"task {task.name!r} segment {i}: k/v dtype {k.dtype}/{v.dtype} differs from q's "
                                 f"{q.dtype}", setting="dtype")
            if seg.mask not in ("full", "causal"):
                raise InputError(f"task {task.name!r} segment {i}: unknown mask {seg.mask!r}", setting="plan")
            if seg.mask == "causal" and k.shape[0] < M:
                raise InputError(f"task {task.name!r} segment {i}: a causal segment needs n >= M, got n={k.shape[0]} "
                                 f"< M={M}", setting="plan")
            segs.append((_dense_last(k), _dense_last(v), seg.mask == "causal"))
        out = task.out
        if out is not None and (tuple(out.shape) != tuple(q.shape) or out.dtype != q.dtype or out.stride(-1) != 1):
            raise InputError(f"task {task.name!r}: out must be {tuple(q.shape)} {q.dtype} with contiguous head dim, "
                             f"got {tuple(out.shape)} {out.dtype} strides {out.stride()}", setting="plan")
        return (_dense_last(q), segs, out)

    # -- attention ---------------------------------------------------------------------------------
    def _config(self, name: str, tasks: list, scale: float) -> tuple[int, ...]:
        q = tasks[0][0]
        fast = (name, q.dtype, q.device)  # hot path: no device-name query per call
        cfg = self._configs.get(fast)
        if cfg is not None:
            return cfg
        with self._choosing:
            cfg = self._configs.get(fast)
            if cfg is None:
                cfg = self._choose(name, tasks, scale, fast)
                self._configs[fast] = cfg
        return cfg

    def _choose(self, name: str, tasks: list, scale: float, fast: tuple) -> tuple:
        q = tasks[0][0]
        if _interpreted() or not q.is_cuda:
            return tuple(self.mod.INTERPRETER_CONFIG)
        return self._tuned(torch.cuda.get_device_name(q.device), name, tasks, scale, fast)

    def _tuned(self, device: str, name: str, tasks: list, scale: float, fast: tuple) -> tuple:
        """A launch's config on ``device``: from autotune.json when this module's table has it
        (a kernel dir tuned once is not tuned again), else timed now and recorded there."""
        q = tasks[0][0]
        key = f"{name}:{str(q.dtype).removeprefix('torch.')}"
        cfg = self.tuner.get(device, key)
        if cfg == CUDNN and not self.cudnn:
            cfg = self.tuner.generated(device, key)
        if cfg is None and q.dtype == torch.float32:
            cfg = tuple(self.mod.FP32_CONFIG)  # not tuned: fp32 is the exact-check path, not the fast one
        if cfg is None and self.tuning:
            cands = self.tuner.candidates
            if self.cudnn and cudnn_segments.eligible(tasks) and self._cudnn_agrees(name, tasks, scale):
                cands += (CUDNN,)
            cfg = self.tuner.tune(device, key, lambda c: self._run(name, tasks, scale, c), candidates=cands)
        if cfg is None:
            cfg = self.tuner.nearest(device, key)
        if cfg == CUDNN:  # for calls of this launch that cuDNN cannot take (a non-square causal segment)
            self._fallbacks[fast] = self.tuner.generated(device, key)
        return cfg

    def _run(self, name: str, tasks: list, scale: float, cfg: tuple) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if cfg == CUDNN:
            return cudnn_segments.attend(tasks, scale)
        return self.mod.attend(name, tasks, scale, cfg)

    def _cudnn_agrees(self, name: str, tasks: list, scale: float) -> bool:
        """cuDNN and the generated kernel on this launch's inputs: same outputs and LSEs within bf16
        rounding? (Outputs written in place are saved and restored around the comparison.)"""
        saved = [o.clone() if o is not None else None for _, _, o in tasks]
        try:
            cpu = _interpreted() or not tasks[0][0].is_cuda
            gen_cfg = tuple(self.mod.INTERPRETER_CONFIG) if cpu else self.tuner.candidates[0]
            ref = [(o.float().clone(), l.clone()) for o, l in self._run(name, tasks, scale, gen_cfg)]
            got = [(o.float().clone(), l.clone()) for o, l in self._run(name, tasks, scale, CUDNN)]
        except Exception:  # noqa: BLE001 - cuDNN refusing these shapes means: not a candidate
            return False
        finally:
            for (_, _, o), s in zip(tasks, saved):
                if o is not None:
                    o.copy_(s)
        for (ro, rl), (go, gl) in zip(ref, got):
            finite = torch.isfinite(rl)
            if not torch.equal(finite, torch.isfinite(gl)):
                return False
            if (go - ro).norm() > CUDNN_AGREE_REL * ro.norm() or \
                    (finite.any() and (gl[finite] - rl[finite]).abs().max() > CUDNN_AGREE_LSE):
                return False
        return True

    def _launch(self, name: str, tasks: list, scale: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
        q = tasks[0][0]
        cfg = self._config(name, tasks, scale)
        if cfg == CUDNN and not cudnn_segments.eligible(tasks):
            cfg = self._fallbacks[(name, q.dtype, q.device)]
        with _on_device(q):
            return self._run(name, tasks, scale, cfg)

    def _signature(self, tasks: list) -> tuple:
        return tuple(tuple("causal" if c else "full" for _, _, c in segs) for _, segs, _ in tasks)

    def attention(self, tasks: Sequence[TaskInput], scale: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
        checked = [self._check(t) for t in tasks]
        if not checked:
            return []
        name = self.mod.LAUNCHES.get(self._signature(checked))
        if name is not None:
            return self._write_back(self._launch(name, checked, scale), checked, tasks)
        results = []
        for one in checked:  # a grouping the plan never made: task by task
            single = self.mod.LAUNCHES.get(self._signature([one]))
            results += self._launch(single, [one], scale) if single else [self._by_segment(one, scale)]
        return self._write_back(results, checked, tasks)

    def _by_segment(self, task: tuple, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Fallback: every segment alone (fp32 partials), then the LSE merge (exact, slower)."""
        q, segs, _ = task
        parts = [self._launch(self.mod.LAUNCHES[(("causal" if c else "full",),)],
                              [(q, [(k, v, c)], torch.empty(q.shape, dtype=torch.float32, device=q.device))], scale)[0]
                 for k, v, c in segs]
        if not parts:
            zero = torch.zeros_like(q, memory_format=torch.contiguous_format)
            return zero, torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
        merged, lse = self.merge(torch.stack([o for o, _ in parts]), torch.stack([l for _, l in parts]))
        return merged.to(q.dtype), lse

    @staticmethod
    def _write_back(results: list, checked: list, tasks: Sequence[TaskInput]) -> list:
        """A task whose result did not land in its given out (the fallbacks) gets it copied in."""
        final = []
        for (out, lse), task in zip(results, tasks):
            if task.out is not None and out.data_ptr() != task.out.data_ptr():
                task.out.copy_(out)
                out = task.out
            final.append((out, lse))
        return final

    # -- selection and merge -----------------------------------------------------------------------
    @staticmethod
    def _check_select(n: int, keep: int, pool_window: int, score: str) -> None:
        if not 0 <= keep <= n:
            raise InputError(f"cannot keep {keep} of a {n}-token block", setting="method.passing_tokens")
        if score not in ("query_aware", "key_norm"):
            raise InputError(f"unknown selection score {score!r}", setting="method.selection")
        if pool_window < 1 or pool_window % 2 == 0:
            raise InputError(f"pool window must be odd and >= 1, got {pool_window}", setting="method.pool_window")

    def select(self, q_query: torch.Tensor, k_block: torch.Tensor, v_block: torch.Tensor, keep: int,
               pool_window: int, score: str) -> torch.Tensor:
        self._check_select(k_block.shape[0], keep, pool_window, score)
        args = (_dense_last(q_query), _dense_last(k_block), _dense_last(v_block), keep, pool_window, score)
        with _on_device(k_block):
            return self.mod.select(*args)

    def select_blocks(self, q_query: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      blocks: Sequence[tuple[int, int, int]], pool_window: int, score: str) -> list[torch.Tensor]:
        """Every block's selection, the scored ones in one launch per step (triton_kernels.select_blocks)."""
        for lo, hi, keep in blocks:
            if not 0 <= lo <= hi <= k.shape[0]:
                raise InputError(f"block rows [{lo}, {hi}) outside the {k.shape[0]} local rows", setting="plan")
            self._check_select(hi - lo, keep, pool_window, score)
        with _on_device(k):
            return self.mod.select_blocks(_dense_last(q_query), _dense_last(k), _dense_last(v), list(blocks),
                                          pool_window, score)

    def merge_parts(self, outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two partials are merged where they lie (triton_kernels.merge_parts: no stacked copy)."""
        outs = [_dense_last(o) for o in outs]
        with _on_device(outs[0]):
            return triton_kernels.merge_parts(outs, list(lses))

    def merge(self, outs: torch.Tensor, lses: torch.Tensor, out: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        if outs.dim() != 4 or lses.shape != outs.shape[:3]:
            raise InputError(f"merge takes outs (P, M, Hq, D) and lses (P, M, Hq), got {tuple(outs.shape)} and "
                             f"{tuple(lses.shape)}", setting="plan")
        with _on_device(outs):
            return self.mod.merge(_dense_last(outs), lses, out=out)


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: switch to ``t``'s for the call where it differs
    (a tensor on another GPU than the calling thread's current one); a no-op otherwise."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _dense_last(t: torch.Tensor) -> torch.Tensor:
    """Kernels read any token/head strides in place but need the head dim contiguous."""
    return t if t.stride(-1) == 1 or t.numel() == 0 else t.contiguous()
