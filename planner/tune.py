"""`spava-plan tune=<target>`: search the knobs and pick the best plan that fits.

Search space (every candidate is a full config, planned by the same planner/build.py path):
- method: ``tune.methods``;
- GPUs used W: the powers of two up to ``gpus``, and ``gpus`` itself (dense: 1);
- virtual hosts per GPU (spava): ``tune.hosts_per_gpu``;
- anchor and passing sizes (spava): from the quality floor up to the paper's rules, doubling.
  The floor is the paper's rule unless ``tune.min_anchor`` / ``tune.min_passing`` allow less; a
  method that passes less than the floor (star passes nothing) is rejected, not planned;
- placement solver (spava): ``tune.solvers``, tried on the best Spava candidate only (the solver
  moves hosts between ranks; it changes nothing else).

Targets: latency (predicted time to first token), memory (peak bytes per GPU), throughput
(GPU-seconds per video = W x time to first token). Ties break on the other two, then on the
candidate's order, so the result is deterministic.

Branch and bound keeps it fast (a 1024-GPU candidate costs about a second to plan, a 1024-GPU
ring several): every candidate first gets cheap lower bounds from the cost model's primitives
(vision encoder, per-token layer work and attention FLOPs spread evenly over the ranks; weights,
KV-cache share and passing buffers for memory). Candidates whose memory bound exceeds the device
are rejected unplanned; the rest are planned in order of their bound, and one whose bound is
already worse than the best fitting plan found so far is pruned. The same branch and bound then
finds the fastest fitting plan at every GPU count (pareto.png: predicted TTFT against GPUs used).
Every candidate, with the reason it was not chosen, goes into tuning.csv / tuning.md. The tests
plan every pruned candidate and check that none would have won (the bounds hold by construction:
they count a subset of the work the cost model charges, at the same rates).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from spava_plan.config import ANCHOR_METHODS, MethodConfig, SolverConfig, SpavaConfig
from spava_plan.errors import ConfigError, InfeasiblePlanError, SpavaError
from spava_plan.vision_exchange import vision_encoders

from .build import MAX_RING_PLAN_GPUS, Derived, derive
from . import dense_tp
from .cost import visible_pairs
from .layout import apb_passing, paper_anchor, paper_passing, token_layout
from .memory import GIB, usable_bytes, weight_bytes
from .partition import Partition, check_vision_units, global_anchor, global_passing, partition
from .vision import vision_unit

TARGETS = ("latency", "memory", "throughput")
SOLVER_GAP_PRUNE = 1e-3  # a placement this close to its lower bound leaves other solvers nothing to win

# The search is bounded as the placement solver's is (solver.iterations): a stated budget, in
# deterministic work units rather than seconds so that a search gives the same answer on every
# machine. Planning a Spava candidate costs about (GPUs + hosts * (1 + hosts_per_gpu / 4)) units
# of roughly 20-100 us each on one core of a 2-core CPU (a 1024-GPU, 16-hosts-per-GPU candidate:
# 3.6 s); the budget is about 20 s of planning. Candidates the budget cannot afford are left
# unplanned ("unplanned" in tuning.md, the terminal line says so); when none that fits was planned
# the error names the budget. Before any of that, a space of more than MAX_TUNE_CANDIDATES
# candidates is refused outright (building and bounding each costs about 0.7 ms).
TUNE_WORK_BUDGET = 400_000
MAX_TUNE_CANDIDATES = 20_000
# Every candidate's lower bound walks its blocks (about 0.6 us per virtual host): a space whose
# bounds alone would walk more hosts than this (about 10 s) is refused before any work.
MAX_TUNE_BOUND_HOSTS = 16_000_000


@dataclass
class Candidate:
    """One point of the search and what became of it."""

    index: int
    method: str
    gpus: int
    hosts_per_gpu: int
    anchor_tokens: int | None  # None: the method's own rule (baselines)
    passing_tokens: int | None
    solver: str
    cfg: SpavaConfig | None = None
    bound_us: float = 0.0  # lower bound of the predicted time to first token
    bound_bytes: int = 0  # lower bound of the peak memory per GPU
    ttft_us: float | None = None  # predicted (None: not planned)
    peak_bytes: int | None = None
    fits: bool | None = None
    status: str = "pending"  # chosen / feasible / rejected / pruned / unplanned (the work budget ran out)
    reason: str = ""
    gap: float = 0.0  # placement solver's gap of the planned candidate
    passing: str = "per_block"  # spava's method.passing (global: anchor and passing are its rules' sizes)

    @property
    def gpu_seconds(self) -> float | None:
        return None if self.ttft_us is None else self.gpus * self.ttft_us / 1e6

    def knobs(self) -> str:
        parts = [self.method, f"gpus={self.gpus}"]
        if self.method == "spava":
            parts += [f"hosts_per_gpu={self.hosts_per_gpu}", f"anchor={self.anchor_tokens}",
                      f"passing={self.passing_tokens}", f"solver={self.solver}"]
            if self.passing == "global":
                parts.append("passing_mode=global")
        return " ".join(parts)

    def overrides(self) -> str:
        """The command-line overrides that plan this candidate without tuning."""
        out = [f"method={self.method}", f"gpus={self.gpus}"]
        if self.method == "spava":
            out += [f"method.hosts_per_gpu={self.hosts_per_gpu}", f"method.anchor_tokens={self.anchor_tokens}",
                    f"method.passing_tokens={self.passing_tokens}", f"solver={self.solver}"]
            if self.passing == "global":
                out.append("method.passing=global")
        if self.cfg is not None and self.method in ANCHOR_METHODS and self.cfg.method.anchor != "broadcast":
            out.append(f"method.anchor={self.cfg.method.anchor}")
        return " ".join(out)


@dataclass
class TuneResult:
    target: str
    candidates: list[Candidate]
    chosen: Candidate | None
    floor_anchor: int
    floor_passing: int
    paper_anchor: int
    paper_passing: int

    @property
    def planned(self) -> int:
        return sum(1 for c in self.candidates if c.ttft_us is not None)

    @property
    def unplanned(self) -> int:
        """Candidates the work budget could not afford (0: the search is complete)."""
        return sum(1 for c in self.candidates if c.status == "unplanned")


def plan_work(c: Candidate) -> int:
    """Work units of planning ``c`` (see TUNE_WORK_BUDGET): Spava's tasks and KV sources grow with
    hosts x hosts per rank, a ring's ops with W^2."""
    hosts = c.gpus * c.hosts_per_gpu
    if c.method == "zigzag_ring":
        return c.gpus + c.gpus * c.gpus // 4
    return c.gpus + hosts + hosts * c.hosts_per_gpu // 4


NARROW = ("narrow the search: fewer tune.hosts_per_gpu or tune.methods, or higher tune.min_anchor / "
          "tune.min_passing")


# -- the search space -------------------------------------------------------------------------------
def gpu_counts(gpus: int) -> list[int]:
    """Powers of two up to ``gpus``, and ``gpus`` itself."""
    out, w = [], 1
    while w <= gpus:
        out.append(w)
        w *= 2
    if out[-1] != gpus:
        out.append(gpus)
    return out


def _ladder(floor: int, top: int) -> list[int]:
    """floor, 2*floor, ... (multiples of 128), then top: the sizes from the floor to the rule."""
    if floor >= top:
        return [floor]
    out, v = [floor], max(floor, 64)
    while True:
        v *= 2
        if v >= top:
            break
        out.append(-(-v // 128) * 128)
    return sorted(set(out + [top]))


def _config(base: SpavaConfig, method: MethodConfig, gpus: int, solver: str) -> SpavaConfig:
    topo = dataclasses.replace(base.topology, gpus=gpus, nodes=base.topology.nodes if gpus == base.topology.gpus
                               else None)
    solv = base.solver if solver == base.solver.name else SolverConfig(name=solver)
    tune = type(base.tune)()  # the chosen plan is an ordinary plan: the same as its knobs give without tuning
    return dataclasses.replace(base, topology=topo, method=method, solver=solv, tune=tune)  # gpus/nodes: topology's


def candidates(base: SpavaConfig, presets: Callable[[str], MethodConfig]) -> tuple[list[Candidate], dict]:
    """Every candidate of the search (solver refinement comes later), and the floors."""
    t = base.tune
    L = token_layout(base.model, base.video).context_tokens
    rule_a, rule_p = paper_anchor(L), paper_passing(L)
    floor_a = rule_a if t.min_anchor is None else min(t.min_anchor, rule_a)
    floor_p = rule_p if t.min_passing is None else min(t.min_passing, rule_p)
    floors = {"floor_anchor": floor_a, "floor_passing": floor_p, "paper_anchor": rule_a, "paper_passing": rule_p}
    # a list that repeats an entry means the entry once (2000 x `star` is one method)
    methods, hosts = list(dict.fromkeys(t.methods)), list(dict.fromkeys(t.hosts_per_gpu))
    counts = gpu_counts(base.topology.gpus)
    ladders = len(_ladder(floor_a, rule_a)) * len(_ladder(floor_p, rule_p))
    size = sum(1 if m == "dense" else len(counts) * (len(hosts) * ladders if m == "spava" else 1) for m in methods)
    hosts_walked = sum(1 if m == "dense" else sum(counts) * (sum(hosts) * ladders if m == "spava" else 2)
                       for m in methods)
    if hosts_walked > MAX_TUNE_BOUND_HOSTS:
        raise ConfigError(f"bounding the search's {size:,} candidates walks {hosts_walked:,} virtual hosts, more than "
                          f"the tuner's budget of {MAX_TUNE_BOUND_HOSTS:,} (about 10 s); {NARROW}", setting="tune")
    if size > MAX_TUNE_CANDIDATES:
        raise ConfigError(f"the search has {size:,} candidates (GPU counts x tune.hosts_per_gpu x anchor sizes x "
                          f"passing sizes = {len(counts)} x {len(hosts)} x {ladders} for spava), more than the tuner's "
                          f"limit of {MAX_TUNE_CANDIDATES:,}; {NARROW}", setting="tune")
    out: list[Candidate] = []
    first_solver = t.solvers[0]
    for method in methods:
        # the anchor mode is not searched: broadcast computes what recompute does, in less time
        # (planner/build.py rank_base); every candidate keeps the config's
        preset = dataclasses.replace(presets(method), anchor=base.method.anchor)
        for w in ([1] if method == "dense" else gpu_counts(base.topology.gpus)):
            if method == "spava":
                modes = [preset.passing] if t.passing is None else list(t.passing)
                for h in hosts:
                    if "per_block" in modes:
                        for a in _ladder(floor_a, rule_a):
                            for p in _ladder(floor_p, rule_p):
                                m = dataclasses.replace(preset, hosts_per_gpu=h, anchor_tokens=a, passing_tokens=p,
                                                        pass_all=False, passing="per_block")
                                out.append(Candidate(len(out), method, w, h, a, p, first_solver,
                                                     _config(base, m, w, first_solver)))
                    if "global" in modes:
                        out.append(_global_candidate(len(out), base, preset, L, w, h, first_solver))
            else:
                per_gpu = 1 if method in ("apb", "star", "dense", "dense_tp") else 2
                c = Candidate(len(out), method, w, per_gpu, None, None,
                              "fixed", _config(base, preset, w, base.solver.name))
                passes = {"star": 0, "apb": apb_passing(L)}.get(method)
                if method == "zigzag_ring" and w > MAX_RING_PLAN_GPUS:
                    c.status, c.reason = "rejected", (
                        f"a zigzag_ring plan lists every ring step (O(W^2) ops); it is planned on at most "
                        f"{MAX_RING_PLAN_GPUS} GPUs")
                elif passes is not None and passes < floor_p:
                    c.status, c.reason = "rejected", (
                        f"below the quality floor: passes {passes} tokens per block, floor {floor_p} "
                        f"(set tune.min_passing={passes} to allow)")
                out.append(c)
    return out, floors


def _global_candidate(index: int, base: SpavaConfig, preset: MethodConfig, L: int, w: int, h: int,
                      solver: str) -> Candidate:
    """method.passing=global on w GPUs with h hosts each, at its own quality floor: the sizes of its
    default rules (planner/partition.py: P = GLOBAL_PASSING_TOKENS keys per host capped at a block,
    the anchor capped at a block), the budget benchmarks/fidelity.py measured (needle recall >= 0.95
    at 16 and 64 GPUs, benchmarks/results/2026-12-04-cpu-fidelity-global.md). tune.min_passing and
    tune.min_anchor are per-block floors and do not lower it; the sizes are written out so the
    chosen candidate's overrides plan it again exactly."""
    a = global_anchor(L, w * h)
    p = global_passing(max(0, L - a) // (w * h))
    m = dataclasses.replace(preset, hosts_per_gpu=h, anchor_tokens=a, passing_tokens=p, pass_all=False,
                            passing="global")
    return Candidate(index, "spava", w, h, a, p, solver, _config(base, m, w, solver), passing="global")


# -- lower bounds -----------------------------------------------------------------------------------
def _attention_pairs(part: Partition) -> tuple[float, float]:
    """(pairs split over the ranks, pairs every rank computes): scores of every context task of a
    partition, each computed on exactly one rank, plus the query's pairs over the whole context
    (split over the ranks); the anchor's own causal attention is recomputed on every rank, or run
    once on rank 0 with method.anchor=broadcast (then it is split like the rest)."""
    anchor = part.anchor_tokens if part.anchor else 0
    total = 0.0
    for v, (a, b) in enumerate(part.blocks):
        rows = b - a
        if part.method in ("spava", "apb"):
            passed = min(v, 1) if part.passing == "global" else v  # global: one buffer of keep keys
            total += rows * (passed * part.keep + anchor) + visible_pairs(rows, rows, True)
        elif part.method == "star":
            total += (rows * (part.blocks[0][1] - part.blocks[0][0]) if v else 0) + visible_pairs(rows, rows, True)
        else:  # zigzag_ring, dense: every earlier token, causal inside the chunk
            total += rows * a + visible_pairs(rows, rows, True)
    if part.query is not None:
        lq = part.query[1] - part.query[0]
        total += lq * part.query[0] + visible_pairs(lq, lq, True)
    replicated = visible_pairs(anchor, anchor, True) if anchor and part.method in ("spava", "apb") else 0.0
    if part.broadcast_anchor:
        return total + replicated, 0.0
    return total, replicated


def _local_tokens(part: Partition, total_tokens: int) -> int:
    """At least this many tokens on every rank: spava / apb hold the anchor (with
    method.anchor=broadcast only rank 0 does), their blocks and the query (the spec's local
    sequence); otherwise an even share of the prompt."""
    if part.method in ("spava", "apb") and part.blocks:
        least = min(b - a for a, b in part.blocks)
        return (part.anchor_tokens if part.anchor and not part.broadcast_anchor else 0) + part.hosts_per_rank * least
    return total_tokens // part.world


def bounds(cfg: SpavaConfig) -> tuple[float, int, Partition]:
    """(time, peak bytes) lower bounds of ``cfg``'s plan, from the cost model's primitives; raises
    the planner's own SpavaError when the candidate cannot be partitioned at all."""
    tokens = token_layout(cfg.model, cfg.video)
    part = partition(tokens, cfg.method, cfg.topology.gpus)
    w = part.world
    tp = dense_tp.is_tp(part.method)  # the whole prompt on every rank, each with its shard of the model
    if not tp:
        check_vision_units(tokens, w, cfg.model.vision.temporal_patch, cfg.vision.parallel)
    cost = dense_tp.layer_cost_model(cfg, w)
    m = cost.model
    units = tokens.grid_thw[0]
    unit = vision_unit(cfg.model, tokens.grid_thw)
    vision = dense_tp.vision_us(cfg, cost, unit)[0] if tp else \
        -(-units // vision_encoders(w, cfg.vision.parallel)) * cost.vision_unit(unit).us
    # Compute ops run one after another on a rank: per-token work on its local tokens, plus at
    # least the average rank's share of the attention FLOPs (and all of the replicated ones) at
    # the attention rate (dense_tp: all of them, with the rank's heads).
    per_token = cost.layer_tokens(tokens.total_tokens if tp else _local_tokens(part, tokens.total_tokens)).us
    split, replicated = _attention_pairs(part)
    attention = 4.0 * (split if tp else split / w + replicated) * m.head_dim * m.num_heads / cost.attn_rate
    time = vision + m.num_layers * (per_token + attention)
    kv_row = m.num_layers * 2 * m.num_kv_heads * m.head_dim * cfg.dtype_bytes
    # per_block: every block's selection is gathered; global: each host's own buffer of keep rows
    held = part.hosts_per_rank if part.passing == "global" else part.virtual_hosts
    passing = held * part.keep * m.num_kv_heads * 2 * m.head_dim * cfg.dtype_bytes \
        if part.method in ("spava", "apb") else 0
    weights = dense_tp.weight_bytes(cfg, w) if tp else weight_bytes(cfg)
    peak = weights + tokens.total_tokens // (1 if tp else w) * kv_row + passing
    return time, peak, part


# -- the search -------------------------------------------------------------------------------------
def _score(target: str, ttft_us: float, peak: float, gpus: int) -> tuple[float, float, float]:
    gs = gpus * ttft_us
    if target == "latency":
        return (ttft_us, gs, peak)
    if target == "memory":
        return (peak, ttft_us, gs)
    return (gs, ttft_us, peak)


def _bound_score(target: str, c: Candidate) -> float:
    return _score(target, c.bound_us, c.bound_bytes, c.gpus)[0]


def _plan(c: Candidate, cache: dict[str, Derived]) -> None:
    try:
        d = derive(c.cfg, require_fit=False, detail=False)
    except SpavaError as exc:
        c.status, c.reason = "rejected", f"not plannable: {exc}"
        return
    if c.method != "spava":  # a baseline the chosen plan's comparison may need (spava's sizes differ there)
        cache[repr(c.cfg)] = d
    c.gap = d.placement.gap
    c.ttft_us, c.peak_bytes, c.fits = d.prediction.makespan_us, max(d.prediction.peak_memory_bytes), d.fits
    c.status = "feasible" if d.fits else "rejected"
    if not d.fits:
        c.reason = f"does not fit: peak {c.peak_bytes / GIB:.1f} GiB > {usable_bytes(c.cfg) / GIB:.1f} GiB usable"


def tune(base: SpavaConfig, presets: Callable[[str], MethodConfig],
         cache: dict[str, Derived] | None = None) -> TuneResult:
    """Search ``base.tune``'s space for ``base.tune.target``; planned derivations land in ``cache``
    (keyed by repr(config)) so the caller can reuse them for the chosen plan's comparison."""
    target = base.tune.target
    assert target in TARGETS, target
    cache = {} if cache is None else cache
    cands, floors = candidates(base, presets)
    cap = usable_bytes(base)
    live: list[Candidate] = []
    for c in cands:
        if c.status != "pending":
            continue
        try:
            c.bound_us, c.bound_bytes, _ = bounds(c.cfg)
        except SpavaError as exc:
            c.status, c.reason = "rejected", f"not plannable: {exc}"
            continue
        if c.bound_bytes > cap:
            c.status, c.reason = "rejected", (f"does not fit: needs at least {c.bound_bytes / GIB:.1f} GiB "
                                              f"(lower bound) > {cap / GIB:.1f} GiB usable")
            continue
        live.append(c)

    best: Candidate | None = None
    spent = 0

    def better(c: Candidate) -> bool:
        return best is None or (_score(target, c.ttft_us, c.peak_bytes, c.gpus), c.index) < \
            (_score(target, best.ttft_us, best.peak_bytes, best.gpus), best.index)

    def consider(c: Candidate) -> None:
        """Plan ``c`` (if the work budget affords it) and keep it if it fits and beats the best."""
        nonlocal best, spent
        work = plan_work(c)
        if spent + work > TUNE_WORK_BUDGET:
            c.status, c.reason = "unplanned", (f"not planned: the tuner's work budget ({TUNE_WORK_BUDGET:,} units, "
                                               f"about 20 s) could not afford it ({work:,} units)")
            return
        spent += work
        _plan(c, cache)
        if c.fits and better(c):
            best = c

    live.sort(key=lambda c: (_bound_score(target, c), c.index))
    for c in live:
        if best is not None and _bound_score(target, c) > _score(target, best.ttft_us, best.peak_bytes, best.gpus)[0]:
            c.status, c.reason = "pruned", (f"lower bound {_fmt_target(target, _bound_score(target, c))} is worse "
                                            f"than the best plan found ({_fmt_target(target, _score(target, best.ttft_us, best.peak_bytes, best.gpus)[0])})")
            continue
        consider(c)

    # The Pareto front (TTFT against GPUs used): the fastest plan that fits at every GPU count, by
    # the same branch and bound within each count (smaller counts plan faster, so this costs at
    # most about as much as the search above).
    for w in sorted({c.gpus for c in live}):
        group = [c for c in live if c.gpus == w]  # in order of the bound
        fastest = min((c for c in group if c.fits), key=lambda c: (c.ttft_us, c.index), default=None)
        for c in sorted(group, key=lambda c: (c.bound_us, c.index)):
            if c.ttft_us is not None or c.status in ("rejected", "unplanned"):
                continue
            if fastest is not None and c.bound_us > fastest.ttft_us:
                continue  # stays pruned: no faster plan at this GPU count either
            consider(c)
            if c.fits and (fastest is None or c.ttft_us < fastest.ttft_us):
                fastest = c

    # Solver refinement on the best Spava candidate: the solver only moves hosts between ranks.
    spava = [c for c in cands if c.method == "spava" and c.fits]
    if spava:
        top = min(spava, key=lambda c: (_score(target, c.ttft_us, c.peak_bytes, c.gpus), c.index))
        gap = top.gap
        for s in base.tune.solvers:
            if s == top.solver:
                continue
            m = top.cfg.method
            c = Candidate(len(cands), "spava", top.gpus, top.hosts_per_gpu, top.anchor_tokens, top.passing_tokens, s,
                          _config(base, m, top.gpus, s), bound_us=top.bound_us, bound_bytes=top.bound_bytes,
                          passing=top.passing)
            cands.append(c)
            if s == "exact" and top.gpus * top.hosts_per_gpu > c.cfg.solver.exact_max_hosts:
                c.status, c.reason = "rejected", (f"exact solver limited to solver.exact_max_hosts="
                                                  f"{c.cfg.solver.exact_max_hosts} hosts")
                continue
            if gap <= SOLVER_GAP_PRUNE:
                c.status, c.reason = "pruned", (f"the {top.solver} placement of this candidate is within {gap:.3%} "
                                                f"of the placement lower bound: no solver can gain more")
                continue
            consider(c)
    for c in cands:
        if c.status == "feasible" and c is not best:
            c.reason = _why_not(target, c, best)
    if best is not None:
        best.status, best.reason = "chosen", f"best predicted {target}"
    for key in [k for k, d in cache.items() if best is None or d.world not in (1, best.gpus)]:
        del cache[key]  # only baselines on the chosen GPU count (and dense) can serve its comparison
    return TuneResult(target, cands, best, **floors)


def _fmt_target(target: str, value: float) -> str:
    if target == "latency":
        return f"{value / 1e3:,.1f} ms"
    if target == "memory":
        return f"{value / GIB:.1f} GiB"
    return f"{value / 1e6:,.2f} GPU-s"


def _why_not(target: str, c: Candidate, best: Candidate) -> str:
    mine = _score(target, c.ttft_us, c.peak_bytes, c.gpus)[0]
    theirs = _score(target, best.ttft_us, best.peak_bytes, best.gpus)[0]
    if mine == theirs:
        return f"ties on {target} ({_fmt_target(target, mine)}); loses on the tie-breaks"
    return f"{target} {_fmt_target(target, mine)} vs {_fmt_target(target, theirs)} chosen ({mine / theirs:.2f}x)"


# -- artifacts --------------------------------------------------------------------------------------
TUNING_COLUMNS = ("candidate", "method", "gpus", "hosts_per_gpu", "anchor_tokens", "passing_tokens", "solver",
                  "ttft_ms", "gpu_seconds", "peak_gib", "fits", "bound_ttft_ms", "bound_peak_gib", "status", "reason")


def tuning_rows(result: TuneResult) -> list[dict[str, Any]]:
    rows = []
    for c in result.candidates:
        rows.append({
            "candidate": c.index, "method": c.method, "gpus": c.gpus,
            "hosts_per_gpu": c.hosts_per_gpu if c.method == "spava" else "",
            "anchor_tokens": "" if c.anchor_tokens is None else c.anchor_tokens,
            "passing_tokens": "" if c.passing_tokens is None else c.passing_tokens, "solver": c.solver,
            "ttft_ms": "" if c.ttft_us is None else round(c.ttft_us / 1e3, 3),
            "gpu_seconds": "" if c.gpu_seconds is None else round(c.gpu_seconds, 3),
            "peak_gib": "" if c.peak_bytes is None else round(c.peak_bytes / GIB, 2),
            "fits": "" if c.fits is None else ("yes" if c.fits else "no"),
            "bound_ttft_ms": round(c.bound_us / 1e3, 3) if c.bound_us else "",
            "bound_peak_gib": round(c.bound_bytes / GIB, 2) if c.bound_bytes else "",
            "status": c.status, "reason": c.reason})
    return rows


def tuning_csv(result: TuneResult) -> str:
    import csv
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=TUNING_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(tuning_rows(result))
    return out.getvalue()


def rerun_command(c: Candidate, base: SpavaConfig, given: Sequence[str] = ()) -> str:
    """The `spava-plan` command that plans candidate ``c`` without tuning, ready to paste: the
    original overrides (``given``) that still apply, then the candidate's knobs. Dropped: the
    search's own settings (tune*), what the candidate sets (method*, gpus), nodes when the
    candidate uses fewer GPUs (its topology is re-derived), solver settings when it changes the
    solver, and hydra.* (the output folder)."""
    import shlex

    def key(item: str) -> str:
        return item.split("=", 1)[0].lstrip("+~")

    def dropped(k: str) -> bool:
        if k.split(".")[0] in ("tune", "method", "hydra") or k.startswith("hydra/") or k in ("gpus", "topology.gpus"):
            return True
        if k in ("nodes", "topology.nodes") and c.gpus != base.topology.gpus:
            return True
        return k.split(".")[0] == "solver" and (c.method != "spava" or c.solver != base.solver.name)

    kept = [g for g in given if not dropped(key(g))]
    return "spava-plan " + " ".join(shlex.quote(x) for x in [*kept, *c.overrides().split()])


def tuning_markdown(result: TuneResult, base: SpavaConfig, given: Sequence[str] = ()) -> str:
    c = result.chosen
    counts = {s: sum(1 for x in result.candidates if x.status == s)
              for s in ("chosen", "feasible", "rejected", "pruned", "unplanned")}
    lines = [f"# spava-plan tune={result.target}: {base.model.name}, {base.video.frames} frames at "
             f"{base.video.resolution}, up to {base.topology.gpus} x {base.topology.name}", ""]
    if c is None:
        lines += ["**No candidate fits.** Every candidate is listed below with the reason; raise "
                  "`gpus`, lower `frames` or `video.resolution`, allow less passing (`tune.min_passing=`) or "
                  "choose a topology with more memory.", ""]
    else:
        lines += [f"**Chosen:** `{c.knobs()}`: predicted time to first token {c.ttft_us / 1e3:,.1f} ms, "
                  f"{c.gpu_seconds:,.2f} GPU-seconds per video, peak {c.peak_bytes / GIB:.1f} GiB per GPU.",
                  "", f"Plan it again without tuning: `{rerun_command(c, base, given)}`", ""]
    lines += [f"Quality floor: anchor >= {result.floor_anchor:,} tokens, passing >= {result.floor_passing:,} tokens "
              f"per block (paper rules: anchor {result.paper_anchor:,}, passing {result.paper_passing:,}; lower them "
              f"with tune.min_anchor / tune.min_passing).", "",
              *([f"Global passing candidates (tune.passing) have their own floor: the P keys per host and the "
                 f"anchor of their rules (planner/partition.py global_passing / global_anchor, the budget whose "
                 f"needle recall benchmarks/fidelity.py measured), whatever tune.min_passing says.", ""]
                if any(x.passing == "global" for x in result.candidates) else []),
              f"{len(result.candidates)} candidates: {result.planned} planned; {counts['feasible'] + counts['chosen']} "
              f"fit, {counts['rejected']} rejected, {counts['pruned']} pruned by a lower bound (the bound is the "
              "vision encoder, per-token work and attention FLOPs spread evenly over the GPUs, at the topology's "
              "rates; memory: weights, the KV-cache share and the passing buffers). Times are predictions, not "
              "measurements." + (f" **{counts['unplanned']} candidates were not planned**: the tuner's work budget "
                                 f"({TUNE_WORK_BUDGET:,} units, about 20 s) ran out; {NARROW}."
                                 if counts["unplanned"] else ""), "",
              "| # | knobs | TTFT (ms) | GPU-s | peak GiB | fits | status | reason |", "|---|---|---|---|---|---|---|---|"]
    order = sorted(result.candidates, key=lambda x: ({"chosen": 0, "feasible": 1, "rejected": 2, "pruned": 3, "unplanned": 4}[x.status],
                                                      x.ttft_us if x.ttft_us is not None else float("inf"), x.index))
    for x in order:
        ttft = "" if x.ttft_us is None else f"{x.ttft_us / 1e3:,.1f}"
        gs = "" if x.gpu_seconds is None else f"{x.gpu_seconds:,.2f}"
        peak = "" if x.peak_bytes is None else f"{x.peak_bytes / GIB:.1f}"
        fits = "" if x.fits is None else ("yes" if x.fits else "no")
        name = f"**{x.knobs()}**" if x.status == "chosen" else x.knobs()
        lines.append(f"| {x.index} | {name} | {ttft} | {gs} | {peak} | {fits} | {x.status} | {x.reason} |")
    return "\n".join(lines) + "\n"


# What pareto.png plots on its y axis for each target: (label, value of a candidate).
PARETO_Y = {
    "latency": ("predicted time to first token (ms)", lambda c: c.ttft_us / 1e3),
    "memory": ("predicted peak memory per GPU (GiB)", lambda c: c.peak_bytes / GIB),
    "throughput": ("predicted GPU-seconds per video", lambda c: c.gpu_seconds),
}


def pareto_data(result: TuneResult) -> dict[str, Any]:
    """Points of the Pareto plot: the search's target (TTFT, peak memory or GPU-seconds) against
    GPUs used, per method (fitting candidates), and the front of the best target at each count."""
    label, value = PARETO_Y[result.target]
    series: dict[str, list[tuple[int, float]]] = {}
    for c in result.candidates:
        if c.fits:
            series.setdefault(c.method, []).append((c.gpus, value(c)))
    pts = sorted((c.gpus, value(c)) for c in result.candidates if c.fits)
    front, best = [], float("inf")
    for g, t in pts:
        if t < best:
            front.append((g, t))
            best = t
    chosen = None if result.chosen is None else (result.chosen.gpus, value(result.chosen))
    short = label.replace("predicted ", "").split(" (")[0]
    return {"title": f"tune={result.target}: {short} vs GPUs used (plans that fit)", "series": series,
            "front": front, "chosen": chosen, "ylabel": label}


def render_pareto(data: dict[str, Any], path: Any) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=90)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for method in sorted(data["series"]):
        pts = sorted(data["series"][method])
        ax.scatter([g for g, _ in pts], [t for _, t in pts], label=method, s=18)
    if data["front"]:
        ax.step([g for g, _ in data["front"]], [t for _, t in data["front"]], where="post", color="black",
                linewidth=0.8, label="Pareto front")
    if data["chosen"]:
        ax.scatter([data["chosen"][0]], [data["chosen"][1]], marker="*", s=200, color="red", label="chosen", zorder=5)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("GPUs used")
    ax.set_ylabel(data.get("ylabel", "predicted time to first token (ms)"))
    ax.set_title(data["title"], fontsize=9)
    ax.grid(linewidth=0.3)
    if data["series"]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(str(path), format="png")


def describe(result: TuneResult) -> str:
    """One line for the terminal."""
    c = result.chosen
    cut = (f"; the tuner's work budget ({TUNE_WORK_BUDGET:,} units, about 20 s) left {result.unplanned:,} unplanned: "
           f"{NARROW}" if result.unplanned else "")
    if c is None:
        return f"tune={result.target}: no candidate fits ({len(result.candidates)} tried; see tuning.md){cut}"
    return (f"tune={result.target}: chose {c.knobs()} ({c.ttft_us / 1e3:,.1f} ms predicted, {c.peak_bytes / GIB:.1f} "
            f"GiB per GPU) out of {len(result.candidates)} candidates ({result.planned} planned){cut}")


def advice(result: TuneResult, base: SpavaConfig) -> dict[str, str]:
    """method -> what to change so that the search would take it: for the report's warning when a
    compared method beats the chosen plan (advising `tune=latency` there names the command just run)."""
    import re

    out = {}
    searched = list(dict.fromkeys(base.tune.methods))
    for method in ("spava", "apb", "star", "zigzag_ring", "dense", "dense_tp"):
        mine = [c for c in result.candidates if c.method == method]
        allow = next((m.group(1) for c in mine for m in [re.search(r"tune\.min_passing=(\d+)", c.reason)] if m), None)
        if not mine:
            out[method] = f"let the search consider it: `tune.methods=[{','.join(searched + [method])}]`"
        elif allow is not None:
            out[method] = (f"let the search take it: `tune={result.target}` rejected {method} as below its quality floor "
                           f"of {result.floor_passing:,} passing tokens per block; allow it with `tune.min_passing={allow}`")
        else:
            out[method] = f"see tuning.md for why `tune={result.target}` did not choose it"
    return out


def chosen_config(result: TuneResult) -> SpavaConfig:
    if result.chosen is None and result.unplanned:
        raise InfeasiblePlanError(
            f"tune={result.target}: the tuner's work budget ({TUNE_WORK_BUDGET:,} units, about 20 s) ran out before a "
            f"candidate that fits was planned ({result.planned} planned, {result.unplanned:,} not); {NARROW}",
            setting="tune")
    if result.chosen is None:
        raise InfeasiblePlanError(
            f"tune={result.target}: no candidate fits in memory ({len(result.candidates)} tried); raise gpus, lower "
            f"frames or video.resolution, or allow less passing with tune.min_passing", setting="gpus")
    return result.chosen.cfg


__all__: Sequence[str] = ("tune", "TuneResult", "Candidate", "tuning_csv", "tuning_markdown", "pareto_data",
                          "render_pareto", "describe", "chosen_config", "bounds", "gpu_counts")
