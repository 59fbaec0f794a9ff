"""Shared test set-up.

Triton decides at decoration time whether kernels run in the CPU interpreter, so the switch must
be set before any test module imports a kernel: without CUDA, kernels run under TRITON_INTERPRET=1.
"""
import os


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")
