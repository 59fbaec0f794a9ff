"""Fused kernels for the language model's memory-bound steps (the ViT's own are runtime/vision_fused).

transformers' Qwen2 decoder runs every RMSNorm as a chain of fp32 elementwise kernels (cast, pow,
mean, rsqrt, mul, cast, mul) and the MLP as two GEMMs (gate, up) plus two elementwise passes (SiLU,
product) over (tokens x intermediate) tensors. At 64 frames 1440p an emulated rank holds ~21K
tokens (its rows plus the anchor): two norms per layer x 36 layers of (21K x 2048) fp32 passes and
(21K x 11008) gate/up passes. ``install(model)`` replaces, on the language model only:

  * every RMSNorm (input / post-attention norms, the final norm) by runtime/vision_fused's one-pass
    Triton kernel (the same Qwen RMSNorm math and rounding),
  * the SiLU-gated MLP by one GEMM over the concatenated gate|up weights (views, no second copy;
    zero-padded to a multiple of 64 where the intermediate size is not) and one ``silu(gate) * up``
    kernel with the stock rounding,
  * each decoder layer's two residual adds (stock bf16 add kernels, a full pass over (tokens x
    hidden) each, ~9.6 ms of a rank's prefill on an H200 profile): the first is done by the
    post-attention norm's kernel as it reads its input (runtime/vision_fused's ``add_rms_norm``),
    the second by the MLP's down GEMM with the residual as its C operand (``addmm_``, added in
    cuBLAS's epilogue; rounded once with the projection where the stock code rounds twice): on an
    H200 at 21K tokens 0.08 ms less per layer, ~3 ms per prefill. The layer forward passes every
    keyword to the attention untouched, so prefill, decode steps and both transformers releases'
    cache keyword (``past_key_values`` / ``cache``) go through it,
  * the rotary embedding of q and k (``apply_rotary_pos_emb`` of the attention's modeling module:
    M-RoPE for Qwen2-VL / Qwen2.5-VL, 1-D for InternVL3's Qwen2) by one kernel: the stock code runs
    q * cos, a cat for rotate_half, a negation, a second product and a sum over (heads x tokens x
    128) tensors per layer (about 25 ms of a 21K-token rank's prefill on an H200); the kernel
    computes in fp32 and rounds once where the stock bf16 code rounds q * cos, rotate_half(q) * sin
    and their sum separately (on an H200, random bf16 inputs: a third of the elements differ in
    their last bit, relative L2 2.8e-3).

Same math in the same precision, so outputs match the stock model to rounding
(tests/test_llm_fused.py on CPU under TRITON_INTERPRET=1; on the GPU benchmarks/profile_rank.py
compares the fused rotary with the stock function).
The vision tower is left alone; ``uninstall`` restores transformers' forward functions.
"""
from __future__ import annotations

import inspect
import sys
import types
from typing import Any, Callable

import torch

from .vision import fused as vf
from .hf.attention import language_model

# The names the stock attention forwards call their rotary function by (transformers 5.x): the
# decoder attention looks it up in its modeling module's globals at every call, so replacing the
# module attribute reroutes it. Older releases passed M-RoPE sections per call
# (apply_multimodal_rotary_pos_emb); their attention keeps the stock function.
_ROTARY_NAME = "apply_rotary_pos_emb"
_STOCK_ROTARY: dict[str, Callable[..., Any]] = {}  # modeling module name -> its own function
_ROTARY_USERS: dict[str, int] = {}  # modeling module name -> language models installed over it
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # fp64 (CPU references) keeps the stock code


def _fused_rotary(stock: Callable[..., Any]) -> Callable[..., Any]:
    def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                             unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """q (1, Hq, S, D), k (1, Hk, S, D), cos / sin (1, S, D) -> contiguous (1, H, S, D) like the
        stock function's (fp32 inside, rounded once: see the module docstring)."""
        n, d = q.shape[-2:] if q.dim() == 4 else (-1, -1)
        if (unsqueeze_dim != 1 or q.dim() != 4 or k.dim() != 4 or q.shape[0] != 1 or k.shape[0] != 1
                or k.shape[2:] != q.shape[2:] or tuple(cos.shape) != (1, n, d) or sin.shape != cos.shape
                or d % 2 or q.stride(-1) != 1 or k.stride(-1) != 1 or q.dtype not in _KERNEL_DTYPES
                or not (q.dtype == k.dtype == cos.dtype == sin.dtype)):
            return stock(q, k, cos, sin, unsqueeze_dim)  # a layout the kernel was not written for
        qo, ko = vf.rotary(q[0].transpose(0, 1), k[0].transpose(0, 1), cos[0], sin[0], head_major=True)
        return qo.transpose(0, 1).unsqueeze(0), ko.transpose(0, 1).unsqueeze(0)  # contiguous (1, H, S, D)

    apply_rotary_pos_emb._spava_fused = True  # type: ignore[attr-defined]
    return apply_rotary_pos_emb


def _rotary_module(lm: torch.nn.Module) -> Any:
    """The modeling module whose ``apply_rotary_pos_emb`` the decoder attention calls, or None."""
    attn = next((m for m in lm.modules() if hasattr(m, "q_proj") and hasattr(m, "k_proj")), None)
    if attn is None:
        return None
    mod = sys.modules[type(attn).__module__]
    uses = _ROTARY_NAME in inspect.unwrap(type(attn).forward).__code__.co_names
    return mod if uses and callable(getattr(mod, _ROTARY_NAME, None)) else None


def _decoder_layer_forward(self: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any
                           ) -> torch.Tensor:
    """transformers' Qwen2 / Qwen2-VL / Qwen2.5-VL decoder layer with its two residual adds fused
    away: the first into the post-attention norm (add_rms_norm), the second into the MLP's down
    GEMM. Every keyword goes to self_attn as the stock forward passes it, whatever this release
    calls the cache (``past_key_values`` in 5.17, ``cache`` in 5.25): the stock layer passes its
    attention the same names it takes."""
    if args:  # a positional call: only the stock forward knows this release's order
        return type(self).forward(self, hidden_states, *args, **kwargs)
    for name in ("attention_mask", "position_ids", "position_embeddings"):
        kwargs.setdefault(name, None)  # the stock layer always passes these (Qwen2Attention requires two)
    attn, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
    norm = self.post_attention_layernorm
    h, normed = vf.add_rms_norm(hidden_states, attn, norm.weight, norm.variance_epsilon)
    return self.mlp(normed, residual=h)


def _is_fusable_layer(layer: torch.nn.Module) -> bool:
    """A pre-norm decoder layer (input_layernorm, self_attn, post_attention_layernorm, mlp) whose
    norms are RMSNorms and whose MLP has the fused forward."""
    return (type(layer).__name__.endswith("DecoderLayer") and hasattr(layer, "self_attn")
            and vf._is_rms_norm(getattr(layer, "input_layernorm", None))
            and vf._is_rms_norm(getattr(layer, "post_attention_layernorm", None))
            and vf._has_fused_mlp(getattr(layer, "mlp", layer)))


def _decoder(model: Any) -> torch.nn.Module:
    return language_model(model)


def install(model: Any) -> Any:
    """Fuse the language model's RMSNorms, SiLU-gated MLPs and rotary embedding (idempotent);
    returns the model."""
    lm = _decoder(model)
    if getattr(lm, "_spava_fused", False):
        return model
    for m in lm.modules():
        if vf._is_rms_norm(m):
            m.forward = types.MethodType(vf._norm_forward, m)
        elif vf._is_silu_mlp(m):
            vf._pad_mlp(m)
            m.forward = types.MethodType(vf._mlp_forward, m)
    for layer in getattr(lm, "layers", ()):
        if _is_fusable_layer(layer):
            layer.forward = types.MethodType(_decoder_layer_forward, layer)
    mod = _rotary_module(lm)
    if mod is not None:
        stock = getattr(mod, _ROTARY_NAME)
        if not getattr(stock, "_spava_fused", False):
            _STOCK_ROTARY[mod.__name__] = stock
            setattr(mod, _ROTARY_NAME, _fused_rotary(stock))
        _ROTARY_USERS[mod.__name__] = _ROTARY_USERS.get(mod.__name__, 0) + 1
        lm._spava_rotary_module = mod.__name__
    lm._spava_fused = True
    return model


def uninstall(model: Any) -> Any:
    """Back to transformers' own forward functions (the weights stay views into the concatenated
    storage: same values)."""
    lm = _decoder(model)
    if not getattr(lm, "_spava_fused", False):
        return model
    for m in lm.modules():
        if "forward" in m.__dict__ and getattr(m.__dict__["forward"], "__func__", None) in (
                vf._norm_forward, vf._mlp_forward, _decoder_layer_forward):
            del m.forward
    name = lm.__dict__.pop("_spava_rotary_module", None)
    if name is not None:
        _ROTARY_USERS[name] -= 1
        if not _ROTARY_USERS[name]:  # no other fused language model uses this modeling module
            del _ROTARY_USERS[name]
            setattr(sys.modules[name], _ROTARY_NAME, _STOCK_ROTARY.pop(name))
    lm._spava_fused = False
    return model
