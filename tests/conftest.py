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


def _foreign_cpu_for_child_processes() -> None:
    """Child processes (gloo workers, spawned worlds, subprocess runs) compute as if on another CPU.

    The rule (DESIGN.md, "Tests that hold on any machine"): bit-exact float comparisons only for the
    same code on the same thread count in the same process (or a pure copy); anything computed in
    another process is compared with a tolerance and a one-line reason. CPU math libraries pick
    kernels by CPU model and thread count, so a cross-process bit-exact assertion written on one
    machine fails on another. To make that fail on the developer's own machine too, every child
    process gets a different ATen kernel level, a different MKL instruction set and a different
    thread count than this test process. The parent's own choices are fixed first (both libraries
    read their setting once, at first use), then the environment the children inherit is changed.
    """
    try:
        import torch
    except ImportError:
        return
    mine = torch.backends.cpu.get_cpu_capability()  # fixes this process's ATen kernel level
    torch.ones(4, 4, dtype=torch.float64) @ torch.ones(4, 4, dtype=torch.float64)  # and its MKL dispatch
    wider = mine.upper().startswith("AVX512")
    os.environ["ATEN_CPU_CAPABILITY"] = "avx2" if wider else "default"
    os.environ["MKL_ENABLE_INSTRUCTIONS"] = "AVX2" if wider else "SSE4_2"
    if torch.get_num_threads() < 2:  # children run with OMP_NUM_THREADS=1 (model_fixtures.dist_env)
        torch.set_num_threads(2)


_foreign_cpu_for_child_processes()
