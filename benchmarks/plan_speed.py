"""How long planning takes (CPU only; a benchmark, not a test).

1. Wall time of whole `spava-plan` commands, interpreter start included (a fresh process per run,
   median of --repeats): the headline `model=qwen2vl gpus=8 frames=2048` (target: under 1.5 s on a
   2-core machine) and `gpus=1024 frames=131072` (target: under 10 s).
2. Growth with gpus and frames: the planner in-process (no interpreter / Hydra start-up), doing
   what one CLI job does: the planned method in full (ops timed, Plan assembled, plan.json text)
   plus the four baselines' predictions.

    python benchmarks/plan_speed.py                 # writes benchmarks/results/<date>-cpu-plan_speed.{json,md}
    python benchmarks/plan_speed.py --repeats 3 --quick
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEADLINE = ["model=qwen2vl", "gpus=8", "frames=2048"]
LARGE = ["gpus=1024", "frames=131072"]
# At 131072 frames of 720p video (78M tokens) the default passing budget needs 147 GiB of passing
# buffers per GPU, so LARGE does not fit; with a 1024-token budget it fits an H200 (the vision stage
# holds each rank's local video embeddings only, since the encoder stopped all-gathering; every
# rank's 1.2M-token anchor needs about 87 GiB with the activations measured on an H100 on
# 2026-11-25, more than an H100 has).
LARGE_SMALL_PASSING = LARGE + ["method.passing_tokens=1024", "topology=h200"]
LARGE_FITTING = ["model=qwen2vl_2b", "gpus=1024", "frames=131072", "video.resolution=224x224"]
# The knob search (planner/tune.py) at the large shape, with passing allowed down to 1024 tokens
# (with the paper's floor the only plan that fits is zigzag_ring, whose O(W^2) plan.json dominates).
LARGE_TUNED = LARGE + ["tune=latency", "tune.min_passing=1024"]
GPUS = (8, 32, 128, 512, 1024)
FRAMES = (2048, 16384, 131072)


def _command() -> list[str]:
    exe = shutil.which("spava-plan")
    return [exe] if exe else [sys.executable, "-m", "spava_plan.entry.cli"]


def time_cli(args: list[str], repeats: int) -> dict:
    """Median / min wall seconds of a fresh `spava-plan` process, its exit code and last line."""
    times, rc, last = [], None, ""
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            t0 = time.perf_counter()
            res = subprocess.run(_command() + args + [f"hydra.run.dir=run{i}"], cwd=tmp, capture_output=True,
                                 text=True, timeout=600)
            times.append(time.perf_counter() - t0)
            rc = res.returncode
            last = (res.stderr.strip() or res.stdout.strip()).splitlines()[-1] if (res.stderr or res.stdout) else ""
    return {"command": "spava-plan " + " ".join(args), "median_s": statistics.median(times), "min_s": min(times),
            "runs": len(times), "exit_code": rc, "last_line": last[:300]}


def time_planner(gpus: int, frames: int) -> dict:
    """One CLI job's planning work, in-process: the planned method in full plus the baselines."""
    from spava_plan.hydra_conf import compose_config, with_method
    from spava_plan.planner.build import assemble, derive
    from spava_plan.planner.compare import COMPARED, compare

    cfg = compose_config([f"gpus={gpus}", f"frames={frames}"])
    t0 = time.perf_counter()
    main = derive(cfg, require_fit=False)
    t1 = time.perf_counter()
    rows = compare(main, {m: with_method(cfg, m) for m in COMPARED if m != "spava"})
    t2 = time.perf_counter()
    text = assemble(main).to_json()
    t3 = time.perf_counter()
    return {"gpus": gpus, "frames": frames, "tokens": main.layout.total_tokens, "fits": main.fits,
            "spava_s": t1 - t0, "baselines_s": t2 - t1, "plan_json_s": t3 - t2, "total_s": t3 - t0,
            "plan_json_mib": len(text) / 2 ** 20,
            "ring_plannable": not next(r for r in rows if r.method == "zigzag_ring").error}


def _machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def _markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Planning speed ({result['date']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, load average at start "
             f"{m['load_average']}. Command: `{result['command']}`.", "",
             "## Whole commands (fresh process, interpreter start included)", "",
             "| command | median s | min s | runs | exit | last line |", "|---|---|---|---|---|---|"]
    for c in result["cli"]:
        lines.append(f"| `{c['command']}` | {c['median_s']:.2f} | {c['min_s']:.2f} | {c['runs']} | {c['exit_code']} | "
                     f"{c['last_line'].replace('|', '/')} |")
    lines += ["", "## Planner work of one job, in-process (seconds)", "",
              "| gpus | frames | tokens | fits | spava (derive) | 4 baselines | assemble + plan.json | total | "
              "plan.json MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["planner"]:
        lines.append(f"| {r['gpus']} | {r['frames']} | {r['tokens']:,} | {'yes' if r['fits'] else 'no'} | "
                     f"{r['spava_s']:.3f} | {r['baselines_s']:.3f} | {r['plan_json_s']:.3f} | {r['total_s']:.3f} | "
                     f"{r['plan_json_mib']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="skip the gpus x frames table")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    result = {"date": dt.date.today().isoformat(), "machine": _machine(),
              "command": "python benchmarks/plan_speed.py " + " ".join(sys.argv[1:]), "cli": [], "planner": []}
    for cli_args in (HEADLINE, LARGE, LARGE_SMALL_PASSING, LARGE_FITTING, LARGE_TUNED):
        result["cli"].append(time_cli(cli_args, args.repeats if cli_args is HEADLINE else max(1, args.repeats // 2)))
        print(json.dumps(result["cli"][-1]), flush=True)
    if not args.quick:
        for gpus in GPUS:
            for frames in FRAMES:
                result["planner"].append(time_planner(gpus, frames))
                print(json.dumps(result["planner"][-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{result['date']}-cpu-plan_speed"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    main()
