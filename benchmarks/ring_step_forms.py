"""One ZigZagRing step's attention on cuDNN, in the forms the same FLOPs can take (GPU only).

A ring step of the 3B plan at 64 frames 1440p: M = 9285 query rows, blocks of n = 9285 keys, 16
query heads over 2 KV heads of 128, K|V packed per row as received ((rows, Hkv, 2D)).
  A: one task over its owner's two blocks (2n keys, two adjacent segments): joined by torch.cat
     (a copy), as one strided view of the receive buffer, as a contiguous copy, or as two calls;
  B: two tasks over one block each: two calls on the strided views, or on contiguous copies, or
     one batched call.
Written to find out why ZigZagRing's rank 0 (7 steps of form A per layer) was slower than its rank 7
(7 of form B): it is not the kernel (the forms are within a few percent), it was the missing
launch (results/2026-12-03-h200-prefill-ringfix.md).

    python3 benchmarks/ring_step_forms.py
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys

import torch

from vision_speed import timed  # benchmarks/ is on sys.path when a script of it runs


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    if not torch.cuda.is_available():
        sys.exit("ring_step_forms.py times cuDNN: it needs a CUDA GPU")
    M = n = 9285
    hq, hkv, d = 16, 2, 128
    scale = 1 / math.sqrt(d)
    gen = torch.Generator(device="cuda").manual_seed(0)
    buf = torch.randn(2 * n, hkv, 2 * d, device="cuda", generator=gen).bfloat16()
    q, q2 = (torch.randn(M, hq, d, device="cuda", generator=gen).bfloat16() for _ in range(2))
    k, v = buf[..., :d], buf[..., d:]
    k1, k2, v1, v2 = k[:n], k[n:], v[:n], v[n:]
    k1c, v1c, kc, vc = k1.contiguous(), v1.contiguous(), k.contiguous(), v.contiguous()
    aten = torch.ops.aten._scaled_dot_product_cudnn_attention

    def bhsd(t):
        return t.transpose(0, 1).unsqueeze(0)

    def op(q, k, v):
        return aten(bhsd(q), bhsd(k), bhsd(v), None, True, 0.0, False, False, scale=scale)

    forms = {
        "A joined by torch.cat": lambda: op(q, torch.cat([k1, k2]), torch.cat([v1, v2])),
        "A the torch.cat alone": lambda: (torch.cat([k1, k2]), torch.cat([v1, v2])),
        "A one strided view": lambda: op(q, k, v),
        "A one contiguous copy": lambda: op(q, kc, vc),
        "A two calls": lambda: (op(q, k1, v1), op(q, k2, v2)),
        "B two calls, strided": lambda: (op(q, k1, v1), op(q2, k1, v1)),
        "B two calls, contiguous": lambda: (op(q, k1c, v1c), op(q2, k1c, v1c)),
        "B one batched call": lambda: aten(torch.stack([q, q2]).transpose(1, 2), bhsd(k1c).expand(2, -1, -1, -1),
                                           bhsd(v1c).expand(2, -1, -1, -1), None, True, 0.0, False, False,
                                           scale=scale),
    }
    flops = 4 * M * 2 * n * hq * d
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| form | ms | TFLOP/s |\n| --- | --- | --- |")
    for name, fn in forms.items():
        ms = statistics.median(timed(fn, warmup=3, repeats=25))
        print(f"| {name} | {ms:.3f} | {flops / ms / 1e9:.0f} |")


if __name__ == "__main__":
    main()
