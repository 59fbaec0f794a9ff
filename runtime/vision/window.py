"""Window attention of the Qwen2.5-VL vision tower as ONE Triton launch over every window and head.

The tower's 28 window layers attend inside windows of at most 64 patches (a 112-pixel window).
Through SDPA (runtime/vision/attention.py) every distinct window length is one batched call, and
the windows of a length are first gathered out of the window-ordered patch sequence
(``index_select``) and scattered back: on an H100 at 64 frames 1440p one rank's windowed layers
cost ~80 ms of cuDNN time (tiles of 128 queries, 64 used, per-tile set-up over ~18K (window, head)
tiles) plus ~20 ms of gathers, for ~0.75 GB of q/k/v/o per layer: ~0.25 ms at HBM speed.

Here one program handles one (window, head): it reads the window's rows of q, k and v in place
(any row / head strides, the (1, H, S, D) views transformers hands over), computes the scores with
one tensor-core dot, the softmax in fp32 and P V with P rounded to the inputs' dtype (as FlashAttention
and cuDNN do), and writes the normalised rows straight into the (S, H, D) output. Windows come from
``cu_seqlens`` as they are; no gather, no scatter. Exact attention: equals SDPA per window up to
rounding (tests/test_vision_window.py, fp32 under TRITON_INTERPRET=1 on CPU; bf16 on the GPU).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

MAX_WINDOW = 128  # longer pieces (the full-attention layers) stay on SDPA


@triton.jit
def _window_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, cu_ptr, scale,
                             sq_s, sq_h, sk_s, sk_h, sv_s, sv_h, so_s, so_h, HKV_GROUP,
                             D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                             IEEE: tl.constexpr):
    w = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    hk = h // HKV_GROUP
    start = tl.load(cu_ptr + w).to(tl.int64)  # int64: rows x stride passes 2**31 on long videos
    n = tl.load(cu_ptr + w + 1).to(tl.int64) - start
    rows = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    rmask = rows < n
    m2 = rmask[:, None] & (d < D)[None, :]
    r = (start + rows)[:, None]
    q = tl.load(q_ptr + r * sq_s + h * sq_h + d[None, :], mask=m2, other=0.0)
    k = tl.load(k_ptr + r * sk_s + hk * sk_h + d[None, :], mask=m2, other=0.0)
    v = tl.load(v_ptr + r * sv_s + hk * sv_h + d[None, :], mask=m2, other=0.0)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(rmask[None, :], s * scale, float("-inf"))
    top = tl.max(s, axis=1)
    p = tl.exp(s - top[:, None])
    total = tl.sum(p, axis=1)
    if IEEE:
        o = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        o = tl.dot(p.to(v.dtype), v)
    o = o / total[:, None]
    tl.store(o_ptr + r * so_s + h * so_h + d[None, :], o.to(o_ptr.dtype.element_ty), mask=m2)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_len: int, scale: float | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Non-causal attention inside every piece [cu[i], cu[i+1]) of the packed sequence.

    q (S, Hq, D), k / v (S, Hkv, D) with any row / head strides (last dim contiguous); cu_seqlens
    (pieces + 1) int on q's device; max_len: the longest piece (<= MAX_WINDOW). Returns (S, Hq, D)."""
    S, H, D = q.shape
    if max_len > MAX_WINDOW or k.shape[0] != S or H % k.shape[1] or q.stride(-1) != 1 or k.stride(-1) != 1 \
            or v.stride(-1) != 1:
        raise ValueError("window_attention: pieces up to MAX_WINDOW rows, token-major q/k/v with contiguous last dims")
    if out is None:
        out = torch.empty((S, H, D), dtype=q.dtype, device=q.device)
    pieces = cu_seqlens.numel() - 1
    if pieces > 0 and S > 0:
        block_m = max(16, triton.next_power_of_2(max_len))
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        _window_attention_kernel[(pieces, H)](
            q, k, v, out, cu, float(scale if scale is not None else 1.0 / math.sqrt(D)),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
            H // k.shape[1], D=D, BLOCK_M=block_m, BLOCK_D=max(16, triton.next_power_of_2(D)),
            IEEE=q.dtype == torch.float32, num_warps=4)
    return out
