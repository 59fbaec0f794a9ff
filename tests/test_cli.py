"""`spava-plan` as a user runs it: artifacts of a run and a sweep, and one-line errors (exit 2, no
traceback, no partial artifacts) for bad input."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from spava_plan.plan_load import load_plan

SMALL = ["model=qwen2vl_2b", "frames=64", "video.resolution=360p"]


def spava_plan(args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spava_plan.entry.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_run_writes_every_artifact(tmp_path):
    res = spava_plan(SMALL + ["gpus=4", "hydra.run.dir=out"], tmp_path)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    for name in ("plan.json", "report.md", "graph.json", "schedule.json", "timeline.png", "trace.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".spava-plan-*")), "temporary directory left behind"
    plan = load_plan(out / "plan.json")
    assert plan.to_json() == (out / "plan.json").read_text()  # the CLI writes Plan.to_json() exactly
    assert plan.world_size == 4 and plan.method == "spava"
    graph = json.loads((out / "graph.json").read_text())
    assert graph["directed"] and {n["id"] for n in graph["nodes"]} >= {"coll:select0", "coll:query"}
    schedule = json.loads((out / "schedule.json").read_text())
    assert [r["rank"] for r in schedule["ranks"]] == [0, 1, 2, 3]
    assert schedule["ranks"][0]["ops"][0]["name"] == "qkv"
    assert (out / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "| **spava** | 4 |" in report and "| dense | 1 |" in report and plan.hash in report
    kernels = out / "kernels"
    assert kernels.is_dir() and any(kernels.iterdir())  # kernels=true is the default
    lines = res.stdout.splitlines()
    assert lines[1].split()[:3] == ["method", "GPUs", "prefill"] and lines[-1] == f"artifacts: {out.resolve()}"
    assert any(line.startswith("spava *") for line in lines)


@pytest.mark.parametrize("args, setting", [
    (["gpus=0"], "gpus"),
    (["frames=-5"], "frames"),
    (["frames=100000000"], "frames"),  # absurd: beyond the sanity ceiling
    (["video.resolution=sharp"], "video.resolution"),
    (["model=nope"], "model"),
    (["model.num_kv_heads=5"], "model.num_kv_heads"),  # 28 query heads cannot be grouped over 5
    (["gpus=1024", "frames=8"], "gpus"),  # more virtual hosts than 128-token blocks
    (["gpus=2", "frames=8192", "video.resolution=720p"], "gpus"),  # does not fit 80 GB GPUs
    (["gpus=abc"], "gpus"),
    # kinds the reliability audit found (more in test_config_fields.py, in-process)
    (["topology.memory_gib=inf"], "topology.memory_gib"),
    (["model.rope_theta=nan"], "model.rope_theta"),
    (["model.name=${oc.env:SPAVA_NOPE}"], "model.name"),  # an interpolation that does not resolve
    (["solver=local_search", "solver.iterations=1000000000"], "solver.iterations"),  # unbounded work
    (["gpus=65536", "frames=1048576"], "gpus"),  # beyond the ceilings: refused at once
    (["video.fps=1e-300"], "video.fps"),
    (["topology.gpus_per_node=3"], "topology.gpus_per_node"),  # 8 GPUs on uneven nodes
    # a ring plan lists O(W^2) ops: 1.3 GB of plan.json at 1024 GPUs; refused above 128
    (["method=zigzag_ring", "gpus=256", "frames=1024", "kernels=false"], "gpus"),
])
def test_bad_input_is_one_line_exit_2_and_no_artifacts(tmp_path, args, setting):
    res = spava_plan(["model=qwen2vl", "hydra.run.dir=out/job"] + args, tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spava-plan: error: "), res.stderr
    assert setting in lines[0] and "Traceback" not in res.stderr
    if "does not fit" in lines[0]:  # a memory refusal points at the search
        assert lines[0].endswith("tune=latency (or tune=memory)")
    assert not (tmp_path / "out").exists(), list((tmp_path / "out").rglob("*"))


def test_an_output_dir_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "out").write_text("a file where the run directory's parent should be")
    res = spava_plan(SMALL + ["gpus=2", "kernels=false", "hydra.run.dir=out/job"], tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spava-plan: error: hydra.run.dir: "), res.stderr


def test_runs_started_together_get_their_own_directories(tmp_path):
    """Two runs in the same second (the default run dir has microseconds and the process id)."""
    args = [sys.executable, "-m", "spava_plan.entry.cli", *SMALL, "gpus=2", "kernels=false"]
    procs = [subprocess.Popen(args + [f"frames={f}"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for f in (32, 64)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    dirs = sorted(tmp_path.glob("outputs/*/*"))
    assert len(dirs) == 2, dirs
    frames = sorted(load_plan(d / "plan.json").config["video"]["frames"] for d in dirs)
    assert frames == [32, 64] and all((d / ".hydra" / "overrides.yaml").is_file() for d in dirs)


def test_a_capped_passing_budget_is_said(tmp_path):
    res = spava_plan(SMALL + ["gpus=2", "kernels=false", "method.passing_tokens=1048576", "hydra.run.dir=out"],
                     tmp_path)
    assert res.returncode == 0, res.stderr
    assert any(line.startswith("note: method.passing_tokens: ") and "capped" in line for line in res.stdout.splitlines())


def test_sweep_writes_a_summary(tmp_path):
    res = spava_plan(["-m", "gpus=2,4", "frames=32,64", "model=qwen2vl_2b", "video.resolution=360p",
                      "method=spava,zigzag_ring", "kernels=false", "hydra.sweep.dir=sweep"], tmp_path)
    assert res.returncode == 0, res.stderr
    sweep = tmp_path / "sweep"
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    assert {(r["gpus"], r["frames"], r["method"]) for r in rows} == {
        (g, f, m) for g in ("2", "4") for f in ("32", "64") for m in ("spava", "zigzag_ring")}
    for r in rows:
        assert float(r["prefill_ms"]) > 0 and float(r["peak_gib_per_gpu"]) > 0 and int(r["tokens"]) > 0
        assert (Path(r["output_dir"]) / "plan.json").is_file()
        ring = r["method"] == "zigzag_ring"
        assert float(r["speedup_vs_zigzag_ring"]) == pytest.approx(1.0) if ring else float(r["speedup_vs_dense"]) > 1
    md = (sweep / "summary.md").read_text()
    assert md.count("\n") == 2 + 8 and "| job |" in md
    assert res.stdout.splitlines()[-1] == (f"summary: {sweep.resolve() / 'summary.csv'} "
                                           f"(plot: {sweep.resolve() / 'sweep.png'})")
    assert (sweep / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_a_sweep_cell_that_does_not_plan_is_a_row_and_the_sweep_exits_0(tmp_path):
    """The README's sweep has an infeasible cell (gpus=2 frames=2048): it becomes a row that says
    why, with its coordinates, and leaves no job folder; exit 0 while one cell planned."""
    res = spava_plan(["-m", "gpus=2,1024", "frames=8,16", "model=qwen2vl_2b", "kernels=false",
                      "hydra.sweep.dir=sweep"], tmp_path)
    assert res.returncode == 0, res.stderr
    errors = res.stderr.strip().splitlines()
    assert len(errors) == 2 and all(e.startswith("spava-plan: not planned: job #") and "gpus" in e for e in errors), \
        res.stderr
    rows = list(csv.DictReader((tmp_path / "sweep" / "summary.csv").open()))
    assert [r["status"] for r in rows][:2] == ["ok", "ok"] and all(r["status"].startswith("error: ") for r in rows[2:])
    assert [(r["gpus"], r["frames"]) for r in rows] == [("2", "8"), ("2", "16"), ("1024", "8"), ("1024", "16")]
    assert all(r["model"] == "qwen2vl_2b" and r["method"] == "spava" and not r["output_dir"] for r in rows[2:])
    assert (tmp_path / "sweep" / "0" / "plan.json").is_file()
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == ["0", "1"]  # no empty job folders


def test_a_sweep_where_no_cell_plans_exits_2(tmp_path):
    res = spava_plan(["-m", "gpus=1024", "frames=8,16", "model=qwen2vl_2b", "kernels=false",
                      "hydra.sweep.dir=sweep"], tmp_path)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 2, res.stderr


def test_bad_value_in_a_sweep_fails_before_any_job(tmp_path):
    res = spava_plan(["-m", "model=qwen2vl_2b,nope", "frames=8", "hydra.sweep.dir=sweep"], tmp_path)
    assert res.returncode == 2 and "unknown model 'nope'" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "sweep").exists()


def test_timeline_worker_draws_in_a_child(tmp_path):
    from spava_plan.entry.cli import TimelineWorker
    from spava_plan.hydra_conf import compose_config
    from spava_plan.planner.build import build_plan

    plan = build_plan(compose_config(SMALL + ["gpus=2"]))
    worker = TimelineWorker()
    worker.render(plan, tmp_path / "t.png")
    worker.wait()
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG" and worker.pid == 0 and worker._status == 0
    idle = TimelineWorker()  # released without work: the child exits cleanly and draws nothing
    idle.close()
    assert idle._status == 0 and not (tmp_path / "u.png").exists()


def test_tune_writes_the_search_and_an_ordinary_plan(tmp_path):
    from spava_plan.hydra_conf import compose_config
    from spava_plan.planner.build import build_plan

    res = spava_plan(SMALL + ["gpus=8", "tune=latency", "tune.methods=[spava,zigzag_ring]", "kernels=false",
                              "hydra.run.dir=out"], tmp_path)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    for name in ("tuning.csv", "tuning.md", "pareto.png", "trace.json", "plan.json"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "tuning.csv").open()))
    chosen = [r for r in rows if r["status"] == "chosen"]
    assert len(chosen) == 1 and all(r["reason"] for r in rows)
    md = (out / "tuning.md").read_text()
    overrides = md.split("without tuning: `spava-plan ")[1].split("`")[0].split()
    plan = load_plan(out / "plan.json")  # the same plan as its knobs give without tuning
    assert plan.hash == build_plan(compose_config(SMALL + overrides + ["kernels=false"])).hash
    assert "chosen by `tune=latency`" in (out / "report.md").read_text()
    assert any(line.startswith("tune=latency: chose ") for line in res.stdout.splitlines())
