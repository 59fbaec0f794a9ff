"""The Plan is the one contract: codegen, the runtime and the core modules they use read its typed
fields only, never the resolved config kept in plan.json for humans and re-planning."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READS_CONFIG = re.compile(r"\bplan\)?\.config\b|\bplan\.resolved_config\b|\bbase\.config\b")
# The front end may read the stored config, each for a reason that is about planning, not running
# (paths under spava_plan/):
FRONT_END = {
    "plan.py": "defines it",
    "plan_load.py": "checks that the stored config agrees with the plan's typed fields",
}


@pytest.mark.parametrize("folder", ["runtime", "codegen", "spava_plan", "benchmarks"])
def test_runtime_codegen_and_core_never_read_the_stored_config(folder):
    offenders = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
                 for path in sorted((ROOT / folder).rglob("*.py"))
                 if not (folder == "spava_plan" and path.relative_to(ROOT / folder).as_posix() in FRONT_END)
                 for n, line in enumerate(path.read_text().splitlines(), 1) if READS_CONFIG.search(line)]
    assert not offenders, "read typed Plan fields instead:\n" + "\n".join(offenders)


def test_the_scan_would_see_a_read(tmp_path):
    assert READS_CONFIG.search('pool = plan.config["method"]["pool_window"]')
    assert READS_CONFIG.search("self.plan.config.get('method')")
    assert READS_CONFIG.search('name = engine.base.config["model"]["name"]')
    assert not READS_CONFIG.search("tc = model.config.text_config")
    assert set(FRONT_END) <= {p.relative_to(ROOT / "spava_plan").as_posix() for p in (ROOT / "spava_plan").rglob("*.py")}
