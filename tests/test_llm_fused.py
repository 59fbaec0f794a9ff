"""runtime/llm_fused.py: the tiny Qwen2.5-VL language model with the fused RMSNorm and gate|up MLP
against transformers' own code on fresh random inputs (fp32: same math, so only summation order and
FMA contraction differ). Without CUDA the kernels run under TRITON_INTERPRET=1 (tests/conftest.py)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from spava_plan.runtime import hf_model, llm_fused  # noqa: E402
from spava_plan.runtime.hf_attention import language_model  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FP32_ROUNDING = 1e-5  # fp32 over 2 decoder layers, summation order only (seen ~1e-7)


def _tiny_model():
    from spava_plan.config import config_to_dict
    from spava_plan.hydra_conf import compose_config

    cfg = config_to_dict(compose_config(["model=tiny", "model.family=qwen2_5_vl", "model.name=tiny_25",
                                         "model.tokens_per_second=2"]))["model"]
    return hf_model.random_model(cfg, dtype=torch.float32, device=DEV, seed=3)


def test_fused_language_model_matches_stock_and_uninstalls():
    model = _tiny_model()
    lm = language_model(model)
    hidden = lm.config.hidden_size
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 37, hidden, generator=g).to(DEV)
    pos = torch.arange(37, device=DEV).view(1, 1, -1).expand(3, 1, -1)

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return lm(inputs_embeds=x, position_ids=pos, use_cache=False).last_hidden_state

    stock = run()
    llm_fused.install(model)
    llm_fused.install(model)  # idempotent
    mlp = lm.layers[0].mlp
    assert "forward" in mlp.__dict__ and "forward" in lm.layers[0].input_layernorm.__dict__
    assert "forward" in lm.norm.__dict__
    assert mlp.gate_proj.weight.data_ptr() == mlp._spava_gate_up_w.data_ptr()  # views, no second copy
    fused = run()
    rel = float((fused.double() - stock.double()).norm() / stock.double().norm())
    assert rel <= FP32_ROUNDING and not torch.equal(fused, torch.zeros_like(fused))
    llm_fused.uninstall(model)
    assert "forward" not in mlp.__dict__
    back = run()
    assert float((back.double() - stock.double()).norm() / stock.double().norm()) <= FP32_ROUNDING


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
