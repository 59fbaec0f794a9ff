"""Short inputs: the fastest config that holds an input too short for the configured method.

    cfg, notes = fit_config(cfg)      # cfg unchanged (notes == []) when it plans as it is

SPAVA_SPEC.md section 11 ("Short inputs"): where blocks would fall under the selection's minimum,
the planner may choose another method; a request is never refused for being short. A config is
*too short* when planning it fails on its sizes (the anchor covers the context, blocks under the
128-token selection tile, fewer temporal grids than ranks, fewer tokens than ring chunks), i.e.
``derive(cfg, require_fit=False)`` raises. A config that plans but does not fit the device's memory
is too *long*, not short: it is returned as it is, and planning it reports that as before.

Candidates, each planned with the same cost model as every plan (planner/build.py):
  - the configured method with fewer virtual hosts per GPU and fewer ranks, each with the largest
    anchor that holds the input (halved until it does, never dropped: the anchor is what keeps
    Spava's quality, SPAVA_SPEC.md section 9's ablation; a smaller anchor is always faster, so
    speed alone would shrink it to nothing);
  - exact methods, which are never less accurate than the one asked for: zigzag_ring on the
    configured or fewer ranks, dense attention on one rank.
The one with the smallest predicted prefill (makespan, vision encoder included) that fits the
device wins; ties go to the earlier candidate (the configured method, then more ranks).

Rank counts tried: the configured W, then halvings down to 1 (log W plans; a short input has few
tokens, so each plans in milliseconds). ``same_world=True`` keeps W (a launched torchrun world that
cannot run a smaller plan): then only the configured method's reductions and zigzag_ring on W.

Pure planning: no torch, no I/O.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

from spava_plan.config import MethodConfig, SpavaConfig
from spava_plan.errors import InfeasiblePlanError, SpavaError

from .build import Derived, check_plan_size, derive
from .layout import paper_anchor, token_layout

MIN_ANCHOR = 16  # halving the anchor stops here: a few tokens of anchor are not an anchor


def fit_config(cfg: SpavaConfig, *, same_world: bool = False) -> tuple[SpavaConfig, list[str]]:
    """``cfg`` itself when it plans; else the fastest candidate config that holds its input, with
    one note saying what was chosen and why. Raises the original InfeasiblePlanError when no
    candidate holds it either (with ``same_world``: a clip with fewer temporal grids than ranks)."""
    try:
        derive(cfg, require_fit=False, detail=False)
        return cfg, []
    except InfeasiblePlanError as exc:
        why = exc
    best: tuple[float, SpavaConfig, Derived] | None = None
    for group in candidates(cfg, same_world=same_world):
        for cand in group:  # the first that plans: the largest anchor that holds the input
            d = _planned(cand)
            if d is not None:
                if best is None or d.prediction.makespan_us < best[0]:
                    best = (d.prediction.makespan_us, cand, d)
                break
    if best is None:
        raise why
    us, chosen, d = best
    return chosen, [f"the input is too short for {describe(cfg)} ({why}); planned {describe(chosen)} instead, "
                    f"the fastest method that holds it ({d.layout.total_tokens:,} tokens, {us / 1e3:,.2f} ms "
                    f"predicted prefill)"]


def _planned(cand: SpavaConfig | None) -> Derived | None:
    """The derivation of a candidate that plans and fits the device, else None."""
    if cand is None:
        return None
    try:
        d = derive(cand, require_fit=True, detail=False)
        check_plan_size(d.part.method, d.world)
    except SpavaError:
        return None
    return d


def describe(cfg: SpavaConfig) -> str:
    """``method on W GPUs`` plus the knobs that matter for the comparison."""
    m = cfg.method
    text = f"method={m.name} gpus={cfg.topology.gpus}"
    if m.name == "spava":
        text += f" method.hosts_per_gpu={m.hosts_per_gpu}"
    if m.name in ("spava", "apb") and m.anchor_tokens is not None:
        text += f" method.anchor_tokens={m.anchor_tokens}"
    return text


def worlds(gpus: int) -> list[int]:
    """W, W/2, W/4, ..., 1 (W itself first, then halvings rounded down; 1 always last)."""
    out, w = [], gpus
    while w > 1:
        out.append(w)
        w //= 2
    return out + [1]


def candidates(cfg: SpavaConfig, *, same_world: bool = False) -> Iterator[list[SpavaConfig | None]]:
    """The configs fit_config compares, in groups in preference order: of each group only the first
    that plans counts (a group is one rank count and host count of the configured method, its
    anchor halved until the input fits: as much anchor as the input allows, never less). None: a
    rank count the topology cannot lay out."""
    gpus = cfg.topology.gpus
    sizes = [gpus] if same_world else worlds(gpus)
    m = cfg.method
    for w in sizes:
        if m.name in ("spava", "apb"):
            anchors = _anchors(cfg)
            hosts = range(m.hosts_per_gpu, 0, -1) if m.name == "spava" else (m.hosts_per_gpu,)
            for h in hosts:
                yield [_with(cfg, w, dataclasses.replace(m, hosts_per_gpu=h, anchor_tokens=a)) for a in anchors]
        elif m.name != "dense":
            yield [_with(cfg, w, m)]  # star / zigzag_ring on fewer ranks
        if m.name != "zigzag_ring":
            yield [_with(cfg, w, MethodConfig(name="zigzag_ring", hosts_per_gpu=2, overlap=True))]
    if not same_world or gpus == 1:
        yield [_with(cfg, 1, MethodConfig(name="dense", hosts_per_gpu=1, overlap=False))]


def _anchors(cfg: SpavaConfig) -> list[int | None]:
    """The configured anchor (None: the paper rule), then halvings of it down to MIN_ANCHOR."""
    m = cfg.method
    a = m.anchor_tokens
    if a is None:
        a_now = paper_anchor(token_layout(cfg.model, cfg.video).context_tokens)
    else:
        a_now = a
    out: list[int | None] = [a]
    while a_now > MIN_ANCHOR:
        a_now = max(a_now // 2, MIN_ANCHOR)
        out.append(a_now)
    return out


def _with(cfg: SpavaConfig, gpus: int, method: MethodConfig) -> SpavaConfig | None:
    """``cfg`` on ``gpus`` ranks (as few nodes as they need) with ``method``; None for a rank count
    the topology cannot lay out (uneven nodes)."""
    try:
        topology = (cfg.topology if gpus == cfg.topology.gpus
                    else dataclasses.replace(cfg.topology, gpus=gpus, nodes=None))
        return dataclasses.replace(cfg, topology=topology, method=method)
    except SpavaError:
        return None
