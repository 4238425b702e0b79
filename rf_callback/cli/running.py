"""One run of ``rf-probe`` on a built model: probe it, print the results, then draw the pictures, with progress."""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import TextIO, cast

from torch import nn

from rf_callback.cli.arguments import Checked
from rf_callback.cli.errors import PROG, Stage
from rf_callback.cli.messages import probe_message, probing
from rf_callback.cli.pictures import writing
from rf_callback.cli.printing import field_json, field_text, map_json, map_text, table_json, table_text
from rf_callback.core.probe import probe_rf
from rf_callback.core.result import ReceptiveField, ReceptiveFieldMap
from rf_callback.core.table import rf_table


def run(args: argparse.Namespace, checked: Checked, model: nn.Module, stage: Stage) -> int:
    """Probes ``model`` as the command line asks, prints the results on stdout, then writes ``--plot`` and ``--gif``.

    Args:
        args: the parsed command line.
        checked: its values, checked (as ``check_arguments`` returned them).
        model: the model the factory built.
        stage: updated as the run goes on, for the message of an interrupt or of an unexpected failure.

    Returns:
        The exit status, 0.

    Raises:
        UsageError: the probe or the model's code failed, or a picture could not be written.
    """
    progress = _Progress(sys.stderr, enabled=not args.quiet)
    try:
        _probe_and_print(args, checked, model, progress, stage)
    finally:
        progress.done()
    return 0


class _Progress:
    """One self-overwriting progress line on stderr, only when stderr is a terminal and not ``--quiet``."""

    def __init__(self, stream: TextIO, *, enabled: bool):
        isatty = getattr(stream, "isatty", None)
        self.stream = stream
        self.enabled = enabled and callable(isatty) and bool(isatty())
        self.width = 0

    def note(self, text: str) -> None:
        if self.enabled:
            self.stream.write("\r" + text.ljust(self.width))
            self.stream.flush()
            self.width = max(self.width, len(text))

    def layer(self, index: int, total: int, name: str) -> None:
        self.note(f"probing layer {index}/{total}: {name}")

    def done(self) -> None:
        if self.enabled and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0


def _probe_and_print(
    args: argparse.Namespace, checked: Checked, model: nn.Module, progress: _Progress, stage: Stage
) -> None:
    shape, pos, target = checked.shape, checked.pos, checked.target
    layer = args.layer[0] if args.layer else None
    stage.now = f"probing {args.target}"
    with probing(args, model, shape, pos):
        if args.table:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                rows = rf_table(
                    model, shape, layers=args.layer, mode=args.mode, progress=progress.layer, layout=args.layout
                )
            progress.done()
            _say_warnings(caught, args, model, shape, pos)
            text = table_json(rows, target) if args.json else table_text(args.target, shape, args.mode, rows, target)
        else:
            if pos == "all":
                progress.note(f"probing every position of the output map of {_where(layer)}")
            result = probe_rf(
                model, shape, pos, layer=layer, mode=args.mode, element=checked.element, layout=args.layout
            )
            progress.done()
            if isinstance(result, ReceptiveFieldMap):
                text = map_json(result, target) if args.json else map_text(args.target, result, target)
            else:  # the geometry is measured here, on first use
                field = cast(ReceptiveField, result)  # one position: --pos center or I,J
                text = field_json(field, target) if args.json else field_text(args.target, field, target)
    stage.now = "printing the results"
    print(text)
    sys.stdout.flush()  # a closed pipe fails here, inside main, and not at the interpreter's exit
    if args.plot:
        stage.now = f"writing --plot {args.plot}"
        with writing("--plot", args.plot, checked.pictures["--plot"]):
            from rf_callback.plotting import plot_rf

            plot_rf(cast(ReceptiveField, result)).savefig(args.plot)  # --plot refuses --pos all and --table
    if args.gif:
        stage.now = f"writing --gif {args.gif}"
        progress.note(f"writing {args.gif}")
        with writing("--gif", args.gif, checked.pictures["--gif"]):
            from rf_callback.plotting import animate_rf

            animate_rf(model, shape, args.gif, layer=layer, mode=args.mode, element=checked.element, layout=args.layout)


def _say_warnings(caught, args: argparse.Namespace, model: nn.Module, shape: tuple[int, ...], pos) -> None:
    """The table's own warnings as one line each in the command line's words; any other warning as it was."""
    for warning in caught:
        text = str(warning.message)
        if text.startswith("rf_table:"):
            print(f"{PROG}: warning: {probe_message(text, args, model, shape, pos)}", file=sys.stderr)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def _where(layer: str | None) -> str:
    return f"layer {layer!r}" if layer else "the model"
