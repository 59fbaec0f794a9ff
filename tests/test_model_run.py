"""``python -m spava_plan.entry.run`` end to end: a real (tiny) checkpoint, a real video file, the default
Spava budget, W ranks as gloo processes (launched the way torchrun launches them) or emulated in
one process; and every bad input ending with one clear line and exit code 2 on every rank."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("av")

import model_fixtures as mf  # noqa: E402

RUN = ["-m", "spava_plan.entry.run"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """54 frames at 112x168: 27 grids x 24 tokens, so W=2's four blocks exceed 128 tokens each and the
    default budget really selects (keep=128 of ~134 per block)."""
    root = tmp_path_factory.mktemp("run")
    ckpt = mf.build_checkpoint(root / "ckpt", "qwen2_vl")
    video = mf.write_video(root / "v.mp4", frames=56, height=112, width=168)
    inputs = mf.tiny_inputs(ckpt, video, 54, "qwen2_vl")
    plan = mf.tiny_plan(inputs, "qwen2_vl", 2, 54, "112x168")
    assert not plan.config["method"]["pass_all"] and plan.layout.segments[1].keep < plan.layout.segments[1].length
    plan.save(root / "plan.json")
    return root


def _args(root, **over):
    args = {"plan": root / "plan.json", "model.checkpoint": root / "ckpt", "video": root / "v.mp4",
            "question": mf.QUESTION, "max_new_tokens": 5}
    args.update(over)
    return [f"{k}={v}" for k, v in args.items() if v is not None]


def _single(root, **over):
    import subprocess

    env = {k: v for k, v in mf.dist_env(0, 1, 0).items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    p = subprocess.run([sys.executable, *RUN, *_args(root, **over)], cwd=str(root), env=env, capture_output=True,
                       text=True, timeout=180)
    return p.returncode, p.stdout, p.stderr


def _answer(stdout: str) -> tuple[str, int]:
    answer = re.search(r"^answer: (.*)$", stdout, re.M)
    tokens = re.search(r"decode .* \((\d+) tokens, max_new_tokens=5\)", stdout)
    assert answer and tokens, stdout
    return answer.group(1), int(tokens.group(1)) + 1


def test_default_budget_gloo_run_completes_and_matches_the_emulated_run(setup):
    results = mf.launch(lambda r: [*RUN, *_args(setup)], 2, cwd=setup)
    for rank, (rc, _, err) in enumerate(results):
        assert rc == 0, f"rank {rank}:\n{err[-3000:]}"
    out0, out1 = results[0][1], results[1][1]
    assert out1 == ""  # only rank 0 reports (the ranks checked among themselves that their tokens agree)
    answer, n = _answer(out0)
    assert 1 <= n <= 5 and answer.isprintable()
    assert "gloo 2-rank" in out0 and re.search(r"vision [\d.]+ s \| prefill [\d.]+ s \| first token", out0)
    # each rank decoded its own frames (the default), and the slowest rank's input time is reported
    assert re.search(r"note: input on every rank \(video_decode=own\): slowest [\d.]+ s \(rank [01]\)", out0), out0
    # The same plan emulated in one process (threads + in-process communicator) gives the same text.
    rc, out, err = _single(setup)
    assert rc == 0, err[-3000:]
    assert _answer(out) == (answer, n) and "emulated 2-rank" in out


def _one_error_line(stderr: str, rank: int | None = None) -> str:
    lines = [ln for ln in stderr.splitlines() if "spava-run:" in ln]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    if rank is not None:
        assert f"[rank {rank}] error:" in lines[0]
    return lines[0]


@pytest.mark.parametrize("case, match", [
    ("corrupt_checkpoint", "model.checkpoint: cannot load the weights"),
    ("unreadable_video", "cannot open .*junk.mp4' as a video"),
    ("short_video", "has 6 frames but the plan samples 54; .*re-plan with frames<=6"),
    ("long_question", "the question takes \\d+ tokens but the plan holds at most \\d+.*video.max_question_tokens="),
    ("one_rank_without_video", "no video file"),
    ("fewer_grids_than_ranks", "the video gives 1 temporal grids but frame-parallel vision needs one per rank "
                               r"\(2\); use frames>=4"),
])
def test_bad_input_fails_on_every_rank_with_exit_2(setup, tmp_path, case, match):
    over: dict = {}
    if case == "corrupt_checkpoint":
        bad = mf.build_checkpoint(tmp_path / "ckpt")
        (bad / "model.safetensors").write_bytes(b"\x00" * 256)
        over["model.checkpoint"] = bad
    elif case == "unreadable_video":
        junk = tmp_path / "junk.mp4"
        junk.write_bytes(b"not a video at all" * 64)
        over["video"] = junk
    elif case == "short_video":
        over["video"] = mf.write_video(tmp_path / "short.mp4", frames=6, height=112, width=168)
    elif case == "fewer_grids_than_ranks":  # re-planning for a 2-frame video: one temporal grid, two ranks
        over["video"] = mf.write_video(tmp_path / "two.mp4", frames=2, height=112, width=168)
        over["replan"] = "true"
    elif case == "long_question":
        over["question"] = mf.QUESTION + " Please describe every object and every motion in great detail."

    def argv(rank):
        if case == "one_rank_without_video":  # only rank 1 is missing its input: rank 0 must not hang
            return [*RUN, *_args(setup, video=tmp_path / "missing.mp4" if rank == 1 else setup / "v.mp4")]
        return [*RUN, *_args(setup, **over)]

    results = mf.launch(argv, 2, cwd=setup, timeout=120)
    for rank, (rc, _, err) in enumerate(results):
        assert rc == 2, f"rank {rank} exited {rc}:\n{err[-3000:]}"
        line = _one_error_line(err, rank)
        assert re.search(match, line), line


def test_replan_fits_a_different_question(setup):
    question = mf.QUESTION + " Please describe every object and every motion in great detail."
    rc, out, err = _single(setup, question=question, replan="true")
    assert rc == 0, err[-3000:]
    assert re.search(r"re-planned for this input: video.max_question_tokens=\d+", out)
    _answer(out)


@pytest.mark.parametrize("over, match", [
    ({"model.checkpoint": "/nonexistent/ckpt"}, "model.checkpoint: no checkpoint directory"),
    ({"plan": "/nonexistent/plan.json"}, "no plan file at '/nonexistent/plan.json'"),
    ({"max_new_tokens": 0}, "max_new_tokens: must be >= 1"),
    ({"bogus": 1}, "unknown setting 'bogus'"),
])
def test_single_process_errors_are_one_line_exit_2(setup, over, match):
    rc, out, err = _single(setup, **over)
    assert rc == 2, err[-3000:]
    assert re.search(match, _one_error_line(err)), err


def test_random_init_without_checkpoint_runs_the_plan(setup):
    """model.init=random with no checkpoint: the plan's dims, random-pixel frames, synthetic prompt ids."""
    rc, out, err = _single(setup, **{"model.checkpoint": None, "video": None, "question": None,
                                     "model.init": "random", "emulated_timing": "true"})
    assert rc == 0, err[-3000:]
    assert re.search(r"^answer: token ids( \d+){1,5}$", out, re.M) and "random weights" in out
    ttft = re.search(r"^emulated 2-rank on cpu: time to first token ([\d.]+) ms on the critical path", out, re.M)
    assert ttft and float(ttft.group(1)) > 0, out
    trace = re.search(r"^trace of the emulated run: (\S+) ", out, re.M)  # same format as the plan's trace.json
    assert trace, out
    doc = json.loads(Path(trace.group(1)).read_text())
    ranks = {e["args"]["name"] for e in doc["traceEvents"] if e["ph"] == "M" and e["name"] == "process_name"}
    spans = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert ranks == {"rank 0", "rank 1"} and {e["cat"] for e in spans} >= {"compute", "comm"}
    end = max(e["ts"] + e["dur"] for e in spans) / 1e3
    assert end == pytest.approx(float(ttft.group(1)), abs=0.01)  # the printed TTFT is rounded to 0.01 ms


@pytest.mark.parametrize("name, billions", [("qwen2_5vl_3b", 3.75), ("qwen2vl", 8.29)])
def test_random_init_builds_the_real_size_model(name, billions):
    """The HF model built from conf/model/<name>.yaml has the published parameter count (on the meta
    device: no memory is allocated). Reference counts: Qwen2.5-VL-3B 3.75B, Qwen2-VL-7B 8.29B."""
    import torch

    from spava_plan.hydra_conf import compose_config
    from spava_plan.plan import ModelSpec
    from spava_plan.runtime.hf.model import random_model

    cfg = ModelSpec.from_config(compose_config([f"model={name}"]).model)
    model = random_model(cfg, dtype=torch.bfloat16, device="meta")
    n = sum(p.numel() for p in model.parameters()) / 1e9
    assert abs(n - billions) < 0.02, n


def test_model_mismatch_is_reported_and_replan_fixes_it(setup, tmp_path):
    from spava_plan.plan_load import load_plan
    from spava_plan.entry.session import replan

    other = replan(load_plan(setup / "plan.json"), {"model.num_layers": 3, "model.name": "tiny3"})
    other.save(tmp_path / "plan.json")
    rc, _, err = _single(setup, plan=tmp_path / "plan.json")
    assert rc == 2 and re.search(r"num_layers plan=3 model=2.*replan=true", _one_error_line(err)), err
    rc, out, err = _single(setup, plan=tmp_path / "plan.json", replan="true")
    assert rc == 0, err[-3000:]
    assert "re-planned for this input: model dims of the checkpoint" in out


def test_pass_all_run_answers_exactly_like_the_stock_model(setup, tmp_path):
    """The entry point really runs the language model through the plan's attention: with every
    token passed, its answer equals stock single-process ``generate`` (fp64, torch backend).
    (Stock attention on each rank's local rows alone, a past bug, answers differently.)"""
    import torch

    from spava_plan.runtime.hf import inputs as hf_inputs, model as hf_model

    inputs = mf.tiny_inputs(setup / "ckpt", setup / "v.mp4", 54, "qwen2_vl")
    mf.tiny_plan(inputs, "qwen2_vl", 2, 54, "112x168", "method.pass_all=true").save(tmp_path / "plan.json")
    rc, out, err = _single(setup, plan=tmp_path / "plan.json", dtype="fp64", backend="torch")
    assert rc == 0, err[-3000:]
    answer, n = _answer(out)

    tok = hf_inputs.load_processing(str(setup / "ckpt")).tokenizer
    eos = [i for i in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")} if i is not None and i >= 0]
    stock = hf_model.load_checkpoint(str(setup / "ckpt"), dtype=torch.float64, device="cpu")
    with torch.inference_mode():
        gen = stock.generate(input_ids=inputs.input_ids, mm_token_type_ids=inputs.mm_token_type_ids,
                             pixel_values_videos=inputs.pixel_values_videos, video_grid_thw=inputs.video_grid_thw,
                             max_new_tokens=5, do_sample=False, eos_token_id=eos, pad_token_id=0)
    new = gen[0, inputs.total_tokens:].tolist()
    assert (answer, n) == (tok.decode(new, skip_special_tokens=True).strip(), len(new))


# -- the Hydra app's options (no model needed) -------------------------------------------------------
@pytest.mark.parametrize("override, match", [
    ("max_new_tokens=1000000000", "max_new_tokens: must be >= 1 and at most 32768"),
    ("max_new_tokens=0", "max_new_tokens: must be >= 1"),
    ("timeout=nan", "timeout: must be a (finite )?number"),
    ("timeout=0", "timeout: must be a number of seconds > 0"),
    ("timeout=-1", "timeout: must be a number of seconds > 0"),
    ("timeout=inf", "timeout: must be a (finite )?number"),
    ("backend=cuda", "backend: must be one of auto, torch, triton"),
    ("max_new_tokens=abc", "max_new_tokens"),
    ("bogus=1", "unknown setting 'bogus'"),
])
def test_run_options_are_refused_in_one_line(override, match):
    from spava_plan.errors import ConfigError
    from spava_plan.entry.run_config import compose_entry_config

    with pytest.raises(ConfigError, match=match):
        compose_entry_config("run", ["model=tiny", override])


def test_run_options_compose_like_the_planner_config():
    from spava_plan.entry.run_config import compose_entry_config

    cfg = compose_entry_config("run", ["model=tiny", "gpus=2", "frames=8", "replan=yes", "video=/x/clip.mp4",
                                       "question=What?", "timeout=12.5"])
    assert cfg.replan is True and cfg.video.path == "/x/clip.mp4" and cfg.timeout == 12.5
    assert cfg.topology.gpus == 2 and cfg.video.frames == 8
    plan_cfg = cfg.plan_config()  # the planner's own config, validated by its schema
    assert plan_cfg.model.name == "tiny" and plan_cfg.topology.gpus == 2 and plan_cfg.dtype == "bf16"
    assert compose_entry_config("run", ["model=tiny", "video=default"]).video.path is None  # the group option


def test_cfg_and_help_print_the_config(tmp_path):
    import subprocess

    p = subprocess.run([sys.executable, *RUN, "--cfg", "job", "model=tiny", "video=/x/clip.mp4", "question=Why?"],
                       cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert re.search(r"^  path: /x/clip.mp4$", p.stdout, re.M) and "question: Why?" in p.stdout
    p = subprocess.run([sys.executable, *RUN, "--help"], cwd=str(tmp_path), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and "spava-run" in p.stdout and "model: " in p.stdout
    assert not (tmp_path / "outputs").exists()


def test_error_after_the_model_loads_is_a_line_of_its_own(setup):
    """The question does not fit: found after the model loaded. The error starts its own line."""
    rc, out, err = _single(setup, question=mf.QUESTION + " Please describe every object and every motion.")
    assert rc == 2
    line = _one_error_line(err)
    assert line.startswith("spava-run: error: ") and "video.max_question_tokens" in line, err
    assert err.splitlines()[0] == line  # the first line of stderr: no progress bar or log line before it


def test_a_rank_aborted_from_native_code_prints_its_python_stack():
    """spava-run / spava-serve turn faulthandler on: a rank killed by SIGABRT (as a gloo or NCCL
    abort kills it) prints where in Python it was, not just the C++ runtime's one line."""
    import os
    import subprocess

    code = ("from spava_plan.entry.launching import prepare_process\n"
            "def inside_a_collective():\n"
            "    import os, signal; os.kill(os.getpid(), signal.SIGABRT)\n"
            "prepare_process('auto')\n"
            "inside_a_collective()\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "Fatal Python error: Aborted" in p.stderr and "inside_a_collective" in p.stderr, p.stderr[-2000:]
