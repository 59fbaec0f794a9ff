"""Plan families for deployment: pick the smallest plan that holds a request, or plan one on the
fly and cache it on disk by hash.

    store = PlanStore("plans/", ["model=qwen2_5vl_3b", "gpus=8"])      # or a SpavaConfig
    plan = store.plan_for(frames=96, height=720, width=1280, question_tokens=20)
    entry = store.choose(frames=96, height=720, width=1280, question_tokens=20)
    entry = store.choose_for_clip("clip.mp4", question_tokens=20)   # frames at video.fps, like the processor
    entry.plan, entry.directory                  # the Plan and its folder (plan.json, kernels/)
    entry.frames, entry.frame_size               # what the caller feeds it: see "Holding" below
    # e.g. runtime.video_io.read_frames(clip, entry.frames, size=entry.frame_size)

A family is a directory with an ``index.json`` at its root, one entry per plan; ``spava-plan -m
frames=64,128,256,512 video.resolution=720p,1080p`` writes one at the sweep root (cli.py's
SweepSummary calls ``write_index``). Plans planned on the fly go under ``<root>/cache/<hash16>/``
(plan.json, and kernels/ when the base config has kernels=true) and are added to the same index,
so the next request of that shape reuses them. The index is rewritten atomically under a lock
file, so several server processes may share a root.

Holding: a plan holds a request (``frames`` sampled frames of ``height`` x ``width`` source
pixels, a question of ``question_tokens`` tokens) when
  - it was planned for the same computation apart from the video's shape: the same model, method,
    topology and world size, dtype, solver and system prompt length (``compat_key``);
  - its padded frame count is at least the request's (the caller then samples ``entry.frames``
    frames from the clip: denser sampling, nothing dropped);
  - its resized frame is at least the request's resized frame on both sides (the caller scales
    the sampled frames to ``entry.frame_size``, the size the processor gives the plan's frames:
    an upscale, nothing dropped; a different aspect ratio is stretched);
  - its ``video.max_question_tokens`` is at least ``question_tokens`` (shorter questions run on
    the same plan, see runtime/attention.py).
Among the plans that hold it, the one with the fewest tokens wins (then fewer frames, then hash).
If none does and ``plan_on_the_fly`` is on, the base config is planned with the request's frame
count, resolution and max(base, request) question capacity; if it is off, ``NoPlanFitsError``
names the setting to change.

Dependency rule (tests/test_planner_deps.py): this module calls the planner and codegen, so it
is an entry-point-level module like spava_plan.cli and spava_plan.run (it wires stages
together), not part of the core; core modules never import it. It stays torch-free: planning a
request's plan runs on the light dependencies.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from .config import SpavaConfig, config_to_dict
from .errors import InputError, PlanFormatError, SpavaError
from .plan import Plan, split_config
from .plan_load import load_plan

INDEX_NAME = "index.json"
INDEX_VERSION = 1
CACHE_DIR = "cache"
# Config keys that describe the video's shape (what a family varies), left out of compat_key.
SHAPE_KEYS = (("video", "frames"), ("video", "resolution"), ("video", "max_question_tokens"), ("video", "fps"),
              ("video", "path"), ("frames",), ("kernels",))


class NoPlanFitsError(SpavaError):
    """No plan of the family holds the request and planning on the fly is off."""


@dataclass(frozen=True)
class PlanEntry:
    """One plan of a family, as index.json lists it."""

    hash: str
    path: str  # folder holding plan.json, relative to the index's root (or absolute)
    model: str
    method: str
    world_size: int
    dtype: str
    frames: int  # frames the plan samples (after padding to the temporal patch)
    resolution: str  # the plan's video.resolution (source size the frames are resized from)
    source_size: tuple[int, int]  # (height, width) of that resolution
    frame_size: tuple[int, int]  # (height, width) after the processor's resize
    total_tokens: int
    max_question_tokens: int
    system_tokens: int
    compat: str  # compat_key of the plan's config

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["source_size"], data["frame_size"] = list(self.source_size), list(self.frame_size)
        return data

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> "PlanEntry":
        names = {f.name for f in dataclasses.fields(PlanEntry)}
        values = {k: data[k] for k in names}
        values["source_size"] = tuple(int(x) for x in values["source_size"])
        values["frame_size"] = tuple(int(x) for x in values["frame_size"])
        return PlanEntry(**values)


@dataclass(frozen=True)
class StoredPlan:
    """The answer to a request: the plan, where it lives, and how to feed it."""

    plan: Plan
    directory: Path  # holds plan.json (and kernels/ when rendered)
    entry: PlanEntry
    planned_now: bool  # planned on the fly by this call

    @property
    def frames(self) -> int:
        """Frames to sample from the clip for this plan."""
        return self.entry.frames

    @property
    def frame_size(self) -> tuple[int, int]:
        """(height, width) to scale the sampled frames to (the processor then keeps that size)."""
        return self.entry.frame_size


def compat_key(config: SpavaConfig | Mapping[str, Any]) -> str:
    """Hash of a config's computation (deployment settings and the video's shape left out): plans
    with equal keys form one family. ``plan.config`` is already the computation part."""
    if isinstance(config, SpavaConfig):
        config = split_config(config_to_dict(config))[0]
    data = json.loads(json.dumps(dict(config)))
    for path in SHAPE_KEYS:
        node = data
        for key in path[:-1]:
            node = node.get(key, {})
        node.pop(path[-1], None)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def entry_for(plan: Plan, directory: str | Path, root: str | Path | None = None) -> PlanEntry:
    """The index entry of ``plan`` stored in ``directory`` (made relative to ``root`` when inside it)."""
    directory = Path(directory).resolve()
    path = str(directory)
    if root is not None:
        try:
            path = str(directory.relative_to(Path(root).resolve()))
        except ValueError:
            pass
    lay, video = plan.layout, plan.video
    return PlanEntry(hash=plan.hash, path=path, model=plan.model.name, method=plan.method,
                     world_size=plan.world_size, dtype=plan.dtype, frames=lay.frames,
                     resolution=str(plan.config["video"]["resolution"]), source_size=tuple(video.source_size),
                     frame_size=tuple(lay.frame_size), total_tokens=lay.total_tokens,
                     max_question_tokens=video.max_question_tokens, system_tokens=video.system_tokens,
                     compat=compat_key(plan.config))


def read_index(root: str | Path) -> list[PlanEntry]:
    """The entries of ``<root>/index.json`` ([] when there is none)."""
    path = Path(root) / INDEX_NAME
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
        if data.get("version") != INDEX_VERSION:
            raise ValueError(f"index version {data.get('version')!r}, expected {INDEX_VERSION}")
        return [PlanEntry.from_dict(e) for e in data["plans"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PlanFormatError(f"cannot read the plan index {str(path)!r}: {str(exc).splitlines()[0] if str(exc) else exc!r}; "
                              f"remove it or re-plan the family", setting="plan_store") from None


def write_index(root: str | Path, entries: Sequence[PlanEntry]) -> Path:
    """Write ``<root>/index.json`` atomically (entries sorted by hash, duplicates dropped)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    unique = {(e.hash, e.path): e for e in entries}
    data = {"version": INDEX_VERSION, "plans": [e.to_dict() for _, e in sorted(unique.items())]}
    path = root / INDEX_NAME
    tmp = path.with_name(f".{INDEX_NAME}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """An exclusive lock on the index across processes (fcntl where available)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".index.lock", "a") as handle:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: the in-process lock still serialises this process
            pass
        yield


class PlanStore:
    """A family of plans under ``root`` for one deployment (``base_config``).

    ``base_config``: a SpavaConfig, or spava-plan overrides (``["model=qwen2_5vl_3b", "gpus=8"]``)
    composed like the command line. Its model, topology, method, dtype, solver and
    video.system_tokens define the family; its video.max_question_tokens is the smallest question
    capacity planned on the fly. Thread-safe; the on-disk index is shared safely between processes.
    """

    def __init__(self, root: str | Path, base_config: SpavaConfig | Sequence[str] = (), *,
                 plan_on_the_fly: bool = True):
        if not isinstance(base_config, SpavaConfig):
            from .hydra_conf import compose_config

            base_config = compose_config(list(base_config))
        self.root = Path(root)
        self.base = base_config
        self.plan_on_the_fly = plan_on_the_fly
        self.compat = compat_key(base_config)
        self._lock = threading.Lock()
        self._plans: dict[str, Plan] = {}

    # -- reading ----------------------------------------------------------------------------------
    def entries(self) -> list[PlanEntry]:
        """Every plan of the index that belongs to this family."""
        return [e for e in read_index(self.root) if e.compat == self.compat]

    def directory(self, entry: PlanEntry) -> Path:
        path = Path(entry.path)
        return path if path.is_absolute() else self.root / path

    def _load(self, entry: PlanEntry) -> Plan:
        plan = self._plans.get(entry.hash)
        if plan is None:
            plan = load_plan(self.directory(entry) / "plan.json")
            if plan.hash != entry.hash:
                raise PlanFormatError(f"{self.directory(entry) / 'plan.json'} holds plan {plan.hash[:12]} but the "
                                      f"index lists {entry.hash[:12]}; re-plan the family", setting="plan_store")
            self._plans[entry.hash] = plan
        return plan

    # -- choosing ---------------------------------------------------------------------------------
    def resized(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) the processor resizes a ``height`` x ``width`` frame to for this model."""
        from .planner.layout import smart_resize

        vis = self.base.model.vision
        if self.base.model.family == "internvl3":
            return (vis.tile_size, vis.tile_size)
        return smart_resize(height, width, vis.factor, vis.min_pixels, vis.max_pixels)

    def padded_frames(self, frames: int) -> int:
        if self.base.model.family == "internvl3":
            return frames
        tp = self.base.model.vision.temporal_patch
        return -(-frames // tp) * tp

    def fitting(self, frames: int, height: int, width: int, question_tokens: int) -> list[PlanEntry]:
        """The family's plans that hold the request, smallest first."""
        _check_request(frames, height, width, question_tokens)
        want_frames = self.padded_frames(frames)
        want_h, want_w = self.resized(height, width)
        fits = [e for e in self.entries()
                if e.frames >= want_frames and e.frame_size[0] >= want_h and e.frame_size[1] >= want_w
                and e.max_question_tokens >= question_tokens]
        return sorted(fits, key=lambda e: (e.total_tokens, e.frames, e.hash))

    def choose(self, frames: int, height: int, width: int, question_tokens: int) -> StoredPlan:
        """The smallest plan that holds the request (planned on the fly and cached if none does)."""
        with self._lock:
            fits = self.fitting(frames, height, width, question_tokens)
            if fits:
                return StoredPlan(self._load(fits[0]), self.directory(fits[0]), fits[0], False)
            if not self.plan_on_the_fly:
                have = ", ".join(sorted({f"{e.frames}f {e.resolution} q<={e.max_question_tokens}"
                                         for e in self.entries()})) or "none"
                raise NoPlanFitsError(
                    f"no plan in {str(self.root)!r} holds {frames} frames of {height}x{width} with a {question_tokens}-"
                    f"token question (family plans: {have}); plan one with spava-plan frames={frames} "
                    f"video.resolution={height}x{width} video.max_question_tokens={question_tokens} into the family, "
                    f"or turn on planning on the fly", setting="plan_on_the_fly")
            return self._plan_now(frames, height, width, question_tokens)

    def choose_for_clip(self, path: str | Path, question_tokens: int) -> StoredPlan:
        """``choose`` for a video file: its size from the metadata and the frame count the model's
        processor samples at the base config's video.fps (spava_plan.video_meta; PyAV, no decode).
        A missing or unreadable file is an InputError naming ``video``."""
        from .video_meta import frames_for_rate, probe_clip

        info = probe_clip(path, setting="video")
        video = self.base.video
        tp = 1 if self.base.model.family == "internvl3" else self.base.model.vision.temporal_patch
        frames = frames_for_rate(info.total_frames, info.fps, video.fps, min_frames=video.min_frames,
                                 max_frames=video.max_frames, temporal_patch=tp)
        if frames < 1:
            raise InputError(f"{str(path)!r} has {info.total_frames} frames, fewer than one temporal patch ({tp})",
                             setting="video")
        return self.choose(frames, info.height, info.width, question_tokens)

    def plan_for(self, frames: int, height: int, width: int, question_tokens: int) -> Plan:
        """The Plan of ``choose``."""
        return self.choose(frames, height, width, question_tokens).plan

    # -- planning on the fly ------------------------------------------------------------------------
    def config_for(self, frames: int, height: int, width: int, question_tokens: int) -> SpavaConfig:
        """The base config planned for this request's shape."""
        video = dataclasses.replace(self.base.video, frames=int(frames), resolution=f"{int(height)}x{int(width)}",
                                    max_question_tokens=max(self.base.video.max_question_tokens,
                                                            int(question_tokens)), path=None)
        return dataclasses.replace(self.base, video=video)  # the frames= shorthand follows video.frames

    def _plan_now(self, frames: int, height: int, width: int, question_tokens: int) -> StoredPlan:
        from .planner.build import build_plan

        cfg = self.config_for(frames, height, width, question_tokens)
        plan = build_plan(cfg)  # a SpavaError (does not fit, too few grids...) reaches the caller as is
        target = self.root / CACHE_DIR / plan.hash[:16]
        with _locked(self.root):
            if not (target / "plan.json").is_file():
                self._write(plan, cfg, target)
            entry = entry_for(plan, target, self.root)
            write_index(self.root, [e for e in read_index(self.root) if e.hash != plan.hash] + [entry])
        self._plans[plan.hash] = plan
        return StoredPlan(plan, target, entry, True)

    @staticmethod
    def _write(plan: Plan, cfg: SpavaConfig, target: Path) -> None:
        """plan.json (+ kernels/) into ``target``, all or nothing (built aside, then renamed)."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".plan-", dir=target.parent))
        try:
            plan.save(tmp / "plan.json")
            if cfg.kernels:
                from .codegen.render import render_kernels

                render_kernels(plan, tmp / "kernels")
            if target.exists():
                shutil.rmtree(target)  # an incomplete folder without plan.json
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _check_request(frames: int, height: int, width: int, question_tokens: int) -> None:
    for name, value in (("frames", frames), ("height", height), ("width", width),
                        ("question_tokens", question_tokens)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"the request's {name} must be a positive integer, got {value!r}", setting="video")
