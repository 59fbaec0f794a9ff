"""A Session: one rank's plan, model, processing and kernel backends, and generation under them.

    session = Session(cfg, world_size, local_rank)        # every rank: plan (or plan= loaded), model
    prepared = session.prepare_run()                      # spava-run: the config's video and question
    prepared = session.prepare(video_path, question)      # spava-serve: one request (a plan of the family)
    backend = session.backend(prepared, rank_threads=...) # kernels rendered / tuned once per plan
    result = session.generate(prepared, comm, backend, sampling, on_token)   # every rank, same order

`spava-run` (spava_plan/entry/run.py), `spava-serve` (spava_plan/server/serve.py) and benchmarks/prefill.py are
thin layers over it: the end-of-text tokens, the rank runner, the out-of-memory handling, the
device / dtype choice, the model build and the re-planning live here once.

Preparing is deterministic: every rank of a torchrun world prepares the same input to the same plan
and inputs, so only the request (path, question, sampling) travels between ranks. A plan made for
an input is planned from the plan's own typed config (``Plan.source_config``), never from dict edits.

Sampling (temperature / top_p / seed) runs on the one rank that holds the last prompt token and the
token is broadcast (runtime/generate.py), so every rank continues identically.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from . import process_env  # noqa: F401, I001 - first: the environment torch's OpenMP reads as it loads

import numpy as np  # noqa: E402
import torch  # noqa: E402

from . import progress  # noqa: E402
from .backends import for_rank_threads, kernel_backend
from ..config import SpavaConfig
from ..errors import InfeasiblePlanError, InputError, PlanMismatchError, SpavaError
from ..plan import Plan
from ..plan_load import load_plan
from .plan_store import PlanStore
from ..planner.build import build_plan
from ..planner.fit import fit_config
from ..planner.layout import token_layout
from .run_config import RunConfig, ServeConfig, resolve_checkpoint
from ..runtime.hf import inputs as hf_inputs, model as hf_model
from ..runtime import llm_fused
from ..runtime.vision import attention as vision_attention, fused as vision_fused
from ..runtime.attention import RankAttention
from ..runtime.generate import GenerationResult, RankRunner
from ..runtime.hf.inputs import ModelInputs, Processing
from ..runtime.solo import solo_inputs
from ..runtime.tensor_parallel import TPRankRunner
from ..runtime.video_io import probe, read_frames
from ..runtime.vision.parallel import check_grids
from ..video_meta import frames_for_rate, plan_for_clip
from ..vision_exchange import plan_encoders, plan_vision_exchange

OnToken = Callable[[list[int]], bool]


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None

    def sampler(self, device: Any) -> Callable[[Any], int] | None:
        """logits -> token, or None for greedy. A fresh generator per request: a seed reproduces."""
        if self.temperature <= 0:
            return None
        gen = torch.Generator(device="cpu")
        if self.seed is not None:
            gen.manual_seed(int(self.seed))
        else:
            gen.seed()
        temperature, top_p = float(self.temperature), float(self.top_p)

        def sample(logits: Any) -> int:
            probs = torch.softmax(logits.detach().double().cpu() / temperature, dim=-1)
            if top_p < 1.0:  # nucleus: the smallest set of tokens whose probability reaches top_p
                order = torch.argsort(probs, descending=True)
                sorted_p = probs[order]
                keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p
                keep[0] = True
                mask = torch.zeros_like(probs, dtype=torch.bool)
                mask[order[keep]] = True
                probs = torch.where(mask, probs, torch.zeros_like(probs))
            return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))

        return sample


@dataclass
class Prepared:
    """One input ready to run: its plan, the model inputs for it, and what was noted on the way."""

    plan: Plan
    plan_dir: Path  # the kernels' home (beside plan=, the output directory, or the plan store)
    model: Any
    processing: Processing
    inputs: ModelInputs
    positions: torch.Tensor
    device: torch.device
    eos: list[int]
    notes: list[str] = field(default_factory=list)
    input_s: float = 0.0
    replanned: bool = False  # the plan was made for this input (not plan= as given)
    load_s: float = 0.0
    decode_s: float = 0.0  # of input_s: the video's decode (the rest: the processor, tokenizing, the plan)


# -- the pieces ------------------------------------------------------------------------------------
def select_device(option: str, local_rank: int | None) -> torch.device:
    """device=auto|cpu|cuda -> the torch device of this rank."""
    if option == "cpu" or (option == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InputError("device=cuda but no CUDA device is visible", setting="device")
    return torch.device("cuda", local_rank if local_rank is not None else torch.cuda.current_device())


def torch_dtype(option: str, plan: Plan) -> torch.dtype:
    """dtype=plan|bf16|... -> the model's torch dtype."""
    return hf_model.DTYPES[plan.dtype if option == "plan" else option]


def eos_tokens(tokenizer: Any) -> list[int]:
    """The ids that end an answer: the tokenizer's end of text and the chat template's <|im_end|>."""
    if tokenizer is None:
        return []
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"),
           tokenizer.convert_tokens_to_ids("<|endoftext|>")}
    return [i for i in ids if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id]


def random_frames(plan: Plan, seed: int) -> np.ndarray:
    """Random-pixel frames at the plan's source resolution (the paper's benchmark input)."""
    h, w = plan.video.source_size
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(plan.video.frames, h, w, 3), dtype=np.uint8)


def build_inputs(plan: Plan, processing: Processing, model: Any, frames: np.ndarray, *, question: str | None,
                 seed: int, fps: float | None = None, own: tuple[int, int] | None = None) -> ModelInputs:
    """The model inputs of ``frames`` and ``question`` under the plan's processor settings.
    ``fps``: the real rate of the sampled frames (Qwen2.5-VL's seconds per temporal grid); None: the
    plan's video.fps (random frames). Without a tokenizer (random weights): synthetic prompt ids.
    ``own``: this rank's frames (Session._own_frames), the only ones the processor needs to see
    (hf_inputs.video_pixels' only_frames; every frame with the per-frame pixel cap, whose size
    follows the frame count)."""
    v = plan.video
    only = None if own is None or v.cap_pixels_per_frame else own
    common = dict(family=plan.model.family, min_pixels=v.min_pixels, max_pixels=v.max_pixels,
                  temporal_patch=v.temporal_patch, merge=v.spatial_merge, fps=v.fps if fps is None else fps,
                  tile_size=v.tile_size, tile_tokens=v.tile_tokens,  # InternVL3
                  cap_pixels_per_frame=v.cap_pixels_per_frame, max_video_tokens=v.max_video_tokens,  # frame-size rule
                  only_frames=only)
    if processing.tokenizer is None:
        return hf_inputs.synthetic_inputs(processing, frames, hf_config=model.config, system_tokens=v.system_tokens,
                                          question_tokens=v.max_question_tokens, seed=seed,
                                          frame_text_tokens=v.frame_text_tokens, **common)
    if question is None:
        raise InputError("is required: question=\"...\"", setting="question")
    return hf_inputs.build_inputs(processing, frames, question, video_token_id=int(model.config.video_token_id),
                                  **common)


def with_settings(cfg: Any, settings: Mapping[str, Any]) -> Any:
    """A config dataclass with dotted-key settings replaced (``{"video.frames": 8}``), each group
    rebuilt through ``dataclasses.replace`` so its validation runs again."""
    nested: dict[str, Any] = {}
    for key, value in settings.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            nested[head] = value
    changes = {k: with_settings(getattr(cfg, k), v) if isinstance(v, dict) else v for k, v in nested.items()}
    return dataclasses.replace(cfg, **changes)


def replan(plan: Plan, settings: Mapping[str, Any]) -> Plan:
    """The plan's own config planned again with ``settings`` (dotted keys) for this input, on the
    plan's world size, kernels rendered on demand."""
    cfg: SpavaConfig = with_settings(plan.source_config(), settings)
    cfg = dataclasses.replace(cfg, topology=dataclasses.replace(cfg.topology, gpus=plan.world_size), kernels=False)
    return build_plan(cfg)


def _check_clip_size(plan: Plan, height: int, width: int) -> None:
    """Refuse a clip whose frames the processor would resize to another size than the plan's, from
    its metadata alone: by the planner's own rule (the plan's config at the clip's resolution), so
    an 8K clip for a small plan is refused at once instead of after decoding and processing it."""
    cfg = with_settings(plan.source_config(), {"video.resolution": f"{height}x{width}"})
    got, want = tuple(token_layout(cfg.model, cfg.video).frame_size), tuple(plan.layout.frame_size)
    if got != want:
        raise PlanMismatchError(
            f"the video's {height}x{width} frames resize to {got[0]}x{got[1]} but the plan's are {want[0]}x{want[1]}; "
            f"re-plan with video.resolution={height}x{width} {hf_inputs.REPLAN_HINT}", setting="video.resolution")


def plan_from_config(cfg: SpavaConfig, *, same_world: bool = False, notes: list[str] | None = None) -> Plan:
    """A plan from the planner's config: for video.path, the frames the processor samples at
    video.fps and the clip's size, as `spava-plan video.path=` plans them (one sampling rule). An
    input too short for the configured method gets the fastest config that holds it (planner/fit.py,
    as `spava-plan` and the plan store choose it); ``same_world`` keeps the rank count (a launched
    torchrun world), and what was chosen is added to ``notes``."""
    if cfg.video.path:
        cfg = plan_for_clip(cfg)
    cfg, fitted = fit_config(cfg, same_world=same_world)
    if notes is not None:
        notes.extend(fitted)
    with progress.step("planning from the config"):
        return build_plan(cfg)


def load_model(cfg: RunConfig, checkpoint: str | None, plan: Plan, device: torch.device, notes: list[str]) -> Any:
    """The model of the run (checkpoint, or random weights), ready for the runtime."""
    dtype = torch_dtype(cfg.dtype, plan)
    with progress.step("loading the model"):
        if cfg.model.init == "checkpoint":
            model = hf_model.load_checkpoint(checkpoint, dtype=dtype, device=device)
        elif checkpoint:
            model = hf_model.random_from_checkpoint(checkpoint, dtype=dtype, device=device, seed=cfg.seed)
            notes.append("random weights with the checkpoint's architecture (model.init=random)")
        else:
            # dense_tp: only the model's structure (meta); each rank builds its own random shard on its
            # device (runtime/tensor_parallel.py), so the full model is never allocated
            tp = plan.method == "dense_tp"
            model = hf_model.random_model(plan.model, dtype=dtype, device="meta" if tp else device, seed=cfg.seed)
            notes.append("random weights with the plan's model dims (model.init=random)"
                         + ("; each rank's shard built on its own" if tp else ""))
    # The ViT's window attention as one SDPA call per window size, not transformers' per-window
    # loop (~270K tiny launches at 64 frames 1440p); same result (tests/test_benchmark_prefill.py).
    vision_attention.install(model)
    if device.type == "cuda":  # Triton kernels for the ViT's and the LLM's elementwise steps (the CPU keeps torch's)
        vision_fused.install(model)
        llm_fused.install(model)
    return model


def rank_runner(prepared: Prepared, comm: Any, backend: Any, max_tokens: int) -> RankRunner:
    """This rank's runner of the model under the plan's attention (KV cache room for ``max_tokens``
    new tokens and a margin)."""
    plan = prepared.plan
    if plan.method == "dense_tp":  # the rank's shard of the model, stock attention math (runtime/tensor_parallel.py)
        return TPRankRunner(prepared.model, plan, comm, prepared.device, decode_capacity=max_tokens + 8)
    return RankRunner(prepared.model, plan, comm,
                      lambda: RankAttention(plan, comm.rank, comm, backend, decode_capacity=max_tokens + 8),
                      prepared.device)


def generate(prepared: Prepared, comm: Any, backend: Any, sampling: Sampling,
             on_token: OnToken | None = None) -> GenerationResult:
    """One rank's vision, prefill and decode of a prepared input (every rank calls it, in the same
    order); running out of device memory is an InfeasiblePlanError naming gpus."""
    plan = prepared.plan
    runner = rank_runner(prepared, comm, backend, sampling.max_tokens)
    try:
        with torch.inference_mode():
            return runner.generate(prepared.inputs, prepared.positions, sampling.max_tokens, prepared.eos,
                                   sampler=sampling.sampler(prepared.device), on_token=on_token)
    except torch.OutOfMemoryError:
        raise InfeasiblePlanError(f"rank {comm.rank} ran out of device memory ({plan.layout.total_tokens} tokens "
                                  f"on {plan.world_size} ranks); plan more GPUs or fewer frames", setting="gpus") from None


def _short_clip(path: str, total: int, wanted: int) -> InputError:
    return InputError(f"{path!r} has {total} frames but the plan samples {wanted}; use a longer video or re-plan "
                      f"with frames<={total} {hf_inputs.REPLAN_HINT}", setting="video")


# -- the session -----------------------------------------------------------------------------------
class Session:
    """One rank's plan(s), model, processing and kernel backends; one input at a time.

    ``cfg``: a RunConfig (spava-run) or ServeConfig (spava-serve: requests pick a plan of the family
    in ``plan_dir``). The plan is plan= or, without it, planned from the config; a checkpoint whose
    dims differ from it is re-planned for (replan=true, no plan=, or a server), else refused."""

    def __init__(self, cfg: RunConfig, world_size: int, local_rank: int | None = None, *,
                 out_dir: str | None = None, rank: int | None = None):
        self.cfg = cfg
        self.world_size = world_size
        self.out_dir = out_dir
        self.checkpoint = resolve_checkpoint(cfg.model.checkpoint)
        self.serving = isinstance(cfg, ServeConfig)
        # No plan=: the config's frames / resolution / prompt sizes are a starting point only.
        self.may_replan = cfg.replan or not cfg.plan or self.serving
        self.fixed: Plan | None = load_plan(cfg.plan) if cfg.plan else None
        fit_notes: list[str] = []
        base = self.fixed if self.fixed is not None else plan_from_config(
            cfg.plan_config(), same_world=local_rank is not None, notes=fit_notes)
        if fit_notes and local_rank is None:  # emulated ranks follow the plan chosen for a short input
            self.world_size = world_size = base.world_size
        base.check_world(world_size)
        self.local_rank = local_rank
        self.rank = rank  # the global rank under torchrun (None: emulated ranks in this one process)
        self.last_decode_s = 0.0  # the latest _request_inputs' video decode (Prepared.decode_s)
        self.device = select_device(cfg.device, local_rank)
        self.notes: list[str] = list(fit_notes)
        self.replanned: list[str] = [] if cfg.plan else [f"planned for this input from the config "
                                                         f"({base.world_size} ranks)"]
        t0 = time.perf_counter()
        self.model = load_model(cfg, self.checkpoint, base, self.device, self.notes)
        self.load_s = time.perf_counter() - t0
        try:
            hf_model.check_model(base, self.model)
        except SpavaError:  # the checkpoint's dims win over the config's (or plan='s)
            if not self.may_replan:
                raise
            settings = hf_model.plan_model_settings(self.model)
            base = replan(base, settings)
            self.fixed = None
            self.replanned.append(f"model dims of the checkpoint ({settings['model.family']})")
        self.base = base
        self.processing = (hf_inputs.load_processing(self.checkpoint, device=self.device) if self.checkpoint else
                           hf_inputs.default_processing(family=base.model.family, tile_size=base.video.tile_size,
                                                        device=self.device))
        self.eos = eos_tokens(self.processing.tokenizer)
        self.backends: dict[tuple, Any] = {}
        self._store: PlanStore | None = None

    # -- spava-run: the config's own input ---------------------------------------------------------
    def prepare_run(self, solo_rank: int | None = None) -> Prepared:
        """The config's video (or random pixels) and question under the plan, re-planned for them
        when allowed; ``solo_rank``: single-rank mode (only that rank's grids are built)."""
        cfg, plan = self.cfg, self.base
        notes, replanned = list(self.notes), list(self.replanned)
        t0 = time.perf_counter()
        frames_n, clip_fps, video = plan.video.frames, plan.video.fps, cfg.video.path
        tokenizer = self.processing.tokenizer
        own = None  # this rank's sampled frames when it decodes only those (_own_frames)
        if video:
            info = probe(video)
            if not self.may_replan:  # from the container's metadata, before a frame is decoded
                _check_clip_size(plan, info.height, info.width)
            if info.total_frames < frames_n:
                if not self.may_replan:
                    raise _short_clip(video, info.total_frames, frames_n)
                frames_n = self._frames_for_clip(plan, info.total_frames, info.fps)
                plan = replan(plan, {"video.frames": frames_n})
                replanned.append(f"frames={frames_n}")
            own = self._own_frames(plan, frames_n)
            with progress.step(f"decoding {frames_n} frames of {video}" if own is None else
                               f"decoding this rank's frames {own[0]}..{own[1] - 1} of {frames_n} of {video}"):
                frames, info = read_frames(video, frames_n, only=own)
            source = (info.height, info.width)
            if info.fps > 0:
                # Qwen2.5-VL's temporal positions follow the frames' real rate (as the processor's
                # sampled_fps), not the plan's video.fps: a 30 s and a 3 min clip differ.
                clip_fps = info.sampled_fps(frames_n)
                notes.append(f"video {info.width}x{info.height}, {info.total_frames} frames over {info.duration_s:.1f} s, "
                             f"{frames_n} sampled ({clip_fps:.3f} per second, the temporal positions' rate)")
        elif cfg.model.init == "random" and solo_rank is not None and tokenizer is None:
            frames = None  # single-rank: pixels of this rank's grids only (no processor pass over the video)
            source = tuple(plan.layout.frame_size)
            grids = "every temporal grid (dense_tp: each rank encodes all)" if plan.method == "dense_tp" else \
                f"rank {solo_rank}'s temporal grids only"
            notes.append(f"random pixels in {grids} (single-rank, no video=)")
        elif cfg.model.init == "random":
            frames = random_frames(plan, cfg.seed)
            source = frames.shape[1:3]
            notes.append("random-pixel frames at the plan's resolution (no video=)")
        else:
            raise InputError("is required: video=PATH to a video file", setting="video")
        if tokenizer is None and cfg.question is not None:
            notes.append(f"the question is not read: random weights without a tokenizer take "
                         f"{plan.video.max_question_tokens} synthetic prompt ids in its place "
                         f"(give model.checkpoint= for the checkpoint's tokenizer)")
        if frames is None:
            inputs = solo_inputs(plan, self.model.config, solo_rank, cfg.seed)
        else:
            inputs = build_inputs(plan, self.processing, self.model, frames, question=cfg.question, seed=cfg.seed,
                                  fps=clip_fps, own=own)
        positions = hf_inputs.global_position_ids(self.model, inputs)
        try:
            hf_inputs.check_against_plan(plan, inputs, positions)
        except SpavaError:
            if not self.may_replan:
                raise
            overrides = hf_inputs.observed_settings(inputs, plan, tuple(source), frames_n)
            before = plan.source_config()
            plan = replan(plan, overrides)
            hf_inputs.check_against_plan(plan, inputs, positions)
            replanned += [f"{k}={v}" for k, v in overrides.items() if _setting(before, k) != v]
        # A question shorter than the plan's capacity runs on the same plan: pad the query segment.
        inputs, positions = hf_inputs.pad_query(plan, inputs, positions)
        if inputs.pad_tokens:
            notes.append(f"question of {plan.video.max_question_tokens - inputs.pad_tokens} tokens on a plan for up "
                         f"to {plan.video.max_question_tokens} (video.max_question_tokens)")
        if replanned:
            notes.append("re-planned for this input: " + " ".join(replanned))
        if own is not None and self._own_frames(plan, frames_n) != own:
            raise SpavaError(f"rank {self.rank}: the plan made for this input splits the frames otherwise than the "
                             f"one they were decoded for; use video_decode=all", setting="video_decode")
        # every encoding rank needs a temporal grid of its own (dense_tp: one, each rank encodes them all)
        encoders = plan_encoders(self.world_size, plan.vision_parallel, plan.method)
        check_grids(int(inputs.video_grid_thw[0, 0]), encoders, plan.video.temporal_patch)
        torch.manual_seed(cfg.seed)
        plan_dir = Path(cfg.plan).resolve().parent if cfg.plan else Path(self.out_dir or ".").resolve()
        return Prepared(plan, plan_dir, self.model, self.processing, inputs, positions, self.device, self.eos,
                        notes, time.perf_counter() - t0, bool(replanned), self.load_s)

    def _own_frames(self, plan: Plan, frames_n: int) -> tuple[int, int] | None:
        """The sampled frames [first, last) of this rank's temporal grids, when this rank decodes only
        those (under torchrun, video_decode=own, several ranks): its vision encodes only its grids'
        pixel rows (runtime/vision/parallel.py), so the other frames are never read. None: every frame."""
        if (self.rank is None or self.cfg.video_decode != "own" or plan.world_size <= 1
                or plan.model.family == "internvl3"  # InternVL3's frames are tiles with text between: not tried
                or plan.method == "dense_tp"  # every rank encodes every grid with its shard of the tower
                or plan.vision_parallel == "one_gpu"):  # rank 0 encodes all; the others' empty share: not tried
            return None
        grids = int(plan.layout.grid_thw[0])
        if grids <= 0 or frames_n % grids:
            return None
        per = frames_n // grids
        first, last = plan_vision_exchange(plan).grids[self.rank]
        return first * per, last * per

    @staticmethod
    def _frames_for_clip(plan: Plan, total: int, clip_fps: float) -> int:
        """A clip shorter than the plan: the frames the processor samples from it at the plan's
        video.fps, the rule `spava-plan video.path=` plans with (video_meta.frames_for_rate)."""
        video = plan.source_config().video
        tp = 1 if plan.model.family == "internvl3" else plan.video.temporal_patch
        if clip_fps <= 0:  # no rate to sample by: every frame, whole temporal patches
            return total // tp * tp
        return frames_for_rate(total, clip_fps, video.fps, min_frames=video.min_frames, max_frames=video.max_frames,
                               temporal_patch=tp)

    def save_plan(self, prepared: Prepared) -> str | None:
        """A plan made for the input, saved as plan.json in the run's output directory."""
        if not prepared.replanned or not self.out_dir:
            return None
        out = Path(self.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "plan.json"
        prepared.plan.save(path)  # atomic: a temporary file renamed into place
        prepared.notes.append(f"the plan made for this input is saved at {path}")
        return str(path)

    # -- spava-serve: one request ------------------------------------------------------------------
    @property
    def store(self) -> PlanStore:
        """The plan family in the server's plan_dir (plans made on the fly are added to it)."""
        if self._store is None:
            if not isinstance(self.cfg, ServeConfig):
                raise InputError("is a server setting: spava-run runs the one plan", setting="plan_dir")
            base = dataclasses.replace(self.base.source_config(), kernels=False)
            # A torchrun world (local_rank given) runs a plan on all its ranks, so its store plans on
            # them only; emulated ranks follow each plan's own rank count (a short clip: fewer ranks).
            self._store = PlanStore(self.cfg.plan_dir, base, plan_on_the_fly=self.cfg.plan_on_the_fly,
                                    max_cached_plans=self.cfg.max_cached_plans,
                                    max_plan_tokens=self.cfg.max_plan_tokens,
                                    same_world=self.local_rank is not None)
        return self._store

    @property
    def max_question(self) -> int:
        return int(self.cfg.video.max_question_tokens if self.fixed is None else self.fixed.video.max_question_tokens)

    def question_tokens(self, question: str) -> int:
        """Tokens of the question as the prompt holds it."""
        tok = self.processing.tokenizer
        if tok is None:  # random weights without a tokenizer: a synthetic question of the plan's capacity
            return int(self.base.video.max_question_tokens)
        ids = tok(hf_inputs.prompt_text(self.processing, question))["input_ids"]
        video = ids.index(tok.convert_tokens_to_ids(hf_inputs.VIDEO_PAD))
        return len(ids) - (video + 2) - hf_inputs.suffix_tokens(self.base)  # after <|video_pad|><|vision_end|>

    def _request_inputs(self, video: str, question: str, plan: Plan, frames_n: int,
                        size: tuple[int, int] | None, stop: Callable[[], bool] | None = None) -> ModelInputs:
        """The request's model inputs for ``plan``: ``frames_n`` frames spread evenly over the clip
        (repeated when the plan samples more than the clip has), scaled to ``size``; ``stop`` is
        asked between decoded frames (video_io.DecodeCancelled when it says True)."""
        total = probe(video).total_frames
        t0 = time.perf_counter()
        own = self._own_frames(plan, frames_n) if total >= frames_n else None
        with progress.step(f"decoding {frames_n} frames of {video}"):
            if total >= frames_n:
                frames, info = read_frames(video, frames_n, size, stop=stop, only=own)
            else:  # every frame, each repeated as the uniform indices repeat it
                every, info = read_frames(video, total, size, stop=stop)
                frames = every[[int(i * info.total_frames / frames_n) for i in range(frames_n)]]
        # Qwen2.5-VL's temporal positions follow the sampled frames' real rate (as prepare_run does).
        fps = info.sampled_fps(frames_n) if info.fps > 0 else plan.video.fps
        self.last_decode_s = time.perf_counter() - t0
        return build_inputs(plan, self.processing, self.model, frames, question=question, seed=self.cfg.seed, fps=fps,
                            own=own)

    def prepare(self, video_path: str, question: str, stop: Callable[[], bool] | None = None) -> Prepared:
        """Decode the video, build the prompt, pick the plan (a SpavaError here is a bad request).
        ``stop``: the request's cancellation check, asked between decoded frames: True ends the
        decode with video_io.DecodeCancelled (a client gone or past request_timeout)."""
        t0 = time.perf_counter()
        q = self.question_tokens(question)
        if q > self.max_question:
            raise InputError(f"the question takes {q} tokens but this server's plans hold up to {self.max_question}; "
                             f"ask a shorter question or start the server with video.max_question_tokens={q}",
                             setting="video.max_question_tokens")
        plan = inputs = positions = None
        if self.fixed is not None:  # plan= first, when the clip fits it
            lay = self.fixed.layout
            try:
                inputs = self._request_inputs(video_path, question, self.fixed, lay.frames, tuple(lay.frame_size), stop)
                positions = hf_inputs.global_position_ids(self.model, inputs)
                hf_inputs.check_against_plan(self.fixed, inputs, positions)
                plan = self.fixed
            except InputError:
                raise  # an unreadable video: no other plan helps
            except SpavaError:
                plan = None
        if plan is None:
            stored = self.store.choose_for_clip(video_path, max(1, q))
            plan = stored.plan
            inputs = self._request_inputs(video_path, question, plan, stored.frames, tuple(stored.frame_size), stop)
            positions = hf_inputs.global_position_ids(self.model, inputs)
            hf_inputs.check_against_plan(plan, inputs, positions)
        inputs, positions = hf_inputs.pad_query(plan, inputs, positions)
        # the plan's own ranks: a short clip's plan may run on fewer than the server's (emulated)
        # every encoding rank needs a temporal grid of its own (dense_tp: one, each rank encodes them all)
        encoders = plan_encoders(plan.world_size, plan.vision_parallel, plan.method)
        check_grids(int(inputs.video_grid_thw[0, 0]), encoders, plan.video.temporal_patch)
        return Prepared(plan, self.store.root, self.model, self.processing, inputs, positions, self.device, self.eos,
                        [], time.perf_counter() - t0, plan is not self.fixed, decode_s=self.last_decode_s)

    # -- running -----------------------------------------------------------------------------------
    def backend(self, prepared: Prepared, *, rank_threads: bool = False) -> Any:
        """The kernel backend of a plan (cached by plan hash: kernels are rendered and, for emulated
        ranks sharing one GPU, tuned once: for_rank_threads)."""
        key = (prepared.plan.hash, rank_threads)
        if key not in self.backends:
            backend = kernel_backend(self.cfg.backend, prepared.plan, prepared.plan_dir, prepared.device,
                                     prepared.model.dtype, own_dir=not prepared.replanned)
            self.backends[key] = for_rank_threads(backend, prepared.plan, prepared.device) if rank_threads else backend
        return self.backends[key]

    def generate(self, prepared: Prepared, comm: Any, backend: Any, sampling: Sampling,
                 on_token: OnToken | None = None) -> GenerationResult:
        """Run one prepared input on this rank (every rank calls it, in the same order)."""
        return generate(prepared, comm, backend, sampling, on_token)

    def run(self, prepared: Prepared, comm: Any, backend: Any, max_new_tokens: int | None = None) -> GenerationResult:
        """spava-run's greedy answer on this rank; a full run (``max_new_tokens`` None: the
        config's) also checks that every rank generated the same tokens."""
        n = self.cfg.max_new_tokens if max_new_tokens is None else max_new_tokens
        result = self.generate(prepared, comm, backend, Sampling(max_tokens=n))
        if max_new_tokens is None:
            every = comm.all_gather_object(result.tokens)
            if any(t != every[0] for t in every):
                raise SpavaError(f"rank {comm.rank}: ranks generated different tokens: {every}", setting="runtime")
        return result

    def decode_text(self, tokens: list[int]) -> str:
        tok = self.processing.tokenizer
        if tok is None:  # random weights without a tokenizer: the ids themselves
            return "".join(f"{t} " for t in tokens)
        return tok.decode(tokens, skip_special_tokens=True)

    def prompt_tokens(self, prepared: Prepared) -> int:
        return int(prepared.inputs.prompt_tokens)


def _setting(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg
