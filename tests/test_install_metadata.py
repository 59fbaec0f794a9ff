"""pyproject.toml's [tool.setuptools] lists every config group folder as a package with its YAML,
so a build installs them all and prints no setuptools warning about data-only packages."""
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from test_install import REPO, _clean_copy


def test_every_config_group_is_a_listed_package_with_its_yaml():
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    groups = {f"spava_plan.conf.{p.name}" for p in (REPO / "conf").iterdir() if p.is_dir() and any(p.glob("*.yaml"))}
    assert groups and groups <= set(tool["packages"]), groups - set(tool["packages"])
    assert all(tool["package-data"].get(g) == ["*.yaml"] for g in groups)


def test_a_build_warns_of_no_data_only_package_and_ships_every_yaml(tmp_path):
    src = _clean_copy(tmp_path / "src")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-v",
                          "-w", str(tmp_path / "whl")], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    log = res.stdout + res.stderr
    assert "absent from" not in log and "as data is deprecated" not in log, [
        line for line in log.splitlines() if "absent from" in line or "deprecated" in line][:5]
    wheel = next((tmp_path / "whl").glob("*.whl"))
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("spava_plan/conf/")}
    expected = {"spava_plan/conf/" + str(p.relative_to(REPO / "conf")) for p in (REPO / "conf").rglob("*.yaml")}
    assert expected <= shipped, expected - shipped
