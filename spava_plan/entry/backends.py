"""Which kernel backend a run gets, and how emulated ranks share it: the triton backend (kernels
generated from the plan, rendered on demand, tuned per launch on a GPU) on CUDA, the torch
reference otherwise; Triton's CPU interpreter taken in turns by rank threads.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from . import process_env  # noqa: F401, I001 - first: the environment torch's OpenMP reads as it loads

import torch  # noqa: E402

from . import progress  # noqa: E402
from ..codegen.render import render_kernels
from ..errors import InputError, SpavaError
from ..plan import Plan
from ..runtime.backends.torch_ref import TorchBackend
from ..runtime.tune_launches import tune_plan_launches


def kernel_backend(choice: str, plan: Plan, plan_dir: Path, device: torch.device, model_dtype: torch.dtype,
                   *, own_dir: bool = True, load_only: bool = False) -> Any:
    """The kernel backend: triton (generated kernels, rendered on demand) on CUDA, torch otherwise.
    ``own_dir`` false (a plan made for this input, or a read-only plan folder): a fresh temporary
    kernel dir, never the plan's own kernels. ``load_only``: the kernels are rendered and imported
    but not run (tune_only=true on a CPU), so no CUDA device is needed."""
    want = choice
    if want == "auto":
        want = "triton" if device.type == "cuda" and _triton_importable() else "torch"
    if want == "torch":
        return TorchBackend()
    if model_dtype == torch.float64:
        raise InputError("the triton kernels take bf16/fp16/fp32; use dtype=fp32 or backend=torch", setting="dtype")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1" and not load_only:
        raise InputError("backend=triton needs a CUDA device (or TRITON_INTERPRET=1)", setting="backend")
    try:
        # Imported here: it imports triton, an optional part whose absence is a one-line error.
        from ..runtime.backends.triton_gen import TritonBackend, user_kernel_dir

        kernel_dir = plan_dir / "kernels"
        if not own_dir or not os.access(plan_dir, os.W_OK):  # never overwrite the plan's own kernels
            kernel_dir = user_kernel_dir(plan.hash)  # this user's, per plan: tuned once, reused on the next run

        return TritonBackend(kernel_dir, plan_hash=plan.hash, render=lambda d: render_kernels(plan, d))
    except SpavaError:
        raise
    except Exception as exc:  # noqa: BLE001 - triton missing or broken: one line naming the knob
        raise InputError(f"cannot set up the triton kernels: {type(exc).__name__}: {str(exc).splitlines()[0]}; "
                         f"use backend=torch", setting="backend") from None


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401  (probed only: backend=auto on CUDA falls back to torch without it)
    except ImportError:
        return False
    return True


class OneAtATime:
    """Triton's CPU interpreter keeps global state: emulated ranks (threads) take turns in it."""

    def __init__(self, backend: Any):
        self._backend, self._lock, self.name = backend, threading.Lock(), backend.name

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._backend, attr)
        if not callable(value):
            return value

        def call(*a: Any, **k: Any) -> Any:
            with self._lock:
                return value(*a, **k)
        return call


def tune_launches(plan: Plan, backend: Any, device: torch.device) -> int:
    """Every attention launch of the plan tuned (and compiled) alone on this device, recorded in
    the kernel dir's autotune.json; the number of launches."""
    with progress.step("tuning the plan's attention launches (recorded in the kernel dir's autotune.json)"):
        return tune_plan_launches(plan, backend, device)


def for_rank_threads(backend: Any, plan: Plan, device: torch.device) -> Any:
    """The backend as emulated ranks (threads on one device) share it: one rank at a time inside
    Triton's CPU interpreter (global state); on a GPU, every attention launch of the plan tuned
    first, alone (threads sharing the GPU would time each other's kernels)."""
    if backend.name != "triton":
        return backend
    if os.environ.get("TRITON_INTERPRET") == "1":
        return OneAtATime(backend)
    if device.type == "cuda" and backend.tuning:
        tune_launches(plan, backend, device)
    return backend
