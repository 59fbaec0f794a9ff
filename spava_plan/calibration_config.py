"""Where a calibrated topology preset's rates come from, and how far off they were on cells the
fit did not see (``topology.calibration``; report.md quotes it so a prediction says how much to
trust it). Its own module so that spava_plan/config.py only gains one field and one import."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError


@dataclass
class CalibrationConfig:
    """Provenance and held-out accuracy of a calibrated topology preset."""

    device: str = ""  # the GPU the measurements ran on, e.g. "NVIDIA H200"
    date: str = ""  # when they were measured (YYYY-MM-DD)
    fitted_on: str = ""  # which measurements the rates were fitted to
    held_out: str = ""  # which measured cells the fit did not see
    held_out_mean_abs_error: float = 0.0  # mean |predicted / measured - 1| of the TTFT on held-out cells
    held_out_max_abs_error: float = 0.0  # the worst held-out cell
    source: str = ""  # the result file with the measurements (benchmarks/results/...)

    def __post_init__(self) -> None:
        for name in ("device", "held_out", "source"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"must be a non-empty string, got {getattr(self, name)!r}",
                                  setting=f"topology.calibration.{name}")
        for name in ("device", "date", "fitted_on", "held_out", "source"):  # report.md quotes them on one line
            if not isinstance(getattr(self, name), str) or not getattr(self, name).isprintable():
                raise ConfigError(f"must be printable text, got {getattr(self, name)!r}",
                                  setting=f"topology.calibration.{name}")
        for name in ("held_out_mean_abs_error", "held_out_max_abs_error"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < float("inf"):
                raise ConfigError(f"must be a finite number >= 0, got {value!r}", setting=f"topology.calibration.{name}")
