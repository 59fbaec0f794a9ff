"""timeline.png: a Gantt chart of one layer of the predicted per-rank schedule.

Two lanes per rank: compute (qkv, select, attend, merge, out_mlp; stalls on a comm_wait hatched)
and comm (the collectives' transfers). ``timeline_data`` extracts plain, picklable data from a
Plan; ``render`` draws it with matplotlib's Figure on the Agg canvas directly (pyplot would cost
start-up time and needs no GUI backend here), so the drawing can run in another process.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from spava_plan.plan import Plan

MAX_RANKS_SHOWN = 16
COLORS = {
    "qkv": "#4c72b0", "out_mlp": "#55a868", "select": "#8172b2", "attend": "#dd8452", "merge": "#937860",
    "wait": "#c44e52", "select_all_gather": "#64b5cd", "query_all_gather": "#da8bc3", "ring": "#8c8c8c",
}


def shown_ranks(plan: Plan) -> list[int]:
    """Every rank up to MAX_RANKS_SHOWN; beyond, the first ones plus the critical (slowest) rank."""
    world = plan.world_size
    if world <= MAX_RANKS_SHOWN:
        return list(range(world))
    critical = max(range(world), key=lambda r: plan.schedule[r].layer_us)
    ranks = list(range(MAX_RANKS_SHOWN - 1))
    return ranks + [critical] if critical not in ranks else list(range(MAX_RANKS_SHOWN))


def timeline_data(plan: Plan) -> dict[str, Any]:
    """Bars per lane in ms: {"title", "lanes": [(label, {color key: [(start, width)]})]}."""
    kinds = {c.name: c.kind for c in plan.collectives}
    scale = 1e-3  # us -> ms
    ranks = shown_ranks(plan)
    lanes = []
    for r in ranks:
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
        lanes += [(f"rank {r} compute", compute), (f"rank {r} comm", comm)]
    hidden = "" if len(ranks) == plan.world_size else f", {len(ranks)} of {plan.world_size} ranks shown"
    title = (f"{plan.method} on {plan.world_size} GPU(s), {plan.model.name}, {plan.layout.total_tokens:,} tokens: "
             f"predicted layer {max(s.layer_us for s in plan.schedule) * scale:.2f} ms{hidden}")
    return {"title": title, "lanes": lanes}


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
    fig = Figure(figsize=(12, 1.4 + 0.25 * len(lanes)), dpi=90)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    used: set[str] = set()
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
    ax.set_title(data["title"], fontsize=9)
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
