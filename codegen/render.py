"""Render a plan's Triton kernels: text only, no torch or triton import (planning runs anywhere).

``render_kernels(plan, out_dir)`` writes into ``out_dir`` (``kernels/`` beside plan.json):
  spava_<plan hash[:16]>.py  the generated module: imports triton and the plan-independent
                             kernels (spava_plan.runtime.backends.triton_kernels), holds the rest
  manifest.json              plan hash, cache key, module sha256 and the launch table
Each kernel is whole in one Jinja2 template (templates/attend_task.py.jinja, attend_launch.py.jinja,
and module.py.jinja around them), as FlexAttention keeps its kernels in torch/_inductor/kernel/flex/:
Jinja only for code that differs structurally between plans (how many tasks and segments), tl.constexpr
for the rest. The bytes depend only on the plan and ``cache_key``'s inputs, so rendering twice gives
identical files, and a kernel dir that already holds them is left untouched.

Safety: the templates receive only numbers and identifiers that this module derives from the
plan and checks here (``int`` values, names matching ``_NAME``, masks and dtypes through fixed
tables); the environment's finalize hook refuses anything else at every ``{{ }}``, and
StrictUndefined makes a missing name an error instead of empty text. No string from the config
(model name, paths, device names...) is ever substituted.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import secrets
import stat
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import get_args

import jinja2

from spava_plan.errors import PlanFormatError
from spava_plan.plan import MASKS, DType, Plan, Selection, attended_in_step

RENDER_VERSION = 4  # bump when the rendering logic changes its output (4: Jinja2 templates)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
_HEX = re.compile(r"[0-9a-f]{64}\Z")
# Fixed tables from validated enum values to the identifiers the templates see.
_MASK_IDENT = {"full": "MASK_FULL", "causal": "MASK_CAUSAL"}
# the plan's own vocabularies (spava_plan/plan.py), each name standing for itself in the template
_DTYPES = {d: d for d in get_args(DType)}
_SCORES = {s: s for s in get_args(Selection)}
TEMPLATES = ("module.py.jinja", "attend_task.py.jinja", "attend_launch.py.jinja")
# Files outside codegen that every generated module imports, by (package, file): a change to one
# must re-render (and re-tune) a kernel dir, so each is part of the cache key.
DEPENDENCIES = (("spava_plan.runtime.backends", "triton_kernels.py"),)
# Every plan's module also has the one-segment launches: the backend's fallback for a task
# structure the plan never produced (e.g. one ring step) runs segment by segment and merges.
_BASE_TASKS = (("full",), ("causal",))


def _bad(what: str, value: object) -> PlanFormatError:
    return PlanFormatError(f"cannot render kernels: {what} must be a planner-produced number or identifier, "
                           f"got {value!r}", setting="plan")


def _int(value: object, what: str, minimum: int = 0) -> int:
    if type(value) is not int or value < minimum:
        raise _bad(what, value)
    return value


def _ident(value: object, what: str) -> str:
    if type(value) is not str or not _NAME.match(value):
        raise _bad(what, value)
    return value


def _choice(table: dict[str, str], value: object, what: str) -> str:
    if type(value) is not str or value not in table:
        raise _bad(what, value)
    return table[value]


def _template(name: str) -> str:
    return resources.files("spava_plan.codegen.templates").joinpath(name).read_text(encoding="utf-8")


def _dependency(package: str, name: str) -> bytes:
    return resources.files(package).joinpath(name).read_bytes()


def _renderer_source() -> bytes:
    return Path(__file__).read_bytes()


def cache_key(plan: Plan) -> str:
    """What a kernel dir's module is a function of: the plan's computation hash, the render
    version, this renderer's source, Jinja2's version, every template and every file the module
    imports from the package. A kernel dir whose manifest holds another key is rendered again."""
    h = hashlib.sha256(f"spava-kernels render{RENDER_VERSION} jinja2 {jinja2.__version__}\0".encode())
    h.update(plan.hash.encode() + b"\0")
    h.update(_renderer_source() + b"\0")
    for name in TEMPLATES:
        h.update(name.encode() + b"\0" + _template(name).encode() + b"\0")
    for package, name in DEPENDENCIES:
        h.update(f"{package}/{name}".encode() + b"\0" + _dependency(package, name) + b"\0")
    return h.hexdigest()


def _finalize(value: object) -> object:
    """Every ``{{ }}`` of a template passes here: only ints, bools, identifiers and the plan hash."""
    if isinstance(value, jinja2.Undefined):
        return str(value)  # StrictUndefined: raises UndefinedError naming the missing variable
    if type(value) in (int, bool) or (type(value) is str and (_NAME.match(value) or _HEX.match(value))):
        return value
    raise AssertionError(f"template value {value!r} is not a number or identifier")  # render.py validates first


@functools.lru_cache(maxsize=None)
def _environment(texts: tuple[tuple[str, str], ...]) -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.DictLoader(dict(texts)), undefined=jinja2.StrictUndefined,
                              finalize=_finalize, autoescape=False, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True)


# ---- what the plan asks for -----------------------------------------------------------------
@dataclass(frozen=True)
class Launch:
    name: str
    tasks: tuple[tuple[str, ...], ...]  # masks of each task's segments
    used_by: tuple[tuple[int, tuple[str, ...]], ...]  # (rank, task names) that run this launch


def _task_masks(plan: Plan, rank: int, task_name: str, step: int = -1) -> tuple[str, ...]:
    """The masks of a task's KV sources: all of them, or (step >= 0) those it attends in that ring step."""
    for task in plan.ranks[rank].tasks:
        if task.name == task_name:
            return tuple(_mask(ref.mask) for ref in task.kv
                         if step < 0 or attended_in_step(ref.kind, ref.owner, rank, plan.world_size, step))
    raise PlanFormatError(f"rank {rank}'s schedule names task {task_name!r}, which it does not have",
                          setting="plan")


def _mask(value: object) -> str:
    if type(value) is not str or value not in MASKS:
        raise _bad("a KV segment mask", value)
    return value


def launches(plan: Plan) -> tuple[Launch, ...]:
    """Every fused launch the plan's ranks make, deduplicated by structure, in first-use order.

    Per rank: the whole rank in one launch (the fused forward), each schedule "attend" op (a ring
    step's op with the sources of that step only, as the runtime calls it, tasks with none left
    out), and every task alone; plus the one-segment launches every module carries.
    """
    order: list[tuple[tuple[str, ...], ...]] = []
    users: dict[tuple[tuple[str, ...], ...], list[tuple[int, tuple[str, ...]]]] = {}

    def add(sig: tuple[tuple[str, ...], ...], rank: int, names: tuple[str, ...]) -> None:
        if sig not in users:
            order.append(sig)
            users[sig] = []
        if rank >= 0:
            users[sig].append((rank, names))

    for rp in plan.ranks:
        rank = _int(rp.rank, "a rank id")
        names = tuple(_ident(t.name, "an attention task name") for t in rp.tasks)
        masks = {t.name: tuple(_mask(ref.mask) for ref in t.kv) for t in rp.tasks}
        groups: list[tuple[str, ...]] = [names] if len(names) > 1 else []
        if rank < len(plan.schedule):
            for op in plan.schedule[rank].ops:
                if op.name == "attend" and op.kind == "compute":
                    group = tuple(_ident(n, "an attention task name") for n in op.tasks)
                    step = _int(op.step, "a ring step", -1)
                    if step < 0:
                        groups.append(group)
                        continue
                    # a ring step: only that step's sources, tasks left with none dropped
                    stepped = {n: _task_masks(plan, rank, n, step) for n in group}
                    group = tuple(n for n in group if stepped[n])
                    if group:
                        add(tuple(stepped[n] for n in group), rank, group)
        groups += [(n,) for n in names]
        for group in groups:
            sig = tuple(masks[n] if n in masks else _task_masks(plan, rank, n) for n in group)
            if all(len(s) > 0 for s in sig):
                add(sig, rank, group)
    for base in _BASE_TASKS:
        add((base,), -1, ())
    return tuple(Launch(f"attend_{i}", sig, tuple(users[sig])) for i, sig in enumerate(order))


# ---- rendering --------------------------------------------------------------------------------
def _context(plan: Plan, lst: tuple[Launch, ...]) -> dict:
    """The templates' whole input: ints, bools and identifiers, all validated above or here."""
    model = plan.model
    d = _int(model.head_dim, "model.head_dim", 16)
    hq = _int(model.num_heads, "model.num_heads", 1)
    hkv = _int(model.num_kv_heads, "model.num_kv_heads", 1)
    if hq % hkv or d & (d - 1):
        raise PlanFormatError(f"cannot render kernels for Hq={hq}, Hkv={hkv}, D={d}: the kernels need Hkv to "
                              f"divide Hq and a power-of-two head dim", setting="model")
    if type(plan.hash) is not str or not _HEX.match(plan.hash):
        raise _bad("the plan hash", plan.hash)
    structures: dict[tuple[str, ...], dict] = {}  # task structure -> its function, in first-use order
    for launch in lst:
        for masks in launch.tasks:
            if masks not in structures:
                structures[masks] = {"name": f"_task_{len(structures)}",
                                     "segments": tuple({"mask": m, "causal": m == "causal"} for m in masks)}
    return {
        "plan_hash": plan.hash, "head_dim": d, "gqa_group": hq // hkv, "q_heads": hq, "kv_heads": hkv,
        "world": _int(plan.world_size, "world_size", 1), "dtype": _choice(_DTYPES, plan.dtype, "dtype"),
        "pool_window": _int(plan.selection.pool_window, "selection.pool_window", 1),
        "select_score": _choice(_SCORES, plan.selection.score, "selection.score"),
        "tasks": tuple(structures.values()),
        "launches": tuple({"name": _ident(x.name, "a launch name"), "tasks": tuple(structures[m] for m in x.tasks),
                           "signature": tuple(tuple(_MASK_IDENT[m] for m in masks) for masks in x.tasks)}
                          for x in lst),
    }


def render_source(plan: Plan) -> tuple[str, tuple[Launch, ...]]:
    """The generated module's text and the launches it holds."""
    lst = launches(plan)
    context = _context(plan, lst)
    env = _environment(tuple((name, _template(name)) for name in TEMPLATES))
    return env.get_template("module.py.jinja").render(context), lst


def module_file(plan: Plan) -> str:
    return f"spava_{plan.hash[:16]}.py"


def render_kernels(plan: Plan, out_dir: Path) -> Path:
    """Write the plan's kernel module and manifest into out_dir; returns the module's path.

    The module is rendered in memory every time (a few ms) and compared with what out_dir holds:
    identical files are left as they are (one rendering per plan and installation in effect),
    anything else (another plan, another installation's templates or helpers, an edit) is rewritten.
    """
    out_dir = Path(out_dir)
    source, lst = render_source(plan)  # validates the plan before anything is written
    module_path = out_dir / module_file(plan)
    manifest_path = out_dir / "manifest.json"
    manifest = {
        "plan_hash": plan.hash,
        "cache_key": cache_key(plan),
        "module": module_path.name,
        "module_sha256": hashlib.sha256(source.encode()).hexdigest(),
        "launches": [{"name": x.name, "tasks": [list(m) for m in x.tasks],
                      "used_by": [{"rank": r, "tasks": list(names)} for r, names in x.used_by]} for x in lst],
    }
    manifest_text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    if _holds(module_path, source) and _holds(manifest_path, manifest_text):
        return module_path
    out_dir.mkdir(parents=True, exist_ok=True)
    _write(module_path, source)
    _write(manifest_path, manifest_text)
    for stale in out_dir.glob("spava_*.py"):  # an earlier plan's module (the dir is re-planned in place)
        if stale != module_path:
            stale.unlink(missing_ok=True)
    return module_path


def _holds(path: Path, text: str) -> bool:
    """Whether path is a regular file with exactly these bytes (anything else, a FIFO included,
    is not read but replaced)."""
    data = text.encode()
    try:
        info = os.stat(path)
        return stat.S_ISREG(info.st_mode) and info.st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False


def _write(path: Path, text: str) -> None:
    """Atomic: a reader (another rank) never sees a half-written file. The temporary file has a
    random name and is created exclusively (O_EXCL: a planted link there is not followed), with
    the permissions a plain open() gives (the umask applies)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
