"""Every config field against its type's extremes (inf, nan, negative, zero, huge, wrong type,
hostile strings): a value is either refused with a one-line ConfigError naming a setting, or
accepted into a config that is finite, printable and plannable without anything but a SpavaError.

The fields are read from the dataclass schemas (spava_plan.config), so a field added later is
covered here without a new test. The bulk runs in-process through ``to_config`` (the command
line's path) and through the dataclasses built directly in Python; test_cli.py runs a few of the
same inputs through the real command.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spava_plan.config import CommandLineConfig, ConfigError, SpavaConfig, _field_hints, config_to_dict, to_config
from spava_plan.errors import SpavaError
from spava_plan.planner.build import assemble, derive

# A small base config: planning it takes a few milliseconds, so accepted values can be planned.
BASE = {"model": {"name": "tiny", "num_layers": 2, "hidden_size": 256, "intermediate_size": 512, "num_heads": 4,
                  "num_kv_heads": 2, "head_dim": 64, "mrope_section": [8, 12, 12], "vocab_size": 1000,
                  "vision": {"depth": 2, "hidden_size": 64, "num_heads": 2, "intermediate_size": 128,
                             "out_hidden_size": 256}},
        "gpus": 2, "frames": 8, "video": {"resolution": "112x168"}, "kernels": False}

HOSTILE_TEXT = ["", " ", "a\nb", "tab\there", "nul\x00", "\x1b[31mred", "x" * 5000, "${oc.env:NOPE}",
                "${video.fps}", "\u202eevil", "名前", "../../etc/passwd", "a|b*c"]
INT_EXTREMES = [0, -1, 1, 2, 3, 127, 128, 10**9, 2**31, 2**63, -(2**63), 10**30]
FLOAT_EXTREMES = [0.0, -0.0, -1.0, 1e-300, 5e-324, 1e300, 1.7976931348623157e308, math.inf, -math.inf, math.nan]
WRONG_TYPES = ["abc", "1.5", 1.5, True, None, [1], {"a": 1}]


def leaf_fields(cls: type = CommandLineConfig, prefix: str = "") -> dict[str, typing.Any]:
    """Dotted path -> type hint of every leaf field under the command line's schema."""
    out: dict[str, typing.Any] = {}
    for name, hint in _field_hints(cls).items():
        sub = next((h for h in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(h)), None)
        if sub is not None:  # a group, or an optional one (topology.calibration)
            out.update(leaf_fields(sub, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = hint
    return out


FIELDS = leaf_fields()


def extremes(hint: typing.Any) -> list:
    """Values at and beyond the edges of a field's type."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union:  # Optional[X]
        return extremes(next(a for a in args if a is not type(None))) + [None]
    if hint is bool:
        return [True, False, "maybe", 2, 0.5, None]
    if hint is int:
        return INT_EXTREMES + [1.5, math.inf, math.nan, "abc", None]
    if hint is float:
        return FLOAT_EXTREMES + [1, 10**400, "abc", "inf", None]
    if hint is str:
        return HOSTILE_TEXT + [1, 1.5, None, [1]]
    if typing.get_origin(hint) is list and typing.get_args(hint)[0] is str:
        return [[], ["nope"], ["a\nb"], [""], [1], [None], None, 5, "abc"]
    if typing.get_origin(hint) is list:
        return [[], [-1, 40, 25], [0, 0, 32], [1.5, 30.5], ["a"], [math.nan], [10**30, 1, 1], [16, 24, 24], None, 5]
    raise AssertionError(f"no extremes for {hint}: add them here")


def with_value(path: str, value: typing.Any) -> dict:
    data = json.loads(json.dumps(BASE))
    node = data
    *parents, leaf = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return data


def check_accepted(cfg: SpavaConfig) -> None:
    """An accepted config holds only finite numbers and printable strings of the right types."""
    data = config_to_dict(cfg)
    json.dumps(data, allow_nan=False)  # raises on nan / inf

    def walk(obj: typing.Any) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value)
            for item in value if isinstance(value, list) else [value]:
                assert not isinstance(item, str) or item.isprintable(), (f.name, item)
    walk(cfg)


def check_refusal(exc: SpavaError) -> None:
    assert exc.setting and "\n" not in str(exc) and str(exc).startswith(exc.setting) or exc.setting in str(exc)


def plan_or_refuse(cfg: SpavaConfig) -> None:
    try:
        plan = assemble(derive(cfg))
    except SpavaError as exc:
        check_refusal(exc)
        return
    json.loads(plan.to_json(), parse_constant=lambda c: pytest.fail(f"{c} in plan.json"))


CASES = [(path, value) for path, hint in FIELDS.items() for value in extremes(hint)]


def test_every_field_has_extremes():
    assert len(FIELDS) > 60 and {"gpus", "frames", "nodes", "model.vision.patch_size", "video.fps"} <= set(FIELDS)
    assert all(extremes(hint) for hint in FIELDS.values())


def test_every_extreme_of_every_field_through_to_config():
    """The command line's path (OmegaConf types, then the schemas' checks), every field x extreme."""
    accepted = []
    for path, value in CASES:
        try:
            cfg = to_config(with_value(path, value))
        except ConfigError as exc:
            check_refusal(exc)
            continue
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{path}={value!r}: {type(exc).__name__}: {exc}")
        check_accepted(cfg)
        accepted.append((path, value, cfg))
    # the extremes include valid values for most fields; each accepted one must plan or refuse
    assert len(accepted) > len(FIELDS)
    for path, value, cfg in accepted:
        try:
            plan_or_refuse(cfg)
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"{path}={value!r} accepted, then planning raised {type(exc).__name__}: {exc}")


def _built_directly(path: str, value: typing.Any) -> SpavaConfig:
    """The same value in a dataclass built in Python (no OmegaConf: the schemas' own type check)."""
    if path in ("gpus", "nodes", "frames"):  # shorthands exist only on the command line
        group, name = {"gpus": ("topology", "gpus"), "nodes": ("topology", "nodes"),
                       "frames": ("video", "frames")}[path]
        path = f"{group}.{name}"
    base = _BASE_CONFIG

    def rebuild(obj: typing.Any, keys: list[str]) -> typing.Any:
        head, *rest = keys
        inner = getattr(obj, head)
        if rest and inner is None:  # an optional group left out (topology.calibration): build it
            hint = _field_hints(type(obj))[head]
            cls = next(h for h in typing.get_args(hint) if dataclasses.is_dataclass(h))
            return dataclasses.replace(obj, **{head: cls(**{rest[0]: value})})
        new = value if not rest else rebuild(inner, rest)
        return dataclasses.replace(obj, **{head: new})
    return rebuild(base, path.split("."))


_BASE_CONFIG = to_config(BASE)


def test_every_extreme_of_every_field_built_in_python():
    for path, value in CASES:
        try:
            cfg = _built_directly(path, value)
        except ConfigError as exc:
            check_refusal(exc)
            continue
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"{path}={value!r} (built in Python): {type(exc).__name__}: {exc}")
        check_accepted(cfg)


def values_for(hint: typing.Any) -> st.SearchStrategy:
    """Random values of a field's type, edges and wrong types included."""
    if typing.get_origin(hint) is typing.Union:
        return st.one_of(st.none(), values_for(next(a for a in typing.get_args(hint) if a is not type(None))))
    scalar = {bool: st.booleans(), int: st.integers(), float: st.floats(allow_nan=True, allow_infinity=True),
              str: st.text(max_size=40)}
    if hint in scalar:
        return st.one_of(scalar[hint], st.sampled_from(extremes(hint)))
    item = st.text(max_size=12) if typing.get_args(hint)[0] is str else st.integers(-5, 200)
    return st.one_of(st.lists(item, max_size=4), st.sampled_from(extremes(hint)))


@st.composite
def overrides(draw):
    paths = draw(st.lists(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=4, unique=True))
    return {p: draw(values_for(FIELDS[p])) for p in paths}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(overrides())
def test_random_combinations_refuse_in_one_line_or_plan(changes):
    data = json.loads(json.dumps(BASE))
    for path, value in changes.items():
        node = data
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        cfg = to_config(data)
    except ConfigError as exc:
        check_refusal(exc)
        return
    check_accepted(cfg)
    plan_or_refuse(cfg)


def test_the_yaml_defaults_are_the_schemas():
    """One source of defaults: conf/config.yaml's default groups add nothing to the schema's."""
    from spava_plan.hydra_conf import compose_config

    cfg = compose_config([])
    assert cfg == SpavaConfig()
    assert (cfg.model.hf_id, cfg.gpus, cfg.frames, cfg.video.resolution) == ("Qwen/Qwen2-VL-7B-Instruct", 8, 256, "720p")


def test_shorthands_set_their_field_once():
    from spava_plan.hydra_conf import compose_config

    cfg = compose_config(["gpus=16", "nodes=2", "frames=100"])
    assert (cfg.topology.gpus, cfg.topology.nodes, cfg.video.frames) == (16, 2, 100)
    assert (cfg.gpus, cfg.nodes, cfg.frames) == (16, 2, 100)  # read back, not stored twice
    assert compose_config(["topology.gpus=4"]).gpus == 4
    stored = config_to_dict(cfg)
    assert (stored["gpus"], stored["nodes"], stored["frames"]) == (16, 2, 100)
    assert to_config(stored) == cfg  # a plan's stored config reads back to the same config
