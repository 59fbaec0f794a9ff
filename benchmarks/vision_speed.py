"""Vision-encoder speed of one rank (Qwen2.5-VL ViT + merger on this rank's temporal grids), GPU only.

The ViT is the same for every method of the prefill benchmark and dominates Spava's slowest rank at
64 frames 1440p, so this script times it alone, variant by variant, on the same random weights and
pixels, reports each variant's error against the same tower in fp32, and profiles the kernels:

  batched   transformers' tower, attention as one SDPA call per window size (runtime/vision_attention)
  fused     the same plus runtime/vision_fused (Triton RMSNorm, rotary and SiLU-gate kernels, one
            gate|up GEMM, the patch Conv3d as a matmul; same fp32 math)
  fused+B   fused with the ViT's SDPA calls pinned to backend B (flash, cudnn, efficient); the
            unpinned variants take torch's default choice

    python3 benchmarks/vision_speed.py --model 3b --grids 4 --res 1440p [--profile] [--out FILE.json]

Timing: CUDA events around one tower call with the pixels already on the GPU; --warmup untimed
calls, then the median / min-max of --repeats.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch

from spava_plan.plan import ModelSpec, VisionTowerSpec

# Model dims (conf/model/*.yaml) and the ViT's fixed geometry (patch 14, merge 2, temporal patch 2).
MODELS = {
    "3b": dict(num_layers=36, hidden_size=2048, intermediate_size=11008, num_heads=16, num_kv_heads=2, head_dim=128,
               out_hidden_size=2048),
    "7b": dict(num_layers=28, hidden_size=3584, intermediate_size=18944, num_heads=28, num_kv_heads=4, head_dim=128,
               out_hidden_size=3584),
}
# Merged-token grid (h/2, w/2) per resolution preset, as the planner's layout resizes them.
GRIDS = {"1440p": (51, 91), "720p": (26, 46)}


def model_cfg(name: str) -> ModelSpec:
    m = MODELS[name]
    vision = VisionTowerSpec(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420,
                             out_hidden_size=m["out_hidden_size"], patch_size=14, spatial_merge=2, temporal_patch=2,
                             tile_size=448, tile_tokens=256)
    return ModelSpec(name=f"qwen2_5vl_{name}", family="qwen2_5_vl", num_layers=m["num_layers"],
                     hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"], num_heads=m["num_heads"],
                     num_kv_heads=m["num_kv_heads"], head_dim=m["head_dim"], vocab_size=151936,
                     tie_word_embeddings=name == "3b", rope_theta=1000000.0, mrope_section=(16, 24, 24),
                     tokens_per_second=2, vision=vision)


def timed(fn, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ms = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ms.append(a.elapsed_time(b))
    return ms


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="3b")
    p.add_argument("--grids", type=int, default=4, help="temporal grids on this rank (64 frames / 8 ranks / 2 = 4)")
    p.add_argument("--res", choices=sorted(GRIDS), default="1440p")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="print the top CUDA kernels of each variant")
    p.add_argument("--variants", default="batched,fused,fused+sdpa_windows,fused+flash,fused+cudnn,fused+efficient",
                   help="batched: stock elementwise code; fused: runtime/vision_fused (window layers on "
                        "runtime/vision_window); fused+sdpa_windows: window layers on SDPA; fused+B: SDPA pinned to B")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("vision_speed: needs a CUDA GPU", file=sys.stderr)
        return 2

    from spava_plan.runtime.hf import model as hf_model
    from spava_plan.runtime.vision import attention as vision_attention, fused as vision_fused
    from spava_plan.runtime.vision.parallel import visual_embeddings
    from spava_plan.runtime.vision.tower import vision_module

    dev = torch.device("cuda")
    model = hf_model.random_model(model_cfg(a.model), dtype=torch.bfloat16, device=dev, seed=0)
    vision_attention.install(model)
    visual = vision_module(model)
    mh, mw = GRIDS[a.res]
    grid = torch.tensor([[a.grids, 2 * mh, 2 * mw]])
    patches = a.grids * 4 * mh * mw
    g = torch.Generator(device=dev).manual_seed(0)
    pixels = torch.randn((patches, 3 * 2 * 14 * 14), generator=g, device=dev, dtype=torch.float32)
    # Useful FLOPs: every linear layer (2 per MAC), window and full attention (4 * S * keys * width).
    vis = visual.config
    hid, inter = vis.hidden_size, vis.intermediate_size
    linear = patches * vis.depth * 2 * (4 * hid * hid + 3 * hid * inter) + patches // 4 * 2 * (
        (4 * hid) ** 2 + 4 * hid * vis.out_hidden_size) + patches * 2 * hid * 1176
    full_layers = len(vis.fullatt_block_indexes)
    per_grid = 4 * mh * mw
    attn = full_layers * a.grids * 4 * per_grid * per_grid * hid + (vis.depth - full_layers) * 4 * patches * 64 * hid
    flops = linear + attn

    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    pinned: list = []

    def call():
        with torch.no_grad():
            if pinned:
                with sdpa_kernel(pinned):
                    return visual_embeddings(visual, pixels, grid)
            return visual_embeddings(visual, pixels, grid)

    # The reference: the same tower in fp32 (stock elementwise code), so each bf16 variant's own
    # rounding error is visible (two bf16 variants can differ from each other by ~1e-2 at 32 layers).
    ref_visual = copy.deepcopy(visual).float()
    with torch.no_grad():
        ref = visual_embeddings(ref_visual, pixels, grid).float()
    del ref_visual
    torch.cuda.empty_cache()
    rows = []
    for name in a.variants.split(","):
        if name.startswith("fused"):
            vision_fused.install(model)
            for blk in visual.blocks:  # fused+sdpa_windows: the window layers on SDPA (groups + gathers)
                blk.attn._spava_window_kernel = name != "fused+sdpa_windows"
        else:
            vision_fused.uninstall(model)
        pinned[:] = [backends[name.split("+")[1]]] if "+" in name and name.split("+")[1] in backends else []
        try:
            out = call()
        except RuntimeError as exc:  # a backend that does not take these shapes
            print(f"{name}: {str(exc).splitlines()[0][:200]}", flush=True)
            continue
        err = float((out.float() - ref).norm() / ref.norm())
        ms = timed(call, a.warmup, a.repeats)
        med = statistics.median(ms)
        rows.append(dict(variant=name, median_ms=med, min_ms=min(ms), max_ms=max(ms), rel_err_vs_fp32=err,
                         tflops=flops / med / 1e9))
        if a.profile and name in ("fused", "fused+sdpa_windows"):
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                call()
                torch.cuda.synchronize()
            print(f"--- {name}: top CUDA kernels")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))
    vision_fused.uninstall(model)
    head = (f"vision tower, {a.model}, {a.grids} grids of {a.res} ({patches} patches), "
            f"{flops / 1e12:.1f} TFLOP, {torch.cuda.get_device_name()}")
    print(head)
    print("| variant | median ms | min-max ms | TFLOP/s | rel. err vs fp32 tower |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['variant']} | {r['median_ms']:.1f} | {r['min_ms']:.1f}-{r['max_ms']:.1f} | {r['tflops']:.0f} | "
              f"{r['rel_err_vs_fp32']:.2e} |")
    if a.out:
        a.out.write_text(json.dumps(dict(head=head, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
