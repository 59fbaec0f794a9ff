"""The dependency rule (DESIGN.md, docs/architecture.md), by folder: the core (spava_plan/*.py)
imports no stage; planner/, codegen/ and runtime/ each import the core only, never each other (the
kernel templates' import of runtime.backends.triton_kernels is the one sanctioned edge); only
spava_plan/entry/ and spava_plan/server/ wire the stages together; no import circle; and planning
never imports torch (it runs on a laptop with the light dependencies). The layers live in
tests/layering.py; a module's layer is its folder's, so there is no hand list to go stale."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from layering import FOLDERS, import_cycle, violations

REPO = Path(__file__).resolve().parents[1]


def test_every_import_follows_the_layers():
    assert violations(REPO) == []


def test_no_import_circle():
    assert import_cycle(REPO) is None


def _copy(tmp_path: Path) -> Path:
    for top in {f.split("/")[0] for f in FOLDERS}:
        shutil.copytree(REPO / top, tmp_path / top, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return tmp_path


def _plant(root: Path, rel: str, line: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else ""
    path.write_text(text + "\n" + line + "\n")


@pytest.mark.parametrize("rel, line, expected", [
    ("planner/cost.py", "from spava_plan.runtime.generate import RankRunner",
     "planner/cost.py (planner) imports spava_plan.runtime.generate (runtime)"),
    ("spava_plan/errors.py", "from .entry.session import Session",
     "spava_plan/errors.py (core) imports spava_plan.entry.session (entry)"),
    ("runtime/kv_cache.py", "def late():\n    from ..entry import run",
     "runtime/kv_cache.py (runtime) imports spava_plan.entry.run (entry)"),
    ("codegen/render.py", "import spava_plan.planner.build",
     "codegen/render.py (codegen) imports spava_plan.planner.build (planner)"),
    ("codegen/templates/module.py.jinja", "from spava_plan.runtime.generate import RankRunner",
     "codegen/templates/module.py.jinja (codegen) imports spava_plan.runtime.generate (runtime)"),
    ("spava_plan/entry/session.py", "from ..server import serve",
     "spava_plan/entry/session.py (entry) imports spava_plan.server.serve (server)"),
    ("runtime/comm/hub.py", "from planner import cost",
     "runtime/comm/hub.py: imports planner as a top-level package (use spava_plan.planner)"),
    ("spava_plan/extra/thing.py", "x = 1",
     "spava_plan/extra/thing.py: in no layer folder (name its folder in tests/layering.py FOLDERS)"),
])
def test_a_planted_back_arrow_fails(tmp_path, rel, line, expected):
    root = _copy(tmp_path)
    assert violations(root) == []
    _plant(root, rel, line)
    assert expected in violations(root)


def test_a_planted_circle_fails(tmp_path):
    root = _copy(tmp_path)
    _plant(root, "runtime/kv_cache.py", "from .attention import RankAttention")  # attention imports kv_cache
    cycle = import_cycle(root)
    assert cycle and {"spava_plan.runtime.kv_cache", "spava_plan.runtime.attention"} <= set(cycle), cycle


def test_a_removed_sanctioned_edge_is_reported(tmp_path):
    root = _copy(tmp_path)
    template = root / "codegen/templates/module.py.jinja"
    template.write_text(template.read_text().replace("spava_plan.runtime.backends", "spava_plan.elsewhere"))
    assert any("no longer exists" in v for v in violations(root))


BLOCK_TORCH = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'triton', 'transformers'):
            raise ImportError('planning must not import ' + name)
sys.meta_path.insert(0, Block())
import pkgutil, importlib
import spava_plan, spava_plan.planner, spava_plan.codegen
# every core module (spava_plan/*.py), every planner and codegen module, and the two entry points
# that plan (the spava-plan command, and the plan store, which plans on the fly for the server)
for pkg in (spava_plan, spava_plan.planner, spava_plan.codegen):
    for mod in pkgutil.iter_modules(pkg.__path__):
        if not mod.ispkg:
            importlib.import_module(pkg.__name__ + '.' + mod.name)
import spava_plan.entry.cli, spava_plan.entry.plan_store
from spava_plan.hydra_conf import compose_config
from spava_plan.planner.build import build_plan
from spava_plan.planner.graph import build_graph
from spava_plan.planner.report import schedule_json
plan = build_plan(compose_config(['model=qwen2vl_2b', 'gpus=2', 'frames=16', 'video.resolution=360p']))
build_graph(plan); schedule_json(plan)
print('ok', len(plan.ranks))
"""


def test_planning_never_imports_torch():
    res = subprocess.run([sys.executable, "-c", BLOCK_TORCH], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok 2", res.stderr[-2000:]
