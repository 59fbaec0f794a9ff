"""The plan's dtypes as torch dtypes: the core table (spava_plan.plan.DTYPE_BYTES) extended with
fp64, which reference and fidelity runs use. The only place the runtime names torch dtypes."""
from __future__ import annotations

import torch

from spava_plan.plan import DTYPE_BYTES

TORCH_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                                        "fp64": torch.float64}
# the torch types of the plan's dtypes, in the core table's order
PLAN_TORCH_DTYPES: tuple[torch.dtype, ...] = tuple(TORCH_DTYPES[name] for name in DTYPE_BYTES)
assert all(TORCH_DTYPES[n].itemsize == b for n, b in DTYPE_BYTES.items()), "torch and the core table disagree"
