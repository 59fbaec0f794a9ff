"""Latency vs frames per method, one panel per (model, resolution), from prefill_report's data.

    python benchmarks/plot_prefill.py benchmarks/results/<date>-<device>-prefill.json

Medians with min-max bars; emulated W-rank methods dashed (labelled so), dense solid; log y.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

STYLE = {"dense_flash": ("tab:red", "-"), "dense_cudnn": ("tab:orange", "-"), "spava": ("tab:blue", "--"),
         "zigzag_ring": ("tab:green", "--"), "zigzag_ring_one_gpu": ("tab:olive", ":"), "apb": ("tab:purple", "--"), "star": ("tab:brown", "--")}


def plot(data: dict, png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], list[dict]] = {}
    for c in data["cells"]:
        if not c["check"]:
            groups.setdefault((c["model"], c["resolution"]), []).append(c)
    n = max(1, len(groups))
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.2), squeeze=False)
    W = data["world"]
    for ax, ((model, res), cells) in zip(axes[0], sorted(groups.items())):
        cells = sorted(cells, key=lambda c: c["frames"])
        for method, (color, ls) in STYLE.items():
            pts = [(c["frames"], c["methods"][method]["ttft_ms"]) for c in cells if method in c["methods"]]
            if not pts:
                continue
            xs = [f for f, _ in pts]
            med = [t["median"] / 1e3 for _, t in pts]
            # bars span min-max; an emulated median (per-rank medians, then the critical path) can
            # sit just outside the per-repeat makespans' range: the bar then starts at the median
            lo = [max(0.0, t["median"] - t["min"]) / 1e3 for _, t in pts]
            hi = [max(0.0, t["max"] - t["median"]) / 1e3 for _, t in pts]
            label = method + (f" (emulated {W}-rank)" if method not in ("dense_flash", "dense_cudnn") else " (1 GPU)")
            ax.errorbar(xs, med, yerr=[lo, hi], color=color, ls=ls, marker="o", ms=4, capsize=3, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("frames")
        ax.set_ylabel("time to first token (s)")
        ax.set_title(f"{model}, {res}")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xticks(sorted({c["frames"] for c in cells}))
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Prefill TTFT on {data['env'].get('device', '?')} (dense: 1 GPU; others: emulated {W}-rank)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


if __name__ == "__main__":
    src = Path(sys.argv[1])
    print(plot(json.loads(src.read_text()), src.with_suffix(".png")))
