"""The ``rf-probe`` command line: its parser, and every option value checked before anything is imported or probed."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any, NoReturn

from rf_callback.cli.errors import PROG, TRACEBACK_VARIABLE, UsageError, fail
from rf_callback.cli.pictures import checked_picture
from rf_callback.core.arguments import checked_layout
from rf_callback.core.layouts import CHANNELS_FIRST

_DESCRIPTION = """\
Measure the exact receptive field of a model, at one output position, over a whole output map, or layer by layer.

MODULE:CALLABLE names a function (or class) that returns the torch.nn.Module: MODULE is a dotted module name
importable from the current directory (my_package.models) or a path to a .py file (models/net.py). Warning: this
imports MODULE, which runs its code, and then calls CALLABLE with the --kwargs; only name code you trust.
The model itself is never modified: the probe works on a private copy."""
_EPILOG = f"""\
examples:
  rf-probe tests.cli_models:small_net --input-shape 3,32,32
  rf-probe models.py:resnet --kwargs '{{"depth": 18}}' --input-shape 3,224,224 --table --target-size 96
  rf-probe models.py:unet --input-shape 1,64,64 --pos all --json > fields.json
  rf-probe models.py:net --input-shape 3,32,32 --layer features.3 --pos 2,5 --plot rf.png --gif sweep.gif

exit status: 0 on success; 2 on any failure (a bad argument, a module or callable that cannot be imported or
called, an input shape the model rejects, a model the probe cannot measure, a picture that cannot be written),
with a one-line message on stderr and no traceback ({TRACEBACK_VARIABLE}=1 shows the traceback of an unexpected
one); 130 when interrupted (Ctrl-C); 0, quietly, when the reader of its output leaves early (| head).
--plot and --gif paths are checked before anything is probed."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        """Reports ``message`` on one line and exits with status 2."""
        if message.startswith("argument --pos: expected one argument"):
            message += "; a value that starts with '-' must follow an '=': --pos=-1,-1"
        fail(f"{message} (see {PROG} --help)")


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``rf-probe`` command line.

    Returns:
        A parser whose ``parse_args`` reports a bad command line as one line on stderr and ``SystemExit(2)``.
    """
    parser = _Parser(
        prog=PROG, description=_DESCRIPTION, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "target",
        metavar="MODULE:CALLABLE",
        help="the model factory: MODULE (dotted name or path to a .py file) is imported, which runs its code, and "
        "CALLABLE(**kwargs) must return a torch.nn.Module",
    )
    parser.add_argument("--kwargs", default="{}", metavar="JSON", help="keyword arguments of CALLABLE, a JSON object")
    parser.add_argument(
        "--input-shape",
        required=True,
        metavar="C,H,W",
        help="input shape without the batch: C,L (1D), C,H,W (2D) or C,D,H,W (3D)",
    )
    parser.add_argument(
        "--layer",
        action="append",
        metavar="NAME",
        help="dotted submodule name (as in model.named_modules()) whose output is probed instead of the model's; "
        "with --table, list only these layers (repeatable)",
    )
    parser.add_argument(
        "--element",
        metavar="INDEX|KEY",
        help="the feature map to probe where the output is a tuple or list (its INDEX) or a dict (its KEY)",
    )
    parser.add_argument(
        "--layout",
        default=CHANNELS_FIRST,
        metavar="LAYOUT",
        help="how the probed output lays out its axes: channels_first (default: N,C,H,W), channels_last (N,H,W,C, "
        "e.g. a Swin stage) or tokens:HxW+P (N,P+H*W,C: a ViT's P class or register tokens, then H*W patch tokens, "
        "row-major, e.g. tokens:14x14+1); --pos is then on the H x W grid",
    )
    parser.add_argument(
        "--pos",
        default=None,
        metavar="I,J",
        help="output position: indices separated by commas (use --pos=-1,-1 for negative ones), 'center' "
        "(default) or 'all' for every position of the output map",
    )
    parser.add_argument(
        "--mode",
        choices=("theoretical", "weights"),
        default="theoretical",
        help="theoretical (the architecture's field, default) or weights (what the factory's weights connect)",
    )
    parser.add_argument(
        "--table", action="store_true", help="one row per layer with a feature map: the field at its centre"
    )
    parser.add_argument("--json", action="store_true", help="print JSON (the fields of to_dict()) instead of text")
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help="draw the field (plot_rf) into this image file, in a format matplotlib writes (.png, .pdf, .svg, ...)",
    )
    parser.add_argument(
        "--gif", metavar="FILE.gif", help="animate the field sweeping the whole output map (animate_rf; 1D and 2D)"
    )
    parser.add_argument(
        "--target-size",
        metavar="N",
        help="object size to cover, in input pixels (N, or one per axis: N,M): say whether the field covers it, or "
        "with --table which layer first does",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr (shown only on a terminal)")
    return parser


@dataclass(frozen=True)
class Checked:
    """The option values that the command reads, parsed and checked.

    Attributes:
        shape: ``--input-shape`` with the batch axis of 1 in front: ``(1, C, *spatial)``.
        kwargs: ``--kwargs``, the keyword arguments of the factory.
        target: ``--target-size``, one size per spatial axis; ``None`` when not given.
        pos: ``--pos``: ``"center"``, ``"all"`` or the output indices.
        element: ``--element``: an index where it is an int, else a dict key; ``None`` when not given.
        pictures: for each of ``--plot`` and ``--gif`` that is given, whether its file existed before.
    """

    shape: tuple[int, ...]
    kwargs: dict[str, Any]
    target: tuple[int, ...] | None
    pos: str | tuple[int, ...]
    element: int | str | None
    pictures: dict[str, bool]


def check_arguments(args: argparse.Namespace) -> Checked:
    """Parses and checks the option values, the ``--plot`` and ``--gif`` paths included, before anything is probed.

    Args:
        args: the parsed command line.

    Returns:
        The values the command reads.

    Raises:
        UsageError: a value is malformed, two options do not go together, or a picture cannot be written.
    """
    shape = _input_shape(args.input_shape)
    kwargs = _kwargs(args.kwargs)
    target = _target_size(args.target_size, len(shape) - 2)
    pos = _position(args.pos)
    _check_layout(args.layout)
    _check_layers(args.layer)
    _check_combinations(args)
    if args.gif is not None and len(shape) == 5:
        raise UsageError("--gif animates 1D and 2D inputs only; for a 3D input, draw single fields with --plot")
    pictures = {
        option: checked_picture(option, path)
        for option, path in (("--plot", args.plot), ("--gif", args.gif))
        if path is not None
    }
    return Checked(
        shape=shape, kwargs=kwargs, target=target, pos=pos, element=_element(args.element), pictures=pictures
    )


def _ints(text: str, option: str, what: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"{option} {text!r} is not {what}") from None


def _input_shape(text: str) -> tuple[int, ...]:
    what = "C,L or C,H,W or C,D,H,W: 2 to 4 positive ints separated by commas, without the batch"
    values = _ints(text, "--input-shape", what)
    if not 2 <= len(values) <= 4 or min(values) < 1:
        raise UsageError(f"--input-shape {text!r} is not {what}")
    return (1, *values)


def _kwargs(text: str) -> dict[str, Any]:
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"--kwargs {text!r} is not JSON ({error})") from None
    if not isinstance(kwargs, dict):
        raise UsageError(f"--kwargs {text!r} must be a JSON object of keyword arguments, like '{{\"channels\": 3}}'")
    return kwargs


def _target_size(text: str | None, n_axes: int) -> tuple[int, ...] | None:
    if text is None:
        return None
    what = f"a positive int, or {n_axes} separated by commas (one per spatial axis of the input)"
    values = _ints(text, "--target-size", what)
    if len(values) not in (1, n_axes) or min(values) < 1:
        raise UsageError(f"--target-size {text!r} is not {what}")
    return tuple(values * n_axes if len(values) == 1 else values)


def _position(text: str | None) -> str | tuple[int, ...]:
    if text is None or text.strip() == "center":
        return "center"
    if text.strip() == "all":
        return "all"
    return tuple(_ints(text, "--pos", "'center', 'all' or output indices separated by commas (I,J)"))


def _element(value: str | None) -> int | str | None:
    """``--element``: an index where it is an int (a dict's key of those digits where it has one), else a dict key."""
    if value is None:
        return None
    try:
        index = int(value)
    except ValueError:
        return value
    return index if str(index) == value else value  # "01", "1_0", " 1" name keys, as int() would not read them back


def _check_layout(text: str) -> None:
    try:
        checked_layout(text)
    except ValueError:
        raise UsageError(
            f"--layout {text!r} is not a layout: use channels_first (default: N,C,H,W), channels_last (N,H,W,C) or "
            f"tokens:HxW+P (tokens N,P+H*W,C on an H x W grid after P class or register tokens, e.g. tokens:14x14+1)"
        ) from None


def _check_layers(layers: list[str] | None) -> None:
    for name in layers or []:
        if not name or any(not part for part in name.split(".")):
            raise UsageError(
                f"--layer {name!r} is not a dotted submodule name (as in model.named_modules(), e.g. features.3)"
            )


def _check_combinations(args: argparse.Namespace) -> None:
    if args.table:
        for option, value in (
            ("--pos", args.pos),
            ("--plot", args.plot),
            ("--gif", args.gif),
            ("--element", args.element),
        ):
            if value is not None:
                raise UsageError(f"{option} applies to one probe; --table lists the field at the centre of every layer")
    elif args.layer and len(args.layer) > 1:
        raise UsageError(f"--layer is given {len(args.layer)} times; one probe takes one layer (or use --table)")
    if args.gif is not None and args.layout != CHANNELS_FIRST:
        raise UsageError(
            f"--gif sweeps channels-first output maps only, not --layout {args.layout}; draw single fields with --pos "
            f"I,J --plot FILE.png"
        )
    if args.plot is not None and args.pos is not None and args.pos.strip() == "all":
        raise UsageError("--plot draws one field; with --pos all use --gif, or give --pos I,J or center")
