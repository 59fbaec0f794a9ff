"""`spava-run` over spava_plan.entry.session: a clean stop on Ctrl-C / SIGTERM, one frame-sampling rule
for re-planning, questions in any script, what random weights do with a question, warmup=true and
tune_only=true. The tiny model with random weights on the CPU (no checkpoint needed)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("av")

import model_fixtures as mf  # noqa: E402

from spava_plan.config import SpavaConfig  # noqa: E402
from spava_plan.errors import ConfigError  # noqa: E402
from spava_plan.hydra_conf import compose_config  # noqa: E402
from spava_plan.planner.build import build_plan  # noqa: E402
from spava_plan.entry.run_config import compose_entry_config, hydra_quote  # noqa: E402
from spava_plan.video_meta import plan_for_clip  # noqa: E402

RUN = [sys.executable, "-m", "spava_plan.entry.run"]
TINY = ["model=tiny", "model.init=random", "device=cpu"]


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", **extra)
    return env


def _run(args: list[str], cwd: Path, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*RUN, *args], cwd=str(cwd), env=_env(**env), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def plan54(tmp_path_factory) -> Path:
    """The tiny model's plan for 54 frames at 112x168 on 2 ranks (no kernels rendered)."""
    root = tmp_path_factory.mktemp("plan54")
    cfg = compose_config(["model=tiny", "gpus=2", "frames=54", "video.resolution=112x168", "kernels=false"])
    build_plan(cfg).save(root / "plan.json")
    return root / "plan.json"


# -- questions --------------------------------------------------------------------------------------
@pytest.mark.parametrize("question", [
    "\u0645\u0627\u0630\u0627 \u064a\u062d\u062f\u062b\u061f\u200f",  # Arabic with a right-to-left mark
    "\u05de\u05d4 \u05e7\u05d5\u05e8\u05d4 \u05db\u05d0\u05df?",  # Hebrew
    "Who is \U0001f469\u200d\U0001f4bb here?",  # an emoji joined by a zero-width joiner
    "It's \"quoted\", costs ${x} = a,b [c] {d}",  # Hydra's grammar characters, an interpolation
])
def test_questions_in_any_script_compose_unchanged(question):
    cfg = compose_entry_config("run", ["model=tiny", f"question={question}"])
    assert cfg.question == question
    assert compose_entry_config("run", ["model=tiny", f"question={hydra_quote(question)}"]).question == question


@pytest.mark.parametrize("bad", ["a\x1b[31mred", "two\nlines", "nul\x00", "bell\x07"])
def test_control_characters_in_a_question_are_refused(bad):
    with pytest.raises(ConfigError, match=r"question: must not contain control characters"):
        compose_entry_config("run", ["model=tiny", f"question={bad}"])


def test_random_weights_without_a_tokenizer_say_the_question_is_not_read(plan54, tmp_path):
    p = _run([f"plan={plan54}", *TINY, "question=What happens?", "max_new_tokens=2"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.search(r"^note: the question is not read: random weights without a tokenizer take \d+ synthetic "
                     r"prompt ids in its place", p.stdout, re.M), p.stdout


# -- one frame-sampling rule --------------------------------------------------------------------------
def test_replan_samples_a_short_clip_as_spava_plan_does(plan54, tmp_path):
    """A 10 s clip of 40 frames (4 fps) under a 54-frame plan: replan=true plans the frames the
    processor samples at the plan's video.fps (2 per second: 20), as `spava-plan video.path=` does,
    not every frame of the clip (40)."""
    clip = mf.write_video(tmp_path / "c.mp4", frames=40, height=112, width=168, fps=4)
    # zigzag_ring: 20 frames of 112x168 are too few tokens for Spava's 128-token selection tiles
    overrides = ["model=tiny", "gpus=2", "method=zigzag_ring", "video.resolution=112x168", "kernels=false"]
    planned = plan_for_clip(compose_config([*overrides, f"video.path={clip}"]))
    assert isinstance(planned, SpavaConfig) and planned.video.frames == 20
    build_plan(compose_config([*overrides, "frames=54"])).save(tmp_path / "plan.json")
    p = _run([f"plan={tmp_path / 'plan.json'}", *TINY, f"video={clip}", "replan=true", "max_new_tokens=1"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.search(r"^note: re-planned for this input: frames=20\b", p.stdout, re.M), p.stdout


def test_a_clip_shorter_than_the_plan_names_replan(plan54, tmp_path):
    clip = mf.write_video(tmp_path / "short.mp4", frames=6, height=112, width=168)
    p = _run([f"plan={plan54}", *TINY, f"video={clip}", "max_new_tokens=1"], tmp_path)
    assert p.returncode == 2
    line = [ln for ln in p.stderr.splitlines() if "spava-run:" in ln]
    assert len(line) == 1 and "re-plan with frames<=6" in line[0] and "replan=true" in line[0], p.stderr


def test_a_clip_of_another_size_is_refused_from_its_metadata(plan54, tmp_path, monkeypatch, capsys):
    """A 2160x3840 clip for the 112x168 plan: refused naming video.resolution before any frame is
    decoded (issue 30: an 8K clip decoded and processed for 74 s before the mismatch was reported);
    a clip of the plan's own size still runs."""
    from spava_plan.entry import session as session_mod
    from spava_plan.entry.run import run_emulated
    from spava_plan.entry.run_config import compose_entry_config

    big = mf.write_video(tmp_path / "big.mp4", frames=54, height=2160, width=3840)
    monkeypatch.setattr(session_mod, "read_frames", lambda *a, **k: pytest.fail("decoded before the size check"))
    cfg = compose_entry_config("run", [f"plan={plan54}", *TINY, f"video={big}", "max_new_tokens=1"])
    assert run_emulated(cfg, None) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("spava-run: error: video.resolution") and "2160x3840" in err[-1], err
    ok = mf.write_video(tmp_path / "ok.mp4", frames=54, height=112, width=168)
    p = _run([f"plan={plan54}", *TINY, f"video={ok}", "max_new_tokens=1"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]


# -- warmup=true, tune_only=true ---------------------------------------------------------------------
def test_warmup_runs_one_untimed_pass_first(plan54, tmp_path):
    p = _run([f"plan={plan54}", *TINY, "warmup=true", "max_new_tokens=2"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "note: the timings follow one untimed warm-up pass of one token (warmup=true)" in p.stdout
    assert re.search(r"^answer: token ids( \d+){2}$", p.stdout, re.M), p.stdout


def test_tune_only_renders_and_loads_the_kernels_on_a_cpu(plan54, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_bytes(plan54.read_bytes())
    p = _run([f"plan={plan}", "model=tiny", "tune_only=true", "device=cpu"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.fullmatch(r"tune_only: kernels rendered and loaded on cpu \(no GPU: nothing to tune or compile\); "
                        rf"kernel dir {re.escape(str(tmp_path / 'kernels'))}\n", p.stdout), p.stdout
    assert (tmp_path / "kernels" / "manifest.json").is_file()
    assert not (tmp_path / "outputs").exists()  # nothing else written


def test_tune_only_needs_a_plan():
    with pytest.raises(ConfigError, match=r"tune_only: needs plan=PATH"):
        compose_entry_config("run", ["model=tiny", "tune_only=true"])


# -- a clean stop ------------------------------------------------------------------------------------
def _start(args: list[str], cwd: Path, env: dict) -> tuple[subprocess.Popen, list[str], threading.Event]:
    """Start spava-run with its steps logged to stderr; the event is set once generation begins.
    Only the reader thread reads stderr (stdout is read after the exit)."""
    proc = subprocess.Popen([*RUN, *args, "hydra.verbose=spava_plan"], cwd=str(cwd), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if "new tokens on" in line:
                started.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    proc.reader = reader  # type: ignore[attr-defined]
    return proc, lines, started


def _stopped_cleanly(proc: subprocess.Popen, lines: list[str], sig: int) -> None:
    proc.wait(timeout=60)
    proc.reader.join(timeout=30)  # type: ignore[attr-defined]  # stderr read to its end
    out = proc.stdout.read()
    err = "".join(lines)
    assert proc.returncode in ((130,) if sig == signal.SIGINT else (143, 130)), (proc.returncode, err[-3000:])
    assert "Traceback" not in err and "terminate called" not in err, err[-3000:]
    stop = [ln for ln in err.splitlines() if "spava-run:" in ln]
    assert len(stop) == 1 and f"stopped by {signal.Signals(sig).name}" in stop[0], err[-3000:]
    assert "answer:" not in out  # nothing half-reported


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_an_emulated_run_stops_it_cleanly(plan54, tmp_path, sig):
    proc, lines, started = _start([f"plan={plan54}", *TINY, "max_new_tokens=30000"], tmp_path, _env())
    try:
        assert started.wait(180), "".join(lines)[-3000:]
        time.sleep(1.0)  # inside vision / prefill / decode on the rank threads
        proc.send_signal(sig)
        _stopped_cleanly(proc, lines, sig)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_under_torchrun_stops_every_rank_cleanly(plan54, tmp_path):
    """torchrun forwards SIGTERM to every worker: each rank stops with one line, none aborts."""
    from spava_plan.runtime.comm.dist import free_port

    port = free_port()
    procs = [_start([f"plan={plan54}", *TINY, "max_new_tokens=30000"], tmp_path, mf.dist_env(r, 2, port))
             for r in range(2)]
    try:
        for _, lines, started in procs[:1]:
            assert started.wait(180), "".join(lines)[-3000:]
        time.sleep(1.0)
        for proc, _, _ in procs:
            proc.send_signal(signal.SIGTERM)
        for proc, lines, _ in procs:
            _stopped_cleanly(proc, lines, signal.SIGTERM)
    finally:
        for proc, _, _ in procs:
            if proc.poll() is None:
                proc.kill()


@pytest.mark.parametrize("module", ["spava_plan.entry.run", "spava_plan.server.serve", "spava_plan.entry.session"])
def test_the_wait_policy_is_set_before_torch_loads(module):
    """OpenMP reads OMP_WAIT_POLICY once, as torch loads it: the entry modules set it before that."""
    code = ("import os, sys\n"
            "class Watch:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch':\n"
            "            print('at torch import:', os.environ.get('OMP_WAIT_POLICY'), flush=True)\n"
            "            sys.meta_path.remove(self)\n"
            "sys.meta_path.insert(0, Watch())\n"
            f"import {module}\n")
    env = {k: v for k, v in _env().items() if k != "OMP_WAIT_POLICY"}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.splitlines()[0] == "at torch import: PASSIVE", p.stdout
