"""The one family of user-facing errors.

Every problem a user can fix (a bad config value, an infeasible plan, a plan that does not match
the launched world or the model) raises a subclass of ``SpavaError``. Its message is a single line
that names the setting to change; entry points print it and exit with code 2. ``assert`` is kept
for internal invariants only.
"""
from __future__ import annotations


def printable(text: str) -> str:
    """``text`` with every character a terminal would act on (escape sequences, bidi and other
    format controls) written as its Python escape: a message may quote what a user typed."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class SpavaError(ValueError):
    """A user error. ``setting`` names the knob to change (e.g. ``video.frames``)."""

    exit_code = 2

    def __init__(self, message: str, setting: str | None = None):
        self.setting = setting
        text = printable(" ".join(str(message).split()))  # always one line, no terminal controls
        # the prefix is what names the knob: keep it even when the name also occurs in the text
        # ("question: is required: question=..."), and add it only once
        if setting and not text.startswith(f"{setting}:"):
            text = f"{setting}: {text}"
        super().__init__(text)


class ConfigError(SpavaError):
    """A configuration value is out of range, malformed or inconsistent."""


class InfeasiblePlanError(SpavaError):
    """The configuration is valid but no plan satisfies it (memory, block sizes)."""


class PlanFormatError(SpavaError):
    """A plan file is unreadable, of an unknown schema version, or fails its content hash."""


class PlanMismatchError(SpavaError):
    """A plan does not match what it is run with (world size, model, input tokens)."""


class InputError(SpavaError):
    """An input (checkpoint, video, question, tensor) is missing, unreadable or malformed."""


class DistributedError(SpavaError):
    """A peer rank failed or timed out; the message names the rank."""
