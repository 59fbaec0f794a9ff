"""The vocabularies a config and a plan share: the RoPE scalings and the dtypes with their sizes.

Their own module so that config.py (which validates them) and plan.py (which records them, and
turns a plan back into its config) import it instead of each other.
"""
from __future__ import annotations

from typing import Literal, get_args

RopeType = Literal["default", "linear", "dynamic"]  # the RoPE scalings the runtime reproduces
DType = Literal["bf16", "fp16", "fp32"]
# The one dtype table: bytes per element of each plan dtype (config validation, cost and memory
# models, collective sizes). runtime/dtypes.py maps the same names to torch dtypes.
DTYPE_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4}
assert tuple(DTYPE_BYTES) == get_args(DType)
