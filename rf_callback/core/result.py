"""The receptive-field value objects: what a probe found, and how to map between output and input coordinates."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from rf_callback.core.arguments import as_index, positions_of_index_columns
from rf_callback.core.effective import (
    HIGH_CONTRIBUTION_THRESHOLDS,
    center_of_mass,
    high_contribution,
    mass_extent,
    spread,
)
from rf_callback.core.geometry import AxisGeometry, Bounds, LazyGeometry
from rf_callback.core.layouts import AXIS_NAMES, CHANNELS_FIRST, Tokens

__all__ = ["AxisGeometry", "Bounds", "EffectiveField", "ReceptiveField", "ReceptiveFieldMap"]


def _geometry_dict(geometry: AxisGeometry | None) -> dict[str, int] | None:
    return None if geometry is None else geometry.to_dict()


def _one_integer(value) -> bool:
    """A one-element integer tensor or numpy array (an index array of one cell), not a bool."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.is_floating_point() and value.dtype != torch.bool
    return type(value).__module__ == "numpy" and getattr(value, "size", 0) == 1 and value.dtype.kind in ("i", "u")


@dataclass(frozen=True)
class ReceptiveField:
    """The receptive field of one output position.

    Attributes:
        position: the probed output index, one entry per output spatial axis.
        bounds: per input spatial axis, the inclusive ``(first, last)`` input indices that influence the position:
            the hull of those inputs (a field that wraps around the border through circular padding holds inputs at
            both ends, and its bounds everything between; the heatmap tells them apart).
        input_shape: the full input shape probed, ``(N, C, *spatial)``.
        output_shape: the spatial shape of the probed output map.
        geometry: per axis, the :class:`AxisGeometry` of the architecture, or ``None`` on an axis where it is not a
            regular lattice (an upsampling path, for example) or could not be measured. A probe measures it on
            first use (a :class:`~rf_callback.core.geometry.LazyGeometry`, which reads like the tuple).
        mode: ``"theoretical"`` or ``"weights"``.
        layer: the probed submodule's dotted name, ``None`` for the model's output.
        heatmap: gradient magnitude over the input's spatial axes (float64, CPU), summed over channels (and over the
            random draws in weights mode); ``None`` where only bounds were computed.
        element: the index or key of the probed feature map in a tuple, list or dict output; ``None`` for a tensor.
        layout: how the probed output lays out its axes, as given to the probe: ``"channels_first"``,
            ``"channels_last"`` or a :class:`~rf_callback.core.layouts.Tokens` grid (or its string form); ``position``
            and ``output_shape`` are on its spatial grid.
    """

    position: tuple[int, ...]
    bounds: tuple[Bounds, ...]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    geometry: tuple[AxisGeometry | None, ...] | LazyGeometry
    mode: str
    layer: str | None = None
    heatmap: torch.Tensor | None = field(default=None, repr=False, compare=False)
    element: int | str | None = None
    layout: str | Tokens = CHANNELS_FIRST

    @property
    def size(self) -> tuple[int, ...]:
        """Per axis, ``last - first + 1``: the number of input positions inside the (clipped) bounds."""
        return tuple(last - first + 1 for first, last in self.bounds)

    @property
    def span(self) -> tuple[Bounds, ...]:
        """Per axis, the unclipped interval ``[x*S - P, x*S - P + r - 1]``; the clipped bounds where unknown."""
        return tuple(
            bounds if geometry is None else geometry.span(index)
            for index, bounds, geometry in zip(self.position, self.bounds, self.geometry)
        )

    @property
    def stride(self) -> tuple[int | None, ...]:
        """Per axis, the effective stride ``S`` (``None`` where the geometry is unknown)."""
        return tuple(None if g is None else g.stride for g in self.geometry)

    @property
    def offset(self) -> tuple[int | None, ...]:
        """Per axis, the effective offset (padding) ``P`` (``None`` where the geometry is unknown)."""
        return tuple(None if g is None else g.offset for g in self.geometry)

    @property
    def center(self) -> tuple[float, ...]:
        """Per axis, the input coordinate of the field's centre (of the unclipped span where known)."""
        return tuple((first + last) / 2 for first, last in self.span)

    def to_dict(self, *, geometry: bool = True) -> dict:
        """Returns every attribute but the heatmap as JSON-serialisable built-in types.

        Args:
            geometry: include ``span``, ``stride``, ``offset``, ``center`` and ``geometry``, which measures the
                geometry if it has not been measured yet; ``False`` keeps to what the probe measured already.

        Returns:
            A dict with ``position``, ``bounds``, ``size``, ``input_shape``, ``output_shape``, ``mode``, ``layer``
            and, with ``geometry``, the geometry's entries.
        """
        record = {
            "position": list(self.position),
            "bounds": [list(b) for b in self.bounds],
            "size": list(self.size),
        }
        if geometry:
            record.update(
                span=[list(s) for s in self.span],
                stride=list(self.stride),
                offset=list(self.offset),
                center=list(self.center),
                geometry=[_geometry_dict(g) for g in self.geometry],
            )
        record.update(
            input_shape=list(self.input_shape), output_shape=list(self.output_shape), mode=self.mode, layer=self.layer
        )
        if self.element is not None:
            record["element"] = self.element
        if self.layout != CHANNELS_FIRST:
            record["layout"] = str(self.layout)
        return record

    def describe(self, *, stride: bool = True) -> str:
        """A one-line summary: position, size, bounds, and the effective stride unless ``stride=False``.

        Args:
            stride: include the effective stride, which measures the geometry if it has not been measured yet.

        Returns:
            The summary, e.g. ``RF of the output at (4, 8): 41 x 23 (input 18..58, 28..50), stride 6 x 4``.
        """
        where = f"layer {self.layer!r}" if self.layer else "the output"
        if 0 in self.size:  # a position of a map that no input moves: bounds (0, -1)
            why = "its window covers only padding"
            if self.mode == "weights":  # the real network's units can be dead (or saturated) on every random input
                why = f"the gradient is zero on every random input: {why}, or its units are dead there"
            return f"RF of {where} at {self.position}: empty ({why}) [{self.mode}]"
        size = " x ".join(str(s) for s in self.size)
        bounds = ", ".join(f"{first}..{last}" for first, last in self.bounds)
        text = f"RF of {where} at {self.position}: {size} (input {bounds})"
        if stride and all(s is not None for s in self.stride):
            text += f", stride {' x '.join(str(s) for s in self.stride)}"
        return f"{text} [{self.mode}]"

    def __str__(self) -> str:
        return self.describe()


@dataclass(frozen=True)
class ReceptiveFieldMap:
    """The receptive fields of every position of an output map (``pos="all"``): bounds only, no heatmaps.

    Index it with an output position to get that position's :class:`ReceptiveField`.

    Attributes:
        first: int64 tensor ``(*output_shape, n_axes)``, the first input index per position and axis.
        last: int64 tensor of the same shape, the last input index (inclusive).
        input_shape: the full input shape probed, ``(N, C, *spatial)``.
        output_shape: the spatial shape of the output map.
        geometry: per axis, the :class:`AxisGeometry` or ``None``.
        mode: ``"theoretical"`` or ``"weights"``.
        layer: the probed submodule's dotted name, or ``None``.
        element: the index or key of the probed feature map in a tuple, list or dict output; ``None`` for a tensor.
        layout: how the probed output lays out its axes, as for :class:`ReceptiveField`.
    """

    first: torch.Tensor = field(repr=False)
    last: torch.Tensor = field(repr=False)
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    geometry: tuple[AxisGeometry | None, ...] | LazyGeometry
    mode: str
    layer: str | None = None
    element: int | str | None = None
    layout: str | Tokens = CHANNELS_FIRST

    @property
    def size(self) -> torch.Tensor:
        """int64 tensor ``(*output_shape, n_axes)``: ``last - first + 1`` per position and axis."""
        return self.last - self.first + 1

    def __len__(self) -> int:
        return int(torch.Size(self.output_shape).numel())

    def positions(self) -> Iterator[tuple[int, ...]]:
        """Yields every output position in row-major order."""
        for flat in range(len(self)):
            yield tuple(int(i) for i in torch.unravel_index(torch.tensor(flat, device="cpu"), self.output_shape))

    def __iter__(self) -> Iterator[ReceptiveField]:
        return (self[p] for p in self.positions())

    def __getitem__(self, position: int | Sequence[int]) -> ReceptiveField:
        if getattr(position, "ndim", 0) == 1:  # an array or tensor of indices
            position = position.tolist()  # type: ignore[union-attr]
        columns = positions_of_index_columns(position)  # torch.where(mask) of a mask with one True cell
        if columns is not position and len(columns) == 1:
            position = tuple(columns[0])
        elif isinstance(position, tuple):  # (torch.tensor([1]), 2): one-element index arrays with ints
            position = tuple(p.item() if _one_integer(p) else p for p in position)
        # numpy and torch integers too (np.argmax's), as plain ints: a field prints and serialises them; bools
        # (a mask) are no indices
        indices = [as_index(i) for i in position] if isinstance(position, Sequence) else [as_index(position)]
        if None in indices:
            raise IndexError(f"position {position!r} must be integer indices, one per axis of {self.output_shape}")
        index = tuple(i for i in indices if i is not None)
        if len(index) != len(self.output_shape) or not all(-n <= i < n for i, n in zip(index, self.output_shape)):
            raise IndexError(f"position {position!r} is outside the output map of shape {self.output_shape}")
        index = tuple(i % n for i, n in zip(index, self.output_shape))
        return ReceptiveField(
            position=index,
            bounds=tuple((int(a), int(b)) for a, b in zip(self.first[index], self.last[index])),
            input_shape=self.input_shape,
            output_shape=self.output_shape,
            geometry=self.geometry,
            mode=self.mode,
            layer=self.layer,
            element=self.element,
            layout=self.layout,
        )

    def to_dict(self) -> dict:
        """Returns the map as JSON-serialisable built-in types (nested lists of ``[first, last]`` per axis).

        ``element`` and ``layout`` are there only when they are not the defaults, as in
        :meth:`ReceptiveField.to_dict`.
        """
        record: dict[str, object] = {
            "bounds": torch.stack([self.first, self.last], dim=-1).tolist(),
            "geometry": [_geometry_dict(g) for g in self.geometry],
            "input_shape": list(self.input_shape),
            "output_shape": list(self.output_shape),
            "mode": self.mode,
            "layer": self.layer,
        }
        if self.element is not None:
            record["element"] = self.element
        if self.layout != CHANNELS_FIRST:
            record["layout"] = str(self.layout)
        return record


@dataclass(frozen=True)
class EffectiveField:
    """The effective receptive field of one output position on real inputs (Luo et al., NeurIPS 2016).

    Attributes:
        position: the probed output index.
        heatmap: |d output / d input| (a gradient of 1 from every output channel at the position, so channels of
            opposite sign cancel), summed over the input's channels and averaged over the inputs (float64, CPU),
            over the input's spatial axes.
        theoretical: the theoretical field of the same position, for reference.
        samples: how many inputs the map is averaged over.
        biases: ``"trained"`` (the network as it computes) or ``"zero"``.
        layer: the probed submodule's dotted name, or ``None``.
    """

    position: tuple[int, ...]
    heatmap: torch.Tensor = field(repr=False)
    theoretical: ReceptiveField = field(repr=False)
    samples: int = 0
    biases: str = "trained"
    layer: str | None = None

    def extent(self, q: float = 0.95) -> tuple[Bounds, ...]:
        """Per axis, the inclusive ``(first, last)`` of the shortest interval holding fraction ``q`` of the mass.

        The mass is the marginal of the map along that axis (see :func:`rf_callback.core.effective.mass_extent`).
        """
        return mass_extent(self.heatmap, q)

    def metrics(self, qs: Sequence[float] = (0.95,)) -> dict[str, float | None]:
        """The effective-field metrics as flat, loggable numbers, per axis (``h``, ``w``, ...).

        Keys: ``extent<q>_<axis>`` (size of the mass-q extent), ``extent<q>_ratio_<axis>`` (that size over the
        theoretical size), ``com_<axis>`` and ``com_offset_<axis>`` (centre of mass, and its offset from the
        theoretical field's centre), ``std_<axis>`` (from second moments) and ``area<t>`` / ``side<t>`` (RepLKNet's
        high-contribution area ratio and square side at t = 0.2, 0.3, 0.5, 0.99; ``None`` where no square fits).

        Args:
            qs: the mass fractions of the extents, each in (0, 1].

        Returns:
            The metrics by key.

        Raises:
            ValueError: two fractions of ``qs`` print alike in a key (``<q>`` keeps 6 significant digits), where
                one's values would overwrite the other's.
        """
        keys = [f"{q:g}" for q in qs]
        if len(set(keys)) < len(keys):
            raise ValueError(
                f"qs={tuple(qs)!r} holds fractions that print alike in the metrics' keys ({keys}: 6 significant "
                f"digits), so one's extent would overwrite the other's; pass fractions that differ within 6 digits"
            )
        names = AXIS_NAMES[self.heatmap.dim()]
        result: dict[str, float | None] = {}
        for q in qs:
            for name, (first, last), size in zip(names, self.extent(q), self.theoretical.size):
                result[f"extent{q:g}_{name}"] = float(last - first + 1)
                result[f"extent{q:g}_ratio_{name}"] = (last - first + 1) / size
        for name, com, center, std in zip(
            names, center_of_mass(self.heatmap), self.theoretical.center, spread(self.heatmap)
        ):
            result[f"com_{name}"], result[f"com_offset_{name}"], result[f"std_{name}"] = com, com - center, std
        # A centre between two cells (an even size) goes to the upper one everywhere, as the map's own n // 2 does:
        # round() would send 2.5 down and 3.5 up, and one field shifted by a cell would change its squares.
        cell = tuple(
            min(max(math.floor(c + 0.5), 0), n - 1) for c, n in zip(self.theoretical.center, self.heatmap.shape)
        )
        for t in HIGH_CONTRIBUTION_THRESHOLDS:
            found = high_contribution(self.heatmap, t, cell)
            result[f"side{t:g}"], result[f"area{t:g}"] = (None, None) if found is None else (float(found[0]), found[1])
        return result
