"""What head dim 80 costs the ViT's full-attention layers: SDPA (cuDNN, flash) on their shape at
head dims 64, 80, 96, 128, and 80 zero-padded to 96 / 128 (pad, call, slice: exact, the padded
columns add 0 to every score and give 0 output columns).

Qwen2.5-VL's ViT runs 4 full-attention layers over each temporal grid with 16 heads of dim 80; at
64 frames 1440p one rank holds 4 grids of 18,564 patches. Token-major views as the tower holds
them ((S, 3, H, D) qkv). Useful TFLOP/s counts the unpadded head dim. GPU only:

    python3 benchmarks/vision_head_dim.py            # results: benchmarks/results/*-vision-head-dim.md
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from vision_speed import timed  # benchmarks/ is on sys.path when a script of it runs


def median_ms(fn) -> float:
    return statistics.median(timed(fn, warmup=1, repeats=8))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grids", type=int, default=4)
    ap.add_argument("--patches", type=int, default=18564, help="patches per grid")
    ap.add_argument("--heads", type=int, default=16)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("vision_head_dim.py times SDPA on the GPU: it needs a CUDA GPU")
    B, S, H = args.grids, args.patches, args.heads

    def views(d):
        qkv = torch.randn(B * S, 3, H, d, device="cuda", dtype=torch.bfloat16)
        return [qkv[:, i].view(B, S, H, d).transpose(1, 2) for i in range(3)]

    def tflops(d, ms):
        return 4 * B * H * S * S * d / ms / 1e9

    rows = []
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        with sdpa_kernel(backend):
            for d in (64, 80, 96, 128):
                q, k, v = views(d)
                ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v))
                rows.append((name, d, "", ms, tflops(d, ms)))
            q, k, v = views(80)
            ref = F.scaled_dot_product_attention(q, k, v).float()
            for pad in (96, 128):
                def padded(pad=pad):
                    qp, kp, vp = (F.pad(x, (0, pad - 80)) for x in (q, k, v))
                    return F.scaled_dot_product_attention(qp, kp, vp, scale=80 ** -0.5)[..., :80]
                err = ((padded().float() - ref).norm() / ref.norm()).item()
                ms = median_ms(padded)
                rows.append((name, 80, f"padded to {pad} (rel. err {err:.1e})", ms, tflops(80, ms)))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {B} x {S} patches, {H} heads, bf16\n")
    print("| SDPA backend | head dim | variant | ms | useful TFLOP/s |\n| --- | --- | --- | --- | --- |")
    for name, d, variant, ms, tf in rows:
        print(f"| {name} | {d} | {variant} | {ms:.2f} | {tf:.0f} |")


if __name__ == "__main__":
    main()
