"""Tables, JSON, plot and calibration from benchmarks/prefill.py's measurement lines.

report(runs, plans, prefix) writes
  PREFIX.json  every cell x method: median / min / max TTFT, repeats, predicted (planner, before and
               after calibration) and errors, peak memory per rank, the slowest rank's profile,
               speedups of spava over every baseline, the paper's targets, the calibration fit
  PREFIX.md    the same as tables (emulated rows labelled "emulated W-rank")
  PREFIX.png   latency vs frames per method (plot_prefill.py)
and, only when a preset_dir is given (``--write-preset``), the calibrated topology preset
<preset_dir>/<topology>_calibrated.yaml. Every row also gets the roofline floor of each phase of its
slowest rank (floors()): the planner's FLOPs at the GPU's measured GEMM / attention rates and its bytes
at the measured HBM bandwidth, no launch overhead.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from calibrate import PARAMS, PHASES, ceilings, fit, predicted_phases, rates_of, relative_error, with_rates
from prefill_methods import DENSE, EMULATED, METHODS, TENSOR_PARALLEL

TARGETS = {"dense_flash": 12.72, "zigzag_ring": 1.70, "apb": 1.18,  # SPAVA_SPEC.md section 9 (W=8, 64f 1440p)
           "dense_tp": 2.0}  # issue 28: what a user with 8 GPUs runs today
HEADLINE = ("qwen2_5vl_3b", 64, "1440p")
GIB = 2 ** 30


def load(runs: list[Path]) -> tuple[dict, dict, list]:
    """env, {(cell, method): the latest record}, [skips and errors]."""
    env: dict = {}
    results: dict[tuple[str, str], dict] = {}
    other = []
    for path in runs:
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            if rec["kind"] == "env":
                env = env or dict(rec, commands=[])
                env["commands"].append(rec["command"])
            elif rec["kind"] in ("dense", "emulated"):
                results[(rec["cell"], rec["method"])] = rec
            elif rec["kind"] in ("skipped", "error", "cell", "model", "check"):
                other.append(rec)
    measured = {k for k in results}
    other = [r for r in other if r["kind"] not in ("skipped", "error") or (r["cell"], r["method"]) not in measured]
    return env, results, other


def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def summarise(rec: dict) -> dict:
    """TTFT statistics, per-rank peak memory and the slowest rank's profile of one measurement."""
    if rec["kind"] == "dense":
        timed = [r for r in rec["runs"] if not r["warmup"]]
        ttft = _stats([r["ttft_us"] for r in timed])
        med = {k: statistics.median(r[k] for r in timed) for k in ("vision_us", "lm_us", "first_us", "attention_us")}
        profile = {"rank": 0, "vision": med["vision_us"], "attention": med["attention_us"],
                   "llm_rest": med["lm_us"] - med["attention_us"], "first_token": med["first_us"],
                   "other": ttft["median"] - med["vision_us"] - med["lm_us"] - med["first_us"], "exposed_comm": 0.0}
        peaks = [max(r["peak_bytes"] for r in rec["runs"])]
        phases = {"vision_us": [med["vision_us"]], "lm_us": [med["lm_us"]], "attention_us": [med["attention_us"]],
                  "rest_us": [med["lm_us"] - med["attention_us"]]}
    else:
        # median: the runtime's emulated TTFT (per-rank medians of every compute stretch, then the
        # critical path); spread: each repeat simulated on its own (one slow replay of any rank
        # moves that repeat's makespan)
        reps = [p["ttft_us"] for p in rec["per_repeat"]]
        ttft = {"median": rec["median_trace_ttft_us"], "min": min(reps), "max": max(reps), "n": len(reps)}
        W = rec["world"]
        by_rank: list[list[dict]] = [[] for _ in range(W)]
        for r in rec["replays"]:
            by_rank[r["rank"]].append(r)
        med = [{k: statistics.median(x[k] for x in reps) for k in
                ("compute_us", "vision_us", "prefill_us", "first_us", "attention_us", "select_us", "merge_us")}
               for reps in by_rank]
        exposed = [statistics.median(p["exposed_comm_us"][r] for p in rec["per_repeat"]) for r in range(W)]
        finish = [statistics.median(p["rank_finish_us"][r] for p in rec["per_repeat"]) for r in range(W)]
        slow = max(range(W), key=lambda r: finish[r])
        m = med[slow]
        attn = m["attention_us"] + m["select_us"] + m["merge_us"]
        profile = {"rank": slow, "vision": m["vision_us"], "attention": attn, "llm_rest": m["prefill_us"] - attn,
                   "first_token": m["first_us"], "other": 0.0, "exposed_comm": exposed[slow]}
        peaks = [max(x["peak_bytes"] for x in reps) for reps in by_rank]
        att = [m["attention_us"] + m["select_us"] + m["merge_us"] for m in med]
        phases = {"vision_us": [m["vision_us"] for m in med], "lm_us": [m["prefill_us"] for m in med],
                  "attention_us": att, "rest_us": [m["prefill_us"] - a for m, a in zip(med, att)]}
    parts = {k: v for k, v in profile.items() if k not in ("rank",)}
    profile["dominant"] = max(parts, key=lambda k: parts[k])
    return {"ttft_us": ttft, "peak_bytes_per_rank": peaks, "profile": profile, "phases": phases}


def _configs(entry: dict) -> dict:
    from spava_plan.hydra_conf import compose_config

    return {m: compose_config(ov) for m, ov in entry["overrides"].items()}


def split(cells: list[dict]) -> tuple[set, str]:
    """Training cells for the calibration and how they were chosen (held-out data where possible)."""
    models = list(dict.fromkeys(c["model"] for c in cells))
    if len(models) > 1:
        return {c["id"] for c in cells if c["model"] == models[0]}, f"fit on {models[0]}; {', '.join(models[1:])} held out"
    res = list(dict.fromkeys(c["resolution"] for c in cells))
    if len(res) > 1:
        return {c["id"] for c in cells if c["resolution"] == res[0]}, f"fit on {res[0]}; {', '.join(res[1:])} held out"
    return {c["id"] for c in cells}, "in-sample: one model and one resolution measured, nothing held out"


def calibrate(cells: list[dict], results: dict, summaries: dict, topology: str, preset_dir: Path | None,
              device: str) -> dict:
    configs = {c["id"]: _configs(c) for c in cells}
    train, how = split(cells)
    rows = []
    for c in cells:
        if c["id"] not in train:
            continue
        for m in EMULATED:
            if (c["id"], m) not in summaries:
                continue
            ph = summaries[(c["id"], m)]["phases"]
            for rank in range(len(ph["vision_us"])):
                total = sum(ph[phase][rank] for phase in PHASES)
                for phase in PHASES:
                    if ph[phase][rank] > 0:
                        rows.append((configs[c["id"]][m], phase, rank, ph[phase][rank], total))
    first = next(iter(configs.values()))["spava"]
    base = rates_of(first)
    if not rows:
        return {"error": "no emulated measurements to fit"}
    fitted = fit(rows, base, ceilings(first.topology))
    rates = {k: float(f"{v:.4g}") for k, v in fitted["rates"].items()}  # as the preset stores them
    preds = {}
    for c in cells:
        for m in METHODS:
            key = (c["id"], m)
            if ("dense" if m in DENSE else m) not in configs[c["id"]]:  # dense_tp not plannable here
                continue
            cfg = configs[c["id"]]["dense" if m in DENSE else m]
            after = predicted_phases(with_rates(cfg, rates))
            preds[key] = {"makespan_us": after["makespan_us"], "vision_us": after["vision_us"],
                          "lm_us": after["lm_us"], "train": c["id"] in train}
    name = f"{topology}_calibrated"
    preset = None if preset_dir is None else write_preset(preset_dir / f"{name}.yaml", first.topology, rates,
                                                          device, how, len(rows))
    return {"rates_before": base, "rates_after": rates, "split": how, "train_cells": sorted(train),
            "rows": len(rows), "history": fitted["history"], "notes": fitted["notes"],
            "preset": None if preset is None else str(preset),
            "preset_name": name, "predicted": {f"{k[0]}|{k[1]}": v for k, v in preds.items()}}


def write_preset(path: Path, topo: Any, rates: dict, device: str, how: str, rows: int) -> Path:
    """A normal topology preset (conf/topology/*.yaml) with the fitted rates."""
    keep = ("device", "gpus_per_node", "memory_gib", "reserved_gib", "peak_tflops", "gemm_tflops",
            "attention_tflops", "hbm_gbps", "intra_node_gbps", "inter_node_gbps", "link_latency_us",
            "launch_overhead_us")
    values = {k: getattr(topo, k) for k in keep}
    values.update(rates)
    values["device"] = device if device.lower() != "cpu" else "cpu (smoke run: CPU times, not a GPU)"
    lines = [f"# {topo.name} with effective rates fitted by benchmarks/calibrate.py to the prefill benchmark",
             f"# (benchmarks/prefill.py) on {device}, {time.strftime('%Y-%m-%d')}: {rows} per-rank phase times,",
             f"# {how}. gemm/attention/hbm/launch are effective rates of the HF model + generated kernels",
             "# (norms in fp32, RoPE, residuals: more bytes than the cost model counts); links are not fitted.",
             f"name: {path.stem}"]
    for k in keep:
        v = values[k]
        lines.append(f"{k}: {json.dumps(v) if isinstance(v, str) else v}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def attention_tflops(entry: dict, method: str, summary: dict, plans: Path) -> float | None:
    """Useful attention FLOPs of the slowest rank over its measured attention time (FLOP formula:
    4 * D * Hq * layers * visible (row, key) pairs; dense: the full causal triangle)."""
    from kernel_speed import rank_pairs
    from spava_plan.plan_load import load_plan

    t = summary["profile"]["attention"]
    if t <= 0:
        return None
    if method in DENSE:
        plan = load_plan(plans / entry["plans"]["spava"])
        n = plan.layout.total_tokens
        pairs = n * (n + 1) / 2
    else:
        plan = load_plan(plans / entry["plans"][method])
        pairs = rank_pairs(plan, summary["profile"]["rank"])
        if method in TENSOR_PARALLEL:  # a rank attends with Hq / W heads
            pairs /= plan.world_size
    m = plan.model
    return 4.0 * m.head_dim * m.num_heads * m.num_layers * pairs / (t * 1e-6) / 1e12


def floor_rates(env: dict, cfg: Any) -> dict[str, float]:
    """Rates of the roofline floors: the GPU's own measured GEMM, attention (cuDNN) and HBM rates from
    the env line (prefill.device_rates), else the topology preset's; no launch overhead."""
    measured = env.get("rates") or {}
    t = cfg.topology
    return {"gemm_tflops": measured.get("gemm_tflops", t.gemm_tflops),
            "attention_tflops": measured.get("attention_tflops", t.attention_tflops),
            "hbm_gbps": measured.get("hbm_gbps", t.hbm_gbps), "launch_overhead_us": 0.0}


def floors(cfg: Any, rank: int, rates: dict[str, float]) -> dict[str, float]:
    """Roofline floor (ms) of each phase of ``rank``: the planner's own FLOPs and bytes of every op
    (vision tower, attention = attend/select/merge, LLM rest = projections, MLP, norms) at
    max(FLOPs / measured rate, bytes / HBM), no launch overhead; comm = the communication the plan's
    schedule leaves exposed at those rates (the plan's topology links)."""
    ph = predicted_phases(with_rates(cfg, rates))
    r = min(rank, len(ph["vision_us"]) - 1)
    out = {"vision": ph["vision_us"][r] / 1e3, "attention": ph["attention_us"][r] / 1e3,
           "llm_rest": ph["rest_us"][r] / 1e3, "exposed_comm": ph["exposed_comm_us"] / 1e3}
    out["total"] = sum(out.values())
    return out


def report(runs: list[Path], plans: Path, prefix: Path, *, preset_dir: Path | None = None) -> dict:
    from plot_prefill import plot

    env, results, other = load(runs)
    manifest = json.loads((plans / "manifest.json").read_text())
    cells = [c for c in manifest["cells"] if not c["check"] and any((c["id"], m) in results for m in METHODS)]
    checks = [c for c in manifest["cells"] if c["check"] and any((c["id"], m) in results for m in METHODS)]
    summaries = {k: summarise(v) for k, v in results.items()}
    device = env.get("device", "?")
    cal = calibrate(cells, results, summaries, manifest["topology"], preset_dir, device) if cells else {}
    out_cells = []
    for c in cells + checks:
        configs = _configs(c)
        rows = {}
        spava = summaries.get((c["id"], "spava"))
        for m in METHODS:
            key = (c["id"], m)
            if key not in summaries:
                continue
            s, rec = summaries[key], results[key]
            med = s["ttft_us"]["median"]
            before = c["predicted"][m]["makespan_us"]
            after = cal.get("predicted", {}).get(f"{c['id']}|{m}", {}).get("makespan_us")
            rows[m] = {
                "label": rec["label"], "emulated": m in EMULATED + TENSOR_PARALLEL, "world": rec.get("world", 1),
                "ttft_ms": {k: (v / 1e3 if k != "n" else v)
                                                                             for k, v in s["ttft_us"].items()},
                "warmup": rec["warmup"], "repeats": rec["repeats"],
                "spava_speedup": (med / spava["ttft_us"]["median"]) if spava and m != "spava" else None,
                "predicted_ms": before / 1e3, "error_before": relative_error(before, med),
                "predicted_calibrated_ms": after / 1e3 if after else None,
                "error_after": relative_error(after, med) if after else None,
                "peak_gib_per_rank": [b / GIB for b in s["peak_bytes_per_rank"]],
                "predicted_peak_gib_per_rank": [b / GIB for b in c["predicted"][m]["peak_memory_bytes"]],
                "profile_ms": {k: (v / 1e3 if isinstance(v, float) else v) for k, v in s["profile"].items()},
                "attention_tflops": attention_tflops(c, m, s, plans),
                "floor_ms": floors(configs["dense" if m in DENSE else m], s["profile"]["rank"],
                                   floor_rates(env, configs["dense" if m in DENSE else m])),
                "check": rec.get("check", {}), "token": rec.get("token"),
                "tokens_agree": rec.get("tokens_agree"),
            }
        out_cells.append({"id": c["id"], "model": c["model"], "frames": c["frames"], "resolution": c["resolution"],
                          "tokens": c["tokens"], "world": c["gpus"], "check": c["check"], "methods": rows})
    targets = headline_targets(out_cells)
    rates = floor_rates(env, _configs(cells[0] if cells else checks[0])["spava"]) if cells or checks else {}
    data = {"env": env, "topology": manifest["topology"], "world": manifest["gpus"], "cells": out_cells,
            "floor_rates": rates,
            "targets": targets, "calibration": cal, "not_measured": other_lines(other),
            "errors_by_method": errors_by_method(out_cells)}
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps(data, indent=1, default=_json_default) + "\n")
    prefix.with_suffix(".md").write_text(markdown(data, runs) + "\n")
    plot(data, prefix.with_suffix(".png"))
    return data


def _json_default(x: Any) -> Any:
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    return str(x)


def headline_targets(cells: list[dict]) -> list[dict]:
    out = []
    for c in cells:
        if (c["model"], c["frames"], c["resolution"]) != HEADLINE or c["check"]:
            continue
        for m, target in TARGETS.items():
            row = c["methods"].get(m)
            got = row["spava_speedup"] if row else None
            out.append({"cell": c["id"], "over": m, "target": target, "measured": got,
                        "met": None if got is None else got >= target})
    return out


def errors_by_method(cells: list[dict]) -> dict:
    """Mean |relative error| of the predicted TTFT per method, before and after calibration."""
    out = {}
    for m in METHODS:
        b = [abs(c["methods"][m]["error_before"]) for c in cells if m in c["methods"] and not c["check"]]
        a = [abs(c["methods"][m]["error_after"]) for c in cells
             if m in c["methods"] and not c["check"] and c["methods"][m]["error_after"] is not None]
        if b:
            out[m] = {"mean_abs_before": sum(b) / len(b), "mean_abs_after": sum(a) / len(a) if a else None,
                      "cells": len(b)}
    return out


def other_lines(other: list) -> list[str]:
    return [f"{r['cell']} {r['method']}: {r['kind']} ({r.get('reason') or r.get('error', '')[:200]})"
            for r in other if r["kind"] in ("skipped", "error")]


def _f(x: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def markdown(data: dict, runs: list[Path]) -> str:
    env, cal = data["env"], data["calibration"]
    W = data["world"]
    lines = [f"# Prefill benchmark: time to first token ({env.get('device', '?')})", "",
             f"Vision encoder + prefill + first token, random weights, random-pixel frames. Dense rows: one GPU, "
             f"stock Hugging Face model (SDPA). Other rows: **emulated {W}-rank** on the one GPU (each rank's work "
             f"timed alone, TTFT = slowest rank + unhidden communication charged from the `{data['topology']}` "
             f"topology): never a measured {W}-GPU time.",
             f"torch {env.get('torch')}, triton {env.get('triton')}, transformers {env.get('transformers')}; "
             f"vision attention: {env.get('vision_attention')} (one SDPA call per window size, every method); "
             f"vision kernels: {env.get('vision_kernels', 'stock')}, LLM kernels: {env.get('llm_kernels', 'stock')} "
             f"(every method); emulated methods' attention backend: {env.get('attention', 'generated')} "
             f"(`--attention`); each method in its own process: {env.get('isolated', False)}.",
             "Dense: median / min-max of n timed calls after the row's warm-up calls (`--warmup`; cells estimated "
             "above `--heavy-s` s per call skip them). Emulated: every rank first replays its warm-up replays "
             "untimed (`--rank-warmup`), then: median = the runtime's emulated TTFT (each rank's compute stretches, "
             "median over n replays of that rank, then the critical path with the plan's communication), so one "
             "slow replay of one rank does not move it; min-max = every repeat simulated on its own (can lie "
             "slightly above the median). " + (
                 "Triton kernels: untuned default tiles (the kernel benchmark found them within ~1-3% of tuned)."
                 if env.get("attention", "generated") in ("generated", "default") else
                 "Attention launches: tuned one by one before the run (runtime/tune_launches.py); the choices are "
                 "in the measurement lines' attention_tuning."),
             f"Measurement lines: {', '.join(str(r) for r in runs)}; commands:",
             *[f"- `{c}`" for c in env.get("commands", [])], ""]
    for t in data["targets"]:
        verdict = "met" if t["met"] else ("MISSED" if t["met"] is False else "not measured")
        lines.append(f"- target: spava over {t['over']} >= {t['target']}x at {t['cell']}: "
                     f"{_f(t['measured'], '{:.2f}')}x ({verdict})")
    for c in data["cells"]:
        tag = " (fail-fast check)" if c["check"] else ""
        lines += ["", f"## {c['id']}{tag}: {c['tokens']} tokens, W={c['world']}", "",
                  "| method | TTFT median ms | min-max ms | n | spava speedup | predicted ms (err) | calibrated ms (err) "
                  "| peak GiB/rank measured (planner) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for m, r in c["methods"].items():
            t = r["ttft_ms"]
            name = (f"{m} (emulated {r['world']}-rank{' tensor parallel' if m in TENSOR_PARALLEL else ''}, "
                    f"{r['warmup']} warm-up/rank)" if r["emulated"] else f"{m} (1 GPU, {r['warmup']} warm-up)")
            peaks, pp = r["peak_gib_per_rank"], r["predicted_peak_gib_per_rank"]
            peak = (f"{min(peaks):.1f}-{max(peaks):.1f}" if len(peaks) > 1 else f"{peaks[0]:.1f}") + \
                   f" ({max(pp):.1f})"
            lines.append(f"| {name} | {t['median']:.1f} | {t['min']:.1f}-{t['max']:.1f} | {t['n']} | "
                         f"{_f(r['spava_speedup'], '{:.2f}x')} | {r['predicted_ms']:.1f} ({_f(100 * r['error_before'], '{:+.0f}%')}) | "
                         f"{_f(r['predicted_calibrated_ms'])} ({_f(None if r['error_after'] is None else 100 * r['error_after'], '{:+.0f}%')}) | {peak} |")
        lines += ["", "Profile of the slowest rank (ms; attention = attention kernels + selection + merge):", "",
                  "| method | rank | vision | attention | LLM rest | first token | other | exposed comm | dominant | attention TFLOP/s |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for m, r in c["methods"].items():
            p = r["profile_ms"]
            lines.append(f"| {m} | {p['rank']} | {p['vision']:.1f} | {p['attention']:.1f} | {p['llm_rest']:.1f} | "
                         f"{p['first_token']:.2f} | {p['other']:.1f} | {p['exposed_comm']:.1f} | {p['dominant']} | "
                         f"{_f(r['attention_tflops'], '{:.0f}')} |")
        fr = data.get("floor_rates", {})
        lines += ["", f"Roofline floor of the slowest rank next to its measured time (ms; floor = the planner's FLOPs "
                      f"at {_f(fr.get('gemm_tflops'), '{:.0f}')} TFLOP/s GEMM and {_f(fr.get('attention_tflops'), '{:.0f}')} "
                      f"TFLOP/s attention, bytes at {_f(fr.get('hbm_gbps'), '{:.0f}')} GB/s, no launch cost; "
                      f"comm = what the schedule leaves exposed at those rates):", "",
                  "| method | vision meas. / floor | attention meas. / floor | LLM rest meas. / floor | "
                  "exposed comm meas. / floor | TTFT / floor sum |", "| --- | --- | --- | --- | --- | --- |"]
        for m, r in c["methods"].items():
            p, fl = r["profile_ms"], r["floor_ms"]
            cells_ = [f"{p[k]:.1f} / {fl[k]:.1f} ({_f(p[k] / fl[k] if fl[k] > 0 else None, '{:.2f}x')})"
                      for k in ("vision", "attention", "llm_rest", "exposed_comm")]
            ttft = r["ttft_ms"]["median"]
            lines.append(f"| {m} | " + " | ".join(cells_) + f" | {ttft:.1f} / {fl['total']:.1f} "
                         f"({_f(ttft / fl['total'] if fl['total'] > 0 else None, '{:.2f}x')}) |")
        checks = [f"{m}: rel. err {r['check']['rel_err']:.3g}, argmax {'=' if r['check']['argmax_agree'] else '!='}"
                  for m, r in c["methods"].items() if r["check"] and "rel_err" in r["check"]]
        checks += [f"{m}: {r['check']['note']}" for m, r in c["methods"].items() if "note" in (r["check"] or {})]
        if checks:
            lines += ["", "First-token logits vs dense_flash: " + "; ".join(checks)]
    if cal and "rates_after" in cal:
        lines += ["", "## Calibration", "", f"{cal['rows']} per-rank phase times; {cal['split']}.", "",
                  "| rate | before | after |", "| --- | --- | --- |"]
        for p in PARAMS:
            lines.append(f"| {p} | {cal['rates_before'][p]:.4g} | {cal['rates_after'][p]:.4g} |")
        lines += ["", (f"Preset: `{cal['preset_name']}` ({cal['preset']})." if cal["preset"] else
                       "Preset: not written (`prefill.py report --write-preset` writes it)."),
                  *[f"- {n}" for n in cal["notes"]],
                  "", "Mean |error| of the predicted TTFT per method (all measured cells):", "",
                  "| method | cells | before | after |", "| --- | --- | --- | --- |"]
        for m, e in data["errors_by_method"].items():
            lines.append(f"| {m} | {e['cells']} | {100 * e['mean_abs_before']:.0f}% | "
                         f"{_f(None if e['mean_abs_after'] is None else 100 * e['mean_abs_after'], '{:.0f}%')} |")
    if data["not_measured"]:
        lines += ["", "Not measured:", *[f"- {x}" for x in data["not_measured"]]]
    return "\n".join(lines)
