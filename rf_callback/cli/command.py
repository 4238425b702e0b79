"""The ``rf-probe`` command: the receptive field of any model built by an importable factory, from the shell."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import re
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TextIO

from torch import nn
from torch.nn.modules.conv import _ConvNd

from rf_callback.core.arguments import checked_layout
from rf_callback.core.layouts import AXIS_NAMES, CHANNELS_FIRST, axis_letters
from rf_callback.core.model_copy import CopyError
from rf_callback.core.probe import ProbeError, probe_rf
from rf_callback.core.result import ReceptiveField, ReceptiveFieldMap
from rf_callback.core.table import LayerField, rf_table

PROG = "rf-probe"
# Set to 1 to see the traceback of an unexpected failure (on stderr, above the one-line message).
TRACEBACK_VARIABLE = "RF_PROBE_TRACEBACK"
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


class _UsageError(Exception):
    """A failure reported as one line on stderr with exit status 2 (the message names the option and the fix)."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        """Reports ``message`` on one line and exits with status 2."""
        if message.startswith("argument --pos: expected one argument"):
            message += "; a value that starts with '-' must follow an '=': --pos=-1,-1"
        _fail(f"{message} (see {PROG} --help)")


def _fail(message: str, status: int = 2) -> NoReturn:
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(status)


class _Stage:
    """What the command is doing now, named in the message of an interrupt or of an unexpected failure."""

    def __init__(self) -> None:
        self.now = "reading the arguments"


def _parser() -> argparse.ArgumentParser:
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


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``rf-probe`` command.

    Every failure ends the same way: one line on stderr that names the option (or the factory) at fault and how to
    fix it, and ``SystemExit(2)``, whatever raised, including the model's own code and the writing of a picture
    after the results were printed; never a traceback (unless ``RF_PROBE_TRACEBACK=1`` asks for the traceback of
    an unexpected failure). An interrupt (Ctrl-C) ends with one line and ``SystemExit(130)``.

    Args:
        argv: the command-line arguments without the program name; ``None`` for ``sys.argv[1:]``.

    Returns:
        The exit status: 0 on success (failures raise ``SystemExit`` instead, as described above).
    """
    stage = _Stage()
    try:
        args = _parser().parse_args(argv)
        return _run(args, stage)
    except _UsageError as error:
        _show_traceback(error.__cause__)
        _fail(str(error))
    except KeyboardInterrupt:
        _fail(f"interrupted (Ctrl-C) while {stage.now}; nothing more was done", status=130)
    except BrokenPipeError:  # the reader left (| head): what it did not read is not wanted, and that is no failure
        _silence_stdout()
        raise SystemExit(0) from None
    except Exception as error:
        _show_traceback(error)
        _fail(
            f"unexpected {type(error).__name__} while {stage.now}: {error}; this is a bug in {PROG}: rerun with "
            f"{TRACEBACK_VARIABLE}=1 for the traceback and report it"
        )


def _show_traceback(error: BaseException | None) -> None:
    if error is not None and os.environ.get(TRACEBACK_VARIABLE, "") not in ("", "0"):
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)


def _silence_stdout() -> None:
    """Points stdout at the null device, so that the interpreter's last flush of a closed pipe does not fail."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (captured in tests): nothing to flush
        pass


def _run(args: argparse.Namespace, stage: _Stage) -> int:
    stage.now = "checking the arguments"
    shape = _input_shape(args.input_shape)
    kwargs = _kwargs(args.kwargs)
    target = _target_size(args.target_size, len(shape) - 2)
    pos = _position(args.pos)
    _check_layout(args.layout)
    _check_layers(args.layer)
    _check_combinations(args)
    if args.gif is not None and len(shape) == 5:
        raise _UsageError("--gif animates 1D and 2D inputs only; for a 3D input, draw single fields with --plot")
    pictures = {
        option: _checked_picture(option, path, _picture_formats(option))
        for option, path in (("--plot", args.plot), ("--gif", args.gif))
        if path is not None
    }
    stage.now = f"building the model ({args.target})"
    model = _model(args.target, kwargs)
    progress = _Progress(sys.stderr, enabled=not args.quiet)
    try:
        _probe_and_print(args, model, shape, pos, target, progress, stage, pictures)
    finally:
        progress.done()
    return 0


def _element(value: str | None) -> int | str | None:
    """``--element``: an index where it is an int, else a dict key."""
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return value


def _probe_and_print(args, model: nn.Module, shape, pos, target, progress: _Progress, stage: _Stage, pictures) -> None:
    layer = args.layer[0] if args.layer else None
    stage.now = f"probing {args.target}"
    with _probing(args, model, shape, pos):
        if args.table:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                rows = rf_table(
                    model, shape, layers=args.layer, mode=args.mode, progress=progress.layer, layout=args.layout
                )
            progress.done()
            _say_warnings(caught, args, model, shape, pos)
            text = _table_json(rows, target) if args.json else _table_text(args.target, shape, args.mode, rows, target)
        else:
            if pos == "all":
                progress.note(f"probing every position of the output map of {_where(layer)}")
            result = probe_rf(
                model, shape, pos, layer=layer, mode=args.mode, element=_element(args.element), layout=args.layout
            )
            progress.done()
            if isinstance(result, ReceptiveFieldMap):
                text = _map_json(result, target) if args.json else _map_text(args.target, result, target)
            else:  # the geometry is measured here, on first use
                text = _field_json(result, target) if args.json else _field_text(args.target, result, target)
    stage.now = "printing the results"
    print(text)
    sys.stdout.flush()  # a closed pipe fails here, inside main, and not at the interpreter's exit
    if args.plot:
        stage.now = f"writing --plot {args.plot}"
        with _writing("--plot", args.plot, pictures["--plot"]):
            from rf_callback.plotting import plot_rf

            plot_rf(result).savefig(args.plot)
    if args.gif:
        stage.now = f"writing --gif {args.gif}"
        progress.note(f"writing {args.gif}")
        with _writing("--gif", args.gif, pictures["--gif"]):
            from rf_callback.plotting import animate_rf

            animate_rf(model, shape, args.gif, layer=layer, mode=args.mode)


def _say_warnings(caught, args: argparse.Namespace, model: nn.Module, shape: tuple[int, ...], pos) -> None:
    """The table's own warnings as one line each in the command line's words; any other warning as it was."""
    for warning in caught:
        text = str(warning.message)
        if text.startswith("rf_table:"):
            print(f"{PROG}: warning: {_probe_message(text, args, model, shape, pos)}", file=sys.stderr)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


@contextmanager
def _probing(args: argparse.Namespace, model: nn.Module, shape: tuple[int, ...], pos) -> Iterator[None]:
    """Turns whatever the probe (or the model's own code) raises into one line that names the option at fault."""
    try:
        yield
    except ValueError as error:
        message = _probe_message(str(error), args, model, shape, pos)
        raise _UsageError(message if "--" in message else f"{_probed(args)} failed: {message}") from error
    except CopyError as error:
        raise _UsageError(_uncopyable_message(args.target, error.__cause__ or error)) from error
    except ProbeError as error:
        message = _probe_message(str(error), args, model, shape, pos)
        if "forward raised" in message:
            message += f"; check that the model runs on an input of shape {shape} (--input-shape, with a batch of 1)"
        raise _UsageError(f"{_probed(args)} failed: {message}") from error
    except SystemExit as exit_:
        raise _UsageError(
            f"{_probed(args)} failed: the model's code called sys.exit({exit_.code!r}) (raised SystemExit) while it "
            f"was probed; a forward must return a tensor, not end the program"
        ) from exit_
    except Exception as error:
        raise _UsageError(
            f"{_probed(args)} failed with {type(error).__name__}: {error}; check that the model runs on an input of "
            f"shape {shape} (--input-shape, with a batch of 1); if it does, this is a bug in {PROG}: rerun with "
            f"{TRACEBACK_VARIABLE}=1 for the traceback and report it"
        ) from error


def _probed(args: argparse.Namespace) -> str:
    layer = f" --layer {' --layer '.join(args.layer)}" if args.layer else ""
    return f"probing {args.target} with --input-shape {args.input_shape}{layer} --mode {args.mode}"


def _uncopyable_message(spec: str, error: BaseException) -> str:
    return (
        f"the model that {spec} returned cannot be deep-copied ({type(error).__name__}: {error}), and the probe "
        f"works on a copy so that the model is never changed; make the factory return a model that copy.deepcopy() "
        f"accepts (keep locks, open files and other unpicklable objects out of its modules, or define __deepcopy__)"
    )


def _probe_message(message: str, args: argparse.Namespace, model: nn.Module, shape: tuple[int, ...], pos) -> str:
    """The library's message in the command line's words: ``pos=(1, 2)`` becomes ``--pos 1,2``, and so on."""
    if message.startswith("input_shape=") or "forward raised" in message:
        mismatch = _rank_mismatch(model, args.input_shape, shape)
        if mismatch is not None:
            return mismatch
    layers = args.layer or []
    for name, option in (
        (f"input_shape={shape!r}", f"--input-shape {args.input_shape} (the input {shape}, with its batch axis)"),
        (f"pos={pos!r}", f"--pos {args.pos}"),
        (f"layers={list(layers)!r}", " ".join(f"--layer {name}" for name in layers)),
        *((f"layer={name!r}", f"--layer {name}") for name in layers),
        (f"mode={args.mode!r}", f"--mode {args.mode}"),
    ):
        message = message.replace(name, option, 1)
    message = re.sub(r"(?<![\w-])layout='([^']*)'", r"--layout \1", message)
    hints = {"layer": "--layer NAME", "layers": "--layer NAME (once per layer)", "pos": "--pos I,J",
             "input_shape": "--input-shape C,H,W", "mode": "--mode M", "layout": "--layout LAYOUT"}  # fmt: skip
    message = re.sub(
        r"(?<![\w-])(layers|layer|pos|input_shape|mode|layout)=(?=[\s,;.)]|$)", lambda m: hints[m[1]], message
    )
    # A shape in the library's words, (N, C, H, W), is C,H,W on the command line (the batch axis is implied).
    return re.sub(r"\(N, (C(?:, [A-Z])+)\)", lambda m: m[1].replace(" ", ""), message)


def _rank_mismatch(model: nn.Module, text: str, shape: tuple[int, ...]) -> str | None:
    """Says how ``--input-shape`` was read, when its spatial axes do not fit the model's first convolution."""
    first = next(((name, m) for name, m in model.named_modules() if isinstance(m, _ConvNd)), None)
    if first is None:
        return None
    name, conv = first
    takes, values = len(conv.kernel_size), list(shape[1:])
    given = len(values) - 1
    if takes == given or takes not in AXIS_NAMES:
        return None
    read = ", ".join(f"{axis}={value}" for axis, value in zip(("C", *axis_letters(given)), values))
    if len(values) >= takes:
        spatial = values[-takes:]
    else:
        spatial = values[1:] + values[-1:] * (takes - given)
    channels = conv.in_channels if conv.in_channels > 0 else "C"
    example = ",".join(map(str, (channels, *spatial)))
    if len(values) == takes:
        why = "; C (the channels) seems to be missing"
    elif len(values) == takes + 2 and values[0] == 1:
        why = "; leave out the batch axis, which the command adds"
    else:
        why = ""
    return (
        f"--input-shape {text} is read as {read} (channels first, no batch axis): it has {given} spatial axes, but "
        f"the convolution {name or '(the model)'} ({type(conv).__name__}), the model's first, takes {takes}: pass "
        f"{','.join(('C', *axis_letters(takes)))}, e.g. {example}{why}"
    )


@contextmanager
def _writing(option: str, path: str, existed: bool) -> Iterator[None]:
    """Turns a failure to draw or write a picture into one line; removes a partial file this command created."""
    try:
        yield
    except BaseException as error:
        if not existed:
            Path(path).unlink(missing_ok=True)
        if not isinstance(error, Exception):
            raise
        raise _UsageError(
            f"writing {option} {path!r} failed after the results above were printed: {type(error).__name__}: "
            f"{error}; choose another path or format (e.g. {option} {_example(option, path)}) and run again"
        ) from error


# --- arguments ------------------------------------------------------------------------------------------------


def _ints(text: str, option: str, what: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise _UsageError(f"{option} {text!r} is not {what}") from None


def _input_shape(text: str) -> tuple[int, ...]:
    what = "C,L or C,H,W or C,D,H,W: 2 to 4 positive ints separated by commas, without the batch"
    values = _ints(text, "--input-shape", what)
    if not 2 <= len(values) <= 4 or min(values) < 1:
        raise _UsageError(f"--input-shape {text!r} is not {what}")
    return (1, *values)


def _kwargs(text: str) -> dict[str, Any]:
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as error:
        raise _UsageError(f"--kwargs {text!r} is not JSON ({error})") from None
    if not isinstance(kwargs, dict):
        raise _UsageError(f"--kwargs {text!r} must be a JSON object of keyword arguments, like '{{\"channels\": 3}}'")
    return kwargs


def _target_size(text: str | None, n_axes: int) -> tuple[int, ...] | None:
    if text is None:
        return None
    what = f"a positive int, or {n_axes} separated by commas (one per spatial axis of the input)"
    values = _ints(text, "--target-size", what)
    if len(values) not in (1, n_axes) or min(values) < 1:
        raise _UsageError(f"--target-size {text!r} is not {what}")
    return tuple(values * n_axes if len(values) == 1 else values)


def _position(text: str | None) -> str | tuple[int, ...]:
    if text is None or text.strip() == "center":
        return "center"
    if text.strip() == "all":
        return "all"
    return tuple(_ints(text, "--pos", "'center', 'all' or output indices separated by commas (I,J)"))


def _check_layout(text: str) -> None:
    try:
        checked_layout(text)
    except ValueError:
        raise _UsageError(
            f"--layout {text!r} is not a layout: use channels_first (default: N,C,H,W), channels_last (N,H,W,C) or "
            f"tokens:HxW+P (tokens N,P+H*W,C on an H x W grid after P class or register tokens, e.g. tokens:14x14+1)"
        ) from None


def _check_layers(layers: list[str] | None) -> None:
    for name in layers or []:
        if not name or any(not part for part in name.split(".")):
            raise _UsageError(
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
                raise _UsageError(
                    f"{option} applies to one probe; --table lists the field at the centre of every layer"
                )
    elif args.layer and len(args.layer) > 1:
        raise _UsageError(f"--layer is given {len(args.layer)} times; one probe takes one layer (or use --table)")
    if args.gif is not None and args.layout != CHANNELS_FIRST:
        raise _UsageError(
            f"--gif sweeps channels-first output maps only, not --layout {args.layout}; draw single fields with --pos "
            f"I,J --plot FILE.png"
        )
    if args.plot is not None and args.pos is not None and args.pos.strip() == "all":
        raise _UsageError("--plot draws one field; with --pos all use --gif, or give --pos I,J or center")


def _picture_formats(option: str) -> tuple[str, ...]:
    """The file extensions ``option`` writes: matplotlib's for ``--plot`` (no pyplot state), GIF for ``--gif``."""
    if option == "--gif":
        return ("gif",)
    from matplotlib.backend_bases import FigureCanvasBase

    return tuple(sorted(FigureCanvasBase.get_supported_filetypes()))


def _example(option: str, path: str) -> str:
    stem = Path(path).stem or "rf"
    return f"{stem}.gif" if option == "--gif" else f"{stem}.png"


def _checked_picture(option: str, path: str, formats: tuple[str, ...]) -> bool:
    """Checks that ``path`` can be written in a format ``option`` knows, before anything is probed.

    Returns:
        Whether the file existed before (a new file left half-written by a failure is removed).
    """
    target = Path(path)
    if path and target.is_dir():
        raise _UsageError(
            f"{option} {path!r} is a folder; give a file name in it, e.g. {option} {target / _example(option, '')}"
        )
    suffix = target.suffix.lower().lstrip(".")
    if suffix not in formats:
        found = f"ends in {target.suffix!r}" if target.suffix else "has no file extension"
        if option == "--gif":
            allowed, also = ".gif (the sweep is an animated GIF)", "; for a single picture use --plot"
        else:
            allowed, also = f"one of matplotlib's picture formats ({', '.join(f'.{f}' for f in formats)})", ""
        raise _UsageError(
            f"{option} {path!r} must end in {allowed}, but it {found}: use e.g. {option} {_example(option, path)}{also}"
        )
    folder = target.parent
    if not folder.exists():
        raise _UsageError(
            f"{option} {path!r} is in a folder that does not exist: {str(folder)!r}; create it first or choose "
            f"another path"
        )
    if not folder.is_dir():
        raise _UsageError(
            f"{option} {path!r} is in {str(folder)!r}, which is a file, not a folder; choose another path"
        )
    existed = target.exists()
    try:
        with open(target, "ab"):
            pass
    except OSError as error:
        raise _UsageError(
            f"{option} {path!r} cannot be written ({error.strerror or error}); choose a path in a folder you can "
            f"write to"
        ) from None
    if not existed:
        target.unlink(missing_ok=True)
    return existed


# --- the model ------------------------------------------------------------------------------------------------


def _model(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    module_name, _, attribute = spec.rpartition(":")
    if not module_name or not attribute:
        raise _UsageError(f"{spec!r} is not MODULE:CALLABLE (e.g. my_package.models:resnet or net.py:build)")
    module = _import(module_name)
    factory: Any = module
    for part in attribute.split("."):
        if not hasattr(factory, part):
            raise _UsageError(f"cannot import {attribute!r} from module {module_name!r}: it has no attribute {part!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise _UsageError(f"{spec!r} is a {type(factory).__name__}, not a callable that builds a model")
    try:
        model = factory(**kwargs)
    except Exception as error:
        raise _UsageError(
            f"calling {spec}(**{kwargs!r}) raised {type(error).__name__}: {error}; fix the factory or its --kwargs"
        ) from error
    except SystemExit as exit_:
        raise _UsageError(
            f"calling {spec}(**{kwargs!r}) raised SystemExit({exit_.code!r}): the factory called sys.exit() (as "
            f"argparse does on a command line it cannot parse) instead of returning a model; make it take its "
            f"settings as arguments and pass them with --kwargs"
        ) from None
    if not isinstance(model, nn.Module):
        raise _UsageError(f"{spec}(**{kwargs!r}) returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _import(name: str):
    """Imports a dotted module (from the current directory first) or a ``.py`` file, naming it on failure."""
    is_file = name.endswith(".py") or os.sep in name or (os.altsep is not None and os.altsep in name)
    try:
        if is_file:
            return _import_file(name)
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        return importlib.import_module(name)
    except _UsageError:
        raise
    except ModuleNotFoundError as error:
        if error.name and (name == error.name or name.startswith(f"{error.name}.")):
            raise _UsageError(f"cannot import module {name!r}: no module named {error.name!r}") from None
        raise _UsageError(f"importing module {name!r} failed: {error}") from None
    except SystemExit as exit_:
        raise _UsageError(
            f"importing module {name!r} raised SystemExit({exit_.code!r}): its code calls sys.exit() when imported; "
            f"put the script part under if __name__ == '__main__':"
        ) from None
    except Exception as error:
        raise _UsageError(f"importing module {name!r} raised {type(error).__name__}: {error}") from error


def _import_file(path: str):
    file = Path(path)
    if not file.is_file():
        raise _UsageError(f"cannot import module {path!r}: no such file")
    # The file's folder goes first on sys.path so that it can import its neighbours, as `python file.py` would.
    folder = str(file.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = file.stem if file.stem.isidentifier() and file.stem not in sys.modules else "_rf_probe_target"
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise _UsageError(f"cannot import module {path!r}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


# --- output ---------------------------------------------------------------------------------------------------


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


def _where(layer: str | None) -> str:
    return f"layer {layer!r}" if layer else "the model"


def _axes(values: Sequence[Any]) -> str:
    return " x ".join("-" if v is None else str(v) for v in values)


def _layout_note(layout) -> str:
    return "" if layout == CHANNELS_FIRST else f", read as {layout}"


def _covers(size: Sequence[int], target: Sequence[int]) -> bool:
    return all(s >= t for s, t in zip(size, target))


def _input_note(input_shape: Sequence[int], target: Sequence[int]) -> str:
    spatial = input_shape[2:]
    if any(t > n for t, n in zip(target, spatial)):
        return f"; it is larger than the input ({_axes(spatial)}), so no field on it can cover it"
    return ""


def _lines(pairs: list[tuple[str, str]]) -> str:
    return "\n".join(f"{key:<10}{value}" for key, value in pairs)


def _field_text(spec: str, field: ReceptiveField, target: tuple[int, ...] | None) -> str:
    pairs = [
        ("model", spec),
        ("input", str(tuple(field.input_shape))),
        ("layer", field.layer or "(model output)"),
        ("output", f"{_axes(field.output_shape)} ({field.mode}{_layout_note(field.layout)})"),
        ("position", str(field.position)),
        ("size", _axes(field.size)),
        ("bounds", ", ".join(f"{first}..{last}" for first, last in field.bounds)),
        ("stride", _axes(field.stride)),
        ("offset", _axes(field.offset)),
        ("span", ", ".join(f"{first}..{last}" for first, last in field.span)),
        ("center", ", ".join(f"{c:g}" for c in field.center)),
    ]
    if target is not None:
        verdict = "covered" if _covers(field.size, target) else f"not covered by this {_axes(field.size)} field"
        pairs.append(("target", f"{_axes(target)}: {verdict}{_input_note(field.input_shape, target)}"))
    text = _lines(pairs)
    if any(s is None for s in field.stride):
        text += "\n(-: no single stride describes the fields on this axis, e.g. an upsampling path)"
    return text


def _field_json(field: ReceptiveField, target: tuple[int, ...] | None) -> str:
    record = field.to_dict()
    if target is not None:
        record.update(target_size=list(target), covers_target=_covers(field.size, target))
    return json.dumps(record)


def _map_text(spec: str, fmap: ReceptiveFieldMap, target: tuple[int, ...] | None) -> str:
    sizes = fmap.size.reshape(-1, len(fmap.input_shape) - 2)
    geometry = fmap.geometry
    pairs = [
        ("model", spec),
        ("input", str(tuple(fmap.input_shape))),
        ("layer", fmap.layer or "(model output)"),
        ("output", f"{_axes(fmap.output_shape)} ({fmap.mode}{_layout_note(fmap.layout)}), {len(fmap)} positions"),
        ("size", f"{_axes(sizes.min(dim=0).values.tolist())} to {_axes(sizes.max(dim=0).values.tolist())}"),
        ("full size", _axes([None if g is None else g.size for g in geometry])),
        ("stride", _axes([None if g is None else g.stride for g in geometry])),
        ("offset", _axes([None if g is None else g.offset for g in geometry])),
    ]
    if target is not None:
        covering = _covering_count(fmap, target)
        pairs.append(
            ("target", f"{_axes(target)}: covered at {covering} of {len(fmap)} positions"
             f"{_input_note(fmap.input_shape, target)}")
        )  # fmt: skip
    return _lines(pairs)


def _covering_count(fmap: ReceptiveFieldMap, target: tuple[int, ...]) -> int:
    sizes = fmap.size.reshape(-1, len(target))
    return int((sizes >= sizes.new_tensor(target)).all(dim=1).sum())


def _map_json(fmap: ReceptiveFieldMap, target: tuple[int, ...] | None) -> str:
    record = fmap.to_dict()
    if target is not None:
        record.update(target_size=list(target), positions_covering_target=_covering_count(fmap, target))
    return json.dumps(record)


def _table_text(
    spec: str, shape: tuple[int, ...], mode: str, rows: list[LayerField], target: tuple[int, ...] | None
) -> str:
    header = ("layer", "type", "output", "size", "full size", "stride", "offset", "")
    cells = [
        (r.name, r.module_type, _axes(r.output_shape), _axes(r.size), _axes(r.full_size), _axes(r.stride),
         _axes(r.offset), "*" if r.covers_input else "")
        for r in rows
    ]  # fmt: skip
    if any(r.layout != CHANNELS_FIRST for r in rows):  # how each output was read, after its shape
        header = (*header[:3], "layout", *header[3:])
        cells = [(*c[:3], r.layout, *c[3:]) for c, r in zip(cells, rows)]
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
    lines = [f"{spec} on input {shape}, field at the centre of each layer's output ({mode}):"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *cells]]
    if any(r.covers_input for r in rows):
        lines.append(
            "* the field spans the whole input (size: the inputs it sees; full size: its unclipped size r): later "
            "layers on this path cannot see more of this input"
        )
    if any(s is None for r in rows for s in r.stride):
        lines.append("- no single stride describes the fields on this axis (e.g. an upsampling path)")
    if target is not None:
        first = next((r for r in rows if _covers(r.size, target)), None)
        if first is None:
            largest = max(rows, key=lambda r: math.prod(r.size), default=None)
            where = f" (largest: {_axes(largest.size)} at {largest.name})" if largest else ""
            lines.append(f"target {_axes(target)}: no layer covers it{where}{_input_note(shape, target)}")
        else:
            lines.append(f"target {_axes(target)}: first covered by {first.name} ({first.module_type}, field "
                         f"{_axes(first.size)})")  # fmt: skip
    return "\n".join(lines)


def _table_json(rows: list[LayerField], target: tuple[int, ...] | None) -> str:
    records = [row.to_dict() for row in rows]
    if target is not None:
        for record, row in zip(records, rows):
            record["covers_target"] = _covers(row.size, target)
    return json.dumps(records)


if __name__ == "__main__":
    raise SystemExit(main())
