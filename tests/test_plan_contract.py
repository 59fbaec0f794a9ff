"""The Plan is the one contract: codegen and the runtime read its typed fields only, never the
resolved config kept in plan.json for humans and re-planning."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READS_CONFIG = re.compile(r"\bplan\)?\.config\b|\bplan\.resolved_config\b")


@pytest.mark.parametrize("folder", ["runtime", "codegen"])
def test_runtime_and_codegen_never_read_the_stored_config(folder):
    offenders = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
                 for path in sorted((ROOT / folder).rglob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1) if READS_CONFIG.search(line)]
    assert not offenders, "read typed Plan fields instead:\n" + "\n".join(offenders)


def test_the_scan_would_see_a_read(tmp_path):
    assert READS_CONFIG.search('pool = plan.config["method"]["pool_window"]')
    assert READS_CONFIG.search("self.plan.config.get('method')")
    assert not READS_CONFIG.search("tc = model.config.text_config")
