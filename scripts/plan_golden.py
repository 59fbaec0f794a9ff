"""Write the planner's artifacts (plan.json, report.md, schedule.json, trace.json) for a fixed set of
configs into a folder, so that two versions of the code can be diffed:

    python scripts/plan_golden.py /tmp/golden-before        # on the old commit
    python scripts/plan_golden.py /tmp/golden-after         # on the new one
    diff -r /tmp/golden-before /tmp/golden-after

The set: every method x W in {1, 2, 3, 8, 64} on Qwen2.5-VL-3B, and every method at W=8 on
InternVL3-2B, each with kernels=false (no kernels/, no timeline.png: neither is in the set). A config
the planner refuses writes error.txt (its one line) instead, so a changed refusal shows in the diff
too. ``--only SUBSTRING`` limits the set (e.g. ``--only w8``).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from spava_plan.entry.cli import TimelineWorker, plan_job
from spava_plan.config import METHODS
from spava_plan.errors import SpavaError
from spava_plan.hydra_conf import compose_config

ARTIFACTS = ("plan.json", "report.md", "schedule.json", "trace.json")
WORLDS = (1, 2, 3, 8, 64)


def configs() -> dict[str, list[str]]:
    """name -> overrides. 256 frames at 360p: 128 temporal grids, enough for 64 ranks."""
    out: dict[str, list[str]] = {}
    for method in METHODS:
        for w in WORLDS:
            nodes = [] if w <= 8 else [f"nodes={w // 8}"]
            out[f"qwen2_5vl_3b-{method}-w{w}"] = ["model=qwen2_5vl_3b", f"method={method}", f"gpus={w}", *nodes,
                                                 "frames=256", "video.resolution=360p", "kernels=false"]
        out[f"internvl3_2b-{method}-w8"] = ["model=internvl3_2b", f"method={method}", "gpus=8", "frames=128",
                                            "video.resolution=360p", "kernels=false"]
    return out


def write(name: str, overrides: list[str], root: Path) -> str:
    folder = root / name
    if folder.exists():
        shutil.rmtree(folder)
    job = root / ".job"
    shutil.rmtree(job, ignore_errors=True)
    try:
        plan_job(compose_config(overrides), job, TimelineWorker(enabled=False))
    except SpavaError as exc:
        folder.mkdir(parents=True)
        (folder / "error.txt").write_text(f"{exc}\n")
        return f"{name}: refused ({exc})"
    folder.mkdir(parents=True)
    for artifact in ARTIFACTS:
        shutil.copyfile(job / artifact, folder / artifact)
    shutil.rmtree(job, ignore_errors=True)
    (folder / "overrides.txt").write_text(" ".join(overrides) + "\n")
    return f"{name}: written"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write <config>/<artifact> into")
    parser.add_argument("--only", default="", help="only configs whose name contains this")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, overrides in configs().items():
        if args.only in name:
            print(write(name, overrides, args.out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
