"""A plan folder is data, never code (DESIGN.md, Codegen): the triton backend imports only the module
this installation renders from the plan; a kernel dir whose module or manifest was tampered with is
refused in one line naming it, and nothing of it runs. The cache key covers everything the module
depends on (a changed helper re-renders), and a kernel dir tuned once is not tuned again.

Runs through Triton's interpreter on the CPU (tests/conftest.py sets TRITON_INTERPRET=1), the same
load_kernels path as backend=auto on a GPU."""
from __future__ import annotations

import json
import math
import os
from functools import partial

import pytest
import torch

from spava_plan.codegen import render
from spava_plan.codegen.render import cache_key, render_kernels, render_source
from spava_plan.errors import InputError
from spava_plan.hydra_conf import compose_config
from spava_plan.planner.build import build_plan
from spava_plan.runtime.backends.base import KVSegment, TaskInput
from spava_plan.runtime.backends.triton_gen import AUTOTUNE_VERSION, TritonBackend, load_kernels, user_kernel_dir

SMALL = ["model=tiny", "gpus=2", "frames=8", "video.resolution=360p"]


@pytest.fixture(scope="module")
def plan():
    return build_plan(compose_config(SMALL))


def _payload(marker) -> str:
    return f"\nimport pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"


def _rehash(kdir, **changes) -> None:
    """Rewrite the manifest as a tamperer would: the module's sha256 recomputed, fields changed."""
    import hashlib

    path = kdir / "manifest.json"
    manifest = json.loads(path.read_text())
    module = kdir / manifest["module"]
    if module.exists():
        manifest["module_sha256"] = hashlib.sha256(module.read_bytes()).hexdigest()
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def _refused(kdir, plan, marker) -> str:
    with pytest.raises(InputError) as err:
        TritonBackend(kdir, plan_hash=plan.hash, render=partial(render_kernels, plan))
    message = str(err.value)
    assert "\n" not in message and str(kdir) in message and "refused" in message, message
    assert not marker.exists(), "the tampered kernel dir's code ran"
    return message


def test_an_edited_module_with_a_rehashed_manifest_is_refused_and_never_runs(plan, tmp_path):
    kdir, marker = tmp_path / "kernels", tmp_path / "marker"
    module = render_kernels(plan, kdir)
    module.write_text(module.read_text() + _payload(marker))
    _rehash(kdir)
    assert "not what this installation renders" in _refused(kdir, plan, marker)
    assert (kdir / module.name).read_text().endswith(_payload(marker))  # refused, not silently rewritten


@pytest.mark.parametrize("where", ["absolute", "parent"])
def test_a_manifest_naming_a_module_outside_the_kernel_dir_is_refused_and_never_runs(plan, tmp_path, where):
    kdir, marker = tmp_path / "kernels", tmp_path / "marker"
    render_kernels(plan, kdir)
    payload = tmp_path / "payload.py"
    payload.write_text(_payload(marker))
    _rehash(kdir, module=str(payload) if where == "absolute" else "../payload.py")
    assert "not a file name inside it" in _refused(kdir, plan, marker)


def test_a_kernel_dir_from_another_installation_is_rendered_again_not_run(plan, tmp_path):
    """A manifest whose cache key is not this installation's (an older release, other templates or
    helpers, or a plan folder from elsewhere): its module is replaced by this installation's
    rendering before anything is imported (the stale-kernel bug: an old dir ran new helpers)."""
    kdir, marker = tmp_path / "kernels", tmp_path / "marker"
    module = render_kernels(plan, kdir)
    module.write_text(module.read_text() + _payload(marker))
    _rehash(kdir, cache_key="0" * 64)
    backend = TritonBackend(kdir, plan_hash=plan.hash, render=partial(render_kernels, plan))
    assert not marker.exists()
    assert module.read_text() == render_source(plan)[0]
    assert json.loads((kdir / "manifest.json").read_text())["cache_key"] == cache_key(plan)
    assert str(kdir) not in backend.mod.__file__  # imported from this process's own rendering


def test_a_missing_kernel_dir_is_rendered_and_a_matching_one_left_untouched(plan, tmp_path):
    kdir = tmp_path / "kernels"
    load_kernels(kdir, plan_hash=plan.hash, render=partial(render_kernels, plan))
    module = kdir / render.module_file(plan)
    stamp = module.stat().st_mtime_ns
    mod = load_kernels(kdir, plan_hash=plan.hash, render=partial(render_kernels, plan))
    assert module.stat().st_mtime_ns == stamp and mod.PLAN_HASH == plan.hash


def test_a_fifo_in_place_of_the_manifest_does_not_hang(plan, tmp_path):
    kdir = tmp_path / "kernels"
    kdir.mkdir()
    os.mkfifo(kdir / "manifest.json")
    mod = load_kernels(kdir, plan_hash=plan.hash, render=partial(render_kernels, plan))  # rendered again
    assert mod.PLAN_HASH == plan.hash and (kdir / "manifest.json").is_file()


def test_the_backend_needs_the_renderer(tmp_path):
    with pytest.raises(TypeError, match="render"):
        TritonBackend(tmp_path, plan_hash="0" * 64)


# ---- the cache key covers everything the module depends on ----------------------------------------
def _changed(monkeypatch, what: str) -> None:
    if what == "helper":  # runtime/backends/triton_kernels.py, which every generated module imports
        real = render._dependency
        monkeypatch.setattr(render, "_dependency", lambda package, name: real(package, name) + b"# changed\n")
    elif what == "template":
        real_t = render._template
        monkeypatch.setattr(render, "_template", lambda name: real_t(name) + "{# changed #}")
    elif what == "render version":
        monkeypatch.setattr(render, "RENDER_VERSION", render.RENDER_VERSION + 1)
    elif what == "renderer":
        real_r = render._renderer_source
        monkeypatch.setattr(render, "_renderer_source", lambda: real_r() + b"# changed\n")


@pytest.mark.parametrize("what", ["helper", "template", "render version", "renderer"])
def test_a_changed_dependency_changes_the_key_and_rerenders(plan, tmp_path, monkeypatch, what):
    kdir = tmp_path / "kernels"
    render_kernels(plan, kdir)
    before = json.loads((kdir / "manifest.json").read_text())["cache_key"]
    assert before == cache_key(plan)
    _changed(monkeypatch, what)
    after = cache_key(plan)
    assert after != before
    render_kernels(plan, kdir)
    assert json.loads((kdir / "manifest.json").read_text())["cache_key"] == after


def test_a_changed_helper_reloads_under_another_name(plan, tmp_path, monkeypatch):
    """load_kernels re-renders a kernel dir whose key is stale even though the plan hash is the same,
    and the module's import name (which autotune.json records) changes with it."""
    kdir = tmp_path / "kernels"
    first = load_kernels(kdir, plan_hash=plan.hash, render=partial(render_kernels, plan)).__name__
    _changed(monkeypatch, "helper")
    second = load_kernels(kdir, plan_hash=plan.hash, render=partial(render_kernels, plan)).__name__
    assert first != second and second == f"spava_kernels_{cache_key(plan)[:16]}"
    assert json.loads((kdir / "manifest.json").read_text())["cache_key"] == cache_key(plan)


# ---- tuned once, not again ---------------------------------------------------------------------------
CONFIGS = [(32, 32, 1, 1, 0, 1), (16, 16, 1, 1, 0, 1)]  # interpreter-sized candidates (BLOCK >= 16)


def _launch(backend, seed: int = 0):
    """One real launch (a task of 20 query rows against one full segment of 40 keys), fp16: the
    dtype the tuner times (fp32 takes FP32_CONFIG untuned)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(20, 4, 16, generator=g).half()
    k, v = (torch.randn(40, 2, 16, generator=g).half() for _ in range(2))
    checked = [backend._check(TaskInput("t", q, (KVSegment(k, v, "full"),)))]
    name = backend.mod.LAUNCHES[(("full",),)]
    return name, checked


def _tune_once(backend, calls: list) -> tuple:
    name, checked = _launch(backend)
    q = checked[0][0]
    return backend._tuned("test-device", name, checked, 1 / math.sqrt(16), (name, q.dtype, q.device))


def test_a_kernel_dir_tuned_once_is_not_tuned_again(plan, tmp_path, monkeypatch):
    calls: list = []

    def timer(fn):
        fn()
        calls.append(1)
        return float(len(calls))  # the first candidate is the fastest

    kdir = tmp_path / "kernels"

    def run():  # one run: a new backend (and tuner) over the kernel dir
        return TritonBackend(kdir, plan_hash=plan.hash, render=partial(render_kernels, plan), configs=CONFIGS,
                             timer=timer, cudnn=False)

    chosen = _tune_once(run(), calls)
    assert chosen == CONFIGS[0] and len(calls) == len(CONFIGS)
    table = json.loads((kdir / "autotune.json").read_text())
    assert table["module"] == f"spava_kernels_{cache_key(plan)[:16]}" and "test-device" in table["devices"]

    assert _tune_once(run(), calls) == chosen and len(calls) == len(CONFIGS)  # the next run: reused
    assert _tune_once(run(), calls) == chosen and len(calls) == len(CONFIGS)

    _changed(monkeypatch, "helper")  # other kernels now: their table is not reused
    assert _tune_once(run(), calls) == chosen and len(calls) == 2 * len(CONFIGS)


def test_a_read_only_plan_folder_tunes_into_the_same_user_dir_every_run(plan, tmp_path, monkeypatch):
    """spava-run's kernel dir where the plan's folder cannot be written: one per user and plan, so
    the next run finds its autotune.json (a fresh temporary dir per run tuned every launch again)."""
    monkeypatch.setenv("SPAVA_CACHE_DIR", str(tmp_path / "cache"))
    first, again = user_kernel_dir(plan.hash), user_kernel_dir(plan.hash)
    assert first == again == tmp_path / "cache" / "kernels" / plan.hash[:16]
    assert first.is_dir() and first.stat().st_mode & 0o777 == 0o700
    assert user_kernel_dir("f" * 64) != first
    calls: list = []
    timer = lambda fn: (fn(), calls.append(1), 1.0)[-1]  # noqa: E731
    for _ in range(2):  # two runs
        backend = TritonBackend(user_kernel_dir(plan.hash), plan_hash=plan.hash, render=partial(render_kernels, plan),
                                configs=CONFIGS, timer=timer, cudnn=False)
        _tune_once(backend, calls)
    assert len(calls) == len(CONFIGS)


def test_a_malformed_autotune_entry_is_tuned_again_not_used(plan, tmp_path):
    """autotune.json may come with a plan folder too: an entry that is not a config is left out."""
    calls: list = []
    kdir = tmp_path / "kernels"
    backend = TritonBackend(kdir, plan_hash=plan.hash, render=partial(render_kernels, plan), configs=CONFIGS,
                            timer=lambda fn: (fn(), calls.append(1), 1.0)[-1], cudnn=False)
    name, _ = _launch(backend)
    (kdir / "autotune.json").write_text(json.dumps({
        "version": AUTOTUNE_VERSION, "module": backend.mod.__name__,
        "devices": {"test-device": {f"{name}:float16": {"config": ["__import__('os')", 1], "candidates": {}}}}}))
    again = TritonBackend(kdir, plan_hash=plan.hash, render=partial(render_kernels, plan), configs=CONFIGS,
                          timer=lambda fn: (fn(), calls.append(1), 1.0)[-1], cudnn=False)
    assert again.tuner.get("test-device", f"{name}:float16") is None
    assert _tune_once(again, calls) in CONFIGS and len(calls) == len(CONFIGS)


def test_spava_run_refuses_a_tampered_plan_folder_in_one_line(plan, tmp_path):
    """Through the entry point: `spava-run plan=... backend=triton` (the interpreter here, a GPU's
    backend=auto elsewhere) exits 2 with one line naming the kernel dir, and the payload never ran."""
    import subprocess
    import sys

    plan.save(tmp_path / "plan.json")
    kdir, marker = tmp_path / "kernels", tmp_path / "marker"
    module = render_kernels(plan, kdir)
    module.write_text(module.read_text() + _payload(marker))
    _rehash(kdir)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "spava_plan.entry.run", f"plan={tmp_path / 'plan.json'}", "model.init=random",
                        "backend=triton", "max_new_tokens=1"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    errors = [line for line in p.stderr.splitlines() if "error:" in line]
    assert p.returncode == 2 and len(errors) == 1, p.stderr[-3000:]
    assert str(kdir) in errors[0] and "refused" in errors[0] and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert not marker.exists()
