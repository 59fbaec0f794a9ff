"""One plan, many question lengths (video.max_question_tokens): a shorter question runs on the same
plan, sizes and collectives with its query segment padded at the end, and every real row equals
(a) the same question on a plan made for exactly its length and (b), with every token passed,
dense causal attention over the real prompt. The pad rows hold large junk values, so any leak of a
pad key into a real row, into the selection's query mean or into the KV cache would show.

Attention level on the emulated world (fp64, torch reference backend) for every method; the model
level (tiny Qwen2-VL through RankRunner) in test_model_question_range below.
"""
from __future__ import annotations

import functools

import pytest
import torch

from spava_plan.errors import PlanMismatchError
from spava_plan.runtime.attention import RankAttention
from spava_plan.runtime.comm.emulated import EmulatedWorld
from spava_plan.runtime.reference import dense_attention, local_rows

TOL = 1e-10  # fp64 end to end: only the order of the LSE merges differs between the two plans
CAPACITY = 24
SMALL = ("model=tiny", "frames=16", "video.resolution=56x84", "method.anchor_tokens=13")
# 1253+ tokens: blocks of 136-272 tokens, so real top-k selection happens (keep = 128 < block)
LARGE = ("model=tiny", "frames=100", "video.resolution=112x168")


@functools.lru_cache(maxsize=None)
def plan_for(*overrides):
    from spava_plan.hydra_conf import compose_config
    from spava_plan.planner.build import build_plan

    return build_plan(compose_config(list(overrides)))


def _inputs(plan, n, seed=0):
    """Global (total, H, D) fp64 q/k/v whose first n rows are the real prompt, then junk pad rows."""
    total = plan.layout.total_tokens
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n, h, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    junk = torch.Generator().manual_seed(seed + 99)
    pads = [50 * torch.randn(total - n, h, 16, generator=junk, dtype=torch.float64) for h in (4, 2, 2)]
    return tuple(torch.cat([x, p]) for x, p in zip((q, k, v), pads))


def _run(plan, q, k, v, prompt_tokens=None, decode=None):
    """Prefill (and one decode step) on every rank; returns global rows [0, n) and the decode output."""
    world = EmulatedWorld.for_plan(plan, timeout_s=60)
    attns = [RankAttention(plan, r, world.comm(r)) for r in range(plan.world_size)]
    n = plan.layout.total_tokens if prompt_tokens is None else prompt_tokens

    def rank(r):
        if prompt_tokens is not None:
            attns[r].set_prompt_tokens(prompt_tokens)
        out = attns[r].prefill(0, *local_rows(plan, r, q, k, v))
        dec = attns[r].decode(0, *decode) if decode is not None else None
        return out, dec

    results = world.run(rank)
    full = torch.full((n, 4, 16), float("nan"), dtype=torch.float64)
    for r in reversed(range(plan.world_size)):
        idx = torch.cat([torch.arange(a, min(b, n)) for a, b in plan.ranks[r].local if a < n])
        rows = torch.cat([torch.arange(a, b) for a, b in plan.ranks[r].local])
        full[idx] = results[r][0][(rows < n).nonzero()[:, 0]]
    cache = sum(int(a.kv_cache(0)[0].shape[0]) for a in attns)
    return full, results[0][1], cache


@pytest.mark.parametrize("base, variant", [
    (LARGE, ("method=spava",)),
    (SMALL, ("method=spava", "method.pass_all=true")),
    (LARGE, ("method=apb",)),
    (SMALL, ("method=star",)),
    (SMALL, ("method=zigzag_ring",)),
    (SMALL, ("method=dense", "gpus=1")),
])
@pytest.mark.parametrize("question", [1, 9, CAPACITY])
def test_short_questions_run_on_the_capacity_plan(base, variant, question):
    W = "gpus=1" if "gpus=1" in variant else "gpus=2"
    big = plan_for(*base, W, *variant, f"video.max_question_tokens={CAPACITY}")
    exact = plan_for(*base, W, *variant, f"video.max_question_tokens={question}")
    n = exact.layout.total_tokens
    assert big.layout.context_tokens == exact.layout.context_tokens and big.video.max_question_tokens == CAPACITY
    q, k, v = _inputs(big, n)
    g = torch.Generator().manual_seed(5)
    step = tuple(torch.randn(1, h, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    got, got_dec, got_cache = _run(big, q, k, v, prompt_tokens=n, decode=step)
    want, want_dec, want_cache = _run(exact, q[:n], k[:n], v[:n], decode=step)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() < TOL
    assert (got_dec - want_dec).abs().max() < TOL
    assert got_cache == want_cache  # no pad token in any rank's KV cache
    if big.method in ("dense", "zigzag_ring") or big.config["method"]["pass_all"]:
        ref = dense_attention(q[:n], k[:n], v[:n])
        assert (got - ref).abs().max() < TOL


class _Locked:
    """Triton's CPU interpreter keeps global state: emulated ranks (threads) take turns in it."""

    def __init__(self, backend):
        import threading

        self._backend, self._lock, self.name = backend, threading.Lock(), backend.name

    def __getattr__(self, attr):
        value = getattr(self._backend, attr)

        def call(*a, **k):
            with self._lock:
                return value(*a, **k)
        return call if callable(value) else value


@pytest.mark.parametrize("variant", [("method=spava", "method.pass_all=true"), ("method=apb",)])
def test_the_generated_kernels_run_shorter_questions_unchanged(tmp_path, variant):
    """The plan's own Triton kernels (CPU interpreter off-GPU) take the padded query with runtime
    segment lengths: fp32 kernels vs the fp64 exact-length reference."""
    pytest.importorskip("triton")
    from spava_plan.codegen import render_kernels
    from spava_plan.runtime.backends.triton_gen import TritonBackend

    base = LARGE if "method=apb" in variant else SMALL
    big = plan_for(*base, "gpus=2", *variant, f"video.max_question_tokens={CAPACITY}")
    exact = plan_for(*base, "gpus=2", *variant, "video.max_question_tokens=5")
    n = exact.layout.total_tokens
    render_kernels(big, tmp_path)
    backend = _Locked(TritonBackend(tmp_path, plan_hash=big.hash, render=functools.partial(render_kernels, big), tune=False))
    q, k, v = _inputs(big, n)
    world = EmulatedWorld.for_plan(big, timeout_s=300)
    attns = [RankAttention(big, r, world.comm(r), backend) for r in range(2)]

    def rank(r):
        attns[r].set_prompt_tokens(n)
        return attns[r].prefill(0, *(x.float() for x in local_rows(big, r, q, k, v)))

    outs = world.run(rank)
    want, _, _ = _run(exact, q[:n], k[:n], v[:n])
    for r in range(2):
        rows = torch.cat([torch.arange(a, b) for a, b in big.ranks[r].local])
        real = rows < n
        # fp32 kernels vs fp64: rounding only (as tests/test_kernels_attention.py)
        assert (outs[r][real].double() - want[rows[real]]).abs().max() < 1e-4


def test_selection_uses_the_real_query_rows_only():
    """With real top-k selection, the junk pad queries would change which keys pass if they entered
    the query mean; the capacity plan's packed selections equal the exact-length plan's."""
    big = plan_for(*LARGE, "gpus=2", f"video.max_question_tokens={CAPACITY}")
    exact = plan_for(*LARGE, "gpus=2", "video.max_question_tokens=3")
    n = exact.layout.total_tokens
    q, k, v = _inputs(big, n)
    picked = []
    for plan, prompt in ((big, n), (exact, None)):
        world = EmulatedWorld.for_plan(plan, timeout_s=60)
        attn = RankAttention(plan, 0, world.comm(0))
        if prompt:
            attn.set_prompt_tokens(prompt)
        rows = local_rows(plan, 0, q, k, v)
        qa, qb = attn.query_select_rows
        (slot, (lo, hi), keep), = attn.select_rows[:1]
        picked.append(attn.backend.select_indices(rows[0][qa:qb], rows[1][lo:hi], keep, attn.pool_window,
                                                  attn.selection))
    assert picked[0].shape[0] < big.layout.segments[1].length  # a real selection
    assert torch.equal(picked[0], picked[1])


def test_a_longer_prompt_is_refused_naming_the_setting():
    plan = plan_for(*SMALL, "gpus=2", "video.max_question_tokens=8")
    world = EmulatedWorld.for_plan(plan, timeout_s=10)
    attn = RankAttention(plan, 0, world.comm(0))
    for n in (plan.layout.total_tokens + 1, plan.layout.context_tokens):
        with pytest.raises(PlanMismatchError, match="video.max_question_tokens"):
            attn.set_prompt_tokens(n)


# -- the model: tiny Qwen2-VL / Qwen2.5-VL, questions of several lengths on one plan ---------------
NEW_TOKENS = 4
LOGIT_ATOL = 1e-5  # as tests/test_model_spava.py: the stock RMSNorm normalises in fp32


@pytest.mark.parametrize("family", ["qwen2_5_vl"])  # Qwen2-VL shares the code path; kept short for CI
def test_model_questions_of_several_lengths_on_one_plan(tmp_path, family):
    """One pass-all plan sized for the longest question answers each question exactly as the stock
    model does (dense attention over the real prompt) and as a plan made for exactly its length."""
    pytest.importorskip("transformers")
    pytest.importorskip("av")
    import model_fixtures as mf

    from spava_plan.runtime.hf import inputs as hf_inputs, model as hf_model
    from spava_plan.runtime.generate import RankRunner

    ckpt = mf.build_checkpoint(tmp_path / "ckpt", family)
    video = mf.write_video(tmp_path / "v.mp4", frames=12, height=56, width=84)
    questions = ["Why?", mf.QUESTION + " Answer in detail, with colours and motion."]
    inputs = [mf.tiny_inputs(ckpt, video, 12, family, question=q) for q in questions]
    exact = ("method.pass_all=true", "method.anchor_tokens=20")
    plan = mf.tiny_plan(inputs[-1], family, 2, 12, "56x84", *exact)  # capacity: the longest question
    model = hf_model.load_checkpoint(str(ckpt), dtype=torch.float64, device="cpu")
    stock = hf_model.load_checkpoint(str(ckpt), dtype=torch.float64, device="cpu")

    def run(p, inp, pos):
        world = EmulatedWorld.for_plan(p, timeout_s=120)

        def rank(r):
            with torch.inference_mode():  # thread-local: each emulated rank enters it
                return RankRunner(model, p, world.comm(r), lambda: RankAttention(p, r, world.comm(r)),
                                  "cpu").generate(inp, pos, NEW_TOKENS)
        return world.run(rank)[0]

    lengths = set()
    for inp in inputs:
        positions = hf_inputs.global_position_ids(model, inp)
        hf_inputs.check_against_plan(plan, inp, positions)
        padded, padded_pos = hf_inputs.pad_query(plan, inp, positions)
        assert padded.total_tokens == plan.layout.total_tokens and padded.prompt_tokens == inp.total_tokens
        lengths.add(inp.total_tokens)
        got = run(plan, padded, padded_pos)
        want = run(mf.tiny_plan(inp, family, 2, 12, "56x84", *exact), inp, positions)
        kw = dict(input_ids=inp.input_ids, mm_token_type_ids=inp.mm_token_type_ids,
                  pixel_values_videos=inp.pixel_values_videos, video_grid_thw=inp.video_grid_thw)
        if inp.second_per_grid_ts is not None:
            kw["second_per_grid_ts"] = inp.second_per_grid_ts
        with torch.inference_mode():
            ref_logits = stock(**kw).logits[0, -1].float()
            ref_tokens = stock.generate(**kw, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                                        pad_token_id=0)[0, inp.total_tokens:].tolist()
        assert got.tokens == want.tokens == ref_tokens
        assert (got.first_logits - want.first_logits).abs().max() < LOGIT_ATOL
        assert (got.first_logits - ref_logits).abs().max() < LOGIT_ATOL
    assert len(lengths) == 2
