"""Logging and progress of the long steps (model load, video decode, prefill, decode) on stderr.

Diagnostics go through Python ``logging`` (Hydra's job logging configures the handlers: stderr,
so stdout keeps only the answer). Progress bars are drawn only when stderr is a terminal: in a
pipe or a log file a bar is noise, and a bar left without its newline would glue itself to the
next line (an error line must start a line of its own). ``close_bars()`` ends any open bar before
an error is printed.
"""
from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator

log = logging.getLogger("spava_plan")
_OPEN: list[Any] = []


def interactive() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def quiet_library_bars() -> None:
    """transformers / huggingface_hub draw their own bars (weight loading): only on a terminal."""
    if interactive():
        return
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass


@contextmanager
def step(what: str, total: int | None = None, unit: str = "it") -> Iterator[Any]:
    """Log ``what`` with its duration; on a terminal also show a bar (``bar.update(n)`` advances it
    when ``total`` is given). Yields the bar (a no-op object when none is drawn)."""
    bar: Any = _NoBar()
    if interactive():
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=what, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)
        _OPEN.append(bar)
    log.info("%s ...", what)
    t0 = time.perf_counter()
    try:
        yield bar
    finally:
        if bar in _OPEN:
            _OPEN.remove(bar)
            bar.close()
    log.info("%s: done in %.2f s", what, time.perf_counter() - t0)


def close_bars() -> None:
    """Close every open bar (before an error line, so the line starts clean)."""
    while _OPEN:
        _OPEN.pop().close()
    try:
        sys.stderr.flush()
    except (AttributeError, ValueError):
        pass


class _NoBar:
    def update(self, n: int = 1) -> None:
        return None

    def close(self) -> None:
        return None
