"""How ``rf-probe`` fails: its name, the usage error, the one-line message on stderr and the stage named in it."""

from __future__ import annotations

import os
import sys
import traceback
from typing import NoReturn

PROG = "rf-probe"
# Set to 1 to see the traceback of an unexpected failure (on stderr, above the one-line message).
TRACEBACK_VARIABLE = "RF_PROBE_TRACEBACK"


class UsageError(Exception):
    """A failure reported as one line on stderr with exit status 2 (the message names the option and the fix)."""


class Stage:
    """What the command is doing now, named in the message of an interrupt or of an unexpected failure.

    Attributes:
        now: the current stage, in words that follow "while" (e.g. ``"checking the arguments"``).
    """

    def __init__(self) -> None:
        self.now = "reading the arguments"


def fail(message: str, status: int = 2) -> NoReturn:
    """Prints ``message`` as one line on stderr, prefixed with the command's name, and exits.

    Args:
        message: what went wrong; its runs of whitespace, newlines included, become single spaces.
        status: the exit status.

    Raises:
        SystemExit: always, with ``status``.
    """
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(status)


def show_traceback(error: BaseException | None) -> None:
    """Prints the traceback of ``error`` on stderr, only when ``RF_PROBE_TRACEBACK`` is set to other than 0.

    Args:
        error: the exception whose traceback is shown; ``None`` shows nothing.
    """
    if error is not None and os.environ.get(TRACEBACK_VARIABLE, "") not in ("", "0"):
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)


def silence_stdout() -> None:
    """Points stdout at the null device, so that the interpreter's last flush of a closed pipe does not fail."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (captured in tests): nothing to flush
        pass
