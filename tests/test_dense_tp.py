"""method=dense_tp: the planner's shards, cost, memory and schedule, and the runtime's tensor-parallel
rank (weights sliced from the real model, all-reduces through the communicator) against the
runtime's own dense path in fp64: emulated W=2 and 4, gloo W=2, tiny Qwen2-VL / Qwen2.5-VL / InternVL3."""
from __future__ import annotations

import pytest

from spava_plan.errors import InfeasiblePlanError
from spava_plan.hydra_conf import compose_config
from spava_plan.links import ALL_REDUCE
from spava_plan.planner import dense_tp
from spava_plan.planner.build import build_plan, derive
from spava_plan.planner.cost import CostModel
from spava_plan.tp_shards import model_shards

HEADLINE = ["model=qwen2_5vl_3b", "frames=64", "video.resolution=1440p", "topology=h100_sxm"]
TOL = 1e-10


def _cfg(*extra):
    return compose_config([*HEADLINE, *extra])


# -- shards -----------------------------------------------------------------------------------------
def test_shards_cover_every_head_and_column_once():
    m = _cfg().model  # 16 q heads, 2 KV heads, MLP 11008, ViT 16 heads, ViT MLP 3420
    for w in (1, 2, 4, 8):
        shards = model_shards(m, w)
        q = [h for s in shards for h in range(*s.q_heads)]
        assert q == list(range(m.num_heads))
        assert [c for s in shards for c in range(*s.mlp)] == list(range(m.intermediate_size))
        assert [c for s in shards for c in range(*s.vit_mlp)] == list(range(m.vision.intermediate_size))
        for s in shards:  # each rank's KV head(s) are the ones its q heads read
            group = m.num_heads // m.num_kv_heads
            assert {h // group for h in range(*s.q_heads)} == set(range(*s.kv_heads))
            assert s.kv_replicated == (m.num_kv_heads % w != 0)
    assert {s.vit_intermediate for s in model_shards(m, 8)} == {427, 428}  # 3420 is no multiple of 8


@pytest.mark.parametrize("gpus, what", [(3, "query heads"), (32, "query heads")])
def test_a_world_that_does_not_divide_the_heads_is_refused_by_name(gpus, what):
    with pytest.raises(InfeasiblePlanError) as exc:
        derive(_cfg(f"gpus={gpus}", "method=dense_tp", *(["nodes=4"] if gpus > 8 else [])))
    assert exc.value.setting == "gpus" and what in str(exc.value)


def test_mlp_width_not_divisible_is_refused_by_name():
    with pytest.raises(InfeasiblePlanError) as exc:
        derive(_cfg("gpus=4", "method=dense_tp", "model.intermediate_size=11010"))
    assert exc.value.setting == "gpus" and "MLP" in str(exc.value)


# -- cost, schedule, memory ---------------------------------------------------------------------------
def test_cost_is_the_dense_layer_over_w_plus_two_all_reduces():
    w = 8
    cfg = _cfg(f"gpus={w}", "method=dense_tp")
    d = derive(cfg)
    n = d.layout.total_tokens
    full = CostModel(cfg.model, cfg.topology, cfg.dtype_bytes, w)
    shard = dense_tp.layer_cost_model(cfg, w)
    # matmul and attention FLOPs of a rank are 1/W of the dense model's, but for the KV projections:
    # 2 KV heads over 8 ranks, each rank computes the one it reads (vLLM's replication)
    m = cfg.model
    assert shard.out_mlp(n).flops * w == pytest.approx(full.out_mlp(n).flops)
    qkv_share = (m.num_heads // w + 2 * 1) / (m.num_heads + 2 * m.num_kv_heads)
    assert shard.qkv(n).flops == pytest.approx(full.qkv(n).flops * qkv_share)
    two = dense_tp.layer_cost_model(_cfg("gpus=2", "method=dense_tp"), 2)  # KV heads sharded: exactly 1/W
    assert two.qkv(n).flops * 2 == pytest.approx(CostModel(m, cfg.topology, cfg.dtype_bytes, 2).qkv(n).flops)
    causal = ((n, True),)
    assert shard.attention(n, causal).flops * w == pytest.approx(full.attention(n, causal).flops)
    colls = {c.name: c for c in d.collectives}
    assert set(colls) == {"reduce_attn", "reduce_mlp"}
    for c in colls.values():
        assert c.kind == "all_reduce" and c.bytes_per_rank == n * cfg.model.hidden_size * cfg.dtype_bytes
        assert c.time_us == pytest.approx(full.links.transfer_us(ALL_REDUCE, c.bytes_per_rank, w))
    plan = build_plan(cfg)
    ops = [o.name for o in plan.schedule[3].ops]
    assert ops == ["qkv", "attend", "start:reduce_attn", "wait:reduce_attn", "out_mlp", "start:reduce_mlp",
                   "wait:reduce_mlp"]
    # the all-reduces block the layer: the rank's layer time includes both in full
    s = plan.schedule[3]
    compute = sum(o.end_us - o.start_us for o in s.ops if o.kind == "compute")
    assert s.layer_us == pytest.approx(compute + sum(c.time_us for c in colls.values()), rel=1e-6)
    assert len(set(plan.prediction.rank_us)) == 1  # every rank does the same work


@pytest.mark.parametrize("model", ["qwen2_5vl_3b", "qwen2vl", "internvl3_2b"])
def test_one_rank_of_dense_tp_is_dense(model):
    """W=1: the shard is the whole model, the all-reduces cost nothing: the same prediction and memory
    as method=dense (the TP cost, ViT and weight formulas agree with the dense ones)."""
    over = [f"model={model}", "frames=32", "video.resolution=720p", "gpus=1"]
    tp, dense = derive(compose_config(over + ["method=dense_tp"])), derive(compose_config(over + ["method=dense"]))
    assert tp.prediction.makespan_us == pytest.approx(dense.prediction.makespan_us, rel=1e-12)
    assert tp.prediction.vision_us == pytest.approx(dense.prediction.vision_us, rel=1e-12)
    assert tp.memory[0] == dense.memory[0]


def test_memory_holds_the_shard_and_the_whole_prompts_kv_of_its_heads():
    w = 8
    cfg = _cfg(f"gpus={w}", "method=dense_tp")
    d, dense = derive(cfg), derive(_cfg("gpus=1", "method=dense"))
    m = d.memory[0]
    kv_heads = 1  # 2 KV heads over 8 ranks: one replicated head each
    assert m["kv_cache"] == d.layout.total_tokens * cfg.model.num_layers * 2 * kv_heads * cfg.model.head_dim * 2
    assert m["kv_cache"] * cfg.model.num_kv_heads == dense.memory[0]["kv_cache"]
    assert dense.memory[0]["weights"] / w < m["weights"] < dense.memory[0]["weights"] / 2  # embeddings replicated


def test_dense_tp_is_in_every_comparison_and_the_tuners_candidates():
    from spava_plan.planner.compare import COMPARED
    from spava_plan.planner.tune import candidates
    from spava_plan.hydra_conf import method_preset

    assert "dense_tp" in COMPARED
    cands, _ = candidates(_cfg("gpus=8", "tune=latency"), method_preset)
    assert sorted(c.gpus for c in cands if c.method == "dense_tp") == [1, 2, 4, 8]


def test_tuner_bounds_never_exceed_the_prediction():
    from spava_plan.planner.tune import bounds

    for w in (1, 2, 4, 8):
        cfg = _cfg(f"gpus={w}", "method=dense_tp")
        time, peak, _ = bounds(cfg)
        d = derive(cfg, require_fit=False, detail=False)
        assert time <= d.prediction.makespan_us * (1 + 1e-9) and peak <= max(d.prediction.peak_memory_bytes)


def test_plan_round_trips_and_load_checks_the_all_reduces(tmp_path):
    from spava_plan.plan_load import load_plan

    plan = build_plan(_cfg("gpus=4", "method=dense_tp"))
    plan.save(tmp_path / "plan.json")
    assert load_plan(tmp_path / "plan.json") == plan
    assert all(r.local == ((0, plan.layout.total_tokens),) and r.decode_appends for r in plan.ranks)


# -- runtime: exactness against the runtime's dense path ----------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("av")
    import tp_fixtures as tf

    from spava_plan.runtime.hf import inputs as hf_inputs, model as hf_model
    from spava_plan.runtime.attention import RankAttention
    from spava_plan.runtime.comm.emulated import EmulatedWorld
    from spava_plan.runtime.generate import RankRunner

    root = tmp_path_factory.mktemp("dense_tp")
    out = {}
    for family in tf.FAMILIES:
        d = root / family
        ckpt, inputs = tf.build(d, family)
        torch.save(inputs, d / "inputs.pt")
        for w in (2, 4):
            tf.plan(inputs, family, w, "dense_tp").save(d / f"tp_W{w}.json")
        dense_plan = tf.plan(inputs, family, 1, "dense")
        model = hf_model.load_checkpoint(str(ckpt), dtype=torch.float64, device="cpu")
        positions = hf_inputs.global_position_ids(model, inputs)
        world = EmulatedWorld(1, timeout_s=60)
        runner = RankRunner(model, dense_plan, world.comm(0), lambda: RankAttention(dense_plan, 0, world.comm(0)),
                            "cpu")
        out[family] = world.run(lambda r: tf.run_rank(runner, inputs, positions))[0]
    return root, out


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "internvl3"])
@pytest.mark.parametrize("w", [2, 4])
def test_emulated_dense_tp_equals_dense(tiny, family, w):
    import torch
    import tp_fixtures as tf

    from spava_plan.plan_load import load_plan
    from spava_plan.runtime.hf import inputs as hf_inputs, model as hf_model
    from spava_plan.runtime.comm.emulated import EmulatedWorld
    from spava_plan.runtime.tensor_parallel import TPRankRunner, tp_model

    root, refs = tiny
    d = root / family
    plan = load_plan(d / f"tp_W{w}.json")
    inputs = torch.load(d / "inputs.pt", weights_only=False)
    model = hf_model.load_checkpoint(str(d / "ckpt"), dtype=torch.float64, device="cpu")
    positions = hf_inputs.global_position_ids(model, inputs)
    world = EmulatedWorld(w, timeout_s=60)
    outs = world.run(lambda r: tf.run_rank(TPRankRunner(model, plan, world.comm(r), "cpu"), inputs, positions))
    ref_logits, ref_tokens = refs[family]
    n = inputs.prompt_tokens
    for rank, (logits, tokens) in enumerate(outs):
        err = (logits[:n] - ref_logits[:n]).abs().max().item()
        assert err <= TOL, f"{family} W={w} rank {rank}: max |logit diff| {err:.2e}"
        assert tokens == ref_tokens, f"{family} W={w} rank {rank}"
    # the ranks really hold shards: rank 1's q projection has its heads' rows only
    shard = tp_model(model, plan, 1)
    from spava_plan.runtime.hf.attention import language_model

    q = language_model(shard).layers[0].self_attn.q_proj
    assert q.out_features == plan.model.num_heads // w * plan.model.head_dim
    full_q = language_model(model).layers[0].self_attn.q_proj
    hd = plan.model.head_dim * plan.model.num_heads // w
    assert torch.equal(q.weight, full_q.weight[hd: 2 * hd])


def test_solo_rank_runs_its_shard_with_random_peer_shares(tiny):
    """Single-rank mode: the all-reduce adds a random tensor for the peers (the output is meaningless
    but the rank's work and sizes are the real ones)."""
    import torch
    import tp_fixtures as tf

    from spava_plan.plan_load import load_plan
    from spava_plan.runtime.hf import inputs as hf_inputs, model as hf_model
    from spava_plan.runtime.solo import SoloComm
    from spava_plan.runtime.tensor_parallel import TPRankRunner

    root, refs = tiny
    d = root / "qwen2_vl"
    plan = load_plan(d / "tp_W2.json")
    inputs = torch.load(d / "inputs.pt", weights_only=False)
    model = hf_model.load_checkpoint(str(d / "ckpt"), dtype=torch.float64, device="cpu")
    positions = hf_inputs.global_position_ids(model, inputs)
    logits, tokens = tf.run_rank(TPRankRunner(model, plan, SoloComm(1, 2), "cpu"), inputs, positions)
    assert logits.shape == refs["qwen2_vl"][0].shape and torch.isfinite(logits).all() and len(tokens) == tf.NEW_TOKENS
    assert (logits - refs["qwen2_vl"][0]).abs().max() > 1e-3  # the peers' shares were random


def test_gloo_dense_tp_equals_dense(tiny):
    import torch
    import model_fixtures as mf

    root, refs = tiny
    results = mf.launch(lambda r: ["-c", f"import tp_fixtures as tf; tf.gloo_worker({str(root)!r})"], 2,
                        cwd=mf.Path(mf.__file__).parent, timeout=300)
    for rank, (rc, _, err) in enumerate(results):
        assert rc == 0, f"rank {rank} failed:\n{err[-3000:]}"
    for family, (ref_logits, ref_tokens) in refs.items():
        inputs = torch.load(root / family / "inputs.pt", weights_only=False)
        n = inputs.prompt_tokens
        for rank in range(2):
            out = torch.load(root / family / f"tp_W2_rank{rank}.pt")
            # another process (one thread, conftest.py): the model's fp32 RMSNorm rounds the fp64 sums'
            # last bits away, so the logits came out bit-identical here; 1e-10 is the requirement
            err = (out["logits"][:n] - ref_logits[:n]).abs().max().item()
            assert err <= TOL, f"{family} rank {rank}: max |logit diff| {err:.2e}"
            assert out["tokens"] == ref_tokens, f"{family} rank {rank}"


def test_random_weights_build_each_shard_alone():
    """model.init=random: the full model exists only on the meta device; each rank's shard gets its own
    random weights of the sliced shapes, and transformers' own buffers (RoPE frequencies)."""
    torch = pytest.importorskip("torch")
    from spava_plan.runtime.hf import model as hf_model
    from spava_plan.runtime.hf.attention import language_model
    from spava_plan.runtime.tensor_parallel import tp_model

    plan = build_plan(compose_config(["model=tiny", "method=dense_tp", "gpus=2", "frames=8", "kernels=false",
                                      "model.family=qwen2_5_vl", "model.name=tiny_25", "model.tokens_per_second=2"]))
    meta = hf_model.random_model(plan.model, dtype=torch.float32, device="meta")
    real = dict(hf_model.random_model(plan.model, dtype=torch.float32, device="cpu").named_buffers())
    shards = [tp_model(meta, plan, r, "cpu") for r in range(2)]
    for s in shards:
        assert all(not p.is_meta and torch.isfinite(p).all() for p in s.parameters())
        assert all(torch.equal(b, real[n]) for n, b in s.named_buffers())
        q = language_model(s).layers[0].self_attn.q_proj
        assert q.weight.shape == (plan.model.num_heads // 2 * plan.model.head_dim, plan.model.hidden_size)
    assert all(p.is_meta for p in meta.parameters())  # the full model was never allocated
    a, b = (language_model(s).layers[0].self_attn.q_proj.weight for s in shards)
    assert not torch.equal(a, b)  # each rank's own random values


def test_a_video_of_fewer_grids_than_ranks_runs_under_dense_tp(tmp_path):
    """dense_tp's every rank encodes every temporal grid with its shard of the tower: one grid on 4
    ranks is a valid input (frame-parallel methods need a grid per rank and refuse it naming frames)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("transformers")
    plan = build_plan(compose_config(["model=tiny", "gpus=4", "frames=2", "video.resolution=112x168", "kernels=false",
                                      "method=dense_tp"]))
    plan.save(tmp_path / "plan.json")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    p = subprocess.run([sys.executable, "-m", "spava_plan.entry.run", f"plan={tmp_path / 'plan.json'}", "model=tiny",
                        "model.init=random", "device=cpu", "max_new_tokens=2"], cwd=str(tmp_path), env=env,
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "answer: token ids" in p.stdout, p.stdout
