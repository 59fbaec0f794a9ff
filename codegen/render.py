"""Render a plan's Triton kernels: text only, no torch or triton import (planning runs anywhere).

``render_kernels(plan, out_dir)`` writes into ``out_dir`` (``kernels/`` beside plan.json):
  spava_<plan hash[:16]>.py  the generated module: imports triton and the plan-independent
                             kernels (spava_plan.runtime.backends.triton_kernels), holds the rest
  manifest.json              plan hash, template digest, module sha256 and the launch table
The bytes depend only on the plan and the template files, so rendering twice gives identical
files; a kernel dir whose manifest already names this plan and these templates is left as is.

Safety: the templates receive only numbers and identifiers that this module derives from the
plan and checks here (``int`` values, names matching ``_NAME``, masks and dtypes through fixed
tables). No string from the config (model name, paths, device names...) is ever substituted.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template
from typing import Iterable, get_args

from spava_plan.errors import PlanFormatError
from spava_plan.plan import MASKS, DType, Plan, Selection, attended_in_step

RENDER_VERSION = 3  # bump when the rendering logic (not the templates) changes its output
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
_HEX = re.compile(r"[0-9a-f]{64}\Z")
# Fixed tables from validated enum values to the identifiers the templates see.
_MASK_IDENT = {"full": "MASK_FULL", "causal": "MASK_CAUSAL"}
_CAUSAL_FLAG = {"full": "False", "causal": "True"}
# the plan's own vocabularies (spava_plan/plan.py), each name standing for itself in the template
_DTYPES = {d: d for d in get_args(DType)}
_SCORES = {s: s for s in get_args(Selection)}
_TEMPLATES = ("module.py.tmpl", "task.py.tmpl", "task_segment.py.tmpl", "launch.py.tmpl", "launch_task.py.tmpl")
# Every plan's module also has the one-segment launches: the backend's fallback for a task
# structure the plan never produced (e.g. one ring step) runs segment by segment and merges.
_BASE_TASKS = (("full",), ("causal",))


class _Code(str):
    """Text produced by ``_fill`` (so it may be nested into another template)."""


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


def template_digest() -> str:
    h = hashlib.sha256(f"render{RENDER_VERSION}".encode())
    for name in _TEMPLATES:
        h.update(name.encode() + b"\0" + _template(name).encode() + b"\0")
    return h.hexdigest()


def _fill(name: str, **values: object) -> _Code:
    """Substitute only ints, checked identifiers, tuples of identifiers and nested _Code."""
    text = {}
    for key, value in values.items():
        if isinstance(value, _Code):
            text[key] = value
        elif type(value) is int:
            text[key] = str(value)
        elif type(value) is str and _NAME.match(value):
            text[key] = value
        elif type(value) is tuple and all(type(v) is str and _NAME.match(v) for v in value):
            text[key] = " ".join(value)
        else:  # internal invariant: callers validate plan values before they get here
            raise AssertionError(f"template value {key}={value!r} is not a number or identifier")
    return _Code(Template(_template(name)).substitute(text))


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
def _arg_line(indent: int, names: Iterable[str]) -> str:
    """One line of a parameter/argument list: names built here from ints, so identifiers only."""
    names = tuple(names)
    assert all(_NAME.match(n) for n in names), names
    return " " * indent + ", ".join(names) + ",\n"


def _segment_names(prefix: str, s: int) -> tuple[str, ...]:
    """K/V pointers, length and strides of segment s, as named in task.py.tmpl's legend."""
    return tuple(f"{prefix}{x}" for x in (f"k{s}_ptr", f"v{s}_ptr", f"n{s}", f"sk{s}_t", f"sk{s}_h",
                                          f"sv{s}_t", f"sv{s}_h"))


def _launch_segment_names(t: int, s: int) -> tuple[str, ...]:
    return tuple(f"t{t}_{x}" for x in (f"k{s}", f"v{s}", f"n{s}", f"sk{s}_t", f"sk{s}_h", f"sv{s}_t", f"sv{s}_h"))


def _task_function(name: str, masks: tuple[str, ...]) -> _Code:
    params = _Code("".join(_arg_line(8, _segment_names("", s)) for s in range(len(masks))).rstrip("\n"))
    segments = _Code("".join(_fill("task_segment.py.tmpl", S=s, MASK=m, CAUSAL=_CAUSAL_FLAG[m])
                             for s, m in enumerate(masks)).rstrip("\n"))
    return _fill("task.py.tmpl", NAME=name, SEGMENTS=len(masks), MASKS=masks, SEGMENT_PARAMS=params,
                 SEGMENTS_CODE=segments)


def _launch_kernel(launch: Launch, task_fns: dict[tuple[str, ...], str], shapes: dict[str, int]) -> _Code:
    params, bodies = [], []
    for t, masks in enumerate(launch.tasks):
        params.append(_arg_line(8, (f"t{t}_{x}" for x in ("q", "sq_t", "sq_h", "o", "so_t", "so_h", "lse", "sl_t",
                                                           "sl_h", "M"))))
        params += [_arg_line(8, _launch_segment_names(t, s)) for s in range(len(masks))]
        args = [_arg_line(12, (f"t{t}_{x}" for x in ("lse", "sl_t", "sl_h", "M")))]
        args += [_arg_line(12, _launch_segment_names(t, s)) for s in range(len(masks))]
        bodies.append(_fill("launch_task.py.tmpl", T=t, TASK_FN=task_fns[masks], ARGS=_Code("".join(args).rstrip("\n"))))
    comment = tuple(task_fns[m] for m in launch.tasks)
    return _fill("launch.py.tmpl", NAME=launch.name, TASKS=len(launch.tasks), COMMENT=comment,
                 TASK_PARAMS=_Code("".join(params).rstrip("\n")), TASKS_CODE=_Code("".join(bodies).rstrip("\n")),
                 **shapes)


def _signature(tasks: Iterable[tuple[str, ...]]) -> _Code:
    def tup(items: list[str]) -> str:
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"

    return _Code(tup([tup([_MASK_IDENT[m] for m in masks]) for masks in tasks]))


def render_source(plan: Plan) -> tuple[str, tuple[Launch, ...]]:
    """The generated module's text and the launches it holds."""
    model = plan.model
    d = _int(model.head_dim, "model.head_dim", 16)
    hq = _int(model.num_heads, "model.num_heads", 1)
    hkv = _int(model.num_kv_heads, "model.num_kv_heads", 1)
    if hq % hkv or d & (d - 1):
        raise PlanFormatError(f"cannot render kernels for Hq={hq}, Hkv={hkv}, D={d}: the kernels need Hkv to "
                              f"divide Hq and a power-of-two head dim", setting="model")
    plan_hash = plan.hash
    if not _HEX.match(plan_hash):
        raise _bad("the plan hash", plan_hash)
    lst = launches(plan)
    task_sigs: list[tuple[str, ...]] = []
    for launch in lst:
        for masks in launch.tasks:
            if masks not in task_sigs:
                task_sigs.append(masks)
    task_fns = {masks: f"_task_{i}" for i, masks in enumerate(task_sigs)}
    shapes = {"HEAD_DIM": d, "GQA_GROUP": hq // hkv}
    task_code = _Code("\n\n".join(_task_function(task_fns[m], m) for m in task_sigs).rstrip("\n"))
    launch_code = _Code("\n\n".join(_launch_kernel(launch, task_fns, shapes) for launch in lst).rstrip("\n"))
    table = _Code("\n".join(f'    {_signature(launch.tasks)}: "{_ident(launch.name, "a launch name")}",'
                            for launch in lst))
    source = _fill(
        "module.py.tmpl", PLAN_HASH=_Code(plan_hash),
        Q_HEADS=hq, KV_HEADS=hkv, **shapes, WORLD=_int(plan.world_size, "world_size", 1),
        DTYPE=_choice(_DTYPES, plan.dtype, "dtype"),
        POOL_WINDOW=_int(plan.selection.pool_window, "selection.pool_window", 1),
        SELECT_SCORE=_choice(_SCORES, plan.selection.score, "selection.score"),
        TASK_FUNCTIONS=task_code, LAUNCH_KERNELS=launch_code, LAUNCH_TABLE=table)
    return source, lst


def render_kernels(plan: Plan, out_dir: Path) -> Path:
    """Write the plan's kernel module and manifest into out_dir; returns the module's path.

    Cached by plan hash: when out_dir already holds this plan's module rendered from the same
    templates (checked through the manifest and the module's sha256), nothing is rewritten.
    """
    out_dir = Path(out_dir)
    digest = template_digest()
    module_path = out_dir / f"spava_{plan.hash[:16]}.py"
    manifest_path = out_dir / "manifest.json"
    if _cached(manifest_path, module_path, plan.hash, digest):
        return module_path
    source, lst = render_source(plan)
    manifest = {
        "plan_hash": plan.hash,
        "template_digest": digest,
        "module": module_path.name,
        "module_sha256": hashlib.sha256(source.encode()).hexdigest(),
        "launches": [{"name": x.name, "tasks": [list(m) for m in x.tasks],
                      "used_by": [{"rank": r, "tasks": list(names)} for r, names in x.used_by]} for x in lst],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    _write(module_path, source)
    _write(manifest_path, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    for stale in out_dir.glob("spava_*.py"):  # an earlier plan's module (the dir is re-planned in place)
        if stale != module_path:
            stale.unlink(missing_ok=True)
    return module_path


def _cached(manifest_path: Path, module_path: Path, plan_hash: str, digest: str) -> bool:
    try:
        manifest = json.loads(manifest_path.read_text())
        body = module_path.read_bytes()
    except (OSError, ValueError):
        return False
    return (isinstance(manifest, dict) and manifest.get("plan_hash") == plan_hash
            and manifest.get("template_digest") == digest and manifest.get("module") == module_path.name
            and manifest.get("module_sha256") == hashlib.sha256(body).hexdigest())


def _write(path: Path, text: str) -> None:
    """Atomic: a reader (another rank) never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
