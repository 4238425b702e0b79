"""The ``rf-probe`` command: probe a model from the shell and print its field, map or per-layer table."""

from rf_callback.cli.command import PROG, TRACEBACK_VARIABLE, main

__all__ = ["PROG", "TRACEBACK_VARIABLE", "main"]
