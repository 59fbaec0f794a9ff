"""Spava attention inside Hugging Face transformers, through the public attention interface.

``install(model)`` registers one function under the name ``"spava"`` in transformers'
``AttentionInterface`` and points the language model's config (``_attn_implementation``) at it;
the vision tower keeps its own implementation. No modeling file is copied or patched: the stock
decoder layers compute q/k/v, apply M-RoPE with the position ids we pass (exact global ids), call
the registered function, then run o_proj and the MLP on the rank's local rows.

The per-call state (which rank's ``RankAttention``, prefill or decode) travels as a keyword
argument, ``spava=SpavaCall(...)``, which transformers forwards from the language model's
``forward(**kwargs)`` to every attention call. Keyword arguments are per call, so W ranks emulated
as threads in one process can share one model.

Because "spava" has no entry in transformers' mask interface, the language model builds no
attention mask at all (no O(N^2) mask for a 100K-token prompt); the plan's tasks define the masks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch

ATTN_NAME = "spava"


class RankAttentionLike(Protocol):
    """What runtime/attention.py's RankAttention offers (one rank's Spava attention + KV cache)."""

    def prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...

    def decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class SpavaCall:
    attention: RankAttentionLike
    phase: str  # "prefill" (the rank's local sequence) or "decode" (new tokens, replicated)

    def __post_init__(self) -> None:
        assert self.phase in ("prefill", "decode"), self.phase


def spava_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                            spava: SpavaCall | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention-interface signature: query (1, Hq, n, D), key/value (1, Hkv, n, D),
    post-RoPE; returns ((1, n, Hq, D), None)."""
    if spava is None:
        raise RuntimeError("the language model uses Spava attention but was called without spava=SpavaCall(...); "
                           "call it through runtime/generate.py or load a separate stock model")
    if query.shape[0] != 1:
        raise RuntimeError(f"Spava attention runs one sequence per rank, got batch {query.shape[0]}")
    head_dim = query.shape[-1]
    if scaling is not None and not math.isclose(scaling, head_dim ** -0.5, rel_tol=1e-6):
        raise RuntimeError(f"Spava attention uses scale 1/sqrt(D) = {head_dim ** -0.5:g}, the model asks {scaling:g}")
    if dropout:
        raise RuntimeError("Spava attention is for inference: attention dropout must be 0")
    q = query[0].transpose(0, 1)  # (n, Hq, D) token-major views, as the backends take them
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    layer = int(module.layer_idx)
    run = spava.attention.prefill if spava.phase == "prefill" else spava.attention.decode
    out = run(layer, q, k, v)
    return out.unsqueeze(0), None


def register() -> None:
    """Register the function in transformers' attention interface (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, spava_attention_forward)


def text_config(model: Any) -> Any:
    """The language model's config (``config.text_config`` in transformers 5)."""
    return getattr(model.config, "text_config", None) or model.config


def install(model: Any) -> Any:
    """Route the language model's attention through Spava; the vision tower is left as it is."""
    register()
    text_config(model)._attn_implementation = ATTN_NAME
    return model


def language_model(model: Any) -> torch.nn.Module:
    """The decoder stack (``model.model.language_model`` in transformers 5, ``model.model`` before)."""
    inner = getattr(model, "model", model)
    return getattr(inner, "language_model", inner)
