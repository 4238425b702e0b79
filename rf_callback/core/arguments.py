"""Arguments checked at the door: each error names the argument, the value, what is allowed and how to fix it."""

from __future__ import annotations

import operator
import re

import numpy as np
import torch

from rf_callback.core.layouts import LAYOUTS, Tokens
from rf_callback.core.model_copy import MODES


def as_index(value) -> int | None:
    """``value`` as a Python int when it is an integer (numpy and torch integers included, bools not), else None."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, torch.Tensor) and (value.dim() != 0 or value.dtype == torch.bool or not _integral(value)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _integral(tensor: torch.Tensor) -> bool:
    return not (tensor.is_floating_point() or tensor.is_complex())


def positions_of_index_columns(pos):
    """``pos`` as a list of positions where it is a tuple of index arrays, one per axis; else ``pos`` as it is.

    ``np.nonzero(mask)``, ``np.where(mask)`` and ``torch.nonzero(mask, as_tuple=True)`` give such a tuple: the n-th
    position takes the n-th index of every array.

    Args:
        pos: a ``pos=`` argument as the user passed it.

    Returns:
        A list of positions (lists of ints), or ``pos`` unchanged.

    Raises:
        ValueError: the arrays are empty, or differ in length (some indices would belong to no position).
    """
    if not (isinstance(pos, tuple) and pos and all(_index_column(p) for p in pos)):
        return pos
    columns = [p.tolist() for p in pos]
    lengths = [len(column) for column in columns]
    if not any(lengths):
        raise ValueError(
            "pos is a tuple of empty index arrays (as np.nonzero gives for a mask with no True cell): it names no "
            "position; pick at least one cell, e.g. pos=(0, 0)"
        )
    if len(set(lengths)) > 1:
        raise ValueError(
            f"pos is a tuple of index arrays, one per axis (as np.nonzero gives), of lengths {lengths}: each position "
            f"takes one index from every array, so they must be as long; pass arrays of equal length, or a list of "
            f"positions, e.g. pos=[(0, 0), (4, 4)]"
        )
    return [list(position) for position in zip(*columns)]


def _index_column(value) -> bool:
    """A 1-D tensor or numpy array of integer indices (one axis of an index tuple)."""
    if isinstance(value, torch.Tensor):
        return value.dim() == 1 and not value.is_floating_point() and value.dtype != torch.bool
    return type(value).__module__ == "numpy" and getattr(value, "ndim", 0) == 1 and value.dtype.kind in ("i", "u")


def checked_int(name: str, value, *, minimum: int | None = None, below: int | None = None, meaning: str = "") -> int:
    """Returns ``value`` as an int after checking it is an integer of at least ``minimum`` and less than ``below``.

    Raises:
        ValueError: it is not (a bool, a float, a string), or it is outside that range.
    """
    index = as_index(value)
    if index is None or (minimum is not None and index < minimum) or (below is not None and index >= below):
        bound = "" if minimum is None else f" >= {minimum}"
        bound += "" if below is None else f"{' and' if bound else ''} < {below}"
        fix = f" ({meaning})" if meaning else ""
        raise ValueError(f"{name}={value!r} must be an int{bound}{fix}; got {type(value).__name__}")
    return index


def checked_input_shape(input_shape) -> tuple[int, ...]:
    """Returns ``input_shape`` as a tuple of ints after checking it is ``(N, C, *spatial)`` with 1 to 3 axes.

    Raises:
        ValueError: it is not.
    """
    allowed = "a sequence (N, C, L), (N, C, H, W) or (N, C, D, H, W) of positive ints"
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise ValueError(f"input_shape={input_shape!r} is not {allowed}") from None
    if not 3 <= len(shape) <= 5 or min(shape) < 1 or any(s != v for s, v in zip(shape, input_shape)):
        raise ValueError(f"input_shape={input_shape!r} is not {allowed}")
    return shape


def checked_mode(mode) -> str:
    """Returns ``mode`` after checking it is a probe mode.

    Raises:
        ValueError: it is not one of :data:`MODES`.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not a probe mode; use one of {MODES}")
    return mode


def checked_dtype(dtype) -> torch.dtype | None:
    """Returns ``dtype`` after checking it is a floating torch dtype or None.

    Raises:
        ValueError: it is not.
    """
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(
            f"dtype={dtype!r} must be a floating torch dtype (torch.float32 or torch.float64; gradients need floats), "
            f"or None for float32 with a float64 retry near underflow"
        )
    return dtype


def checked_device(device, name: str = "device") -> torch.device | None:
    """Returns ``device`` as a ``torch.device`` (or None) after checking it names one this torch knows.

    Raises:
        ValueError: it is not a device name (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...), a ``torch.device`` or None.
    """
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"{name}={device!r} is not a device: pass a device name ('cpu', 'cuda', 'cuda:1', ...), a torch.device, or "
            f"None for the model's own device"
        ) from None


def checked_layer(layer) -> str | None:
    """Returns ``layer`` after checking it is a dotted submodule name or None (existence is checked on the model).

    Raises:
        ValueError: it is not a str.
    """
    if layer is not None and not isinstance(layer, str):
        raise ValueError(
            f"layer={layer!r} must be a dotted submodule name (a str, as in model.named_modules(), e.g. "
            f"'layer4' or 'features.7'), or None for the model's output; got {type(layer).__name__}"
        )
    return layer


def checked_element(element) -> int | str | None:
    """Returns ``element`` after checking it is an index (int), a key (str) or None.

    Raises:
        ValueError: it is something else.
    """
    if element is None or isinstance(element, str):
        return element
    index = as_index(element)
    if index is None:
        raise ValueError(
            f"element={element!r} must be an int (the index in a tuple or list output), a str (the key in a dict "
            f"output) or None (the output is a tensor)"
        )
    return index


_TOKENS = re.compile(r"tokens:(\d+(?:x\d+){0,2})(?:\+(\d+))?")


def checked_layout(layout) -> str | Tokens:
    """Returns ``layout`` read as a layout: ``"channels_first"``, ``"channels_last"`` or a :class:`Tokens`.

    The string form of tokens, ``"tokens:HxW"`` or ``"tokens:HxW+P"`` (``P`` leading class or register tokens), is
    read as ``Tokens(grid=(H, W), prefix=P)``. Callers keep the value as given, for messages in the user's words.

    Raises:
        ValueError: it is none of these.
    """
    if isinstance(layout, Tokens) or (isinstance(layout, str) and layout in LAYOUTS):
        return layout
    match = _TOKENS.fullmatch(layout) if isinstance(layout, str) else None
    grid = tuple(int(n) for n in match[1].split("x")) if match else ()
    if match is not None and grid and min(grid) > 0:
        return Tokens(grid, int(match[2] or 0))
    raise ValueError(
        f"layout={layout!r} is not a layout of the probed output; use 'channels_first' ((N, C, *spatial), the "
        f"default), 'channels_last' ((N, *spatial, C)), or tokens on a grid (N, P + H*W, C): "
        f"Tokens(grid=(H, W), prefix=P) or its string form 'tokens:HxW+P', e.g. 'tokens:14x14+1' for a ViT's 14 x 14 "
        f"patch tokens after one class token"
    )
