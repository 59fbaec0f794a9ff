"""Human-readable and tabular views of a plan: report.md, schedule.json, the CLI's summary table
and the rows of a sweep's summary.csv / summary.md."""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from spava_plan.config import SpavaConfig
from spava_plan.passing_scan import scan_rounds
from spava_plan.plan import Plan

from .compare import PHASES, MethodRow, row_setting
from .cost import CostModel
from .memory import ALLOCATOR_SLACK, GIB, PARTS, usable_bytes

MAX_RANK_ROWS = 32  # report.md lists every rank up to this many, then the extremes


def _ms(us: float) -> str:
    return f"{us / 1e3:,.1f}"


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f}"


def method_table(rows: Sequence[MethodRow], cap_bytes: int) -> list[str]:
    """Markdown table comparing the methods."""
    out = ["| method | GPUs | predicted prefill (ms) | slowest / fastest rank (ms) | exposed comm (ms) | "
           "vs dense | vs zigzag_ring | peak GiB/GPU | fits | solver gap |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = f"**{r.method}**" if r.planned else r.method
        if r.error:
            out.append(f"| {name} | | not plannable: {r.error} | | | | | | | |")
            continue
        fits = "yes" if r.fits else f"no (> {_gib(cap_bytes)})"
        out.append(f"| {name} | {r.gpus} | {_ms(r.prefill_us)} | {_ms(r.rank_us_max)} / {_ms(r.rank_us_min)} | "
                   f"{_ms(r.exposed_comm_us)} | {_x(r.speedup_vs_dense)} | {_x(r.speedup_vs_ring)} | "
                   f"{_gib(r.peak_bytes)} | {fits} | {r.gap:.2%} |")
    return out


VISION_PLACEMENT = {"frames": "frame-parallel", "one_gpu": "the whole video on rank 0"}

# What a faster method gives up, where it is approximate in a way Spava is not (said beside any
# recommendation to switch to it).
QUALITY_NOTES = {
    "star": "star passes no context between blocks (the paper's ablation: no passing blocks scores 17.33 vs 30.00)",
    "apb": "apb's selection here is a query-unaware key-norm stand-in for its trained retaining heads",
}


def _dominant(fast: MethodRow, slow: MethodRow) -> tuple[str, float, float]:
    """The phase that makes ``slow`` slower than ``fast`` (largest difference), with both times."""
    name = max(PHASES, key=lambda k: (slow.phases.get(k, 0.0) - fast.phases.get(k, 0.0), -PHASES.index(k)))
    return name, fast.phases.get(name, 0.0), slow.phases.get(name, 0.0)


def _share(row: MethodRow) -> str:
    total = sum(row.phases.values()) or 1.0
    name = max(PHASES, key=lambda k: row.phases.get(k, 0.0))
    return f"{name} {row.phases.get(name, 0.0) / total:.0%}"


SEARCH_ADVICE = ("search every knob with `tune=latency` (which keeps to a quality floor on anchor and passing "
                 "sizes)")


def _overrides(row: str, mine: str) -> str:
    """The settings that turn the planned row ``mine`` into row ``row`` (planner/compare.py
    row_setting): its method, and its vision placement where the two differ."""
    (method, parallel), (_, planned) = row_setting(row), row_setting(mine)
    return f"method={method}" + (f" vision.parallel={parallel}" if parallel != planned else "")


def conclusion_lines(rows: Sequence[MethodRow], search: Mapping[str, str] | None = None) -> list[str]:
    """Which method that fits is fastest, by how much and why, and a warning when the planned
    method is not it. ``search``: method -> what to change, for a plan a search chose (the
    warning must not advise the command just run: planner/tune.py advice())."""
    fitting = sorted((r for r in rows if not r.error and r.fits and r.phases), key=lambda r: (r.prefill_us, r.method))
    mine = next((r for r in rows if r.planned), None)
    if not fitting:
        return ["No compared method fits the device's memory; see the table below."]
    best = fitting[0]
    out = []
    if len(fitting) > 1:
        runner = fitting[1]
        phase, a, b = _dominant(best, runner)
        out.append(f"The fastest method that fits is **{best.method}** on {best.gpus} GPU(s): {_ms(best.prefill_us)} ms "
                   f"predicted, {runner.prefill_us / best.prefill_us:.2f}x faster than the next, {runner.method} "
                   f"({_ms(runner.prefill_us)} ms). Why: {phase} ({_ms(a)} vs {_ms(b)} ms on the critical rank). "
                   f"Largest phase of {best.method}: {_share(best)}.")
    else:
        out.append(f"The only method that fits is **{best.method}** ({_ms(best.prefill_us)} ms predicted; largest "
                   f"phase: {_share(best)}).")
    if mine is not None and mine is not best and not mine.error:
        phase, a, b = _dominant(best, mine)
        note = QUALITY_NOTES.get(best.method)
        out.append("")
        out.append(f"**Warning:** the planned method, {mine.method} ({_ms(mine.prefill_us)} ms"
                   f"{'' if mine.fits else ', does not fit'}), is not the fastest: {best.method} is predicted "
                   f"{mine.prefill_us / best.prefill_us:.2f}x faster on the same work, mostly in {phase} ({_ms(b)} vs "
                   f"{_ms(a)} ms). Plan it with `{_overrides(best.method, mine.method)}`, or "
                   f"{(search or {}).get(best.method, SEARCH_ADVICE)}{f'; note: {note}' if note else ''}.")
    return out


def calibration_lines(cfg: SpavaConfig) -> list[str]:
    """How far to trust the predictions: a calibrated preset says on what device it was fitted and
    how far off it was on held-out cells; an uncalibrated one says that it is not calibrated."""
    t = cfg.topology
    cal = t.calibration
    if cal is None:
        return ["", f"Topology `{t.name}` is not calibrated: its rates are datasheet or spot-measured values, so "
                    "these predictions have no measured error bar (topology=h200_calibrated is fitted to GPU "
                    "measurements)."]
    when = f" on {cal.date}" if cal.date else ""
    fitted = f", fitted on {cal.fitted_on}" if cal.fitted_on else ""
    return ["", f"Topology `{t.name}` is calibrated to measurements on {cal.device}{when}{fitted}. "
                + (f"Nothing was held out ({cal.held_out.removeprefix('none').strip(' ()')}): on the fitted cells "
                   if cal.held_out.startswith("none") else f"On held-out cells ({cal.held_out}) ")
                + f"its predicted time to first token was off by {cal.held_out_mean_abs_error:.1%} "
                f"on average, {cal.held_out_max_abs_error:.1%} at worst ({cal.source})."
                + ("" if cal.device.lower().replace("nvidia ", "") in t.device.lower() else
                   f" This plan is for {t.device}, not the calibration device.")]


def warning_line(rows: Sequence[MethodRow], search: Mapping[str, str] | None = None) -> str | None:
    """The report's warning as one plain line for the terminal (None when the planned method is the fastest)."""
    lines = conclusion_lines(rows, search)
    warn = [line for line in lines if line.startswith("**Warning:**")]
    return warn[0].replace("**", "").replace("`", "") if warn else None


def _rank_indices(world: int) -> list[int]:
    if world <= MAX_RANK_ROWS:
        return list(range(world))
    half = MAX_RANK_ROWS // 2
    return list(range(half)) + list(range(world - half, world))


def global_passing_lines(plan: Plan) -> list[str]:
    """method.passing=global: what each host attends instead of the per-block rule, and why."""
    scan = next((c for c in plan.collectives if c.kind == "select_scan"), None)
    if scan is None:
        return []
    V, p = plan.layout.virtual_hosts, scan.rows_per_rank
    return [f"- passing: global (method.passing=global). Each host after the first attends the {p:,} keys per KV "
            f"head that score highest for the question across ALL earlier hosts, not a share of every block: the "
            f"last of the {V} hosts reads {p:,} passing keys instead of {V - 1:,} x k under the per-block rule, so "
            f"per-host work stays flat as GPUs and frames grow together. The keys arrive through a prefix scan "
            f"of {scan_rounds(V)} rounds of sparse all-to-alls ({scan.bytes_per_rank / 2**20:,.2f} MiB per rank "
            f"per round, {scan.time_us / 1e3:,.2f} ms per layer predicted). Approximate: its needle recall is "
            f"measured in benchmarks/results/2026-12-04-cpu-fidelity-global.md."]


def _anchor_rows(plan: Plan) -> int:
    """Rows of the anchor every rank attends (spava / apb's anchor, Star's block 0), 0 when none."""
    sent = next((c for c in plan.collectives if c.kind == "anchor_broadcast"), None)
    if sent is not None:
        return sent.rows_per_rank
    if plan.world_size < 2 or plan.method not in ("spava", "apb", "star"):
        return 0
    names = {s.name: s for s in plan.layout.segments}
    seg = names.get("anchor") or (names.get("block0") if plan.method == "star" else None)
    return seg.length if seg is not None else 0


def anchor_lines(plan: Plan, cfg: SpavaConfig) -> list[str]:
    """method.anchor: who runs the anchor's rows, and what the broadcast saves (or would save)."""
    a = _anchor_rows(plan)
    if not a:
        return []
    W, layers = plan.world_size, plan.model.num_layers
    per_rank_ms = layers * CostModel(cfg.model, cfg.topology, cfg.dtype_bytes, W).anchor(a).us / 1e3
    sent = next((c for c in plan.collectives if c.kind == "anchor_broadcast"), None)
    if sent is None:
        return [f"- anchor: recompute (method.anchor=recompute): every rank runs the anchor's {a:,} rows through all "
                f"{layers} layers ({per_rank_ms:,.1f} ms of each rank's prefill predicted); method.anchor=broadcast "
                f"would leave them to rank 0, which sends their K/V every layer."]
    return [f"- anchor: broadcast (method.anchor=broadcast): rank 0 runs the anchor's {a:,} rows as its first rows "
            f"and sends their K/V every layer ({sent.bytes_per_rank / 2**20:,.2f} MiB, {sent.time_us:,.1f} us "
            f"predicted, received behind the others' selection); the other {W - 1} ranks run none of them, "
            f"{per_rank_ms:,.1f} ms of LLM work each (and the anchor's video rows in the vision exchange); "
            f"{_anchor_placement(plan)}."]


def _anchor_placement(plan: Plan) -> str:
    """Whether the placement could weigh rank 0's anchor work."""
    if plan.method == "star":
        return "block 0 is rank 0's own block, so rank 0 does no extra work"
    if plan.method != "spava":
        return f"{plan.method}'s fixed placement (block r on rank r) cannot move work off rank 0"
    if plan.placement.solver == "zigzag":
        return ("the zigzag placement does not weigh rank 0's extra work (solver=greedy, local_search or exact "
                "balance the hosts around it)")
    return f"solver {plan.placement.solver} balances the hosts around rank 0's extra work"


def report_markdown(plan: Plan, cfg: SpavaConfig, rows: Sequence[MethodRow], plan_hash: str,
                    search: Mapping[str, str] | None = None) -> str:
    lay, pred, pl, m = plan.layout, plan.prediction, plan.placement, plan.model
    cap = usable_bytes(cfg)
    blocks = lay.blocks
    sizes = sorted({b.length for b in blocks})
    t = cfg.topology
    lines = [
        f"# spava-plan: {plan.method} for {m.name} on {plan.world_size} x {t.name}",
        "",
        f"Plan hash `{plan_hash}` (schema {plan.schema_version}). All times are the cost model's predictions "
        f"for {t.device} ({t.gemm_tflops:g} TFLOP/s GEMM, {t.attention_tflops:g} TFLOP/s attention, "
        f"{t.hbm_gbps:g} GB/s HBM, {t.intra_node_gbps:g} GB/s NVLink, {t.inter_node_gbps:g} GB/s between nodes, "
        f"{t.num_nodes if plan.world_size > 1 else 1} node(s)); they are not measurements.",
        "",
        "## Conclusion",
        "",
        *conclusion_lines(rows, search),
        *calibration_lines(cfg),
        "",
        "## Tokens",
        "",
        f"- video: {cfg.video.frames} frames requested, {lay.frames} after padding, {cfg.video.resolution} resized to "
        f"{lay.frame_size[0]}x{lay.frame_size[1]}; grid (t, h, w) = {tuple(lay.grid_thw)}",
        f"- tokens: {lay.total_tokens:,} = context L {lay.context_tokens:,} (video {lay.video_tokens:,}) + "
        f"query Lq {lay.query_tokens}",
        f"- anchor a = {lay.anchor_tokens:,}; passing budget p = {lay.passing_tokens:,}; "
        f"passed per block k = {blocks[0].keep if blocks else 0:,}",
        *global_passing_lines(plan),
        *anchor_lines(plan, cfg),
        f"- {lay.virtual_hosts} {'chunks' if blocks and blocks[0].kind == 'chunk' else 'virtual hosts'} of "
        f"{' / '.join(f'{s:,}' for s in sizes)} tokens",
        "",
        "## Methods on the same work",
        "",
        "Dense runs on one GPU, the others on the configured GPUs. Speedups are ratios of predicted prefill time "
        "(vision encoder included). A method that does not fit is still timed as if the device had room.",
        "",
        *method_table(rows, cap),
        "",
        "## Placement",
        "",
        f"solver `{pl.solver}`: makespan {pl.makespan:,.1f} us/layer of host work"
        f"{f' (rank 0 also runs the anchor: {pl.rank_base[0]:,.1f} us)' if pl.rank_base else ''}, lower bound "
        f"{pl.lower_bound:,.1f} us, gap {pl.gap:.3%}.",
        "",
        "## Per rank (one layer, then the whole prefill)",
        "",
        "| rank | hosts | local tokens | layer (ms) | exposed comm (ms/layer) | prefill (ms) | peak GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in _rank_indices(plan.world_size):
        rank, sched = plan.ranks[r], plan.schedule[r]
        hosts = ", ".join(str(h) for h in rank.hosts)
        lines.append(f"| {r} | {hosts} | {rank.local_tokens:,} | {_ms(sched.layer_us)} | {_ms(sched.exposed_comm_us)} | "
                     f"{_ms(pred.rank_us[r])} | {_gib(pred.peak_memory_bytes[r])} |")
    if plan.world_size > MAX_RANK_ROWS:
        lines.append(f"\n({plan.world_size - MAX_RANK_ROWS} middle ranks omitted; schedule.json has all.)")
    parts = pred.memory_breakdown
    lines += [
        "",
        f"Prefill: vision encoder {_ms(pred.vision_us)} ms ({VISION_PLACEMENT[plan.vision_parallel]}, "
        "embedding exchange included), "
        f"{m.num_layers} layers; makespan {_ms(pred.makespan_us)} ms; exposed communication on the critical "
        f"rank {_ms(pred.exposed_comm_us)} ms.",
        "",
        "## Memory of the busiest rank (GiB)",
        "",
        "| " + " | ".join(PARTS) + " | peak | usable |",
        "|" + "---|" * (len(PARTS) + 2),
        "| " + " | ".join(_gib(parts.get(k, 0)) for k in PARTS) + f" | {_gib(parts.get('peak', 0))} | {_gib(cap)} |",
        "",
        "peak = weights + max(vision_stage, kv_cache + activations + passing + gather). Activations assume the "
        f"runtime's chunking (plan.json `chunking`): the MLP and norms in chunks of {plan.chunking.mlp_tokens:,} "
        f"tokens, the vision tower {plan.chunking.vision_units} whole grid(s) per call. A rank fits when its "
        f"peak plus {ALLOCATOR_SLACK:.0%} allocator slack is within the usable memory.",
        "",
        "## Collectives per layer",
        "",
        "| name | kind | bytes per rank | predicted time (us) |",
        "|---|---|---|---|",
        *[f"| {c.name} | {c.kind} | {c.bytes_per_rank:,} | {c.time_us:,.1f} |" for c in plan.collectives],
        "",
        "Artifacts: plan.json (the contract), schedule.json (timed ops per rank, one layer), graph.json "
        "(networkx node-link block graph), timeline.png (the whole prefill of every rank, then one layer in "
        "detail), trace.json (the same schedule for chrome://tracing or Perfetto)"
        + (", kernels/ (the rendered Triton kernels)" if cfg.kernels else "") + ".",
        "",
    ]
    return "\n".join(lines)


def schedule_dict(plan: Plan) -> dict[str, Any]:
    """schedule.json: the timed per-rank op lists and the collectives (one layer)."""
    return {
        "method": plan.method,
        "world_size": plan.world_size,
        "num_layers": plan.model.num_layers,
        "units": "microseconds per layer",
        "collectives": [c.__dict__ for c in plan.collectives],
        "ranks": [{"rank": s.rank, "layer_us": s.layer_us, "exposed_comm_us": s.exposed_comm_us,
                   "ops": [{**o.__dict__, "tasks": list(o.tasks)} for o in s.ops]} for s in plan.schedule],
    }


def schedule_json(plan: Plan) -> str:
    return json.dumps(schedule_dict(plan), indent=1) + "\n"


def summary_table(rows: Sequence[MethodRow]) -> str:
    """The short plain-text table the CLI prints."""
    head = ("method", "GPUs", "prefill ms", "vs dense", "vs ring", "peak GiB", "fits")
    body = []
    for r in rows:
        name = r.method + (" *" if r.planned else "")
        if r.error:
            body.append((name, "-", "not plannable", "", "", "", ""))
            continue
        body.append((name, str(r.gpus), _ms(r.prefill_us), _x(r.speedup_vs_dense), _x(r.speedup_vs_ring),
                     _gib(r.peak_bytes), "yes" if r.fits else "NO"))
    widths = [max(len(row[i]) for row in (head, *body)) for i in range(len(head))]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                     for row in (head, *body))


SUMMARY_COLUMNS = ("job", "model", "method", "gpus", "frames", "resolution", "tokens", "prefill_ms", "rank_ms_max",
                   "rank_ms_min", "speedup_vs_dense", "speedup_vs_zigzag_ring", "peak_gib_per_gpu", "solver_gap",
                   "status", "output_dir")


def summary_row(job: str, plan: Plan, cfg: SpavaConfig, rows: Sequence[MethodRow], out_dir: str) -> dict[str, Any]:
    """One row of a sweep's summary for a planned job."""
    mine = next(r for r in rows if r.planned)
    return {"job": job, "model": cfg.model.name, "method": plan.method, "gpus": plan.world_size,
            "frames": cfg.video.frames, "resolution": cfg.video.resolution, "tokens": plan.layout.total_tokens,
            "prefill_ms": round(mine.prefill_us / 1e3, 3), "rank_ms_max": round(mine.rank_us_max / 1e3, 3),
            "rank_ms_min": round(mine.rank_us_min / 1e3, 3),
            "speedup_vs_dense": None if mine.speedup_vs_dense is None else round(mine.speedup_vs_dense, 3),
            "speedup_vs_zigzag_ring": None if mine.speedup_vs_ring is None else round(mine.speedup_vs_ring, 3),
            "peak_gib_per_gpu": round(mine.peak_bytes / GIB, 2), "solver_gap": round(plan.placement.gap, 6),
            "status": "ok", "output_dir": out_dir}


def failed_row(job: str, overrides: str, error: str, cfg: Any = None) -> dict[str, Any]:
    """A sweep cell that did not plan: it says why, and keeps the coordinates of the cell (model,
    method, GPUs, frames, resolution from ``cfg`` when the config itself was valid); it has no
    output folder."""
    row = {**{c: None for c in SUMMARY_COLUMNS}, "job": job, "status": f"error: {error}", "output_dir": ""}
    if cfg is not None:
        row.update(model=cfg.model.name, method=cfg.method.name, gpus=cfg.topology.gpus, frames=cfg.video.frames,
                   resolution=cfg.video.resolution)
    return row


def summary_markdown(rows: Sequence[dict[str, Any]], columns: Sequence[str] = SUMMARY_COLUMNS) -> str:
    cols = columns
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join("" if row.get(c) is None else str(row[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"
