"""timeline.png and trace.json: the predicted per-rank schedule.

timeline.png has two panels. Top: the whole prefill of every rank, the vision encoder (with the
embedding exchange) then the layers. Bottom: one layer in detail, two lanes per rank: compute
(qkv, select, attend, merge, out_mlp; stalls on a comm_wait hatched) and comm (the collectives'
transfers). Every rank is shown up to MAX_RANKS_SHOWN; beyond, ranks are grouped into that many
contiguous groups and each group is drawn as its slowest rank. ``timeline_data`` extracts plain,
picklable data from a Plan; ``render`` draws it with matplotlib's Figure on the Agg canvas
directly (pyplot would cost start-up time and needs no GUI backend here), so the drawing can run
in another process.

trace.json (``predicted_trace``): the same schedule as a Chrome / Perfetto trace
(spava_plan/trace.py, the format an emulated run's measured timeline is written in too).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from spava_plan.plan import Plan
from spava_plan.trace import Span, group_label, rank_groups, trace_json

MAX_RANKS_SHOWN = 16
COLORS = {
    "qkv": "#4c72b0", "out_mlp": "#55a868", "select": "#8172b2", "attend": "#dd8452", "merge": "#937860",
    "wait": "#c44e52", "select_all_gather": "#64b5cd", "select_scan": "#64b5cd", "query_all_gather": "#da8bc3", "ring": "#8c8c8c",
    "vision": "#ccb974", "layers": "#8da0cb",
}
MAX_TRACE_GROUPS = 64  # trace.json: processes (ranks or groups of ranks)
MAX_TRACE_EVENTS = 200_000  # beyond, trace.json details the first layer and shows the rest as one span


def shown_groups(plan: Plan, most: int = MAX_RANKS_SHOWN) -> list[tuple[str, int]]:
    """(label, shown rank) per lane group: every rank up to ``most``; beyond, ``most`` contiguous
    groups of ranks, each shown by its slowest rank."""
    out = []
    for a, b in rank_groups(plan.world_size, most):
        r = max(range(a, b), key=lambda i: (plan.prediction.rank_us[i], -i))
        out.append((group_label(a, b, r), r))
    return out


def shown_ranks(plan: Plan) -> list[int]:
    return [r for _, r in shown_groups(plan)]


def timeline_data(plan: Plan) -> dict[str, Any]:
    """Bars per lane in ms: {"title", "lanes": [(label, {color key: [(start, width)]})]}."""
    kinds = {c.name: c.kind for c in plan.collectives}
    scale = 1e-3  # us -> ms
    groups = shown_groups(plan)
    ranks = [r for _, r in groups]
    pred = plan.prediction
    prefill = [(label, {"vision": [(0.0, pred.vision_us * scale)],
                        "layers": [(pred.vision_us * scale, (pred.rank_us[r] - pred.vision_us) * scale)]})
               for label, r in groups]
    lanes = []
    for label, r in groups:
        compute: dict[str, list[tuple[float, float]]] = {}
        comm: dict[str, list[tuple[float, float]]] = {}
        for op in plan.schedule[r].ops:
            width = (op.end_us - op.start_us) * scale
            if width <= 0:
                continue
            if op.kind == "compute":
                compute.setdefault(op.name, []).append((op.start_us * scale, width))
            elif op.kind == "comm_wait":
                compute.setdefault("wait", []).append((op.start_us * scale, width))
            else:
                comm.setdefault(kinds[op.collective], []).append((op.start_us * scale, width))
        lanes += [(f"{label} compute", compute), (f"{label} comm", comm)]
    hidden = "" if len(ranks) == plan.world_size else f", {plan.world_size} ranks in {len(ranks)} groups"
    title = (f"{plan.method} on {plan.world_size} GPU(s), {plan.model.name}, {plan.layout.total_tokens:,} tokens: "
             f"predicted prefill {pred.makespan_us * scale:,.1f} ms (vision {pred.vision_us * scale:,.1f} ms + "
             f"{plan.model.num_layers} layers){hidden}")
    return {"title": title, "prefill": prefill, "lanes": lanes,
            "layer_title": f"one layer in detail: {max(s.layer_us for s in plan.schedule) * scale:.2f} ms on the "
                           f"slowest rank"}


def predicted_spans(plan: Plan) -> list[Span]:
    """trace.json's spans: per rank (or group of ranks, shown by its slowest rank) the vision
    encoder, then every layer's ops (compute lane: compute ops and stalls; comm lane: transfers)."""
    kinds = {c.name: c.kind for c in plan.collectives}
    groups = shown_groups(plan, MAX_TRACE_GROUPS)
    layers = plan.model.num_layers
    ops = max(len(plan.schedule[r].ops) for _, r in groups)
    detailed = layers if len(groups) * layers * ops <= MAX_TRACE_EVENTS else 1
    vision = plan.prediction.vision_us
    out = []
    for label, r in groups:
        sched = plan.schedule[r]
        out.append(Span(label, "compute", "vision encoder + embedding exchange", 0.0, vision, "vision"))
        for layer in range(detailed):
            base = vision + layer * sched.layer_us
            for op in sched.ops:
                width = op.end_us - op.start_us
                if width <= 0:
                    continue
                args = {"layer": layer, **({"tasks": list(op.tasks)} if op.tasks else {})}
                if op.kind == "compute":
                    out.append(Span(label, "compute", op.name, base + op.start_us, width, op.name, args))
                elif op.kind == "comm_wait":
                    out.append(Span(label, "compute", op.name, base + op.start_us, width, "wait", args))
                else:
                    out.append(Span(label, "comm", op.collective, base + op.start_us, width,
                                    kinds[op.collective], args))
        if detailed < layers:
            out.append(Span(label, "compute", f"layers {detailed}-{layers - 1} (same schedule as layer 0)",
                            vision + detailed * sched.layer_us, (layers - detailed) * sched.layer_us, "layers"))
    return out


def predicted_trace(plan: Plan) -> str:
    """trace.json text of the predicted schedule (Chrome / Perfetto trace format)."""
    return trace_json(predicted_spans(plan), {"source": "spava-plan prediction (cost model), not a measurement",
                                              "method": plan.method, "world_size": plan.world_size,
                                              "model": plan.model.name, "units": "microseconds"})


def preload() -> None:
    """Import the drawing modules (what makes the first render slow)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    from matplotlib.figure import Figure  # noqa: F401
    from matplotlib.patches import Patch  # noqa: F401


def render(data: dict[str, Any], path: str | Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    lanes = data["lanes"]
    prefill = data.get("prefill", [])
    fig = Figure(figsize=(12, 2.0 + 0.25 * (len(lanes) + len(prefill))), dpi=90)
    FigureCanvasAgg(fig)
    top, ax = fig.subplots(2, 1, gridspec_kw={"height_ratios": [max(1, len(prefill)), max(1, len(lanes))]})
    used: set[str] = set()
    for i, (_, bars) in enumerate(prefill):
        y = len(prefill) - 1 - i
        for key, spans in bars.items():
            used.add(key)
            top.broken_barh(spans, (y + 0.1, 0.8), facecolors=COLORS.get(key, "#cccccc"), edgecolor="white",
                            linewidth=0.3)
    top.set_yticks([len(prefill) - 1 - i + 0.5 for i in range(len(prefill))])
    top.set_yticklabels([label for label, _ in prefill], fontsize=7)
    top.set_xlabel("time in the whole prefill (ms)")
    top.set_title(data["title"], fontsize=9)
    top.grid(axis="x", linewidth=0.3)
    for i, (_, bars) in enumerate(lanes):
        y = len(lanes) - 1 - i
        for key, spans in bars.items():
            used.add(key)
            wait = key == "wait"
            ax.broken_barh(spans, (y + 0.1, 0.8), facecolors=COLORS.get(key, "#cccccc"), hatch="//" if wait else None,
                           edgecolor="#c44e52" if wait else "white", linewidth=0.3)
    ax.set_yticks([len(lanes) - 1 - i + 0.5 for i in range(len(lanes))])
    ax.set_yticklabels([label for label, _ in lanes], fontsize=7)
    ax.set_xlabel("time within one layer (ms)")
    ax.set_title(data.get("layer_title", ""), fontsize=9)
    ax.legend(handles=[Patch(facecolor=COLORS[k], label=k, hatch="//" if k == "wait" else None)
                       for k in COLORS if k in used], fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0),
              frameon=False)
    ax.grid(axis="x", linewidth=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def render_timeline(plan: Plan, path: str | Path) -> Path:
    return render(timeline_data(plan), path)
