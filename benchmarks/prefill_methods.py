"""The methods the prefill benchmark times: dense attention on one GPU, and Spava with its
baselines emulated on W ranks (benchmarks/prefill.py runs them, prefill_report.py reports them).

The plain names of the methods with an anchor (spava, apb, star) are planned with the default
``method.anchor=broadcast``; their ``<name>_recompute`` variants with ``method.anchor=recompute``
(every rank runs the anchor, the paper's way). Every manifest plans both; the variants are measured
only when ``--methods`` names them, so one GPU call can time the two modes side by side."""
RECOMPUTE = "_recompute"
BASE_EMULATED = ("spava", "zigzag_ring", "apb", "star")
ANCHOR_RECOMPUTED = tuple(m + RECOMPUTE for m in ("spava", "apb", "star"))
EMULATED = BASE_EMULATED + ANCHOR_RECOMPUTED
DENSE = ("dense_flash", "dense_cudnn")
METHODS = DENSE + EMULATED
DEFAULT_METHODS = DENSE + BASE_EMULATED  # what --methods measures unless told


def method_overrides(name: str) -> list[str]:
    """The planner overrides of a benchmark method ("dense" for both dense rows)."""
    if name.endswith(RECOMPUTE):
        return [f"method={name[:-len(RECOMPUTE)]}", "method.anchor=recompute"]
    return [f"method={name}"]
