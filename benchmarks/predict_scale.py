"""Predicted weak scaling of Spava past one node (issue 27): the planner's own predictions for
the per-block rule, global passing, Star and ZigZagRing on the issue's cells (frames growing with
the GPUs), on the h200 topology without kernels. Pure planning: any CPU, no GPU.

    python benchmarks/predict_scale.py --out benchmarks/results/2026-12-04-predicted-scale-global.md

Columns: predicted prefill (vision encoder included) in seconds and whether every rank fits;
"global, paper anchor" plans global passing with the anchor at the paper's a = L/64 rule instead
of the default cap at one block (planner/partition.py global_anchor), to show what the cap buys.
The global plan of each cell is also built in full (build_plan: every op of every rank), timed
in wall and CPU seconds on this machine while it is shared (the load average is printed).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from spava_plan.hydra_conf import compose_config
from spava_plan.planner.build import build_plan, derive
from spava_plan.planner.layout import paper_anchor, token_layout

BASE = ("topology=h200", "kernels=false")
# (GPUs, frames, model) of the table; the 1024-GPU cell in both models it names
CELLS = ((8, 2048, "qwen2vl"), (8, 2048, "qwen2_5vl_7b"), (16, 2048, "qwen2_5vl_7b"), (64, 8192, "qwen2_5vl_7b"),
         (256, 32768, "qwen2_5vl_7b"), (1024, 131072, "qwen2_5vl_7b"), (1024, 131072, "qwen2vl"))
METHODS = {"per_block": (), "global": ("method.passing=global",), "star": ("method=star",),
           "zigzag_ring": ("method=zigzag_ring",)}


def predict(overrides: list[str]) -> tuple[float, bool, float]:
    d = derive(compose_config(overrides), require_fit=False, detail=False)
    return d.prediction.makespan_us / 1e6, d.fits, max(d.prediction.peak_memory_bytes) / 2 ** 30


def cell_row(gpus: int, frames: int, model: str) -> dict:
    base = [*BASE, f"model={model}", f"gpus={gpus}", f"frames={frames}"]
    cfg = compose_config(base)
    L = token_layout(cfg.model, cfg.video).context_tokens
    row = {"gpus": gpus, "frames": frames, "model": model, "tokens": token_layout(cfg.model, cfg.video).total_tokens}
    for name, extra in METHODS.items():
        row[name] = predict([*base, *extra])
    row["global_paper_anchor"] = predict([*base, "method.passing=global", f"method.anchor_tokens={paper_anchor(L)}"])
    gcfg = compose_config([*base, "method.passing=global"])
    wall, cpu = time.perf_counter(), time.process_time()
    plan = build_plan(gcfg, require_fit=False)
    row["plan_wall_s"], row["plan_cpu_s"] = time.perf_counter() - wall, time.process_time() - cpu
    blk = plan.layout.blocks
    row["P"], row["anchor"], row["block"] = blk[0].keep, plan.layout.anchor_tokens, blk[0].length
    return row


def table(rows: list[dict]) -> str:
    def t(x: tuple) -> str:
        return f"{x[0]:,.1f}" + ("" if x[1] else " (no fit)")

    lines = ["| GPUs, frames (tokens), model | per_block | global | global, paper anchor | star | zigzag_ring "
             "| global vs per_block | global vs star | zigzag_ring vs global | global P / anchor / block "
             "| global peak GiB | plan global: wall / CPU s |", "|---|" + "---|" * 11]
    for r in rows:
        g, s, z, pb = r["global"][0], r["star"][0], r["zigzag_ring"][0], r["per_block"][0]
        lines.append(f"| {r['gpus']}, {r['frames']} ({r['tokens'] / 1e6:.2f}M), {r['model']} | {t(r['per_block'])} "
                     f"| {t(r['global'])} | {t(r['global_paper_anchor'])} | {t(r['star'])} | {t(r['zigzag_ring'])} "
                     f"| {pb / g:.2f}x faster | {g / s:.2f}x star's time | {z / g:.1f}x | {r['P']:,} / {r['anchor']:,} "
                     f"/ {r['block']:,} | {r['global'][2]:.1f} | {r['plan_wall_s']:.1f} / {r['plan_cpu_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the markdown table here")
    a = ap.parse_args(argv)
    rows = [cell_row(*c) for c in CELLS]
    load = os.getloadavg()
    text = (f"`python benchmarks/predict_scale.py{' --out ' + a.out if a.out else ''}` (predicted, "
            f"{' '.join(BASE)}; seconds of prefill, vision encoder included)\n\n{table(rows)}\n\n"
            f"Planning times measured on this {os.cpu_count()}-core machine with load average "
            f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (shared with other work).\n")
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
