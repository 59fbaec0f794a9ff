"""runtime/tune_launches.py: the launches it runs before an emulated run are the launches the run
makes (same tasks, rows and segment masks/lengths per rank, ring steps included), so every launch
is tuned alone and none is left to be tuned while the rank threads share the GPU."""
from __future__ import annotations

import functools
from collections import Counter

import pytest
import torch

from spava_plan.runtime.attention import RankAttention
from spava_plan.runtime.backends.torch_ref import TorchBackend
from spava_plan.runtime.comm.emulated import EmulatedWorld
from spava_plan.runtime.reference import local_rows
from spava_plan.runtime.tune_launches import tune_plan_launches

SHAPE = ("model=tiny", "frames=100", "video.resolution=112x168", "gpus=3")  # blocks of ~370 tokens: real selection


@functools.lru_cache(maxsize=None)
def plan_for(*overrides):
    from spava_plan.hydra_conf import compose_config
    from spava_plan.planner.build import build_plan

    return build_plan(compose_config(list(overrides)))


class Recording(TorchBackend):
    """The torch backend, noting each launch's shape: (task, rows, ((mask, keys), ...)) per task."""

    def __init__(self):
        super().__init__()
        self.launches = Counter()

    def attention(self, tasks, scale):
        self.launches[tuple((t.name, t.q.shape[0], tuple((s.mask, s.k.shape[0]) for s in t.segments))
                            for t in tasks)] += 1
        return super().attention(tasks, scale)


def launches_made(plan, seed: int) -> Counter:
    """Every launch one emulated prefill layer of ``plan`` makes, over all ranks (Recording's keys)."""
    n = plan.layout.total_tokens
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n, h, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    world = EmulatedWorld.for_plan(plan, timeout_s=30)
    runs = [Recording() for _ in range(plan.world_size)]
    attns = [RankAttention(plan, r, world.comm(r), runs[r]) for r in range(plan.world_size)]
    world.run(lambda r: attns[r].prefill(0, *local_rows(plan, r, q, k, v)))
    return sum((b.launches for b in runs), Counter())


@pytest.mark.parametrize("method", ["spava", "apb", "star", "zigzag_ring"])
def test_tuning_runs_the_launches_the_run_makes(method):
    plan = plan_for(*SHAPE, f"method={method}")
    made = launches_made(plan, seed=0)

    tuned = Recording()
    count = tune_plan_launches(plan, tuned, "cpu")
    assert tuned.launches == made, method
    assert count == sum(made.values()) and count > 0


@pytest.mark.parametrize("method", ["spava", "apb", "star", "zigzag_ring"])
def test_every_launch_the_run_makes_has_its_own_kernel(method, tmp_path):
    """The mask structure of every launch the runtime makes (a ring step: that step's segments only)
    is in the rendered launch table, so no launch falls back to running segment by segment (the
    slow path a ring step of ZigZagRing took while codegen rendered steps with all their segments)."""
    import json

    from spava_plan.codegen import render_kernels

    plan = plan_for(*SHAPE, f"method={method}")
    made = {tuple(tuple(mask for mask, _ in segs) for _, _, segs in launch) for launch in launches_made(plan, seed=1)}
    render_kernels(plan, tmp_path)
    rendered = {tuple(tuple(m) for m in x["tasks"])
                for x in json.loads((tmp_path / "manifest.json").read_text())["launches"]}
    assert made and made <= rendered, sorted(made - rendered)
