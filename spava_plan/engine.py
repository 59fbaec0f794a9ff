"""A model loaded once, answering many (video, question) requests under plans on W ranks.

    engine = Engine(serve_config, world_size)            # every rank: load the model once
    prepared = engine.prepare(video_path, question)       # decode, tokenize, pick or make the plan
    result = engine.generate(prepared, comm, backend, sampling, on_token)   # every rank, same order

The plan for a request is the one that holds its video and question: plan= when it fits, else the
smallest plan of the family in ``plan_dir`` (spava_plan.plan_store.PlanStore), else one planned on
the fly for this input and added to the family, cached on disk by hash (``plan_on_the_fly=false``
refuses instead). Questions of up to video.max_question_tokens run on one plan (query padding). Preparing is deterministic:
every rank of a torchrun world prepares the same request to the same plan and inputs, so only the
request (path, question, sampling) travels between ranks.

Sampling (temperature / top_p / seed) runs on the one rank that holds the last prompt token and
the token is broadcast (runtime/generate.py), so every rank continues identically.

This is an entry-side module (like run.py): it wires the planner and the runtime together.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from . import progress
from .errors import InputError, SpavaError
from .run import (Args, Prepared, args_from_config, for_rank_threads, initial_plan, load_model, make_backend,
                  replan)

log = logging.getLogger("spava_plan.engine")


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
        import torch

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


class Engine:
    """One rank's loaded model, processing and plans (one request at a time)."""

    def __init__(self, cfg: Any, world_size: int, local_rank: int | None = None):
        from .config import config_from_dict
        from .plan_store import PlanStore
        from .run import _device
        from .runtime import hf_inputs, hf_model

        self.cfg = cfg
        self.args: Args = args_from_config(cfg)
        self.world_size = world_size
        # plan= is tried first for every request; the family (plan_dir) and planning on the fly use
        # its config (or this config) as the base.
        self.fixed = initial_plan(self.args) if self.args.plan else None
        base = self.fixed if self.fixed is not None else self._plan_from_config()
        base.check_world(world_size)
        self.device = _device(self.args, local_rank)
        self.notes: list[str] = []
        self.model = load_model(self.args, base, self.device, self.notes)
        try:
            hf_model.check_model(base, self.model)
        except SpavaError:  # the checkpoint's dims win over the config's (or plan='s)
            base = replan(base, hf_model.plan_model_settings(self.model))
            self.fixed = None
        self.base = base
        base_config = config_from_dict(dict(base.config))
        # A torchrun world (local_rank given) runs a plan on all its ranks, so its store plans on
        # them only; emulated ranks follow each plan's own rank count (a short clip: fewer ranks).
        self.store = PlanStore(cfg.plan_dir, base_config, plan_on_the_fly=cfg.plan_on_the_fly,
                               max_cached_plans=cfg.max_cached_plans, max_plan_tokens=cfg.max_plan_tokens,
                               same_world=local_rank is not None)
        self.max_question = int(cfg.video.max_question_tokens if self.fixed is None
                                else self.fixed.video.max_question_tokens)
        ckpt = self.args.checkpoint
        self.processing = (hf_inputs.load_processing(ckpt) if ckpt else
                           hf_inputs.default_processing(family=base.model.family, tile_size=base.video.tile_size))
        tok = self.processing.tokenizer
        self.eos = [] if tok is None else [i for i in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>"),
                                                      tok.convert_tokens_to_ids("<|endoftext|>")}
                                           if isinstance(i, int) and i >= 0 and i != tok.unk_token_id]
        self.backends: dict[tuple, Any] = {}

    def _plan_from_config(self) -> Any:
        from .planner.build import build_plan

        with progress.step("planning the base plan from the config"):
            return build_plan(self.args.plan_config)

    # -- one request -----------------------------------------------------------------------------
    def question_tokens(self, question: str) -> int:
        """Tokens of the question as the prompt holds it (InputError for an empty one)."""
        from .runtime import hf_inputs

        tok = self.processing.tokenizer
        if tok is None:  # random weights without a tokenizer: a synthetic question of the plan's capacity
            return int(self.base.video.max_question_tokens)
        ids = tok(hf_inputs.prompt_text(self.processing, question))["input_ids"]
        video = ids.index(tok.convert_tokens_to_ids(hf_inputs.VIDEO_PAD))
        return len(ids) - (video + 2) - hf_inputs.suffix_tokens(self.base)  # after <|video_pad|><|vision_end|>

    def _inputs(self, video: str, question: str, plan: Any, frames_n: int, size: tuple[int, int] | None) -> Any:
        """The request's model inputs for ``plan``: ``frames_n`` frames spread evenly over the clip
        (repeated when the plan samples more than the clip has), scaled to ``size``."""
        import numpy as np

        from .run import _build_inputs
        from .runtime.video_io import _decode, probe

        info = probe(video)
        indices = [int(i * info.total_frames / frames_n) for i in range(frames_n)]
        with progress.step(f"decoding {frames_n} frames of {video}"):
            frames = _decode(video, indices, size)
        if len(frames) != frames_n:
            raise InputError(f"{video!r} decodes to fewer frames than its header says", setting="video")
        # Qwen2.5-VL's temporal positions follow the sampled frames' real rate (as run.prepare does).
        fps = frames_n / info.total_frames * info.fps if info.fps > 0 else plan.video.fps
        args = Args(**{**self.args.__dict__, "question": question})
        return _build_inputs(args, plan, self.processing, self.model, np.stack(frames), fps)

    def prepare(self, video: str, question: str) -> Prepared:
        """Decode the video, build the prompt, pick the plan (a SpavaError here is a bad request)."""
        from .runtime import hf_inputs
        from .runtime.vision_parallel import check_grids

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
                inputs = self._inputs(video, question, self.fixed, lay.frames, tuple(lay.frame_size))
                positions = hf_inputs.global_position_ids(self.model, inputs)
                hf_inputs.check_against_plan(self.fixed, inputs, positions)
                plan = self.fixed
            except InputError:
                raise  # an unreadable video: no other plan helps
            except SpavaError:
                plan = None
        if plan is None:
            stored = self.store.choose_for_clip(video, max(1, q))
            plan = stored.plan
            inputs = self._inputs(video, question, plan, stored.frames, tuple(stored.frame_size))
            positions = hf_inputs.global_position_ids(self.model, inputs)
            hf_inputs.check_against_plan(plan, inputs, positions)
        inputs, positions = hf_inputs.pad_query(plan, inputs, positions)
        check_grids(int(inputs.video_grid_thw[0, 0]), plan.world_size, plan.video.temporal_patch)
        return Prepared(plan, self.store.root, self.model, self.processing, inputs, positions, self.device, self.eos,
                        [], time.perf_counter() - t0, plan is not self.fixed)

    def backend(self, prepared: Prepared, *, rank_threads: bool = False) -> Any:
        """The kernel backend of a plan (cached by plan hash: kernels are rendered and, for emulated
        ranks sharing one GPU, tuned once: run.for_rank_threads)."""
        key = (prepared.plan.hash, rank_threads)
        if key not in self.backends:
            backend = make_backend(self.args, prepared)
            self.backends[key] = for_rank_threads(backend, prepared) if rank_threads else backend
        return self.backends[key]

    def generate(self, prepared: Prepared, comm: Any, backend: Any, sampling: Sampling,
                 on_token: Callable[[list[int]], bool] | None) -> Any:
        """Run one prepared request on this rank (every rank calls it, in the same order)."""
        import torch

        from .errors import InfeasiblePlanError
        from .runtime.attention import RankAttention
        from .runtime.generate import RankRunner

        plan = prepared.plan
        runner = RankRunner(prepared.model, plan, comm,
                            lambda: RankAttention(plan, comm.rank, comm, backend,
                                                  decode_capacity=sampling.max_tokens + 8), prepared.device)
        try:
            with torch.inference_mode():
                return runner.generate(prepared.inputs, prepared.positions, sampling.max_tokens, prepared.eos,
                                       sampler=sampling.sampler(prepared.device), on_token=on_token)
        except torch.OutOfMemoryError:
            raise InfeasiblePlanError(f"rank {comm.rank} ran out of device memory ({plan.layout.total_tokens} tokens "
                                      f"on {plan.world_size} ranks)", setting="gpus") from None

    def decode_text(self, tokens: list[int]) -> str:
        tok = self.processing.tokenizer
        if tok is None:  # random weights without a tokenizer: the ids themselves
            return "".join(f"{t} " for t in tokens)
        return tok.decode(tokens, skip_special_tokens=True)

    def prompt_tokens(self, prepared: Prepared) -> int:
        return int(prepared.inputs.prompt_tokens)
