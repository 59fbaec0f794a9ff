"""The dependency rule (DESIGN.md): planner, codegen and runtime depend on the spava_plan core only,
never on each other; only the entry points (spava_plan/entry/cli.py, spava_plan/entry/run.py, and
spava_plan/entry/plan_store.py, which plans on the fly for the server) wire stages together, so none of
them is in CORE; and planning never imports torch (it runs on a laptop with the light dependencies)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("planner", "codegen", "runtime")
CORE = ("config.py", "plan.py", "errors.py", "hydra_conf.py", "vision_exchange.py", "video_meta.py", "__init__.py")


def _imported_stages(path: Path, own: str | None) -> set[str]:
    """Stages a module imports, resolving absolute (spava_plan.X) and relative (..X) imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                names = [node.module or ""]
            else:  # relative: inside a stage, level 1 stays in it and level 2 reaches spava_plan
                depth = node.level - (1 if own else 0)
                if depth <= 0:
                    continue
                base = node.module or ""
                names = [f"spava_plan.{base}"] if base else [f"spava_plan.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "spava_plan" and len(parts) > 1 and parts[1] in STAGES:
                found.add(parts[1])
            elif parts[0] in STAGES:  # a top-level import of the source folder would break installs
                found.add(parts[0])
    found.discard(own)
    return found


@pytest.mark.parametrize("stage", STAGES)
def test_stages_do_not_import_each_other(stage):
    bad = {str(p.relative_to(REPO)): sorted(s) for p in sorted((REPO / stage).rglob("*.py"))
           if (s := _imported_stages(p, stage))}
    assert not bad, f"{stage} imports other stages (only the entry points may): {bad}"


def test_core_imports_no_stage():
    bad = {name: sorted(s) for name in CORE if (s := _imported_stages(REPO / "spava_plan" / name, None))}
    assert not bad, bad


BLOCK_TORCH = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'triton', 'transformers'):
            raise ImportError('planning must not import ' + name)
sys.meta_path.insert(0, Block())
import pkgutil, importlib
import spava_plan, spava_plan.config, spava_plan.plan, spava_plan.errors, spava_plan.hydra_conf, spava_plan.entry.cli
import spava_plan.entry.plan_store, spava_plan.video_meta  # plan_store: entry-point level (it calls the planner), and torch-free like planning
import spava_plan.planner
for mod in pkgutil.iter_modules(spava_plan.planner.__path__):
    importlib.import_module('spava_plan.planner.' + mod.name)
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


def test_the_scan_sees_every_import_form(tmp_path):
    src = tmp_path / "mod.py"
    src.write_text("from ..runtime import comm\nimport spava_plan.codegen.render\nfrom spava_plan import plan\n"
                   "from . import cost\nfrom .. import planner\n")
    assert _imported_stages(src, "planner") == {"runtime", "codegen"}
    src.write_text("from .planner.build import build_plan\n")  # what an entry point in spava_plan/ does
    assert _imported_stages(src, None) == {"planner"}
