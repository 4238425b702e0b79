"""How a probed output lays out its axes: channels first, channels last, or tokens on a grid."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

CHANNELS_FIRST = "channels_first"
CHANNELS_LAST = "channels_last"
LAYOUTS = (CHANNELS_FIRST, CHANNELS_LAST)
# The spatial axes of a 1D, 2D and 3D input, as logged names (lower case) and shapes in messages (upper case) say them.
AXIS_NAMES = {1: ("l",), 2: ("h", "w"), 3: ("d", "h", "w")}


def axis_letters(axes: int) -> tuple[str, ...]:
    """The letters of ``axes`` spatial axes in the shapes messages show: ``("H", "W")`` for 2.

    Args:
        axes: 1, 2 or 3.

    Returns:
        The upper-case :data:`AXIS_NAMES`.
    """
    return tuple(name.upper() for name in AXIS_NAMES[axes])


@dataclass(frozen=True)
class Tokens:
    """A token output ``(N, L, C)`` whose last ``L - prefix`` tokens lie on ``grid``, row-major (a ViT's output).

    The probe drops the ``prefix`` leading tokens (class and register tokens) and reads the others as the feature
    map ``(N, C, *grid)``; positions are given on the grid. The string form ``"tokens:14x14+1"`` (or
    ``"tokens:14x14"`` without prefix tokens) means the same, for the command line and YAML files.

    Attributes:
        grid: the shape of the grid of patch tokens, one length per spatial axis of the input (an int in 1D), e.g.
            ``(14, 14)`` for a ViT-B/16 at 224 x 224.
        prefix: how many leading tokens are not on the grid (1 for a class token, 1 + 4 with four registers).

    Raises:
        ValueError: ``grid`` is not 1 to 3 positive ints, or ``prefix`` is not an int >= 0.
    """

    grid: tuple[int, ...]
    prefix: int = 0

    def __post_init__(self):
        grid = (self.grid,) if _index(self.grid) is not None else self.grid
        lengths = [_index(n) for n in grid] if isinstance(grid, Sequence) and not isinstance(grid, str) else []
        if not 1 <= len(lengths) <= 3 or any(n is None or n < 1 for n in lengths):
            raise ValueError(
                f"Tokens(grid={self.grid!r}): grid must be 1 to 3 positive ints, the lengths of the token grid per "
                f"spatial axis, e.g. Tokens(grid=(14, 14), prefix=1)"
            )
        prefix = _index(self.prefix)
        if prefix is None or prefix < 0:
            raise ValueError(
                f"Tokens(prefix={self.prefix!r}): prefix must be an int >= 0, the number of leading class or register "
                f"tokens that are not on the grid"
            )
        object.__setattr__(self, "grid", tuple(lengths))
        object.__setattr__(self, "prefix", prefix)

    @property
    def tokens(self) -> int:
        """How many tokens the output holds: ``prefix + prod(grid)``."""
        return self.prefix + math.prod(self.grid)

    def __str__(self) -> str:
        return f"tokens:{'x'.join(map(str, self.grid))}" + (f"+{self.prefix}" if self.prefix else "")


def _index(value) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None
