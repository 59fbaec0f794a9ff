"""The methods the prefill benchmark times: dense attention on one GPU, and Spava with its
baselines emulated on W ranks (benchmarks/prefill.py runs them, prefill_report.py reports them)."""
EMULATED = ("spava", "zigzag_ring", "apb", "star")
DENSE = ("dense_flash", "dense_cudnn")
METHODS = DENSE + EMULATED
