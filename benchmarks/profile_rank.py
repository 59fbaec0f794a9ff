"""Where one rank's time goes: a rank of a plan alone on the GPU, phase by phase, with a kernel profile.

The prefill benchmark (prefill.py) says how long each rank's vision stage, attention and other
per-token work take; this script says why. It runs rank R of a plan.json in single-rank mode
(runtime/solo.py: the rank's own compute on buffers of the real sizes, random data in place of its
peers'; spava-run's ``rank=R``) on the model the runtime builds (random weights, the fused ViT and
LLM kernels, the generated attention kernels), then:

  phases     vision stage / prefill / first token of ``--repeats`` whole runs (the runtime's own
             synchronising timing marks), median
  transfer   this rank's pixels host -> GPU: the old one-call ``.to(device, dtype)`` against copy
             then cast (runtime/vision_parallel.to_device), fp32 pinned and bf16 pinned
  tower      the vision tower on GPU-resident pixels at several ``vision_units`` (tower calls of at
             most that many temporal grids; the plan's value first)
  profile    one vision stage and one prefill under torch.profiler: kernel time by category, the
             top kernels, and the GPU's idle time inside the stage (wall minus the union of kernel
             intervals: launch gaps and host work the GPU waits for)

    python3 benchmarks/profile_rank.py PLAN.json --rank 1 [--repeats 3] [--out DIR]

GPU only (CUDA events / synchronising clocks; fresh random inputs, never zeros). Single-rank
numbers are one rank's compute, not an emulated or measured multi-rank time.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

# Kernel name -> category, first match wins (cuBLAS's Hopper kernels are nvjet_* / sm90_xmma_*).
CATEGORIES = (
    ("memcpy", r"^Memcpy|^Memset"),
    ("sdpa (cuDNN/flash)", r"cudnn|fmha|flash|fprop"),
    ("gemm", r"gemm|nvjet|xmma|cutlass|cublas|sm90_|sm80_"),
    ("spava attention (generated)", r"^attend_\d"),
    ("selection / merge", r"select|_merge|gather|topk|bisect"),
    ("vision window attention", r"_window_attention_kernel"),
    ("fused norms / rotary / SiLU", r"_rms_norm|_rope|_silu_mul"),
    ("torch copies / index", r"copy|cat|index|scatter|gather|CatArray"),
    ("torch elementwise / reduce", r"elementwise|vectorized|reduce|unrolled|Reduce"),
)


def category(name: str) -> str:
    for cat, pattern in CATEGORIES:
        if re.search(pattern, name):
            return cat
    return "other"


def timed(fn: Callable[[], Any], sync: Callable[[], None], warmup: int, repeats: int) -> list[float]:
    """Wall milliseconds of ``fn`` between two device synchronisations."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def busy_ms(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals in microseconds, as milliseconds."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total / 1e3


def idle_gaps(kernels: list, cpu: list, top: int = 6) -> list[dict]:
    """The longest stretches with no kernel running inside the stage, each with what the host was
    doing meanwhile: the CPU ops overlapping it (shortest first: the innermost) and the deepest
    frame of project or transformers code on their Python stacks."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    holes, end = [], None
    for a, b in spans:
        if end is not None and a > end:
            holes.append((a - end, end, a))
        end = b if end is None else max(end, b)
    out = []
    for length, a, b in sorted(holes, reverse=True)[:top]:
        over = sorted((e for e in cpu if e.time_range.start < b and e.time_range.end > a),
                      key=lambda e: e.time_range.end - e.time_range.start)
        frames = [f for e in over for f in (getattr(e, "stack", None) or [])
                  if "transformers" in f or "spava" in f or "/runtime/" in f]
        out.append({"ms": length / 1e3, "host_ops": list(dict.fromkeys(e.name for e in over))[:6],
                    "frame": frames[0] if frames else ""})
    return out


def summarize(prof: Any, wall_ms: float, top: int) -> dict:
    """Kernel time by category, top kernels and GPU idle time of one profiled stage."""
    from torch.autograd import DeviceType

    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    cpu = [e for e in prof.events() if e.device_type == DeviceType.CPU]
    spans = [(e.time_range.start, e.time_range.end) for e in kernels]
    by_cat: dict[str, float] = {}
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        ms = (e.time_range.end - e.time_range.start) / 1e3
        by_cat[category(e.name)] = by_cat.get(category(e.name), 0.0) + ms
        by_name.setdefault(e.name, []).append(ms)
    busy = busy_ms(spans)
    first = min((a for a, _ in spans), default=0.0)
    last = max((b for _, b in spans), default=0.0)
    names = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {"wall_ms": wall_ms, "kernel_span_ms": (last - first) / 1e3, "gpu_busy_ms": busy,
            "gpu_idle_ms": max(0.0, wall_ms - busy), "kernels": len(kernels),
            "by_category_ms": dict(sorted(by_cat.items(), key=lambda kv: -kv[1])),
            "top": [{"name": n[:110], "ms": sum(v), "calls": len(v), "category": category(n)} for n, v in names],
            "idle_gaps": idle_gaps(kernels, cpu)}


def rotary_check(model: Any, plan: Any, dev: Any) -> dict | None:
    """The fused language-model rotary against the stock function on fresh random bf16 inputs of
    this plan's sizes: relative L2 error and the share of elements that differ (the fused kernel
    rounds once where the stock code rounds three times, so a few elements differ by one ulp);
    None when the model has no fused rotary."""
    import torch

    from spava_plan.runtime import llm_fused
    from spava_plan.runtime.hf.attention import language_model

    name = getattr(language_model(model), "_spava_rotary_module", None)
    if name is None:
        return None
    fused, stock = getattr(sys.modules[name], "apply_rotary_pos_emb"), llm_fused._STOCK_ROTARY[name]
    m, n = plan.model, plan.ranks[0].local_tokens
    g = torch.Generator(device=dev).manual_seed(1)
    q, k = (torch.randn((1, h, n, m.head_dim), generator=g, device=dev).to(torch.bfloat16)
            for h in (m.num_heads, m.num_kv_heads))
    cos, sin = (torch.randn((1, n, m.head_dim), generator=g, device=dev).to(torch.bfloat16) for _ in range(2))
    (qa, ka), (qb, kb) = fused(q, k, cos, sin), stock(q, k, cos, sin)
    x, y = torch.cat([qa.flatten(), ka.flatten()]).double(), torch.cat([qb.flatten(), kb.flatten()]).double()
    return {"rel_l2": float((x - y).norm() / y.norm()), "differ": float((x != y).double().mean()),
            "contiguous_like_stock": bool(qa.is_contiguous() and ka.is_contiguous())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("plan", type=Path)
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--units", default="", help="vision_units to time the tower at (default: the plan's, and one call)")
    p.add_argument("--top", type=int, default=18)
    p.add_argument("--out", type=Path, default=None, help="writes profile_rank.json here")
    p.add_argument("--device", default="cuda", help="cpu: dry run of the plumbing on a tiny plan (not a measurement)")
    a = p.parse_args(argv)

    import torch

    cpu = a.device == "cpu"
    if not cpu and not torch.cuda.is_available():
        print("profile_rank: needs a CUDA GPU (--device cpu: a dry run of the plumbing)", file=sys.stderr)
        return 2
    from torch.profiler import ProfilerActivity, profile

    from spava_plan.plan_load import load_plan
    from spava_plan.entry.run_config import compose_entry_config
    from spava_plan.runtime.vision import chunking
    from spava_plan.runtime.solo import SoloComm
    from spava_plan.runtime.vision.parallel import to_device, visual_embeddings
    from spava_plan.runtime.vision.tower import vision_module
    from spava_plan.entry.session import Session, rank_runner
    from spava_plan.vision_exchange import plan_vision_exchange

    plan = load_plan(a.plan)
    W, R = plan.world_size, a.rank
    g0, g1 = plan_vision_exchange(plan).grids[R] if 0 <= R < W else (0, 1)
    if g0 == g1:  # its transfer and tower sections time this rank's own grids
        print(f"profile_rank: rank {R} encodes no temporal grids (vision.parallel={plan.vision_parallel}); "
              f"profile --rank 0", file=sys.stderr)
        return 2
    cfg = compose_entry_config("run", [f"plan={a.plan}", "model.init=random", f"rank={R}", "max_new_tokens=1",
                                       f"device={a.device}", "timeout=1200"])
    session = Session(cfg, W)
    prepared = session.prepare_run(solo_rank=R)
    pixels = prepared.inputs.pixel_values_videos
    if not cpu:  # page-locked, as a DataLoader(pin_memory=True) hands them over
        pixels = pixels.pin_memory()
    prepared.inputs = dataclasses.replace(prepared.inputs, pixel_values_videos=pixels)
    backend = session.backend(prepared)
    comm = SoloComm(R, W)
    dev = prepared.device
    sync = (lambda: None) if cpu else torch.cuda.synchronize
    report: dict[str, Any] = {"plan": str(a.plan), "method": plan.method, "rank": R, "world": W,
                              "device": "CPU dry run (not a measurement)" if cpu else torch.cuda.get_device_name(), "torch": torch.__version__,
                              "tokens": plan.layout.total_tokens, "local_tokens": plan.ranks[R].local_tokens,
                              "label": comm.label}

    # -- phases: whole runs of the rank ---------------------------------------------------------
    runs = []
    for i in range(a.warmup + a.repeats):
        t = session.run(prepared, comm, backend, 1).timing
        if i >= a.warmup:
            runs.append({"vision_ms": t.vision_s * 1e3, "prefill_ms": t.prefill_s * 1e3,
                         "ttft_ms": t.first_token_s * 1e3})
    report["phases"] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}

    # -- transfer: this rank's pixels to the GPU ------------------------------------------------
    model = prepared.model
    visual = vision_module(model)
    dtype = next(visual.parameters()).dtype
    # the pixels hold the grids [p0, p1) (single-rank mode: this rank's own only, ModelInputs.pixel_grids)
    p0, p1 = prepared.inputs.pixel_grids or (0, int(prepared.inputs.video_grid_thw[0, 0]))
    per_grid = pixels.shape[0] // (p1 - p0)
    mine = pixels[(g0 - p0) * per_grid: (g1 - p0) * per_grid]
    mine_lp = mine.to(dtype) if cpu else mine.to(dtype).pin_memory()
    transfer = {
        "one call .to(device, dtype) [before]": lambda: mine.to(device=dev, dtype=dtype),
        "copy then cast (to_device), fp32 pinned": lambda: to_device(mine, dev, dtype),
        "copy, bf16 pinned on the host": lambda: to_device(mine_lp, dev, dtype),
    }
    report["transfer_mb"] = mine.numel() * mine.element_size() / 1e6
    report["transfer_ms"] = {k: statistics.median(timed(fn, sync, 1, 5)) for k, fn in transfer.items()}

    # -- check: the fused LLM rotary against the stock function, bf16, this rank's q/k sizes --------
    report["rotary_check"] = rotary_check(model, plan, dev)

    # -- tower: vision_units per call ---------------------------------------------------------
    grid = prepared.inputs.video_grid_thw.clone()
    grid[0, 0] = g1 - g0
    px = to_device(mine, dev, dtype)
    units = [int(u) for u in a.units.split(",") if u] or sorted({plan.chunking.vision_units, g1 - g0})
    tower = {}
    with torch.inference_mode():
        for u in units:
            chunking.install(model, dataclasses.replace(plan.chunking, vision_units=u))
            tower[f"vision_units={u}"] = statistics.median(timed(lambda: visual_embeddings(visual, px, grid), sync,
                                                                 1, a.repeats))
    chunking.install(model, plan.chunking)
    report["tower_ms"] = tower
    del px

    # -- profile: one vision stage and one prefill -------------------------------------------
    runner = rank_runner(prepared, comm, backend, 1)
    inputs = prepared.inputs
    acts = [ProfilerActivity.CPU] + ([] if cpu else [ProfilerActivity.CUDA])

    def profiled(fn: Callable[[], Any]) -> tuple[Any, dict]:
        """fn() under the profiler (the rank is warm: whole runs above), with its summary."""
        sync()
        with profile(activities=acts, with_stack=True) as prof:
            t0 = time.perf_counter()
            out = fn()
            sync()
            wall = (time.perf_counter() - t0) * 1e3
        return out, summarize(prof, wall, a.top)

    profiles = {}
    with torch.inference_mode():
        emb, profiles["vision"] = profiled(lambda: runner.embed(inputs, runner.vision(inputs)))
        _, profiles["prefill"] = profiled(lambda: runner.prefill_embedded(emb, prepared.positions,
                                                                          inputs.prompt_tokens))
        del emb
    report["profile"] = profiles

    # -- the table ------------------------------------------------------------------------------
    print(f"\n{report['device']}, {plan.method} rank {R} of {W} alone ({report['local_tokens']} local tokens)")
    print("phases (median ms): " + ", ".join(f"{k} {v:.1f}" for k, v in report["phases"].items()))
    print(f"transfer of {report['transfer_mb']:.0f} MB of pixels: "
          + "; ".join(f"{k}: {v:.1f} ms" for k, v in report["transfer_ms"].items()))
    print(f"fused LLM rotary vs the stock function (bf16, fresh random q/k/cos/sin): {report['rotary_check']}")
    print("tower on GPU pixels: " + "; ".join(f"{k}: {v:.1f} ms" for k, v in tower.items()))
    for stage, s in profiles.items():
        print(f"\n{stage}: wall {s['wall_ms']:.1f} ms, GPU busy {s['gpu_busy_ms']:.1f}, idle {s['gpu_idle_ms']:.1f}, "
              f"{s['kernels']} kernels")
        print("  " + "; ".join(f"{c} {ms:.1f}" for c, ms in s["by_category_ms"].items()))
        for row in s["top"]:
            print(f"  {row['ms']:8.2f} ms {row['calls']:5d}x  [{row['category']}] {row['name']}")
        for gap in s["idle_gaps"]:
            print(f"  idle {gap['ms']:6.2f} ms: host in {', '.join(gap['host_ops'])} | {gap['frame']}")
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "profile_rank.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
