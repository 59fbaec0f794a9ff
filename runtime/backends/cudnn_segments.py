"""cuDNN attention with the log-sum-exp, then the LSE merge: a candidate the triton backend's tuner
times against the generated launch kernel, launch by launch, and keeps where it is faster.

Why: on an H200 the generated fused kernel ran Spava's busiest rank at 495 TFLOP/s (3B) where
cuDNN on the same segments ran at 556; one cuDNN call per (task, segment) with its log-sum-exp,
then our merge, was 6.5% (3B) to 8.4% (7B) faster than the fused launch
(benchmarks/results/2026-12-03-h200-kernels-cudnn-lse.json). Which one wins depends on the launch
(several small tasks in one launch favour the fused kernel), so the tuner decides per launch.

The public SDPA returns no LSE, so this calls aten's cuDNN op directly, which does:
``_scaled_dot_product_cudnn_attention(q, k, v, bias, compute_log_sumexp, dropout_p, is_causal,
return_debug_mask, scale=)`` on (B, H, S, D) views, K/V with fewer heads (GQA) read in place,
returning out (B, Hq, M, D) and lse (B, Hq, M[, 1]) in natural log.

Fewer, longer calls: a task's full-mask segments (the passing selections, the anchor, earlier
blocks) are joined into one K/V buffer (a copy of K/V only: with GQA a few MB, against a query
partial of tens of MB per extra call, written, stacked and merged), so a Spava host task is two
calls, the joined keys and its own causal block, and two partials are merged where they lie.
Where the op's causal mask is bottom-right aligned for n > M (probed once per device: which
alignment it uses is cuDNN's and torch's choice, not a documented contract), the causal block is
joined too and the task is one call with no merge. Where it is top-left aligned, ours
(runtime/backends/base.py) agrees with it only on a square segment (n == M), which is what Spava's
own-block segments are, and a launch with a non-square causal segment stays on the generated kernel.

Fewer calls again where two tasks of a launch are one square causal block (square_pair): Spava's
anchor (a causal block over its own keys) and rank 0's first host block right after it (the anchor's
keys in full, its own causally) together are rows [0, a + B) against keys [0, a + B) under one
causal mask, whichever way the op aligns it; with rows, keys and outs adjacent in memory (they are
slices of one rank's buffers) that is one call with no merge instead of three calls and a merge.
A ZigZagRing rank's first step (its two blocks over their own keys) has the same shape.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable, Sequence

import torch

from .triton_kernels import merge_parts

CUDNN = ("cudnn",)  # the tuner's config for this path (generated configs are integer tuples)

SegmentOp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, float], tuple]
_HALF = (torch.bfloat16, torch.float16)
_MAX_HEAD_DIM = 128  # what the backend is checked at; cuDNN's Hopper limit is higher
_BOTTOM_RIGHT: dict[tuple[str, torch.dtype], bool] = {}  # aten's op, per (device, dtype): probed once


@lru_cache(maxsize=None)
def _aten_op() -> SegmentOp | None:
    op = getattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", None)
    if op is None:
        return None

    def run(q4, k4, v4, causal, scale):
        res = op(q4, k4, v4, None, True, 0.0, causal, False, scale=scale)
        return res[0], res[1]
    return run


def aligns_bottom_right(op: SegmentOp, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``op``'s causal mask is bottom-right aligned when there are more keys than rows
    (row i sees key j iff j <= i + n - M): one small call against both alignments in fp32."""
    gen = torch.Generator().manual_seed(0)
    M, n, d = 16, 48, 64
    q, k, v = (torch.randn(1, 1, s, d, generator=gen) for s in (M, n, n))
    try:
        got = op(q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), True, 1 / math.sqrt(d))[0]
    except Exception:  # noqa: BLE001 - an op that refuses M < n causal has no alignment to use
        return False
    s = (q @ k.transpose(-1, -2))[0, 0] / math.sqrt(d)
    right = torch.arange(n)[None, :] <= torch.arange(M)[:, None] + (n - M)
    want = torch.softmax(s.masked_fill(~right, -math.inf), -1) @ v[0, 0]
    return bool((got[0, 0].float().cpu() - want).norm() <= 2e-2 * want.norm())


def _bottom_right(op: SegmentOp, device: torch.device, dtype: torch.dtype) -> bool:
    if op is not _aten_op() or device.type != "cuda":
        return aligns_bottom_right(op, device, dtype)  # a test's op: tiny, probed each time
    key = (str(device), dtype)
    if key not in _BOTTOM_RIGHT:
        if torch.cuda.is_current_stream_capturing():
            return False  # no probing inside a CUDA graph capture; top-left is the safe assumption
        _BOTTOM_RIGHT[key] = aligns_bottom_right(op, device, dtype)
    return _BOTTOM_RIGHT[key]


def eligible(tasks: Sequence[tuple]) -> bool:
    """tasks as the triton backend checks them: [(q (M,Hq,D), [(k, v, causal)], out)].

    CUDA, 16-bit, head dim <= 128, cuDNN usable in this torch, and every causal segment square
    unless the op's causal mask is bottom-right aligned."""
    op = _aten_op()
    if not tasks or not torch.backends.cudnn.is_available() or op is None:
        return False
    for q, segs, _ in tasks:
        if not q.is_cuda or q.dtype not in _HALF or q.shape[-1] > _MAX_HEAD_DIM:
            return False
        if any(causal and k.shape[0] != q.shape[0] for k, _, causal in segs) and \
                not _bottom_right(op, q.device, q.dtype):
            return False
    return True


def _bhsd(t: torch.Tensor) -> torch.Tensor:
    """(S, H, D) token-major -> a (1, H, S, D) view of the same memory."""
    return t.transpose(0, 1).unsqueeze(0)


def _joined(kvs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Segments' K and V as one buffer each: a view where they already lie one after another (a
    ring step's blocks of one owner), else a copy."""
    if len(kvs) == 1:
        return kvs[0]
    if all(_after(a[0], b[0]) and _after(a[1], b[1]) for a, b in zip(kvs, kvs[1:])):
        rows = sum(k.shape[0] for k, _ in kvs)
        return _rows(kvs[0][0], rows), _rows(kvs[0][1], rows)
    return torch.cat([k for k, _ in kvs]), torch.cat([v for _, v in kvs])


def calls(segs: Sequence[tuple], bottom_right: bool, join: bool = True) -> list[tuple]:
    """One task's non-empty segments [(k, v, causal)] as the op's calls [(k, v, causal)]: the full
    ones joined, then the causal one joined to them too where the op aligns bottom-right (softmax
    does not care about key order; a bottom-right mask sees every key before the last n_c).
    join=False: one call per segment (the candidate's first form, kept to measure against)."""
    live = [s for s in segs if s[0].shape[0] > 0]
    if not join:
        return live
    full = [(k, v) for k, v, causal in live if not causal]
    causal = [(k, v) for k, v, c in live if c]
    if bottom_right and len(causal) == 1:
        return [(*_joined(full + causal), True)]
    return ([(*_joined(full), False)] if full else []) + [(k, v, True) for k, v in causal]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same view: same memory, shape and strides."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


def _after(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``b`` starts where ``a`` ends in the same storage, rows of the same layout, so that the
    two are one view (_span)."""
    return (a.shape[0] > 0 and b.shape[0] > 0 and a.dtype == b.dtype and a.device == b.device
            and a.shape[1:] == b.shape[1:] and a.stride() == b.stride()
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and b.data_ptr() == a.data_ptr() + a.shape[0] * a.stride(0) * a.element_size())


def _rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """The view of ``rows`` rows starting at ``t``'s first, in its layout (the rows past t's own
    must be views that _after() found right behind it)."""
    return t.as_strided((rows, *t.shape[1:]), t.stride())


def _span(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` then ``b`` as one view (only where _after(a, b))."""
    return _rows(a, a.shape[0] + b.shape[0])


def square_pair(first: tuple, second: tuple) -> bool:
    """Whether two tasks (q, [(k, v, causal)], out) are one square causal block: ``first`` has one
    live segment, causal over as many keys as it has rows; ``second`` sees exactly those keys in
    full and one square causal segment of its own; and rows, keys, values and outs of ``second``
    follow ``first``'s in memory (outs: both given, or neither). Then row i of [q1; q2] against
    keys [k1; k2] under one causal mask sees what each task sees, and the two are one call."""
    (q1, segs1, o1), (q2, segs2, o2) = first, second
    live1 = [s for s in segs1 if s[0].shape[0] > 0]
    live2 = [s for s in segs2 if s[0].shape[0] > 0]
    if len(live1) != 1 or not live1[0][2] or live1[0][0].shape[0] != q1.shape[0] or len(live2) != 2:
        return False
    k1, v1, _ = live1[0]
    full = [s for s in live2 if not s[2]]
    own = [s for s in live2 if s[2]]
    if len(full) != 1 or len(own) != 1:
        return False
    (kf, vf, _), (k2, v2, _) = full[0], own[0]
    if not (_same(kf, k1) and _same(vf, v1)) or k2.shape[0] != q2.shape[0]:
        return False
    if not (_after(q1, q2) and _after(k1, k2) and _after(v1, v2)):
        return False
    return (o1 is None and o2 is None) or (o1 is not None and o2 is not None and _after(o1, o2))


def _pairs(tasks: Sequence[tuple]) -> dict[int, int]:
    """{index of a pair's first task: index of its second} over the launch's tasks (square_pair)."""
    pairs, used = {}, set()
    for i, a in enumerate(tasks):
        for j, b in enumerate(tasks):
            if i != j and not {i, j} & used and square_pair(a, b):
                pairs[i] = j
                used |= {i, j}
    return pairs


def _one_call(op: SegmentOp, q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One op call on token-major views: (out (M, Hq, D), lse (M, Hq)) as the op left them."""
    M, hq, _ = q.shape
    o4, l4 = op(_bhsd(q), _bhsd(k), _bhsd(v), bool(causal), scale)
    return o4[0].transpose(0, 1), l4.reshape(hq, M).transpose(0, 1)


def attend(tasks: Sequence[tuple], scale: float, op: SegmentOp | None = None, *,
           join: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each task's calls (see calls()) through ``op``, the partials LSE-merged into the task's out;
    with join, a square pair of tasks (square_pair) is one call.

    Returns [(out (M, Hq, D) in q's dtype, lse (M, Hq) fp32)] like the generated launch; an out given
    with the task is written in place. ``op`` defaults to aten's cuDNN op (tests pass a CPU one with
    the same layouts)."""
    op = op or _aten_op()
    results: list = [None] * len(tasks)
    pairs = _pairs(tasks) if join else {}
    for i, j in pairs.items():
        (q1, segs1, o1), (q2, segs2, o2) = tasks[i], tasks[j]
        k1, v1, _ = next(s for s in segs1 if s[0].shape[0] > 0)
        k2, v2, _ = next(s for s in segs2 if s[0].shape[0] > 0 and s[2])
        part, lse = _one_call(op, _span(q1, q2), _span(k1, k2), _span(v1, v2), True, scale)
        out, lse = merge_parts([part], [lse], out=_span(o1, o2) if o1 is not None else None)
        m = q1.shape[0]
        results[i], results[j] = (out[:m], lse[:m]), (out[m:], lse[m:])
    for n, (q, segs, out) in enumerate(tasks):
        if results[n] is not None:
            continue
        M, hq, d = q.shape
        todo = calls(segs, join and _bottom_right(op, q.device, q.dtype), join) if M else []
        parts, lses = [], []
        for k, v, causal in todo:
            part, lse = _one_call(op, q, k, v, causal, scale)
            parts.append(part)
            lses.append(lse)
        if not parts:
            out = torch.zeros_like(q, memory_format=torch.contiguous_format) if out is None else out.zero_()
            results[n] = (out, torch.full((M, hq), float("-inf"), dtype=torch.float32, device=q.device))
        else:
            results[n] = merge_parts(parts, lses, out=out)
    return results
