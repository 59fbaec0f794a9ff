"""plan.json: round trip to an equal Plan, determinism, and refusal of foreign or edited files."""
import json

import pytest

from spava_plan.errors import PlanFormatError
from spava_plan.hydra_conf import compose_config
from spava_plan.plan import SCHEMA_VERSION
from spava_plan.plan_load import load_plan
from spava_plan.planner.build import build_plan

SMALL = ["model=qwen2vl_2b", "gpus=3", "frames=32", "video.resolution=360p"]


@pytest.mark.parametrize("method", ["spava", "zigzag_ring", "apb", "star", "dense"])
def test_round_trip_gives_an_equal_plan(tmp_path, method):
    plan = build_plan(compose_config(SMALL + [f"method={method}"]))
    path = plan.save(tmp_path / "plan.json")
    back = load_plan(path)
    assert back == plan and back.hash == plan.hash
    assert back.to_json() == path.read_text()


def test_same_config_same_bytes():
    a = build_plan(compose_config(SMALL + ["solver=local_search"]))
    b = build_plan(compose_config(SMALL + ["solver=local_search"]))
    assert a.to_json() == b.to_json()


def test_resolved_config_is_stored():
    plan = build_plan(compose_config(SMALL))
    cfg = plan.config
    assert cfg["gpus"] == 3 and cfg["topology"]["gpus"] == 3 and cfg["video"]["frames"] == 32
    assert cfg["model"]["name"] == "qwen2vl_2b" and cfg["method"]["anchor_tokens"] is None


def _saved(tmp_path):
    plan = build_plan(compose_config(SMALL))
    return json.loads(plan.save(tmp_path / "plan.json").read_text())


def test_unknown_schema_version_is_refused(tmp_path):
    data = _saved(tmp_path)
    data["schema_version"] = SCHEMA_VERSION + 1
    (tmp_path / "plan.json").write_text(json.dumps(data))
    with pytest.raises(PlanFormatError, match=rf"schema version {SCHEMA_VERSION + 1} .*re-plan") as info:
        load_plan(tmp_path / "plan.json")
    assert info.value.setting == "plan" and "\n" not in str(info.value)


def test_edited_plan_fails_its_hash(tmp_path):
    data = _saved(tmp_path)
    data["ranks"][0]["tasks"][0]["q_stop"] += 1  # a silent edit of one size
    (tmp_path / "plan.json").write_text(json.dumps(data))
    with pytest.raises(PlanFormatError, match="content hash"):
        load_plan(tmp_path / "plan.json")


@pytest.mark.parametrize("text, message", [("{not json", "cannot read"), ("[1, 2]", "does not hold a plan")])
def test_unreadable_files_are_refused(tmp_path, text, message):
    (tmp_path / "plan.json").write_text(text)
    with pytest.raises(PlanFormatError, match=message):
        load_plan(tmp_path / "plan.json")
    with pytest.raises(PlanFormatError, match="no plan file"):
        load_plan(tmp_path / "missing.json")


# -- identity: the hash names the computation --------------------------------------------------------
@pytest.mark.parametrize("deploy", [["kernels=false"], ["model.checkpoint=/ckpt/qwen"], ["model.init=random"],
                                    ["++video.path=/videos/clip.mp4"], ["model.hf_id=someone/else"]])
def test_deployment_settings_do_not_change_the_hash(tmp_path, deploy):
    """Settings that only say where/how a plan is deployed share the hash (and so the kernel cache)."""
    base = build_plan(compose_config(SMALL))
    other = build_plan(compose_config(SMALL + deploy))
    assert other.hash == base.hash and other == base
    assert other.deployment != base.deployment  # ... but they are kept in plan.json
    back = load_plan(other.save(tmp_path / "plan.json"))
    assert back.deployment == other.deployment and back.hash == base.hash
    assert back.resolved_config()["kernels"] == other.resolved_config()["kernels"]


@pytest.mark.parametrize("change", ["method.pool_window=3", "method.selection=key_norm", "method.overlap=false",
                                    "dtype=fp16", "topology.link_latency_us=20"])
def test_computation_settings_change_the_hash(change):
    assert build_plan(compose_config(SMALL + [change])).hash != build_plan(compose_config(SMALL)).hash


def test_deployment_is_outside_the_hashed_part(tmp_path):
    data = _saved(tmp_path)
    assert set(data["deployment"]) == {"kernels", "model", "video", "tune", "topology"}
    assert "checkpoint" not in data["config"]["model"] and "kernels" not in data["config"]
    data["deployment"]["kernels"] = not data["deployment"]["kernels"]  # no re-hash needed
    (tmp_path / "plan.json").write_text(json.dumps(data))
    assert load_plan(tmp_path / "plan.json").deployment["kernels"] == data["deployment"]["kernels"]
