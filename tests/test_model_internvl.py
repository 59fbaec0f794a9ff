"""InternVL3 end to end on a tiny model: the prompt layout against the processor's template logic,
the planner's layout against the tokenized prompt, Spava across real gloo processes (W = 2, 3)
against the stock single-process transformers model, and a plan -> spava_plan.entry.run round trip.

What is compared with what (no network here, so no real InternVL3 tokenizer):
- the video text is InternVLProcessor.replace_video_token's own output (its method, called with
  the processor's attributes), not a copy of its format;
- the token counts come from a tiny tokenizer with Qwen2's pre-tokenizer regex (digits split one
  by one, "\\n" apart from the next word) trained so that "Frame" is one token, as in Qwen2's
  vocabulary. That "Frame" is a single token of the real vocabulary is an assumption the tiny
  tokenizer cannot check.
"""
from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("av")

import model_fixtures as mf  # noqa: E402
from spava_plan.runtime.hf import inputs as hf_inputs, model as hf_model
from spava_plan.runtime.hf.internvl_inputs import IMG_CONTEXT, IMG_END, IMG_START, video_text

NEW_TOKENS = 6
# The stock Qwen2 RMSNorm normalises in fp32, so fp64 rounding-order differences (rows batched
# differently per rank) surface at fp32 resolution (as for Qwen, tests/test_model_spava.py).
LOGIT_ATOL = 1e-5
# InternViT's GEMMs see a different number of frames per call on each rank: fp64 rounding only.
VISION_ATOL = 1e-10


@pytest.fixture(scope="module")
def tokenizer():
    return mf.build_internvl_tokenizer()


@pytest.mark.parametrize("frames", [1, 9, 12])
def test_video_text_is_the_processors(frames):
    """Our frame text equals InternVLProcessor.replace_video_token's (the processor's own method)."""
    from transformers.models.internvl.processing_internvl import InternVLProcessor

    proc = types.SimpleNamespace(start_image_token=IMG_START, end_image_token=IMG_END, image_token=IMG_CONTEXT,
                                 image_seq_length=5)
    pixels = {"pixel_values_videos": [torch.zeros(frames, 3, 2, 2)]}
    assert InternVLProcessor.replace_video_token(proc, pixels, 0) == video_text(frames, 5)


@pytest.mark.parametrize("frames", [3, 9, 10, 12, 105])
def test_planner_layout_equals_the_tokenized_prompt(tokenizer, frames):
    """Token counts, the video span and every tile's position: planner/layout.py and
    spava_plan.vision_exchange against the tokenized prompt the processor would write (frame
    numbers of one, two and three digits)."""
    from spava_plan.config import to_config
    from spava_plan.hydra_conf import compose_config
    from spava_plan.planner.layout import token_layout
    from spava_plan.vision_exchange import frame_tile_spans

    proc = hf_inputs.Processing(tokenizer, None, None, mf.INTERNVL_CHAT_TEMPLATE, "parts")
    from spava_plan.runtime.hf.internvl_inputs import prompt_text

    prompt = prompt_text(proc, mf.QUESTION)
    system = len(tokenizer(prompt[:prompt.index("<video>")])["input_ids"])
    text = prompt.replace("<video>", video_text(frames, mf.TINY_INTERNVL_TOKENS))
    ids = torch.tensor(tokenizer(text)["input_ids"])
    question = len(tokenizer("\n" + mf.QUESTION)["input_ids"]) - 1  # the "\n" after the video is its own token
    cfg = to_config(compose_config(["model=tiny_internvl3", f"frames={frames}", f"video.system_tokens={system}",
                                    f"video.max_question_tokens={question}"]))
    lay = token_layout(cfg.model, cfg.video)
    assert lay.total_tokens == ids.numel()
    vid = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
    tiles = frame_tile_spans(system, frames, mf.TINY_INTERNVL_TOKENS, cfg.model.vision.frame_text_tokens)
    want = torch.zeros(ids.numel(), dtype=torch.bool)
    for a, b in tiles:
        want[a:b] = True
        assert ids[a - 1] == tokenizer.convert_tokens_to_ids(IMG_START)
        assert ids[b] == tokenizer.convert_tokens_to_ids(IMG_END)
    assert torch.equal(ids == vid, want)
    # the video ends with the "\n" after the last </img>: the question starts right after the context
    assert tokenizer.decode(ids[lay.context_tokens - 1:lay.context_tokens]) == "\n"


def test_row_space_exchange_spans_equal_brute_force():
    """Local token spans -> embedding-row spans (the exchange's coordinates): every image token of
    every span, counted one by one."""
    import random

    from spava_plan.vision_exchange import _to_rows, frame_tile_spans

    tiles = frame_tile_spans(7, 23, 5, 6)
    rows_of = {t: f * 5 + t - a for f, (a, b) in enumerate(tiles) for t in range(a, b)}
    rng = random.Random(0)
    for _ in range(200):
        a = rng.randrange(0, tiles[-1][1] + 5)
        b = rng.randrange(a, tiles[-1][1] + 10)
        want = [rows_of[t] for t in range(a, b) if t in rows_of]
        got = [r for lo, hi in _to_rows([(a, b)], tiles) for r in range(lo, hi)]
        assert got == want, (a, b)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Checkpoint, inputs, plans (W = 2, 3) and the stock model's logits, tokens and tile rows."""
    root = tmp_path_factory.mktemp("internvl")
    d = root / "internvl3"
    ckpt = mf.build_internvl_checkpoint(d / "ckpt")
    video = mf.write_video(d / "v.mp4", frames=12, height=56, width=84)
    inputs = mf.tiny_internvl_inputs(ckpt, video, 11)
    torch.save(inputs, d / "inputs.pt")
    for W in (2, 3):
        # an anchor that ends inside the second frame's tile. W=2 recomputes it on every rank: both
        # kinds of vision exchange run; W=3 broadcasts its K/V from rank 0 (method.anchor=broadcast,
        # the default): the other ranks never see its rows
        mode = "recompute" if W == 2 else "broadcast"
        mf.tiny_internvl_plan(inputs, W, 11, "method.pass_all=true", "method.anchor_tokens=150",
                              f"method.anchor={mode}").save(d / f"plan_W{W}.json")
    stock = hf_model.load_checkpoint(str(ckpt), dtype=torch.float64, device="cpu")
    kw = dict(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values_videos)
    with torch.inference_mode():
        logits = stock(**kw).logits[0]
        gen = stock.generate(**kw, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
        video = stock.model.get_image_features(pixel_values=inputs.pixel_values_videos.double()).pooler_output
    ref = dict(logits=logits, tokens=gen[0, inputs.total_tokens:].tolist(), video=video.reshape(-1, video.shape[-1]))
    return root, inputs, ref


def test_layout_and_positions_match_the_plan(work):
    root, inputs, _ = work
    from spava_plan.plan_load import load_plan

    plan = load_plan(root / "internvl3" / "plan_W2.json")
    model = hf_model.load_checkpoint(str(root / "internvl3" / "ckpt"), dtype=torch.float32, device="cpu")
    positions = hf_inputs.global_position_ids(model, inputs)
    assert torch.equal(positions, torch.arange(inputs.total_tokens).expand(3, -1))
    hf_inputs.check_against_plan(plan, inputs, positions)  # raises on any difference
    assert plan.layout.total_tokens == inputs.total_tokens


@pytest.mark.parametrize("W", [2, 3])
def test_pass_all_spava_equals_stock_model_under_gloo(work, W):
    """Every token passed: each rank's prefill logits of every local row equal the stock model's at
    that token, the greedy tokens (prefill + distributed decode) equal stock ``generate``, and each
    rank's tile rows (frame-parallel InternViT + targeted exchange) equal the stock encoder's."""
    from spava_plan.plan_load import load_plan
    from spava_plan.vision_exchange import plan_vision_exchange

    root, inputs, ref = work
    ex = plan_vision_exchange(load_plan(root / "internvl3" / f"plan_W{W}.json"))
    # recompute (W=2): the anchor's rows broadcast and the rest all-to-all; broadcast (W=3): rank 0 alone holds them
    assert bool(ex.shared) == (W == 2) and any(ex.send_rows(r) for r in range(W))
    code = f"import model_fixtures as mf; mf.exactness_worker({str(root)!r}, 'internvl3', {NEW_TOKENS})"
    results = mf.launch(lambda r: ["-c", code], W, cwd=mf.Path(mf.__file__).parent, timeout=240)
    for rank, (rc, _, err) in enumerate(results):
        assert rc == 0, f"rank {rank} failed:\n{err[-3000:]}"
    assert len(ref["tokens"]) == NEW_TOKENS
    seen = set()
    for rank in range(W):
        out = torch.load(root / "internvl3" / f"out_torch_W{W}_rank{rank}.pt")
        rows = mf.local_video_rows(inputs, out["index"])
        assert rows.numel() == out["video"].shape[0] > 0
        assert torch.allclose(out["video"], ref["video"][rows], rtol=0, atol=VISION_ATOL)
        err = (out["logits"] - ref["logits"][out["index"]]).abs().max().item()
        assert err <= LOGIT_ATOL, f"W={W} rank {rank}: max |logit diff| {err:.2e}"
        assert out["tokens"] == ref["tokens"], f"W={W} rank {rank}"
        seen.update(out["index"].tolist())
    assert seen == set(range(inputs.total_tokens))  # every prompt token's logits were compared


@pytest.mark.parametrize("name, billions", [("internvl3_2b", 2.09), ("internvl3_8b", 7.94)])
def test_random_init_builds_the_real_size_model(name, billions):
    """conf/model/<name>.yaml builds transformers' InternVL with the published parameter count
    (InternVL3-2B 2.09B, InternVL3-8B 7.94B), on the meta device."""
    from spava_plan.plan import ModelSpec
    from spava_plan.hydra_conf import compose_config

    cfg = ModelSpec.from_config(compose_config([f"model={name}"]).model)
    model = hf_model.random_model(cfg, dtype=torch.bfloat16, device="meta")
    assert type(model).__name__ == "InternVLForConditionalGeneration"
    n = sum(p.numel() for p in model.parameters()) / 1e9
    assert abs(n - billions) < 0.01, n


def test_plan_then_run_with_random_weights_answers(tmp_path):
    """spava-plan model=tiny_internvl3 gpus=2 frames=8, then spava_plan.entry.run model.init=random."""
    import re
    import subprocess
    import sys

    env = {k: v for k, v in mf.dist_env(0, 1, 0).items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    p = subprocess.run([sys.executable, "-m", "spava_plan.entry.cli", "model=tiny_internvl3", "gpus=2", "frames=8",
                        f"hydra.run.dir={tmp_path}"], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                       timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    p = subprocess.run([sys.executable, "-m", "spava_plan.entry.run", f"plan={tmp_path / 'plan.json'}", "model.init=random",
                        "max_new_tokens=3"], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.search(r"^answer: token ids( \d+){3}$", p.stdout, re.M), p.stdout
    assert "model tiny_internvl3" in p.stdout
