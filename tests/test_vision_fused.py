"""runtime/vision/fused.py: each fused kernel against transformers' own code on fresh random
inputs (fp32: the kernels do the stock fp32 math, so only summation order and FMA contraction can
differ), and the whole tiny Qwen2.5-VL tower with and without the fused kernels. Without CUDA the
kernels run under TRITON_INTERPRET=1 (tests/conftest.py)."""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

import model_fixtures as mf  # noqa: E402
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as q25  # noqa: E402

from spava_plan.runtime.hf import model as hf_model
from spava_plan.runtime.vision import attention as vision_attention, fused as vision_fused  # noqa: E402
from spava_plan.runtime.vision.parallel import encode_video  # noqa: E402
from spava_plan.runtime.vision.tower import vision_module  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("rows,cols,x_dtype", [(13, 40, torch.float32), (1, 1280, torch.float32),
                                               (8, 7, torch.float32), (6, 24, torch.float16)])
def test_rms_norm_matches_the_stock_norm(rows, cols, x_dtype):
    """fp16 input with an fp32 weight: the normalised row is rounded to fp16 before the weight, as
    the stock code rounds it, and the result is fp32."""
    g = torch.Generator().manual_seed(rows * cols)
    norm = q25.Qwen2_5_VLRMSNorm(cols, eps=1e-6)
    norm.weight.data = torch.randn(cols, generator=g) + 1
    x = (torch.randn(rows, cols, generator=g) * 3).to(x_dtype)
    norm, x = norm.to(DEV), x.to(DEV)
    with torch.no_grad():
        want = norm(x)
    got = vision_fused.rms_norm(x, norm.weight, norm.variance_epsilon)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert _rel(got, want) <= 1e-6


def test_rotary_matches_the_stock_function_on_strided_qkv_views():
    g = torch.Generator().manual_seed(1)
    S, H, D = 11, 3, 16
    qkv = torch.randn(S, 3 * H * D, generator=g).to(DEV)
    # the attention's own layout: q, k, v are strided views of one (S, 3, H, D) projection
    q, k, _ = qkv.reshape(S, 3, H, D).permute(1, 0, 2, 3).unbind(0)
    assert not q.is_contiguous()
    angles = torch.randn(S, D // 2, generator=g).to(DEV)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    wq, wk = q25.apply_rotary_pos_emb_vision(q, k, cos, sin)
    gq, gk = vision_fused.rotary_vision(q, k, cos, sin)
    assert gq.shape == wq.shape and gq.is_contiguous()
    assert _rel(gq, wq) <= 1e-6 and _rel(gk, wk) <= 1e-6
    # a different (non-duplicated) cos/sin per half catches a kernel that mixes the halves up
    cos2, sin2 = torch.randn(S, D, generator=g).to(DEV), torch.randn(S, D, generator=g).to(DEV)
    wq, wk = q25.apply_rotary_pos_emb_vision(q, k, cos2, sin2)
    gq, gk = vision_fused.rotary_vision(q, k, cos2, sin2)
    assert _rel(gq, wq) <= 1e-6 and _rel(gk, wk) <= 1e-6
    # layouts the kernel does not take (odd head dim here) go to the torch copy of the stock math
    q3, k3 = q[..., :15], k[..., :15]
    want = q25.apply_rotary_pos_emb_vision(q3, k3, cos2[:, :15], sin2[:, :15])
    got = vision_fused.rotary_vision(q3, k3, cos2[:, :15], sin2[:, :15])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("rows,cols,x_dtype", [(13, 40, torch.float32), (1, 1280, torch.float32),
                                               (8, 7, torch.float32), (6, 24, torch.float16)])
def test_add_rms_norm_matches_the_add_then_the_stock_norm(rows, cols, x_dtype):
    """s = x + delta rounded as torch rounds it (one IEEE add of fp32 values, then one rounding to
    x's dtype: the same bits anywhere), the norm of s at the stock norm's tolerance. x is a strided
    view (row stride != cols). bf16 is not checked here: the interpreter truncates fp32 -> bf16
    where the GPU (and torch) round to nearest even."""
    g = torch.Generator().manual_seed(rows * cols + 1)
    norm = q25.Qwen2_5_VLRMSNorm(cols, eps=1e-6)
    norm.weight.data = torch.randn(cols, generator=g) + 1
    x = (torch.randn(rows, cols + 5, generator=g) * 3).to(x_dtype)[:, :cols]
    d = (torch.randn(rows, cols, generator=g) * 3).to(x_dtype)
    norm, x, d = norm.to(DEV), x.to(DEV), d.to(DEV)
    with torch.no_grad():
        want_s = x + d
        want_y = norm(want_s)
    s, y = vision_fused.add_rms_norm(x, d, norm.weight, norm.variance_epsilon)
    assert s.dtype == x.dtype and y.dtype == want_y.dtype and s.shape == y.shape == x.shape
    assert torch.equal(s, want_s)
    assert _rel(y, want_y) <= 1e-6
    # a delta that broadcasts takes torch's add (the kernel adds rows of equal shape only)
    s2, y2 = vision_fused.add_rms_norm(x, d[0], norm.weight, norm.variance_epsilon)
    assert torch.equal(s2, x + d[0]) and _rel(y2, norm(x + d[0]).detach()) <= 1e-6


@pytest.mark.parametrize("rows,cols", [(5, 24), (9, 1100)])
def test_silu_mul_matches_silu_gate_times_up(rows, cols):
    g = torch.Generator().manual_seed(cols)
    gu = (torch.randn(rows, 2 * cols, generator=g) * 4).to(DEV)
    want = F.silu(gu[:, :cols]) * gu[:, cols:]
    assert _rel(vision_fused.silu_mul(gu), want) <= 1e-6
    one = cols - 3  # the column that carries a down bias: exactly 1.0, the others as before
    got = vision_fused.silu_mul(gu, one)
    assert torch.equal(got[:, one], torch.ones(rows, device=DEV))
    keep = [c for c in range(cols) if c != one]
    assert _rel(got[:, keep], want[:, keep]) <= 1e-6


@pytest.mark.parametrize("inter,bias,padded", [(70, True, 128), (64, True, 128), (64, False, 64)])
def test_padded_mlp_matches_the_stock_mlp_and_keeps_its_weights_as_views(inter, bias, padded):
    """The padded MLP against the stock one, with and without the residual folded into the down
    GEMM. With a down bias the first padded column carries it (64 has none spare: one more block);
    down_proj.weight stays a view of the stock values without that column."""
    from types import SimpleNamespace
    torch.manual_seed(inter)
    mlp = q25.Qwen2_5_VLMLP(SimpleNamespace(hidden_size=32, intermediate_size=inter, hidden_act="silu"), bias=bias)
    mlp = mlp.to(DEV)
    stock_down = mlp.down_proj.weight.detach().clone()
    x = torch.randn(2, 9, 32, device=DEV)
    r = torch.randn(2, 9, 32, device=DEV)
    with torch.no_grad():
        want = mlp(x)
        vision_fused._pad_mlp(mlp)
        assert mlp._spava_gate_up_w.shape == (2 * padded, 32) and mlp._spava_down_w.shape == (32, padded)
        assert mlp.up_proj.weight.data_ptr() == mlp._spava_gate_up_w[padded:].data_ptr()
        assert mlp.down_proj.weight.data_ptr() == mlp._spava_down_w.data_ptr()
        assert torch.equal(mlp.down_proj.weight, stock_down)  # the bias column is not in the view
        assert mlp._spava_one_col == (inter if bias else -1)
        if bias:
            assert torch.equal(mlp._spava_down_w[:, inter], mlp.down_proj.bias)
        assert _rel(vision_fused._mlp_forward(mlp, x), want) <= 1e-6
        got = vision_fused._mlp_forward(mlp, x, residual=r.clone())  # the residual is overwritten
        assert got.shape == r.shape and _rel(got, r + want) <= 1e-6
        assert _rel(mlp(x), want) <= 1e-6  # the stock forward on the views: same weights


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_fused_tower_matches_the_stock_tower_and_uninstalls(tmp_path, monkeypatch, family):
    """Qwen2.5-VL gets every replacement; Qwen2-VL (LayerNorm, GELU MLP) the rotary and patch ones."""
    pytest.importorskip("av")  # the tiny video file
    ckpt = mf.build_checkpoint(tmp_path / "ckpt", family)
    video = mf.write_video(tmp_path / "v.mp4", frames=6, height=112, width=112)
    inputs = mf.tiny_inputs(ckpt, video, 6, family)
    model = hf_model.load_checkpoint(str(ckpt), dtype=torch.float32, device=DEV)
    vision_attention.install(model)
    visual = vision_module(model)

    def encode() -> torch.Tensor:
        with torch.inference_mode():
            return encode_video(visual, inputs.pixel_values_videos, inputs.video_grid_thw)

    stock = encode()
    stock_rope = sys.modules[type(visual.blocks[0].attn).__module__].apply_rotary_pos_emb_vision
    vision_fused.install(model)
    vision_fused.install(model)  # idempotent: the gate|up weights are shared once
    fused = encode()
    modeling = sys.modules[type(visual.blocks[0].attn).__module__]
    assert modeling.apply_rotary_pos_emb_vision is vision_fused.rotary_vision
    assert "forward" in visual.patch_embed.__dict__
    blocks = list(visual.blocks)
    if family == "qwen2_5_vl":
        mlp = visual.blocks[0].mlp
        assert mlp.gate_proj.weight.data_ptr() == mlp._spava_gate_up_w.data_ptr()  # views, no second copy
        assert "forward" in visual.blocks[0].norm1.__dict__
        # every block runs the forward without the separate residual adds (the tiny ViT's
        # intermediate size 64 has no spare padded column: the bias gets one more block)
        assert all(b.forward.__func__ is vision_fused._vision_block_forward for b in blocks)
        assert mlp._spava_one_col == 64 and mlp._spava_down_w.shape[1] == 128
        calls = []
        add_rms_norm = vision_fused.add_rms_norm
        monkeypatch.setattr(vision_fused, "add_rms_norm", lambda *a: calls.append(1) or add_rms_norm(*a))
        assert _rel(encode(), fused) <= 1e-6 and len(calls) == len(blocks)
    else:  # LayerNorm, GELU MLP: the stock block
        assert not any("forward" in b.__dict__ for b in blocks)
    assert _rel(fused, stock) <= 1e-5
    assert not torch.equal(fused, torch.zeros_like(fused))
    vision_fused.uninstall(model)
    assert not any("forward" in b.__dict__ for b in blocks)
    assert modeling.apply_rotary_pos_emb_vision is stock_rope  # the module's own function is back
    assert torch.equal(encode(), stock)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: tensors past 2**31 elements")
def test_kernels_address_rows_past_two_to_the_31_elements():
    """Offsets are int64: a dense 64-frame 1440p video is 594K patches, and 594K x 6912 (gate|up)
    or x 3840 (the qkv row stride) is past 2**31 (an int32 offset wraps: illegal memory access)."""
    cols = 3456
    rows = 2 ** 31 // (2 * cols) + 64
    gu = torch.randn(rows, 2 * cols, device="cuda", dtype=torch.bfloat16)
    tail = slice(rows - 64, rows)
    y = vision_fused.silu_mul(gu)
    assert _rel(y[tail], F.silu(gu[tail, :cols]) * gu[tail, cols:]) <= 1e-2
    del gu, y
    S, H, D = 2 ** 31 // 3840 + 16, 16, 80
    qkv = torch.randn(S, 3 * H * D, device="cuda", dtype=torch.bfloat16)
    q, k, _ = qkv.reshape(S, 3, H, D).permute(1, 0, 2, 3).unbind(0)
    angles = torch.randn(S, D // 2, device="cuda")
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    gq, gk = vision_fused.rotary_vision(q, k, cos, sin)
    t = slice(S - 16, S)
    wq, wk = q25.apply_rotary_pos_emb_vision(q[t], k[t], cos[t], sin[t])
    assert _rel(gq[t], wq) <= 1e-2 and _rel(gk[t], wk) <= 1e-2


def test_vision_pixels_reach_the_device_in_the_model_dtype():
    """to_device copies host pixels as they are and casts on the device (one call would cast on
    the host into a pageable buffer): the values are the one-call conversion's."""
    from spava_plan.runtime.vision.parallel import to_device

    g = torch.Generator().manual_seed(5)
    pixels = torch.randn(40, 1176, generator=g)
    for dtype in (torch.bfloat16, torch.float32):
        got = to_device(pixels, torch.device(DEV), dtype)
        assert got.dtype == dtype and got.device.type == DEV
        assert torch.equal(got.cpu(), pixels.to(dtype))  # a rounding of the same values: identical anywhere


def test_cu_seqlens_are_read_once_per_tensor():
    """The batched vision attention reads a cu_seqlens tensor's host copy once (a .tolist() per
    block would drain the GPU 32 times per tower call); another tensor gets its own list."""
    a, b = torch.tensor([0, 3, 7], dtype=torch.int32), torch.tensor([0, 5], dtype=torch.int32)
    assert vision_attention._host_list(a) == [0, 3, 7] and vision_attention._host_list(b) == [0, 5]
    first = vision_attention._host_list(a)
    assert vision_attention._host_list(a) is first  # the cached list, no second device read
