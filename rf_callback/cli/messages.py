"""What the probe (or the model's own code) raises, said in the command line's words: the option at fault, the fix."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from rf_callback.cli.errors import PROG, TRACEBACK_VARIABLE, UsageError
from rf_callback.core.graph import first_convolution_run
from rf_callback.core.layouts import AXIS_NAMES, axis_letters
from rf_callback.core.model_copy import CopyError
from rf_callback.core.probe import ProbeError


@contextmanager
def probing(
    args: argparse.Namespace, model: nn.Module, shape: tuple[int, ...], pos: str | tuple[int, ...]
) -> Iterator[None]:
    """Turns whatever the probe (or the model's own code) raises into one line that names the option at fault.

    Args:
        args: the parsed command line.
        model: the model being probed.
        shape: the input shape, with its batch axis.
        pos: the checked ``--pos``.

    Yields:
        Nothing: the body probes the model.

    Raises:
        UsageError: the body raised an ``Exception`` or ``SystemExit``; an interrupt is raised as it was.
    """
    try:
        yield
    except ValueError as error:
        message = probe_message(str(error), args, model, shape, pos)
        raise UsageError(message if "--" in message else f"{_probed(args)} failed: {message}") from error
    except CopyError as error:
        raise UsageError(_uncopyable_message(args.target, error.__cause__ or error)) from error
    except ProbeError as error:
        message = probe_message(str(error), args, model, shape, pos)
        if "forward raised" in message:
            message += f"; check that the model runs on an input of shape {shape} (--input-shape, with a batch of 1)"
        raise UsageError(f"{_probed(args)} failed: {message}") from error
    except SystemExit as exit_:
        raise UsageError(
            f"{_probed(args)} failed: the model's code called sys.exit({exit_.code!r}) (raised SystemExit) while it "
            f"was probed; a forward must return a tensor, not end the program"
        ) from exit_
    except Exception as error:
        raise UsageError(
            f"{_probed(args)} failed with {type(error).__name__}: {error}; check that the model runs on an input of "
            f"shape {shape} (--input-shape, with a batch of 1); if it does, this is a bug in {PROG}: rerun with "
            f"{TRACEBACK_VARIABLE}=1 for the traceback and report it"
        ) from error


def probe_message(
    message: str, args: argparse.Namespace, model: nn.Module, shape: tuple[int, ...], pos: str | tuple[int, ...]
) -> str:
    """The library's message in the command line's words: ``pos=(1, 2)`` becomes ``--pos 1,2``, and so on.

    Args:
        message: a message of the probe or of ``rf_table`` (an error's or a warning's).
        args: the parsed command line.
        model: the model being probed.
        shape: the input shape, with its batch axis.
        pos: the checked ``--pos``.

    Returns:
        The message with each argument of the library named as its option; where ``--input-shape`` does not fit
        the model's first convolution, a message that says how it was read instead.
    """
    if message.startswith("input_shape=") or "forward raised" in message:
        mismatch = _rank_mismatch(model, args.input_shape, shape)
        if mismatch is not None:
            return mismatch
    layers = args.layer or []
    for name, option in (
        (f"input_shape={shape!r}", f"--input-shape {args.input_shape} (the input {shape}, with its batch axis)"),
        (f"pos={pos!r}", f"--pos {args.pos or 'center'}"),  # not given: the centre
        (f"layers={list(layers)!r}", " ".join(f"--layer {name}" for name in layers)),
        *((f"layer={name!r}", f"--layer {name}") for name in layers),
    ):
        message = message.replace(name, option, 1)
    message = re.sub(r"(?<![\w-])(layout|mode)='([^']*)'", r"--\1 \2", message)  # mode='theoretical' as a fix too
    message = re.sub(r"(?<![\w-])element=(?=[\s,;.)]|$)", "--element INDEX|KEY", message)
    message = re.sub(r"(?<![\w-])element=(-?\d+|'[^']*'|None)", r"--element \1", message)
    hints = {"layer": "--layer NAME", "layers": "--layer NAME (once per layer)", "pos": "--pos I,J",
             "input_shape": "--input-shape C,H,W", "mode": "--mode M", "layout": "--layout LAYOUT"}  # fmt: skip
    message = re.sub(
        r"(?<![\w-])(layers|layer|pos|input_shape|mode|layout)=(?=[\s,;.)]|$)", lambda m: hints[m[1]], message
    )
    # A shape in the library's words, (N, C, H, W), is C,H,W on the command line (the batch axis is implied).
    return re.sub(r"\(N, (C(?:, [A-Z])+)\)", lambda m: m[1].replace(" ", ""), message)


def _probed(args: argparse.Namespace) -> str:
    layer = f" --layer {' --layer '.join(args.layer)}" if args.layer else ""
    return f"probing {args.target} with --input-shape {args.input_shape}{layer} --mode {args.mode}"


def _uncopyable_message(spec: str, error: BaseException) -> str:
    return (
        f"the model that {spec} returned cannot be deep-copied ({type(error).__name__}: {error}), and the probe "
        f"works on a copy so that the model is never changed; make the factory return a model that copy.deepcopy() "
        f"accepts (keep locks, open files and other unpicklable objects out of its modules, or define __deepcopy__)"
    )


def _rank_mismatch(model: nn.Module, text: str, shape: tuple[int, ...]) -> str | None:
    """Says how ``--input-shape`` was read, when its spatial axes do not fit the model's first convolution."""
    first = first_convolution_run(model, shape)
    if first is None:
        return None
    name, conv = first
    takes, values = len(conv.kernel_size), list(shape[1:])
    given = len(values) - 1
    if takes == given or takes not in AXIS_NAMES:
        return None
    read = ", ".join(f"{axis}={value}" for axis, value in zip(("C", *axis_letters(given)), values))
    # "3,40" for a Conv2d taking 3 channels is C and one spatial axis, not H and W without C.
    channels_given = len(values) == takes and values[0] == conv.in_channels
    if len(values) >= takes and not channels_given:
        spatial = values[-takes:]
    else:
        spatial = values[1:] + values[-1:] * (takes - given)
    channels = conv.in_channels if conv.in_channels > 0 else "C"
    example = ",".join(map(str, (channels, *spatial)))
    if channels_given:
        why = "; a spatial axis seems to be missing"
    elif len(values) == takes:
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
