"""codegen.render: deterministic, cached rendering from Jinja2 template files (one per kernel); generated modules import
only triton and spava_plan.runtime.backends.triton_kernels; codegen itself imports neither; no config string reaches generated code."""
from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
from importlib import resources

import pytest

from spava_plan.codegen import render_kernels
from spava_plan.codegen.render import launches
from spava_plan.config import SpavaConfig
from spava_plan.errors import PlanFormatError, SpavaError
from spava_plan.hydra_conf import compose_config
from spava_plan.planner.build import build_plan

SMALL = ["model=tiny", "gpus=2", "frames=8", "video.resolution=360p"]


@pytest.fixture(scope="module")
def plan():
    return build_plan(compose_config(SMALL))


def test_same_plan_same_bytes_and_cached(plan, tmp_path):
    a = render_kernels(plan, tmp_path / "a")
    b = render_kernels(plan, tmp_path / "b")
    assert a.name == b.name == f"spava_{plan.hash[:16]}.py"
    for name in (a.name, "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    stamp = a.stat().st_mtime_ns
    assert render_kernels(plan, tmp_path / "a") == a and a.stat().st_mtime_ns == stamp  # cache hit: untouched
    a.write_text(a.read_text() + "# edited\n")  # an edited module is not what this plan renders to: rewritten
    render_kernels(plan, tmp_path / "a")
    assert a.read_bytes() == b.read_bytes()


def test_replanned_dir_keeps_only_the_new_module(plan, tmp_path):
    other = build_plan(compose_config(SMALL + ["method.pool_window=3"]))
    render_kernels(plan, tmp_path)
    path = render_kernels(other, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("spava_*.py")) == [path.name]
    assert json.loads((tmp_path / "manifest.json").read_text())["plan_hash"] == other.hash


def _imports(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
    return names


def test_generated_module_imports_only_triton_and_the_shared_kernels(plan, tmp_path):
    """Plan-independent code (tile loop, scheduling, selection, merge) is one package module, not
    a copy per plan; the generated module imports it and triton, nothing else."""
    assert _imports(render_kernels(plan, tmp_path).read_text()) == {
        "triton", "triton.language", "spava_plan.runtime.backends", "spava_plan.runtime.backends.triton_kernels"}


def test_codegen_needs_neither_torch_nor_triton():
    """The CLI renders at planning time on machines without torch/triton."""
    code = ("import sys\n"
            "from spava_plan.codegen import render_kernels\n"
            "from spava_plan.planner.build import build_plan\n"
            "from spava_plan.config import SpavaConfig, TopologyConfig, VideoConfig\n"
            "import tempfile, pathlib\n"
            "p = build_plan(SpavaConfig(topology=TopologyConfig(gpus=2), video=VideoConfig(frames=8)))\n"
            "render_kernels(p, pathlib.Path(tempfile.mkdtemp()))\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'triton')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("method", ["spava", "apb", "star", "zigzag_ring", "dense"])
def test_every_launch_the_plan_makes_is_rendered(method, tmp_path):
    """Each rank's whole-rank launch, each schedule "attend" launch and each task alone."""
    plan = build_plan(compose_config(SMALL + [f"method={method}"]))
    render_kernels(plan, tmp_path)
    rendered = {tuple(tuple(m) for m in x["tasks"]) for x in json.loads((tmp_path / "manifest.json").read_text())["launches"]}
    for rp in plan.ranks:
        masks = {t.name: tuple(ref.mask for ref in t.kv) for t in rp.tasks}
        assert tuple(masks.values()) in rendered
        for op in plan.schedule[rp.rank].ops:
            if op.name == "attend":
                assert tuple(masks[n] for n in op.tasks) in rendered
    assert (("full",),) in rendered and (("causal",),) in rendered  # the fallback's one-segment launches


# ---- nothing but planner numbers and identifiers reaches the templates ------------------------------
# printable (config validation refuses control characters such as a newline in any string field)
HOSTILE = "__HOSTILE__'\"); import os; os.system('echo pwned')  # ${PLAN_HASH} \"\"\"{{x}}"


def _leaves(obj, path=()):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, path + (f.name,))
        else:
            yield path + (f.name,)


def _with(obj, path, value):
    if len(path) == 1:
        return dataclasses.replace(obj, **{path[0]: value})
    return dataclasses.replace(obj, **{path[0]: _with(getattr(obj, path[0]), path[1:], value)})


def test_hostile_strings_in_every_config_field_never_reach_generated_code(tmp_path):
    base = compose_config(SMALL)
    fields = list(_leaves(base))
    assert len(fields) > 40
    rendered = 0
    for i, path in enumerate(fields):
        try:
            cfg = _with(base, path, HOSTILE)
            plan = build_plan(cfg)
        except (SpavaError, TypeError, ValueError):
            continue  # refused by config validation or planning: it never gets near codegen
        out = render_kernels(plan, tmp_path / str(i))
        for text in (out.read_text(), (tmp_path / str(i) / "manifest.json").read_text()):
            assert "HOSTILE" not in text and "pwned" not in text, path
        rendered += 1
    # the free-text string fields (model.name, model.hf_id, model.checkpoint, topology.name,
    # topology.device, video.path) are accepted by validation and still did not leak
    assert rendered >= 6
    assert isinstance(SpavaConfig(), SpavaConfig)


def test_malformed_plan_values_are_refused(plan, tmp_path):
    """A hand-edited plan (plan.json's hash can be recomputed) cannot smuggle code in."""
    rank0 = plan.ranks[0]
    bad_task = dataclasses.replace(rank0.tasks[0], name="host0'); import os #")
    bad_ranks = (dataclasses.replace(rank0, tasks=(bad_task,) + rank0.tasks[1:]),) + plan.ranks[1:]
    bad_mask = dataclasses.replace(rank0.tasks[0], kv=(dataclasses.replace(rank0.tasks[0].kv[0], mask="full'"),))
    cases = [
        dataclasses.replace(plan, ranks=bad_ranks),
        dataclasses.replace(plan, ranks=(dataclasses.replace(rank0, tasks=(bad_mask,)),) + plan.ranks[1:]),
        dataclasses.replace(plan, model=dataclasses.replace(plan.model, head_dim="16; import os")),
        dataclasses.replace(plan, model=dataclasses.replace(plan.model, num_heads=True)),
        dataclasses.replace(plan, dtype="bf16\nimport os"),
        dataclasses.replace(plan, selection=dataclasses.replace(plan.selection, pool_window="5)")),
    ]
    for i, bad in enumerate(cases):
        with pytest.raises(PlanFormatError, match="planner-produced number or identifier|need Hkv"):
            render_kernels(bad, tmp_path / str(i))
        assert not (tmp_path / str(i)).exists()


def test_templates_are_package_files_one_per_kernel_with_a_legend():
    """Each kernel whole in one Jinja2 template (FlexAttention's layout), a notation legend on top."""
    from spava_plan.codegen.render import TEMPLATES

    root = resources.files("spava_plan.codegen.templates")
    names = sorted(p.name for p in root.iterdir() if p.name.endswith(".jinja"))
    assert names == sorted(TEMPLATES) == ["attend_launch.py.jinja", "attend_task.py.jinja", "module.py.jinja"]
    assert not [p.name for p in root.iterdir() if p.name.endswith(".tmpl")]  # no fragments left
    for name in names:
        assert root.joinpath(name).read_text().startswith("{#- ---- notation"), name
    # the kernel code is the templates' text: render.py builds no code lines of its own
    source = resources.files("spava_plan.codegen").joinpath("render.py").read_text()
    assert not [w for w in ("@triton.jit", "tl.load", "tl.static_assert", "attend_segment(") if w in source]


def test_only_numbers_and_identifiers_reach_a_template():
    """The environment's finalize hook refuses any other value at every {{ }}, and StrictUndefined
    refuses a name the context lacks (instead of rendering it as empty text)."""
    import jinja2

    from spava_plan.codegen.render import _environment

    env = _environment((("t", "x = {{ v }}\n"), ("u", "y = {{ missing }}\n")))
    assert env.get_template("t").render(v=3) == "x = 3\n"
    assert env.get_template("t").render(v="MASK_FULL") == "x = MASK_FULL\n"
    for bad in ("1; import os", "a b", "'q'", "", 1.5, None, ("a",)):
        with pytest.raises(AssertionError, match="not a number or identifier"):
            env.get_template("t").render(v=bad)
    with pytest.raises(jinja2.UndefinedError):
        env.get_template("u").render()


def test_launch_names_are_stable_identifiers(plan):
    names = [x.name for x in launches(plan)]
    assert names == [f"attend_{i}" for i in range(len(names))]
