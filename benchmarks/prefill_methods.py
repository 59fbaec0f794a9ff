"""The methods the prefill benchmark times: dense attention on one GPU, and Spava with its
baselines (dense_tp included) emulated on W ranks (benchmarks/prefill.py runs them, prefill_report.py reports them)."""
EMULATED = ("spava", "zigzag_ring", "apb", "star")
DENSE = ("dense_flash", "dense_cudnn")
# the dense model with tensor parallelism: each rank's shard timed alone, all-reduces charged (prefill_tp.py)
TENSOR_PARALLEL = ("dense_tp",)
METHODS = DENSE + EMULATED + TENSOR_PARALLEL
