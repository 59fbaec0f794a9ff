"""Kernel benchmark: the generated Spava attention of one rank against torch SDPA on the same tokens.

Useful FLOPs (masked score entries are not counted, whatever a kernel computes):
    FLOPs = 4 * D * Hq * sum over tasks, segments of pairs(M, n, mask)
    pairs(full)   = M * n
    pairs(causal) = M * (n - M) + M * (M + 1) / 2      (bottom-right aligned, n >= M)
(2 FLOPs per multiply-add, two GEMMs: Q K^T and P V.)  TFLOP/s = FLOPs / time.

Variants, all on the busiest rank of the plan (most useful FLOPs), bf16, timed with
triton.testing.do_bench (median; it flushes L2 before every repeat) on two alternating input sets:
  generated/fused      ONE launch of every task of the rank (both hosts, anchor, query partial)
  generated/schedule   the plan's schedule: its "attend" launches in order (what the runtime runs)
  generated/per_task   one launch per task
  reference            the public code's path: per task torch.cat of the K/V segments, then SDPA
                       FLASH_ATTENTION with causal_lower_right (bottom-right) masks
  sdpa_flash/segments  dense equivalents: one SDPA call per (task, segment), FLASH_ATTENTION,
                       segment K/V pre-made contiguous (full -> no mask, causal -> is_causal)
  sdpa_cudnn/segments  the same with CUDNN_ATTENTION
  cudnn_lse            cuDNN per (task, segment) WITH the log-sum-exp (aten's private op), K/V in place,
                       GQA, then the LSE merge of each task's partials (the candidate's first form)
  cudnn_join           the same with a task's full segments joined into one call (and its causal block
                       too where the op aligns bottom-right): runtime/backends/cudnn_segments as it is
  backend/schedule     the schedule's launches as the runtime's tuned backend runs them: per launch
                       the generated kernel or cudnn_join, whichever timed faster (--no-tune: the
                       default tiles against cuDNN); the choices are in the result's autotune_backend
  select               the rank's selections (every block it passes on) + packed gather, block by block;
                       select/batched: all of them at once, as the runtime calls them (one launch per step)

Usage:
  python benchmarks/kernel_speed.py make-plans DIR        # on a CPU machine with hydra: plan.json + kernels/
  python benchmarks/kernel_speed.py run DIR [--out OUT]   # on the GPU (needs torch + triton only)
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from functools import partial
from pathlib import Path

CASES = {
    "3b_64f_1440p": ["model=qwen2_5vl_3b", "gpus=8", "frames=64", "video.resolution=1440p"],
    "7b_64f_1440p": ["model=qwen2_5vl_7b", "gpus=8", "frames=64", "video.resolution=1440p"],
    "3b_256f_720p": ["model=qwen2_5vl_3b", "gpus=8", "frames=256", "video.resolution=720p"],
    "7b_256f_720p": ["model=qwen2_5vl_7b", "gpus=8", "frames=256", "video.resolution=720p"],
}
# CPU dry run of this script's plumbing (TRITON_INTERPRET=1, --device cpu): not a measurement.
DRY_CASES = {"tiny": ["model=tiny", "gpus=2", "frames=8", "video.resolution=360p"]}


def make_plans(root: Path) -> None:
    from spava_plan.codegen import render_kernels
    from spava_plan.hydra_conf import compose_config
    from spava_plan.planner.build import build_plan

    for name, overrides in {**CASES, **DRY_CASES}.items():
        plan = build_plan(compose_config(overrides))
        case = root / name
        case.mkdir(parents=True, exist_ok=True)
        plan.save(case / "plan.json")
        render_kernels(plan, case / "kernels")
        (case / "overrides.json").write_text(json.dumps(overrides) + "\n")
        print(name, plan.hash[:16])


# ---- work accounting --------------------------------------------------------------------------
def pairs(M: int, n: int, mask: str) -> int:
    return M * n if mask == "full" else M * (n - M) + M * (M + 1) // 2


def rank_pairs(plan, rank: int) -> int:
    return sum(pairs(t.rows, ref.length, ref.mask) for t in plan.ranks[rank].tasks for ref in t.kv)


def busiest_rank(plan) -> int:
    return max(range(plan.world_size), key=lambda r: (rank_pairs(plan, r), -r))


# ---- inputs as the runtime views them ---------------------------------------------------------
def rank_inputs(plan, rank, dtype, device, seed):
    """(tasks, the query task's rows, selection blocks) of one rank: random normal, drawn on
    ``device`` with ``seed``; segments are in-place views (runtime/rank_inputs.py)."""
    import torch

    from spava_plan.runtime.rank_inputs import random_rank_inputs

    r = random_rank_inputs(plan, rank, dtype, device, torch.Generator(device=device).manual_seed(seed))
    return r.tasks, r.q_query, r.select_blocks, (*r.local_kv, r.select_rows)


# ---- timing -------------------------------------------------------------------------------------
DEVICE = "cuda"
DTYPE = None  # torch.bfloat16 on the GPU (set in main)


def bench(fn_for_set, sets: int = 2) -> float:
    """Median ms over alternating input sets (do_bench flushes L2 before each repeat)."""
    import triton.testing

    state = {"i": 0}

    def fn():
        fn_for_set(state["i"] % sets)
        state["i"] += 1

    if DEVICE != "cuda":  # dry run: one wall-clock sample
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")


def bench_graph(fn_for_set, sets: int = 2) -> float:
    """Like bench() but each input set's work is captured once in a CUDA graph and replayed: the
    GPU time without Python launch overhead (which an idle GPU would otherwise wait for)."""
    import torch

    graphs = []
    for i in range(sets):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn_for_set(i)  # warm: compiled, tuned, caches filled (nothing may allocate host->device in capture)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn_for_set(i)
        graphs.append(graph)
    torch.cuda.synchronize()
    return bench(lambda i: graphs[i].replay(), sets)


def _sync():
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def sdpa_backend(name):
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[name]


def reference_path(tasks, scale, gqa):
    """Per task: torch.cat the segments, SDPA flash, causal_lower_right when the last segment is causal."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    outs = []
    with sdpa_kernel(sdpa_backend("flash")):
        for t in tasks:
            masks = [s.mask for s in t.segments]
            assert "causal" not in masks[:-1], "the reference path needs the causal segment last"
            k = torch.cat([s.k for s in t.segments])
            v = torch.cat([s.v for s in t.segments])
            M, n = t.q.shape[0], k.shape[0]
            q4 = t.q.transpose(0, 1).unsqueeze(0)
            k4, v4 = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
            if not gqa:
                g = q4.shape[1] // k4.shape[1]
                k4, v4 = k4.repeat_interleave(g, 1), v4.repeat_interleave(g, 1)
            mask = causal_lower_right(M, n) if masks[-1] == "causal" else None
            o = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, scale=scale, enable_gqa=gqa)
            outs.append(o[0].transpose(0, 1))
    return outs


def segment_calls(tasks, expand):
    """Dense equivalents: (q4, k4, v4, causal) per (task, segment), K/V contiguous (expanded for GQA
    when the backend needs it)."""
    calls = []
    for t in tasks:
        q4 = t.q.transpose(0, 1).unsqueeze(0)
        for s in t.segments:
            k4 = s.k.transpose(0, 1).unsqueeze(0).contiguous()
            v4 = s.v.transpose(0, 1).unsqueeze(0).contiguous()
            if expand:
                g = q4.shape[1] // k4.shape[1]
                k4, v4 = k4.repeat_interleave(g, 1), v4.repeat_interleave(g, 1)
            calls.append((q4, k4, v4, s.mask == "causal"))
    return calls


def run_segments(calls, scale, backend, gqa):
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    with sdpa_kernel(sdpa_backend(backend)):
        for q4, k4, v4, causal in calls:
            M, n = q4.shape[2], k4.shape[2]
            if causal and M == n:
                F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale, enable_gqa=gqa)
            elif causal:
                F.scaled_dot_product_attention(q4, k4, v4, attn_mask=causal_lower_right(M, n), scale=scale,
                                               enable_gqa=gqa)
            else:
                F.scaled_dot_product_attention(q4, k4, v4, scale=scale, enable_gqa=gqa)


def cudnn_lse_path(tasks, scale, join):
    """The triton backend's cuDNN candidate (runtime/backends/cudnn_segments.py: aten's cuDNN op
    with the log-sum-exp on each task's joined segments, or per (task, KV segment) with
    join=False, K/V with GQA, then the LSE merge) on the tasks of one launch; refused where the
    backend would refuse it."""
    from spava_plan.runtime.backends import cudnn_segments

    checked = [(t.q, [(s.k, s.v, s.mask == "causal") for s in t.segments], None) for t in tasks]
    if not cudnn_segments.eligible(checked):
        raise NotImplementedError("not eligible for cuDNN (a causal segment it cannot align, or not CUDA/16-bit)")
    return [out for out, _ in cudnn_segments.attend(checked, scale, join=join)]


def _try(fn):
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001 - a baseline a backend refuses is reported, not fatal
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


# ---- compile ahead, in parallel ----------------------------------------------------------------
def launch_groups(plan, rank: int) -> dict[str, list[tuple[str, ...]]]:
    """Task groups of every variant: the whole rank, the schedule's launches, each task alone."""
    names = tuple(t.name for t in plan.ranks[rank].tasks)
    return {"fused": [names],
            "schedule": [tuple(op.tasks) for op in plan.schedule[rank].ops if op.name == "attend"],
            "per_task": [(n,) for n in names]}


def _compile_one(item) -> str:
    """Worker: compile (and launch once) one launch kernel with one config; fills Triton's cache."""
    case, rank, names, cfg, device = item
    import torch

    from spava_plan.codegen import render_kernels
    from spava_plan.plan_load import load_plan
    from spava_plan.runtime.backends.triton_gen import TritonBackend

    plan = load_plan(Path(case) / "plan.json")
    backend = TritonBackend(Path(case) / "kernels", plan_hash=plan.hash, render=partial(render_kernels, plan), tune=False)
    tasks = rank_inputs(plan, rank, torch.bfloat16 if device == "cuda" else torch.float32, device, 0)[0]
    checked = [backend._check(tasks[n]) for n in names]
    name = backend.mod.LAUNCHES[backend._signature(checked)]
    t0 = time.time()
    try:
        backend.mod.attend(name, checked, 1.0 / math.sqrt(plan.model.head_dim), tuple(cfg))
        if device == "cuda":
            torch.cuda.synchronize()
        return f"{name} {cfg} {time.time() - t0:.0f}s"
    except Exception as exc:  # noqa: BLE001 - e.g. a config over the shared-memory limit
        return f"{name} {cfg} failed: {type(exc).__name__}"


def precompile(case: Path, rank: int, groups: list[tuple[str, ...]], configs, workers: int) -> None:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    items = [(str(case), rank, g, tuple(c), DEVICE) for g in dict.fromkeys(groups) for c in configs]
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=min(workers, len(items)), mp_context=mp.get_context("spawn")) as pool:
        for line in pool.map(_compile_one, items):
            print("   compiled", line, flush=True)
    print(f"  precompiled {len(items)} kernels in {time.time() - t0:.0f}s", flush=True)


# ---- one case -----------------------------------------------------------------------------------
def run_case(case: Path, variants: set[str], tune: bool, workers: int) -> dict:
    import torch

    from spava_plan.codegen import render_kernels
    from spava_plan.plan_load import load_plan
    from spava_plan.runtime.backends.triton_gen import TritonBackend

    plan = load_plan(case / "plan.json")
    backend = TritonBackend(case / "kernels", plan_hash=plan.hash, render=partial(render_kernels, plan), tune=tune, cudnn=False)  # generated only
    rank = busiest_rank(plan)
    groups = launch_groups(plan, rank)
    if workers > 1:  # tuned launches: every candidate; per-task launches: the default config only
        tuned = [g for v in ("fused", "schedule") if v in variants for g in groups[v]]
        precompile(case, rank, tuned, backend.mod.ATTENTION_CONFIGS if tune else [backend.mod.DEFAULT_CONFIG],
                   workers)
        if "per_task" in variants:
            precompile(case, rank, [g for g in groups["per_task"] if g not in tuned], [backend.mod.DEFAULT_CONFIG],
                       workers)
    m = plan.model
    scale = 1.0 / math.sqrt(m.head_dim)
    sets = [rank_inputs(plan, rank, DTYPE, DEVICE, seed) for seed in (1, 2)]
    names = [t.name for t in plan.ranks[rank].tasks]
    flops = 4 * m.head_dim * m.num_heads * rank_pairs(plan, rank)
    attend_ops = groups["schedule"]
    res = {"case": case.name, "plan_hash": plan.hash, "rank": rank, "model": m.name, "Hq": m.num_heads,
           "Hkv": m.num_kv_heads, "D": m.head_dim, "world": plan.world_size,
           "tasks": {t.name: {"rows": t.rows, "segments": [[r.kind, r.mask, r.length] for r in t.kv]}
                     for t in plan.ranks[rank].tasks},
           "schedule": [list(x) for x in attend_ops], "useful_flops": flops, "times_ms": {}, "errors": {}}

    def record(label, fn):
        for name, timer in ((label, bench), (label + " [graph]", bench_graph)):
            if timer is bench_graph and DEVICE != "cuda":
                continue
            t0 = time.time()
            ms, err = _try(lambda: (fn(0), fn(1), _sync(), timer(fn))[-1])  # tune/compile first
            if err:
                res["errors"][name] = err
            else:
                res["times_ms"][name] = ms
            print(f"  {name:32s} {ms if ms else float('nan'):9.3f} ms  ({time.time() - t0:.0f}s)"
                  f"{'  ' + err if err else ''}", flush=True)

    tasks_of = [[s[0][n] for n in names] for s in sets]
    # correctness in the same run: generated vs the reference path (both bf16)
    got = backend.attention(tasks_of[0], scale)
    gqa = _try(lambda: reference_path(tasks_of[0][:1], scale, True))[1] is None
    res["reference_enable_gqa"] = gqa
    ref = reference_path(tasks_of[0], scale, gqa)
    res["rel_err_vs_reference"] = {n: ((o.float() - r.float()).norm() / r.float().norm()).item()
                                   for n, (o, _), r in zip(names, got, ref)}
    if "fused" in variants:
        record("generated/fused", lambda i: backend.attention(tasks_of[i], scale))
    if "schedule" in variants:
        record("generated/schedule", lambda i: [backend.attention([sets[i][0][n] for n in op], scale)
                                                for op in attend_ops])
    if "backend" in variants:  # the runtime's choice per launch: generated tiles or cuDNN, own table
        both = TritonBackend(case / "kernels", plan_hash=plan.hash, render=partial(render_kernels, plan), tune=True, cudnn=True,
                             configs=None if tune else [backend.mod.DEFAULT_CONFIG],
                             autotune=case / "kernels" / "autotune-backend.json")
        record("backend/schedule", lambda i: [both.attention([sets[i][0][n] for n in op], scale) for op in attend_ops])
        res["autotune_backend"] = both.tuner.table
    if "per_task" in variants:  # not tuned separately: the config the tuned launches chose
        backend.tuning = False
        record("generated/per_task", lambda i: [backend.attention([t], scale) for t in tasks_of[i]])
        backend.tuning = tune
    if "reference" in variants:
        record("reference", lambda i: reference_path(tasks_of[i], scale, gqa))
    for bk in ("flash", "cudnn"):
        if f"sdpa_{bk}" not in variants:
            continue
        ok_gqa = _try(lambda: run_segments(segment_calls(tasks_of[0][:1], False)[:1], scale, bk, True))[1] is None
        res[f"sdpa_{bk}_enable_gqa"] = ok_gqa
        calls = [segment_calls(ts, expand=not ok_gqa) for ts in tasks_of]
        record(f"sdpa_{bk}/segments", lambda i: run_segments(calls[i], scale, bk, ok_gqa))
        del calls
    for variant, label, join in (("cudnn_lse", "cudnn_lse/segments+merge", False),
                                 ("cudnn_join", "cudnn_join/joined+merge", True)):
        if variant not in variants:  # cuDNN with LSE + merge, checked against the reference first
            continue
        if "cudnn_bottom_right" not in res and DEVICE == "cuda":
            from spava_plan.runtime.backends import cudnn_segments
            op = cudnn_segments._aten_op()
            res["cudnn_bottom_right"] = op is not None and cudnn_segments.aligns_bottom_right(
                op, torch.device(DEVICE), DTYPE)
        got_c, err = _try(lambda: cudnn_lse_path(tasks_of[0], scale, join))
        if err:
            res["errors"][label] = err
            print(f"  {label} refused: {err}", flush=True)
        else:
            res[f"rel_err_{variant}_vs_reference"] = {n: ((o.float() - r.float()).norm() / r.float().norm()).item()
                                                      for n, o, r in zip(names, got_c, ref)}
            record(label, lambda i, j=join: cudnn_lse_path(tasks_of[i], scale, j))
    if "select" in variants and sets[0][2]:
        pool, score = plan.selection.pool_window, plan.selection.score
        record("select", lambda i: [backend.select(sets[i][1], kb, vb, kp, pool, score) for kb, vb, kp in sets[i][2]])
        # what the runtime calls: every block of the rank at once (one launch per step)
        record("select/batched", lambda i: backend.select_blocks(sets[i][1], *sets[i][3], pool, score))
        res["select_blocks"] = [[kb.shape[0], kp] for kb, _, kp in sets[0][2]]
        mod = backend.mod  # where the selection time goes: score + top-k, then the packed gather
        record("select/indices", lambda i: [mod.select_indices(sets[i][1], kb, kp, pool, score)
                                            for kb, _, kp in sets[i][2]])
        idx = [mod.select_indices(sets[0][1], kb, kp, pool, score) for kb, _, kp in sets[0][2]]
        record("select/gather", lambda i: [mod.gather(ix, kb, vb) for ix, (kb, vb, _) in zip(idx, sets[i][2])])
    t = res["times_ms"]
    res["tflops"] = {k: flops / (v * 1e-3) / 1e12 for k, v in t.items() if not k.startswith("select")}
    res["ratios"] = {}
    for suffix in ("", " [graph]"):  # eager and graph-replayed, each against the same kind of timing
        for variant in ("generated/fused", "generated/schedule"):
            gen = t.get(variant + suffix)
            if not gen:
                continue
            res["ratios"][variant + suffix] = {
                "reference_over_generated_time": t.get("reference" + suffix, math.nan) / gen,
                "generated_over_cudnn_tflops": t.get("sdpa_cudnn/segments" + suffix, math.nan) / gen,
                "generated_over_flash_tflops": t.get("sdpa_flash/segments" + suffix, math.nan) / gen,
                "select_share_of_attention": t.get("select" + suffix, math.nan) / gen,
            }
    res["autotune"] = json.loads((case / "kernels" / "autotune.json").read_text()) \
        if (case / "kernels" / "autotune.json").exists() else {}
    del sets, tasks_of, got, ref
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return res


def table(results: list[dict]) -> str:
    lines = ["| case | rank | variant | ms | useful TFLOP/s |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        for k, v in r["times_ms"].items():
            tf = r["tflops"].get(k)
            lines.append(f"| {r['case']} | {r['rank']} | {k} | {v:.3f} | {tf:.0f} |" if tf else
                         f"| {r['case']} | {r['rank']} | {k} | {v:.3f} | - |")
    lines.append("")
    lines.append("| case | generated variant | reference / generated time | generated / cuDNN TFLOP/s | "
                 "generated / flash TFLOP/s | select / attention time |")
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        for variant, x in r.get("ratios", {}).items():
            lines.append(f"| {r['case']} | {variant} | {x['reference_over_generated_time']:.2f} | "
                         f"{x['generated_over_cudnn_tflops']:.2f} | {x['generated_over_flash_tflops']:.2f} | "
                         f"{x['select_share_of_attention']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make-plans")
    mk.add_argument("root", type=Path)
    rn = sub.add_parser("run")
    rn.add_argument("root", type=Path)
    rn.add_argument("--cases", default=",".join(CASES))
    rn.add_argument("--variants", default="fused,schedule,per_task,reference,sdpa_flash,sdpa_cudnn,select")
    rn.add_argument("--no-tune", action="store_true")
    rn.add_argument("--out", type=Path, default=None)
    rn.add_argument("--workers", type=int, default=12, help="parallel compile processes (1: compile inline)")
    rn.add_argument("--device", default="cuda", help="cpu: dry run of the plumbing under TRITON_INTERPRET=1")
    args = ap.parse_args(argv)
    if args.cmd == "make-plans":
        make_plans(args.root)
        return 0
    global DEVICE, DTYPE
    import torch
    import triton

    DEVICE = args.device
    DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    env = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run, interpreter)",
           "torch": torch.__version__, "triton": triton.__version__,
           "command": " ".join([Path(sys.executable).name] + sys.argv)}
    print(env, flush=True)
    results = []
    for name in args.cases.split(","):
        print(name, flush=True)
        results.append(run_case(args.root / name, set(args.variants.split(",")), not args.no_tune, args.workers))
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "kernels.json").write_text(json.dumps({"env": env, "results": results}, indent=1) + "\n")
            (args.out / "kernels.md").write_text(table(results) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
