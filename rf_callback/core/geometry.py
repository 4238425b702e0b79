"""The algebra of receptive fields along one axis (distill.pub's r, S, P), apart from any graph or tensor.

An output index ``x`` sees the unclipped input interval ``[x*S - P, x*S - P + r - 1]``; what a probe measures is that
interval clipped to the input, and sometimes a little less at the input's far end (a strided layer drops trailing
inputs that no window reaches). This module fits (r, S, P) to measured bounds and checks it against them.
"""

from __future__ import annotations

import math
import operator
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

Bounds = tuple[int, int]

# Two fields can both look unclipped and still be cut by the input's edges when dilation leaves holes in them;
# the geometry is read off no fewer than three.
MIN_WHOLE_FIELDS = 3


@dataclass(frozen=True)
class AxisGeometry:
    """The receptive-field algebra of one spatial axis (distill.pub's r, S and P).

    Output index ``x`` sees the unclipped input interval ``[x*stride - offset, x*stride - offset + size - 1]``.

    Attributes:
        size: ``r``, the number of input positions one output position spans before clipping.
        stride: ``S``, the input distance between the fields of neighbouring output positions.
        offset: ``P``, the effective padding: how far left of input index 0 the field of output 0 starts.
    """

    size: int
    stride: int
    offset: int

    def span(self, index: int) -> Bounds:
        """Returns the unclipped inclusive input interval seen by output ``index``.

        Raises:
            TypeError: ``index`` is not an integer (a float, a bool).
        """
        first = _output_index(index) * self.stride - self.offset
        return first, first + self.size - 1

    def center(self, index: int) -> float:
        """Returns the input coordinate of the centre of output ``index``'s field.

        Raises:
            TypeError: ``index`` is not an integer (a float, a bool).
        """
        return _output_index(index) * self.stride - self.offset + (self.size - 1) / 2

    def index_of(self, coordinate: float) -> int:
        """Returns the output index whose field is centred nearest to input ``coordinate`` (may be out of range).

        A coordinate halfway between two centres goes to the higher index, as ``"center"`` takes the upper of two
        middle cells (Python's ``round`` would alternate between the lower and the higher, by parity).
        """
        return math.floor((coordinate + self.offset - (self.size - 1) / 2) / self.stride + 0.5)

    def to_dict(self) -> dict[str, int]:
        """Returns ``{"size": r, "stride": S, "offset": P}``."""
        return {"size": self.size, "stride": self.stride, "offset": self.offset}


def _output_index(index) -> int:
    """``index`` as a Python int (numpy and torch integers too); a float or a bool is refused, not rounded."""
    if not isinstance(index, bool):
        try:
            return operator.index(index)
        except TypeError:
            pass
    raise TypeError(
        f"index={index!r} must be an int, the index of an output cell (an input coordinate goes to index_of, which "
        f"gives the output index whose field is centred nearest to it)"
    )


class LazyGeometry(Sequence):
    """The per-axis geometry of a probe, measured on first use and then kept.

    It reads like the tuple it stands for (index it, iterate it, compare it with a tuple); its length, the number
    of axes, is known without measuring. A probe that needs bounds and heatmaps only never pays for the geometry.
    """

    def __init__(
        self, n_axes: int, measure: Callable[[], tuple[AxisGeometry | None, ...]], why: dict[int, str] | None = None
    ):
        self._n_axes = n_axes
        self._measure: Callable[[], tuple[AxisGeometry | None, ...]] | None = measure  # dropped once measured
        self._value: tuple[AxisGeometry | None, ...] | None = None
        self._why = {} if why is None else why  # filled by ``measure``
        self._lock = threading.Lock()

    @property
    def measured(self) -> bool:
        """Whether the geometry has been measured already."""
        return self._value is not None

    def resolve(self) -> tuple[AxisGeometry | None, ...]:
        """Returns the geometry as a tuple, measuring it if this is the first use."""
        with self._lock:
            if self._value is None:
                assert self._measure is not None, "measured once, then dropped"
                value = tuple(self._measure())
                if len(value) != self._n_axes:
                    raise AssertionError(f"measured {len(value)} axes, expected {self._n_axes}")
                self._value, self._measure = value, None
        return self._value

    @property
    def reasons(self) -> tuple[str | None, ...]:
        """Per axis, why its geometry is ``None`` (``None`` where there is a geometry); measures it if not yet."""
        value = self.resolve()
        return tuple(None if g is not None else self._why.get(a, "not measured") for a, g in enumerate(value))

    def __len__(self) -> int:
        return self._n_axes

    def __getitem__(self, index):
        return self.resolve()[index]

    def __iter__(self) -> Iterator[AxisGeometry | None]:
        return iter(self.resolve())

    def __eq__(self, other) -> bool:
        if isinstance(other, (LazyGeometry, tuple)):
            return self.resolve() == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.resolve())

    def __repr__(self) -> str:
        return repr(self._value) if self._value is not None else f"LazyGeometry(<{self._n_axes} axes, not measured>)"

    def __deepcopy__(self, memo):
        return self.resolve()

    def __reduce__(self):
        return tuple, (self.resolve(),)


def whole_fields(axis_table: dict[int, Bounds | None], length: int, gap: int) -> list[tuple[int, Bounds]]:
    """Fields that are certainly unclipped.

    A field with holes of up to ``gap - 1`` inputs (dilation) whose span starts left of the input can start up to
    that far inside it, so only fields at least ``gap`` from both ends count.
    """
    return sorted((i, b) for i, b in axis_table.items() if b is not None and b[0] >= gap and b[1] <= length - 1 - gap)


def is_whole(bounds: Bounds | None, length: int, gap: int) -> bool:
    """Whether a field is certainly unclipped (see :func:`whole_fields`)."""
    return bounds is not None and bounds[0] >= gap and bounds[1] <= length - 1 - gap


def fit_axis(axis_table: dict[int, Bounds | None], length: int, gap: int) -> AxisGeometry | None:
    """The (r, S, P) with ``clip([x*S - P, x*S - P + r - 1])`` equal to every measured field, if there is one.

    It is read off at least three fields of the largest size among the certainly unclipped ones (a field can
    still lose trailing inputs that no strided window reaches, which only makes it smaller) and checked against
    every field.
    """
    whole = whole_fields(axis_table, length, gap)
    size = max((last - first + 1 for _, (first, last) in whole), default=0)
    whole = [(i, (first, last)) for i, (first, last) in whole if last - first + 1 == size]
    if len(whole) < MIN_WHOLE_FIELDS:
        return None
    stride = common_slope([(i, first) for i, (first, _) in whole])
    if stride is None:
        return None
    index, (first, _) = whole[0]
    geometry = AxisGeometry(size=size, stride=stride, offset=index * stride - first)
    return geometry if consistent(geometry, axis_table, length) else None


def common_slope(points: list[tuple[int, int]]) -> int | None:
    """The positive integer slope through every ``(index, value)`` point, if there is one."""
    if len(points) < 2:
        return None
    (i0, v0), (i1, v1) = points[0], points[-1]
    slope, remainder = divmod(v1 - v0, i1 - i0)
    if remainder or slope < 1 or any(v != v0 + (i - i0) * slope for i, v in points):
        return None
    return slope


def consistent(geometry: AxisGeometry, axis_table: Mapping[int, Bounds | None], length: int) -> bool:
    """Whether every measured field matches the geometry.

    Exactly where the span is inside the input, and inside the clipped span where it is not (a strided layer can
    drop trailing inputs that no window reaches).
    """
    for index, bounds in axis_table.items():
        first, last = geometry.span(index)
        if bounds is None:  # an empty field is right only where its span leaves the input
            if first >= 0 and last <= length - 1:
                return False
            continue
        if (first >= 0 and bounds[0] != first) or (last <= length - 1 and bounds[1] != last):
            return False
        if bounds[0] < max(first, 0) or bounds[1] > min(last, length - 1):
            return False
    return True


def chain_geometry(layers: Sequence[tuple[int, int, int, int]]) -> AxisGeometry:
    """The closed form of a chain of ``(kernel, stride, padding, dilation)`` layers along one axis.

    ``r = 1 + Σ (k_l − 1)·d_l·Π_{i<l} s_i``, ``S = Π s_l``, ``P = Σ p_l·Π_{i<l} s_i`` (distill.pub, eqs. 2 and 5).
    """
    size, stride, offset = 1, 1, 0
    for kernel, layer_stride, padding, dilation in layers:
        size += (kernel - 1) * dilation * stride
        offset += padding * stride
        stride *= layer_stride
    return AxisGeometry(size=size, stride=stride, offset=offset)
