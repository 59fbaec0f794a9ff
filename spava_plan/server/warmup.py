"""Warm start for spava-serve: run each plan it serves once before /health says ready.

The plans: its ``plan=`` and up to ``warmup_plans`` plans of the family in plan_dir. A server with
neither serves only plans made on the fly for each request's clip, so there is nothing to warm ahead
(the base plan from its config is never what a request runs: warming it cost minutes on a CPU for a
plan no request used). Each is loaded, its backend built through the same path a
request takes (Engine.backend: kernels rendered, and on a GPU every launch tuned and compiled the
first time it runs, reusing kernels/autotune.json when present), and run once end to end on random
frames at the plan's size for one token, on every rank, so the first user request pays none of it.
"""
from __future__ import annotations

import logging

from ..plan import Plan
from ..plan_load import load_plan
from ..runtime.hf import inputs as hf_inputs
from ..entry.session import Prepared, Session, build_inputs, random_frames

log = logging.getLogger("spava_plan.server.serve")
WARMUP_QUESTION = "Describe the video."


def warm_keys(engine: Session, count: int) -> list[str]:
    """Rank 0's list of plans to warm: 'fixed' (plan=) and family plan.json paths."""
    keys, hashes = [], set()
    if engine.fixed is not None:
        keys.append("fixed")
        hashes.add(engine.fixed.hash)
    for entry in engine.store.entries():
        if len(keys) - (engine.fixed is not None) >= count:
            break
        if entry.hash not in hashes:
            keys.append(str(engine.store.directory(entry) / "plan.json"))
            hashes.add(entry.hash)
    return keys


def plan_of(engine: Session, key: str) -> Plan:
    if key == "fixed":
        return engine.fixed
    return load_plan(key)


def synthetic_request(engine: Session, plan: Plan) -> Prepared:
    """A Prepared request for ``plan`` on random frames of its size (what spava-run model.init=random
    runs), as Session.prepare would hand it to the backend and generate."""
    seed = engine.cfg.seed
    inputs = build_inputs(plan, engine.processing, engine.model, random_frames(plan, seed),
                          question=WARMUP_QUESTION, seed=seed)
    positions = hf_inputs.global_position_ids(engine.model, inputs)
    hf_inputs.check_against_plan(plan, inputs, positions)
    inputs, positions = hf_inputs.pad_query(plan, inputs, positions)
    return Prepared(plan, engine.store.root, engine.model, engine.processing, inputs, positions, engine.device,
                    engine.eos, [], 0.0, plan is not engine.fixed)
