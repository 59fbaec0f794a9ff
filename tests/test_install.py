"""A plain, non-editable `pip install .` into a fresh virtual environment gives a working
`spava-plan` (kernels rendered from the packaged templates), with the stages installed under the
spava_plan namespace and no generic top-level `planner`/`codegen`/`runtime` packages.

Takes about a minute (a fresh venv downloads the light dependencies); marked slow."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "outputs", "multirun",
                                "__pycache__", ".pytest_cache", ".hypothesis")


def _clean_copy(dest: Path) -> Path:
    """The tree a fresh clone would have (tracked + untracked-not-ignored files)."""
    if (REPO / ".git").exists() and shutil.which("git"):
        listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                                capture_output=True, check=True).stdout.split(b"\0")
        for name in filter(None, (n.decode() for n in listed)):
            src = REPO / name
            if src.is_file():  # tracked files deleted in the work tree are skipped
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / name)
    else:
        shutil.copytree(REPO, dest, ignore=IGNORE, dirs_exist_ok=True)
    return dest


@pytest.mark.slow
def test_non_editable_install_runs(tmp_path):
    src = _clean_copy(tmp_path / "src")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    pip = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", str(src)],
                         capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-3000:]

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    res = subprocess.run([str(bin_dir / "spava-plan"), "model=qwen2vl_2b", "gpus=2", "frames=16",
                          "video.resolution=360p", "hydra.run.dir=out"], cwd=run_dir, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    out = run_dir / "out"
    assert (out / "plan.json").is_file() and (out / "timeline.png").is_file()
    assert any((out / "kernels").glob("*.py")), "kernels=true (the default) renders the plan's kernels"

    probe = ("import importlib.util as u, spava_plan.planner as p; print(p.__file__); "
             "print(all(u.find_spec(n) is None for n in ('planner', 'codegen', 'runtime', 'conf')))")
    where = subprocess.run([str(bin_dir / "python"), "-c", probe], cwd=run_dir, env=env, capture_output=True,
                           text=True, timeout=60)
    path, no_generic = where.stdout.split()
    assert Path(path).resolve().is_relative_to(venv.resolve()), path  # installed, not the source tree
    assert no_generic == "True"
