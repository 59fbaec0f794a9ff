"""The transformers version pyproject.toml declares is the real minimum: the installed one meets it,
and the APIs the runtime relies on (added in transformers 5.0-5.3) are there and behave as used."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _declared_range() -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(minimum, exclusive upper bound) of the tested transformers range in pyproject.toml."""
    found = re.findall(r'"transformers>=([0-9.]+),<([0-9.]+)"', PYPROJECT.read_text())
    assert found and len(set(found)) == 1, f"one transformers range in pyproject.toml, found {found}"
    return tuple(int(x) for x in found[0][0].split(".")), tuple(int(x) for x in found[0][1].split("."))


def _declared_minimum() -> tuple[int, ...]:
    return _declared_range()[0]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def test_the_declared_minimum_is_transformers_5_3_and_installed():
    assert _declared_minimum() == (5, 3)
    assert _version(transformers.__version__) >= _declared_minimum()


def test_the_installed_transformers_is_inside_the_tested_range():
    low, high = _declared_range()
    assert low < high
    assert low <= _version(transformers.__version__) < high, (transformers.__version__, low, high)


def test_the_apis_the_runtime_uses_exist():
    from transformers import AttentionInterface, Qwen2_5_VLModel, Qwen2VLModel
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig

    assert callable(AttentionInterface.register)  # runtime/hf/attention.py, runtime/vision/attention.py
    # 5.0: RoPE settings as rope_parameters (runtime/hf/model.py builds and reads them)
    cfg = Qwen2VLTextConfig(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]})
    assert cfg.rope_parameters["rope_theta"] == 1e4
    for cls in (Qwen2VLModel, Qwen2_5_VLModel):
        # 5.3: get_rope_index takes the token types (runtime/hf_inputs.global_position_ids passes them),
        # and text after a video continues at max(rows, cols): tests/test_model_inputs.py compares the
        # planner's positions with it on a clip with more temporal grids than rows or columns
        assert "mm_token_type_ids" in inspect.signature(cls.get_rope_index).parameters, cls.__name__
