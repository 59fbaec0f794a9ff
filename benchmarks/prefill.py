"""End-to-end prefill benchmark: time to first token (vision encoder + prefill + first token, as the
paper times it) of dense attention on one GPU against Spava and its baselines emulated on W ranks.

Methods (the same random-weight model object for all of them, built once per process on the GPU):
  dense_flash   the stock Hugging Face model (attn_implementation="sdpa") on one GPU inside
                sdpa_kernel(FLASH_ATTENTION): the paper's FlashAttn
  dense_cudnn   the same inside sdpa_kernel(CUDNN_ATTENTION)
  spava, zigzag_ring, zigzag_ring_one_gpu, apb, star
                (zigzag_ring_one_gpu: zigzag_ring with vision.parallel=one_gpu, the whole ViT on rank 0
                as the serving engines run it)
                "emulated W-rank": the runtime (spava_plan.entry.run's execute, EmulatedWorld.time, the
                generated Triton kernels on CUDA) replays each rank's real work alone on the one GPU
                (CUDA events); TTFT = the slowest rank + the communication its schedule cannot hide,
                charged from the plan's topology. Never a measured multi-GPU time.
  dense_tp      the dense model with Megatron-style tensor parallelism (vLLM's tensor_parallel_size):
                every rank's shard (runtime/tensor_parallel.py) timed alone on the one GPU, TTFT = the
                slowest rank + its all-reduces charged from the plan's topology, not done
                (benchmarks/prefill_tp.py); on the largest GPU count <= --gpus that divides the q heads
                and the MLP (Qwen2.5-VL-7B's 28 heads: 4 of 8 GPUs)
Both: first token from the last prompt position only (logits_to_keep=1 / the last row); random
uint8 pixel frames (never zeros) through the Qwen image processor; pixels start in page-locked host
memory (the dense model copies all of them, each rank its own temporal grids, inside the timed region).
The vision tower runs its attention as one SDPA call per window size for every method
(runtime/vision/attention.py; ``--vision-attn stock`` keeps transformers' per-window loop) and, on a
GPU, its elementwise steps as fused Triton kernels (runtime/vision/fused.py; ``--vision-kernels stock``
keeps transformers' own).

Steps (each a subcommand; ``run`` does all three, ``smoke`` does them on a CPU with a tiny model):
  plan     --table T --plans DIR        plans + kernels + the planner's predictions (needs hydra)
  measure  --plans DIR --out RUNS.jsonl one JSON line per measurement, flushed (needs the GPU)
  report   RUNS.jsonl... --plans DIR --out PREFIX
                                        PREFIX.{json,md,png}, calibration (conf/topology preset)
  run      --table T                    plan + measure + report in one process
  smoke    --out DIR                    the whole pipeline on CPU (model=tiny Qwen2.5-VL, W=2, fp32)

Timing: CUDA events; dense: ``--warmup`` untimed calls then ``--repeats`` timed ones (median,
min-max); emulated: one functional pass, then every rank replays ``--rank-warmup`` untimed times and
``--repeats`` timed times; each repeat's emulated TTFT is simulated from that repeat's traces.
On a GPU every (cell, method) runs in a fresh process of this script (``--same-process`` keeps
one), so no method inherits another's device memory; the report puts each phase of the slowest
rank next to its roofline floor, and writes a calibrated preset only with ``--write-preset``.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from prefill_methods import (DEFAULT_METHODS, DENSE, EMULATED, METHODS, TENSOR_PARALLEL,  # noqa: E402  (benchmarks/ on sys.path)
                             method_overrides)
from prefill_tp import TP_GPUS_NOTE, tp_gpus  # noqa: E402

W_DEFAULT = 8
WORLD_TIMEOUT_S = 1200.0  # an emulated rank waits this long for its peers (a slow first compile included)
ATTENTION_MODES = {  # --attention: what the emulated methods' triton backend may run, per launch
    "generated": "the generated kernel with its default tiles, nothing tuned (every result before 2026-12-03; "
                 "that day's runs recorded it as 'default')",
    "cudnn": "the default tiles or cuDNN per segment + LSE merge, whichever times faster when every launch is "
             "tuned alone before the run (runtime/tune_launches.py)",
    "tuned": "every tile config and cuDNN, tuned the same way (compiles every candidate: a slow first pass)",
}
MODELS = {"3b": "qwen2_5vl_3b", "7b": "qwen2_5vl_7b", "ivl2b": "internvl3_2b"}
# The tiny Qwen2.5-VL of the tests (model_fixtures.TINY_25_OVERRIDES): window attention included.
TINY_25 = ("model=tiny", "model.family=qwen2_5_vl", "model.name=tiny_25", "model.tokens_per_second=2")


@dataclass(frozen=True)
class Cell:
    """One setting: a model, a frame count and a resolution (the paper's table rows)."""

    model: str  # conf/model name, or "tiny_25" (smoke)
    frames: int
    resolution: str

    @property
    def id(self) -> str:
        return f"{self.model}-{self.frames}f-{self.resolution}"

    def overrides(self, method: str, gpus: int, topology: str) -> list[str]:
        model = list(TINY_25) + ["dtype=fp32"] if self.model == "tiny_25" else [f"model={self.model}"]
        return model + [f"gpus={1 if method == 'dense' else gpus}", f"frames={self.frames}",
                        f"video.resolution={self.resolution}", f"topology={topology}", *method_overrides(method),
                        "kernels=false"]


def _cells(model: str, frames: tuple[int, ...], res: str) -> list[Cell]:
    return [Cell(MODELS[model], f, res) for f in frames]


# Ordered by value: the headline first, then the ablation rows, 720p, then the 7B model.
TABLES: dict[str, list[Cell]] = {
    "headline": _cells("3b", (64,), "1440p"),
    "3b_1440p": _cells("3b", (64, 16, 32, 56), "1440p"),
    "3b_720p": _cells("3b", (16, 56), "720p"),
    "7b_1440p": _cells("7b", (64, 16, 32, 56), "1440p"),
    "7b_720p": _cells("7b", (16, 56), "720p"),
    # InternVL3 resizes every frame to one 448x448 tile: the source resolution only changes the resize
    "internvl3_2b": _cells("ivl2b", (64,), "720p"),
}
# issue 28's two cells: the headline and Qwen2.5-VL-7B at 96 frames 1080p
TABLES["issue28"] = _cells("3b", (64,), "1440p") + _cells("7b", (96,), "1080p")
TABLES["all"] = (TABLES["3b_1440p"] + TABLES["3b_720p"] + TABLES["7b_1440p"][:1] + TABLES["7b_1440p"][1:]
                 + TABLES["7b_720p"])
# Fail-fast check before the long loop: small, but every method runs on the real model.
CHECK = Cell(MODELS["3b"], 16, "360p")
SMOKE = [Cell("tiny_25", 16, "336x504"), Cell("tiny_25", 24, "336x504"), Cell("tiny_25", 16, "252x420")]


# ---- plan (CPU, hydra) ----------------------------------------------------------------------------
def plan_cells(cells: list[Cell], root: Path, *, gpus: int, topology: str, kernels: bool, check: bool) -> dict:
    """plan.json (+ rendered kernels) per emulated method and the planner's prediction for every
    method (dense: one GPU, as planner/compare.py plans it) -> root/manifest.json."""
    from spava_plan.hydra_conf import compose_config
    from spava_plan.planner.build import build_plan, derive

    from calibrate import predicted_phases  # noqa: E402 - benchmarks/ is on sys.path

    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for cell in ([CHECK] if check else []) + cells:
        entry: dict[str, Any] = {"id": cell.id, "model": cell.model, "frames": cell.frames,
                                 "resolution": cell.resolution, "gpus": gpus, "check": cell is CHECK,
                                 "overrides": {}, "plans": {}, "predicted": {}}
        for method in EMULATED + TENSOR_PARALLEL + ("dense",):
            w = gpus
            if method in TENSOR_PARALLEL:  # the heads and the MLP must split evenly (7B's 28 heads: 4 GPUs of 8)
                w = tp_gpus(compose_config(cell.overrides(method, gpus, topology)).model, gpus)
                if w is None:
                    entry.setdefault("unplannable", {})[method] = f"no GPU count <= {gpus} shards the model"
                    continue
                entry.setdefault("gpus_used", {})[method] = w
            overrides = cell.overrides(method, w, topology)
            cfg = compose_config(overrides)
            entry["overrides"][method] = overrides
            names = DENSE if method == "dense" else (method,)
            if method == "dense":
                pred = derive(cfg, require_fit=False, detail=False).prediction
            else:
                plan = build_plan(cfg, require_fit=False)
                pred = plan.prediction
                d = root / cell.id / method
                d.mkdir(parents=True, exist_ok=True)
                plan.save(d / "plan.json")
                if kernels:
                    from spava_plan.codegen import render_kernels

                    render_kernels(plan, d / "kernels")
                entry["plans"][method] = f"{cell.id}/{method}/plan.json"
                entry["tokens"] = plan.layout.total_tokens
                entry["dtype"] = plan.dtype
            row = {"makespan_us": pred.makespan_us, "rank_us": list(pred.rank_us), "vision_us": pred.vision_us,
                   "exposed_comm_us": pred.exposed_comm_us, "peak_memory_bytes": list(pred.peak_memory_bytes),
                   "phases": predicted_phases(cfg)}
            for name in names:
                entry["predicted"][name] = row
        entries.append(entry)
        print(f"planned {cell.id}: {entry['tokens']} tokens", flush=True)
    manifest = {"topology": topology, "gpus": gpus, "cells": entries}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


# ---- measurement helpers (torch) ------------------------------------------------------------------
class ThreadedImages:
    """The image processor with the frames split over threads (PIL's resize and numpy release the
    GIL). Each frame is processed exactly as in one call; outputs are concatenated in order."""

    def __init__(self, inner: Any, workers: int):
        self.inner, self.workers = inner, max(1, workers)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __call__(self, images: list, **kwargs: Any) -> dict:
        import torch
        from concurrent.futures import ThreadPoolExecutor

        n = len(images)
        bounds = [(n * i // self.workers, n * (i + 1) // self.workers) for i in range(self.workers)]
        chunks = [images[a:b] for a, b in bounds if b > a]
        with ThreadPoolExecutor(len(chunks)) as pool:
            outs = list(pool.map(lambda c: self.inner(images=c, **kwargs), chunks))
        return {k: torch.cat([o[k] for o in outs]) for k in ("pixel_values", "image_grid_thw", "num_patches")
                if k in outs[0]}


class Spans:
    """Named device-time spans: CUDA event pairs while recording (read after a synchronise), host
    clock on CPU. Thread-safe; ``serial`` also serialises the wrapped calls (the emulated ranks'
    functional pass runs them from W threads: one compiles a Triton kernel while the others wait)."""

    def __init__(self, cuda: bool):
        import torch

        from spava_plan.runtime.comm.emulated import Clock

        self.cuda, self.recording = cuda, False
        self.clock = Clock(torch.device("cuda" if cuda else "cpu"))
        self.lock = threading.RLock()
        self._open: list[tuple[str, Any, Any]] = []

    def start(self) -> None:
        self._open, self.recording = [], True

    def stop(self) -> dict[str, float]:
        """Microseconds per span name since start() (the device must be synchronised)."""
        self.recording = False
        self.clock.sync()
        out: dict[str, float] = {}
        for name, a, b in self._open:
            out[name] = out.get(name, 0.0) + self.clock.between_us(a, b)
        self._open = []
        return out

    def call(self, name: str, fn: Callable[[], Any]) -> Any:
        with self.lock:
            if not self.recording:
                return fn()
            a = self.clock.mark()
            out = fn()
            self._open.append((name, a, self.clock.mark()))
            return out


class TimedBackend:
    """The kernel backend with every attention / select / merge call timed during replays."""

    def __init__(self, inner: Any, spans: Spans):
        self.inner, self.spans, self.name = inner, spans, inner.name

    def attention(self, tasks: Any, scale: float) -> Any:
        return self.spans.call("attention", lambda: self.inner.attention(tasks, scale))

    def select(self, *a: Any) -> Any:
        return self.spans.call("select", lambda: self.inner.select(*a))

    def select_blocks(self, *a: Any) -> Any:
        return self.spans.call("select", lambda: self.inner.select_blocks(*a))

    def merge(self, outs: Any, lses: Any) -> Any:
        return self.spans.call("merge", lambda: self.inner.merge(outs, lses))

    def merge_parts(self, outs: Any, lses: Any) -> Any:
        return self.spans.call("merge", lambda: self.inner.merge_parts(outs, lses))


BENCH_SDPA = "spava_bench_sdpa"  # transformers' own sdpa attention + mask, with the attention call timed


def register_bench_sdpa(spans: Spans) -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def forward(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any) -> Any:
        return spans.call("attention", lambda: sdpa_attention_forward(module, query, key, value, attention_mask,
                                                                       **kwargs))

    AttentionInterface.register(BENCH_SDPA, forward)
    AttentionMaskInterface.register(BENCH_SDPA, sdpa_mask)  # the stock sdpa mask (None: is_causal)


def sdpa_backends(name: str, device: Any) -> tuple[list, str]:
    """The SDPA backend list for a dense run and its label (CPU has no cuDNN: math, labelled)."""
    from torch.nn.attention import SDPBackend

    want = {"dense_flash": SDPBackend.FLASH_ATTENTION, "dense_cudnn": SDPBackend.CUDNN_ATTENTION}[name]
    if device.type != "cuda" and want == SDPBackend.CUDNN_ATTENTION:
        return [SDPBackend.MATH], "MATH (no cuDNN on CPU)"
    return [want], want.name


def weights_bytes(model: Any) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


# ---- measurement (GPU; CPU in smoke) -----------------------------------------------------------------
class Runner:
    """Measures every method of every cell of a manifest with one model object per model."""

    def __init__(self, root: Path, out: Path, *, repeats: int, warmup: int, heavy_s: float, budget_s: float,
                 vision_attn: str, workers: int, write: Callable[[dict], None], vision_kernels: str = "fused",
                 llm_kernels: str = "stock", rank_warmup: int = 1, logits_dir: Path | None = None,
                 attention: str = "cudnn"):
        import torch

        self.root, self.out, self.write = root, out, write
        self.repeats, self.warmup, self.heavy_s = repeats, warmup, heavy_s
        self.deadline = time.monotonic() + budget_s
        self.vision_attn, self.vision_kernels, self.workers = vision_attn, vision_kernels, workers
        self.llm_kernels, self.rank_warmup, self.logits_dir = llm_kernels, rank_warmup, logits_dir
        self.attention = attention
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.cuda = self.device.type == "cuda"
        self.spans = Spans(self.cuda)
        self.model_name: str | None = None
        self.model: Any = None
        # measured / predicted device time per pass, learned from large cells as they finish (the
        # starting values: an H200, 2026-11-23: dense 2.1, emulated 2.3-2.8 with Triton compiles)
        self.factor = {"dense": 2.3, "emulated": 3.0}

    # -- set-up --------------------------------------------------------------------------------
    def get_model(self, name: str, plan: Any) -> Any:
        import torch

        from spava_plan.runtime.hf import model as hf_model
        from spava_plan.runtime import llm_fused
        from spava_plan.runtime.vision import attention as vision_attention, fused as vision_fused

        if self.model_name == name:
            return self.model
        self.model = None
        if self.cuda:
            torch.cuda.empty_cache()
        t0 = time.perf_counter()
        self.model = hf_model.random_model(plan.model, dtype=hf_model.DTYPES[plan.dtype],
                                           device=self.device, seed=0)
        if self.vision_attn == "batched":
            vision_attention.install(self.model)
        if self.vision_kernels == "fused" and self.cuda:
            vision_fused.install(self.model)
        if self.llm_kernels == "fused" and self.cuda:
            llm_fused.install(self.model)
        self.model_name = name
        self.write({"kind": "model", "model": name, "build_s": time.perf_counter() - t0,
                    "weights_bytes": weights_bytes(self.model), "vision_attention": self.vision_attn,
                    "vision_kernels": self.vision_kernels if self.cuda else "stock",
                    "llm_kernels": self.llm_kernels if self.cuda else "stock"})
        return self.model

    def inputs(self, plan: Any, model: Any) -> tuple[Any, Any, Any, float]:
        from spava_plan.runtime.hf import inputs as hf_inputs
        from spava_plan.runtime.vision.parallel import check_grids
        from spava_plan.entry.session import build_inputs, random_frames

        t0 = time.perf_counter()
        # device="cpu": the timed prefill includes the pixels' host-to-GPU copy (pinned below)
        proc = hf_inputs.default_processing(family=plan.model.family, tile_size=plan.video.tile_size, device="cpu")
        proc.image_processor = ThreadedImages(proc.image_processor, self.workers)
        frames = random_frames(plan, seed=0)  # random uint8 pixels at the plan's source resolution
        inputs = build_inputs(plan, proc, model, frames, question=None, seed=0)
        positions = hf_inputs.global_position_ids(model, inputs)
        hf_inputs.check_against_plan(plan, inputs, positions)
        check_grids(int(inputs.video_grid_thw[0, 0]), plan.world_size, plan.video.temporal_patch,
                    plan.vision_parallel)
        if self.cuda:  # page-locked, as a DataLoader(pin_memory=True) hands them over: every method's
            # timed host-to-GPU copy runs at DMA speed (pageable: ~35 ms of 349 MB per rank at 64f 1440p)
            inputs = dataclasses.replace(inputs, pixel_values_videos=inputs.pixel_values_videos.pin_memory())
        return proc, inputs, positions, time.perf_counter() - t0

    def backend(self, plan: Any, plan_dir: Path) -> Any:
        """triton on CUDA (the torch reference on CPU, as the runtime chooses), per ATTENTION_MODES:
        whatever is tuned is tuned before the run, launch by launch (emulated()), never while timed."""
        if not self.cuda:
            from spava_plan.runtime.backends.torch_ref import TorchBackend

            return TorchBackend()
        from spava_plan.codegen.render import render_kernels
        from spava_plan.runtime.backends.triton_gen import TritonBackend

        from spava_plan.runtime.backends.triton_kernels import DEFAULT_CONFIG

        kw = {"generated": dict(tune=False, cudnn=False), "cudnn": dict(configs=[DEFAULT_CONFIG]),
              "tuned": {}}[self.attention]
        return TritonBackend(plan_dir / "kernels", plan_hash=plan.hash, render=lambda d: render_kernels(plan, d), **kw)

    # -- budget --------------------------------------------------------------------------------
    def fits(self, cell: dict, method: str, passes: int) -> tuple[bool, float]:
        pred = cell["predicted"][method]
        kind = "dense" if method in DENSE else "emulated"
        base = pred["makespan_us"] if kind == "dense" else sum(pred["rank_us"])
        est = passes * base / 1e6 * self.factor[kind] + 5.0
        return time.monotonic() + est < self.deadline, est

    def learn(self, cell: dict, method: str, seconds: float, passes: int) -> None:
        pred = cell["predicted"][method]
        kind = "dense" if method in DENSE else "emulated"
        base = (pred["makespan_us"] if kind == "dense" else sum(pred["rank_us"])) / 1e6
        if base > 1.0:  # small cells are dominated by fixed costs (compiles): they would overstate it
            self.factor[kind] = max(1.0, seconds / (passes * base))

    # -- dense -----------------------------------------------------------------------------------
    def dense(self, cell: dict, method: str, inputs: Any, positions: Any, warmup: int, repeats: int,
              vision_flash: bool = False) -> dict:
        import inspect

        import torch
        from torch.nn.attention import sdpa_kernel

        from spava_plan.runtime.hf.attention import language_model, text_config
        from spava_plan.runtime.vision.tower import vision_bounds

        model, dev = self.model, self.device
        vis_first, vis_last = vision_bounds(model)  # the modules the stock forward enters / leaves the ViT by
        backends, label = sdpa_backends(method, dev)
        register_bench_sdpa(self.spans)
        tc = text_config(model)
        previous = tc._attn_implementation
        tc._attn_implementation = BENCH_SDPA
        marks: dict[str, Any] = {}

        def hook(name: str) -> Callable:
            def fn(*_: Any) -> None:
                if self.spans.recording:
                    marks[name] = self.spans.clock.mark()
            return fn

        handles = [vis_first.register_forward_pre_hook(hook("vision0")),
                   vis_last.register_forward_hook(hook("vision1")),
                   language_model(model).register_forward_pre_hook(hook("lm0")),
                   language_model(model).register_forward_hook(hook("lm1"))]
        params = inspect.signature(model.forward).parameters
        one_d = getattr(model.config, "model_type", None) == "internvl"  # InternVL3: 1-D ids, pixel_values
        pos = positions[:1].to(dev) if one_d else positions.unsqueeze(1).to(dev)  # (3, 1, N): global M-RoPE ids
        pixel_key = "pixel_values" if one_d else "pixel_values_videos"
        fixed = {"video_grid_thw": inputs.video_grid_thw, "second_per_grid_ts": inputs.second_per_grid_ts,
                 "mm_token_type_ids": inputs.mm_token_type_ids}
        reps, token, logits = [], None, None
        if vision_flash:  # cuDNN refused the ViT's attention: pin the ViT (only) to FLASH, labelled
            from torch.nn.attention import SDPBackend

            pinned: list = []

            def enter(*_: Any) -> None:
                pinned.append(sdpa_kernel([SDPBackend.FLASH_ATTENTION]))
                pinned[-1].__enter__()

            def leave(*_: Any) -> None:
                pinned.pop().__exit__(None, None, None)

            handles += [vis_first.register_forward_pre_hook(enter), vis_last.register_forward_hook(leave)]
            label += " (ViT attention: FLASH_ATTENTION, cuDNN refused it)"
        try:
            for i in range(warmup + repeats):
                self.sync()
                base = self.mem_reset()
                gc.collect()
                gc.disable()
                self.spans.start()
                t0 = self.spans.clock.mark()
                with sdpa_kernel(backends), torch.inference_mode():
                    kwargs = {k: (v.to(dev) if v is not None else None) for k, v in fixed.items() if k in params}
                    out = model(input_ids=inputs.input_ids.to(dev),
                                **{pixel_key: inputs.pixel_values_videos.to(dev)}, position_ids=pos,
                                use_cache=False, logits_to_keep=1, **kwargs)
                    last = out.logits[0, -1].float()
                    tok = torch.argmax(last)
                t1 = self.spans.clock.mark()
                self.sync()
                gc.enable()
                ops = self.spans.stop()
                ms = self.spans.clock.between_us
                rec = {"i": i, "warmup": i < warmup, "ttft_us": ms(t0, t1), "vision_us": ms(marks["vision0"], marks["vision1"]),
                       "lm_us": ms(marks["lm0"], marks["lm1"]), "first_us": ms(marks["lm1"], t1),
                       "attention_us": ops.get("attention", 0.0),
                       "peak_bytes": weights_bytes(model) + self.mem_peak(base) if self.cuda else 0}
                reps.append(rec)
                token, logits = int(tok.item()), last.detach().cpu()
                del out
        finally:
            gc.enable()
            tc._attn_implementation = previous
            for h in handles:
                h.remove()
        timed = [r for r in reps if not r["warmup"]]
        where = "one GPU" if self.cuda else "CPU (not a GPU time)"
        return {"kind": "dense", "cell": cell["id"], "method": method, "label": f"{where}, SDPA {label}",
                "sdpa": label, "warmup": warmup, "repeats": len(timed), "runs": reps,
                "ttft_us": _median([r["ttft_us"] for r in timed]), "token": token, "_logits": logits}

    # -- emulated --------------------------------------------------------------------------------
    def emulated(self, cell: dict, method: str, proc: Any, inputs: Any, positions: Any, input_s: float,
                 repeats: int) -> dict:
        import torch

        from spava_plan.plan_load import load_plan
        from spava_plan.runtime.hf import inputs as hf_inputs
        from spava_plan.runtime.comm.emulated import EmulatedWorld
        from spava_plan.critical_path import Compute, simulate
        from spava_plan.entry.session import Prepared, Sampling, generate

        path = self.root / cell["plans"][method]
        plan = load_plan(path)
        hf_inputs.check_against_plan(plan, inputs, positions)
        prepared = Prepared(plan, path.parent, self.model, proc, inputs, positions, self.device, [], [], input_s)
        inner = self.backend(plan, path.parent)
        tuning = {}
        if self.cuda and getattr(inner, "tuning", False):  # every launch tuned alone, before the rank threads
            from spava_plan.runtime.tune_launches import tune_plan_launches

            t0 = time.perf_counter()
            launches = tune_plan_launches(plan, inner, self.device)
            tuning = {"launches": launches, "s": round(time.perf_counter() - t0, 2),
                      "chosen": {k: e["config"] for t in inner.tuner.table.values() for k, e in sorted(t.items())},
                      "candidates_ms": {k: e["candidates"] for t in inner.tuner.table.values()
                                        for k, e in sorted(t.items())}}
        backend = TimedBackend(inner, self.spans)
        world = EmulatedWorld.for_plan(plan, timeout_s=WORLD_TIMEOUT_S)
        weights = weights_bytes(self.model)
        replays: list[dict] = []
        traces: dict[tuple[int, int], list] = {}
        last: dict[str, Any] = {}
        runner = self

        class Observer:
            def before(self, rank: int, i: int) -> None:  # i < warm: that rank's untimed warm-up replays
                last["base"] = runner.mem_reset()
                gc.collect()
                gc.disable()
                runner.spans.start()

            def after(self, rank: int, i: int, events: list) -> None:
                gc.enable()
                ops = runner.spans.stop()
                t = last["result"].timing
                if i < warm:
                    return
                i -= warm
                traces[(rank, i)] = events
                replays.append({"rank": rank, "i": i, "compute_us": sum(e.us for e in events if isinstance(e, Compute)),
                                "vision_us": t.vision_s * 1e6, "prefill_us": t.prefill_s * 1e6,
                                "first_us": (t.first_token_s - t.vision_s - t.prefill_s) * 1e6,
                                "attention_us": ops.get("attention", 0.0), "select_us": ops.get("select", 0.0),
                                "merge_us": ops.get("merge", 0.0),
                                "peak_bytes": weights + runner.mem_peak(last["base"]) if runner.cuda else 0})

        def fn(rank: int) -> Any:
            result = generate(prepared, world.comm(rank), backend, Sampling(max_tokens=1))
            last["result"] = result
            return result

        # every rank replays ``warm`` untimed times first (its first replay after the threaded
        # functional pass ran up to 25% slow on an H100: allocator growth, library heuristics)
        warm = self.rank_warmup
        timing = world.time(fn, warmup=warm, repeats=repeats, device=self.device, observer=Observer(),
                            functional_passes=1)
        W = plan.world_size
        per_repeat = []
        for i in range(repeats):
            line = simulate([traces[(r, i)] for r in range(W)])
            per_repeat.append({"i": i, "ttft_us": line.makespan_us, "rank_finish_us": list(line.finish_us),
                               "exposed_comm_us": list(line.exposed_comm_us)})
        first = next(r for r in timing.results if r.first_logits is not None)  # the rank with the last token
        tokens = [int(r.tokens[0]) for r in timing.results]
        rec = {"kind": "emulated", "cell": cell["id"], "method": method, "world": W,
               "label": timing.label, "backend": backend.name, "attention": self.attention if self.cuda else "torch",
               "attention_tuning": tuning, "warmup": warm,
               "functional_passes": 1, "repeats": repeats,
               # the runtime's emulated TTFT: per-rank medians of every compute stretch over the
               # repeats, then the critical path (one slow replay of one rank does not move it)
               "ttft_us": timing.makespan_us, "median_trace_ttft_us": timing.makespan_us,
               "per_repeat_median_ttft_us": _median([p["ttft_us"] for p in per_repeat]), "rank_compute_us": list(timing.rank_compute_us),
               "rank_finish_us": list(timing.rank_finish_us), "exposed_comm_us": list(timing.exposed_comm_us),
               "per_repeat": per_repeat, "replays": replays, "token": tokens[0],
               "tokens_agree": len(set(tokens)) == 1, "_logits": first.first_logits.detach().float().cpu()}
        del world, timing, prepared
        if self.cuda:
            torch.cuda.empty_cache()
        return rec

    # -- tensor parallel -----------------------------------------------------------------------------
    def tensor_parallel(self, cell: dict, method: str, inputs: Any, positions: Any, repeats: int) -> dict:
        """dense_tp: every rank's shard of this process's model timed alone (benchmarks/prefill_tp.py)."""
        from prefill_tp import measure

        from spava_plan.plan_load import load_plan
        from spava_plan.runtime.hf import inputs as hf_inputs

        plan = load_plan(self.root / cell["plans"][method])
        hf_inputs.check_against_plan(plan, inputs, positions)
        rec = measure(self, cell, method, plan, inputs, positions, repeats, self.rank_warmup)
        rec["gpus_note"] = TP_GPUS_NOTE
        if self.cuda:
            import torch

            torch.cuda.empty_cache()
        return rec

    # -- memory / sync ----------------------------------------------------------------------------
    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()

    def mem_reset(self) -> int:
        import torch

        if not self.cuda:
            return 0
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def mem_peak(self, base: int) -> int:
        """Bytes allocated above ``base`` at the peak since mem_reset (0 on CPU: not measured)."""
        import torch

        if not self.cuda:
            return 0
        return max(0, torch.cuda.max_memory_allocated() - base)

    # -- one cell ----------------------------------------------------------------------------------
    def cell(self, cell: dict, methods: tuple[str, ...], repeats: int | None = None) -> None:
        repeats = repeats or self.repeats
        from spava_plan.plan_load import load_plan

        plan0 = load_plan(self.root / cell["plans"][EMULATED[0]])
        model = self.get_model(cell["model"], plan0)
        proc, inputs, positions, input_s = self.inputs(plan0, model)
        self.write({"kind": "cell", "cell": cell["id"], "tokens": int(inputs.total_tokens), "input_s": input_s,
                    "frame_size": list(inputs.frame_size), "grid_thw": [int(x) for x in inputs.video_grid_thw[0]]})
        logits: dict[str, Any] = {}
        for method in methods:
            if method not in cell["predicted"]:  # dense_tp with no GPU count that shards the model
                self.write({"kind": "skipped", "cell": cell["id"], "method": method,
                            "reason": cell.get("unplannable", {}).get(method, "not planned")})
                continue
            heavy = cell["predicted"][method]["makespan_us"] / 1e6 * self.factor["dense"] > self.heavy_s
            warmup = 0 if (method in DENSE and heavy) else (self.warmup if method in DENSE else 0)
            passes = warmup + repeats + (0 if method in DENSE else 1 + self.rank_warmup)
            ok, est = self.fits(cell, method, passes)
            if not ok:
                self.write({"kind": "skipped", "cell": cell["id"], "method": method,
                            "reason": f"time budget (estimated {est:.0f} s)"})
                continue
            t0 = time.monotonic()
            try:
                if method in TENSOR_PARALLEL:
                    rec = self.tensor_parallel(cell, method, inputs, positions, repeats)
                elif method in DENSE:
                    try:
                        rec = self.dense(cell, method, inputs, positions, warmup, repeats)
                    except RuntimeError as exc:
                        if method != "dense_cudnn" or "backend" not in str(exc).lower():
                            raise
                        self.write({"kind": "note", "cell": cell["id"], "method": method,
                                    "note": f"cuDNN refused a call ({str(exc)[:300]}); retrying with the ViT on FLASH"})
                        rec = self.dense(cell, method, inputs, positions, warmup, repeats, vision_flash=True)
                else:
                    rec = self.emulated(cell, method, proc, inputs, positions, input_s, repeats)
            except Exception as exc:  # noqa: BLE001 - recorded, the next method still runs
                import traceback

                self.write({"kind": "error", "cell": cell["id"], "method": method,
                            "error": f"{type(exc).__name__}: {str(exc)[:2000]}",
                            "trace": traceback.format_exc()[-3000:]})
                if self.cuda:
                    import torch

                    torch.cuda.empty_cache()
                continue
            seconds = time.monotonic() - t0
            self.learn(cell, method, seconds, passes)
            logits[method] = rec.pop("_logits")
            if self.logits_dir is not None:  # methods in separate processes: dense_flash's logits as a file
                import torch

                self.logits_dir.mkdir(parents=True, exist_ok=True)
                torch.save(logits[method], self.logits_dir / f"{cell['id']}__{method}.pt")
                ref = self.logits_dir / f"{cell['id']}__dense_flash.pt"
                if "dense_flash" not in logits and ref.exists():
                    logits["dense_flash"] = torch.load(ref)
            rec["wall_s"] = seconds
            rec["check"] = ({"note": rec["exactness"]} if method in TENSOR_PARALLEL  # all-reduces charged, not done
                            else logits_check(logits, method))
            self.write(rec)


def logits_check(logits: dict[str, Any], method: str) -> dict:
    """First-token logits of ``method`` against the dense (flash) run of the same inputs: relative
    L2 error and argmax agreement. Exact methods (zigzag_ring, the two dense backends) differ only
    by rounding; the approximate ones (spava, apb, star) by their approximation too."""
    ref = logits.get("dense_flash")
    if ref is None or method == "dense_flash":
        return {}
    x = logits[method]
    err = float((x - ref).norm() / ref.norm().clamp_min(1e-30))
    return {"vs": "dense_flash", "rel_err": err, "argmax_agree": int(x.argmax()) == int(ref.argmax())}


def measure(root: Path, out: Path, *, repeats: int, warmup: int, heavy_s: float, budget_s: float,
            vision_attn: str, workers: int, cells: str | None, methods: tuple[str, ...], check: bool = True,
            vision_kernels: str = "fused", llm_kernels: str = "stock", rank_warmup: int = 1,
            isolate: bool | None = None, child: bool = False, logits_dir: Path | None = None,
            attention: str = "cudnn") -> int:
    """Measure the manifest's cells (``cells``: ID[:M1+M2][@REPEATS],...). ``isolate`` (default: on
    a GPU) runs every (cell, method) in a fresh process of this script, so no method inherits the
    device memory (caching allocator, compiled kernels, fragmentation) of the ones before it: in
    one process apb and star ran out of memory on an 80 GB H100 after spava and zigzag_ring. The
    processes share the measurement file and pass dense_flash's first-token logits as a file."""
    import torch
    import transformers

    manifest = json.loads((root / "manifest.json").read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()
    cuda = torch.cuda.is_available()
    if isolate is None:
        isolate = cuda and not child

    def write(rec: dict) -> None:
        rec = {"t": round(time.time(), 3), **rec}
        with lock, out.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
        brief = {k: v for k, v in rec.items() if k not in ("runs", "replays", "per_repeat", "trace",
                                                            "rank_compute_us", "rank_finish_us", "exposed_comm_us")}
        print(json.dumps(brief)[:600], flush=True)

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if not child:
        write({"kind": "env", "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
               "triton": triton_version, "transformers": transformers.__version__,
               "cuda": torch.version.cuda, "topology": manifest["topology"], "repeats": repeats, "warmup": warmup,
               "rank_warmup": rank_warmup, "isolated": isolate,
               "vision_attention": vision_attn, "vision_kernels": vision_kernels if cuda else "stock",
               "llm_kernels": llm_kernels if cuda else "stock",
               "attention": attention if cuda else "torch",
               "rates": device_rates() if cuda else {},
               "command": " ".join([Path(sys.executable).name] + sys.argv)})
    order = [(c, methods, None) for c in manifest["cells"] if check or not c["check"]]
    if cells:  # the given cells in the given order (after the fail-fast check): ID[:M1+M2][@REPEATS]
        by_id = {c["id"]: c for c in manifest["cells"]}
        wanted = []
        for item in cells.split(","):
            item, _, reps = item.partition("@")
            cid, _, ms = item.partition(":")
            if cid not in by_id:
                raise SystemExit(f"--cells: {cid!r} is not in the manifest")
            wanted.append((by_id[cid], tuple(ms.split("+")) if ms else methods, int(reps) if reps else None))
        order = [o for o in order if o[0]["check"]] + wanted
    logits_dir = logits_dir or (out.parent / (out.name + ".logits") if isolate else None)
    runner = None if isolate else Runner(
        root, out, repeats=repeats, warmup=warmup, heavy_s=heavy_s, budget_s=budget_s, vision_attn=vision_attn,
        workers=workers, write=write, vision_kernels=vision_kernels, llm_kernels=llm_kernels,
        rank_warmup=rank_warmup, logits_dir=logits_dir, attention=attention)
    deadline = time.monotonic() + budget_s
    failed_check = False
    for cell, ms, reps in order:
        if isolate:
            for method in ms:
                left = deadline - time.monotonic()
                if left <= 0:
                    write({"kind": "skipped", "cell": cell["id"], "method": method, "reason": "time budget"})
                    continue
                cmd = [sys.executable, str(Path(__file__).resolve()), "measure", "--plans", str(root), "--out", str(out),
                       "--cells", f"{cell['id']}:{method}@{reps or repeats}", "--no-check", "--child",
                       "--logits-dir", str(logits_dir), "--repeats", str(repeats), "--warmup", str(warmup),
                       "--rank-warmup", str(rank_warmup), "--heavy-s", str(heavy_s), "--budget-s", f"{left:.0f}",
                       "--vision-attn", vision_attn, "--vision-kernels", vision_kernels,
                       "--llm-kernels", llm_kernels, "--attention", attention, "--workers", str(workers),
                       "--methods", method]
                rc = __import__("subprocess").run(cmd).returncode
                if rc != 0:
                    write({"kind": "error", "cell": cell["id"], "method": method,
                           "error": f"the measuring process exited with status {rc}", "trace": ""})
        else:
            runner.cell(cell, ms, reps)
        if cell["check"]:
            failed_check = not check_ok(out, cell["id"], ms)
            write({"kind": "check", "cell": cell["id"], "ok": not failed_check})
            if failed_check:
                break
    return 3 if failed_check else 0


def device_rates() -> dict:
    """This GPU's measured bf16 GEMM, cuDNN attention and HBM copy rates (the report's roofline
    floors use them): 8192^3 matmul; causal SDPA (cuDNN) with 16 heads of 128 over 16K tokens;
    a 2 GiB device-to-device copy (read + write bytes). Medians of 10 calls after 3 warm-ups."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def bench(fn: Callable[[], Any]) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(10):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e-3)
        return statistics.median(times)

    out: dict[str, float] = {}
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    out["gemm_tflops"] = 2 * 8192 ** 3 / bench(lambda: x @ x) / 1e12
    q = torch.randn(1, 16, 16384, 128, device="cuda", dtype=torch.bfloat16)
    try:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            t = bench(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True))
        out["attention_tflops"] = 4 * 128 * 16 * 16384 * 16385 / 2 / t / 1e12
    except RuntimeError:  # no cuDNN attention on this build: the flash kernel's rate, labelled by key
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            t = bench(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True))
        out["attention_tflops_flash"] = 4 * 128 * 16 * 16384 * 16385 / 2 / t / 1e12
    big = torch.empty(2 ** 30, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(big)
    out["hbm_gbps"] = 2 * big.numel() * 2 / bench(lambda: dst.copy_(big)) / 1e9
    del x, q, big, dst
    torch.cuda.empty_cache()
    return {k: round(v, 1) for k, v in out.items()}


def check_ok(out: Path, cell_id: str, methods: tuple[str, ...]) -> bool:
    """The fail-fast check passed: every method ran with finite times, and the exact ring is not
    grossly off dense attention's first-token logits (0.5: only a broken run; bf16 rounding over 36
    layers of a random-weight model is far below, so the measured error is recorded, not judged)."""
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    mine = {r["method"]: r for r in recs if r.get("cell") == cell_id and r["kind"] in ("dense", "emulated")}
    if set(mine) != set(methods):
        return False
    finite = all(0 < r["ttft_us"] < float("inf") for r in mine.values())
    if "zigzag_ring" in mine and "dense_flash" in mine:
        return finite and mine["zigzag_ring"]["check"].get("rel_err", 1.0) < 0.5
    return finite


# ---- CLI -----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common_measure(p: argparse.ArgumentParser) -> None:
        p.add_argument("--repeats", type=int, default=3, help="timed repeats (dense) / replays per rank (emulated)")
        p.add_argument("--warmup", type=int, default=1, help="untimed dense calls before the repeats")
        p.add_argument("--heavy-s", type=float, default=6.0,
                       help="dense cells estimated above this many seconds skip the separate warm-up")
        p.add_argument("--budget-s", type=float, default=1e9, help="skip what would not finish in this time")
        p.add_argument("--vision-attn", choices=("batched", "stock"), default="batched")
        p.add_argument("--vision-kernels", choices=("fused", "stock"), default="fused",
                       help="fused: runtime/vision_fused's Triton RMSNorm/rotary/SiLU-gate kernels in the ViT (GPU)")
        p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
        p.add_argument("--cells", default=None, help="comma-separated cell ids (default: all in the manifest)")
        p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                       help=f"comma-separated, of: {', '.join(METHODS)} (the *_recompute ones: method.anchor=recompute)")
        p.add_argument("--no-check", action="store_true", help="skip the manifest's fail-fast check cell")
        p.add_argument("--llm-kernels", choices=("fused", "stock"), default="fused",
                       help="fused: runtime/llm_fused's RMSNorm and gate|up GEMM + SiLU-gate kernels in the LLM (GPU)")
        p.add_argument("--rank-warmup", type=int, default=1, help="untimed replays of every emulated rank first")
        p.add_argument("--attention", choices=sorted(ATTENTION_MODES), default="cudnn",
                       help="the emulated methods' attention backend on a GPU (default cudnn: like the runtime, "
                            "which tunes every launch, at the cost of two timings per launch): " +
                            "; ".join(f"{k}: {v}" for k, v in ATTENTION_MODES.items()))
        p.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                       help="every (cell, method) in a fresh process (default on a GPU)")
        p.add_argument("--same-process", dest="isolate", action="store_false",
                       help="every method in this one process (default on CPU)")
        p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
        p.add_argument("--logits-dir", type=Path, default=None, help=argparse.SUPPRESS)

    p = sub.add_parser("plan")
    p.add_argument("--table", choices=sorted(TABLES), default="headline")
    p.add_argument("--plans", type=Path, required=True)
    p.add_argument("--gpus", type=int, default=W_DEFAULT)
    p.add_argument("--topology", default="h200")
    p.add_argument("--no-kernels", action="store_true")
    p.add_argument("--check", action="store_true", help=f"also plan the fail-fast cell {CHECK.id}")
    p = sub.add_parser("measure")
    p.add_argument("--plans", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    common_measure(p)
    p = sub.add_parser("report")
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--plans", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="PREFIX of PREFIX.json / .md / .png")
    p.add_argument("--preset-dir", type=Path, default=HERE.parent / "conf" / "topology")
    p.add_argument("--write-preset", action="store_true",
                   help="write the calibrated topology preset <preset-dir>/<topology>_calibrated.yaml")
    p = sub.add_parser("run")
    p.add_argument("--table", choices=sorted(TABLES), default="headline")
    p.add_argument("--plans", type=Path, default=Path(".prefill_plans"))
    p.add_argument("--gpus", type=int, default=W_DEFAULT)
    p.add_argument("--topology", default="h200")
    p.add_argument("--out", type=Path, default=None)
    common_measure(p)
    p.add_argument("--write-preset", action="store_true",
                   help="write the calibrated preset conf/topology/<topology>_calibrated.yaml")
    p = sub.add_parser("smoke")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--write-preset", action="store_true", help="write the calibrated preset into --out")
    args = ap.parse_args(argv)

    if args.cmd == "plan":
        plan_cells(TABLES[args.table], args.plans, gpus=args.gpus, topology=args.topology,
                   kernels=not args.no_kernels, check=args.check)
        return 0
    if args.cmd == "measure":
        return measure(args.plans, args.out, repeats=args.repeats, warmup=args.warmup, heavy_s=args.heavy_s,
                       budget_s=args.budget_s, vision_attn=args.vision_attn, vision_kernels=args.vision_kernels,
                       workers=args.workers, cells=args.cells, methods=tuple(args.methods.split(",")),
                       check=not args.no_check, llm_kernels=args.llm_kernels, rank_warmup=args.rank_warmup,
                       isolate=args.isolate, child=args.child, logits_dir=args.logits_dir, attention=args.attention)
    from prefill_report import report  # noqa: E402

    if args.cmd == "report":
        report(args.runs, args.plans, args.out, preset_dir=args.preset_dir if args.write_preset else None)
        return 0
    if args.cmd == "run":
        plan_cells(TABLES[args.table], args.plans, gpus=args.gpus, topology=args.topology, kernels=True, check=False)
        runs = args.plans / "runs.jsonl"
        rc = measure(args.plans, runs, repeats=args.repeats, warmup=args.warmup, heavy_s=args.heavy_s,
                     budget_s=args.budget_s, vision_attn=args.vision_attn, vision_kernels=args.vision_kernels,
                     workers=args.workers, cells=args.cells, methods=tuple(args.methods.split(",")),
                     llm_kernels=args.llm_kernels, rank_warmup=args.rank_warmup, isolate=args.isolate,
                     attention=args.attention)
        out = args.out or default_prefix(runs)
        report([runs], args.plans, out, preset_dir=HERE.parent / "conf" / "topology" if args.write_preset else None)
        return rc
    # smoke: the whole pipeline on CPU with the tiny model (W=2, fp32, torch backend)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # emulated ranks are threads (see spava_plan.entry.run)
    plans = args.out / "plans"
    plan_cells(SMOKE, plans, gpus=2, topology="h200", kernels=False, check=False)
    runs = args.out / "runs.jsonl"
    if runs.exists():
        runs.unlink()
    rc = measure(plans, runs, repeats=2, warmup=1, heavy_s=1e9, budget_s=1e9, vision_attn="batched", workers=2,
                 cells=None, methods=METHODS, isolate=False)
    report([runs], plans, args.out / "smoke-cpu-prefill", preset_dir=args.out if args.write_preset else None)
    return rc


def default_prefix(runs: Path) -> Path:
    """benchmarks/results/<date>-<device>-prefill, the device from the runs' env line."""
    env = next(json.loads(line) for line in runs.read_text().splitlines() if '"kind": "env"' in line)
    device = env["device"].lower().replace("nvidia ", "").replace(" ", "_")
    return HERE / "results" / f"{time.strftime('%Y-%m-%d')}-{device}-prefill"


if __name__ == "__main__":
    raise SystemExit(main())
