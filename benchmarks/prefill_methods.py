"""The methods the prefill benchmark times: dense attention on one GPU, and Spava with its
baselines (dense_tp included) emulated on W ranks (benchmarks/prefill.py runs them, prefill_report.py reports them)."""
# zigzag_ring with the whole video's ViT on rank 0 (vision.parallel=one_gpu): the exact context
# parallelism of the serving engines (planner/compare.py's "zigzag_ring (one_gpu ViT)" row)
ONE_GPU_RING = "zigzag_ring_one_gpu"
EMULATED = ("spava", "zigzag_ring", ONE_GPU_RING, "apb", "star")
DENSE = ("dense_flash", "dense_cudnn")
# the dense model with tensor parallelism: each rank's shard timed alone, all-reduces charged (prefill_tp.py)
TENSOR_PARALLEL = ("dense_tp",)
METHODS = DENSE + EMULATED + TENSOR_PARALLEL
# a benchmark method that is not a planner method: (planner method, its other overrides)
PLANNED_AS = {ONE_GPU_RING: ("zigzag_ring", ("vision.parallel=one_gpu",))}


def planned_as(method: str) -> tuple[str, tuple[str, ...]]:
    """(method=, extra overrides) that plan benchmark method ``method``."""
    return PLANNED_AS.get(method, (method, ()))
