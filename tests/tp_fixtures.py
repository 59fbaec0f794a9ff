"""Tiny models, inputs and plans for the dense_tp tests, and the gloo worker of one TP rank.

Each family's folder holds the checkpoint, the inputs and the plans; the reference is the runtime's
own dense path (method=dense on one rank: RankRunner + RankAttention), which dense_tp must equal.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import model_fixtures as mf

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "internvl3")
FRAMES = {"qwen2_vl": 8, "qwen2_5_vl": 8, "internvl3": 4}
NEW_TOKENS = 4


def build(root: Path, family: str):
    """(checkpoint, inputs) of the tiny ``family`` model in ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    ckpt, frames = root / "ckpt", FRAMES[family]
    video = mf.write_video(root / "v.mp4", frames=frames, height=56, width=84)
    if family == "internvl3":
        mf.build_internvl_checkpoint(ckpt)
        return ckpt, mf.tiny_internvl_inputs(ckpt, video, frames)
    mf.build_checkpoint(ckpt, family)
    return ckpt, mf.tiny_inputs(ckpt, video, frames, family)


def plan(inputs, family: str, gpus: int, method: str):
    if family == "internvl3":
        return mf.tiny_internvl_plan(inputs, gpus, FRAMES[family], f"method={method}")
    return mf.tiny_plan(inputs, family, gpus, FRAMES[family], "56x84", f"method={method}")


def run_rank(runner, inputs, positions):
    """(logits of every prompt row, greedy tokens) of one rank's runner."""
    import torch

    with torch.inference_mode():
        pre = runner.prefill(inputs, positions, runner.vision(inputs))
        logits = runner.logits(pre.hidden)
        tokens = runner.generate(inputs, positions, NEW_TOKENS).tokens
    return logits, tokens


def gloo_worker(root: str) -> None:
    """One rank of a gloo world: dense_tp of every family in ``root``/<family>, saved for the parent."""
    import torch

    from spava_plan.plan_load import load_plan
    from spava_plan.runtime.hf import inputs as hf_inputs, model as hf_model
    from spava_plan.runtime.comm.dist import TorchDistComm
    from spava_plan.runtime.tensor_parallel import TPRankRunner

    comm = TorchDistComm.from_env(backend="gloo", timeout_s=120)
    W, rank = comm.world_size, comm.rank
    try:
        for family in FAMILIES:
            d = Path(root) / family
            tp_plan = load_plan(d / f"tp_W{W}.json")
            inputs = torch.load(d / "inputs.pt", weights_only=False)
            model = hf_model.load_checkpoint(str(d / "ckpt"), dtype=torch.float64, device="cpu")
            positions = hf_inputs.global_position_ids(model, inputs)
            logits, tokens = run_rank(TPRankRunner(model, tp_plan, comm, "cpu"), inputs, positions)
            torch.save({"logits": logits, "tokens": tokens}, d / f"tp_W{W}_rank{rank}.pt")
    except BaseException:
        comm.close()
        raise
    comm.barrier()  # as model_fixtures.exactness_worker: agree, close, leave without teardown
    comm.close()
    sys.stdout.flush()
    os._exit(0)
