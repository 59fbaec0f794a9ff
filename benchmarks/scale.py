"""Single-rank scale measurements: one rank of a large plan alone on one GPU, against its plan.

For each plan: the rank with the largest predicted peak memory runs alone (spava_plan.entry.run's
single-rank mode, runtime/solo.py: its peers' data are random tensors of the real shapes) with
real-size random weights, in a fresh process (a clean GPU). Recorded per plan: time of each phase
(vision, prefill, first token) of a warm run (the first run compiles the Triton kernels; the
median of the timed runs is reported), torch.cuda.max_memory_allocated over the whole request and
per stage (vision encoder + exchange; language model), the bytes resident before the request
(weights), and the plan's predictions for that rank.

    python3 benchmarks/scale.py measure --plans DIR [DIR ...] --out runs.jsonl   # on the GPU
    python benchmarks/scale.py report runs.jsonl --out benchmarks/results/<date>-h100-scale

Each DIR holds a plan.json made here with spava-plan (hydra is not needed on the GPU machine).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

GIB = 2 ** 30


def busiest_rank(plan) -> int:
    peaks = plan.prediction.peak_memory_bytes
    return max(range(plan.world_size), key=lambda r: (peaks[r], plan.prediction.rank_us[r]))


def measure_one(plan_path: str, repeats: int, rank: int | None, extra: list[str] | None = None) -> dict:
    """Runs in its own process: load, warm up, time ``repeats`` requests of one token."""
    import torch

    from spava_plan.plan_load import load_plan
    from spava_plan.entry.run_config import compose_entry_config
    from spava_plan.runtime.attention import RankAttention
    from spava_plan.runtime.generate import RankRunner
    from spava_plan.runtime.solo import SoloComm
    from spava_plan.entry.session import Session

    extra = list(extra or [])
    plan = load_plan(plan_path)
    r = busiest_rank(plan) if rank is None else rank
    cfg = compose_entry_config("run", [f"plan={plan_path}", "model.init=random", f"rank={r}", "max_new_tokens=1", *extra])
    t0 = time.perf_counter()
    session = Session(cfg, plan.world_size)
    prepared = session.prepare_run(solo_rank=r)
    prep_s = time.perf_counter() - t0
    from prefill import Spans, TimedBackend  # benchmarks/ is on sys.path (the script's folder)

    spans = Spans(prepared.device.type == "cuda")
    backend = TimedBackend(session.backend(prepared), spans)
    comm = SoloComm(r, plan.world_size)
    dev = prepared.device
    cuda = dev.type == "cuda"
    if not cuda:  # a CPU smoke run of this script: no memory statistics
        for name in ("synchronize", "reset_peak_memory_stats"):
            setattr(torch.cuda, name, lambda *a, **k: None)
        torch.cuda.max_memory_allocated = torch.cuda.memory_allocated = lambda *a, **k: 0
        torch.cuda.memory_reserved = lambda *a, **k: 0
    runner = RankRunner(prepared.model, prepared.plan, comm,
                        lambda: RankAttention(prepared.plan, r, comm, backend, decode_capacity=8), dev)
    stage: dict[str, int] = {}
    stock_vision = runner.vision

    def vision(inputs):  # the vision stage's own peak (encoder + exchange), then reset for the LM
        torch.cuda.reset_peak_memory_stats(dev)
        out = stock_vision(inputs)
        torch.cuda.synchronize(dev)
        stage["vision_peak"] = torch.cuda.max_memory_allocated(dev)
        stage["after_vision"] = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        return out

    runner.vision = vision
    # Peaks of the last layer's attention and MLP phases (its KV cache is then complete): the
    # pieces planner/memory.py models as activations.
    from spava_plan.runtime.hf.attention import language_model

    last = language_model(prepared.model).layers[-1]

    def probe(name):
        def pre(module, inputs):
            torch.cuda.synchronize(dev)
            stage[name + "_before"] = torch.cuda.memory_allocated(dev)
            stage["lm_peak_so_far"] = max(stage.get("lm_peak_so_far", 0), torch.cuda.max_memory_allocated(dev))
            torch.cuda.reset_peak_memory_stats(dev)

        def post(module, inputs, output):
            torch.cuda.synchronize(dev)
            stage[name + "_peak"] = torch.cuda.max_memory_allocated(dev)
        return pre, post

    for name in ("self_attn", "mlp"):
        pre, post = probe("last_" + name)
        getattr(last, name).register_forward_pre_hook(pre)
        getattr(last, name).register_forward_hook(post)
    torch.cuda.synchronize(dev)
    resident = torch.cuda.memory_allocated(dev)
    runs = []
    for i in range(repeats + 1):
        stage.clear()
        torch.cuda.reset_peak_memory_stats(dev)
        spans.start()
        with torch.inference_mode():
            res = runner.generate(prepared.inputs, prepared.positions, 1)
        torch.cuda.synchronize(dev)
        ops = spans.stop()
        t = res.timing
        lm_peak = max(stage.get("lm_peak_so_far", 0), stage.get("last_self_attn_peak", 0),
                      stage.get("last_mlp_peak", 0), torch.cuda.max_memory_allocated(dev))
        runs.append({"vision_s": t.vision_s, "prefill_s": t.prefill_s, "first_token_s": t.first_token_s,
                     "attention_s": sum(ops.values()) / 1e6, "ops_us": ops,
                     "vision_peak": stage["vision_peak"], "lm_peak": lm_peak, "warm": i > 0,
                     **{k: v for k, v in stage.items() if k != "lm_peak_so_far"}})
        del res
    warm = [x for x in runs if x["warm"]] or runs
    pred = plan.prediction
    source = plan.source_config()
    return {
        "plan": plan_path, "plan_hash": plan.hash, "label": comm.label, "rank": r, "world": plan.world_size,
        "method": plan.method, "model": plan.model.name, "frames": plan.layout.frames,
        "resolution": source.video.resolution, "tokens": plan.layout.total_tokens,
        "local_tokens": plan.ranks[r].local_tokens, "topology": source.topology.name,
        "chunking": {"mlp_tokens": plan.chunking.mlp_tokens, "vision_units": plan.chunking.vision_units},
        "device": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch": torch.__version__,
        "backend": backend.name, "prepare_s": prep_s, "resident_bytes": resident,
        "measured": {k: statistics.median(x[k] for x in warm)
                     for k in ("vision_s", "prefill_s", "first_token_s", "attention_s")},
        "peak_bytes": max(max(x["vision_peak"], x["lm_peak"]) for x in runs),
        # the caching allocator keeps what it reserved (no empty_cache here): its high-water mark
        "reserved_bytes": torch.cuda.memory_reserved(dev),
        "vision_peak_bytes": max(x["vision_peak"] for x in runs), "lm_peak_bytes": max(x["lm_peak"] for x in runs),
        "runs": runs,
        "predicted": {"rank_us": pred.rank_us[r], "vision_us": pred.vision_us,
                      "peak_bytes": pred.peak_memory_bytes[r], "makespan_us": pred.makespan_us,
                      "breakdown_busiest": dict(pred.memory_breakdown)},
    }


def measure(plans: list[str], out: str, repeats: int, timeout: float, alloc_conf: str | None = None) -> int:
    import os

    env = dict(os.environ)
    if alloc_conf is not None:  # the caching allocator's settings for the measured process
        env["PYTORCH_CUDA_ALLOC_CONF"] = alloc_conf
    for p in plans:
        plan_path = str(Path(p) / "plan.json") if Path(p).is_dir() else p
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "one", plan_path, "--repeats", str(repeats)],
                              capture_output=True, text=True, timeout=timeout, env=env)
        wall = time.perf_counter() - t0
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not line:
            row = {"plan": plan_path, "error": (proc.stderr or proc.stdout)[-3000:], "wall_s": wall}
        else:
            row = json.loads(line[-1])
            row["wall_s"] = wall
            row["alloc_conf"] = env.get("PYTORCH_CUDA_ALLOC_CONF", "")
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(_row_text(row), flush=True)
    return 0


def _row_text(row: dict) -> str:
    if "error" in row:
        return f"{row['plan']}: FAILED\n{row['error']}"
    m, p = row["measured"], row["predicted"]
    return (f"{row['model']} {row['frames']}f {row['resolution']} W={row['world']} rank {row['rank']} "
            f"({row['local_tokens']} local tokens), single-rank: first token {m['first_token_s']:.2f} s "
            f"(vision {m['vision_s']:.2f}, prefill {m['prefill_s']:.2f}) vs predicted {p['rank_us'] / 1e6:.2f} s; "
            f"peak {row['peak_bytes'] / GIB:.2f} GiB (vision {row['vision_peak_bytes'] / GIB:.2f}, "
            f"LM {row['lm_peak_bytes'] / GIB:.2f}, resident {row['resident_bytes'] / GIB:.2f}) vs predicted "
            f"{p['peak_bytes'] / GIB:.2f} GiB; reserved {row.get('reserved_bytes', 0) / GIB:.2f} GiB "
            f"({row.get('alloc_conf') or 'default allocator'}); wall {row.get('wall_s', 0):.0f} s")


def plan_config(plan, **rates):
    """The SpavaConfig a plan was made from (Plan.source_config), with topology ``rates`` swapped in."""
    import dataclasses

    cfg = plan.source_config()
    topology = dataclasses.replace(cfg.topology, gpus=plan.world_size, **rates)
    return dataclasses.replace(cfg, topology=topology, kernels=False)


def _predict(cfg, rank: int) -> dict:
    """The planner's single-rank view: compute phases (no communication) and peak memory."""
    from calibrate import predicted_phases
    from spava_plan.planner.build import derive

    ph = predicted_phases(cfg)
    d = derive(cfg, require_fit=False)
    return {"vision_us": ph["vision_us"][rank], "attention_us": ph["attention_us"][rank],
            "rest_us": ph["rest_us"][rank], "compute_us": ph["vision_us"][rank] + ph["lm_us"][rank],
            "rank_us": d.prediction.rank_us[rank], "peak_bytes": d.memory[rank]["peak"],
            "memory": dict(d.memory[rank])}


def _measured_phases(r: dict) -> dict:
    m = r["measured"]
    return {"vision_us": m["vision_s"] * 1e6, "attention_us": m.get("attention_s", 0.0) * 1e6,
            "rest_us": (m["prefill_s"] - m.get("attention_s", 0.0)) * 1e6}


def report(runs_path: str, out: str, commands: list[str], notes: list[str], plans_root: str,
           hold_out: list[str], preset_dir: str | None) -> int:
    """benchmarks/results/<name>.{json,md} from the measured lines: each cell against the current
    planner (the plan's own topology, and h100_sxm's and h200_calibrated's rates), and an H100 fit (calibrate.py) on
    the cells not held out, written as <preset_dir>/h100_calibrated.yaml."""
    from calibrate import PHASES, ceilings, fit, rates_of
    from spava_plan.hydra_conf import compose_config
    from spava_plan.plan_load import load_plan

    rows = [json.loads(ln) for ln in Path(runs_path).read_text().splitlines() if ln.strip()]
    ok = [r for r in rows if "error" not in r]
    dev = ok[0]["device"] if ok else "?"
    h200 = rates_of(compose_config(["topology=h200_calibrated"]))
    h100 = rates_of(compose_config(["topology=h100_sxm"]))
    cells = []
    for r in ok:
        plan = load_plan(Path(plans_root) / Path(r["plan"]).parent.name / "plan.json")
        cfg = plan_config(plan)
        cell = Path(r["plan"]).parent.name
        cells.append((cell, plan, cfg, r))
        r["cell"] = cell
        # "as planned": the plan's own topology's rates (h100_sxm, h200, ...); then the same plan
        # under h100_sxm's and h200_calibrated's rates, so a run on either card has its prediction
        r["now"] = {"as planned": _predict(cfg, r["rank"]), "h100_sxm": _predict(plan_config(plan, **h100), r["rank"]),
                    "h200_calibrated": _predict(plan_config(plan, **h200), r["rank"])}
        r["planned_topology"] = cfg.topology.name
    train = [c for c in cells if c[0] not in hold_out]
    fitted = None
    if train and any(c[3]["measured"].get("attention_s") for c in train):
        fit_rows = []
        for cell, plan, cfg, r in train:
            ph = _measured_phases(r)
            total = sum(ph.values())
            fit_rows += [(cfg, phase, r["rank"], ph[phase], total) for phase in PHASES if ph[phase] > 0]
        base = rates_of(train[0][2])
        fitted = fit(fit_rows, base, ceilings(train[0][2].topology))
        rates = {k: float(f"{v:.4g}") for k, v in fitted["rates"].items()}
        fitted["rates"] = rates
        for cell, plan, cfg, r in cells:
            r["now"]["h100_calibrated"] = _predict(plan_config(plan, **rates), r["rank"])
        if preset_dir:
            from prefill_report import write_preset

            how = (f"fit on {', '.join(dict.fromkeys(c[0] for c in train))} (busiest rank, single-rank runs, "
                   f"benchmarks/scale.py); held out: {', '.join(hold_out) or 'none'}")
            path = write_preset(Path(preset_dir) / "h100_calibrated.yaml", train[0][2].topology, rates, dev, how,
                                len(fit_rows))
            path.write_text(path.read_text().replace("to the prefill benchmark\n# (benchmarks/prefill.py)",
                                                     "to single-rank runs\n# (benchmarks/scale.py)"))
    for r in ok:
        m = r["measured"]
        for name, p in r["now"].items():
            p["time_error"] = p["compute_us"] / 1e6 / m["first_token_s"] - 1
            p["peak_error"] = p["peak_bytes"] / r["peak_bytes"] - 1
    Path(out + ".json").write_text(json.dumps({"device": dev, "commands": commands, "notes": notes, "hold_out": hold_out,
                                               "fit": fitted, "rows": rows}, indent=1) + "\n")
    presets = ["as planned", "h100_sxm", "h200_calibrated"] + (["h100_calibrated"] if fitted else [])
    lines = [f"# Single-rank scale runs ({dev})", "",
             "One rank of each plan alone on one GPU (`spava_plan.entry.run` single-rank mode, runtime/solo.py): its real "
             "work and buffers, its peers' data random. **Single-rank**: no communication time is included; not a "
             "W-GPU time. Real-size random weights, bf16, random pixels in the rank's own grids, Triton kernels. "
             "The rank is the plan's busiest by predicted peak memory.", "",
             "## Peak memory (torch.cuda.max_memory_allocated over one request)", "",
             "| cell | rank (local tokens) | measured GiB (vision stage / LM stage) | allocator reserved GiB | "
             "predicted GiB (planner now) | error | predicted when planned |", "|---|---|---|---|---|---|---|"]
    alloc = lambda r: r.get("alloc_conf") or "default allocator"  # noqa: E731
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['plan']} | failed: {r['error'].strip().splitlines()[-1][:120]} ||||||")
            continue
        p = r["now"]["as planned"]
        lines.append(f"| {r['cell']} ({r['tokens']:,} tokens) | {r['rank']} ({r['local_tokens']:,}) | "
                     f"{r['peak_bytes'] / GIB:.2f} ({r['vision_peak_bytes'] / GIB:.2f} / {r['lm_peak_bytes'] / GIB:.2f}) | "
                     f"{r.get('reserved_bytes', 0) / GIB:.2f} ({alloc(r)}) | {p['peak_bytes'] / GIB:.2f} | {p['peak_error']:+.1%} | "
                     f"{r['predicted']['peak_bytes'] / GIB:.2f} ({r['predicted']['peak_bytes'] / r['peak_bytes'] - 1:+.1%}) |")
    lines += ["", "## Time (one warm request: vision + prefill + first token; predicted = the rank's compute "
              "phases, no communication)", "",
              "| cell | measured s: total (vision / attention / rest of LM) | " +
              " | ".join(f"{n} s (error)" for n in presets) + " |", "|---|---|" + "---|" * len(presets)]
    for r in ok:
        m = r["measured"]
        ph = _measured_phases(r)
        cells_txt = " | ".join(f"{r['now'][n]['compute_us'] / 1e6:.2f} ({r['now'][n]['time_error']:+.0%})" for n in presets)
        held = " (held out)" if r["cell"] in hold_out else ""
        lines.append(f"| {r['cell']}{held}, {alloc(r)} | {m['first_token_s']:.2f} ({ph['vision_us'] / 1e6:.2f} / "
                     f"{ph['attention_us'] / 1e6:.2f} / {ph['rest_us'] / 1e6:.2f}) | {cells_txt} |")
    if fitted:
        lines += ["", f"h100_calibrated rates (conf/topology/h100_calibrated.yaml): " +
                  ", ".join(f"{k} {v:g}" for k, v in fitted["rates"].items()) +
                  f"; fit on {len(train)} runs of {len(set(c[0] for c in train))} cells, held out: {', '.join(hold_out) or 'none'}. " + " ".join(fitted["notes"])]
    lines += ["", *notes, "", "Commands:", *[f"- `{c}`" for c in commands], ""]
    Path(out + ".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--plans", nargs="+", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--repeats", type=int, default=2)
    m.add_argument("--timeout", type=float, default=400)
    m.add_argument("--alloc-conf", default=None, help="PYTORCH_CUDA_ALLOC_CONF for the measured processes")
    rp = sub.add_parser("report")
    rp.add_argument("runs")
    rp.add_argument("--out", required=True)
    rp.add_argument("--command", action="append", default=[])
    rp.add_argument("--note", action="append", default=[])
    rp.add_argument("--plans-root", default=".scale_plans")
    rp.add_argument("--hold-out", action="append", default=[])
    rp.add_argument("--preset-dir", default=None)
    o = sub.add_parser("one")
    o.add_argument("plan")
    o.add_argument("--repeats", type=int, default=2)
    o.add_argument("--rank", type=int, default=None)
    o.add_argument("--run-arg", action="append", default=[], help="extra spava_plan.entry.run key=value (smoke: device=cpu)")
    a = ap.parse_args()
    if a.cmd == "report":
        return report(a.runs, a.out, a.command, a.note, a.plans_root, a.hold_out, a.preset_dir)
    if a.cmd == "measure":
        return measure(a.plans, a.out, a.repeats, a.timeout, a.alloc_conf)
    print(json.dumps(measure_one(a.plan, a.repeats, a.rank, a.run_arg)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
