"""Reading plan.json: trust nothing in the file.

A plan file may be foreign, truncated, edited and re-hashed, or hostile. ``load_plan`` turns every
such file into ONE ``PlanFormatError`` line that names the field, and returns only plans whose
every invariant the runtime and codegen rely on holds:

1. bounded reading: regular files only (a FIFO or ``plan=/dev/urandom`` is refused at once, the
   open never blocks), at most ``MAX_PLAN_BYTES`` (checked before reading), no duplicate keys
   (json would keep the last silently), no NaN/Infinity literals, JSON nesting bounded by the parser's recursion
   limit and, in the free-form config, by ``MAX_DEPTH``;
2. the schema version (an int, this version);
3. types, then the content hash: every field is rebuilt from the dataclass annotations of
   spava_plan/plan.py (int is not bool, floats are finite, Literal vocabularies, tuple lengths), the stored config is
   validated by the config schema and must agree with the plan;
4. invariants (``check_plan``): sizes and bounds, segments inside the layout, ranks == world
   size, hosts placed once, every task, KV source, selection, collective and schedule op
   referring to things that exist, local rows computed exactly once.

The checks walk the schema, not the data, so their depth is bounded whatever the file holds.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import functools
import json
import math
import os
import stat
import typing
from pathlib import Path
from typing import Any, Mapping, get_args

from .config import to_config
from .errors import PlanFormatError, SpavaError
from .links import ALL_GATHER, ALL_REDUCE, BROADCAST, P2P, plan_links
from .passing_scan import scan_time_us
from .plan import DTYPE_BYTES, SCHEMA_VERSION, ComputeOp, ModelSpec, Plan, RankPlan, content_hash, merge_config

# plan.json of the largest plans the planner accepts (a 1024-GPU ring) is tens of MB.
MAX_PLAN_BYTES = 512 << 20
MAX_INT = 1 << 62  # beyond this an integer is not a size or a count
MAX_STR = 4096
MAX_DEPTH = 64  # JSON nesting a plan never exceeds (the schema is about 8 levels deep)


class _Bad(Exception):
    """A field that fails its check: ``path`` names it, ``why`` says what is wrong."""

    def __init__(self, path: str, why: str):
        super().__init__(f"{path}: {why}")
        self.path, self.why = path, why


def _fail(path: str, why: str) -> typing.NoReturn:
    raise _Bad(path, why)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# -- 1. bounded reading -------------------------------------------------------------------------
def _no_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} (plans hold finite numbers only)")


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of JSON data, counted without recursion and given up past ``limit``."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > limit:
                break
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


class _Duplicate(ValueError):
    """A JSON object that names a key twice (json keeps the last one silently)."""


def _unique_keys(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise _Duplicate(f"duplicate key {_show(key)} in one object (a plan names every field once)")
    return out


def read_regular_file(path: str | Path, limit: int, *, setting: str = "plan", what: str = "a plan file") -> bytes:
    """The bytes of ``path``, which must be a regular file of at most ``limit`` bytes: a FIFO, a
    device or a socket is refused at once without blocking on the open (O_NONBLOCK), the size is
    checked by fstat of what was opened before anything is read, and the read itself is bounded
    (a file that grows after the check). Every failure is one PlanFormatError naming ``setting``.
    For any file a user or a peer hands over (plan.json, a plan family's index.json)."""
    shown = repr(str(path))
    try:
        # O_NONBLOCK: opening a FIFO for reading otherwise waits for a writer, forever
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise PlanFormatError(f"no {what.removeprefix('a ')} at {shown}", setting=setting) from None
    except OSError as exc:
        raise PlanFormatError(f"cannot read {shown} as {what}: {exc.strerror or exc}", setting=setting) from None
    try:
        st = os.fstat(fd)  # of what was opened: no window between the check and the read
        if stat.S_ISDIR(st.st_mode):
            raise PlanFormatError(f"{shown} is a folder, not {what}", setting=setting)
        if not stat.S_ISREG(st.st_mode):
            raise PlanFormatError(f"{shown} is not a regular file (a FIFO, device or socket): not {what}",
                                  setting=setting)
        if st.st_size > limit:
            raise PlanFormatError(f"{shown} is larger than {limit >> 20} MiB: not {what}", setting=setting)
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read(limit + 1)
    except OSError as exc:
        raise PlanFormatError(f"cannot read {shown} as {what}: {exc.strerror or exc}", setting=setting) from None
    finally:
        os.close(fd)
    if len(raw) > limit:
        raise PlanFormatError(f"{shown} is larger than {limit >> 20} MiB: not {what}", setting=setting)
    return raw


def read_plan_json(path: str | Path) -> Any:
    """The JSON of a plan file (read_regular_file), duplicate keys refused."""
    shown = repr(str(path))
    raw = read_regular_file(path, MAX_PLAN_BYTES)
    try:
        # the C parser is bounded by the interpreter's recursion limit (RecursionError below)
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise PlanFormatError(f"cannot read {shown} as a plan: {first}", setting="plan") from None


# -- 3. types from the annotations ----------------------------------------------------------------
class _At(Exception):
    """Unwinding a failed check: ``parts`` is the field path from the failure outwards (built
    only on failure, so the walk over a large plan formats no strings)."""

    def __init__(self, why: str):
        self.why, self.parts = why, []


def _within(part: str, check: Any, value: Any) -> Any:
    try:
        return check(value)
    except _At as at:
        at.parts.append(part)
        raise


@functools.lru_cache(maxsize=None)
def _checker(hint: Any) -> Any:
    """value -> the typed value, or _At; one closure per annotation, built once."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _dataclass_checker(hint)
    if origin is typing.Literal:
        allowed = frozenset(args)
        expected = ", ".join(map(repr, args))

        def literal(v: Any) -> Any:
            if type(v) is not str or v not in allowed:
                raise _At(f"must be one of {expected}, got {_show(v)}")
            return v
        return literal
    if hint is bool:
        def boolean(v: Any) -> Any:
            if type(v) is not bool:
                raise _At(f"must be true or false, got {_show(v)}")
            return v
        return boolean
    if hint is int:
        def integer(v: Any) -> Any:
            if type(v) is not int or not -MAX_INT <= v <= MAX_INT:
                raise _At(f"must be an integer within +-2^62, got {_show(v)}")
            return v
        return integer
    if hint is float:
        def number(v: Any) -> Any:
            t = type(v)
            if t is float:
                if not math.isfinite(v) or abs(v) > 1e300:
                    raise _At(f"must be a finite number, got {_show(v)}")
                return v
            if t is int and abs(v) <= MAX_INT:
                return float(v)
            raise _At(f"must be a finite number, got {_show(v)}")
        return number
    if hint is str:
        def string(v: Any) -> Any:
            if type(v) is not str or len(v) > MAX_STR or "\n" in v:
                raise _At(f"must be a one-line string of at most {MAX_STR} characters, got {_show(v)}")
            return v
        return string
    if isinstance(hint, type) and issubclass(hint, tuple) and hasattr(hint, "_fields"):  # a NamedTuple
        parts_nt = tuple(_checker(h) for h in typing.get_type_hints(hint).values())

        def named(v: Any) -> Any:
            if type(v) is not list or len(v) != len(parts_nt):
                raise _At(f"must be a list of {len(parts_nt)} items ({', '.join(hint._fields)}), got {_show(v)}")
            return hint(*(_within(f"[{i}]", c, x) for i, (c, x) in enumerate(zip(parts_nt, v))))
        return named
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        item = _checker(args[0])

        def items(v: Any) -> Any:
            if type(v) is not list:
                raise _At(f"must be a list, got {_show(v)}")
            try:
                return tuple([item(x) for x in v])
            except _At:
                for i, x in enumerate(v):  # the failing index, found again only on failure
                    _within(f"[{i}]", item, x)
                raise AssertionError("unreachable")
        return items
    if origin is tuple:
        parts = tuple(_checker(a) for a in args)

        def fixed(v: Any) -> Any:
            if type(v) is not list or len(v) != len(parts):
                raise _At(f"must be a list of {len(parts)} items, got {_show(v)}")
            return tuple(_within(f"[{i}]", c, x) for i, (c, x) in enumerate(zip(parts, v)))
        return fixed
    if origin in (collections.abc.Mapping, dict) or hint is Mapping:
        value_hint = args[1] if len(args) == 2 else Any

        def mapping(v: Any) -> Any:
            if type(v) is not dict:
                raise _At(f"must be an object, got {_show(v)}")
            if value_hint is Any:  # config / deployment: validated by the config schema (_check_config)
                if _depth(v, MAX_DEPTH) > MAX_DEPTH:
                    raise _At(f"is nested deeper than {MAX_DEPTH} levels")
                return dict(v)
            check = _checker(value_hint)
            return {k: _within(f".{k}", check, x) for k, x in v.items()}
        return mapping
    raise AssertionError(f"plan_load cannot check the annotation {hint!r}")  # a schema bug


def _dataclass_checker(cls: type) -> Any:
    hints = typing.get_type_hints(cls)
    fields = [(f.name, f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)  # type: ignore[misc]
              for f in dataclasses.fields(cls)]
    names = frozenset(n for n, _ in fields)
    checks = {n: _checker(hints[n]) for n, _ in fields}

    def build(v: Any) -> Any:
        if type(v) is not dict:
            raise _At(f"must be an object, got {_show(v)}")
        if len(v) > len(names) or not names.issuperset(v):
            unknown = sorted(str(k) for k in v if k not in names)
            raise _At(f"has no field {unknown[0][:40]!r} ({cls.__name__})")
        kwargs = {}
        for name, required in fields:
            if name in v:
                kwargs[name] = _within(f".{name}", checks[name], v[name])
            elif required:
                at = _At("is missing")
                at.parts.append(f".{name}")
                raise at
        return cls(**kwargs)
    return build


def _build_plan(data: dict) -> Plan:
    try:
        return _checker(Plan)(data)
    except _At as at:
        raise _Bad("".join(reversed(at.parts)).lstrip("."), at.why) from None


# -- 4. invariants ----------------------------------------------------------------------------------
def _need(ok: bool, path: str, why: str) -> None:
    if not ok:
        _fail(path, why)


def _span(span: tuple[int, int], lo: int, hi: int, path: str, *, empty: bool = False) -> None:
    a, b = span
    _need(lo <= a and b <= hi and (a < b or (empty and a == b)), path,
          f"token range [{a}, {b}) must lie within [{lo}, {hi}){'' if empty else ' and be non-empty'}")


def _contiguous(rank: RankPlan, start: int, stop: int, path: str) -> None:
    """Tokens [start, stop) are held by ``rank`` as one run of local rows (the runtime views them
    as one slice)."""
    for a, b in rank.local:
        if a <= start and stop <= b:
            return
    _fail(path, f"tokens [{start}, {stop}) are not one contiguous run of rank {rank.rank}'s local sequence")


# KV source fields a kind does not use, with the values they must keep.
_UNUSED = {
    "local": {"slot": -1, "rank_start": 0, "rank_stop": 0, "keep": 0, "owner": -1},
    "passing": {"start": 0, "stop": 0, "owner": -1},
    "remote": {"slot": -1, "rank_start": 0, "rank_stop": 0, "keep": 0},
    "anchor": {"slot": -1, "rank_start": 0, "rank_stop": 0, "keep": 0, "owner": 0},
}


def check_plan(plan: Plan) -> None:
    """Every invariant the runtime and codegen rely on (raises _Bad naming the field)."""
    W, m, lay = plan.world_size, plan.model, plan.layout
    _need(1 <= W <= 1 << 16, "world_size", f"must be within 1..65536, got {W}")
    for name in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                 "vocab_size"):
        _need(1 <= getattr(m, name) <= 1 << 24, f"model.{name}", f"must be within 1..2^24, got {getattr(m, name)}")
    _need(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads", "must divide model.num_heads")
    _need(m.head_dim % 2 == 0, "model.head_dim", "must be even")
    rs = m.rope_scaling
    _need(1.0 <= rs.factor <= 1e6 and (rs.rope_type != "default" or rs.factor == 1.0), "model.rope_scaling.factor",
          f"must be within 1..1e6 (1.0 for rope_type default), got {rs.factor!r}")
    _need(1 <= rs.original_max_positions <= 1 << 40, "model.rope_scaling.original_max_positions",
          f"must be within 1..2^40, got {rs.original_max_positions}")

    total = lay.total_tokens
    _need(1 <= total <= 1 << 40, "layout.total_tokens", f"must be within 1..2^40, got {total}")
    _need(lay.context_tokens >= 0 and lay.query_tokens >= 1 and lay.context_tokens + lay.query_tokens == total,
          "layout.total_tokens", "must equal layout.context_tokens + layout.query_tokens (query_tokens >= 1)")
    for name in ("video_tokens", "frames", "anchor_tokens", "passing_tokens"):
        _need(0 <= getattr(lay, name) <= total if name != "frames" else getattr(lay, name) >= 1,
              f"layout.{name}", f"is out of range: {getattr(lay, name)}")
    _need(all(x >= 1 for x in lay.grid_thw), "layout.grid_thw", "must be positive")
    # the frame-parallel vision encoder gives every rank at least one temporal grid
    # (InternVL3's video tokens also hold each frame's text, whose length varies with the frame number)
    _need((lay.grid_thw[0] >= W or plan.method == "dense_tp")  # dense_tp: every rank encodes every grid
          and (plan.model.family == "internvl3" or lay.video_tokens % lay.grid_thw[0] == 0),
          "layout.grid_thw",
          f"needs at least world_size={W} temporal grids that divide layout.video_tokens")
    _need(all(x >= 1 for x in lay.frame_size), "layout.frame_size", "must be positive")
    V = lay.virtual_hosts
    _need(1 <= V <= 64 * W, "layout.virtual_hosts", f"must be within 1..{64 * W}, got {V}")
    names: set[str] = set()
    hosts_seen: set[int] = set()
    query_seg = None
    for i, seg in enumerate(lay.segments):
        p = f"layout.segments[{i}]"
        _need(seg.name not in names, f"{p}.name", f"{seg.name!r} appears twice")
        names.add(seg.name)
        _span((seg.start, seg.stop), 0, total, p)
        _need(seg.keep >= 0, f"{p}.keep", "must be >= 0")
        if seg.kind in ("block", "chunk"):
            _need(0 <= seg.host < V and seg.host not in hosts_seen, f"{p}.host",
                  f"must be a virtual host in 0..{V - 1} owning one block, got {seg.host}")
            hosts_seen.add(seg.host)
        else:
            _need(seg.host == -1, f"{p}.host", f"must be -1 for a {seg.kind} segment")
            _need(seg.name == seg.kind, f"{p}.name", f"must be {seg.kind!r}")
        if seg.kind == "query":
            query_seg = seg
        _need(all(0 <= a <= b for a, b in zip(seg.pos_min, seg.pos_max)), f"{p}.pos_max",
              "position bounds must satisfy 0 <= pos_min <= pos_max")
    _need(len(hosts_seen) == V, "layout.segments", f"must hold one block per virtual host ({V})")
    if query_seg is not None:
        _need((query_seg.start, query_seg.stop) == (lay.context_tokens, total), "layout.segments",
              "the query segment must cover [context_tokens, total_tokens)")

    pl = plan.placement
    _need(len(pl.host_rank) == V and all(0 <= r < W for r in pl.host_rank), "placement.host_rank",
          f"must give each of the {V} virtual hosts a rank in 0..{W - 1}")
    _need(len(pl.host_cost) in (0, V), "placement.host_cost", f"must have {V} entries")

    _need(len(plan.ranks) == W, "ranks", f"must hold world_size={W} ranks, got {len(plan.ranks)}")
    _need(len(plan.schedule) == W, "schedule", f"must hold world_size={W} ranks, got {len(plan.schedule)}")
    _need(len(pl.rank_base) in (0, W), "placement.rank_base", f"must have {W} entries")

    colls: dict[str, Any] = {}
    select_slots: dict[int, Any] = {}
    for i, c in enumerate(plan.collectives):
        p = f"collectives[{i}]"
        _need(c.name not in colls, f"{p}.name", f"{c.name!r} appears twice")
        colls[c.name] = c
        _need(c.rows_per_rank >= 0 and c.bytes_per_rank >= 0 and c.time_us >= 0, p, "sizes and times must be >= 0")
        if c.kind == "select_all_gather":
            _need(c.slot >= 0 and c.slot not in select_slots, f"{p}.slot", "must be a distinct slot >= 0")
            select_slots[c.slot] = c
        else:
            _need(c.slot == -1, f"{p}.slot", f"must be -1 for a {c.kind} collective")
            if c.kind == "all_reduce":  # dense_tp: one after o_proj, one after the MLP, of the whole prompt
                _need(plan.method == "dense_tp" and c.name in ("reduce_attn", "reduce_mlp")
                      and c.rows_per_rank == total, p, "all_reduce collectives are dense_tp's reduce_attn and "
                      "reduce_mlp over every token")
            else:
                _need(sum(x.kind == c.kind for x in plan.collectives) == 1, f"{p}.kind", f"a plan has one {c.kind}")
    for i, c in enumerate(plan.collectives):  # timed by the one communication model
        if c.kind == "select_scan":
            want = scan_time_us(plan.links, c.bytes_per_rank, V, W)
        elif c.kind == "anchor_broadcast":
            want = plan.links.transfer_us(BROADCAST, c.bytes_per_rank, W)
        else:
            kind = {"ring": P2P, "all_reduce": ALL_REDUCE}.get(c.kind, ALL_GATHER)
            want = plan.links.transfer_us(kind, c.bytes_per_rank, W)
        _need(math.isclose(c.time_us, want, rel_tol=1e-9, abs_tol=1e-9),
              f"collectives[{i}].time_us", "must be the plan's links' time for its bytes")
    query = next((c for c in plan.collectives if c.kind == "query_all_gather"), None)
    ring = next((c for c in plan.collectives if c.kind == "ring"), None)
    scan = next((c for c in plan.collectives if c.kind == "select_scan"), None)
    anchor = next((c for c in plan.collectives if c.kind == "anchor_broadcast"), None)
    if anchor is not None:  # the anchor is the prompt's first tokens, held whole by rank 0
        _need(W > 1 and 1 <= anchor.rows_per_rank <= lay.context_tokens, "collectives.anchor.rows_per_rank",
              "a broadcast anchor needs several ranks and lies within the context")
        _need(anchor.bytes_per_rank == anchor.rows_per_rank * m.num_kv_heads * 2 * m.head_dim * DTYPE_BYTES[plan.dtype],
              "collectives.anchor.bytes_per_rank", "must be the anchor's packed K|V rows")
        _contiguous(plan.ranks[0], 0, anchor.rows_per_rank, "collectives.anchor")
    anchor_span = (0, anchor.rows_per_rank) if anchor is not None else (0, 0)

    def in_anchor(span: tuple[int, int]) -> bool:
        return anchor_span[0] <= span[0] <= span[1] <= anchor_span[1] and anchor_span[1] > 0
    _need(scan is None or not select_slots, "collectives", "a plan passes per block or through one scan, not both")
    if query is not None:
        _need(query_seg is not None and query.rows_per_rank == query_seg.length, "collectives.query.rows_per_rank",
              "must equal the query segment's length")

    placed: dict[int, int] = {}
    for r, rp in enumerate(plan.ranks):
        p = f"ranks[{r}]"
        _need(rp.rank == r, f"{p}.rank", f"must be {r}")
        for h in rp.hosts:
            _need(0 <= h < V and h not in placed and pl.host_rank[h] == r, f"{p}.hosts",
                  f"host {h} must be a virtual host placed on rank {r} (placement.host_rank) and listed once")
            placed[h] = r
        ends = sorted(rp.local)
        for j, span in enumerate(rp.local):
            _span(span, 0, total, f"{p}.local[{j}]")
        _need(all(a[1] <= b[0] for a, b in zip(ends, ends[1:])), f"{p}.local", "token ranges must not overlap")
        n_local = rp.local_tokens
        if ring is not None:
            _need(n_local <= ring.rows_per_rank, "collectives.ring.rows_per_rank",
                  f"must hold rank {r}'s {n_local} local tokens")
        for j, span in enumerate(rp.cache):
            _span(span, 0, total, f"{p}.cache[{j}]", empty=True)
            if span[0] < span[1] and not (r != 0 and in_anchor(span)):  # received anchor rows are cached too
                _contiguous(rp, *span, f"{p}.cache[{j}]")
        # global passing: every host slot of the rank feeds the one scan
        slot_colls = select_slots if scan is None else {s: scan for s in range(len(rp.hosts))}
        for j, (slot, a, b, keep) in enumerate(rp.select):  # SelectBlock
            q = f"{p}.select[{j}]"
            _need(slot in slot_colls, q, f"slot {slot} has no select_all_gather collective")
            _need(0 <= slot < len(rp.hosts), q, f"slot {slot} must index this rank's hosts")
            _need(keep == slot_colls[slot].rows_per_rank and 0 <= keep <= b - a, q,
                  "keep must equal its collective's rows_per_rank and fit the block")
            _span((a, b), 0, total, q)
            _contiguous(rp, a, b, q)
        if rp.select:
            _need(query_seg is not None and any(a <= query_seg.start < b for a, b in rp.local), f"{p}.select",
                  "selection needs the query segment in this rank's local sequence")
        task_names: set[str] = set()
        covered = []
        for j, t in enumerate(rp.tasks):
            q = f"{p}.tasks[{j}]"
            _need(t.name not in task_names, f"{q}.name", f"{t.name!r} appears twice")
            task_names.add(t.name)
            _span((t.q_start, t.q_stop), 0, total, q)
            _contiguous(rp, t.q_start, t.q_stop, q)
            covered.append(rp.local_offset(t.q_start))
            covered.append(rp.local_offset(t.q_stop - 1) + 1)
            if t.merge == "query":
                _need(query is not None, f"{q}.merge", "needs a query_all_gather collective")
            for k, ref in enumerate(t.kv):
                s = f"{q}.kv[{k}]"
                unused = _UNUSED[ref.kind]
                _need(all(getattr(ref, f) == v for f, v in unused.items()), s,
                      f"a {ref.kind} source leaves {', '.join(unused)} at their defaults")
                if ref.kind == "passing":
                    c = slot_colls.get(ref.slot)
                    _need(c is not None, f"{s}.slot", f"slot {ref.slot} has no select_all_gather collective")
                    _need(scan is None or (ref.rank_start, ref.rank_stop) == (0, 1), s,
                          "a scan's passing buffer is named [0, 1) (one buffer of keep rows)")
                    _need(0 <= ref.rank_start < ref.rank_stop <= W, s, f"ranks [{ref.rank_start}, {ref.rank_stop}) "
                          f"must lie within [0, {W}) and be non-empty")
                    _need(ref.keep == c.rows_per_rank, f"{s}.keep", "must equal its collective's rows_per_rank")
                elif ref.kind == "local":
                    _span((ref.start, ref.stop), 0, total, s)
                    _contiguous(rp, ref.start, ref.stop, s)
                elif ref.kind == "anchor":
                    _need(anchor is not None and r != 0, s,
                          "an anchor source needs an anchor_broadcast collective, on a rank other than 0")
                    _need(ref.start < ref.stop and in_anchor((ref.start, ref.stop)), s,
                          f"must lie within the broadcast anchor [0, {anchor_span[1]})")
                else:
                    _need(ring is not None, s, "a remote source needs a ring collective")
                    _need(0 <= ref.owner < W, f"{s}.owner", f"must be a rank in 0..{W - 1}")
                    _span((ref.start, ref.stop), 0, total, s)
                    _contiguous(plan.ranks[ref.owner], ref.start, ref.stop, s)
        pairs = sorted(zip(covered[::2], covered[1::2]))
        at = 0
        for a, b in pairs:
            _need(a == at, f"{p}.tasks", f"local row {min(a, at)} is {'computed twice' if a < at else 'not computed'}")
            at = b
        _need(at == n_local, f"{p}.tasks", f"local rows {at}..{n_local} are not computed by any task")

        sched = plan.schedule[r]
        _need(sched.rank == r, f"schedule[{r}].rank", f"must be {r}")
        _need(math.isfinite(sched.layer_us) and sched.layer_us >= 0 and sched.exposed_comm_us >= 0,
              f"schedule[{r}]", "times must be >= 0")
        started: set[tuple[str, int]] = set()
        for j, op in enumerate(sched.ops):
            q = f"schedule[{r}].ops[{j}]"
            _need(0 <= op.start_us <= op.end_us and op.flops >= 0 and op.bytes >= 0, q,
                  "needs 0 <= start_us <= end_us and non-negative work")
            _need(-1 <= op.step < W, f"{q}.step", f"must be within -1..{W - 1}")
            if op.kind == "compute":
                _need(op.name in get_args(ComputeOp), f"{q}.name", f"must be one of {', '.join(get_args(ComputeOp))}")
                _need(op.stream == "compute", f"{q}.stream", "a compute op runs on the compute stream")
                _need(op.name == "attend" or (not op.tasks and op.step == -1), q,
                      "only attend ops carry tasks and a ring step")
                _need(op.name == "merge" or not op.collective, f"{q}.collective", "only merge ops name a collective")
                for name in op.tasks:
                    _need(name in task_names, f"{q}.tasks", f"task {name!r} is not a task of rank {r}")
                if op.name == "merge":
                    _need(query is not None and op.collective == query.name, f"{q}.collective",
                          "merge needs the query_all_gather collective")
                if op.name == "select":
                    _need(bool(rp.select), q, "select needs ranks[r].select")
                if op.name == "attend" and op.step >= 0:
                    _need(ring is not None, f"{q}.step", "ring steps need a ring collective")
            else:
                _need(op.collective in colls, f"{q}.collective", f"{op.collective!r} is not a collective")
                _need(op.stream == "comm" and not op.tasks, q, "a communication op runs on the comm stream, no tasks")
                is_ring = colls[op.collective].kind == "ring"
                _need((op.step >= 1) if is_ring else (op.step == -1), f"{q}.step",
                      "ring steps count from 1; other collectives have step -1")
                verb = "start" if op.kind == "comm_start" else "wait"
                expected = f"{verb}:{op.collective}{op.step if is_ring else ''}"
                _need(op.name == expected, f"{q}.name", f"must be {expected!r}")
                key = (op.collective, op.step)
                if op.kind == "comm_start":
                    _need(key not in started, q, "starts a collective that is already in flight")
                    started.add(key)
                    if colls[op.collective].kind == "select_all_gather":
                        _need(colls[op.collective].slot in {s.slot for s in rp.select}, q,
                              "this rank selects nothing for that collective")
                    if colls[op.collective].kind == "select_scan":
                        _need(len(rp.select) == len(rp.hosts), q, "every host of the rank feeds the scan")
                else:
                    _need(key in started, q, "waits on a collective that was not started")
                    started.discard(key)
        _need(not started, f"schedule[{r}].ops", f"collectives {sorted(started)} are started but never waited on")

    sel, vid, links = plan.selection, plan.video, plan.links
    _need(1 <= sel.pool_window <= 1 << 16 and sel.pool_window % 2 == 1, "selection.pool_window",
          f"must be a positive odd integer, got {sel.pool_window}")
    _need(links.gbps > 0 and links.latency_us >= 0, "links", "needs gbps > 0 and latency_us >= 0")
    _need(vid.fps > 0 and min(vid.frames, vid.spatial_merge, vid.temporal_patch, *vid.source_size) >= 1,
          "video", "frames, source_size, fps, spatial_merge and temporal_patch must be positive")
    _need(vid.frames <= lay.frames, "video.frames", "must not exceed layout.frames (the padded count)")
    _need(vid.system_tokens >= 0 and vid.system_tokens + lay.video_tokens <= lay.context_tokens, "video.system_tokens",
          "the video after the system tokens must lie inside the context")
    _need(1 <= vid.max_question_tokens < lay.query_tokens, "video.max_question_tokens",
          "the question must fit inside the query block")
    _need(1 <= vid.min_pixels <= vid.max_pixels and min(vid.tile_size, vid.tile_tokens) >= 1
          and vid.frame_text_tokens >= 0, "video",
          "needs 1 <= min_pixels <= max_pixels, tile_size and tile_tokens >= 1, frame_text_tokens >= 0")

    pred = plan.prediction
    _need(len(pred.rank_us) == W and len(pred.peak_memory_bytes) == W, "prediction",
          f"rank_us and peak_memory_bytes must have world_size={W} entries")
    _need(all(x >= 0 for x in pred.rank_us + pred.peak_memory_bytes + tuple(pred.memory_breakdown.values()))
          and min(pred.makespan_us, pred.vision_us, pred.exposed_comm_us) >= 0, "prediction", "must be >= 0")
    _need(all(x >= 0 for x in pl.host_cost + pl.rank_base) and pl.makespan >= 0 and pl.lower_bound >= 0, "placement",
          "costs must be >= 0")


def _check_config(plan: Plan) -> None:
    """The stored config is a valid config of this version, and it agrees with the plan."""
    if not isinstance(plan.deployment, dict):
        _fail("deployment", "must be an object")
    try:
        cfg = to_config(merge_config(plan.config, plan.deployment))
    except SpavaError as exc:
        _fail(f"config.{exc.setting}" if exc.setting else "config", str(exc))
    except Exception as exc:  # OmegaConf on arbitrary data: any failure is a malformed config
        _fail("config", f"is not a valid config ({type(exc).__name__})")
    _need(cfg.method.name == plan.method, "method", f"must match config.method.name ({cfg.method.name!r})")
    _need(cfg.dtype == plan.dtype, "dtype", f"must match config.dtype ({cfg.dtype!r})")
    for name in ("name", "family", "num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads",
                 "head_dim", "vocab_size"):
        _need(getattr(cfg.model, name) == getattr(plan.model, name), f"model.{name}",
              f"must match config.model.{name} ({getattr(cfg.model, name)!r})")
    _need(ModelSpec.from_config(cfg.model) == plan.model, "model",
          "must match config.model (RoPE, tie_word_embeddings and model.vision included)")
    _need(plan.world_size <= cfg.topology.gpus, "world_size", "must not exceed config.topology.gpus")
    t = cfg.topology
    _need(plan.links == plan_links(world=plan.world_size, gpus=t.gpus, nodes=t.num_nodes, gpus_per_node=t.gpus_per_node,
                                   intra_node_gbps=t.intra_node_gbps, inter_node_gbps=t.inter_node_gbps,
                                   link_latency_us=t.link_latency_us), "links", "must match the config's topology")
    _need((cfg.method.selection, cfg.method.pool_window) == (plan.selection.score, plan.selection.pool_window),
          "selection", "must match config.method.selection and pool_window")
    kinds = {c.kind for c in plan.collectives}
    _need(("select_scan" not in kinds or cfg.method.passing == "global")
          and ("select_all_gather" not in kinds or cfg.method.passing == "per_block"), "collectives",
          f"must match config.method.passing ({cfg.method.passing!r})")
    _need(cfg.vision.parallel == plan.vision_parallel, "vision_parallel",
          f"must match config.vision.parallel ({cfg.vision.parallel!r})")
    _need("anchor_broadcast" not in kinds or cfg.method.anchor == "broadcast", "collectives",
          f"an anchor_broadcast collective must match config.method.anchor ({cfg.method.anchor!r})")
    v, vis, pv = cfg.video, cfg.model.vision, plan.video
    _need((v.frames, v.size, v.system_tokens, v.max_question_tokens, vis.spatial_merge, vis.temporal_patch,
           vis.min_pixels, vis.max_pixels, vis.tile_size, vis.tile_tokens, vis.frame_text_tokens,
           vis.cap_pixels_per_frame, vis.max_video_tokens)
          == (pv.frames, pv.source_size, pv.system_tokens, pv.max_question_tokens, pv.spatial_merge, pv.temporal_patch,
              pv.min_pixels, pv.max_pixels, pv.tile_size, pv.tile_tokens, pv.frame_text_tokens,
              pv.cap_pixels_per_frame, pv.max_video_tokens)
          and v.fps == pv.fps, "video", "must match the config's video and model.vision settings")


# -- entry points -------------------------------------------------------------------------------------
def plan_from_dict(data: Any, *, source: str = "plan") -> Plan:
    if not isinstance(data, dict):
        raise PlanFormatError(f"{source} does not hold a plan object", setting="plan")
    version = data.get("schema_version")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise PlanFormatError(f"{source} has schema version {_show(version)} but this spava-plan reads version "
                              f"{SCHEMA_VERSION}; re-plan it with this version", setting="plan")
    try:
        # types first: the walk follows the schema, so it is bounded whatever the file holds
        plan = _build_plan({k: v for k, v in data.items() if k != "hash"})
        stored = data.get("hash")
        if not isinstance(stored, str) or stored != content_hash(data):
            raise PlanFormatError(f"{source} fails its content hash (edited or corrupted); re-plan it",
                                  setting="plan")
        check_plan(plan)
        _check_config(plan)
    except PlanFormatError:
        raise
    except _Bad as bad:
        raise PlanFormatError(f"{source} is inconsistent: field {bad.path} {bad.why}; re-plan it",
                              setting="plan") from None
    except (TypeError, ValueError, RecursionError) as exc:  # e.g. keys that JSON cannot sort
        raise PlanFormatError(f"{source} is malformed ({type(exc).__name__}); re-plan it", setting="plan") from None
    plan.__dict__["hash"] = stored  # the hash just verified (cached_property slot)
    return plan


def load_plan(path: str | Path) -> Plan:
    """Read plan.json back into a Plan equal to the one that was saved."""
    return plan_from_dict(read_plan_json(path), source=str(path))
