"""The methods the prefill benchmark times: dense attention on one GPU, and Spava with its
baselines (dense_tp included) emulated on W ranks (benchmarks/prefill.py runs them, prefill_report.py reports them).

The plain names of the methods with an anchor (spava, apb, star) are planned with the default
``method.anchor=broadcast``; their ``<name>_recompute`` variants with ``method.anchor=recompute``
(every rank runs the anchor, the paper's way). Every manifest plans both; the variants are measured
only when ``--methods`` names them, so one GPU call can time the two modes side by side."""
RECOMPUTE = "_recompute"
# zigzag_ring with the whole video's ViT on rank 0 (vision.parallel=one_gpu): the exact context
# parallelism of the serving engines (planner/compare.py's "zigzag_ring (one_gpu ViT)" row)
ONE_GPU_RING = "zigzag_ring_one_gpu"
BASE_EMULATED = ("spava", "zigzag_ring", ONE_GPU_RING, "apb", "star")
ANCHOR_RECOMPUTED = tuple(m + RECOMPUTE for m in ("spava", "apb", "star"))
EMULATED = BASE_EMULATED + ANCHOR_RECOMPUTED
DENSE = ("dense_flash", "dense_cudnn")
# the dense model with tensor parallelism: each rank's shard timed alone, all-reduces charged (prefill_tp.py)
TENSOR_PARALLEL = ("dense_tp",)
METHODS = DENSE + EMULATED + TENSOR_PARALLEL
DEFAULT_METHODS = DENSE + BASE_EMULATED + TENSOR_PARALLEL  # what --methods measures unless told
# a benchmark method that is not a planner method: (planner method, its other overrides)
PLANNED_AS = {ONE_GPU_RING: ("zigzag_ring", ("vision.parallel=one_gpu",)),
              **{m: (m[:-len(RECOMPUTE)], ("method.anchor=recompute",)) for m in ANCHOR_RECOMPUTED}}


def planned_as(method: str) -> tuple[str, tuple[str, ...]]:
    """(method=, extra overrides) that plan benchmark method ``method``."""
    return PLANNED_AS.get(method, (method, ()))


def method_overrides(name: str) -> list[str]:
    """The planner overrides of a benchmark method ("dense" for both dense rows)."""
    method, extra = planned_as(name)
    return [f"method={method}", *extra]
