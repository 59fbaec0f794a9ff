"""`spava-run` (``python -m spava_plan.run``): answer a question about a video with Qwen2-VL /
Qwen2.5-VL / InternVL3 under a plan (a Hydra app).

    torchrun --nproc-per-node W -m spava_plan.run plan=PATH model.checkpoint=PATH video=PATH question="..."
    spava-run plan=PATH ...        # one process: W ranks emulated as threads
    spava-run model=tiny model.init=random gpus=2 video=clip.mp4 ...   # no plan=: plan for this input

The options are the config tree of `spava-plan` (conf/run.yaml: model, topology, video, method,
solver groups, gpus/frames shorthands) plus the run options of ``RunConfig`` (spava_plan/run_config.py):
plan, question, max_new_tokens, replan, backend, device, dtype, comm, timeout, seed, emulated_timing,
rank (single-rank mode: only rank R of the plan on this device, random data in place of what its
peers would send, runtime/solo.py; its time and peak memory are the real rank's, its answer is not);
``video=PATH`` stands for ``video.path=PATH``. ``--help``, ``--cfg job``, config files and overrides
work as for any Hydra app. A plan made for the input (``replan=true``, or no ``plan=``) is saved as
plan.json in the run's output directory (hydra.run.dir) and reported.

This is one of the entry modules (with spava_plan.cli and spava_plan.serve) that wire the stages
together: it may call the planner (re-planning) and codegen (kernels for the triton backend). User
errors print one line on every rank and exit with code 2; a failed peer never makes the others hang.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from . import progress
from .errors import InfeasiblePlanError, InputError, SpavaError

log = logging.getLogger("spava_plan.run")
PROG = "spava-run"


@dataclass
class Args:
    """The runtime's view of a run's options (built from a RunConfig by ``args_from_config``)."""

    plan: str | None
    checkpoint: str | None
    init: str
    video: str | None
    question: str | None
    max_new_tokens: int
    replan: bool
    backend: str
    device: str
    dtype: str
    comm: str
    timeout: float
    seed: int
    emulated_timing: bool = False
    rank: int | None = None  # single-rank mode (runtime/solo.py)
    plan_config: Any = None  # SpavaConfig to plan from when plan is None
    out_dir: str | None = None  # where a plan made for the input is saved


def args_from_config(cfg: Any, out_dir: str | None = None) -> Args:
    """RunConfig (validated) -> Args; a model id in the local Hugging Face cache becomes its folder."""
    from .run_config import resolve_checkpoint

    return Args(plan=cfg.plan, checkpoint=resolve_checkpoint(cfg.model.checkpoint), init=cfg.model.init,
                video=cfg.video.path, question=cfg.question, max_new_tokens=cfg.max_new_tokens, replan=cfg.replan,
                backend=cfg.backend, device=cfg.device, dtype=cfg.dtype, comm=cfg.comm, timeout=cfg.timeout,
                seed=cfg.seed, emulated_timing=cfg.emulated_timing, rank=cfg.rank,
                plan_config=None if cfg.plan else cfg.plan_config(), out_dir=out_dir)


def parse_args(argv: Sequence[str]) -> Args:
    """``key=value`` arguments (the command line's syntax) -> Args, through the Hydra config tree."""
    from .run_config import compose_entry_config

    return args_from_config(compose_entry_config("run", argv))


# -- set-up shared by both launch modes ----------------------------------------------------------
@dataclass
class Prepared:
    plan: Any
    plan_dir: Path
    model: Any
    processing: Any
    inputs: Any
    positions: Any
    device: Any
    eos: list[int]
    notes: list[str]
    input_s: float
    replanned: bool = False
    load_s: float = 0.0


def _device(args: Args, local_rank: int | None) -> Any:
    import torch

    if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InputError("device=cuda but no CUDA device is visible", setting="device")
    return torch.device("cuda", local_rank if local_rank is not None else torch.cuda.current_device())


def _dtype(args: Args, plan: Any) -> Any:
    from .runtime.hf_model import DTYPES

    return DTYPES[plan.dtype if args.dtype == "plan" else args.dtype]


def _random_frames(plan: Any, seed: int) -> Any:
    """Random-pixel frames at the plan's source resolution (the paper's benchmark input)."""
    import numpy as np

    h, w = plan.video.source_size
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(plan.video.frames, h, w, 3), dtype=np.uint8)


def prepare(args: Args, world_size: int, local_rank: int | None = None, solo_rank: int | None = None) -> Prepared:
    """Plan, model, inputs and the plan-vs-input check (identical on every rank; no communication)."""
    import time

    import torch

    from .runtime import hf_inputs, hf_model
    from .runtime.video_io import probe, read_frames
    from .runtime.vision_parallel import check_grids

    plan = initial_plan(args)
    plan.check_world(world_size)
    device = _device(args, local_rank)
    notes: list[str] = []
    t_load = time.perf_counter()
    model = load_model(args, plan, device, notes)
    load_s = time.perf_counter() - t_load
    replanned: list[str] = [] if args.plan else [f"planned for this input from the config ({plan.world_size} ranks)"]
    try:
        hf_model.check_model(plan, model)
    except SpavaError:
        if not args.replan:
            raise
        settings = hf_model.plan_model_settings(model)
        plan = replan(plan, settings)
        replanned.append(f"model dims of the checkpoint ({settings['model.family']})")
    # Processing + input.
    t0 = time.perf_counter()
    processing = (hf_inputs.load_processing(args.checkpoint, device=device) if args.checkpoint else
                  hf_inputs.default_processing(family=plan.model.family, tile_size=plan.video.tile_size, device=device))
    frames_n = plan.video.frames
    clip_fps = plan.video.fps  # random frames: the plan's rate
    if args.video:
        info = probe(args.video)
        if info.total_frames < frames_n and args.replan:
            frames_n = info.total_frames
            plan = replan(plan, {"video.frames": frames_n})
            replanned.append(f"frames={frames_n}")
        with progress.step(f"decoding {frames_n} frames of {args.video}"):
            frames, info = read_frames(args.video, frames_n)
        source = (info.height, info.width)
        if info.fps > 0:
            # Qwen2.5-VL's temporal positions follow the frames' real rate (as the processor's
            # sampled_fps), not the plan's video.fps: a 30 s and a 3 min clip differ.
            clip_fps = info.sampled_fps(frames_n)
            notes.append(f"video {info.width}x{info.height}, {info.total_frames} frames over {info.duration_s:.1f} s, "
                         f"{frames_n} sampled ({clip_fps:.3f} per second, the temporal positions' rate)")
    elif args.init == "random" and solo_rank is not None and processing.tokenizer is None:
        frames = None  # single-rank: pixels of this rank's grids only (no processor pass over the video)
        source = tuple(plan.layout.frame_size)
        notes.append(f"random pixels in rank {solo_rank}'s temporal grids only (single-rank, no video=)")
    elif args.init == "random":
        frames = _random_frames(plan, args.seed)
        source = frames.shape[1:3]
        notes.append("random-pixel frames at the plan's resolution (no video=)")
    else:
        raise InputError("is required: video=PATH to a video file", setting="video")
    if frames is None:
        from .runtime.solo import solo_inputs

        inputs = solo_inputs(plan, model.config, solo_rank, args.seed)
    else:
        inputs = _build_inputs(args, plan, processing, model, frames, clip_fps)
    positions = hf_inputs.global_position_ids(model, inputs)
    try:
        hf_inputs.check_against_plan(plan, inputs, positions)
    except SpavaError:
        if not args.replan:
            raise
        overrides = hf_inputs.observed_settings(inputs, plan, tuple(source), frames_n)
        before = {k: _setting(plan.config, k) for k in overrides}
        plan = replan(plan, overrides)
        hf_inputs.check_against_plan(plan, inputs, positions)
        replanned += [f"{k}={v}" for k, v in overrides.items() if before[k] != v]
    # A question shorter than the plan's capacity runs on the same plan: pad the query segment.
    inputs, positions = hf_inputs.pad_query(plan, inputs, positions)
    if inputs.pad_tokens:
        notes.append(f"question of {plan.video.max_question_tokens - inputs.pad_tokens} tokens on a plan for up to "
                     f"{plan.video.max_question_tokens} (video.max_question_tokens)")
    if replanned:
        notes.append("re-planned for this input: " + " ".join(replanned))
    check_grids(int(inputs.video_grid_thw[0, 0]), world_size, plan.video.temporal_patch)
    tok = processing.tokenizer
    eos = [] if tok is None else [i for i in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>"),
                                             tok.convert_tokens_to_ids("<|endoftext|>")}
                                  if isinstance(i, int) and i >= 0 and i != tok.unk_token_id]
    torch.manual_seed(args.seed)
    plan_dir = Path(args.plan).resolve().parent if args.plan else Path(args.out_dir or ".").resolve()
    return Prepared(plan, plan_dir, model, processing, inputs, positions, device, eos,
                    notes, time.perf_counter() - t0, bool(replanned), load_s)


def initial_plan(args: Args) -> Any:
    """plan= loaded, or (no plan=) planned from the run's config; re-planned for the input later."""
    from .plan_load import load_plan

    if args.plan:
        return load_plan(args.plan)
    from .planner.build import build_plan

    args.replan = True  # the config's frames / resolution / prompt sizes are a starting point only
    cfg = args.plan_config
    if cfg.video.path:  # frames at video.fps and the clip's size, from its metadata
        from .video_meta import plan_for_clip

        cfg = plan_for_clip(cfg)
    with progress.step("planning from the config"):
        return build_plan(cfg)


def load_model(args: Args, plan: Any, device: Any, notes: list[str]) -> Any:
    """The model of the run (checkpoint, or random weights), ready for the runtime."""
    from .runtime import hf_model, llm_fused, vision_attention, vision_fused

    dtype = _dtype(args, plan)
    with progress.step("loading the model"):
        if args.init == "checkpoint":
            model = hf_model.load_checkpoint(args.checkpoint, dtype=dtype, device=device)
        elif args.checkpoint:
            model = _random_from_checkpoint(args.checkpoint, dtype, device, args.seed)
            notes.append("random weights with the checkpoint's architecture (model.init=random)")
        else:
            model = hf_model.random_model(plan.config["model"], dtype=dtype, device=device, seed=args.seed)
            notes.append("random weights with the plan's model dims (model.init=random)")
    # The ViT's window attention as one SDPA call per window size, not transformers' per-window
    # loop (~270K tiny launches at 64 frames 1440p); same result (tests/test_benchmark_prefill.py).
    vision_attention.install(model)
    if device.type == "cuda":  # Triton kernels for the ViT's and the LLM's elementwise steps (the CPU keeps torch's)
        vision_fused.install(model)
        llm_fused.install(model)
    return model


def save_plan(prepared: "Prepared", args: Args) -> str | None:
    """A plan made for the input, saved as plan.json in the run's output directory (rank 0 only)."""
    if not prepared.replanned or not args.out_dir:
        return None
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "plan.json"
    prepared.plan.save(path)
    prepared.notes.append(f"the plan made for this input is saved at {path}")
    log.info("saved the plan made for this input: %s", path)
    return str(path)


def _random_from_checkpoint(checkpoint: str, dtype: Any, device: Any, seed: int) -> Any:
    import torch
    import transformers

    from .runtime.hf_model import FAMILIES, checkpoint_family

    family = checkpoint_family(checkpoint)
    try:
        config = transformers.AutoConfig.from_pretrained(checkpoint)
    except Exception as exc:  # noqa: BLE001 - a broken config.json
        raise InputError(f"cannot read the config of {checkpoint!r}: {str(exc).splitlines()[0]}",
                         setting="model.checkpoint") from None
    torch.manual_seed(seed)
    with torch.device(device):
        model = getattr(transformers, FAMILIES[family])._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def _build_inputs(args: Args, plan: Any, processing: Any, model: Any, frames: Any, fps: float | None = None) -> Any:
    """``fps``: the real rate of the sampled frames (Qwen2.5-VL's seconds per temporal grid); None:
    the plan's video.fps (random frames)."""
    from .runtime import hf_inputs

    v = plan.video
    common = dict(family=plan.model.family, min_pixels=v.min_pixels, max_pixels=v.max_pixels,
                  temporal_patch=v.temporal_patch, merge=v.spatial_merge, fps=v.fps if fps is None else fps,
                  tile_size=v.tile_size, tile_tokens=v.tile_tokens,  # InternVL3
                  cap_pixels_per_frame=v.cap_pixels_per_frame, max_video_tokens=v.max_video_tokens)  # frame-size rule
    if processing.tokenizer is None:
        return hf_inputs.synthetic_inputs(processing, frames, hf_config=model.config, system_tokens=v.system_tokens,
                                          question_tokens=v.max_question_tokens, seed=args.seed,
                                          frame_text_tokens=v.frame_text_tokens, **common)
    if args.question is None:
        raise InputError("is required: question=\"...\"", setting="question")
    return hf_inputs.build_inputs(processing, frames, args.question, video_token_id=int(model.config.video_token_id),
                                  **common)


def _setting(config: Mapping[str, Any], key: str) -> Any:
    node: Any = config
    for p in key.split("."):
        node = node[p]
    return node


def replan(plan: Any, settings: Mapping[str, Any]) -> Any:
    """The plan's configuration planned again with ``settings`` (dotted keys) for this input."""
    import copy

    from .config import to_config
    from .planner.build import build_plan

    data = copy.deepcopy(dict(plan.config))
    for key, value in settings.items():
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = value
    data["topology"]["gpus"] = plan.world_size
    data["gpus"], data["frames"] = plan.world_size, data["video"]["frames"]
    data["kernels"] = False
    return build_plan(to_config(data))


def make_backend(args: Args, prepared: Prepared) -> Any:
    """The kernel backend: triton (generated kernels, rendered on demand) on CUDA, torch otherwise."""
    from .runtime.backends.torch_ref import TorchBackend

    want = args.backend
    if want == "auto":
        want = "triton" if prepared.device.type == "cuda" else "torch"
        if want == "triton":
            try:
                import triton  # noqa: F401
            except ImportError:
                want = "torch"
    if want == "torch":
        return TorchBackend()
    if prepared.model.dtype == _torch().float64:
        raise InputError("the triton kernels take bf16/fp16/fp32; use dtype=fp32 or backend=torch", setting="dtype")
    if prepared.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise InputError("backend=triton needs a CUDA device (or TRITON_INTERPRET=1)", setting="backend")
    try:
        return _triton_backend(prepared)
    except SpavaError:
        raise
    except Exception as exc:  # noqa: BLE001 - triton missing or broken: one line naming the knob
        raise InputError(f"cannot set up the triton kernels: {type(exc).__name__}: {str(exc).splitlines()[0]}; "
                         f"use backend=torch", setting="backend") from None


def _torch() -> Any:
    import torch

    return torch


def _triton_backend(prepared: Prepared) -> Any:
    from .codegen.render import render_kernels
    from .runtime.backends.triton_gen import TritonBackend, user_kernel_dir

    plan = prepared.plan
    kernel_dir = prepared.plan_dir / "kernels"
    if prepared.replanned or not os.access(prepared.plan_dir, os.W_OK):  # never overwrite the plan's own kernels
        kernel_dir = user_kernel_dir(plan.hash)  # this user's, per plan: tuned once, reused on the next run
    return TritonBackend(kernel_dir, plan_hash=plan.hash, render=lambda d: render_kernels(plan, d))


# -- one rank's run ------------------------------------------------------------------------------
def _runner(args: Args, prepared: Prepared, comm: Any, backend: Any) -> Any:
    from .runtime.attention import RankAttention
    from .runtime.generate import RankRunner

    plan = prepared.plan
    return RankRunner(prepared.model, plan, comm,
                      lambda: RankAttention(plan, comm.rank, comm, backend, decode_capacity=args.max_new_tokens + 8),
                      prepared.device)


def execute(args: Args, prepared: Prepared, comm: Any, backend: Any, max_new_tokens: int | None = None) -> Any:
    import torch

    plan = prepared.plan
    runner = _runner(args, prepared, comm, backend)
    n = args.max_new_tokens if max_new_tokens is None else max_new_tokens
    try:
        with torch.inference_mode():
            result = runner.generate(prepared.inputs, prepared.positions, n, prepared.eos)
    except torch.OutOfMemoryError:
        raise InfeasiblePlanError(f"rank {comm.rank} ran out of device memory ({plan.layout.total_tokens} tokens on "
                                  f"{plan.world_size} ranks); plan more GPUs or fewer frames", setting="gpus") from None
    if max_new_tokens is None:
        every = comm.all_gather_object(result.tokens)
        if any(t != every[0] for t in every):
            raise SpavaError(f"rank {comm.rank}: ranks generated different tokens: {every}", setting="runtime")
    return result


def report(args: Args, prepared: Prepared, result: Any, label: str, backend: str) -> str:
    tok = prepared.processing.tokenizer
    lay = prepared.plan.layout
    if tok is not None:
        answer = tok.decode(result.tokens, skip_special_tokens=True).strip()
    else:
        answer = "token ids " + " ".join(map(str, result.tokens))
    t = result.timing
    lines = [f"answer: {answer}"]
    lines += [f"note: {n}" for n in prepared.notes]
    lines.append(f"plan: {prepared.plan.method}, {prepared.plan.world_size} ranks, {lay.total_tokens} tokens "
                 f"({lay.video_tokens} video, {lay.query_tokens} query), model {prepared.plan.model.name}, "
                 f"backend {backend}, {label}")
    lines.append(f"timing (rank 0): model load {prepared.load_s:.2f} s | input {prepared.input_s:.3f} s | vision {t.vision_s:.3f} s | prefill "
                 f"{t.prefill_s:.3f} s | first token {t.first_token_s:.3f} s | decode {t.decode_tokens_per_s:.1f} "
                 f"tokens/s ({t.decode_tokens} tokens, max_new_tokens={args.max_new_tokens})")
    return "\n".join(lines)


def _fail(exc: SpavaError, rank: int | None, prog: str = PROG) -> int:
    """One line on stderr (on a line of its own: open progress bars are closed first)."""
    progress.close_bars()
    where = "" if rank is None else f"[rank {rank}] "
    print(f"{prog}: {where}error: {exc}", file=sys.stderr, flush=True)
    return exc.exit_code


def _agree(comm: Any, error: SpavaError | None) -> None:
    """All ranks learn whether any failed during set-up, and all fail with the same first error."""
    seen = comm.all_gather_object(None if error is None else (type(error).__name__, str(error)))
    if error is not None:
        raise error
    bad = [(r, e) for r, e in enumerate(seen) if e is not None]
    if bad:
        r, (_, text) = bad[0]
        raise InputError(f"rank {r} failed: {text}", setting="runtime")


def run_distributed(args: Args) -> int:
    from .runtime.comm_dist import TorchDistComm

    if args.emulated_timing:
        rank = int(os.environ.get("RANK", "0"))
        return _fail(InputError("is for one process (comm=emulated); under torchrun the timing is measured",
                                setting="emulated_timing"), rank)
    rank = int(os.environ.get("RANK", "0"))
    try:
        comm = TorchDistComm.from_env(timeout_s=args.timeout)
    except SpavaError as exc:
        return _fail(exc, rank)
    try:
        error: SpavaError | None = None
        prepared, backend = None, None
        if comm.rank != 0:  # one progress bar per launch, not one per rank
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        try:
            prepared = prepare(args, comm.world_size, int(os.environ.get("LOCAL_RANK", rank)))
        except SpavaError as exc:
            error = exc
        _agree(comm, error)
        assert prepared is not None
        # Rank 0 first: it renders the plan's kernels (triton) that the other ranks then load, so no
        # two processes write the kernel directory at once.
        for turn in (True, False):
            error = None
            if (comm.rank == 0) == turn:
                try:
                    backend = make_backend(args, prepared)
                except SpavaError as exc:
                    error = exc
            _agree(comm, error)
        if comm.rank == 0:
            save_plan(prepared, args)
            with progress.step(f"vision, prefill and {args.max_new_tokens} new tokens on {comm.label}"):
                result = execute(args, prepared, comm, backend)
            print(report(args, prepared, result, comm.label, backend.name), flush=True)
        else:
            execute(args, prepared, comm, backend)
        comm.barrier()
        comm.close()
        return 0
    except SpavaError as exc:
        code = _fail(exc, comm.rank)
        # Every rank fails here, in no fixed order: tearing the group down would race with the
        # peers (rank 0 may already have taken the store away), and gloo's threads then abort the
        # process at exit instead of returning 2. The line is printed; leave without teardown.
        sys.stdout.flush()
        os._exit(code)
    except Exception as exc:
        comm.report_failure(exc)  # a bug on this rank: the peers fail now, naming it, not at the timeout
        raise


class _OneAtATime:
    """Triton's CPU interpreter keeps global state: emulated ranks (threads) take turns in it."""

    def __init__(self, backend: Any):
        import threading

        self._backend, self._lock, self.name = backend, threading.Lock(), backend.name

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._backend, attr)
        if not callable(value):
            return value

        def call(*a: Any, **k: Any) -> Any:
            with self._lock:
                return value(*a, **k)
        return call


def for_rank_threads(backend: Any, prepared: Prepared) -> Any:
    """The backend as emulated ranks (threads on one device) share it: one rank at a time inside
    Triton's CPU interpreter (global state); on a GPU, every attention launch of the plan tuned
    first, alone (threads sharing the GPU would time each other's kernels)."""
    if backend.name != "triton":
        return backend
    if os.environ.get("TRITON_INTERPRET") == "1":
        return _OneAtATime(backend)
    if prepared.device.type == "cuda" and backend.tuning:
        from .runtime.tune_launches import tune_plan_launches

        with progress.step("tuning the plan's attention launches (recorded in the kernel dir's autotune.json)"):
            tune_plan_launches(prepared.plan, backend, prepared.device)
    return backend


def run_emulated(args: Args) -> int:
    from .runtime.comm_emulated import EmulatedWorld

    try:
        world_size = _world_size(args)
        prepared = prepare(args, world_size)
        backend = for_rank_threads(make_backend(args, prepared), prepared)
        world = EmulatedWorld.for_plan(prepared.plan, timeout_s=args.timeout)
        save_plan(prepared, args)
        with progress.step(f"vision, prefill and {args.max_new_tokens} new tokens on {world_size} emulated ranks"):
            results = world.run(lambda rank: execute(args, prepared, world.comm(rank), backend))
        timing = None
        if args.emulated_timing:
            # Time to first token, each rank replayed alone (the same calls every time: one token).
            timing = world.time(lambda rank: execute(args, prepared, world.comm(rank), backend, max_new_tokens=1),
                                device=prepared.device)
    except SpavaError as exc:
        return _fail(exc, None)
    label = f"emulated {world_size}-rank (ranks share one device as threads: wall-clock, not a {world_size}-GPU time)"
    print(report(args, prepared, results[0], label, backend.name), flush=True)
    if timing is not None:
        ranks = ", ".join(f"{us / 1e3:.2f}" for us in timing.rank_compute_us)
        print(f"{timing.label}: time to first token {timing.makespan_us / 1e3:.2f} ms on the critical path "
              f"(each rank alone: {ranks} ms; exposed communication up to {max(timing.exposed_comm_us) / 1e3:.2f} ms, "
              f"charged from the plan's topology; median of {timing.repeats})", flush=True)
        from .trace import write_emulated_trace

        # beside plan= or, planned for this input, beside the plan saved in the output directory
        print(write_emulated_trace(args.plan or os.path.join(args.out_dir or ".", "plan.json"), timing), flush=True)
    return 0


def _world_size(args: Args) -> int:
    """The emulated world: the plan's ranks (or gpus= when planning from the config)."""
    if args.plan:
        from .plan_load import load_plan

        return load_plan(args.plan).world_size
    return int(args.plan_config.topology.gpus)


def launch_mode(comm: str) -> str:
    """dist under torchrun (or comm=dist), else emulated; InputError for impossible combinations."""
    under_torchrun = bool(os.environ.get("RANK", "").isdigit() and os.environ.get("WORLD_SIZE", "").isdigit())
    mode = comm if comm != "auto" else ("dist" if under_torchrun else "emulated")
    if mode == "dist" and not under_torchrun:
        raise InputError("comm=dist needs torchrun (RANK/WORLD_SIZE are not set)", setting="comm")
    if mode == "emulated" and under_torchrun and int(os.environ["WORLD_SIZE"]) > 1:
        raise InputError("comm=emulated runs in one process; do not launch it with torchrun", setting="comm")
    return mode


def torchrun_rank() -> int | None:
    rank = os.environ.get("RANK", "")
    return int(rank) if rank.isdigit() and os.environ.get("WORLD_SIZE", "").isdigit() else None


def prepare_process(comm_option: str) -> None:
    """Process-wide settings before torch loads."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a model id is looked up in the local cache, never fetched
    # Expandable segments keep the caching allocator within ~5% of what it hands out (12-18% more
    # with the default at a 170K-token rank): planner/memory.py's ALLOCATOR_SLACK assumes it.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    # A rank killed by a signal from native code (NCCL/gloo abort, segfault) prints every thread's
    # Python stack to stderr: under torchrun that is often the only clue which call it was in.
    import faulthandler

    if not faulthandler.is_enabled():
        try:
            faulthandler.enable()
        except (AttributeError, ValueError, OSError):  # stderr without a file descriptor: no stacks
            pass
    try:
        mode = launch_mode(comm_option)
    except SpavaError:
        return
    if mode == "emulated":
        # Emulated ranks are threads, each with its own OpenMP pool; idle pools must not spin while
        # another rank computes (on a CPU that slows every rank many times over).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def remove_if_empty(out_dir: str | None) -> None:
    """Hydra creates the run directory up front; leave none behind when nothing was saved in it."""
    from .hydra_conf import remove_empty_dirs

    remove_empty_dirs(out_dir)


def _run(cfg: Any, out_dir: str, rank: int | None) -> int:
    """spava-run's task: validate the options, then run (torchrun: one rank; else W emulated ranks)."""
    # Only rank 0 saves into the output directory (the other ranks' directories stay empty).
    args = args_from_config(cfg, out_dir if not rank else None)
    mode = launch_mode(args.comm)
    if args.rank is not None:
        return run_single_rank(args)
    return run_distributed(args) if mode == "dist" else run_emulated(args)


def hydra_main(config_name: str, body: Callable[[Any, str, "int | None"], int], prog: str,
               argv: Sequence[str] | None = None) -> int:
    """Run ``body(cfg, out_dir, rank)`` as the Hydra task over conf/<config_name>.yaml with this
    process's arguments (cfg: the typed entry config; out_dir: Hydra's job directory, removed again
    when nothing was saved in it). Hydra / OmegaConf / SpavaError failures become one line and exit
    code 2 (on every rank); otherwise the body's exit code."""
    import hydra
    from omegaconf.errors import OmegaConfBaseException

    from .hydra_conf import CONFIG_MODULE, check_config_dirs, hydra_error
    from .run_config import argv_shorthands, register_schemas, to_entry_config

    args = list(sys.argv[1:] if argv is None else argv)
    rank = torchrun_rank()
    code = [0]  # Hydra's task returns nothing to its caller: the body's exit code comes back here

    def task(hydra_cfg: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        out_dir = str(HydraConfig.get().runtime.output_dir)
        try:
            progress.quiet_library_bars()
            code[0] = body(to_entry_config(hydra_cfg, config_name), out_dir, rank)
        except SpavaError as exc:
            code[0] = _fail(exc, rank, prog)
        finally:
            remove_if_empty(out_dir)

    comm = next((a.split("=", 1)[1] for a in args if a.startswith("comm=")), "auto")
    prepare_process(comm)
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra's exceptions reach this function, not a stack trace
    register_schemas()
    try:
        check_config_dirs(args)  # a user's --config-dir YAML before Hydra reads it (alias bombs, FIFOs)
        sys.argv = [sys.argv[0], *argv_shorthands(args)]
        app = hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name=config_name, version_base="1.3")(task)
        app()
    except SpavaError as exc:
        return _fail(exc, rank, prog)
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (OmegaConfBaseException, Exception) as exc:
        from hydra.errors import HydraException

        if not isinstance(exc, (HydraException, OmegaConfBaseException)):
            raise  # a bug, not a user error: keep the traceback
        return _fail(hydra_error(exc), rank, prog)
    return code[0]


def run_single_rank(args: Args) -> int:
    """``rank=R``: rank R of the plan alone on this device (runtime/solo.py), labelled single-rank."""
    from .plan_load import load_plan
    from .runtime.solo import SoloComm

    try:
        if not args.plan:
            raise InputError("is required with rank=R: the plan whose rank runs alone", setting="plan")
        world_size = load_plan(args.plan).world_size
        if args.rank >= world_size:
            raise InputError(f"the plan has ranks 0..{world_size - 1}, got {args.rank}", setting="rank")
        if args.emulated_timing:
            raise InputError("is for the emulated W-rank run; rank=R times the one rank itself",
                             setting="emulated_timing")
        prepared = prepare(args, world_size, solo_rank=args.rank)
        backend = make_backend(args, prepared)
        comm = SoloComm(args.rank, world_size)
        if prepared.device.type == "cuda":
            _torch().cuda.reset_peak_memory_stats(prepared.device)
        result = execute(args, prepared, comm, backend)
    except SpavaError as exc:
        return _fail(exc, args.rank)
    text = report(args, prepared, result, comm.label, backend.name)
    text = text.replace("answer:", "answer (single-rank, random peers: meaningless):", 1)
    print(text.replace("timing (rank 0)", f"timing (rank {args.rank}, single-rank)"), flush=True)
    if prepared.device.type == "cuda":
        peak = _torch().cuda.max_memory_allocated(prepared.device)
        predicted = prepared.plan.prediction.peak_memory_bytes[args.rank]
        print(f"memory (rank {args.rank}, single-rank): peak {peak / 2**30:.2f} GiB allocated "
              f"(torch.cuda.max_memory_allocated); the plan predicts {predicted / 2**30:.2f} GiB", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console script `spava-run`."""
    return hydra_main("run", _run, PROG, argv)


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console_main()
