"""Dynamic NTK RoPE (InternVL3's rope_scaling) across ranks: the stock model rescales its rotary
frequencies from the largest position of the whole prompt at prefill and of the new token at every
decode step; every rank must do the same, not rescale from its own rows (runtime/rope.py).

The end-to-end tests run a tiny InternVL3 whose max_position_embeddings (256) is a fifth of the
prompt, and a tiny Qwen2-VL (M-RoPE: transformers rescales from the largest of the three position
ids) given dynamic scaling past a quarter of its prompt's positions, under gloo with W = 2 and 3
(and ZigZagRing for InternVL3), pass_all (exact attention) in fp64, on a plan made for a longer
question than the one asked (so the query segment is padded with positions past the prompt, as
spava-run and spava-serve do for most questions), and compare every real row's logits and the greedy
tokens (10: prefill + 9 decode steps, all past the threshold) and the logits of every decode step
with the stock single-process model.
"""
from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("av")

import model_fixtures as mf  # noqa: E402
from spava_plan.errors import ConfigError, PlanMismatchError  # noqa: E402
from spava_plan.plan import RopeScalingSpec  # noqa: E402
from spava_plan.runtime.hf import model as hf_model
from spava_plan.runtime import rope  # noqa: E402

# a fifth of the InternVL3 prompt (1,200 tokens); a quarter of the tiny Qwen2-VL's largest M-RoPE
# position (29: its 36 video tokens take 6 temporal positions)
MAX_POSITIONS = {"internvl3": 256, "qwen2_vl": 8}
FACTOR = 2.0
NEW_TOKENS = 10
SHORT_QUESTION = "What happens?"  # shorter than mf.QUESTION, the plan's question capacity
# fp64 logits (lm_head on the fp64 hidden states; runner.logits and generate keep fp32 ones): the
# gloo workers run on another kernel level (conftest.py), and merge attention parts in another order,
# so the rows agree to fp64 rounding, not bit for bit. A rank that rescales from its own rows (or
# from the padded query's positions) is off by about 1e-1.
LOGIT_ATOL = 1e-10


def build_dynamic(path: Path, family: str, seed: int = 0) -> Path:
    """mf.build_internvl_checkpoint / mf.build_checkpoint with dynamic RoPE and a short pretraining
    length (MAX_POSITIONS[family])."""
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    if family == "internvl3":
        from spava_plan.runtime.hf.internvl_inputs import internvl_image_processor

        tokenizer = mf.build_internvl_tokenizer()
        config, processor = mf.tiny_internvl_config(tokenizer), internvl_image_processor(mf.TINY_INTERNVL_TILE)
    else:
        tokenizer = mf.build_tokenizer()
        config, processor = mf.tiny_config(family, tokenizer), mf.build_image_processor()
    tc = config.text_config
    tc.rope_parameters = dict(tc.rope_parameters, rope_type="dynamic", factor=FACTOR)
    tc.max_position_embeddings = MAX_POSITIONS[family]
    tc.initializer_range = 0.15  # spread the logits: no near-ties for greedy argmax
    config.vision_config.initializer_range = 0.1
    torch.manual_seed(seed)
    getattr(transformers, hf_model.FAMILIES[family])(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def rope_overrides(family: str) -> tuple[str, ...]:
    return ("model.rope_scaling.rope_type=dynamic", f"model.rope_scaling.factor={FACTOR}",
            f"model.max_position_embeddings={MAX_POSITIONS[family]}")


def rank_answer(plan, inputs, model, comm, max_new_tokens: int) -> dict:
    """One rank's answer to the short question padded to the plan's capacity (as spava-run pads
    it): the greedy tokens, then again step by step the fp64 logits of every local row and of each
    decode step (runner.logits rounds to fp32)."""
    from spava_plan.runtime.hf import inputs as hf_inputs
    from spava_plan.runtime.attention import RankAttention
    from spava_plan.runtime.backends.torch_ref import TorchBackend
    from spava_plan.runtime.generate import RankRunner

    positions = hf_inputs.global_position_ids(model, inputs)
    inputs, positions = hf_inputs.pad_query(plan, inputs, positions)
    assert inputs.pad_tokens > 0
    runner = RankRunner(model, plan, comm, lambda: RankAttention(plan, comm.rank, comm, TorchBackend()), "cpu")
    with torch.inference_mode():
        result = runner.generate(inputs, positions, max_new_tokens)
        pre = runner.prefill(inputs, positions, runner.vision(inputs))
        logits = model.lm_head(pre.hidden)
        start = int(positions[:, :inputs.prompt_tokens].max()) + 1
        steps = [model.lm_head(runner.decode_step(t, start + i)) for i, t in enumerate(result.tokens[:-1])]
    return {"index": pre.index, "logits": logits, "tokens": result.tokens, "steps": torch.stack(steps)}


def _load(root: Path, name: str):
    from spava_plan.plan_load import load_plan
    from spava_plan.runtime.hf import attention as hf_attention

    plan = load_plan(root / f"{name}.json")
    inputs = torch.load(root / "inputs.pt", weights_only=False)
    model = hf_attention.install(hf_model.load_checkpoint(str(root / "ckpt"), dtype=torch.float64, device="cpu"))
    hf_model.check_model(plan, model)
    return plan, inputs, model


def rope_worker(work: str, name: str, max_new_tokens: int) -> None:
    """One gloo rank: rank_answer, saved for the parent."""
    from spava_plan.runtime.comm.dist import TorchDistComm

    comm = TorchDistComm.from_env(backend="gloo", timeout_s=120)
    root = Path(work)
    try:
        plan, inputs, model = _load(root, name)
        torch.save(rank_answer(plan, inputs, model, comm, max_new_tokens), root / f"out_{name}_rank{comm.rank}.pt")
    except BaseException:
        comm.close()
        raise
    comm.barrier()  # as mf.exactness_worker: every rank done before the group goes, no teardown
    comm.close()
    sys.stdout.flush()
    os._exit(0)


def stock_answer(ckpt: str, inputs, max_new_tokens: int, family: str) -> dict:
    """The stock model's fp64 logits of every prompt row, its greedy tokens (``generate``) and the
    fp64 logits of every decode step (the same steps, written out: generate keeps fp32 logits).
    Each from a freshly loaded model: its rotary module keeps the longest sequence it has seen, so
    a forward after another would rotate with that one's length."""
    def fresh():
        return hf_model.load_checkpoint(ckpt, dtype=torch.float64, device="cpu")

    if family == "internvl3":
        kw = dict(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values_videos)
    else:
        kw = dict(input_ids=inputs.input_ids, mm_token_type_ids=inputs.mm_token_type_ids,
                  pixel_values_videos=inputs.pixel_values_videos, video_grid_thw=inputs.video_grid_thw)
    with torch.inference_mode():
        gen = fresh().generate(**kw, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                               pad_token_id=0)
        tokens = gen[0, inputs.total_tokens:].tolist()
        model = fresh()
        # transformers 5.25 renamed the forward's past_key_values to cache
        key = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
        out = model(**kw, use_cache=True)
        logits, steps = out.logits[0], []
        for t in tokens[:-1]:
            out = model(input_ids=torch.tensor([[t]]), use_cache=True, **{key: out.past_key_values})
            steps.append(out.logits[0, -1])
    steps = torch.stack(steps)
    assert steps.argmax(-1).tolist() == tokens[1:]  # the steps written out are generate's
    return dict(logits=logits, tokens=tokens, steps=steps)


CASES = {"internvl3": {"spava_W2": (2, "method.pass_all=true"), "spava_W3": (3, "method.pass_all=true"),
                       "ring_W2": (2, "method=zigzag_ring")},
         "qwen2_vl": {"spava_W2": (2, "method.pass_all=true"), "spava_W3": (3, "method.pass_all=true")}}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Per family (built on first use): checkpoint, the short-question inputs, plans for the long
    question, the stock answers."""
    built: dict = {}

    def get(family: str):
        if family not in built:
            built[family] = _build(tmp_path_factory.mktemp(family), family)
        return built[family]
    return get


def _build(root: Path, family: str):
    ckpt = build_dynamic(root / "ckpt", family)
    video = mf.write_video(root / "v.mp4", frames=12, height=56, width=84)
    if family == "internvl3":
        capacity = mf.tiny_internvl_inputs(ckpt, video, 11)  # the plan's question: mf.QUESTION
        inputs = mf.tiny_internvl_inputs(ckpt, video, 11, question=SHORT_QUESTION)
        assert inputs.total_tokens > 4 * MAX_POSITIONS[family]
    else:
        capacity = mf.tiny_inputs(ckpt, video, 12, family)
        inputs = mf.tiny_inputs(ckpt, video, 12, family, question=SHORT_QUESTION)
    assert inputs.total_tokens < capacity.total_tokens
    torch.save(inputs, root / "inputs.pt")
    for name, (W, method) in CASES[family].items():
        if family == "internvl3":  # an anchor that ends inside the second frame's tile (test_model_internvl.py)
            plan = mf.tiny_internvl_plan(capacity, W, 11, method, "method.anchor_tokens=150", *rope_overrides(family))
        else:  # the anchor holds the first video tokens (tests/test_model_spava.py)
            plan = mf.tiny_plan(capacity, family, W, 12, "56x84", method, "method.anchor_tokens=20",
                                *rope_overrides(family))
        plan.save(root / f"{name}.json")
    return root, inputs, stock_answer(str(ckpt), inputs, NEW_TOKENS, family)


@pytest.mark.parametrize("family, name", [(f, n) for f, cases in CASES.items() for n in cases])
def test_dynamic_rope_equals_stock_model_under_gloo(work, family, name):
    """Every real row's prefill logits on every rank, the logits of every decode step and the greedy
    tokens equal the stock model's, for Spava with every token passed (W = 2, 3) and ZigZagRing
    (ranks without the prompt's end); InternVL3 (1-D RoPE) and Qwen2-VL (M-RoPE)."""
    root, inputs, ref = work(family)
    W = CASES[family][name][0]
    code = f"import test_rope_scaling as t; t.rope_worker({str(root)!r}, {name!r}, {NEW_TOKENS})"
    results = mf.launch(lambda r: ["-c", code], W, cwd=Path(__file__).parent, timeout=240)
    for rank, (rc, _, err) in enumerate(results):
        assert rc == 0, f"rank {rank} failed:\n{err[-3000:]}"
    _check(family, name, inputs, ref, [torch.load(root / f"out_{name}_rank{rank}.pt") for rank in range(W)])


def test_ranks_as_threads_sharing_one_model(work):
    """W = 3 ranks emulated as threads over ONE model (the stock rotary module would be shared
    state): the same answers."""
    from spava_plan.runtime.comm.emulated import EmulatedWorld

    root, inputs, ref = work("internvl3")
    plan, inputs, model = _load(root, "spava_W3")
    world = EmulatedWorld(plan.world_size, timeout_s=120)
    _check("internvl3", "spava_W3 (threads)", inputs, ref,
           world.run(lambda r: rank_answer(plan, inputs, model, world.comm(r), NEW_TOKENS)))


def _check(family: str, name: str, inputs, ref: dict, outs: list[dict]) -> None:
    assert len(ref["tokens"]) == NEW_TOKENS
    seen: set[int] = set()
    for rank, out in enumerate(outs):
        real = out["index"] < inputs.total_tokens  # the query padding has no stock counterpart
        index = out["index"][real]
        err = (out["logits"][real] - ref["logits"][index]).abs().max().item()
        assert err <= LOGIT_ATOL, f"{family} {name} rank {rank}: max |prefill logit diff| {err:.2e}"
        err = (out["steps"] - ref["steps"]).abs().max().item()
        assert err <= LOGIT_ATOL, f"{family} {name} rank {rank}: max |decode logit diff| {err:.2e}"
        assert out["tokens"] == ref["tokens"], f"{family} {name} rank {rank}"
        seen.update(index.tolist())
    assert seen == set(range(inputs.total_tokens))  # every prompt token's logits were compared


# -- the pieces ------------------------------------------------------------------------------------
def _plan(*overrides: str):
    from spava_plan.hydra_conf import compose_config
    from spava_plan.planner.build import build_plan

    return build_plan(compose_config(["model=tiny_internvl3", "gpus=2", "frames=8", *overrides]))


def test_presets_record_the_published_scalings():
    """InternVL3's checkpoints: dynamic NTK, factor 2 past 32768 positions; Qwen's: none."""
    from spava_plan.hydra_conf import compose_config
    from spava_plan.plan import ModelSpec

    for name, want in [("internvl3_2b", RopeScalingSpec("dynamic", 2.0, 32768)),
                       ("internvl3_8b", RopeScalingSpec("dynamic", 2.0, 32768)),
                       ("qwen2vl", RopeScalingSpec("default", 1.0, 32768)),
                       ("qwen2_5vl_3b", RopeScalingSpec("default", 1.0, 128000))]:
        assert ModelSpec.from_config(compose_config([f"model={name}"]).model).rope_scaling == want, name


@pytest.mark.parametrize("override, setting", [
    ("model.rope_scaling.rope_type=yarn", "model.rope_scaling.rope_type"),
    ("model.rope_scaling.factor=0.5", "model.rope_scaling.factor"),
    ("model.rope_scaling.factor=2.0", "model.rope_scaling.factor"),  # with rope_type default
    ("model.max_position_embeddings=0", "model.max_position_embeddings"),
])
def test_bad_scalings_are_refused_naming_the_setting(override, setting):
    from spava_plan.config import to_config
    from spava_plan.hydra_conf import compose_config

    with pytest.raises(ConfigError) as info:
        to_config(compose_config(["model=tiny_internvl3", override]))
    assert setting in str(info.value)


def test_plan_file_records_the_scaling_and_refuses_a_bad_one(tmp_path):
    import json

    from spava_plan.errors import PlanFormatError
    from spava_plan.plan import content_hash
    from spava_plan.plan_load import load_plan

    plan = _plan(*rope_overrides("internvl3"))
    assert plan.model.rope_scaling == RopeScalingSpec("dynamic", FACTOR, MAX_POSITIONS["internvl3"])
    assert load_plan(plan.save(tmp_path / "plan.json")) == plan
    data = json.loads(plan.to_json())
    data["model"]["rope_scaling"]["factor"] = 0.25
    data["hash"] = content_hash(data)
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(PlanFormatError, match="model.rope_scaling.factor"):
        load_plan(tmp_path / "bad.json")


def test_qwen_mrope_takes_dynamic_scaling():
    """transformers' Qwen2-VL rotary module takes dynamic scaling (M-RoPE ids, seq length from the
    largest of the three): the planner accepts it and a random model built from the plan has it."""
    from spava_plan.hydra_conf import compose_config
    from spava_plan.planner.build import build_plan

    plan = build_plan(compose_config(["model=tiny", "gpus=2", "frames=8", *rope_overrides("qwen2_vl")]))
    model = hf_model.random_model(plan.model, dtype=torch.float32, device="meta")
    tc = model.config.text_config
    assert rope.model_scaling(tc) == plan.model.rope_scaling
    assert tc.rope_parameters["mrope_section"] == list(plan.model.mrope_section)


def test_random_model_and_checkpoint_checks_follow_the_plan():
    """model.init=random builds the plan's scaling; a model that rotates otherwise is refused
    naming model.rope_scaling, and its settings re-plan to its own scaling."""
    from spava_plan.hydra_conf import compose_config
    from spava_plan.plan import ModelSpec

    dynamic, default = _plan(*rope_overrides("internvl3")), _plan()
    model = hf_model.random_model(dynamic.model, dtype=torch.float32, device="meta")
    hf_model.check_model(dynamic, model)
    with pytest.raises(PlanMismatchError, match="model.rope_scaling") as info:
        hf_model.check_model(default, model)
    assert "model.rope_scaling.rope_type=dynamic" in str(info.value) and "\n" not in str(info.value)
    settings = hf_model.plan_model_settings(model)
    cfg = compose_config(["model=tiny_internvl3"] + [f"{k}={v}" for k, v in settings.items() if "rope" in k
                                                     or k == "model.max_position_embeddings"])
    assert ModelSpec.from_config(cfg.model).rope_scaling == dynamic.model.rope_scaling


def _stock_rotary(family: str, seq_positions: int):
    import transformers

    params = {"rope_type": "dynamic", "factor": FACTOR, "rope_theta": 10000.0}
    if family == "internvl3":
        from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding as cls
        config = transformers.Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=seq_positions, rope_parameters=params)
    else:
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding as cls
        config = transformers.Qwen2VLConfig(text_config=dict(
            hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq_positions,
            rope_parameters=dict(params, mrope_section=[2, 3, 3]))).text_config
    return cls(config)


@pytest.mark.parametrize("family", ["internvl3", "qwen2_vl"])
@pytest.mark.parametrize("prompt", [100, 256, 257, 1000])
def test_a_ranks_rows_rotate_as_the_whole_prompt_in_the_stock_module(family, prompt):
    """A rank's rows inside sequence_length(whole prompt) get the cos/sin a fresh stock module gives
    them over the whole prompt, and each decode step after it those of the stock module stepping on
    (below the original length: the original frequencies; past it: rescaled at every step)."""
    spec = RopeScalingSpec("dynamic", FACTOR, MAX_POSITIONS["internvl3"])
    x = torch.zeros(1, 1, 64, dtype=torch.float64)

    def ids(a: int, b: int) -> torch.Tensor:
        p = torch.arange(a, b)[None]
        return p if family == "internvl3" else torch.stack([p, p // 2, p % 7])  # M-RoPE: max on row 0

    stock, ours = _stock_rotary(family, MAX_POSITIONS["internvl3"]), rope.SequenceRotary(_stock_rotary(family, MAX_POSITIONS["internvl3"]), spec)
    cos, sin = stock(x, ids(0, prompt))
    lo, hi = prompt // 3, prompt // 2  # one rank's rows: not the prompt's end
    with rope.sequence_length(prompt):
        got = ours(x, ids(lo, hi))
    # fp32 cos/sin in both (the stock forward); vectorised and tail elements may round apart
    tol = dict(rtol=0, atol=1e-6)
    assert torch.allclose(got[0], cos[..., lo:hi, :], **tol) and torch.allclose(got[1], sin[..., lo:hi, :], **tol)
    for p in range(prompt, prompt + 4):
        want = stock(x, ids(p, p + 1))
        with rope.sequence_length(p + 1):
            got = ours(x, ids(p, p + 1))
        assert all(torch.allclose(g, w, **tol) for g, w in zip(got, want)), p
    # outside sequence_length the stock module runs as it is (and keeps its own state)
    assert all(torch.equal(g, w) for g, w in zip(ours(x, ids(0, 8)), stock(x, ids(0, 8))))


def test_linear_scaling_needs_no_wrapper():
    """linear scaling divides every position by the factor whatever the sequence: the random model
    has it and the stock rotary module is left in place (the same on every rank already)."""
    from spava_plan.runtime.hf.attention import language_model

    plan = _plan("model.rope_scaling.rope_type=linear", "model.rope_scaling.factor=4.0")
    assert plan.model.rope_scaling == RopeScalingSpec("linear", 4.0, 8192)
    model = hf_model.random_model(plan.model, dtype=torch.float32, device="cpu")
    lm = language_model(model)
    stock = lm.rotary_emb
    rope.install(lm, plan.model.rope_scaling)
    assert lm.rotary_emb is stock and stock.rope_type == "linear"
    plain = hf_model.random_model(_plan().model, dtype=torch.float32, device="cpu")
    assert torch.allclose(stock.inv_freq, language_model(plain).rotary_emb.inv_freq / 4.0, rtol=1e-6, atol=0)
