"""Fidelity harness: how far each method's attention is from dense attention on synthetic
long-video-like Q/K/V, and whether it keeps the "needles" a question is about.

    python benchmarks/fidelity.py                       # W=4, 128 frames at 224x224 (4149 tokens)
    python benchmarks/fidelity.py gpus=2 frames=64 --seed 1 --save

Synthetic data (one attention layer, per KV head, fp64):
- Video tokens come in temporal grids ("frames"); each frame's keys cluster around a frame
  centre that drifts slowly from frame to frame; a token's query looks mostly at its own frame.
- Token 0 is an attention sink: a larger key along a direction every query leans towards.
- Needles: a few video tokens in random frames (after the anchor) whose keys point along the
  question's direction, with the same norm as ordinary keys (a key-norm score cannot see them).
  Context queries carry a small component along that direction (later frames refer back to the
  needles); the question's queries carry a large one.

Methods (all run through the same RankAttention on an emulated W-rank world):
  spava            the paper's method (query-aware selection, default anchor/passing budget)
  apb-style        spava's structure with a query-UNAWARE key-norm score (APB's retaining heads
                   are trained MLPs with no public weights; key norm is the stand-in, as stated)
  apb              the APB baseline plan (W blocks, query inside the anchor, key-norm passing)
  star             Star Attention (first block as anchor, no passing)
  no-passing       spava with method.passing_tokens=0
  no-anchor        spava with method.anchor_tokens=0
  zigzag_ring      exact ring attention (a sanity row: its errors are rounding)

Metrics, against dense causal attention over the same Q/K/V:
  ctx err     ||O - O_dense|| / ||O_dense|| over the context rows (Frobenius)
  query err   the same over the query rows (exact methods: rounding)
  needle rec  share of the dense attention mass that context rows put on needle keys which the
              method lets those rows see (locally, in the anchor, or through a passing block)
The selections used for needle recall are recomputed with the torch backend's ``select_indices``
on the same data the runtime selected from (the same deterministic function).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from spava_plan.hydra_conf import compose_config
from spava_plan.plan import Plan
from spava_plan.planner.build import build_plan
from spava_plan.runtime.attention import RankAttention
from spava_plan.runtime.backends.torch_ref import TorchBackend
from spava_plan.runtime.comm.emulated import EmulatedWorld
from spava_plan.runtime.reference import assemble, dense_attention, local_rows

# A small Qwen2-VL-shaped model with a realistic head dim (tiny has D=16).
MODEL = ("model=tiny", "model.head_dim=64", "model.mrope_section=[8,12,12]")
DEFAULT = ("gpus=4", "frames=128", "video.resolution=224x224")
METHODS = {
    "spava": (),
    "apb-style": ("method.selection=key_norm",),
    "apb": ("method=apb",),
    "star": ("method=star",),
    # method.passing=global (SPAVA_SPEC.md section 11): the P best keys of all earlier hosts
    "global": ("method.passing=global",),
    # the paper's per-block rule with k chosen so that all hosts together pass as many keys as
    # global does (sum over hosts of v*k = (V-1)*P, k = 2P/V to a 128-token tile, at least one)
    "per_block-capped": (),
    "no-passing": ("method.passing_tokens=0",),
    "no-anchor": ("method.anchor_tokens=0",),
    "zigzag_ring": ("method=zigzag_ring",),
}


@dataclass(frozen=True)
class Synthetic:
    q: torch.Tensor  # (N, Hq, D)
    k: torch.Tensor  # (N, Hkv, D)
    v: torch.Tensor
    needles: torch.Tensor  # global token indices, ascending


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _without(x: torch.Tensor, *dirs: torch.Tensor) -> torch.Tensor:
    """x with its components along the (orthonormal) directions removed (last dim)."""
    for d in dirs:
        x = x - (x * d).sum(-1, keepdim=True) * d
    return x


def synthetic_qkv(plan: Plan, seed: int = 0, needles: int = 8, drift: float = 1.0, noise: float = 0.3,
                  frame_logit: float = 5.0, needle_logit: float = 4.5, question_logit: float = 6.0,
                  sink_logit: float = 3.0) -> Synthetic:
    """Q/K/V for the plan's token layout. ``*_logit``: the typical scaled score q.k/sqrt(D) of a
    context query with its own frame's keys, of a context query with a needle, of a question
    query with a needle, and of any query with the sink."""
    lay, m = plan.layout, plan.model
    n, hkv, g, d = lay.total_tokens, m.num_kv_heads, m.group, m.head_dim
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    root = math.sqrt(d)
    # Per KV head: question direction u, sink direction s (orthonormal).
    u = _unit(randn(hkv, d))
    s = _unit(_without(randn(hkv, d), u))
    video_start = lay.total_tokens - lay.query_tokens - lay.video_tokens - 1  # after system tokens
    grids, per_grid = lay.grid_thw[0], lay.grid_thw[1] * lay.grid_thw[2]
    # Frame centres: a slow random walk on the sphere, orthogonal to u and s.
    centres = [_unit(_without(randn(hkv, d), u, s))]
    for _ in range(grids - 1):
        centres.append(_unit(_without(centres[-1] + drift * randn(hkv, d) / root, u, s)))
    centre = torch.stack(centres)  # (grids, Hkv, D)

    k = _unit(_without(randn(n, hkv, d), u, s))  # text tokens: unrelated unit keys
    frame_of = torch.full((n,), -1, dtype=torch.long)
    vid = torch.arange(video_start, video_start + lay.video_tokens)
    frame_of[vid] = torch.div(vid - video_start, per_grid, rounding_mode="floor")
    k[vid] = _without(centre[frame_of[vid]] + noise * randn(len(vid), hkv, d) / root, u, s)
    k[0] = s * 1.5  # the attention sink
    norm = k[vid].norm(dim=-1).median()

    # Needles: video tokens in random frames after the anchor (one per chosen frame).
    first_free = max(video_start, lay.anchor_tokens)
    frames = torch.unique(frame_of[first_free: video_start + lay.video_tokens])
    frames = frames[frames >= 0]
    chosen = frames[torch.randperm(len(frames), generator=gen)[:needles]]
    idx = torch.stack([video_start + f * per_grid + torch.randint(per_grid, (1,), generator=gen)[0]
                       for f in chosen]).clamp(min=first_free).sort().values
    k[idx] = norm * _unit(u + 0.05 * randn(len(idx), hkv, d))

    v = randn(n, hkv, d)
    # Queries per query head (G of them share a KV head's directions, with their own noise).
    q = torch.zeros(n, hkv, g, d, dtype=torch.float64)
    ctx = lay.context_tokens
    q[:] = (sink_logit * root / 1.5) * s[:, None, :] + randn(n, hkv, g, d) * 0.5
    fv = frame_of[vid]
    q[vid] += (frame_logit * root / norm) * centre[fv][:, :, None, :] + (needle_logit * root / norm) * u[:, None, :]
    q[ctx:] += (question_logit * root / norm) * u[:, None, :]
    return Synthetic(q.reshape(n, hkv * g, d), k, v, idx)


def run_method(plan: Plan, data: Synthetic) -> tuple[torch.Tensor, list[RankAttention]]:
    """Global (N, Hq, D) outputs of the plan on an emulated world (rows held twice: lowest rank),
    and every rank's attention (global passing: the keys each host received)."""
    world = EmulatedWorld.for_plan(plan, timeout_s=600)
    attns = [RankAttention(plan, r, world.comm(r)) for r in range(plan.world_size)]
    outs = world.run(lambda r: attns[r].prefill(0, *local_rows(plan, r, data.q, data.k, data.v)))
    return assemble(plan, outs), attns


CHUNK = 512  # dense reference rows per step: bounds the (Hq, rows, N) score matrix


def dense_rows(data: Synthetic) -> torch.Tensor:
    """Dense causal attention over the whole sequence, computed in row chunks."""
    n = data.q.shape[0]
    return torch.cat([dense_attention(data.q[lo:lo + CHUNK], data.k[:lo + CHUNK], data.v[:lo + CHUNK], past=lo)
                      for lo in range(0, n, CHUNK)])


def needle_mass(data: Synthetic, context: int) -> torch.Tensor:
    """Dense causal attention probabilities of the context rows on the needles: (Hq, L, n)."""
    hq, d = data.q.shape[1], data.q.shape[2]
    kk = data.k[:context].repeat_interleave(hq // data.k.shape[1], dim=1)
    parts = []
    for lo in range(0, context, CHUNK):
        hi = min(lo + CHUNK, context)
        s = torch.einsum("mhd,nhd->hmn", data.q[lo:hi], kk) / math.sqrt(d)
        rows = torch.arange(lo, hi).unsqueeze(1)
        s = s.masked_fill(torch.arange(context).unsqueeze(0) > rows, float("-inf"))
        parts.append(torch.softmax(s, dim=-1)[:, :, data.needles])
    return torch.cat(parts, dim=1)


def visible_needles(plan: Plan, data: Synthetic, backend: TorchBackend,
                    attns: Sequence[RankAttention] = ()) -> torch.Tensor:
    """(Hkv, L, n) bool: can context row i see needle j under the plan (any rank computing it)?
    Global passing: the keys each host received, as the runtime reports them (``attns``)."""
    scan = any(c.kind == "select_scan" for c in plan.collectives)
    lay = plan.layout
    ctx, hkv = lay.context_tokens, plan.model.num_kv_heads
    needles = data.needles
    seen = torch.zeros(hkv, ctx, len(needles), dtype=torch.bool)
    # selected global indices per (slot, rank): (keep, Hkv)
    chosen: dict[tuple[int, int], torch.Tensor] = {}
    qq = data.q[ctx:]
    for rp in plan.ranks:
        if scan:
            continue
        for slot, a, b, keep in rp.select:
            chosen[(slot, rp.rank)] = a + backend.select_indices(qq, data.k[a:b], keep, plan.selection.pool_window,
                                                                 plan.selection.score)
    for rp in plan.ranks:
        for task in rp.tasks:
            lo, hi = task.q_start, min(task.q_stop, ctx)
            if task.merge != "none" or lo >= hi:
                continue
            rows = torch.arange(lo, hi).unsqueeze(1)  # (rows, 1)
            vis = torch.zeros(hkv, hi - lo, len(needles), dtype=torch.bool)
            for ref in task.kv:
                if ref.kind in ("local", "remote", "anchor"):
                    inside = (needles >= ref.start) & (needles < ref.stop)
                    ok = inside & ((needles <= rows) if ref.mask == "causal" else True)
                    vis |= ok.unsqueeze(0)
                elif scan:  # global passing: the host's one buffer of received keys
                    sel = attns[rp.rank].passing_positions()[rp.hosts[ref.slot]]  # (keep, Hkv)
                    vis |= (sel.t().unsqueeze(-1) == needles).any(dim=1).unsqueeze(1)
                else:  # passing: the needles the senders selected, per KV head
                    for r in range(ref.rank_start, ref.rank_stop):
                        sel = chosen[(ref.slot, r)]  # (keep, Hkv)
                        hit = (sel.t().unsqueeze(-1) == needles).any(dim=1)  # (Hkv, n)
                        vis |= hit.unsqueeze(1)
            seen[:, lo:hi] |= vis & (needles <= rows).unsqueeze(0)  # causal: later rows only
    return seen


@dataclass(frozen=True)
class Row:
    method: str
    overrides: str
    tokens: int
    keep: int  # passing tokens per block per KV head
    block: int  # longest context block
    ctx_err: float
    query_err: float
    needle_recall: float
    anchor: int = 0  # anchor tokens
    passed_per_host: float = 0.0  # passing keys per KV head a host attends, mean over the hosts


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def evaluate(base: Sequence[str] = DEFAULT, methods: Sequence[str] = tuple(METHODS), seed: int = 0,
             needles: int = 8) -> tuple[list[Row], float]:
    """Rows per method and the share of the context rows' dense attention mass on the needles."""
    overrides = {name: METHODS[name] for name in methods}
    if "per_block-capped" in overrides:
        g = build_plan(compose_config([*MODEL, *base, *METHODS["global"]]))
        k = 128 * max(1, round(2 * g.layout.blocks[0].keep / g.layout.virtual_hosts / 128))
        overrides["per_block-capped"] = (f"method.passing_tokens={k}",)
    plans = {name: build_plan(compose_config([*MODEL, *base, *overrides[name]])) for name in methods}
    first = plans[methods[0]]
    data = synthetic_qkv(first, seed=seed, needles=needles)
    ctx = first.layout.context_tokens
    ref = dense_rows(data)
    mass = needle_mass(data, ctx)  # (Hq, L, n)
    g = first.model.group
    backend = TorchBackend()
    rows = []
    for name, plan in plans.items():
        out, attns = run_method(plan, data)
        seen = visible_needles(plan, data, backend, attns).repeat_interleave(g, dim=0)  # per query head
        keep = max((s.keep for s in plan.layout.blocks), default=0)
        tasks = [t for rp in plan.ranks for t in rp.tasks if t.name.startswith("host")]
        passed = sum(ref.length for t in tasks for ref in t.kv if ref.kind == "passing") / max(1, len(tasks))
        rows.append(Row(name, " ".join(overrides[name]) or "(defaults)", plan.layout.total_tokens, keep,
                        max((s.length for s in plan.layout.blocks), default=0), _rel(out[:ctx], ref[:ctx]),
                        _rel(out[ctx:], ref[ctx:]), float((mass * seen).sum() / mass.sum()),
                        plan.layout.anchor_tokens, passed))
    share = float(mass.sum() / ctx / first.model.num_heads)
    return rows, share


def table(rows: Sequence[Row]) -> str:
    head = ("| method | overrides | keep/block | anchor | passing keys/host (mean) | ctx rel err | query rel err "
            "| needle recall |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r.method} | {r.overrides} | {r.keep}/{r.block} | {r.anchor} | {r.passed_per_host:,.0f} "
                     f"| {r.ctx_err:.3e} | {r.query_err:.1e} | {r.needle_recall:.3f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="config overrides on top of: %s" % " ".join(DEFAULT))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--needles", type=int, default=8)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: %s" % ", ".join(METHODS))
    parser.add_argument("--name", default="cpu-fidelity", help="result file stem after the date")
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/<date>-<name>.{json,md}")
    args = parser.parse_args(argv)
    given = {o.split("=", 1)[0]: o for o in args.overrides}
    base = tuple(o for o in DEFAULT if o.split("=", 1)[0] not in given) + tuple(args.overrides)
    methods = tuple(m for m in args.methods.split(",") if m)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    rows, share = evaluate(base, methods, seed=args.seed, needles=args.needles)
    text = (f"fidelity: {' '.join(MODEL + base)} seed={args.seed}, {rows[0].tokens} tokens, "
            f"{args.needles} needles holding {share:.1%} of the context rows' dense attention mass\n\n{table(rows)}")
    print(text)
    if args.save:
        out = Path(__file__).parent / "results"
        out.mkdir(exist_ok=True)
        stem = out / f"{datetime.date.today().isoformat()}-{args.name}"
        command = "python benchmarks/fidelity.py " + " ".join(sys.argv[1:] if argv is None else argv)
        stem.with_suffix(".md").write_text(f"`{command}`\n\n{text}\n")
        stem.with_suffix(".json").write_text(json.dumps({"command": command, "needle_mass_share": share,
                                                         "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
