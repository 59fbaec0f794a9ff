"""The Plan carries its model whole (ModelSpec: RoPE, tied embeddings, the vision tower) and the
typed config it was made from (Plan.source_config); scripts/plan_golden.py writes the artifacts
the integrator diffs across versions."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from spava_plan.errors import PlanFormatError
from spava_plan.hydra_conf import compose_config
from spava_plan.plan import ModelSpec
from spava_plan.plan_load import load_plan, plan_from_dict
from spava_plan.planner.build import build_plan

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("model", ["tiny", "tiny_internvl3", "qwen2_5vl_3b"])
def test_the_plan_carries_every_model_field_the_runtime_reads(model, tmp_path):
    cfg = compose_config([f"model={model}", "gpus=2", "frames=8", "video.resolution=112x168", "kernels=false",
                          "method=zigzag_ring"])
    plan = build_plan(cfg)
    m = cfg.model
    assert plan.model == ModelSpec.from_config(m)
    assert (plan.model.rope_theta, list(plan.model.mrope_section), plan.model.tokens_per_second,
            plan.model.tie_word_embeddings) == (m.rope_theta, list(m.mrope_section), m.tokens_per_second,
                                                m.tie_word_embeddings)
    assert dataclasses.asdict(plan.model.vision) == {k: getattr(m.vision, k) for k in dataclasses.asdict(plan.model.vision)}
    plan.save(tmp_path / "plan.json")
    assert load_plan(tmp_path / "plan.json").model == plan.model  # through plan.json and its validation


def test_source_config_is_the_config_the_plan_was_made_from():
    cfg = compose_config(["model=tiny", "gpus=2", "frames=8", "video.resolution=112x168", "kernels=false",
                          "method=zigzag_ring"])
    plan = build_plan(cfg)
    assert plan.source_config() == cfg
    assert build_plan(plan.source_config()).hash == plan.hash


def test_a_model_field_that_disagrees_with_the_stored_config_is_refused(tmp_path):
    from spava_plan.plan import content_hash

    plan = build_plan(compose_config(["model=tiny", "gpus=2", "frames=8", "video.resolution=112x168",
                                      "kernels=false", "method=zigzag_ring"]))
    data = plan.to_dict()
    data["model"]["rope_theta"] = 5.0
    data["hash"] = content_hash(data)
    with pytest.raises(PlanFormatError, match=r"field model must match config.model"):
        plan_from_dict(data)
    data = plan.to_dict()
    data["schema_version"] = 2
    del data["model"]["vision"]
    with pytest.raises(PlanFormatError, match=r"schema version 2 .*re-plan"):
        plan_from_dict(data)


def test_plan_golden_writes_the_artifacts(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "plan_golden.py"), str(tmp_path),
                        "--only", "qwen2_5vl_3b-dense-w1"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() == "qwen2_5vl_3b-dense-w1: written"
    folder = tmp_path / "qwen2_5vl_3b-dense-w1"
    assert sorted(f.name for f in folder.iterdir()) == ["overrides.txt", "plan.json", "report.md", "schedule.json",
                                                       "trace.json"]
    assert json.loads((folder / "plan.json").read_text())["method"] == "dense"
