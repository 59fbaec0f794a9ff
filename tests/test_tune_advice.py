"""After a search: the "plan it again" command carries the original overrides (pasted, it plans
the same plan), and a warning about a faster compared method says what to change in the search
(never the `tune=...` command just run)."""
import shlex
import subprocess
import sys

from spava_plan.hydra_conf import compose_config, method_preset
from spava_plan.plan_load import load_plan
from spava_plan.planner import tune as T
from spava_plan.planner.compare import PHASES, MethodRow
from spava_plan.planner.report import warning_line

SMALL = ["model=qwen2vl_2b", "frames=64", "video.resolution=360p"]


def test_the_plan_again_command_carries_the_overrides_and_plans_the_same(tmp_path):
    given = [*SMALL, "gpus=8", "nodes=2", "topology.link_latency_us=7", "tune=latency", "tune.min_passing=0",
             "tune.methods=[spava,apb]", "kernels=false"]
    res = subprocess.run([sys.executable, "-m", "spava_plan.entry.cli", *given, "hydra.run.dir=a"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    command = (tmp_path / "a" / "tuning.md").read_text().split("without tuning: `")[1].split("`")[0]
    args = shlex.split(command)
    assert args[0] == "spava-plan" and "topology.link_latency_us=7" in args and "video.resolution=360p" in args
    assert not any(a.startswith(("tune", "hydra")) for a in args)
    again = subprocess.run([sys.executable, "-m", "spava_plan.entry.cli", *args[1:], "hydra.run.dir=b"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert load_plan(tmp_path / "a" / "plan.json").hash == load_plan(tmp_path / "b" / "plan.json").hash


def test_a_candidate_on_fewer_gpus_drops_nodes_and_keeps_the_rest():
    base = compose_config([*SMALL, "gpus=8", "nodes=2", "tune=latency", "solver=local_search",
                           "solver.iterations=50"])
    c = T.Candidate(0, "spava", 4, 2, 256, 128, "zigzag")
    cmd = T.rerun_command(c, base, [*SMALL, "gpus=8", "nodes=2", "tune=latency", "solver=local_search",
                                    "solver.iterations=50", "method.pool_window=3", "hydra.run.dir=x y"])
    assert cmd == ("spava-plan model=qwen2vl_2b frames=64 video.resolution=360p method=spava gpus=4 "
                   "method.hosts_per_gpu=2 method.anchor_tokens=256 method.passing_tokens=128 solver=zigzag")
    same = T.Candidate(0, "spava", 8, 2, 256, 128, "local_search")
    assert "nodes=2" in T.rerun_command(same, base, ["nodes=2", "solver.iterations=50"])
    assert "solver.iterations=50" in T.rerun_command(same, base, ["nodes=2", "solver.iterations=50"])


def _row(method, ms, planned=False):
    phases = dict.fromkeys(PHASES, 0.0)
    phases["attention"] = ms * 1e3
    return MethodRow(method=method, gpus=8, prefill_us=ms * 1e3, fits=True, planned=planned, phases=phases)


def test_the_warning_after_a_search_names_the_floor_not_the_command_just_run():
    cfg = compose_config([*SMALL, "gpus=8", "tune=latency", "tune.min_passing=128", "tune.methods=[spava,star]"])
    result = T.tune(cfg, method_preset)
    advice = T.advice(result, cfg)
    assert "tune.min_passing=0" in advice["star"] and "quality floor" in advice["star"]
    assert advice["zigzag_ring"] == "let the search consider it: `tune.methods=[spava,star,zigzag_ring]`"
    rows = [_row("spava", 100.0, planned=True), _row("star", 50.0)]
    warn = warning_line(rows, advice)
    assert "allow it with tune.min_passing=0" in warn and "search every knob" not in warn
    assert "search every knob with tune=latency" in warning_line(rows)  # an untuned plan still points at the search
