"""cuDNN attention per KV segment plus the LSE merge: a candidate the triton backend's tuner times
against the generated launch kernel, launch by launch, and keeps where it is faster.

Why: on an H200 the generated fused kernel ran Spava's busiest rank at 495 TFLOP/s (3B) where
cuDNN on the same segments ran at 556; one cuDNN call per (task, segment) with its log-sum-exp,
then our merge, was 6.5% (3B) to 8.4% (7B) faster than the fused launch
(benchmarks/results/2026-12-03-h200-kernels-cudnn-lse.json). Which one wins depends on the launch
(several small tasks in one launch favour the fused kernel), so the tuner decides per launch.

The public SDPA returns no LSE, so this calls aten's cuDNN op directly, which does:
``_scaled_dot_product_cudnn_attention(q, k, v, bias, compute_log_sumexp, dropout_p, is_causal,
return_debug_mask, scale=)`` on (B, H, S, D) views, K/V with fewer heads (GQA) read in place,
returning out (B, Hq, M, D) and lse (B, Hq, M[, 1]) in natural log. Its causal mask is top-left
aligned, ours bottom-right (runtime/backends/base.py): the two agree only on a square segment
(n == M), which is what Spava's own-block segments are; a launch with a non-square causal
segment is not eligible and stays on the generated kernel.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable, Sequence

import torch

CUDNN = ("cudnn",)  # the tuner's config for this path (generated configs are integer tuples)

SegmentOp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, float], tuple]
Merge = Callable[..., tuple]
_HALF = (torch.bfloat16, torch.float16)
_MAX_HEAD_DIM = 128  # what the backend is checked at; cuDNN's Hopper limit is higher


@lru_cache(maxsize=None)
def _aten_op() -> SegmentOp | None:
    op = getattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", None)
    if op is None:
        return None

    def run(q4, k4, v4, causal, scale):
        res = op(q4, k4, v4, None, True, 0.0, causal, False, scale=scale)
        return res[0], res[1]
    return run


def eligible(tasks: Sequence[tuple]) -> bool:
    """tasks as the triton backend checks them: [(q (M,Hq,D), [(k, v, causal)], out)].

    CUDA, 16-bit, head dim <= 128, every causal segment square, cuDNN usable in this torch."""
    if not tasks or not torch.backends.cudnn.is_available() or _aten_op() is None:
        return False
    for q, segs, _ in tasks:
        if not q.is_cuda or q.dtype not in _HALF or q.shape[-1] > _MAX_HEAD_DIM:
            return False
        if any(causal and k.shape[0] != q.shape[0] for k, _, causal in segs):
            return False
    return True


def _bhsd(t: torch.Tensor) -> torch.Tensor:
    """(S, H, D) token-major -> a (1, H, S, D) view of the same memory."""
    return t.transpose(0, 1).unsqueeze(0)


def attend(tasks: Sequence[tuple], scale: float, merge: Merge,
           op: SegmentOp | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every (task, non-empty segment) through ``op``, the partials of a task LSE-merged into its out.

    Returns [(out (M, Hq, D) in q's dtype, lse (M, Hq) fp32)] like the generated launch; an out given
    with the task is written in place. ``op`` defaults to aten's cuDNN op (tests pass a CPU one with
    the same layouts)."""
    op = op or _aten_op()
    results = []
    for q, segs, out in tasks:
        M, hq, d = q.shape
        parts, lses = [], []
        for k, v, causal in segs:
            if k.shape[0] == 0 or M == 0:
                continue
            o4, l4 = op(_bhsd(q), _bhsd(k), _bhsd(v), bool(causal), scale)
            parts.append(o4[0].transpose(0, 1))  # (M, Hq, D)
            lses.append(l4.reshape(hq, M).transpose(0, 1))  # (M, Hq)
        if not parts:
            out = torch.zeros_like(q, memory_format=torch.contiguous_format) if out is None else out.zero_()
            results.append((out, torch.full((M, hq), float("-inf"), dtype=torch.float32, device=q.device)))
        elif len(parts) == 1:
            results.append((parts[0] if out is None else out.copy_(parts[0]), lses[0].float().contiguous()))
        else:
            merged, lse = merge(torch.stack(parts), torch.stack(lses).float(), out=out)
            results.append((merged, lse))
    return results
