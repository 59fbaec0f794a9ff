"""The `tune` config group: let the planner choose the knobs (`spava-plan tune=latency ...`).

Its own module so that spava_plan/config.py only gains one field and one import.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from .errors import ConfigError

TUNE_TARGETS = ("latency", "memory", "throughput")
TUNE_METHODS = ("spava", "apb", "star", "zigzag_ring", "dense", "dense_tp")
TUNE_SOLVERS = ("zigzag", "greedy", "local_search", "exact")
TUNE_PASSINGS = ("per_block", "global")  # spava_plan.config.PASSINGS (that module imports this one)


@dataclass
class TuneConfig:
    """What `spava-plan tune=<target>` searches and optimises (planner/tune.py).

    The search covers the method, the number of GPUs used (at most ``gpus``), virtual hosts per
    GPU, anchor and passing sizes and the placement solver, keeps only plans that fit in memory
    and picks the best by ``target``. Anchor and passing sizes never go below a quality floor:
    the paper's rules unless ``min_anchor`` / ``min_passing`` allow less.
    """

    target: Optional[str] = None  # None: plan exactly what is configured; else one of TUNE_TARGETS
    # latency: predicted time to first token; memory: peak GiB per GPU; throughput: GPU-seconds
    # per video (GPUs used x time to first token).
    min_passing: Optional[int] = None  # None: the paper's rule p = 128*ceil((L//128)/128) is the floor
    min_anchor: Optional[int] = None  # None: the paper's rule a = 128*ceil((L//64)/128) is the floor
    methods: List[str] = field(default_factory=lambda: list(TUNE_METHODS))
    hosts_per_gpu: List[int] = field(default_factory=lambda: [1, 2, 4])
    solvers: List[str] = field(default_factory=lambda: list(TUNE_SOLVERS))
    # Spava passing modes searched (method.passing): None = the configured method.passing only;
    # e.g. [per_block, global]. Global candidates keep their own quality floor (planner/tune.py).
    passing: Optional[List[str]] = None

    def __post_init__(self) -> None:
        def require(ok: bool, setting: str, message: str) -> None:
            if not ok:
                raise ConfigError(message, setting=setting)

        require(self.target is None or self.target in TUNE_TARGETS, "tune",
                f"unknown tune target {self.target!r}; choose one of {', '.join(TUNE_TARGETS)}")
        for name in ("min_passing", "min_anchor"):
            value = getattr(self, name)
            require(value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0),
                    f"tune.{name}", f"must be null (paper rule) or an integer >= 0, got {value!r}")
        require(self.min_passing is None or self.min_passing % 128 == 0, "tune.min_passing",
                f"must be a multiple of 128 (selection works in 128-token tiles), got {self.min_passing}")
        require(isinstance(self.methods, (list, tuple)) and len(self.methods) > 0
                and all(m in TUNE_METHODS for m in self.methods), "tune.methods",
                f"must be a non-empty list of {', '.join(TUNE_METHODS)}, got {self.methods!r}")
        require(isinstance(self.hosts_per_gpu, (list, tuple)) and len(self.hosts_per_gpu) > 0
                and all(isinstance(h, int) and not isinstance(h, bool) and 1 <= h <= 64 for h in self.hosts_per_gpu),
                "tune.hosts_per_gpu", f"must be a non-empty list of integers in 1..64, got {self.hosts_per_gpu!r}")
        require(isinstance(self.solvers, (list, tuple)) and len(self.solvers) > 0
                and all(s in TUNE_SOLVERS for s in self.solvers), "tune.solvers",
                f"must be a non-empty list of {', '.join(TUNE_SOLVERS)}, got {self.solvers!r}")
        require(self.passing is None or (isinstance(self.passing, (list, tuple)) and len(self.passing) > 0
                                         and all(p in TUNE_PASSINGS for p in self.passing)), "tune.passing",
                f"must be null (method.passing) or a non-empty list of {', '.join(TUNE_PASSINGS)}, got {self.passing!r}")
