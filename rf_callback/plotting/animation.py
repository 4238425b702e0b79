"""A GIF of a receptive field sweeping the output map, one plot_rf-like frame per output position."""

from __future__ import annotations

import itertools
import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np
from matplotlib.animation import PillowWriter
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from rf_callback.core.layouts import Tokens
from rf_callback.core.result import ReceptiveField, ReceptiveFieldMap
from rf_callback.plotting.drawing import (
    _checked_field,
    _draw_panels,
    _figure_size,
    _layout,
    _normalised_heatmap,
    _prepared_image,
    _set_title,
)
from rf_callback.plotting.style import ImageLike

__all__ = ["animate_rf"]

_MAX_FRAMES = 64
_GIF_DPI = 80


def animate_rf(
    model: nn.Module,
    input_shape: Sequence[int],
    path: str | os.PathLike,
    *,
    positions: Sequence[int | Sequence[int]] | None = None,
    layer: str | None = None,
    mode: str = "theoretical",
    fps: float = 4,
    image: ImageLike | None = None,
    element: int | str | None = None,
    layout: str | Tokens = "channels_first",
) -> Path:
    """Writes a GIF of the receptive field moving over the input as the position sweeps the output map.

    Every frame is the figure :func:`plot_rf` draws for one position, so frames read like single plots. Each
    frame's heatmap is normalised to its own maximum. Only 1D and 2D inputs are animated; for a 3D input, draw the
    depth slices of single fields with :func:`plot_rf`.

    Args:
        model: the network, as for :func:`~rf_callback.core.probe.probe_rf` (it is not modified).
        input_shape: the full input shape ``(N, C, L)`` or ``(N, C, H, W)``.
        path: where to write the GIF; it must end in ``.gif`` and its folder must exist.
        positions: the output positions to show, one frame each, in order (an int or a 1-tuple per position for a
            1D output). ``None`` sweeps the output map in row-major (raster) order, subsampled evenly on each axis
            to at most 64 frames; the first and last index of every axis are always included.
        layer: dotted name of the submodule whose output map is swept, ``None`` for the model's output.
        mode: ``"theoretical"`` or ``"weights"``, as for :func:`~rf_callback.core.probe.probe_rf`.
        fps: frames per second of the GIF.
        image: the input to draw underneath every frame, as for :func:`plot_rf`.
        element: the index or key of the feature map in a tuple, list or dict output, as for
            :func:`~rf_callback.core.probe.probe_rf`.
        layout: how the swept output lays out its axes, as for :func:`~rf_callback.core.probe.probe_rf`.

    Returns:
        ``path``, as a :class:`~pathlib.Path`.

    Raises:
        ValueError: ``input_shape`` does not have 1 or 2 spatial axes, ``path`` does not end in ``.gif``, ``fps`` is
            not positive, ``positions`` is empty or holds a non-index, or ``image`` does not fit ``input_shape``;
            the probe's own ``ValueError`` for the model, position, layer or mode.
        TypeError: ``image`` is neither a tensor nor an array.
        FileNotFoundError: the folder of ``path`` does not exist (checked before anything is probed or drawn).
        rf_callback.core.probe.ProbeError: the probe could not measure a field.
    """
    shape = tuple(input_shape) if isinstance(input_shape, Sequence) else ()
    if len(shape) not in (3, 4):
        raise ValueError(
            f"input_shape={input_shape!r} must be (N, C, L) or (N, C, H, W): animate_rf sweeps 1D and 2D inputs "
            "only; for a 3D input, draw the depth slices of single fields with plot_rf"
        )
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not fps > 0:
        raise ValueError(f"fps={fps!r} must be a positive number of frames per second")
    target = Path(path)
    if target.suffix.lower() != ".gif":
        raise ValueError(f"path={str(path)!r} must end in '.gif' (the animation is written with PillowWriter)")
    if not target.parent.is_dir():
        raise FileNotFoundError(f"path={str(path)!r} is in a folder that does not exist: {str(target.parent)!r}")
    picture = _prepared_image(image, tuple(int(s) for s in shape[2:]))
    chosen = None if positions is None else _checked_positions(positions)

    from rf_callback.core.probe import ProbeError, probe_rf

    where = dict(layer=layer, mode=mode, element=element, layout=layout)
    if chosen is not None:
        fields = probe_rf(model, shape, chosen, **where)
    else:
        chosen = _raster_positions(probe_rf(model, shape, "center", **where).output_shape)
        try:
            fields = probe_rf(model, shape, chosen, **where)
        except ProbeError as error:
            # The sweep's ends may see only padding (FCN's padding of 100): the frames of the positions with a field
            try:
                every = cast(ReceptiveFieldMap, probe_rf(model, shape, "all", **where))
            except ProbeError:
                raise error from None
            with_field = [p for p in chosen if 0 not in every[p].size]
            if not with_field or len(with_field) == len(chosen):
                raise
            fields = probe_rf(model, shape, with_field, **where)
    if isinstance(fields, ReceptiveField):
        fields = [fields]
    frames = []
    for field in fields:
        _checked_field(field)
        frames.append((field, _normalised_heatmap(field)))

    fig = Figure(figsize=_figure_size(fields[0]), layout="constrained")
    FigureCanvasAgg(fig)
    inputs, output = _layout(fig, fields[0], colorbar=True)
    panels = [*inputs, output]
    writer = PillowWriter(fps=fps)
    with writer.saving(fig, target, dpi=_GIF_DPI):
        for frame, (field, heat) in enumerate(frames):
            # Frames differ only in their data artists: the axes, ticks and labels stay, and so does the layout,
            # computed once on the first frame (recomputing and re-rendering it per frame doubles the time).
            for ax in panels:
                for artist in [*ax.images, *ax.patches, *ax.texts, *ax.collections]:  # collections: the cell grid
                    artist.remove()
            _draw_panels(inputs, output, field, heat, picture, annotate=True)
            _set_title(fig, field, None)
            if frame == 0:
                fig.canvas.draw()
                fig.set_layout_engine(None)
            writer.grab_frame()
    return target


def _checked_positions(positions: Sequence[int | Sequence[int]]) -> list[tuple[int, ...]]:
    """Returns the positions as a non-empty list of int tuples (an int becomes a 1-tuple)."""
    if isinstance(positions, (str, bytes)) or not isinstance(positions, Sequence) or len(positions) == 0:
        raise ValueError(f"positions={positions!r} must be a non-empty list of output index tuples, or None")
    checked = []
    for k, position in enumerate(positions):
        index = (position,) if not isinstance(position, Sequence) else tuple(position)
        if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in index):
            raise ValueError(f"positions[{k}]={position!r} must be an output index: an int tuple, or an int for 1D")
        checked.append(tuple(int(i) for i in index))
    return checked


def _raster_positions(output_shape: Sequence[int], max_frames: int = _MAX_FRAMES) -> list[tuple[int, ...]]:
    """Returns output positions in row-major order, evenly subsampled per axis to at most ``max_frames``."""
    shape = tuple(output_shape)
    counts = [1] * len(shape)
    budget = max_frames
    # Small axes first: what they cannot use is left to the larger ones.
    for done, axis in enumerate(sorted(range(len(shape)), key=lambda a: shape[a])):
        remaining = len(shape) - done
        count = 1
        while count < shape[axis] and (count + 1) ** remaining <= budget:
            count += 1
        counts[axis] = count
        budget //= count
    indices = [np.unique(np.rint(np.linspace(0, n - 1, c)).astype(int)) for n, c in zip(shape, counts, strict=True)]
    return [tuple(int(i) for i in index) for index in itertools.product(*indices)]
