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
    kernel with the stock rounding.

Same math in the same precision, so outputs match the stock model to rounding
(tests/test_llm_fused.py on CPU under TRITON_INTERPRET=1; the GPU check in benchmarks/llm_speed.py).
The vision tower is left alone; ``uninstall`` restores transformers' forward functions.
"""
from __future__ import annotations

import types
from typing import Any

import torch

from . import vision_fused as vf


def _decoder(model: Any) -> torch.nn.Module:
    from .hf_attention import language_model

    return language_model(model)


def install(model: Any) -> Any:
    """Fuse the language model's RMSNorms and SiLU-gated MLPs (idempotent); returns the model."""
    lm = _decoder(model)
    if getattr(lm, "_spava_fused", False):
        return model
    for m in lm.modules():
        if vf._is_rms_norm(m):
            m.forward = types.MethodType(vf._norm_forward, m)
        elif vf._is_silu_mlp(m):
            vf._pad_mlp(m)
            m.forward = types.MethodType(vf._mlp_forward, m)
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
                vf._norm_forward, vf._mlp_forward):
            del m.forward
    lm._spava_fused = False
    return model
