"""runtime/vision/window.py: the one-launch window attention against SDPA run piece by piece on
fresh random inputs, with the strided (1, H, S, D) views the ViT hands over, uneven pieces (edge
windows), a head dim that is not a power of two (the ViT's 80) and GQA. fp32 under
TRITON_INTERPRET=1 on CPU (tests/conftest.py); bf16 on a GPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spava_plan.runtime.vision.window import window_attention

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 (interpreter): summation order only; bf16 (GPU): P and the output rounded to bf16
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 4, 80), (4, 2, 16)])
def test_window_attention_equals_sdpa_per_piece(heads, kv_heads, dim):
    dtype = torch.float32 if DEV == "cpu" else torch.bfloat16
    g = torch.Generator().manual_seed(heads * dim + kv_heads)
    lengths = [64, 48, 36, 64, 1, 17]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    S = int(cu[-1])
    # (1, H, S, D) views of token-major storage, as transformers passes them
    q4 = torch.randn(1, S, heads, dim, generator=g).to(DEV, dtype).transpose(1, 2)
    k4 = torch.randn(1, S, kv_heads, dim, generator=g).to(DEV, dtype).transpose(1, 2)
    v4 = torch.randn(1, S, kv_heads, dim, generator=g).to(DEV, dtype).transpose(1, 2)
    q, k, v = (t[0].transpose(0, 1) for t in (q4, k4, v4))
    scale = dim ** -0.5
    got = window_attention(q, k, v, cu.to(DEV), max(lengths), scale)
    want = torch.empty((S, heads, dim), dtype=torch.float64)
    rep = heads // kv_heads
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qq = q[a:b].double().transpose(0, 1)
        kk = k[a:b].double().transpose(0, 1).repeat_interleave(rep, 0)
        vv = v[a:b].double().transpose(0, 1).repeat_interleave(rep, 0)
        want[a:b] = F.scaled_dot_product_attention(qq.cpu(), kk.cpu(), vv.cpu(), scale=scale).transpose(0, 1)
    rel = float((got.double().cpu() - want).norm() / want.norm())
    assert rel <= TOL[dtype], rel
    assert torch.isfinite(got).all()


def test_window_attention_rejects_long_pieces():
    q = torch.zeros(300, 2, 16)
    with pytest.raises(ValueError, match="MAX_WINDOW"):
        window_attention(q, q, q, torch.tensor([0, 300], dtype=torch.int32), 300)
