"""The torch reference backend against naive fp64 math (full score matrices, torch.softmax)."""
import math

import pytest
import torch

from spava_plan.runtime.backends.base import KVSegment, TaskInput
from spava_plan.runtime.backends.torch_ref import TorchBackend
from spava_plan.runtime.reference import dense_attention

HQ, HKV, D = 4, 2, 16
TOL64 = 1e-12  # fp64 segment-wise softmax + LSE merge vs one softmax: rounding only


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def naive(q, segs, scale):
    """One softmax over the concatenated segments with the masks spelled out per key."""
    m = q.shape[0]
    k = torch.cat([s.k for s in segs])
    v = torch.cat([s.v for s in segs])
    allowed = []
    for s in segs:
        n = s.k.shape[0]
        rows = torch.arange(m).unsqueeze(1)
        cols = torch.arange(n).unsqueeze(0)
        allowed.append(torch.ones(m, n, dtype=torch.bool) if s.mask == "full" else cols <= rows + (n - m))
    allowed = torch.cat(allowed, dim=1)
    g = q.shape[1] // k.shape[1]
    sc = torch.einsum("mhd,nhd->hmn", q, k.repeat_interleave(g, 1)) * scale
    sc = sc.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(sc, dim=-1).transpose(0, 1)
    return torch.einsum("hmn,nhd->mhd", torch.softmax(sc, -1), v.repeat_interleave(g, 1)), lse


def test_attention_segments_masks_gqa_match_one_softmax():
    be = TorchBackend()
    q = rand(7, HQ, D, seed=1)
    kv = rand(40, HKV, D, seed=2), rand(40, HKV, D, seed=3)
    # strided views (no copies): passing-like | anchor-like | own block (causal, bottom-right)
    packed = rand(9, HKV, 2 * D, seed=4)
    segs = (KVSegment(packed[..., :D], packed[..., D:], "full"),
            KVSegment(kv[0][:11], kv[1][:11], "full"),
            KVSegment(kv[0][20:33], kv[1][20:33], "causal"))
    scale = 1 / math.sqrt(D)
    dest = torch.empty(7, HQ, D, dtype=torch.float64)
    (out, lse), = be.attention([TaskInput("t", q, segs, out=dest)], scale)
    ref, ref_lse = naive(q, segs, scale)
    assert out.data_ptr() == dest.data_ptr()  # written in place when a destination is given
    assert (out - ref).abs().max() < TOL64
    assert (lse - ref_lse).abs().max() < TOL64
    assert lse.dtype == torch.float64  # fp64 in, fp64 lse: an fp32 lse would cap merges at ~1e-7


def test_attention_fp32_and_empty_inputs():
    be = TorchBackend()
    q = rand(5, HQ, D, seed=5, dtype=torch.float32)
    k, v = rand(8, HKV, D, seed=6, dtype=torch.float32), rand(8, HKV, D, seed=7, dtype=torch.float32)
    (out, lse), (out0, lse0) = be.attention(
        [TaskInput("a", q, (KVSegment(k, v, "causal"), KVSegment(k[:0], v[:0], "full"))),
         TaskInput("none", q, ())], 0.25)
    ref, _ = naive(q.double(), (KVSegment(k.double(), v.double(), "causal"),), 0.25)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert (out.double() - ref).abs().max() < 1e-5  # fp32 scores over 8 keys
    # a task with no keys: out = 0, lse = -inf (merges then give it no weight)
    assert torch.all(out0 == 0) and torch.all(torch.isneginf(lse0))


def test_merge_is_softmax_over_the_union():
    be = TorchBackend()
    q = rand(6, HQ, D, seed=8)
    k, v = rand(30, HKV, D, seed=9), rand(30, HKV, D, seed=10)
    parts = be.attention([TaskInput("a", q, (KVSegment(k[:10], v[:10], "full"),)),
                          TaskInput("b", q, (KVSegment(k[10:], v[10:], "full"),)),
                          TaskInput("c", q, ())], 0.3)
    out, lse = be.merge(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
    ref, ref_lse = naive(q, (KVSegment(k, v, "full"),), 0.3)
    assert (out - ref).abs().max() < TOL64 and (lse - ref_lse).abs().max() < TOL64


def test_decode_shaped_causal_matches_dense_tail():
    be = TorchBackend()
    q, k, v = rand(3, HQ, D, seed=11), rand(20, HKV, D, seed=12), rand(20, HKV, D, seed=13)
    (out, _), = be.attention([TaskInput("d", q, (KVSegment(k[:17], v[:17], "full"),
                                                  KVSegment(k[17:], v[17:], "causal")))], 1 / math.sqrt(D))
    ref = dense_attention(q, k, v, causal=True, past=17)
    assert (out - ref).abs().max() < TOL64


def brute_scores(q_query, k, pool):
    """Spec form: mean over query tokens and the G heads of <k, q>, as a (keys x Lq) matrix."""
    lq = q_query.shape[0]
    g = q_query.shape[1] // k.shape[1]
    per = torch.einsum("nhd,thgd->nht", k.double(), q_query.double().reshape(lq, k.shape[1], g, D)) / g
    s = per.mean(dim=-1)  # (n, Hkv)
    padded = torch.nn.functional.pad(s.t(), (pool // 2, pool // 2), value=float("-inf"))
    return padded.unfold(1, pool, 1).amax(-1).t()


@pytest.mark.parametrize("score", ["query_aware", "key_norm"])
def test_select_picks_top_pooled_scores_in_order(score):
    be = TorchBackend()
    n, keep = 150, 40
    k, v = rand(n, HKV, D, seed=14), rand(n, HKV, D, seed=15)
    qq = rand(9, HQ, D, seed=16)
    packed = be.select(qq, k, v, keep, 5, score)
    assert packed.shape == (keep, HKV, 2 * D) and packed.dtype == k.dtype
    ref = brute_scores(qq, k, 5) if score == "query_aware" else \
        torch.nn.functional.max_pool1d(k.norm(dim=-1).t().unsqueeze(1), 5, 1, 2).squeeze(1).t()
    idx = be.select_indices(qq, k, keep, 5, score)
    for h in range(HKV):
        chosen = idx[:, h]
        assert torch.all(chosen[1:] > chosen[:-1])  # ascending token order
        # every kept score >= every dropped score (ties may go either way only at equal values)
        rest = torch.ones(n, dtype=torch.bool)
        rest[chosen] = False
        assert ref[chosen, h].min() >= ref[rest, h].max() - 1e-5  # fp32 scoring vs fp64 brute force
        assert torch.equal(packed[:, h, :D], k[chosen, h]) and torch.equal(packed[:, h, D:], v[chosen, h])


def test_select_ties_go_to_the_earlier_token_and_keep_all_is_identity():
    be = TorchBackend()
    k = torch.ones(10, HKV, D, dtype=torch.float64)  # every score equal
    v = rand(10, HKV, D, seed=17)
    idx = be.select_indices(rand(3, HQ, D, seed=18), k, 4, 5, "query_aware")
    assert idx[:, 0].tolist() == [0, 1, 2, 3] and idx[:, 1].tolist() == [0, 1, 2, 3]
    packed = be.select(rand(3, HQ, D, seed=18), k, v, 10, 5, "query_aware")
    assert torch.equal(packed[..., D:], v)
