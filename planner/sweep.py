"""A sweep's (`spava-plan -m ...`) summary: one column per swept key and the sweep plot.

Each job's summary row carries the job's overrides (``_overrides``: key -> value as typed) and
every compared method's predicted prefill (``_methods``: method -> ms); this module turns them
into the swept-key columns of summary.csv / summary.md and the data of sweep.png (predicted
speedup over dense against frames or GPUs: a panel per value of the other swept keys, a line per
method).
"""
from __future__ import annotations

from typing import Any, Sequence

X_KEYS = ("frames", "gpus", "video.frames", "topology.gpus")  # what the plot's x axis may be


def _number(text: Any) -> Any:
    try:
        return int(text)
    except (TypeError, ValueError):
        try:
            return float(text)
        except (TypeError, ValueError):
            return text


def swept_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Override keys whose value differs between jobs, in the order they first appear."""
    keys: list[str] = []
    for row in rows:
        for k in row.get("_overrides", {}):
            if k not in keys:
                keys.append(k)
    return [k for k in keys if len({str(r.get("_overrides", {}).get(k)) for r in rows}) > 1]


def with_swept_columns(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> tuple[list[dict], list[str]]:
    """(rows with one column per swept key, the column order: job, swept keys, then ``columns``)."""
    keys = swept_keys(rows)
    out = []
    for row in rows:
        plain = {k: v for k, v in row.items() if not k.startswith("_")}
        over = row.get("_overrides", {})
        for k in keys:
            if plain.get(k) is None:  # a key the summary already has keeps the plan's value
                plain[k] = over.get(k)
        out.append(plain)
    cols = ["job", *[k for k in keys if k not in columns], *[c for c in columns if c != "job"]]
    return out, cols


MAX_PANELS = 12  # beyond this many combinations of the other swept keys, a plot is not readable


def sweep_plot_data(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Predicted speedup over dense against the swept frames or GPUs: one panel per value of the
    other swept keys, one line per method in each. When ``method`` itself is swept, each job
    contributes only its own method (what the sweep compares); otherwise every method the job
    compared (dense, the reference, is left out). None when neither frames nor GPUs is swept or
    the other keys give more than MAX_PANELS panels."""
    keys = swept_keys(rows)
    x_key = next((k for k in X_KEYS if k in keys), None)
    if x_key is None:
        return None
    method_swept = "method" in keys
    others = [k for k in keys if k not in (x_key, "method")]
    panels: dict[str, dict[str, list[tuple[Any, float]]]] = {}
    for row in rows:
        methods = row.get("_methods") or {}
        dense = methods.get("dense")
        if not dense:
            continue
        over = row.get("_overrides", {})
        panel = ", ".join(f"{k}={over.get(k)}" for k in others)
        shown = {row.get("method"): methods.get(row.get("method"))} if method_swept else \
            {m: ms for m, ms in methods.items() if m != "dense"}
        for method, ms in shown.items():
            if method and ms:
                panels.setdefault(panel, {}).setdefault(method, []).append((_number(over.get(x_key)), dense / ms))
    if not panels or len(panels) > MAX_PANELS:
        return None
    return {"x": x_key,
            "panels": {p: {m: sorted(v) for m, v in sorted(lines.items())} for p, lines in panels.items()},
            "title": f"predicted speedup over dense (one GPU) against {x_key}"}


def render_sweep(data: dict[str, Any], path: Any) -> Any:
    """Small multiples sharing both axes, one colour per method throughout, the legend below the
    panels (never over the data)."""
    import math

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    panels = data["panels"]
    n = len(panels)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.6 * cols + 0.6, 2.9 * rows + 0.9), dpi=90)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)
    methods = sorted({m for lines in panels.values() for m in lines})
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    numeric = all(isinstance(x, (int, float)) for lines in panels.values() for pts in lines.values() for x, _ in pts)
    for i, (title, lines) in enumerate(panels.items()):
        ax = axes[i // cols][i % cols]
        for method, pts in lines.items():
            ax.plot([x if numeric else str(x) for x, _ in pts], [y for _, y in pts], marker="o", color=colours[method],
                    label=method)
        if numeric:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.grid(linewidth=0.3)
        if title:
            ax.set_title(title, fontsize=8)
        if i // cols == rows - 1 or i + cols >= n:
            ax.set_xlabel(data["x"])
        if i % cols == 0:
            ax.set_ylabel("speedup over dense")
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    handles = [h for h in (axes[0][0].get_legend_handles_labels()[0]) if h.get_label() in colours]
    seen = {h.get_label() for h in handles}
    for lines_ax in axes.flat:  # a method missing from the first panel still gets its entry
        for h in lines_ax.get_legend_handles_labels()[0]:
            if h.get_label() not in seen:
                handles.append(h)
                seen.add(h.get_label())
    fig.suptitle(data["title"], fontsize=9)
    fig.legend(handles=sorted(handles, key=lambda h: h.get_label()), loc="lower center", ncol=min(len(methods), 6),
               fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08 if rows > 1 else 0.12, 1, 1))
    fig.savefig(str(path), format="png")
    return fig
