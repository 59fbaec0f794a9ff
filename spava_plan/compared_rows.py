"""The rows of every report's method comparison, named: a method, or a method with its ViT placed
otherwise (``zigzag_ring (one_gpu ViT)``), and back from a row's name to its settings.

Core, not planner: the planner's comparison (planner/compare.py) plans these rows, and
``hydra_conf.with_method`` turns a row's name into the config it stands for.
"""
from __future__ import annotations

from .config import SpavaConfig

# zigzag_ring with the whole video's ViT on rank 0 (vision.parallel=one_gpu): the exact context
# parallelism of the serving engines (vLLM and SGLang hand a whole video to one encoder GPU).
ONE_GPU_RING = "zigzag_ring (one_gpu ViT)"
COMPARED = ("spava", "zigzag_ring", ONE_GPU_RING, "apb", "star", "dense_tp", "dense")


def row_name(cfg: SpavaConfig) -> str:
    """The comparison row a config is: its method, marked when its ViT runs on one GPU."""
    name = cfg.method.name
    # dense (one GPU) and dense_tp (every rank encodes every frame with its shard) have no ViT placement
    return f"{name} (one_gpu ViT)" if cfg.vision.parallel == "one_gpu" and name not in ("dense", "dense_tp") else name


def row_setting(name: str) -> tuple[str, str]:
    """(method, vision.parallel) of a row name of ``row_name``: a plain method name is its
    frame-parallel ViT (dense runs on one GPU, where the two are the same; dense_tp shards the ViT)."""
    method, _, mark = name.partition(" (")
    return method, ("one_gpu" if mark == "one_gpu ViT)" else "frames")
