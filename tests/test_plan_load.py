"""load_plan trusts nothing: hostile plan files (edited and re-hashed, huge, endless, deeply nested)
end in ONE PlanFormatError naming the field, and a property test shows that a mutated plan is
either refused that way or is one the runtime and codegen consume without any other error."""
import copy
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spava_plan.codegen.render import render_source
from spava_plan.errors import PlanFormatError
from spava_plan.hydra_conf import compose_config
from spava_plan.plan import content_hash
from spava_plan.plan_load import MAX_PLAN_BYTES, load_plan, plan_from_dict
from spava_plan.planner.build import build_plan
from spava_plan.runtime.attention import RankAttention
from spava_plan.runtime.comm.emulated import EmulatedWorld
from spava_plan.vision_exchange import plan_vision_exchange

TINY = ["model=tiny", "gpus=2", "frames=8", "video.resolution=360p", "method.anchor_tokens=64"]
PLANS = {m: json.loads(build_plan(compose_config(TINY + [f"method={m}"])).to_json())
         for m in ("spava", "zigzag_ring", "apb", "star")}


def _rehashed(data):
    data = copy.deepcopy(data) if not isinstance(data, dict) else data
    try:
        data["hash"] = content_hash(data)
    except (TypeError, ValueError):  # NaN cannot be hashed: the file keeps its old hash
        pass
    return data


def _load_text(tmp_path, text):
    (tmp_path / "plan.json").write_text(text)
    return load_plan(tmp_path / "plan.json")


def _edit(path, value):
    data = copy.deepcopy(PLANS["spava"])
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return _rehashed(data)


# The edits the issue lists: each loaded without complaint before, several then crashed.
@pytest.mark.parametrize("path, value, field", [
    (["world_size"], "2", "world_size"),
    (["world_size"], 3, "ranks"),
    (["method"], "bogus", "method"),
    (["ranks", 0, "tasks", 0, "kv", 0, "mask"], "diagonal", "mask"),
    (["dtype"], "fp64x", "dtype"),
    (["layout", "segments", 1, "stop"], 10 ** 12, "layout.segments[1]"),
    (["ranks"], [], "ranks"),
    (["schema_version"], True, "schema version"),
    (["prediction", "makespan_us"], 1e301, "prediction.makespan_us"),
    (["ranks", 1, "tasks", 0, "kv", 0, "slot"], 7, "slot"),
    (["schedule", 0, "ops", 2, "collective"], "nowhere", "collective"),
    (["schedule", 0, "ops", 3, "tasks"], ["no_such_task"], "tasks"),
    (["config", "method", "pool_window"], 4, "config.method.pool_window"),
    (["config", "model", "num_heads"], 8, "model.num_heads"),
])
def test_edited_and_rehashed_plans_are_refused_naming_the_field(tmp_path, path, value, field):
    with pytest.raises(PlanFormatError, match="re-plan") as info:
        _load_text(tmp_path, json.dumps(_edit(path, value)))
    assert field in str(info.value) and "\n" not in str(info.value)


def test_nan_is_refused(tmp_path):
    text = json.dumps(PLANS["spava"]).replace('"makespan_us": ', '"makespan_us": NaN, "x": ', 1)
    with pytest.raises(PlanFormatError, match="non-finite number NaN"):
        _load_text(tmp_path, text)


@pytest.mark.parametrize("depth", [100, 100_000])
def test_deep_nesting_is_refused_without_recursing(tmp_path, depth):
    data = copy.deepcopy(PLANS["spava"])
    data["config"]["method"]["selection"] = json.loads("[" * 90 + "]" * 90)  # deep, but parses
    with pytest.raises(PlanFormatError, match="nested deeper"):
        plan_from_dict(_rehashed(data))
    with pytest.raises(PlanFormatError):
        _load_text(tmp_path, "[" * depth + "]" * depth)


def test_endless_or_huge_files_are_refused_at_once(tmp_path):
    if os.path.exists("/dev/zero"):
        with pytest.raises(PlanFormatError, match="not a regular file"):
            load_plan("/dev/zero")
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:  # sparse: no disk used
        f.truncate(MAX_PLAN_BYTES + 1)
    with pytest.raises(PlanFormatError, match="larger than"):
        load_plan(huge)


# -- property: refused with PlanFormatError, or consumable -------------------------------------------
def _leaves(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(node, list) and node:
        for i, v in enumerate(node):
            yield from _leaves(v, path + (i,))
    else:
        yield path, node


LEAVES = {m: [p for p, _ in _leaves(d) if p[0] != "hash"] for m, d in PLANS.items()}

hostile = st.one_of(
    st.sampled_from([None, True, False, "", "bogus", "causal", "full", "ring", "query", "select0", [], {}, [0, 1],
                     -1, 0, 1, 2, 3, 7, 2 ** 31, 10 ** 12, 2 ** 63, -2 ** 63, 0.5, -0.0, 1e308, float("inf")]),
    st.integers(-3, 3).map(lambda d: ("shift", d)))  # an off-by-a-little edit of the value there


@st.composite
def mutations(draw):
    method = draw(st.sampled_from(sorted(PLANS)))
    data = copy.deepcopy(PLANS[method])
    for _ in range(draw(st.integers(1, 2))):
        path = draw(st.sampled_from(LEAVES[method]))
        node = data
        try:
            for key in path[:-1]:
                node = node[key]
            old = node[path[-1]]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit replaced a parent
        value = draw(hostile)
        if isinstance(value, tuple):
            value = old + value[1] if type(old) in (int, float) else old
        if draw(st.booleans()) and isinstance(node, list) and len(node) > 1:
            del node[path[-1]]  # or drop the item altogether
        else:
            node[path[-1]] = value
    return _rehashed(data)


def _consume(plan):
    """What the runtime and codegen do with a plan before the first tensor moves."""
    world = EmulatedWorld(plan.world_size, timeout_s=5)
    for r in range(plan.world_size):
        RankAttention(plan, r, world.comm(r))
    plan_vision_exchange(plan)
    render_source(plan)
    assert plan_from_dict(json.loads(plan.to_json())) == plan


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=mutations())
def test_mutated_plans_are_refused_or_consumable(data):
    text = json.dumps(data)  # NaN/inf written as the literals a hostile file may hold
    try:
        plan = plan_from_dict(json.loads(text, parse_constant=lambda c: float(c)))
    except PlanFormatError as exc:
        assert "\n" not in str(exc) and exc.setting == "plan"
        return
    _consume(plan)  # accepted: nothing downstream may fail on it
