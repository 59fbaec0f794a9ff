"""runtime/llm_fused.py: the tiny Qwen2.5-VL language model with the fused RMSNorm and gate|up MLP
against transformers' own code on fresh random inputs (fp32: same math, so only summation order and
FMA contraction differ). Without CUDA the kernels run under TRITON_INTERPRET=1 (tests/conftest.py)."""
from __future__ import annotations

import inspect

import pytest
import torch

pytest.importorskip("transformers")

from spava_plan.runtime.hf import model as hf_model
from spava_plan.runtime import llm_fused  # noqa: E402
from spava_plan.runtime.hf.attention import language_model  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FP32_ROUNDING = 1e-5  # fp32 over 2 decoder layers, summation order only (seen ~1e-7)


FAMILIES = {"qwen2_5_vl": ["model=tiny", "model.family=qwen2_5_vl", "model.name=tiny_25", "model.tokens_per_second=2"],
            "qwen2_vl": ["model=tiny"], "internvl3": ["model=tiny_internvl3"]}


def _tiny_model(family: str = "qwen2_5_vl"):
    from spava_plan.plan import ModelSpec
    from spava_plan.hydra_conf import compose_config

    cfg = ModelSpec.from_config(compose_config(FAMILIES[family]).model)
    return hf_model.random_model(cfg, dtype=torch.float32, device=DEV, seed=3)


def _positions(family: str, start: int, n: int) -> torch.Tensor:
    pos = torch.arange(start, start + n, device=DEV).view(1, -1)
    return pos if family == "internvl3" else pos.view(1, 1, -1).expand(3, 1, -1)  # InternVL: 1-D, Qwen: M-RoPE


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fused_language_model_matches_stock_and_uninstalls(family, monkeypatch):
    """Prefill (37 tokens), a one-token call (the runtime's decode step) and a decode step over a KV
    cache (the cache keyword passed through the fused layer forward as this release names it)."""
    from transformers import DynamicCache

    model = _tiny_model(family)
    lm = language_model(model)
    hidden = lm.config.hidden_size
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 37, hidden, generator=g).to(DEV)
    x1 = torch.randn(1, 1, hidden, generator=g).to(DEV)
    cache_kw = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"

    def run() -> list[torch.Tensor]:
        with torch.inference_mode():
            prefill = lm(inputs_embeds=x, position_ids=_positions(family, 0, 37), use_cache=False).last_hidden_state
            one = lm(inputs_embeds=x1, position_ids=_positions(family, 37, 1), use_cache=False).last_hidden_state
            cache = DynamicCache()
            lm(inputs_embeds=x, position_ids=_positions(family, 0, 37), use_cache=True, **{cache_kw: cache})
            step = lm(inputs_embeds=x1, position_ids=_positions(family, 37, 1), use_cache=True,
                      **{cache_kw: cache}).last_hidden_state
        return [prefill, one, step]

    stock = run()
    llm_fused.install(model)
    llm_fused.install(model)  # idempotent
    layers = list(lm.layers)
    mlp = layers[0].mlp
    calls = []
    add_rms_norm = llm_fused.vf.add_rms_norm
    monkeypatch.setattr(llm_fused.vf, "add_rms_norm", lambda *a: calls.append(1) or add_rms_norm(*a))
    try:  # uninstalled whatever happens: the rotary module is shared with the other tests
        assert "forward" in mlp.__dict__ and "forward" in layers[0].input_layernorm.__dict__
        assert "forward" in lm.norm.__dict__
        assert mlp.gate_proj.weight.data_ptr() == mlp._spava_gate_up_w.data_ptr()  # views, no second copy
        assert all(layer.forward.__func__ is llm_fused._decoder_layer_forward for layer in layers)
        fused = run()
    finally:
        llm_fused.uninstall(model)
    assert len(calls) == 4 * len(layers)  # every layer of the 4 calls ran the fused forward
    for got, want in zip(fused, stock):
        assert _rel(got, want) <= FP32_ROUNDING and not torch.equal(got, torch.zeros_like(got))
    assert "forward" not in mlp.__dict__ and not any("forward" in layer.__dict__ for layer in layers)
    for got, want in zip(run(), stock):
        assert _rel(got, want) <= FP32_ROUNDING
    assert len(calls) == 4 * len(layers)  # the stock forwards again


def test_fused_layer_falls_back_on_positional_arguments():
    """The fused forward takes keywords only: a positional call goes to the stock forward."""
    model = _tiny_model()
    lm = language_model(model)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(1, 11, lm.config.hidden_size, generator=g).to(DEV)
    pos = _positions("qwen2_5_vl", 0, 11)
    layer = lm.layers[0]
    llm_fused.install(model)
    try:
        with torch.inference_mode():
            pe = lm.rotary_emb(x, pos)
            fused = layer(x, position_embeddings=pe, position_ids=pos)
            stock = type(layer).forward(layer, x, position_embeddings=pe, position_ids=pos)
            positional = layer(x, None, pos, position_embeddings=pe)  # attention_mask, position_ids by position
    finally:
        llm_fused.uninstall(model)
    assert _rel(fused, stock) <= FP32_ROUNDING and torch.equal(positional, stock)  # same code, same process


def test_fused_layers_under_the_runtime_chunking(monkeypatch):
    """runtime/chunking wraps the fused MLP (installed after it, as RankRunner does): the residual
    folded into the down GEMM is chunked with the MLP's rows."""
    from spava_plan.plan import Chunking
    from spava_plan.runtime.vision import chunking

    model = _tiny_model()
    lm = language_model(model)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(1, 29, lm.config.hidden_size, generator=g).to(DEV)
    pos = _positions("qwen2_5_vl", 0, 29)

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return lm(inputs_embeds=x, position_ids=pos, use_cache=False).last_hidden_state

    stock = run()
    llm_fused.install(model)
    chunking.install(model, Chunking(mlp_tokens=8, vision_units=1))
    rows: list[int] = []
    silu_mul = llm_fused.vf.silu_mul  # the fused MLP's gate|up rows, per call
    monkeypatch.setattr(llm_fused.vf, "silu_mul", lambda gu, *a: rows.append(gu.shape[-2]) or silu_mul(gu, *a))
    try:
        got = run()
    finally:
        chunking.uninstall(model)
        llm_fused.uninstall(model)
    assert rows == [8, 8, 8, 5] * len(lm.layers), rows  # really in chunks
    assert _rel(got, stock) <= FP32_ROUNDING


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_fused_rotary_matches_the_stock_function_with_gqa_and_keeps_its_layout():
    """The language model's q / k rotary (M-RoPE sections already merged into cos / sin, as the
    attention receives them): fp32 kernel vs the stock function, Hq != Hk, a cos / sin whose two
    halves differ (a kernel that mixes the halves up fails), outputs contiguous (1, H, S, D) like
    the stock ones."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as q25

    model = _tiny_model()
    stock = q25.apply_rotary_pos_emb
    llm_fused.install(model)
    try:
        fused = q25.apply_rotary_pos_emb
        assert fused is not stock
        g = torch.Generator().manual_seed(11)
        S, D = 29, 16
        q = torch.randn(1, S, 4, D, generator=g).transpose(1, 2).to(DEV)  # (1, Hq, S, D) views, as the attention makes them
        k = torch.randn(1, S, 2, D, generator=g).transpose(1, 2).to(DEV)
        cos, sin = torch.randn(1, S, D, generator=g).to(DEV), torch.randn(1, S, D, generator=g).to(DEV)
        wq, wk = stock(q, k, cos, sin)
        gq, gk = fused(q, k, cos, sin)
        assert gq.shape == wq.shape and gk.shape == wk.shape and gq.is_contiguous() and gk.is_contiguous()
        assert _rel(gq, wq) <= FP32_ROUNDING and _rel(gk, wk) <= FP32_ROUNDING
        # fp64 (the CPU references) is not a kernel dtype: the stock function runs, bit for bit
        q64, k64, c64, s64 = (t.double() for t in (q, k, cos, sin))
        for got, want in zip(fused(q64, k64, c64, s64), stock(q64, k64, c64, s64)):
            assert torch.equal(got, want)  # the same function on the same inputs (a pure fallback)
    finally:
        llm_fused.uninstall(model)
    assert q25.apply_rotary_pos_emb is stock
