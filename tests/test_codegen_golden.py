"""Golden files: the generated kernel module of a few plans, byte for byte (rendering is pure text,
so bit equality is the right check). The goldens were first written by the string.Template
renderer, before the Jinja2 templates replaced it, so the kernels the GPU runs did not change.

A deliberate change of the rendered text (a template, the renderer, or a plan the planner now
makes differently) regenerates them:  python tests/test_codegen_golden.py --regen
and the diff of tests/golden/codegen/ is then reviewed like code."""
from __future__ import annotations

import difflib
import functools
import sys
from pathlib import Path

import pytest

from spava_plan.codegen.render import render_source
from spava_plan.hydra_conf import compose_config
from spava_plan.planner.build import build_plan

GOLDEN = Path(__file__).resolve().parent / "golden" / "codegen"
RING = ["model=tiny", "frames=100", "video.resolution=112x168", "gpus=3"]  # blocks of ~370 tokens
PLANS = {  # one of each structure the templates branch on: methods, ring steps, GQA groups, head dims
    "tiny_spava_w2": ["model=tiny", "gpus=2", "frames=8", "video.resolution=360p"],
    "tiny_zigzag_ring_w3": RING + ["method=zigzag_ring"],
    "tiny_apb_w3": RING + ["method=apb"],
    "tiny_star_w3": RING + ["method=star"],
    "tiny_dense_w3": RING + ["method=dense"],
    "qwen2_5vl_3b_spava_w8": ["model=qwen2_5vl_3b", "gpus=8", "frames=64"],
    "internvl3_2b_spava_w4": ["model=internvl3_2b", "gpus=4", "frames=32"],
}


@functools.lru_cache(maxsize=None)
def rendered(name: str) -> str:
    return render_source(build_plan(compose_config(PLANS[name])))[0]


@pytest.mark.parametrize("name", sorted(PLANS))
def test_rendered_module_matches_its_golden(name):
    want = (GOLDEN / f"{name}.py.golden").read_text(encoding="utf-8")
    got = rendered(name)
    if got != want:
        diff = "".join(list(difflib.unified_diff(want.splitlines(True), got.splitlines(True), "golden", "rendered"))[:60])
        pytest.fail(f"{name}: the rendered module differs from its golden (regenerate with "
                    f"`python tests/test_codegen_golden.py --regen` if intended):\n{diff}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--regen"]:
        sys.exit("usage: python tests/test_codegen_golden.py --regen")
    GOLDEN.mkdir(parents=True, exist_ok=True)
    for stale in GOLDEN.glob("*.py.golden"):
        stale.unlink()
    for key in sorted(PLANS):
        (GOLDEN / f"{key}.py.golden").write_text(rendered(key), encoding="utf-8")
        print("wrote", GOLDEN / f"{key}.py.golden")
