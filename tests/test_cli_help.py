"""`spava-plan --help` lists every artifact the command writes, and the lists are what it writes."""
import subprocess
import sys

from spava_plan.entry.cli import ARTIFACTS, KERNEL_ARTIFACTS, SWEEP_ARTIFACTS, TUNE_ARTIFACTS

SMALL = ["model=qwen2vl_2b", "frames=32", "video.resolution=360p", "gpus=2"]


def spava_plan(args, cwd):
    return subprocess.run([sys.executable, "-m", "spava_plan.entry.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_help_names_every_artifact(tmp_path):
    res = spava_plan(["--help"], tmp_path)
    assert res.returncode == 0, res.stderr
    for name in ARTIFACTS + KERNEL_ARTIFACTS + TUNE_ARTIFACTS + SWEEP_ARTIFACTS:
        assert name in res.stdout, name


def test_the_listed_artifacts_are_what_a_tuned_run_and_a_sweep_write(tmp_path):
    res = spava_plan([*SMALL, "tune=latency", "tune.methods=[spava]", "tune.hosts_per_gpu=[2]", "hydra.run.dir=one"],
                     tmp_path)
    assert res.returncode == 0, res.stderr
    written = {p.name for p in (tmp_path / "one").iterdir() if p.name != ".hydra"}
    assert written == set(ARTIFACTS + KERNEL_ARTIFACTS + TUNE_ARTIFACTS)
    res = spava_plan(["-m", *SMALL[:-1], "gpus=2,4", "kernels=false", "hydra.sweep.dir=sw"], tmp_path)
    assert res.returncode == 0, res.stderr
    root = {p.name for p in (tmp_path / "sw").iterdir() if p.is_file()}
    assert set(SWEEP_ARTIFACTS) <= root
    assert {p.name for p in (tmp_path / "sw" / "0").iterdir() if p.name != ".hydra"} == set(ARTIFACTS)
