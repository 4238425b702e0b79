"""RFCallback's arguments, checked at construction: each refusal names the argument, its value and the fix."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, SupportsInt, cast

import numpy as np
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from rf_callback.core.arguments import as_index, positions_of_index_columns


def _shown(value) -> str:
    """``repr(value)``, short: a module by its class, a long repr cut."""
    if isinstance(value, nn.Module):
        return f"<{type(value).__name__} module>"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def refused(name: str, value, allowed: str, fix: str = "") -> MisconfigurationException:
    """A MisconfigurationException naming the argument, its value, what is allowed and the fix."""
    text = f"RFCallback({name}={_shown(value)}): {name} must be {allowed}"
    return MisconfigurationException(f"{text}; {fix}" if fix else text)


def _int_fix(name: str, value, example) -> str:
    """How to write ``value`` as the int it may have meant."""
    if isinstance(value, (bool, np.bool_)):
        return f"a bool is not a number here; pass an int, e.g. {name}={example}"
    if as_index(value) is not None:  # an int out of range
        return f"e.g. {name}={example}"
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return f"pass the int, not a str: {name}={int(value)}"
    if isinstance(value, numbers.Real) and float(value).is_integer():
        return f"pass {name}={_whole(value)}"
    return f"e.g. {name}={example}"


def _whole(value: numbers.Real) -> int:
    """``int(value)``: every concrete ``Real`` (float, Fraction, numpy floats) has ``__int__``, which the ABC lacks."""
    return int(cast(SupportsInt, value))


def checked_count(name: str, value, meaning: str, example: int) -> int:
    """``value`` as an int >= 1."""
    number = as_index(value)
    if number is None or number < 1:
        allowed = f"an int >= 1 ({meaning}; numpy and torch integers are accepted)"
        raise refused(name, value, allowed, _int_fix(name, value, example))
    return number


def checked_seed(seed) -> int:
    """``seed`` as an int."""
    number = as_index(seed)
    if number is None or not -(2**63) <= number < 2**64:
        allowed = "an int in torch.Generator's range [-2**63, 2**64) (numpy and torch integers are accepted)"
        raise refused("seed", seed, allowed, _int_fix("seed", seed, 0))
    return number


def checked_flag(name: str, value) -> bool:
    """``value`` after checking it is a bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise refused(name, value, "True or False", f"e.g. {name}=True")
    return bool(value)


def checked_choice(name: str, value, choices: tuple[str, ...]) -> str:
    """``value`` after checking it is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise refused(name, value, f"one of {choices}", f"e.g. {name}={choices[0]!r}")
    return value


def checked_mass(value) -> float:
    """``value`` as a float in (0, 1]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not 0 < float(value) <= 1:
        allowed = "a mass fraction q with 0 < q <= 1 (the share of the gradient mass the effective extent holds)"
        raise refused("coverage_mass", value, allowed, "e.g. coverage_mass=0.95")
    return float(value)


def checked_name(name: str, value) -> str | None:
    """``value`` after checking it is a dotted submodule name (a str) or None."""
    if value is None or (isinstance(value, str) and value):
        return value
    default = "None for the model's output" if name == "layer" else "None to probe the whole LightningModule"
    allowed = f"a dotted submodule name (a str, as in model.named_modules(), e.g. 'backbone.layer4'), or {default}"
    if isinstance(value, nn.Module):
        fix = "pass the module's name from model.named_modules(), not the module object"
    elif as_index(value) is not None:
        fix = f"pass {name}={str(value)!r} (a str) for the child named {value}, as in a Sequential"
    elif value == "":
        fix = f"an empty name names nothing; pass {name}=None"
    else:
        fix = f"got {type(value).__name__}"
    raise refused(name, value, allowed, fix)


def checked_input_shape(input_shape) -> tuple[int, ...] | None:
    """``input_shape`` as a tuple of ints ``(N, C, *spatial)``, or None."""
    if input_shape is None:
        return None
    sequence = isinstance(input_shape, (Sequence, np.ndarray)) and not isinstance(input_shape, str)
    dims = [as_index(v) for v in input_shape] if sequence else []
    sizes = [d for d in dims if d is not None and d >= 1]
    if not 3 <= len(dims) <= 5 or len(sizes) != len(dims):
        allowed = "(N, C, L), (N, C, H, W) or (N, C, D, H, W) with positive ints, or None"
        fix = "to take it from example_input_array or a batch"
        if sequence and 1 <= len(dims) <= 3 and len(sizes) == len(dims):
            fix = f"the batch and channel axes come first, e.g. input_shape={(1, 3, *sizes[-2:])}"
        raise refused("input_shape", input_shape, allowed, fix)
    return tuple(sizes)


def checked_target(target_size) -> tuple[int, ...] | None:
    """``target_size`` as a tuple of positive ints (one, or one per axis), or None."""
    if target_size is None:
        return None
    single = as_index(target_size)
    values: list[int | None]
    if single is not None:
        values = [single]
    elif isinstance(target_size, (Sequence, np.ndarray)) and not isinstance(target_size, str):
        values = [as_index(v) for v in target_size]
    else:
        values = []
    sizes = [v for v in values if v is not None and v >= 1]
    if not 1 <= len(values) <= 3 or len(sizes) != len(values):
        allowed = "a positive int, or one per spatial axis (input pixels or samples; numpy integers accepted), or None"
        fix = "e.g. target_size=32 or target_size=(32, 48)"
        if isinstance(target_size, (Sequence, np.ndarray)) and not isinstance(target_size, str):
            whole = [float(v) for v in target_size if isinstance(v, numbers.Real) and float(v).is_integer()]
            if 1 <= len(whole) == len(target_size) <= 3 and all(v > 0 for v in whole):
                fix = f"pass target_size={tuple(int(v) for v in whole)}"
        elif isinstance(target_size, numbers.Real) and float(target_size).is_integer() and float(target_size) > 0:
            fix = f"pass target_size={_whole(target_size)}"
        raise refused("target_size", target_size, allowed, fix)
    return tuple(sizes)


_POS_ALLOWED = "an index tuple into the output map (an int for 1D), a list of index tuples, or 'center'"


def checked_positions(pos) -> tuple[list, Any]:
    """The positions to probe, and ``pos`` with Python ints (so ``state_key`` reads the same for numpy integers)."""
    if isinstance(pos, str):
        if pos == "center":
            return ["center"], pos
        fix = "pos='all' is for probe_rf; the callback logs a few positions" if pos == "all" else "e.g. pos='center'"
        raise refused("pos", pos, _POS_ALLOWED, fix)
    if isinstance(pos, (np.ndarray, torch.Tensor)):
        pos = pos.tolist()
    try:  # np.nonzero(mask): one array of indices per axis, read as probe_rf reads it
        columns = positions_of_index_columns(pos)
    except ValueError as error:
        raise refused("pos", pos, _POS_ALLOWED, str(error)) from None
    if columns is not pos:
        rows = [tuple(p.tolist()) for p in pos]
        if [tuple(c) for c in columns] == rows:
            # Read as rows before (one position per array): where that names the same cells, the same spelling, so
            # a checkpoint's state_key still finds its state.
            return rows, tuple(list(r) for r in rows)
        pos = columns
    index = as_index(pos)
    if index is not None:
        return [(index,)], index
    if isinstance(pos, Sequence) and len(pos) > 0:
        nested = [
            isinstance(p, Sequence) and not isinstance(p, str) or getattr(p, "ndim", 0) > 0  # a 0-d tensor: an index
            for p in pos
        ]
        if not any(nested):
            indices = _indices(pos, pos)
            if isinstance(pos, tuple):
                return [indices], indices
            # A list of ints is one position, or, on a 1D map, as many positions (as probe_rf reads it).
            return [list(indices)], list(indices)
        if all(nested):
            fields = [_indices(list(p) if not isinstance(p, Sequence) else p, pos) for p in pos]
            same = [f if isinstance(p, tuple) else list(f) for p, f in zip(pos, fields)]
            return fields, tuple(same) if isinstance(pos, tuple) else same
    raise refused("pos", pos, _POS_ALLOWED, "e.g. pos=(4, 4) or pos=[(0, 0), (4, 4)]")


def _indices(entries, pos) -> tuple[int, ...]:
    indices = tuple(as_index(i) for i in entries)
    whole = tuple(i for i in indices if i is not None)
    if len(indices) == 0 or len(whole) != len(indices):
        bad = next((e for e, i in zip(entries, indices) if i is None), None)
        if isinstance(bad, numbers.Real) and not isinstance(bad, (bool, np.bool_)) and float(bad).is_integer():
            fix = f"{bad!r} is a float, but positions are integer indices; pass pos={tuple(int(e) for e in entries)}"
        else:
            fix = f"{bad!r} is not an integer index" if indices else "an empty index tuple names no position"
        raise refused("pos", pos, _POS_ALLOWED, fix)
    return whole


def target_per_axis(
    target_size: tuple[int, ...] | None, n_axes: int, input_shape: Sequence[int]
) -> tuple[int, ...] | None:
    """The target size per spatial axis: one size for every axis, or one per axis.

    Args:
        target_size: the checked ``target_size`` (see :func:`checked_target`), or ``None``.
        n_axes: the number of spatial axes of the input.
        input_shape: the input's shape, for the message.

    Returns:
        ``n_axes`` sizes, or ``None`` without a target.

    Raises:
        MisconfigurationException: ``target_size`` has neither one entry nor one per axis.
    """
    if target_size is None:
        return None
    if len(target_size) not in (1, n_axes):
        raise MisconfigurationException(
            f"RFCallback(target_size={target_size!r}): target_size must be one int or {n_axes} (one per spatial axis "
            f"of the input, shaped {tuple(input_shape)}); pass target_size={target_size[0]} or a tuple of {n_axes}"
        )
    return target_size * n_axes if len(target_size) == 1 else target_size
