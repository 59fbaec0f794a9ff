"""Plan families for deployment: pick the cheapest plan that holds a request, or plan one on the
fly (the fastest method that holds it, short clips included) and cache it on disk by hash.

    store = PlanStore("plans/", ["model=qwen2_5vl_3b", "gpus=8"])      # or a SpavaConfig
    plan = store.plan_for(frames=96, height=720, width=1280, question_tokens=20)
    entry = store.choose(frames=96, height=720, width=1280, question_tokens=20)
    entry = store.choose_for_clip("clip.mp4", question_tokens=20)   # frames at video.fps, like the processor
    entry.plan, entry.directory, entry.method    # the Plan, its folder (plan.json, kernels/), its method
    entry.frames, entry.frame_size               # what the caller feeds it: see "Holding" below
    # e.g. runtime.video_io.read_frames(clip, entry.frames, size=entry.frame_size)
    store.list_plans(); store.pin("3fa2"); store.evict("3fa2")      # the operator's view (hash prefixes)
    # python -m spava_plan.entry.plan_store list|pin|unpin|evict plan_dir=DIR [HASH]   (plan_store_cli.py)

A family is a directory with an ``index.json`` at its root (spava_plan/entry/plan_index.py), one entry
per plan; ``spava-plan -m frames=64,128,256,512 video.resolution=720p,1080p`` writes one at the
sweep root (cli.py's SweepSummary calls ``write_index``). Plans planned on the fly go under
``<root>/cache/<hash16>/`` (plan.json, and kernels/ when the base config has kernels=true) and are
added to the same index, so the next request of that shape reuses them, also after a restart.

Holding: a plan holds a request (``frames`` sampled frames of ``height`` x ``width`` source
pixels, a question of ``question_tokens`` tokens) when
  - it belongs to the family: planned for the base config's model, topology, dtype, solver and
    system prompt length (``compat_key``; its method and rank count may be a short input's fit);
  - it covers the request: at least the request's padded frame count (the caller then samples
    ``entry.frames`` frames from the clip: denser sampling, nothing dropped), a resized frame at
    least the request's on both sides (the caller scales the sampled frames to
    ``entry.frame_size``: an upscale, a different aspect ratio stretched) and a
    ``video.max_question_tokens`` of at least ``question_tokens``;
  - it is within one **bucket step** of the request: its total tokens are at most BUCKET_STEP (2)
    times the request's own (the tokens a plan of exactly the request's shape, with
    max(base, request) question capacity, would have). A plan twice the size of a clip never runs
    it, so one large request cannot slow every small one (plan-family poisoning).
Among the plans that hold it, the one with the smallest predicted prefill wins (then fewer
tokens, then hash): the cost model ranks them, not their size.

Planning on the fly (no plan holds the request, ``plan_on_the_fly``): the request's bucket is
planned: its frames rounded up to the next power of two of the temporal patch (2, 4, 8, ..., the
steps of conf/deploy/family.yaml; fewer than 2x the frames, so within the step), its own
resolution, max(base, request) question capacity. When that input is too short for the base
method (blocks under the selection tile, fewer grids than ranks), planner/fit.py's ``fit_config``
picks the fastest config that holds it (fewer virtual hosts, a smaller anchor, fewer ranks,
zigzag_ring or dense on one rank), so no clip of at least one frame is refused for being short.
Caps: a plan of more than ``max_plan_tokens`` tokens is not planned on the fly
(NoPlanFitsError naming the setting); at most ``max_cached_plans`` plans live under cache/: adding
one evicts the least recently used unpinned cached plan, and when every cached plan is pinned the
request is refused naming the setting. Plans of a sweep (not under cache/) are the operator's and
never evicted automatically. With ``plan_on_the_fly`` off, NoPlanFitsError names what to plan.

``same_world=True``: only plans on the base config's rank count (a torchrun world whose runtime
cannot run a smaller plan on a subset of its ranks).

Dependency rule (tests/test_planner_deps.py): this module calls the planner and codegen, so it
is an entry-point-level module like spava_plan.entry.cli and spava_plan.entry.run (it wires stages
together), not part of the core; core modules never import it. It stays torch-free: planning a
request's plan runs on the light dependencies.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from . import plan_index
from ..codegen.render import render_kernels
from ..config import SpavaConfig, config_to_dict
from ..errors import ConfigError, InputError, PlanFormatError, SpavaError
from ..hydra_conf import compose_config
from ..plan import Plan, split_config
from .plan_index import CACHE_DIR, INDEX_NAME, INDEX_VERSION, PlanEntry, locked, read_index, write_index
from ..plan_load import load_plan
from ..planner.build import build_plan
from ..planner.fit import fit_config
from ..planner.layout import smart_resize, token_layout
from ..video_meta import frames_for_rate, probe_clip

__all__ = ["BUCKET_STEP", "CACHE_DIR", "INDEX_NAME", "INDEX_VERSION", "NoPlanFitsError", "PlanEntry", "PlanStore",
           "StoredPlan", "bucket_frames", "compat_key", "entry_for", "read_index", "write_index"]

BUCKET_STEP = 2.0  # a plan holds a request only up to this many times the request's own tokens
MAX_CACHED_PLANS = 16
MAX_PLAN_TOKENS = 1 << 20  # ~1M tokens: about 768 frames at 1080p on the Qwen2-VL family
# Config keys that describe the video's shape (what a family varies), left out of compat_key.
SHAPE_KEYS = (("video", "frames"), ("video", "resolution"), ("video", "max_question_tokens"), ("video", "fps"),
              ("video", "path"), ("frames",), ("kernels",))


class NoPlanFitsError(SpavaError):
    """No plan of the family holds the request and none may be planned for it."""


@dataclass(frozen=True)
class StoredPlan:
    """The answer to a request: the plan, where it lives, and how to feed it."""

    plan: Plan
    directory: Path  # holds plan.json (and kernels/ when rendered)
    entry: PlanEntry
    planned_now: bool  # planned on the fly by this call
    notes: tuple[str, ...] = ()  # what planning on the fly chose and why (a short input's fit)

    @property
    def frames(self) -> int:
        """Frames to sample from the clip for this plan."""
        return self.entry.frames

    @property
    def frame_size(self) -> tuple[int, int]:
        """(height, width) to scale the sampled frames to (the processor then keeps that size)."""
        return self.entry.frame_size

    @property
    def method(self) -> str:
        """The attention method that serves the request (what the response reports)."""
        return self.plan.method


def compat_key(config: SpavaConfig | Mapping[str, Any]) -> str:
    """Hash of a config's computation (deployment settings and the video's shape left out): plans
    with equal keys form one family (a stored plan's key: compat_key(plan.source_config())."""
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


def entry_for(plan: Plan, directory: str | Path, root: str | Path | None = None, *, family: str | None = None,
              cached: bool = False) -> PlanEntry:
    """The index entry of ``plan`` stored in ``directory`` (made relative to ``root`` when inside
    it). ``family``: the family's compat_key when the plan was fitted for it (another method or
    rank count than the family's config); default: the plan's own."""
    directory = Path(directory).resolve()
    path = str(directory)
    if root is not None:
        try:
            path = str(directory.relative_to(Path(root).resolve()))
        except ValueError:
            pass
    lay, video, source = plan.layout, plan.video, plan.source_config()
    return PlanEntry(hash=plan.hash, path=path, model=plan.model.name, method=plan.method,
                     world_size=plan.world_size, dtype=plan.dtype, frames=lay.frames,
                     resolution=str(source.video.resolution), source_size=tuple(video.source_size),
                     frame_size=tuple(lay.frame_size), total_tokens=lay.total_tokens,
                     max_question_tokens=video.max_question_tokens, system_tokens=video.system_tokens,
                     compat=family or compat_key(source), predicted_us=float(plan.prediction.makespan_us),
                     cached=cached)


def bucket_frames(frames: int, temporal_patch: int) -> int:
    """The next power of two of the temporal patch at or above ``frames`` (2, 4, 8, 16, ...)."""
    units = -(-frames // temporal_patch)
    return temporal_patch * (1 << (units - 1).bit_length())


class PlanStore:
    """A family of plans under ``root`` for one deployment (``base_config``).

    ``base_config``: a SpavaConfig, or spava-plan overrides (``["model=qwen2_5vl_3b", "gpus=8"]``)
    composed like the command line. Its model, topology, method, dtype, solver and
    video.system_tokens define the family; its video.max_question_tokens is the smallest question
    capacity planned on the fly. Thread-safe; the on-disk index is shared safely between processes.
    """

    def __init__(self, root: str | Path, base_config: SpavaConfig | Sequence[str] = (), *,
                 plan_on_the_fly: bool = True, max_cached_plans: int = MAX_CACHED_PLANS,
                 max_plan_tokens: int = MAX_PLAN_TOKENS, same_world: bool = False):
        if not isinstance(base_config, SpavaConfig):
            base_config = compose_config(list(base_config))
        for name, value, low in (("max_cached_plans", max_cached_plans, 0), ("max_plan_tokens", max_plan_tokens, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"must be an integer >= {low}, got {value!r}", setting=name)
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"{str(root)!r} is not a directory", setting="plan_dir")
        self.base = base_config
        self.plan_on_the_fly = plan_on_the_fly
        self.max_cached_plans = max_cached_plans
        self.max_plan_tokens = max_plan_tokens
        self.same_world = same_world
        self.compat = compat_key(base_config)
        self._lock = threading.Lock()
        self._plans: dict[str, Plan] = {}

    # -- reading ----------------------------------------------------------------------------------
    def entries(self) -> list[PlanEntry]:
        """Every plan of the index that belongs to this family."""
        return [e for e in read_index(self.root) if e.compat == self.compat]

    def directory(self, entry: PlanEntry) -> Path:
        return plan_index.directory(self.root, entry)

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
        vis = self.base.model.vision
        if self.base.model.family == "internvl3":
            return (vis.tile_size, vis.tile_size)
        return smart_resize(height, width, vis.factor, vis.min_pixels, vis.max_pixels)

    @property
    def temporal_patch(self) -> int:
        return 1 if self.base.model.family == "internvl3" else self.base.model.vision.temporal_patch

    def padded_frames(self, frames: int) -> int:
        tp = self.temporal_patch
        return -(-frames // tp) * tp

    def own_tokens(self, frames: int, height: int, width: int, question_tokens: int) -> int:
        """Total tokens of a plan of exactly this request's shape (the bucket step's reference)."""
        cfg = self.config_for(frames, height, width, question_tokens)
        return token_layout(cfg.model, cfg.video).total_tokens

    def fitting(self, frames: int, height: int, width: int, question_tokens: int) -> list[PlanEntry]:
        """The family's plans that hold the request, cheapest (predicted prefill) first."""
        _check_request(frames, height, width, question_tokens)
        want_frames = self.padded_frames(frames)
        want_h, want_w = self.resized(height, width)
        most = BUCKET_STEP * self.own_tokens(frames, height, width, question_tokens)
        fits = [e for e in self.entries()
                if e.frames >= want_frames and e.frame_size[0] >= want_h and e.frame_size[1] >= want_w
                and e.max_question_tokens >= question_tokens and e.total_tokens <= most
                and (not self.same_world or e.world_size == self.base.topology.gpus)]
        return sorted(fits, key=lambda e: (e.predicted_us, e.total_tokens, e.frames, e.hash))

    def choose(self, frames: int, height: int, width: int, question_tokens: int) -> StoredPlan:
        """The cheapest plan that holds the request (planned on the fly and cached if none does)."""
        with self._lock:
            fits = self.fitting(frames, height, width, question_tokens)
            if fits:
                best = fits[0]
                plan = self._load(best)
                self._touch(best)
                return StoredPlan(plan, self.directory(best), best, False)
            if not self.plan_on_the_fly:
                have = ", ".join(sorted({f"{e.frames}f {e.resolution} q<={e.max_question_tokens}"
                                         for e in self.entries()})) or "none"
                raise NoPlanFitsError(
                    f"no plan in {str(self.root)!r} holds {frames} frames of {height}x{width} with a {question_tokens}-"
                    f"token question within one bucket step (at most {BUCKET_STEP:g}x its own tokens; family plans: "
                    f"{have}); plan one with spava-plan frames={bucket_frames(frames, self.temporal_patch)} "
                    f"video.resolution={height}x{width} video.max_question_tokens={question_tokens} into the family, "
                    f"or turn on planning on the fly", setting="plan_on_the_fly")
            return self._plan_now(frames, height, width, question_tokens)

    def choose_for_clip(self, path: str | Path, question_tokens: int) -> StoredPlan:
        """``choose`` for a video file: its size from the metadata and the frame count the model's
        processor samples at the base config's video.fps (spava_plan.video_meta; PyAV, no decode).
        A clip shorter than one temporal patch (a single frame) is one frame, padded to the patch
        by repeating it as the processor pads. A missing or unreadable file is an InputError
        naming ``video``."""
        info = probe_clip(path, setting="video")
        video = self.base.video
        frames = frames_for_rate(info.total_frames, info.fps, video.fps, min_frames=video.min_frames,
                                 max_frames=video.max_frames, temporal_patch=self.temporal_patch)
        return self.choose(max(frames, 1), info.height, info.width, question_tokens)

    def plan_for(self, frames: int, height: int, width: int, question_tokens: int) -> Plan:
        """The Plan of ``choose``."""
        return self.choose(frames, height, width, question_tokens).plan

    # -- planning on the fly ------------------------------------------------------------------------
    def config_for(self, frames: int, height: int, width: int, question_tokens: int) -> SpavaConfig:
        """The base config planned for exactly this request's shape (before fitting)."""
        video = dataclasses.replace(self.base.video, frames=int(frames), resolution=f"{int(height)}x{int(width)}",
                                    max_question_tokens=max(self.base.video.max_question_tokens,
                                                            int(question_tokens)), path=None)
        return dataclasses.replace(self.base, video=video)  # the frames= shorthand follows video.frames

    def bucket_config(self, frames: int, height: int, width: int, question_tokens: int) -> SpavaConfig:
        """The config planned on the fly for this request: its frames rounded up to the bucket
        (kept as they are where the bucket would pass video.max_frames), its own resolution."""
        bucket = bucket_frames(frames, self.temporal_patch)
        if bucket > max(frames, self.base.video.max_frames):
            bucket = frames
        return self.config_for(bucket, height, width, question_tokens)

    def _plan_now(self, frames: int, height: int, width: int, question_tokens: int) -> StoredPlan:
        cfg = self.bucket_config(frames, height, width, question_tokens)
        tokens = token_layout(cfg.model, cfg.video).total_tokens
        if tokens > self.max_plan_tokens:
            raise NoPlanFitsError(
                f"a plan for {frames} frames of {height}x{width} would have {tokens:,} tokens, more than "
                f"max_plan_tokens={self.max_plan_tokens:,} allows planning on the fly; send a shorter or smaller "
                f"clip, or plan it into the family with spava-plan", setting="max_plan_tokens")
        self._check_room()
        cfg, notes = fit_config(cfg, same_world=self.same_world)  # a short input gets a method that holds it
        plan = build_plan(cfg)  # a SpavaError (does not fit the device...) reaches the caller as is
        target = self.root / CACHE_DIR / plan.hash[:16]
        with locked(self.root):
            if not (target / "plan.json").is_file():
                self._write(plan, cfg, target)
            entry = dataclasses.replace(entry_for(plan, target, self.root, family=self.compat, cached=True),
                                        last_used=time.time())
            entries = [e for e in read_index(self.root) if e.key() != entry.key()] + [entry]
            entries, evicted = plan_index.evict_lru(entries, self.max_cached_plans, keep=entry.key())
            write_index(self.root, entries)
            plan_index.remove_folders(self.root, evicted, entries)
        for e in evicted:
            self._plans.pop(e.hash, None)
        self._plans[plan.hash] = plan
        return StoredPlan(plan, target, entry, True, tuple(notes))

    def _check_room(self) -> None:
        """Refuse before planning when the cache is full of pinned plans (nothing may be evicted)."""
        cached = [e for e in read_index(self.root) if e.cached]
        if len(cached) >= self.max_cached_plans and all(e.pinned for e in cached):
            raise NoPlanFitsError(
                f"the plan cache of {str(self.root)!r} holds max_cached_plans={self.max_cached_plans} plans"
                f"{' (all pinned)' if cached else ''}; unpin or evict one (python -m spava_plan.entry.plan_store list "
                f"plan_dir=...), or raise max_cached_plans", setting="max_cached_plans")

    def _touch(self, entry: PlanEntry) -> None:
        """Record that ``entry`` served a request now (least-recently-used eviction reads it). Best
        effort: a family deployed read-only (planning on the fly off) still serves, unrecorded."""
        try:
            with locked(self.root):
                entries = read_index(self.root)
                now = time.time()
                write_index(self.root, [dataclasses.replace(e, last_used=now) if e.key() == entry.key() else e
                                        for e in entries])
        except OSError:
            pass

    @staticmethod
    def _write(plan: Plan, cfg: SpavaConfig, target: Path) -> None:
        """plan.json (+ kernels/) into ``target``, all or nothing (built aside, then renamed)."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".plan-", dir=target.parent))
        try:
            plan.save(tmp / "plan.json")
            if cfg.kernels:
                render_kernels(plan, tmp / "kernels")
            if target.exists():
                shutil.rmtree(target)  # an incomplete folder without plan.json
            tmp.replace(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- the operator's view ------------------------------------------------------------------------
    def list_plans(self) -> list[PlanEntry]:
        """Every plan of the index (all families), most recently used first."""
        return sorted(read_index(self.root), key=lambda e: (-e.last_used, e.hash))

    def pin(self, hash_prefix: str, pinned: bool = True) -> list[PlanEntry]:
        """Pin (or unpin) a plan by hash prefix: a pinned plan is never evicted to make room."""
        with self._lock:
            return plan_index.set_pinned(self.root, hash_prefix, pinned)

    def evict(self, hash_prefix: str) -> list[PlanEntry]:
        """Remove a plan by hash prefix (pinned or not; its cache/ folder too)."""
        with self._lock:
            gone = plan_index.evict(self.root, hash_prefix)
            for e in gone:
                self._plans.pop(e.hash, None)
            return gone


def _check_request(frames: int, height: int, width: int, question_tokens: int) -> None:
    for name, value in (("frames", frames), ("height", height), ("width", width),
                        ("question_tokens", question_tokens)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"the request's {name} must be a positive integer, got {value!r}", setting="video")


if __name__ == "__main__":  # python -m spava_plan.entry.plan_store list|pin|unpin|evict plan_dir=DIR [HASH]
    import sys

    from .plan_store_cli import main

    sys.exit(main(sys.argv[1:]))
