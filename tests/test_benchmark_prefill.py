"""benchmarks/prefill.py end to end on CPU (``smoke``: tiny Qwen2.5-VL, W=2, fp32, torch backend):
measurement lines, tables, JSON, plot and calibration are produced and consistent; plus the pieces
the benchmark adds (batched ViT attention, threaded image processing, the non-negative fit)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from prefill_methods import EMULATED, TENSOR_PARALLEL  # noqa: E402  (benchmarks/ is on sys.path)

FP32_EXACT = 1e-5  # exact methods vs dense in fp32: rounding of 2 layers only (seen ~2e-7)
METHODS = ("dense_flash", "dense_cudnn", "spava", "zigzag_ring", "zigzag_ring_one_gpu", "apb", "star", "dense_tp",
           "spava_recompute", "apb_recompute", "star_recompute")  # the smoke measures every method, both anchor modes


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("prefill")
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prefill.py"), "smoke", "--out", str(out),
                        "--write-preset"],
                       capture_output=True, text=True, timeout=600, cwd=str(out))
    assert p.returncode == 0, p.stderr[-4000:]
    data = json.loads((out / "smoke-cpu-prefill.json").read_text())
    return out, data


def test_every_cell_measures_every_method(smoke):
    _, data = smoke
    assert len(data["cells"]) == 3 and not data["not_measured"], data["not_measured"]
    for c in data["cells"]:
        assert set(c["methods"]) == set(METHODS), c["id"]
        for m, r in c["methods"].items():
            t = r["ttft_ms"]
            assert 0 < t["min"] <= t["max"] and t["median"] > 0 and t["n"] == r["repeats"] == 2, (c["id"], m)
            if m in ("dense_flash", "dense_cudnn"):  # emulated: the median is of per-rank stretches
                assert t["min"] <= t["median"] <= t["max"]
            assert r["emulated"] == (m not in ("dense_flash", "dense_cudnn"))
            if r["emulated"]:
                assert r["label"].startswith("emulated 2-rank"), r["label"]
                # dense_tp's all-reduces are charged, not done: its tokens are not compared
                assert len(r["peak_gib_per_rank"]) == 2 and (r["tokens_agree"] or m == "dense_tp")
            else:
                assert len(r["peak_gib_per_rank"]) == 1


def test_speedups_are_the_ratio_of_the_medians(smoke):
    _, data = smoke
    for c in data["cells"]:
        spava = c["methods"]["spava"]["ttft_ms"]["median"]
        for m, r in c["methods"].items():
            if m != "spava":
                assert r["spava_speedup"] == pytest.approx(r["ttft_ms"]["median"] / spava, rel=1e-9)


def test_exact_methods_reproduce_dense_first_token_logits(smoke):
    """zigzag_ring is exact attention and the cuDNN row runs the same model: only fp32 rounding apart.
    This also proves the emulated ranks run the plan's attention (a rank attending only its own
    rows would be far off)."""
    _, data = smoke
    for c in data["cells"]:
        for m in ("dense_cudnn", "zigzag_ring", "zigzag_ring_one_gpu"):
            chk = c["methods"][m]["check"]
            assert chk["rel_err"] < FP32_EXACT and chk["argmax_agree"], (c["id"], m, chk)
        for m in ("spava", "apb"):  # approximate, but the same model on the same input
            assert c["methods"][m]["check"]["rel_err"] < 0.5, (c["id"], m)
        for m in ("spava", "apb", "star"):  # the broadcast anchor computes what recompute does
            b, r = c["methods"][m]["check"], c["methods"][m + "_recompute"]["check"]
            assert abs(b["rel_err"] - r["rel_err"]) < FP32_EXACT and b["argmax_agree"] == r["argmax_agree"], (c["id"], m)


def test_emulated_attention_runs_through_the_plan_backend(smoke):
    out, _ = smoke
    recs = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    emulated = [r for r in recs if r["kind"] == "emulated"]
    assert len(emulated) == 3 * (len(EMULATED) + len(TENSOR_PARALLEL))  # 3 cells x the methods run on W ranks
    for r in emulated:
        assert len(r["per_repeat"]) == 2 and all(p["ttft_us"] > 0 for p in r["per_repeat"])
        assert {x["rank"] for x in r["replays"]} == {0, 1}
        assert all(x["attention_us"] > 0 and x["vision_us"] > 0 for x in r["replays"]), r["method"]
        # the per-repeat TTFT is at least the slowest rank's compute in that repeat
        for p in r["per_repeat"]:
            comp = max(x["compute_us"] for x in r["replays"] if x["i"] == p["i"])
            assert p["ttft_us"] >= comp * (1 - 1e-9)


def test_outputs_markdown_plot_and_calibrated_preset(smoke):
    out, data = smoke
    md = (out / "smoke-cpu-prefill.md").read_text()
    assert "emulated 2-rank" in md and "| method | TTFT median ms |" in md and "## Calibration" in md
    png = (out / "smoke-cpu-prefill.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    cal = data["calibration"]
    assert "held out" in cal["split"]  # two resolutions measured: one is held out of the fit
    assert len(cal["predicted"]) == 3 * len(METHODS)
    from omegaconf import OmegaConf

    from spava_plan.config import TopologyConfig

    topo = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TopologyConfig),
                                               OmegaConf.load(out / "h200_calibrated.yaml")))
    for k, v in cal["rates_after"].items():
        assert getattr(topo, k) == v > 0  # the predictions after calibration used the preset's values
    for m, e in data["errors_by_method"].items():
        assert e["cells"] == 3 and math.isfinite(e["mean_abs_after"])


@pytest.mark.parametrize("preset", sorted(p.stem for p in (ROOT / "conf" / "topology").glob("*_calibrated.yaml")))
def test_committed_calibrated_presets_compose(preset):
    from spava_plan.hydra_conf import compose_config

    cfg = compose_config([f"topology={preset}"])
    assert cfg.topology.name == preset and cfg.topology.gemm_tflops > 0 and cfg.topology.attention_tflops > 0


def test_nnls_recovers_known_scales_and_never_goes_negative():
    from calibrate import nnls

    A = [[1.0, 0.5, 0.0], [0.2, 1.0, 0.3], [0.0, 0.4, 1.0], [0.7, 0.1, 0.2]]
    s = [2.0, 0.5, 1.5]
    y = [sum(a * x for a, x in zip(row, s)) for row in A]
    assert nnls(A, y) == pytest.approx(s, rel=1e-9)
    y_neg = [sum(a * x for a, x in zip(row, [1.0, -3.0, 1.0])) for row in A]
    assert min(nnls(A, y_neg)) >= 0.0


def test_batched_vision_attention_equals_the_stock_per_window_loop():
    """Uneven windows (13 x 9 merged tokens in windows of 4) and a full-attention layer, fp32."""
    import torch

    from spava_plan.plan import ModelSpec
    from spava_plan.hydra_conf import compose_config
    from spava_plan.runtime.vision import attention as vision_attention
    from spava_plan.runtime.hf.model import random_model
    from spava_plan.runtime.vision.parallel import visual_embeddings
    from spava_plan.runtime.vision.tower import vision_module

    cfg = ModelSpec.from_config(compose_config(["model=tiny", "model.family=qwen2_5_vl", "model.name=tiny_25",
                                                "model.tokens_per_second=2"]).model)
    model = random_model(cfg, dtype=torch.float32, device="cpu")
    grid = torch.tensor([[3, 26, 18]])
    pixels = torch.randn(int(grid.prod()), 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = visual_embeddings(vision_module(model), pixels, grid)
        vision_attention.install(model)
        try:
            got = visual_embeddings(vision_module(model), pixels, grid)
        finally:
            vision_attention.uninstall(model)
    assert float((got - ref).abs().max()) <= 1e-6 * float(ref.abs().max())


def test_threaded_image_processing_equals_one_call():
    import numpy as np
    import torch

    from prefill import ThreadedImages
    from spava_plan.runtime.hf import inputs as hf_inputs

    frames = np.random.default_rng(0).integers(0, 256, size=(6, 60, 90, 3), dtype=np.uint8)
    proc = hf_inputs.default_processing()
    ref = hf_inputs.video_pixels(proc, frames, min_pixels=784, max_pixels=28 * 28 * 64, temporal_patch=2)
    proc.image_processor = ThreadedImages(proc.image_processor, 4)
    got = hf_inputs.video_pixels(proc, frames, min_pixels=784, max_pixels=28 * 28 * 64, temporal_patch=2)
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])


def test_isolated_methods_run_in_their_own_processes_and_share_the_logits_check(smoke):
    """--isolate (the GPU default): each (cell, method) in a fresh process, one env line, and the
    exact ring still checked against dense_flash's logits (passed between the processes as a file)."""
    out, _ = smoke
    runs = out / "isolated.jsonl"
    cid = "tiny_25-16f-336x504"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prefill.py"), "measure", "--plans", str(out / "plans"),
                        "--out", str(runs), "--isolate", "--no-check", "--repeats", "1", "--warmup", "0",
                        "--workers", "1", "--cells", f"{cid}:dense_flash+zigzag_ring"],
                       capture_output=True, text=True, timeout=240, cwd=str(out))
    assert p.returncode == 0, p.stderr[-4000:]
    recs = [json.loads(x) for x in runs.read_text().splitlines()]
    assert [r["kind"] for r in recs].count("env") == 1 and recs[0]["isolated"] is True
    got = {r["method"]: r for r in recs if r["kind"] in ("dense", "emulated")}
    assert set(got) == {"dense_flash", "zigzag_ring"}
    assert got["dense_flash"]["label"].startswith("CPU")  # a CPU time is never labelled as a GPU's
    assert got["zigzag_ring"]["warmup"] == 1 and len(got["zigzag_ring"]["per_repeat"]) == 1
    chk = got["zigzag_ring"]["check"]
    assert chk["rel_err"] < FP32_EXACT and chk["argmax_agree"], chk


def test_report_writes_a_preset_only_when_asked_and_prints_the_floors(smoke):
    out, data = smoke
    presets = out / "presets"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prefill.py"), "report", str(out / "runs.jsonl"),
                        "--plans", str(out / "plans"), "--out", str(out / "again"), "--preset-dir", str(presets)],
                       capture_output=True, text=True, timeout=240, cwd=str(out))
    assert p.returncode == 0, p.stderr[-4000:]
    assert not presets.exists()
    md = (out / "again.md").read_text()
    assert "Roofline floor of the slowest rank" in md and "not written" in md
    for c in data["cells"]:
        for m, r in c["methods"].items():
            fl = r["floor_ms"]
            assert fl["vision"] > 0 and fl["llm_rest"] > 0 and fl["attention"] > 0, (c["id"], m)
            assert fl["total"] == pytest.approx(fl["vision"] + fl["attention"] + fl["llm_rest"] + fl["exposed_comm"])


def test_profile_rank_dry_run_reports_every_section(tmp_path):
    """benchmarks/profile_rank.py on a CPU (its --device cpu plumbing check, labelled as no
    measurement): the tiny Qwen2.5-VL plan's rank 1 runs whole, its pixels go through both transfer
    paths, the tower runs at the plan's vision_units and at one call, and both stages are profiled."""
    import profile_rank

    from spava_plan.hydra_conf import compose_config
    from spava_plan.planner.build import build_plan

    plan = build_plan(compose_config(["model=tiny", "model.family=qwen2_5_vl", "model.name=tiny_25",
                                      "model.tokens_per_second=2", "gpus=2", "frames=16",
                                      "video.resolution=336x504", "dtype=fp32", "kernels=false"]))
    plan.save(tmp_path / "plan.json")
    out = tmp_path / "out"
    assert profile_rank.main([str(tmp_path / "plan.json"), "--rank", "1", "--device", "cpu", "--repeats", "1",
                              "--top", "3", "--out", str(out)]) == 0
    rep = json.loads((out / "profile_rank.json").read_text())
    assert rep["device"].startswith("CPU dry run") and rep["rank"] == 1 and rep["world"] == 2
    assert all(v > 0 for v in rep["phases"].values()) and len(rep["transfer_ms"]) == 3
    units = {f"vision_units={u}" for u in (plan.chunking.vision_units, 4)}  # the rank's 4 grids in one call
    assert set(rep["tower_ms"]) == units and all(v > 0 for v in rep["tower_ms"].values())
    assert set(rep["profile"]) == {"vision", "prefill"} and all(s["wall_ms"] > 0 for s in rep["profile"].values())


def test_idle_gaps_name_the_host_code_behind_each_gap():
    """The gap finder on hand-made events: the longest hole between kernels first, with the CPU ops
    overlapping it (innermost first) and the deepest transformers / project frame."""
    from types import SimpleNamespace as Ev

    import profile_rank

    def ev(a, b, name, stack=()):
        return Ev(time_range=Ev(start=a, end=b), name=name, stack=list(stack))

    kernels = [ev(0, 10, "k1"), ev(5, 12, "k2"), ev(30, 40, "k3"), ev(41, 50, "k4")]
    cpu = [ev(0, 100, "forward"), ev(14, 28, "aten::cat", ["/x/transformers/models/q.py(10): f"])]
    gaps = profile_rank.idle_gaps(kernels, cpu)
    assert [round(g["ms"] * 1e3) for g in gaps] == [18, 1]  # 12..30 (k2 ends after k1), then 40..41
    assert gaps[0]["host_ops"] == ["aten::cat", "forward"] and gaps[0]["frame"].endswith("q.py(10): f")
    assert profile_rank.busy_ms([(0, 10), (5, 12), (30, 40)]) == pytest.approx(0.022)
