"""Fused kernels for the Qwen2.5-VL vision tower: the memory-bound steps between its matmuls.

transformers' ViT runs RMSNorm, the 2-D rotary embedding and the SiLU gate as chains of separate
elementwise kernels in fp32 (``.float()``, ``pow``, ``mean``, ``rsqrt``, ``mul``, ``cat``, casts),
each a full pass over (patches x 1280) or (patches x 3420) tensors: at 64 frames 1440p one rank
holds 74K patches, and these passes are a large share of the tower's time. ``install(model)``
replaces, on the model's vision tower only:

  * every RMSNorm (blocks' norm1/norm2, the merger's ln_q) by one Triton kernel per row block,
  * each block's two residual adds (``x + attn(...)``, ``h + mlp(...)``: stock bf16 add kernels, a
    full read-read-write pass over (patches x 1280) each, 8.3 ms per rank on an H200 profile): the
    first is done by norm2's kernel as it reads its input (``add_rms_norm``), the second by the
    MLP's down GEMM, which takes the residual as its C operand (``addmm_`` in place: added in
    cuBLAS's epilogue) and its bias through one padded intermediate column of exact 1.0s (on an
    H200 at 74K patches: 0.2 ms less per block, ~6 ms per tower),
  * ``apply_rotary_pos_emb_vision`` of the tower's modeling module by one kernel for q and k,
  * the SiLU-gated MLP by one GEMM over the concatenated gate|up weights and one kernel for
    ``silu(gate) * up``, its intermediate size zero-padded to a multiple of 64 so every bf16 row
    is 16-byte aligned (cuBLAS's fast Hopper kernels need it; the weights become views, no copy),
  * the patch embedding's Conv3d (kernel == stride, so a plain matmul) by a linear layer,
  * the window layers' attention (with runtime/vision_attention's batched path installed) by one
    Triton launch over every window (runtime/vision/window.py): no gather/scatter of the windows.

Same math in the same precision (fp32 inside, each result rounded to the input dtype where the stock
code rounds it; the down GEMM adds bias and residual before its one rounding, where the stock
code rounds the projection, then the sum), so outputs match the stock tower to rounding
(tests/test_vision_fused.py, fp32 on CPU under TRITON_INTERPRET=1; benchmarks/vision_speed.py on
the GPU). ``uninstall`` restores it.
"""
from __future__ import annotations

import sys
import types
import weakref
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .tower import vision_module

_ROWS = 4  # rows per program for the row-wise kernels
_ALIGN = 64  # the MLP's intermediate size is padded to a multiple of this (see _pad_mlp)


@triton.jit
def _rms_norm_kernel(x_ptr, d_ptr, s_ptr, w_ptr, y_ptr, n_rows, n_cols, stride_x, stride_d, stride_s, stride_y, eps,
                     HAS_DELTA: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    # int64 row indices: rows x stride passes 2**31 at full-video sizes (594K patches on one GPU)
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]).to(tl.int64)
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    x = tl.load(x_ptr + rows * stride_x + cols, mask=mask, other=0.0)
    if HAS_DELTA:  # the residual add before the norm: stock `residual + hidden` adds in fp32, rounds once
        d = tl.load(d_ptr + rows * stride_d + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + d.to(tl.float32)).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + rows * stride_s + cols, x, mask=mask)  # the stock norm reads the rounded sum
    x = x.to(tl.float32)
    var = tl.sum(x * x, axis=1)[:, None] / n_cols
    y = (x * tl.rsqrt(var + eps)).to(x_ptr.dtype.element_ty)  # stock: hidden.to(input_dtype)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0)
    out = (w.to(tl.float32) * y.to(tl.float32)).to(y_ptr.dtype.element_ty)  # stock: weight * hidden
    tl.store(y_ptr + rows * stride_y + cols, out, mask=mask)


@triton.jit
def _rotate_half_store(x_ptr, o_ptr, s, h, d, c1, c2, s1, s2, n_heads, stride_xs, stride_xh, stride_os, stride_oh,
                       HALF: tl.constexpr):
    """Row s of one (S, H, D) tensor: out = x * cos + rotate_half(x) * sin with rotate_half(x) =
    cat(-x2, x1), in fp32, rounded once to the output dtype."""
    m = (h < n_heads) & (d < HALF)
    x1 = tl.load(x_ptr + s * stride_xs + h * stride_xh + d, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + s * stride_xs + h * stride_xh + HALF + d, mask=m, other=0.0).to(tl.float32)
    out = o_ptr + s * stride_os + h * stride_oh + d
    tl.store(out, (x1 * c1 + (-x2) * s1).to(o_ptr.dtype.element_ty), mask=m)
    tl.store(out + HALF, (x2 * c2 + x1 * s2).to(o_ptr.dtype.element_ty), mask=m)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, n_rows, q_heads, k_heads,
                 stride_qs, stride_qh, stride_ks, stride_kh, stride_cs, stride_qos, stride_qoh, stride_kos, stride_koh,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)  # s x stride passes 2**31 at full-video sizes
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    dm = d < HALF
    c1 = tl.load(cos_ptr + s * stride_cs + d, mask=dm, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + s * stride_cs + HALF + d, mask=dm, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + s * stride_cs + d, mask=dm, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + s * stride_cs + HALF + d, mask=dm, other=0.0).to(tl.float32)
    _rotate_half_store(q_ptr, qo_ptr, s, h, d, c1, c2, s1, s2, q_heads, stride_qs, stride_qh, stride_qos, stride_qoh,
                       HALF=HALF)
    _rotate_half_store(k_ptr, ko_ptr, s, h, d, c1, c2, s1, s2, k_heads, stride_ks, stride_kh, stride_kos, stride_koh,
                       HALF=HALF)


@triton.jit
def _silu_mul_kernel(gu_ptr, y_ptr, n_rows, n_cols, one_col, stride_gu, stride_y,
                     ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]).to(tl.int64)  # int64: see above
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    g = tl.load(gu_ptr + rows * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + rows * stride_gu + n_cols + cols, mask=mask, other=0.0)
    act = (g / (1.0 + tl.exp(-g))).to(y_ptr.dtype.element_ty)  # stock: silu in fp32, rounded
    out = act.to(tl.float32) * u.to(tl.float32)  # then act * up
    out = tl.where(cols == one_col, 1.0, out)  # the padded column that carries the down bias (_pad_mlp)
    tl.store(y_ptr + rows * stride_y + cols, out.to(y_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, last dim) with a unit column stride (a copy only where it has none)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
          ) -> tuple[torch.Tensor | None, torch.Tensor]:
    x2 = _rows(x)
    d2 = x2 if delta is None else _rows(delta)
    s = x2 if delta is None else torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    y = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    n, c = x2.shape
    if n:
        _rms_norm_kernel[(triton.cdiv(n, _ROWS),)](x2, d2, s, weight, y, n, c, x2.stride(0), d2.stride(0), s.stride(0),
                                                  y.stride(0), float(eps), HAS_DELTA=delta is not None,
                                                  ROWS=_ROWS, BLOCK=triton.next_power_of_2(c), num_warps=4)
    return (None if delta is None else s.reshape(x.shape)), y.reshape(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen's RMSNorm: weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), fp32 inside."""
    return _norm(x, None, weight, eps)[1]


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, rms_norm(s)) with s = x + delta, in one pass: the residual add a Qwen block runs before
    its second norm, which the stock code runs as a separate kernel (one more read of x and delta
    and write of s). s is rounded to x's dtype as torch's add rounds it (fp32 add, one rounding)."""
    if delta.shape != x.shape or delta.dtype != x.dtype:
        s = x + delta  # broadcasting or type promotion: torch's own rules
        return s, rms_norm(s, weight, eps)
    s, y = _norm(x, delta, weight, eps)
    return s, y


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, head_major: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """q * cos + rotate_half(q) * sin (and the same for k) in one launch, fp32 inside, rounded once:
    q (S, Hq, D), k (S, Hk, D) with any row / head strides (last dim contiguous), cos / sin (S, D).
    Returns (S, Hq, D) and (S, Hk, D) views in q's dtype, stored token-major (contiguous) or, with
    ``head_major``, as contiguous (H, S, D) (the language model's own q / k layout)."""
    cos, sin = cos.contiguous(), sin.contiguous()
    S, Hq, D = q.shape
    Hk = k.shape[1]
    if head_major:
        qo = torch.empty((Hq, S, D), dtype=q.dtype, device=q.device).transpose(0, 1)
        ko = torch.empty((Hk, S, D), dtype=k.dtype, device=k.device).transpose(0, 1)
    else:
        qo = torch.empty((S, Hq, D), dtype=q.dtype, device=q.device)
        ko = torch.empty((S, Hk, D), dtype=k.dtype, device=k.device)
    if S:
        _rope_kernel[(S,)](q, k, cos, sin, qo, ko, S, Hq, Hk, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                           cos.stride(0), qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1), HALF=D // 2,
                           BLOCK_H=triton.next_power_of_2(max(Hq, Hk)), BLOCK_D=triton.next_power_of_2(D // 2),
                           num_warps=4)
    return qo, ko


def rotary_vision(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``apply_rotary_pos_emb_vision`` for (S, H, D) q and k (any row/head strides) and (S, D) cos/sin."""
    if q.dim() != 3 or k.shape != q.shape or cos.shape != (q.shape[0], q.shape[2]) or sin.shape != cos.shape \
            or q.stride(-1) != 1 or k.stride(-1) != 1 or q.shape[-1] % 2:
        return _rotary_torch(q, k, cos, sin)  # a layout this kernel was not written for
    return rotary(q, k, cos, sin)


def silu_mul(gu: torch.Tensor, one_col: int = -1) -> torch.Tensor:
    """silu(gu[..., :I]) * gu[..., I:] with the stock rounding (silu rounded, then the product);
    column ``one_col`` (a zero-padded one, if >= 0) set to exactly 1.0 instead."""
    shape = gu.shape
    g2 = _rows(gu)
    n, c2 = g2.shape
    c = c2 // 2
    y = torch.empty((n, c), dtype=gu.dtype, device=gu.device)
    if n:
        block = 1024
        _silu_mul_kernel[(triton.cdiv(n, _ROWS), triton.cdiv(c, block))](g2, y, n, c, int(one_col), g2.stride(0),
                                                                        y.stride(0), ROWS=_ROWS, BLOCK=block,
                                                                        num_warps=4)
    return y.reshape(*shape[:-1], c)


# --- installing on a model -------------------------------------------------------------------------

_STOCK_ROPE: dict[str, Any] = {}  # modeling module name -> its own apply_rotary_pos_emb_vision
_INSTALLED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()  # towers with the fused kernels


def _rotary_torch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' apply_rotary_pos_emb_vision, in torch (fp32 inside)."""
    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    c, s = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    qf, kf = q.float(), k.float()
    return (qf * c + rotate_half(qf) * s).to(q.dtype), (kf * c + rotate_half(kf) * s).to(k.dtype)


def _norm_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self: torch.nn.Module, hidden_state: torch.Tensor, residual: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) + bias (+ residual): the bias rides in the padded column that
    silu_mul sets to 1.0 (_pad_mlp), the residual in the down GEMM's C operand (cuBLAS adds it in
    its epilogue, where the stock code runs a separate add kernel over tokens x hidden).
    ``residual`` is overwritten with the result (the callers pass a sum they own): torch's
    out-of-place addmm would first copy it into a new output, a pass as long as the add saved."""
    gated = silu_mul(F.linear(hidden_state, self._spava_gate_up_w, self._spava_gate_up_b), self._spava_one_col)
    if residual is None:
        return F.linear(gated, self._spava_down_w)
    if residual.dtype != gated.dtype or residual.shape[-1] != self._spava_down_w.shape[0]:
        return residual + F.linear(gated, self._spava_down_w)  # torch's promotion / broadcasting rules
    out = _rows(residual)  # a view of residual (a copy only for a layout without unit column stride)
    out.addmm_(gated.reshape(-1, gated.shape[-1]), self._spava_down_w.t())
    return out.reshape(residual.shape)


def _vision_block_forward(self: torch.nn.Module, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                          position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                          **kwargs: Any) -> torch.Tensor:
    """transformers' Qwen2.5-VL vision block with its two residual adds fused away: the first into
    norm2 (add_rms_norm), the second into the MLP's down GEMM."""
    attn = self.attn(self.norm1(hidden_states), cu_seqlens=cu_seqlens, position_embeddings=position_embeddings,
                     **kwargs)
    h, normed = add_rms_norm(hidden_states, attn, self.norm2.weight, self.norm2.variance_epsilon)
    return self.mlp(normed, residual=h)


def _patch_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    w = self.proj.weight  # (embed, C, T, P, P): with kernel == stride each patch is one dot product per channel
    x = hidden_states.reshape(-1, w[0].numel()).to(w.dtype)
    return F.linear(x, w.reshape(w.shape[0], -1), self.proj.bias)


def _is_rms_norm(m: torch.nn.Module) -> bool:
    return type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon") and hasattr(m, "weight")


def _is_silu_mlp(m: torch.nn.Module) -> bool:
    act = getattr(m, "act_fn", None)
    silu = isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"  # transformers' own class
    return all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj")) and silu


def _is_patch_conv(m: torch.nn.Module) -> bool:
    conv = getattr(m, "proj", None)
    return (type(m).__name__.endswith("PatchEmbed") and isinstance(conv, torch.nn.Conv3d)
            and conv.kernel_size == conv.stride and conv.padding == (0, 0, 0) and conv.groups == 1)


def _has_fused_mlp(m: torch.nn.Module) -> bool:
    fwd = m.__dict__.get("forward")
    return getattr(fwd, "__func__", None) is _mlp_forward


def _is_fusable_block(blk: torch.nn.Module) -> bool:
    """A Qwen2.5-VL-style pre-norm block: RMSNorm norm1 / norm2, attn, and the fused SiLU MLP
    (Qwen2-VL's LayerNorm / GELU block is not)."""
    return (hasattr(blk, "attn") and _is_rms_norm(getattr(blk, "norm1", None))
            and _is_rms_norm(getattr(blk, "norm2", None)) and _has_fused_mlp(getattr(blk, "mlp", blk)))


def _pad_mlp(mlp: torch.nn.Module) -> None:
    """Give the MLP one (2 Ip, hidden) gate|up weight and a (hidden, Ip) down weight, Ip = the
    intermediate size rounded up to _ALIGN with zero rows / columns, and make gate_proj's, up_proj's
    and down_proj's own weights views into them (no second copy). Why: Qwen2.5-VL's 3420 is not a
    multiple of 8, so a bf16 row of it is not 16-byte aligned and cuBLAS falls back to slow sm80
    kernels for the down projection (3x slower on an H200). The zero padding adds exact zeros.

    A down bias goes into the first padded column of the down weight, against which silu_mul writes
    exactly 1.0 (``_spava_one_col``): the down GEMM then adds the bias itself, so that GEMM plus a
    residual in its C operand is the whole ``residual + mlp(x)``. With no spare column (I already a
    multiple of _ALIGN) one more block is padded. down_proj.weight views the first I columns only,
    so its values (and the stock forward) stay transformers' own."""
    g, u, d = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    n, hidden = g.out_features, g.in_features
    n_pad = -(-(n + (d.bias is not None)) // _ALIGN) * _ALIGN
    w = g.weight.new_zeros((2 * n_pad, hidden))
    w[:n], w[n_pad:n_pad + n] = g.weight.detach(), u.weight.detach()
    g.weight.data, u.weight.data = w[:n], w[n_pad:n_pad + n]
    b = None
    if g.bias is not None or u.bias is not None:
        b = w.new_zeros(2 * n_pad)
        for lin, at in ((g, 0), (u, n_pad)):
            if lin.bias is not None:
                b[at:at + n] = lin.bias.detach()
                lin.bias.data = b[at:at + n]
    dw = d.weight.new_zeros((d.out_features, n_pad))
    dw[:, :n] = d.weight.detach()
    d.weight.data = dw[:, :n]
    if d.bias is not None:
        dw[:, n] = d.bias.detach()
    mlp._spava_one_col = n if d.bias is not None else -1
    mlp._spava_gate_up_w, mlp._spava_gate_up_b, mlp._spava_down_w = w, b, dw


def install(model: Any) -> Any:
    """Fuse the vision tower's elementwise steps (idempotent); returns the model. The language model
    is left alone."""
    if getattr(model.config, "model_type", None) == "internvl":
        return model  # InternViT (LayerNorm, GELU MLP) has none of the Qwen ViT steps fused here
    visual = vision_module(model)
    if getattr(visual, "_spava_fused", False):
        return model
    for m in visual.modules():
        if _is_rms_norm(m):
            m.forward = types.MethodType(_norm_forward, m)
        elif _is_silu_mlp(m):
            _pad_mlp(m)
            m.forward = types.MethodType(_mlp_forward, m)
        elif _is_patch_conv(m):
            m.forward = types.MethodType(_patch_forward, m)
    blocks = getattr(visual, "blocks", None)
    for blk in blocks or ():
        if hasattr(blk, "attn"):
            blk.attn._spava_window_kernel = True
        if _is_fusable_block(blk):
            blk.forward = types.MethodType(_vision_block_forward, blk)
    if blocks:
        mod = sys.modules[type(blocks[0].attn).__module__]
        if hasattr(mod, "apply_rotary_pos_emb_vision"):
            if mod.apply_rotary_pos_emb_vision is not rotary_vision:
                _STOCK_ROPE[mod.__name__] = mod.apply_rotary_pos_emb_vision
            mod.apply_rotary_pos_emb_vision = rotary_vision
            visual._spava_rope_module = mod
    visual._spava_fused = True
    _INSTALLED.add(visual)
    return model


def uninstall(model: Any) -> Any:
    """Back to transformers' own forward functions (the weights stay views into the padded storage:
    same values)."""
    visual = vision_module(model)
    if not getattr(visual, "_spava_fused", False):
        return model
    for m in visual.modules():
        if "forward" in m.__dict__ and getattr(m.__dict__["forward"], "__func__", None) in (
                _norm_forward, _mlp_forward, _patch_forward, _vision_block_forward):
            del m.forward
    for blk in getattr(visual, "blocks", None) or ():
        if hasattr(blk, "attn"):
            blk.attn.__dict__.pop("_spava_window_kernel", None)
    _INSTALLED.discard(visual)
    visual._spava_fused = False
    mod = getattr(visual, "_spava_rope_module", None)
    still_used = any(getattr(m, "_spava_rope_module", None) is mod for m in _INSTALLED)  # another fused tower
    if mod is not None and mod.__name__ in _STOCK_ROPE and not still_used:
        mod.apply_rotary_pos_emb_vision = _STOCK_ROPE.pop(mod.__name__)
    return model
