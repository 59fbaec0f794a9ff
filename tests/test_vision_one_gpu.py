"""vision.parallel=one_gpu: rank 0 runs the whole video's ViT and scatters every rank its rows (the
serving engines' placement; zigzag_ring with it is their exact context parallelism).

Planner: rank 0 encodes every grid and is charged for it (time, memory), the other ranks only
receive; a video with fewer grids than ranks plans; the default keeps every plan's bytes.
Runtime: the embeddings and the prefill logits of every local row are those of vision.parallel=frames
on the same inputs (fp64), emulated W=2 and 3 for both Qwen families, W=2 for InternVL3, and gloo
processes at W=2;
rank 0's rows are the single-process encoder's, bit for bit (the same call on the same pixels).
"""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("av")

import model_fixtures as mf  # noqa: E402
from spava_plan.entry import run
from spava_plan.hydra_conf import compose_config, with_method
from spava_plan.planner.build import build_plan, derive
from spava_plan.planner.compare import COMPARED, ONE_GPU_RING, compare, row_name
from spava_plan.planner.cost import CostModel
from spava_plan.planner.vision import vision_unit
from spava_plan.plan_load import plan_from_dict
from spava_plan.runtime.hf import attention as hf_attention, inputs as hf_inputs, model as hf_model
from spava_plan.runtime.attention import RankAttention
from spava_plan.runtime.backends.torch_ref import TorchBackend
from spava_plan.runtime.comm.emulated import EmulatedWorld
from spava_plan.runtime.generate import RankRunner
from spava_plan.runtime.vision.parallel import encode_video
from spava_plan.runtime.vision.tower import vision_module
from spava_plan.vision_exchange import plan_vision_exchange

FAMILIES = ("qwen2_vl", "qwen2_5_vl")
FRAMES, RESOLUTION = 12, "56x84"  # 6 temporal grids
# the anchor holds the first video tokens: the broadcast and the all-to-all both carry rows
EXTRA = ("method.pass_all=true", "method.anchor_tokens=20")
EXACT = 1e-10  # fp64, the same encoder call on rank 0 as in frames' ranks put together: rounding at most
BIG = ["model=qwen2_5vl_3b", "gpus=8", "frames=64", "video.resolution=1440p", "kernels=false"]


# -- planner ------------------------------------------------------------------------------------------
def test_one_gpu_charges_rank_0_for_the_whole_video():
    frames = derive(compose_config([*BIG, "method=zigzag_ring"]))
    one = derive(compose_config([*BIG, "method=zigzag_ring", "vision.parallel=one_gpu"]))
    T = one.tokens.grid_thw[0]
    assert one.exchange.grids == ((0, T),) + ((T, T),) * 7
    assert all(p[0] == 0 for p in one.exchange.shared) and all(not s for s in one.exchange.sends[1:])
    cost = CostModel(one.cfg.model, one.cfg.topology, one.cfg.dtype_bytes, 8)
    unit = cost.vision_unit(vision_unit(one.cfg.model, one.tokens.grid_thw)).us
    exchange = cost.vision_exchange(one.exchange, one.cfg.model.hidden_size * one.cfg.dtype_bytes)
    assert one.prediction.vision_us == pytest.approx(T * unit + exchange)
    assert one.prediction.vision_us > 6 * frames.prediction.vision_us  # 32 grids on one GPU instead of 4
    # rank 0 holds every grid's pixels and sends every other rank its rows; the others encode nothing
    stage = [m["vision_stage"] for m in one.memory]
    assert stage[0] > max(stage[1:]) and stage[0] > frames.memory[0]["vision_stage"]
    assert max(stage[1:]) < frames.memory[1]["vision_stage"]


def test_one_gpu_plan_round_trips_and_frames_keeps_its_bytes():
    base = ["model=tiny", "gpus=3", "frames=8", "video.resolution=112x168", "kernels=false", "method=zigzag_ring"]
    plan = build_plan(compose_config([*base, "vision.parallel=one_gpu"]))
    data = json.loads(plan.to_json())
    assert data["vision_parallel"] == "one_gpu" and data["config"]["vision"] == {"parallel": "one_gpu"}
    assert plan_from_dict(data) == plan
    frames = build_plan(compose_config(base))
    assert frames == build_plan(compose_config([*base, "vision.parallel=frames"]))
    data = json.loads(frames.to_json())  # written as before the setting existed: same bytes, same hash
    assert "vision_parallel" not in data and "vision" not in data["config"]
    assert plan_from_dict(data).vision_parallel == "frames" and plan.hash != frames.hash


def test_fewer_grids_than_ranks_plans_with_one_gpu_only():
    short = ["model=tiny", "gpus=8", "frames=8", "video.resolution=112x168", "kernels=false", "method=zigzag_ring"]
    with pytest.raises(Exception, match="frames>=16"):
        derive(compose_config(short))
    d = derive(compose_config([*short, "vision.parallel=one_gpu"]))
    assert d.exchange.grids[0] == (0, 4)


def test_comparison_shows_the_serving_engines_ring():
    cfg = compose_config([*BIG, "method=spava"])
    main = derive(cfg)
    rows = {r.method: r for r in compare(main, {m: with_method(cfg, m) for m in COMPARED if m != row_name(cfg)})}
    one, ring = rows[ONE_GPU_RING], rows["zigzag_ring"]
    assert not one.error and one.prefill_us > ring.prefill_us and one.speedup_vs_ring < 1
    assert with_method(cfg, ONE_GPU_RING).vision.parallel == "one_gpu"
    # a plan made one_gpu is its own row; the plain rows stay frame-parallel
    mine = compose_config([*BIG, "method=zigzag_ring", "vision.parallel=one_gpu"])
    assert row_name(mine) == ONE_GPU_RING and with_method(mine, "zigzag_ring").vision.parallel == "frames"


# -- runtime ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("one_gpu")
    for family in FAMILIES:
        d = root / family
        ckpt = mf.build_checkpoint(d / "ckpt", family)
        inputs = mf.tiny_inputs(ckpt, mf.write_video(d / "v.mp4", frames=FRAMES, height=56, width=84), FRAMES, family)
        torch.save(inputs, d / "inputs.pt")
    return root


def _plans(inputs, family, W):
    method = "method=zigzag_ring" if W == 2 else "method=spava"  # the exact ring, and Spava's shared rows
    return {vp: mf.tiny_plan(inputs, family, W, FRAMES, RESOLUTION, *EXTRA, method, f"vision.parallel={vp}")
            for vp in ("frames", "one_gpu")}


def _emulated(plan, model, inputs):
    """Every rank's (local video rows, logits of its local rows) under ``plan``, ranks as threads."""
    W = plan.world_size
    world = EmulatedWorld(W, timeout_s=120)
    positions = hf_inputs.global_position_ids(model, inputs)

    def rank(r: int):
        comm = world.comm(r)
        runner = RankRunner(model, plan, comm, lambda: RankAttention(plan, r, comm, TorchBackend()), "cpu")
        with torch.inference_mode():
            video = runner.vision(inputs)
            pre = runner.prefill(inputs, positions, video)
            return video, runner.logits(pre.hidden)
    return world.run(rank)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("W", [2, 3])
def test_one_gpu_equals_frames_emulated(work, family, W):
    inputs = torch.load(work / family / "inputs.pt", weights_only=False)
    model = hf_attention.install(hf_model.load_checkpoint(str(work / family / "ckpt"), dtype=torch.float64,
                                                          device="cpu"))
    plans = _plans(inputs, family, W)
    assert plan_vision_exchange(plans["one_gpu"]).grids[1:] == ((FRAMES // 2, FRAMES // 2),) * (W - 1)
    with torch.inference_mode():
        whole = encode_video(vision_module(model), inputs.pixel_values_videos, inputs.video_grid_thw)
    got = {vp: _emulated(p, model, inputs) for vp, p in plans.items()}
    for r in range(W):
        (v1, l1), (vf, lf) = got["one_gpu"][r], got["frames"][r]
        index = hf_inputs.local_indices(plans["one_gpu"].ranks[r])
        assert torch.equal(v1, whole[mf.local_video_rows(inputs, index)]), f"rank {r}: not the whole video's rows"
        assert (v1 - vf).abs().max().item() <= EXACT, f"{family} W={W} rank {r}: ViT rows"
        assert (l1 - lf).abs().max().item() <= EXACT, f"{family} W={W} rank {r}: logits"


def test_one_gpu_equals_frames_under_gloo(work):
    """W=2 gloo processes (the exactness worker of test_model_spava.py) run both plans; each rank's
    rows and logits agree with the other placement's and with the emulated world's."""
    W, family = 2, "qwen2_vl"
    inputs = torch.load(work / family / "inputs.pt", weights_only=False)
    plans = _plans(inputs, family, W)
    outs = {}
    for vp, plan in plans.items():
        plan.save(work / family / f"plan_W{W}.json")
        code = f"import model_fixtures as mf; mf.exactness_worker({str(work)!r}, {family!r}, 2)"
        for rank, (rc, _, err) in enumerate(mf.launch(lambda r: ["-c", code], W, cwd=mf.Path(mf.__file__).parent,
                                                      timeout=240)):
            assert rc == 0, f"{vp} rank {rank} failed:\n{err[-3000:]}"
        outs[vp] = [torch.load(work / family / f"out_torch_W{W}_rank{r}.pt") for r in range(W)]
    for r in range(W):
        a, b = outs["one_gpu"][r], outs["frames"][r]
        assert torch.equal(a["index"], b["index"]) and a["tokens"] == b["tokens"]
        assert (a["video"] - b["video"]).abs().max().item() <= EXACT, f"rank {r}: ViT rows"
        assert (a["logits"] - b["logits"]).abs().max().item() <= EXACT, f"rank {r}: logits"


@pytest.mark.parametrize("rank", [0, 1])
def test_single_rank_mode_runs_both_sides_of_the_scatter(tmp_path, capsys, rank):
    """spava-run rank=R (runtime/solo.py): rank 0 encodes the whole video and sends, rank 1 encodes
    nothing and receives (its rows filled as a peer's)."""
    plan = build_plan(compose_config(["model=tiny", "gpus=2", "frames=32", "video.resolution=224x224",
                                      "method=zigzag_ring", "vision.parallel=one_gpu", "kernels=false"]))
    path = plan.save(tmp_path / "plan.json")
    rc = run.main([f"plan={path}", "model.init=random", f"rank={rank}", "max_new_tokens=2", "device=cpu"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert f"timing (rank {rank}, single-rank)" in out.out


def test_one_gpu_equals_frames_for_internvl3_emulated(tmp_path):
    """InternVL3 (the exchange in embedding-row space, frame text between the tiles), W=2 threads."""
    ckpt = mf.build_internvl_checkpoint(tmp_path / "ckpt")
    inputs = mf.tiny_internvl_inputs(ckpt, mf.write_video(tmp_path / "v.mp4", frames=12, height=56, width=84), 11)
    model = hf_attention.install(hf_model.load_checkpoint(str(ckpt), dtype=torch.float64, device="cpu"))
    plans = {vp: mf.tiny_internvl_plan(inputs, 2, 11, "method.pass_all=true", "method.anchor_tokens=150",
                                       f"vision.parallel={vp}") for vp in ("frames", "one_gpu")}
    got = {vp: _emulated(p, model, inputs) for vp, p in plans.items()}
    for r in range(2):
        (v1, l1), (vf, lf) = got["one_gpu"][r], got["frames"][r]
        assert v1.shape[0] > 0 and (v1 - vf).abs().max().item() <= EXACT, f"rank {r}: tile rows"
        assert (l1 - lf).abs().max().item() <= EXACT, f"rank {r}: logits"
