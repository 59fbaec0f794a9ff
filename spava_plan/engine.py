"""A model loaded once, answering many (video, question) requests under plans on W ranks.

    engine = Engine(serve_config, world_size)            # every rank: load the model once
    prepared = engine.prepare(video_path, question)       # decode, tokenize, pick or make the plan
    result = engine.generate(prepared, comm, backend, sampling, on_token)   # every rank, same order

The plan for a request is the one that holds its video and question: plan= (or plan_dir, a plan
family) when it fits, else one planned on the fly from the base plan for this input and cached on
disk by its settings' hash (``plan_on_the_fly=false`` refuses instead). Preparing is deterministic:
every rank of a torchrun world prepares the same request to the same plan and inputs, so only the
request (path, question, sampling) travels between ranks.

Sampling (temperature / top_p / seed) runs on the one rank that holds the last prompt token and
the token is broadcast (runtime/generate.py), so every rank continues identically.

This is an entry-side module (like run.py): it wires the planner and the runtime together.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import progress
from .errors import InputError, PlanMismatchError, SpavaError
from .run import Args, Prepared, args_from_config, initial_plan, load_model, make_backend, replan

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
    """One rank's loaded model, processing and plans (thread-safe for one request at a time)."""

    def __init__(self, cfg: Any, world_size: int, local_rank: int | None = None):
        from .run import _device
        from .runtime import hf_inputs, hf_model

        self.cfg = cfg
        self.args: Args = args_from_config(cfg)
        self.world_size = world_size
        self.args.replan = True
        base = initial_plan(self.args) if self.args.plan else self._plan_from_config()
        base.check_world(world_size)
        self.device = _device(self.args, local_rank)
        self.notes: list[str] = []
        self.model = load_model(self.args, base, self.device, self.notes)
        try:
            hf_model.check_model(base, self.model)
        except SpavaError:
            base = replan(base, hf_model.plan_model_settings(self.model))
        self.base = base
        ckpt = self.args.checkpoint
        self.processing = hf_inputs.load_processing(ckpt) if ckpt else hf_inputs.default_processing()
        tok = self.processing.tokenizer
        self.eos = [] if tok is None else [i for i in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>"),
                                                      tok.convert_tokens_to_ids("<|endoftext|>")}
                                           if isinstance(i, int) and i >= 0 and i != tok.unk_token_id]
        self.cache_dir = Path(cfg.plan_cache).resolve()
        self.plans: dict[str, Any] = {}
        self.family = self._load_family(cfg.plan_dir)
        self.backends: dict[str, Any] = {}
        self.lock = threading.Lock()

    # -- plans -----------------------------------------------------------------------------------
    def _plan_from_config(self) -> Any:
        from .planner.build import build_plan

        with progress.step("planning the base plan from the config"):
            return build_plan(self.args.plan_config)

    def _load_family(self, plan_dir: str | None) -> list[Any]:
        if not plan_dir:
            return []
        from .plan import load_plan

        root = Path(plan_dir)
        if not root.is_dir():
            raise InputError(f"no plan directory at {plan_dir!r}", setting="plan_dir")
        plans = [load_plan(p) for p in sorted(root.rglob("plan.json"))]
        plans = [p for p in plans if p.world_size == self.world_size]
        if not plans:
            raise InputError(f"{plan_dir!r} holds no plan.json for {self.world_size} ranks", setting="plan_dir")
        return sorted(plans, key=lambda p: p.layout.total_tokens)

    def plan_for(self, settings: dict[str, Any], inputs: Any, positions: Any) -> Any:
        """The smallest known plan that runs this input exactly, else one planned on the fly
        (cached in memory and on disk by the hash of its settings)."""
        from .plan import load_plan
        from .runtime.hf_inputs import check_against_plan

        for plan in [self.base, *self.family]:
            try:
                check_against_plan(plan, inputs, positions)
                return plan
            except PlanMismatchError:
                continue
        key = hashlib.sha256(json.dumps({"base": self.base.hash, **settings}, sort_keys=True).encode()).hexdigest()[:16]
        if key in self.plans:
            return self.plans[key]
        path = self.cache_dir / key / "plan.json"
        if path.is_file():
            plan = load_plan(path)
        else:
            if not self.cfg.plan_on_the_fly:
                raise InputError(f"no plan holds this input ({', '.join(f'{k}={v}' for k, v in settings.items())}) "
                                 f"and planning on the fly is off; add such a plan to plan_dir or set "
                                 f"plan_on_the_fly=true", setting="plan_on_the_fly")
            with progress.step(f"planning on the fly for {settings}"):
                plan = replan(self.base, settings)
            try:  # a cache that cannot be written only costs the next request a re-plan
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".plan-{threading.get_ident()}.json")
                plan.save(tmp)
                tmp.replace(path)
            except OSError as exc:
                log.warning("cannot cache the plan in %s: %s", path.parent, exc)
        check_against_plan(plan, inputs, positions)
        self.plans[key] = plan
        return plan

    # -- one request -----------------------------------------------------------------------------
    def prepare(self, video: str, question: str) -> Prepared:
        """Decode the video, build the prompt, pick the plan (InputError: a bad request)."""
        from .run import _build_inputs
        from .runtime import hf_inputs
        from .runtime.video_io import probe, read_frames
        from .runtime.vision_parallel import check_grids

        t0 = time.perf_counter()
        base = self.base
        vis = base.config["model"]["vision"]
        info = probe(video)
        tp = int(vis["temporal_patch"])
        frames_n = min(int(self.cfg.frames), info.total_frames)
        frames_n -= frames_n % tp
        if frames_n < tp * self.world_size:
            raise InputError(f"the video has {info.total_frames} frames; {self.world_size} ranks need at least "
                             f"{tp * self.world_size} (one temporal grid of {tp} frames per rank)", setting="video")
        with progress.step(f"decoding {frames_n} frames of {video}"):
            frames, info = read_frames(video, frames_n)
        args = Args(**{**self.args.__dict__, "question": question})
        inputs = _build_inputs(args, base, self.processing, self.model, frames)
        if self.processing.tokenizer is not None:
            context = inputs.video_start + inputs.video_tokens + 1
            suffix = base.layout.query_tokens - int(base.config["video"]["question_tokens"])
            q = inputs.total_tokens - context - suffix
            limit = int(self.cfg.video.question_tokens)
            if q > limit:
                raise InputError(f"the question takes {q} tokens but this server's plans hold up to {limit}; "
                                 f"ask a shorter question or restart the server with video.question_tokens={q}",
                                 setting="video.question_tokens")
        positions = hf_inputs.global_position_ids(self.model, inputs)
        settings = hf_inputs.observed_settings(inputs, base, (info.height, info.width), frames_n)
        plan = self.plan_for(settings, inputs, positions)
        check_grids(int(inputs.video_grid_thw[0, 0]), self.world_size, tp)
        return Prepared(plan, self.cache_dir, self.model, self.processing, inputs, positions, self.device, self.eos,
                        [], time.perf_counter() - t0, plan is not base)

    def backend(self, prepared: Prepared) -> Any:
        """The kernel backend of a plan (cached by plan hash: kernels are rendered once)."""
        key = prepared.plan.hash
        if key not in self.backends:
            self.backends[key] = make_backend(self.args, prepared)
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
        return int(prepared.inputs.total_tokens)
