"""The on-disk index of a plan family (``<root>/index.json``): one entry per plan, written
atomically under a lock file so several server processes may share a root.

Version 2 (this one) adds to each entry what choosing and the operator need without loading the
plan: ``predicted_us`` (the plan's predicted prefill, the cost the store ranks holders by),
``cached`` (planned on the fly into ``<root>/cache/``: counted against ``max_cached_plans`` and
evictable), ``pinned`` (never evicted automatically) and ``last_used`` (seconds since the epoch,
for least-recently-used eviction).
A version-1 index (written before those fields) is read by taking them from each plan.json.

The operator's operations live here too (find, pin, evict, least-recently-used eviction), on the
root alone: spava_plan.entry.plan_store.PlanStore and the operator CLI (plan_store_cli.py) both call
them. Core-level (no planner import).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from ..errors import ConfigError, PlanFormatError

INDEX_NAME = "index.json"
INDEX_VERSION = 2
READABLE_VERSIONS = (1, 2)
CACHE_DIR = "cache"


@dataclass(frozen=True)
class PlanEntry:
    """One plan of a family, as index.json lists it."""

    hash: str
    path: str  # folder holding plan.json, relative to the index's root (or absolute)
    model: str
    method: str  # the attention method that runs (a short clip's plan may differ from the family's)
    world_size: int
    dtype: str
    frames: int  # frames the plan samples (after padding to the temporal patch)
    resolution: str  # the plan's video.resolution (source size the frames are resized from)
    source_size: tuple[int, int]  # (height, width) of that resolution
    frame_size: tuple[int, int]  # (height, width) after the processor's resize
    total_tokens: int
    max_question_tokens: int
    system_tokens: int
    compat: str  # the family: compat_key of the config it was planned for
    predicted_us: float = 0.0  # predicted prefill makespan (vision encoder included)
    cached: bool = False  # planned on the fly (under cache/): evictable, counted by max_cached_plans
    pinned: bool = False  # never evicted automatically
    last_used: float = 0.0  # time.time() of the last request it served (0: never)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["source_size"], data["frame_size"] = list(self.source_size), list(self.frame_size)
        return data

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> "PlanEntry":
        values = {f.name: data[f.name] for f in dataclasses.fields(PlanEntry) if f.name in data}
        values["source_size"] = tuple(int(x) for x in values["source_size"])
        values["frame_size"] = tuple(int(x) for x in values["frame_size"])
        entry = PlanEntry(**values)
        for f in dataclasses.fields(PlanEntry):  # wrong types would reach comparisons later
            if f.name in ("source_size", "frame_size"):
                continue
            value = getattr(entry, f.name)
            want = {"int": int, "str": str, "float": (int, float), "bool": bool}[str(f.type)]
            if not isinstance(value, want) or (isinstance(value, bool) and f.type != "bool"):
                raise ValueError(f"field {f.name!r} is {value!r}")
        return entry

    def key(self) -> tuple[str, str, str]:
        """Index identity: one plan folder may belong to several families."""
        return (self.hash, self.path, self.compat)


def read_index(root: str | Path) -> list[PlanEntry]:
    """The entries of ``<root>/index.json`` ([] when there is none)."""
    path = Path(root) / INDEX_NAME
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
        version = data.get("version")
        if version not in READABLE_VERSIONS:
            raise ValueError(f"index version {version!r}, expected {INDEX_VERSION}")
        plans = data["plans"]
        if version == 1:
            plans = [_upgraded(Path(root), e) for e in plans]
        return [PlanEntry.from_dict(e) for e in plans]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        why = str(exc).splitlines()[0] if str(exc) else repr(exc)
        raise PlanFormatError(f"cannot read the plan index {str(path)!r}: {why}; remove it or re-plan the family",
                              setting="plan_store") from None


def _upgraded(root: Path, entry: Mapping[str, Any]) -> dict:
    """A version-1 entry with the version-2 fields read from its plan.json (the same numbers
    entry_for takes from the Plan; the plan itself is validated when it is loaded to serve)."""
    folder = Path(entry["path"])
    try:
        plan = json.loads(((folder if folder.is_absolute() else root / folder) / "plan.json").read_text())
        predicted = float(plan["prediction"]["makespan_us"])
    except (OSError, ValueError, KeyError, TypeError):  # ranked last; loading it to serve reports why
        predicted = float("inf")
    return {**entry, "predicted_us": predicted,
            "cached": Path(entry["path"]).parts[:1] == (CACHE_DIR,)}


def write_index(root: str | Path, entries: Sequence[PlanEntry]) -> Path:
    """Write ``<root>/index.json`` atomically (entries sorted, duplicates dropped: the last wins)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    unique = {e.key(): e for e in entries}
    data = {"version": INDEX_VERSION, "plans": [e.to_dict() for _, e in sorted(unique.items())]}
    path = root / INDEX_NAME
    tmp = path.with_name(f".{INDEX_NAME}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


@contextmanager
def locked(root: Path) -> Iterator[None]:
    """An exclusive lock on the index across processes (fcntl where available)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".index.lock", "a") as handle:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: the in-process lock still serialises this process
            pass
        yield


def directory(root: Path, entry: PlanEntry) -> Path:
    """The folder of ``entry`` (its path is relative to the root unless absolute)."""
    path = Path(entry.path)
    return path if path.is_absolute() else Path(root) / path


def find(root: Path, hash_prefix: str) -> list[PlanEntry]:
    """The entries whose plan hash starts with ``hash_prefix`` (one plan, every family it is in);
    ConfigError naming ``hash`` when it names no plan or several."""
    prefix = str(hash_prefix).strip().lower()
    if len(prefix) < 4 or any(c not in "0123456789abcdef" for c in prefix):
        raise ConfigError(f"{str(hash_prefix)[:80]!r} is not a plan hash (at least 4 hex digits)", setting="hash")
    found = [e for e in read_index(root) if e.hash.startswith(prefix)]
    if not found:
        raise ConfigError(f"no plan {prefix!r} in {str(Path(root) / INDEX_NAME)!r}", setting="hash")
    plans = {e.hash for e in found}
    if len(plans) > 1:
        raise ConfigError(f"{prefix!r} names {len(plans)} plans; give more of the hash", setting="hash")
    return found


def set_pinned(root: Path, hash_prefix: str, pinned: bool = True) -> list[PlanEntry]:
    """Pin (or unpin) a plan: a pinned plan is never evicted to make room. Returns its entries."""
    root = Path(root)
    with locked(root):
        hits = {e.key() for e in find(root, hash_prefix)}
        entries = [dataclasses.replace(e, pinned=pinned) if e.key() in hits else e for e in read_index(root)]
        write_index(root, entries)
    return [e for e in entries if e.key() in hits]


def evict(root: Path, hash_prefix: str) -> list[PlanEntry]:
    """Remove a plan from the index, pinned or not (and its folder when it was planned on the fly
    into cache/ and no other entry uses it). Returns the removed entries."""
    root = Path(root)
    with locked(root):
        gone = find(root, hash_prefix)
        keys = {e.key() for e in gone}
        kept = [e for e in read_index(root) if e.key() not in keys]
        write_index(root, kept)
        remove_folders(root, gone, kept)
    return gone


def evict_lru(entries: Sequence[PlanEntry], cap: int, keep: tuple) -> tuple[list[PlanEntry], list[PlanEntry]]:
    """(kept, evicted): the least recently used unpinned cached plans dropped until at most ``cap``
    cached plans remain (``keep``, the key of the plan just added, stays)."""
    cached = [e for e in entries if e.cached]
    over = len(cached) - cap
    if over <= 0:
        return list(entries), []
    victims = sorted((e for e in cached if not e.pinned and e.key() != keep), key=lambda e: (e.last_used, e.hash))
    gone = {e.key() for e in victims[:over]}
    return [e for e in entries if e.key() not in gone], victims[:over]


def remove_folders(root: Path, gone: Sequence[PlanEntry], kept: Sequence[PlanEntry]) -> None:
    """Delete the cache/ folders of ``gone`` that no kept entry uses (never a sweep's folders).
    Call under ``locked(root)``."""
    cache = (Path(root) / CACHE_DIR).resolve()
    used = {directory(root, e).resolve() for e in kept}
    for e in gone:
        folder = directory(root, e).resolve()
        if e.cached and folder.parent == cache and folder not in used:
            shutil.rmtree(folder, ignore_errors=True)
