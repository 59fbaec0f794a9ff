"""Process-wide settings that must be in the environment before torch (and the OpenMP runtime it
loads) starts: imported for its effect, first, by the modules that import torch on the way to a
run (spava_plan/entry/session.py, spava_plan/entry/run.py). OpenMP reads its wait policy once, when the library
loads, so setting it later (e.g. in the Hydra task) would be too late.

``comm=`` is read from the command line here because the launch mode decides the wait policy and
torch loads before Hydra parses anything.
"""
from __future__ import annotations

import os
import sys
from typing import Mapping, MutableMapping, Sequence


def apply(argv: Sequence[str], environ: MutableMapping[str, str]) -> None:
    """Defaults (never overriding what the user set) for a run launched with ``argv``."""
    environ.setdefault("HF_HUB_OFFLINE", "1")  # a model id is looked up in the local cache, never fetched
    # Expandable segments keep the caching allocator within ~5% of what it hands out (12-18% more
    # with the default at a 170K-token rank): planner/memory.py's ALLOCATOR_SLACK assumes it.
    environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if emulated(argv, environ):
        # Emulated ranks are threads, each with its own OpenMP pool; idle pools must not spin while
        # another rank computes (on a CPU that slows every rank many times over).
        environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def emulated(argv: Sequence[str], environ: Mapping[str, str]) -> bool:
    """Whether this process runs the plan's ranks as threads (no torchrun, or comm=emulated)."""
    comm = next((a.split("=", 1)[1] for a in argv if a.startswith("comm=")), "auto")
    under_torchrun = environ.get("RANK", "").isdigit() and environ.get("WORLD_SIZE", "").isdigit()
    return comm == "emulated" or (comm == "auto" and not under_torchrun)


apply(sys.argv[1:], os.environ)
