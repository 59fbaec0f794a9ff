"""Any clip length, and no request degrading another (issue 24 items 3 and 7).

- Short clips (1 frame, 4 s, 24 s at 168x112 on the tiny model, 2 GPUs) get a plan that holds
  them, planned by planner/fit.py when Spava's blocks cannot hold them: the fastest by predicted
  prefill among the methods that do (checked against dense and zigzag_ring planned directly).
- Plan-family poisoning: a large clip's plan never serves a small clip (bucket step), also after
  a restart; the small clip gets exactly the plan a fresh store gives it.
- The cache caps (max_cached_plans with least-recently-used eviction and pinning, max_plan_tokens)
  and the operator CLI (python -m spava_plan.entry.plan_store).
- `spava-plan video.path=<4 s clip>` plans, with a note saying what it chose.
Everything runs the real planner (planning a tiny plan takes milliseconds).
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("av")

import model_fixtures as mf  # noqa: E402
from spava_plan.config import METHODS, MethodConfig  # noqa: E402
from spava_plan.errors import InfeasiblePlanError  # noqa: E402
from spava_plan.hydra_conf import compose_config  # noqa: E402
from spava_plan.plan_load import load_plan  # noqa: E402
from spava_plan.entry.plan_store import NoPlanFitsError, PlanStore, bucket_frames, read_index  # noqa: E402
from spava_plan.planner.build import derive  # noqa: E402
from spava_plan.planner.fit import fit_config  # noqa: E402

BASE = ["model=tiny", "gpus=2", "kernels=false"]  # the paper's rules: anchor 128, 2 hosts per GPU
H, W = 112, 168  # a 168x112 clip (width x height)
# clip -> (frames in the file, its rate, frames sampled at video.fps=2)
CLIPS = {"1 frame": (1, 25, 1), "4 s": (40, 10, 8), "24 s": (240, 10, 48)}
REL = 1e-9  # predictions are the same arithmetic in one process: equal up to float reassociation


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clips")
    return {name: mf.write_video(root / f"{n}.mp4", frames=n, height=H, width=W, fps=fps)
            for name, (n, fps, _) in CLIPS.items()}


def _with(cfg, method: str, gpus: int):
    topology = dataclasses.replace(cfg.topology, gpus=gpus)
    return dataclasses.replace(cfg, topology=topology, method=MethodConfig(name=method, hosts_per_gpu=2 if method
                                                                            == "zigzag_ring" else 1))


@pytest.mark.parametrize("clip", list(CLIPS))
def test_every_clip_length_gets_a_plan_that_holds_it(clips, clip, tmp_path):
    store = PlanStore(tmp_path / "plans", BASE)
    sampled = CLIPS[clip][2]
    cfg = store.config_for(sampled, H, W, 32)
    with pytest.raises(InfeasiblePlanError):  # the family's own method cannot hold the clip's shape...
        derive(cfg, require_fit=False)
    got = store.choose_for_clip(clips[clip], question_tokens=12)  # ...the store still answers
    lay = got.plan.layout
    assert lay.frames >= store.padded_frames(sampled) and lay.frames == bucket_frames(sampled, 2)
    assert tuple(lay.frame_size) == (H, W)  # 112x168 is a multiple of 28 already: no resize
    assert got.method == got.plan.method == got.entry.method and got.method in METHODS
    assert got.entry.predicted_us == pytest.approx(got.plan.prediction.makespan_us, rel=REL)
    planned = store.bucket_config(sampled, H, W, 12)
    if got.notes:  # fitted: the fastest of the methods that hold it, by predicted prefill
        assert f"method={got.method}" in got.notes[0] and "too short" in got.notes[0]
        for method, gpus in (("dense", 1), ("zigzag_ring", 1), ("zigzag_ring", 2)):
            try:
                other = derive(_with(planned, method, gpus), detail=False).prediction.makespan_us
            except InfeasiblePlanError:
                continue
            assert got.plan.prediction.makespan_us <= other * (1 + REL), (method, gpus)
    else:  # the bucket itself holds the family's method
        assert got.method == "spava" and got.plan.world_size == 2
    assert clip != "1 frame" or got.plan.world_size == 1  # one temporal grid: one rank encodes it
    # a restarted store finds it: no planning, the same plan
    again = PlanStore(tmp_path / "plans", BASE).choose_for_clip(clips[clip], question_tokens=12)
    assert not again.planned_now and again.plan.hash == got.plan.hash


def test_fit_config_keeps_a_config_that_plans_and_names_what_it_chose():
    cfg = compose_config([*BASE, "frames=256", f"video.resolution={H}x{W}"])
    assert fit_config(cfg) == (cfg, [])
    short = compose_config([*BASE, "frames=8", f"video.resolution={H}x{W}"])
    fitted, notes = fit_config(short)
    assert fitted.method.name != "spava" or fitted.topology.gpus < 2 or fitted.method.hosts_per_gpu < 2
    assert len(notes) == 1 and "the anchor (128 tokens) covers the whole context" in notes[0]
    # a torchrun world that must keep its 2 ranks cannot encode one temporal grid on both
    one = compose_config([*BASE, "frames=2", f"video.resolution={H}x{W}"])
    assert fit_config(one)[0].topology.gpus == 1
    with pytest.raises(InfeasiblePlanError, match="frames"):
        fit_config(one, same_world=True)


def test_a_large_clip_never_poisons_the_family_for_small_ones(tmp_path):
    root = tmp_path / "plans"
    store = PlanStore(root, BASE)
    large = store.choose(frames=256, height=H, width=W, question_tokens=8)
    small = store.choose(frames=8, height=H, width=W, question_tokens=8)
    own = PlanStore(tmp_path / "fresh", BASE).choose(frames=8, height=H, width=W, question_tokens=8)
    assert large.planned_now and small.planned_now and small.plan.hash != large.plan.hash
    assert small.plan.hash == own.plan.hash
    assert small.entry.predicted_us == pytest.approx(own.entry.predicted_us, rel=REL)
    assert large.entry.predicted_us > 2 * small.entry.predicted_us  # what serving it on the large plan would cost
    # after a restart too: the index keeps both, the small clip still gets its own
    restarted = PlanStore(root, BASE, plan_on_the_fly=False)
    assert restarted.choose(frames=8, height=H, width=W, question_tokens=8).plan.hash == own.plan.hash
    assert restarted.choose(frames=200, height=H, width=W, question_tokens=8).plan.hash == large.plan.hash
    # with planning off, a clip no plan holds within the step is refused, never run on the large plan
    with pytest.raises(NoPlanFitsError, match="bucket step.*frames=32"):
        restarted.choose(frames=24, height=H, width=W, question_tokens=8)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spava_plan.entry.plan_store", *args], capture_output=True, text=True,
                          timeout=120)


def test_least_recently_used_plans_are_evicted_and_pinned_ones_kept(tmp_path):
    root = tmp_path / "plans"
    store = PlanStore(root, BASE, max_cached_plans=2)
    shape = dict(height=H, width=W, question_tokens=8)
    a = store.choose(frames=8, **shape)
    b = store.choose(frames=32, **shape)  # none of these holds another: each is over 2x the smaller's tokens
    assert not store.choose(frames=8, **shape).planned_now  # a is used again: b is now the least recent
    c = store.choose(frames=128, **shape)
    hashes = {e.hash for e in read_index(root)}
    assert hashes == {a.plan.hash, c.plan.hash} and not b.directory.exists() and a.directory.is_dir()
    store.pin(a.plan.hash[:8])
    d = store.choose(frames=512, **shape)  # c goes, although a was used before it: a is pinned
    assert {e.hash for e in read_index(root)} == {a.plan.hash, d.plan.hash} and not c.directory.exists()
    res = _cli("pin", f"plan_dir={root}", d.plan.hash[:10])
    assert res.returncode == 0 and "pinned" in res.stdout, res.stderr
    with pytest.raises(NoPlanFitsError, match="max_cached_plans=2"):  # every cached plan pinned: no room
        store.choose(frames=32, **shape)
    listing = _cli("list", f"plan_dir={root}")
    assert listing.returncode == 0 and a.plan.hash[:16] in listing.stdout and "2 plans" in listing.stdout
    assert _cli("evict", f"plan_dir={root}", a.plan.hash).returncode == 0
    assert not a.directory.exists() and {e.hash for e in read_index(root)} == {d.plan.hash}
    assert store.choose(frames=32, **shape).planned_now  # room again


def test_the_operator_cli_refuses_bad_input_in_one_line(tmp_path):
    root = tmp_path / "plans"
    PlanStore(root, BASE).choose(frames=8, height=H, width=W, question_tokens=8)
    for args, setting in ((("evict", f"plan_dir={root}", "ffffffff"), "hash"),
                          (("pin", f"plan_dir={root}", "xyz"), "hash"),
                          (("pin", f"plan_dir={root}"), "hash"),
                          (("list", f"plan_dir={tmp_path / 'nope'}"), "plan_dir"),
                          (("list",), "plan_dir"),
                          (("drop", f"plan_dir={root}"), "command")):
        res = _cli(*args)
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and setting in res.stderr, (args, res.stderr)
        assert "Traceback" not in res.stderr
    assert len(read_index(root)) == 1


def test_planning_on_the_fly_is_capped_in_tokens(tmp_path):
    root = tmp_path / "plans"
    capped = PlanStore(root, BASE, max_plan_tokens=1000)
    with pytest.raises(NoPlanFitsError, match="max_plan_tokens=1,000"):
        capped.choose(frames=128, height=H, width=W, question_tokens=8)
    assert read_index(root) == []
    planned = PlanStore(root, BASE).choose(frames=128, height=H, width=W, question_tokens=8)  # the operator's
    assert capped.choose(frames=128, height=H, width=W, question_tokens=8).plan.hash == planned.plan.hash


def test_an_index_of_version_1_is_still_read(tmp_path):
    root = tmp_path / "plans"
    got = PlanStore(root, BASE).choose(frames=8, height=H, width=W, question_tokens=8)
    data = json.loads((root / "index.json").read_text())
    v1 = {"version": 1, "plans": [{k: v for k, v in e.items() if k not in ("predicted_us", "cached", "pinned",
                                                                            "last_used")} for e in data["plans"]]}
    (root / "index.json").write_text(json.dumps(v1))
    (entry,) = read_index(root)
    assert entry.cached and entry.predicted_us == pytest.approx(got.plan.prediction.makespan_us, rel=REL)
    assert PlanStore(root, BASE, plan_on_the_fly=False).choose(frames=8, height=H, width=W,
                                                               question_tokens=8).plan.hash == got.plan.hash


@pytest.mark.parametrize("clip", ["4 s", "1 frame"])
def test_spava_plan_plans_a_short_clip_with_a_note(clips, clip, tmp_path):
    res = subprocess.run([sys.executable, "-m", "spava_plan.entry.cli", *BASE, f"video.path={clips[clip]}",
                          "hydra.run.dir=out"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    notes = [line for line in res.stdout.splitlines() if line.startswith("note: ")]
    plan = load_plan(tmp_path / "out" / "plan.json")
    assert len(notes) == 1 and "too short" in notes[0] and f"method={plan.method} gpus={plan.world_size}" in notes[0]
    assert plan.layout.frames == {"4 s": 8, "1 frame": 2}[clip] and tuple(plan.layout.frame_size) == (H, W)


def test_bad_store_settings_name_the_setting(tmp_path):
    from spava_plan.errors import ConfigError

    not_a_dir = tmp_path / "hostname"
    not_a_dir.write_text("x\n")
    with pytest.raises(ConfigError, match="plan_dir"):  # refused at start, not a 500 on every request
        PlanStore(not_a_dir, BASE)
    for kwargs, setting in ((dict(max_cached_plans=-1), "max_cached_plans"),
                            (dict(max_plan_tokens=0), "max_plan_tokens"), (dict(max_cached_plans=True), "max_cached_plans")):
        with pytest.raises(ConfigError, match=setting):
            PlanStore(tmp_path / "plans", BASE, **kwargs)
    with pytest.raises(NoPlanFitsError, match="max_cached_plans=0"):  # nothing may be cached: nothing planned
        PlanStore(tmp_path / "plans", BASE, max_cached_plans=0).choose(frames=8, height=H, width=W, question_tokens=8)


WORKER = """
import sys
from spava_plan.entry.plan_store import PlanStore
store = PlanStore(sys.argv[1], {base!r})
for frames in [int(f) for f in sys.argv[2].split(",")]:
    for _ in range(3):  # planned once, then held (each use rewrites the index under the lock)
        store.choose(frames=frames, height={h}, width={w}, question_tokens=8)
"""


def test_processes_sharing_a_family_keep_the_index_whole(tmp_path):
    """Two server processes planning and using plans on one root at once: every plan either made is
    in the index (no lost update), loads, and no temporary file or folder is left behind."""
    root = tmp_path / "plans"
    code = WORKER.format(base=BASE, h=H, w=W)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(root), frames], stderr=subprocess.PIPE, text=True)
             for frames in ("8,128", "32,512")]  # 4x apart: none holds another
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    entries = read_index(root)
    want = {8, 32, 128, 512}
    assert sorted(e.frames for e in entries) == sorted(want) and len({e.hash for e in entries}) == len(want)
    for e in entries:
        assert load_plan(root / e.path / "plan.json").hash == e.hash and e.last_used > 0
    assert not [p.name for p in root.rglob("*") if p.name.startswith(".") and p.name != ".index.lock"]
