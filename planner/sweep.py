"""A sweep's (`spava-plan -m ...`) summary: one column per swept key and the sweep plot.

Each job's summary row carries the job's overrides (``_overrides``: key -> value as typed) and
every compared method's predicted prefill (``_methods``: method -> ms); this module turns them
into the swept-key columns of summary.csv / summary.md and the data of sweep.png (predicted
speedup over dense against frames or GPUs, one line per method).
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
            plain.setdefault(k, over.get(k))  # a key the summary already has keeps the plan's value
        out.append(plain)
    cols = ["job", *[k for k in keys if k not in columns], *[c for c in columns if c != "job"]]
    return out, cols


def sweep_plot_data(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Lines of predicted speedup over dense against the swept frames or GPUs, one per method (and
    per value of the other swept keys); None when neither frames nor GPUs is swept."""
    keys = swept_keys(rows)
    x_key = next((k for k in X_KEYS if k in keys), None)
    if x_key is None:
        return None
    others = [k for k in keys if k != x_key]
    lines: dict[str, list[tuple[Any, float]]] = {}
    for row in rows:
        methods = row.get("_methods") or {}
        dense = methods.get("dense")
        if not dense:
            continue
        over = row.get("_overrides", {})
        rest = ", ".join(f"{k}={over.get(k)}" for k in others)
        for method, ms in methods.items():
            if ms:
                label = method + (f" ({rest})" if rest else "")
                lines.setdefault(label, []).append((_number(over.get(x_key)), dense / ms))
    if not lines:
        return None
    return {"x": x_key, "lines": {k: sorted(v) for k, v in sorted(lines.items())},
            "title": f"predicted speedup over dense (one GPU) against {x_key}"}


def render_sweep(data: dict[str, Any], path: Any) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=90)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    numeric = all(isinstance(x, (int, float)) for pts in data["lines"].values() for x, _ in pts)
    for label, pts in data["lines"].items():
        ax.plot([str(x) if not numeric else x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
    if numeric:
        ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(data["x"])
    ax.set_ylabel("predicted speedup over dense")
    ax.set_title(data["title"], fontsize=9)
    ax.grid(linewidth=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(str(path), format="png")
