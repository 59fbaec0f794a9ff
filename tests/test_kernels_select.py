"""Generated selection kernels (score + max-pool, top-k, packed gather) and the LSE merge.

Selection compares token indices, so references must rank exactly like the kernels: integer
valued inputs with Lq*G a power of two make every fp32 score exact (no rounding anywhere), and
max-pooling then produces many exact ties, which must go to the earlier token.
"""
from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from spava_plan.codegen import render_kernels
from spava_plan.hydra_conf import compose_config
from spava_plan.planner.build import build_plan
from spava_plan.runtime.backends.triton_gen import TritonBackend


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    plan = build_plan(compose_config(["model=tiny", "gpus=2", "frames=8", "video.resolution=360p"]))
    kdir = tmp_path_factory.mktemp("kernels")
    render_kernels(plan, kdir)
    return TritonBackend(kdir, plan_hash=plan.hash, render=partial(render_kernels, plan))


def ref_indices(q, k, keep, pool, score):
    """fp64 scores, max-pool, stable descending sort (earlier token first among equals)."""
    n, hkv, d = k.shape
    if score == "query_aware":
        qbar = q.double().reshape(q.shape[0], hkv, -1, d).mean(dim=(0, 2))
        s = torch.einsum("nhd,hd->hn", k.double(), qbar)
    else:
        s = k.double().norm(dim=-1).T
    s = F.max_pool1d(s.unsqueeze(1), pool, stride=1, padding=pool // 2).squeeze(1)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :keep]
    return torch.sort(order, dim=1).values


def ints(gen, *shape):
    return torch.randint(-2, 3, shape, generator=gen).float()


@pytest.mark.parametrize("score,pool", [("query_aware", 5), ("query_aware", 1), ("key_norm", 3)])
def test_exact_inputs_pick_the_same_tokens(backend, score, pool):
    gen = torch.Generator().manual_seed(pool)
    q, k, v = ints(gen, 4, 4, 16), ints(gen, 301, 2, 16), torch.randn(301, 2, 16, generator=gen)
    keep = 128
    idx = backend.mod.select_indices(q, k, keep, pool, score).long()
    assert torch.equal(idx, ref_indices(q, k, keep, pool, score))
    packed = backend.select(q, k, v, keep, pool, score)
    assert packed.shape == (keep, 2, 32)
    for h in range(2):
        assert torch.equal(packed[:, h, :16], k[idx[h], h]) and torch.equal(packed[:, h, 16:], v[idx[h], h])
    from spava_plan.runtime.backends.torch_ref import TorchBackend

    assert torch.equal(packed, TorchBackend().select(q, k, v, keep, pool, score))


def test_long_blocks_use_topk_with_the_same_tie_rule(backend, monkeypatch):
    gen = torch.Generator().manual_seed(4)
    q, k = ints(gen, 4, 4, 16), ints(gen, 300, 2, 16)
    fast = backend.mod.select_indices(q, k, 100, 5, "query_aware")
    from spava_plan.runtime.backends import triton_kernels  # selection is plan-independent: it lives there

    monkeypatch.setattr(triton_kernels, "MAX_TOP_BLOCK", 64)  # force the torch.topk path
    assert torch.equal(backend.mod.select_indices(q, k, 100, 5, "query_aware"), fast)


def test_random_inputs_give_a_valid_top_k(backend):
    """Random fp32 inputs: the chosen tokens are a top-k of the fp64 pooled scores up to fp32
    rounding of the scores (1e-5 relative)."""
    gen = torch.Generator().manual_seed(11)
    q, k = torch.randn(37, 4, 16, generator=gen), torch.randn(500, 2, 16, generator=gen)
    keep = 256
    idx = backend.mod.select_indices(q, k, keep, 5, "query_aware").long()
    qbar = q.double().reshape(37, 2, 2, 16).mean(dim=(0, 2))
    s = F.max_pool1d(torch.einsum("nhd,hd->hn", k.double(), qbar).unsqueeze(1), 5, 1, 2).squeeze(1)
    for h in range(2):
        assert idx[h].unique().numel() == keep and torch.all(idx[h][1:] > idx[h][:-1])
        thr = s[h].sort(descending=True).values[keep - 1]
        chosen = torch.zeros(500, dtype=torch.bool)
        chosen[idx[h]] = True
        tol = 1e-5 * s[h].abs().max()
        assert (s[h][chosen] >= thr - tol).all() and (s[h][~chosen] <= thr + tol).all()


def test_keep_everything_or_nothing(backend):
    gen = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(3, 4, 16, generator=gen), torch.randn(50, 2, 16, generator=gen), torch.randn(50, 2, 16, generator=gen)
    assert torch.equal(backend.select(q, k, v, 50, 5, "query_aware"), torch.cat([k, v], -1))
    assert backend.select(q, k, v, 0, 5, "query_aware").shape == (0, 2, 32)


def merge_ref(outs, lses):
    top = lses.amax(0)
    safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp(lses - safe)
    tot = w.sum(0)
    out = (w[..., None] * outs).sum(0) / torch.where(tot > 0, tot, torch.ones_like(tot))[..., None]
    return out, safe + torch.log(tot)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-13)])  # rounding of P terms
def test_merge(backend, dtype, tol):
    gen = torch.Generator().manual_seed(3)
    outs = torch.randn(3, 7, 4, 16, generator=gen, dtype=torch.float64)
    lses = torch.randn(3, 7, 4, generator=gen, dtype=torch.float64) * 4
    lses[:, 0, 0] = -math.inf  # no partial saw a key
    lses[1, 2, :] = -math.inf  # one empty partial
    out, lse = backend.merge(outs.to(dtype), lses.to(dtype))
    ref_o, ref_l = merge_ref(outs, lses)
    assert out.dtype == dtype and lse.dtype == dtype
    assert ((out.double() - ref_o).norm() / ref_o.norm()) <= tol
    fin = torch.isfinite(ref_l)
    assert torch.equal(torch.isfinite(lse), fin) and (lse.double()[fin] - ref_l[fin]).abs().max() <= 10 * tol
    assert torch.equal(out[0, 0], torch.zeros(16, dtype=dtype))


@pytest.mark.parametrize("parts", [2, 3])
def test_merge_parts_of_mixed_dtypes(backend, parts):
    """A ring's fp32 accumulator merged with a step's 16-bit output, as lists (two: in place, no
    stack; three: stacked): the result stays in the accumulator's dtype and equals the fp64 merge,
    for the triton and the torch backend alike."""
    from spava_plan.runtime.backends.torch_ref import TorchBackend

    gen = torch.Generator().manual_seed(4)
    outs = torch.randn(parts, 9, 4, 16, generator=gen, dtype=torch.float64)
    lses = torch.randn(parts, 9, 4, generator=gen, dtype=torch.float64) * 4
    lses[:, 0, 0] = -math.inf
    outs[1:] = outs[1:].half().double()  # what the 16-bit partials hold
    ref_o, ref_l = merge_ref(outs, lses)
    fin = torch.isfinite(ref_l)
    for be in (backend, TorchBackend()):
        o, lse = be.merge_parts([outs[0].float()] + [x.half() for x in outs[1:]], [x.float() for x in lses])
        assert o.dtype == torch.float32 and lse.dtype == torch.float32 and o.shape == outs.shape[1:]
        assert ((o.double() - ref_o).norm() / ref_o.norm()) <= 1e-6, type(be).__name__
        assert torch.equal(torch.isfinite(lse), fin) and (lse.double()[fin] - ref_l[fin]).abs().max() <= 1e-5
        assert torch.equal(o[0, 0], torch.zeros(16))


def test_all_equal_scores_take_the_earliest_tokens(backend):
    """Every pooled score equal (constant keys): the first keep tokens, per head."""
    q = torch.ones(2, 4, 16)
    k = torch.full((200, 2, 16), -0.5)
    idx = backend.mod.select_indices(q, k, 77, 5, "query_aware")
    assert torch.equal(idx, torch.arange(77, dtype=torch.int32).repeat(2, 1))


@pytest.mark.parametrize("score,pool", [("query_aware", 5), ("key_norm", 3)])
def test_blocks_in_one_launch_equal_each_block_alone(backend, score, pool, monkeypatch):
    """A rank's blocks selected together (one launch per step, blocks of different lengths and
    keeps at different rows of one K/V) pick exactly the tokens of each block selected alone and of
    the fp64 reference; blocks kept whole or not at all and a lone long block take their own path."""
    from spava_plan.runtime.backends import triton_kernels
    from spava_plan.runtime.backends.torch_ref import TorchBackend

    gen = torch.Generator().manual_seed(7 + pool)
    q, k, v = ints(gen, 4, 4, 16), ints(gen, 900, 2, 16), torch.randn(900, 2, 16, generator=gen)
    blocks = [(10, 311, 128), (400, 656, 96), (656, 700, 44), (700, 720, 0), (720, 900, 37)]
    packed = backend.select_blocks(q, k, v, blocks, pool, score)
    ref = TorchBackend().select_blocks(q, k, v, blocks, pool, score)
    assert [p.shape[0] for p in packed] == [keep for _, _, keep in blocks]
    for (lo, hi, keep), got, want in zip(blocks, packed, ref):
        assert torch.equal(got, backend.select(q, k[lo:hi], v[lo:hi], keep, pool, score)), (lo, hi)
        assert torch.equal(got, want), (lo, hi)
        if 0 < keep < hi - lo:
            idx = ref_indices(q, k[lo:hi], keep, pool, score)
            assert torch.equal(got[:, :, :16], torch.stack([k[lo:hi][idx[h], h] for h in range(2)], 1))
    # the batch needs two scored blocks: with one of them too long for _select_top, each goes alone
    monkeypatch.setattr(triton_kernels, "MAX_TOP_BLOCK", 256)
    alone = backend.select_blocks(q, k, v, blocks[:2], pool, score)
    assert all(torch.equal(a, b) for a, b in zip(alone, packed[:2]))
