"""The benchmark scripts run with ``benchmarks/`` first on ``sys.path`` (a script's own folder), and
so do the tests that import them. A script named like an installed package then shadows it for
everything imported later in that process: ``benchmarks/kernels.py`` did that to Hugging Face's
``kernels`` package, and transformers 5.25 (which imports it) failed to load in CI."""
from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_no_benchmark_script_shadows_an_installed_module():
    installed = set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names)
    scripts = {p.stem for p in BENCHMARKS.glob("*.py")}
    assert scripts, "no benchmark scripts found"
    clash = sorted(scripts & installed)
    assert not clash, f"benchmarks/ scripts named like installed or stdlib modules: {clash} - rename them"
