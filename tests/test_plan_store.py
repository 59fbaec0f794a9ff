"""Plan families: `spava-plan -m` writes index.json at the sweep root; PlanStore picks the cheapest
plan (by predicted prefill) that holds a request within one bucket step, plans one on the fly and
caches it by hash (reused next time), or, with planning on the fly off, refuses naming the setting.
Short clips, the bucket step and the cache caps: tests/test_plan_store_fit.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from spava_plan.errors import InputError
from spava_plan.plan_load import load_plan
from spava_plan.entry.plan_store import NoPlanFitsError, PlanStore, compat_key, read_index

BASE = ["model=tiny", "gpus=2", "kernels=false", "method.pass_all=true", "method.anchor_tokens=8"]


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("family")
    res = subprocess.run([sys.executable, "-m", "spava_plan.entry.cli", "-m", *BASE, "frames=16,32",
                          "video.resolution=56x84,112x168", "hydra.sweep.dir=sweep"], cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "plan index:" in res.stdout
    return root / "sweep"


def test_the_sweep_writes_an_index_of_its_plans(family):
    data = json.loads((family / "index.json").read_text())
    entries = read_index(family)
    assert data["version"] == 2 and len(entries) == 4
    assert {(e.frames, e.resolution) for e in entries} == {(16, "56x84"), (32, "56x84"), (16, "112x168"),
                                                           (32, "112x168")}
    for e in entries:
        plan = load_plan(family / e.path / "plan.json")
        assert plan.hash == e.hash and plan.layout.total_tokens == e.total_tokens
        assert e.world_size == 2 and e.model == "tiny" and e.max_question_tokens == 32
        assert e.compat == compat_key(plan.config)
        assert e.predicted_us == pytest.approx(plan.prediction.makespan_us, rel=1e-12)
        assert e.method == plan.method == "spava" and not e.cached and not e.pinned
    assert len({e.compat for e in entries}) == 1  # one family: only the video's shape differs


def test_the_cheapest_plan_that_holds_the_request_wins(family):
    store = PlanStore(family, BASE, plan_on_the_fly=False)
    got = store.choose(frames=20, height=56, width=84, question_tokens=10)
    assert (got.frames, got.entry.resolution, got.planned_now, got.method) == (32, "56x84", False, "spava")
    assert got.plan.hash == got.entry.hash and (got.directory / "plan.json").is_file()
    # a source frame the processor resizes to the same grid is held by that plan
    assert store.plan_for(frames=16, height=50, width=80, question_tokens=32).layout.frames == 16
    # a larger frame needs the 112x168 plans (within the step: 4x5 merged patches in a 4x6 plan)
    assert store.choose(frames=10, height=100, width=150, question_tokens=1).entry.resolution == "112x168"
    # every holder is ranked by its predicted prefill: the first is the cheapest
    fits = store.fitting(frames=10, height=56, width=84, question_tokens=1)
    assert [e.predicted_us for e in fits] == sorted(e.predicted_us for e in fits) and len(fits) >= 1


def test_no_fitting_plan_with_planning_off_names_the_setting(family):
    store = PlanStore(family, BASE, plan_on_the_fly=False)
    for request in (dict(frames=64, height=56, width=84, question_tokens=8),
                    dict(frames=8, height=56, width=84, question_tokens=33),  # longer than every plan holds
                    dict(frames=8, height=720, width=1280, question_tokens=8)):
        with pytest.raises(NoPlanFitsError, match="plan_on_the_fly.*video.max_question_tokens="):
            store.choose(**request)
    with pytest.raises(InputError, match="frames"):
        store.choose(frames=0, height=56, width=84, question_tokens=8)
    # another deployment (other world size) does not see this family's plans
    assert PlanStore(family, [*BASE[:1], "gpus=4", *BASE[2:]], plan_on_the_fly=False).entries() == []


def test_planning_on_the_fly_caches_by_hash_and_reuses(tmp_path, family):
    import shutil

    root = tmp_path / "fam"
    shutil.copytree(family, root)
    store = PlanStore(root, BASE)
    first = store.choose(frames=48, height=56, width=84, question_tokens=40)
    assert first.planned_now and first.directory == root / "cache" / first.plan.hash[:16]
    # its bucket: frames rounded up to the next power of two of the temporal patch
    assert first.plan.video.max_question_tokens == 40 and first.frames == 64
    assert load_plan(first.directory / "plan.json") == first.plan
    assert len(read_index(root)) == 5
    # a new store (a restarted server) finds it in the index: no planning, the same plan
    again = PlanStore(root, BASE).choose(frames=48, height=56, width=84, question_tokens=12)
    assert not again.planned_now and again.plan.hash == first.plan.hash
    # a request the family already holds is never planned
    assert not store.choose(frames=16, height=56, width=84, question_tokens=5).planned_now
    assert len(read_index(root)) == 5


def test_the_deploy_family_preset_sweeps_settings_the_schema_knows():
    """conf/deploy/family.yaml (`spava-plan -m +deploy=family ...`) sweeps frames x resolution; every
    swept key must compose (a renamed setting would otherwise fail only when someone deploys)."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    from spava_plan.hydra_conf import compose_config

    preset = OmegaConf.create(files("spava_plan.conf").joinpath("deploy", "family.yaml").read_text())
    params = preset.hydra.sweeper.params
    assert set(params) == {"frames", "video.resolution"}
    for key, values in params.items():
        for value in str(values).split(","):
            compose_config(["model=tiny", f"{key}={value}"])
