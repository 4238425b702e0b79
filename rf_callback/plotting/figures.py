"""Matplotlib pictures of receptive fields: one figure per field, and a GIF of a field sweeping the output map."""

from __future__ import annotations

import itertools
import numbers
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.animation import PillowWriter
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize, to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from torch import nn

from rf_callback.core.layouts import AXIS_NAMES
from rf_callback.core.result import Bounds, EffectiveField, ReceptiveField

__all__ = ["animate_rf", "figure_to_array", "heatmap_image", "plot_effective", "plot_growth", "plot_rf"]

ImageLike = torch.Tensor | np.ndarray

_HEATMAP_CMAP = "magma"
_BOX_COLOR = "#00e5ff"
_BOX_GID = "rf-box"  # the Rectangle outlining the field on the input grid
_CELL_GID = "rf-cell"  # the Rectangle outlining the chosen cell on the output grid
_OVERLAY_ALPHA = 0.6  # opacity of the heatmap drawn over an image
_MAX_DEPTH_SLICES = 6
_MAX_FRAMES = 64
_CELL_BORDERS_UP_TO = 64  # output grids with at most this many cells per axis get white cell borders
_GIF_DPI = 80
_EXTENT_COLOR = "#7CFC00"
_EXTENT_GID = "erf-extent"  # the Rectangle outlining the effective field's mass-q extent
_TARGET_COLOR = "#ffffff"
_TARGET_GID = "erf-target"  # the Rectangle of the target object size, centred on the field
_HEATMAP_MIN_SIDE = 256  # heatmap images are upscaled (nearest) until their longer side reaches this
_STRIP_HEIGHT = 24  # rows of a 1D heatmap's strip


def plot_rf(
    field: ReceptiveField,
    *,
    image: ImageLike | None = None,
    title: str | None = None,
    annotate: bool = True,
) -> Figure:
    """Draws a receptive field: where on the input it lies, its gradient heatmap, and the output cell it belongs to.

    The figure is a plain :class:`~matplotlib.figure.Figure` with an Agg canvas (no pyplot, no GUI backend): save it
    with ``fig.savefig(path)``, or show it in a notebook. Its layout follows the number of input spatial axes:

    * 2D ``(N, C, H, W)``: the input grid (``input w`` across, ``input h`` down) with the heatmap normalised to its
      maximum and a colorbar, the field's box, and the output grid with the chosen cell.
    * 1D ``(N, C, L)``: the same as one-row strips, the input strip above the output strip.
    * 3D ``(N, C, D, H, W)``: up to 6 depth slices spread evenly over the field's depth bounds, each an ``h``/``w``
      input grid with the box; the output position is named in the title (there is no output panel).

    The field's box is a :class:`~matplotlib.patches.Rectangle` with gid ``"rf-box"`` covering the inclusive
    bounds cell for cell (``x`` from ``first_w - 0.5`` to ``last_w + 0.5``); the chosen output cell is one with gid
    ``"rf-cell"``. A field without a heatmap (one taken from a
    :class:`~rf_callback.core.result.ReceptiveFieldMap`) is drawn as its box on an empty grid, without a colorbar.

    Args:
        field: the receptive field to draw, with or without its heatmap.
        image: the input to draw underneath, the heatmap then becoming a semi-transparent overlay that leaves the
            positions outside the field clear: a tensor or array shaped like the input's spatial axes (grey),
            ``(*spatial, 3)`` (RGB), ``(C, *spatial)`` with ``C`` in ``{1, 3}``, or any of these with a leading batch
            axis of 1 (so the probed input itself works). Values are rescaled to ``[0, 1]``. Where both channel
            layouts fit, a tensor is read channels-first and an array channels-last.
        title: the figure title; ``None`` for ``str(field)`` (which names the output position and the field's
            size, bounds and stride), ``""`` for none.
        annotate: write the field's size (``h x w``) in the box's corner.

    Returns:
        The figure.

    Raises:
        TypeError: ``field`` is not a :class:`~rf_callback.core.result.ReceptiveField`, or ``image`` is neither a tensor
            nor an array.
        ValueError: ``field`` is inconsistent (bounds, heatmap or position not fitting its shapes, a non-finite
            heatmap, an output map of other than 1 or 2 axes under a 1D or 2D input), or ``image`` does not match
            the input's spatial shape; the message names the argument, the value and what is allowed.
    """
    spatial = _checked_field(field)
    heat = _normalised_heatmap(field)
    picture = _prepared_image(image, spatial)
    fig = Figure(figsize=_figure_size(field), layout="constrained")
    FigureCanvasAgg(fig)
    inputs, output = _layout(fig, field, colorbar=heat is not None)
    _draw_panels(inputs, output, field, heat, picture, annotate=annotate)
    _set_title(fig, field, title)
    return fig


def plot_effective(
    field: EffectiveField,
    *,
    image: ImageLike | None = None,
    q: float = 0.95,
    title: str | None = None,
    target: Sequence[int] | None = None,
) -> Figure:
    """Draws an effective field over the input, with the theoretical box and the mass-q extent box.

    The heatmap is drawn over ``image`` when given; the extent holding fraction ``q`` of the gradient mass is the
    green dashed box; the target object size, when given, a white dotted box centred on the theoretical field
    (gid ``"erf-target"``).

    Args:
        field: a field from :func:`rf_callback.effective_rf`.
        image: an input to draw underneath, as for :func:`plot_rf`; it is rescaled to [0, 1].
        q: the mass fraction of the extent box.
        title: the figure's title; ``None`` says what is drawn.
        target: the size of the objects the network must see, one per spatial axis; ``None`` draws no target.

    Returns:
        The figure.
    """
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu()
        low, high = image.min(), image.max()
        image = (image - low) / (high - low) if high > low else torch.zeros_like(image)
    shown = ReceptiveField(
        position=field.position, bounds=field.theoretical.bounds, input_shape=field.theoretical.input_shape,
        output_shape=field.theoretical.output_shape, geometry=field.theoretical.geometry, mode="effective",
        layer=field.layer, heatmap=field.heatmap,
    )  # fmt: skip
    extent = field.extent(q)
    sizes = " x ".join(str(last - first + 1) for first, last in extent)
    text = f"effective field at {field.position}: {q:g} of the mass in {sizes} (green), theoretical box in blue"
    if target is not None:
        target = tuple(int(t) for t in target)
        if len(target) != len(extent):
            raise ValueError(f"target={target!r} has {len(target)} entries; the field has {len(extent)} axes")
        text += f", target {' x '.join(map(str, target))} (white)"
    fig = plot_rf(shown, image=image, title=text if title is None else title)
    box = ((0, 0), *extent) if len(extent) == 1 else extent[-2:]
    for ax in fig.axes:
        if any(patch.get_gid() == _BOX_GID for patch in ax.patches):
            (top, bottom), (left, right) = box
            ax.add_patch(
                Rectangle(
                    (left - 0.5, top - 0.5), right - left + 1, bottom - top + 1, facecolor="none",
                    edgecolor=_EXTENT_COLOR, linewidth=2, linestyle="--", gid=_EXTENT_GID,
                )
            )  # fmt: skip
            if target is not None:
                ax.add_patch(_target_box(field.theoretical.center, target))
    return fig


def _target_box(center: tuple[float, ...], target: tuple[int, ...]) -> Rectangle:
    """A box of ``target`` pixels per axis centred on ``center`` (pixel i covers i - 0.5 to i + 0.5)."""
    pairs = list(zip(center, target))
    if len(pairs) == 1:  # a 1D field is drawn as a one-row strip
        pairs.insert(0, (0.0, 1))
    (middle_h, size_h), (middle_w, size_w) = pairs[-2:]
    return Rectangle(
        (middle_w - size_w / 2, middle_h - size_h / 2), size_w, size_h, facecolor="none", edgecolor=_TARGET_COLOR,
        linewidth=1.5, linestyle=":", gid=_TARGET_GID,
    )  # fmt: skip


def plot_growth(
    rows: Sequence[tuple[int, dict[str, float]]],
    *,
    title: str = "effective field",
    target: Sequence[int] | None = None,
) -> Figure:
    """Plots effective-field metrics against epoch: extent sizes and standard deviations, per axis.

    Args:
        rows: ``(epoch, metrics)`` pairs, metrics as :meth:`rf_callback.EffectiveField.metrics` gives them.
        title: the figure's title.
        target: the target object size, one per spatial axis (or one for all), drawn as dashed horizontal lines on
            the extent panel; ``None`` draws none.

    Returns:
        The figure.
    """
    fig = Figure(figsize=(7, 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_extent, ax_std = fig.subplots(1, 2)
    epochs = [epoch for epoch, _ in rows]
    names = sorted({k for _, metrics in rows for k in metrics})
    for name in names:
        values = [metrics.get(name, np.nan) for _, metrics in rows]
        if name.startswith("extent") and "_ratio_" not in name:
            ax_extent.plot(epochs, values, marker="o", label=name)
        elif name.startswith("std_"):
            ax_std.plot(epochs, values, marker="o", label=name)
    target = [int(t) for t in target] if target is not None else []
    axes = AXIS_NAMES.get(len(target), ())
    for size in sorted(set(target)):  # one line per size; named by axis where the axes' targets differ
        named = "" if len(set(target)) == 1 else " " + ", ".join(a for a, t in zip(axes, target) if t == size)
        ax_extent.axhline(size, color="0.35", linestyle="--", linewidth=1.2, label=f"target{named} {size}")
    for ax, label in ((ax_extent, "mass extent (inputs)"), (ax_std, "standard deviation (inputs)")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    return fig


def heatmap_image(heatmap: torch.Tensor, *, depth: int | None = None, min_side: int = _HEATMAP_MIN_SIDE) -> np.ndarray:
    """Colours a heatmap with the figures' colour map and enlarges it, for loggers' image panels.

    The heatmap is normalised to its maximum and coloured with the colour map of :func:`plot_rf`; each input pixel
    becomes a square block of pixels (nearest neighbour, never interpolated) so that the longer side reaches
    ``min_side`` or just under it (whole multiples only; never shrunk): a 5 x 5 field on a 48 x 48 input is 25 x 25
    screen pixels. A 1D heatmap becomes a strip ``_STRIP_HEIGHT`` rows high; a 3D one is shown at depth ``depth``
    (default: the depth slice holding the most mass, which lies inside the field).

    Args:
        heatmap: a 1D, 2D or 3D heatmap (a field's ``heatmap``).
        depth: for a 3D heatmap, the depth index to show.
        min_side: the longer side, in pixels, the image is enlarged towards.

    Returns:
        A ``uint8`` RGB array ``(height, width, 3)``.
    """
    values = heatmap.detach().float().cpu()
    strip = values.dim() == 1
    if values.dim() == 3:
        values = values[int(values.abs().sum(dim=(1, 2)).argmax()) if depth is None else depth]
    peak = values.max()
    values = (values / peak if peak > 0 else values).numpy()
    if strip:
        values = values[None, :]
    scale = max(1, min_side // max(values.shape))
    values = values.repeat(scale, axis=0).repeat(scale, axis=1)
    if strip:
        values = values.repeat(-(-_STRIP_HEIGHT // values.shape[0]), axis=0)
    colours = matplotlib.colormaps[_HEATMAP_CMAP](values)[..., :3]
    return (colours * 255).round().astype(np.uint8)


def figure_to_array(fig: Figure, dpi: int = 80) -> np.ndarray:
    """Renders a figure to an RGB image.

    Args:
        fig: a figure from :func:`plot_rf` (or any Agg-drawable figure).
        dpi: resolution of the rendering.

    Returns:
        A ``uint8`` array ``(height, width, 3)``.
    """
    fig.set_dpi(dpi)
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


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

    from rf_callback.core.probe import probe_rf

    if chosen is None:
        chosen = _raster_positions(probe_rf(model, shape, "center", layer=layer, mode=mode).output_shape)
    fields = probe_rf(model, shape, chosen, layer=layer, mode=mode)
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
                for artist in [*ax.images, *ax.patches, *ax.texts]:
                    artist.remove()
            _draw_panels(inputs, output, field, heat, picture, annotate=True)
            _set_title(fig, field, None)
            if frame == 0:
                fig.canvas.draw()
                fig.set_layout_engine(None)
            writer.grab_frame()
    return target


def _checked_field(field: ReceptiveField) -> tuple[int, ...]:
    """Returns the field's input spatial shape, after checking that its parts fit together."""
    if not isinstance(field, ReceptiveField):
        raise TypeError(f"field must be a ReceptiveField, got {type(field).__name__}")
    input_shape = tuple(field.input_shape)
    if len(input_shape) not in (3, 4, 5):
        raise ValueError(
            f"field.input_shape={input_shape} must be (N, C, *spatial) with 1, 2 or 3 spatial axes to be plotted"
        )
    spatial = input_shape[2:]
    if len(field.bounds) != len(spatial):
        raise ValueError(
            f"field.bounds={field.bounds} must hold one (first, last) pair per input spatial axis of {spatial}"
        )
    for axis, ((first, last), n) in enumerate(zip(field.bounds, spatial, strict=True)):
        if not 0 <= first <= last < n:
            raise ValueError(
                f"field.bounds[{axis}]={(first, last)} must satisfy 0 <= first <= last < {n}, the input size there"
            )
    if field.heatmap is not None and tuple(field.heatmap.shape) != spatial:
        raise ValueError(
            f"field.heatmap has shape {tuple(field.heatmap.shape)}; it must have the input spatial shape {spatial}"
        )
    output_shape = tuple(field.output_shape)
    if len(spatial) < 3 and len(output_shape) not in (1, 2):
        raise ValueError(f"field.output_shape={output_shape} must have 1 or 2 axes to be drawn as a grid")
    position = tuple(field.position)
    if len(position) != len(output_shape) or not all(0 <= i < n for i, n in zip(position, output_shape, strict=True)):
        raise ValueError(f"field.position={position} must be an index into the output map of shape {output_shape}")
    return spatial


def _normalised_heatmap(field: ReceptiveField) -> np.ndarray | None:
    """Returns the field's heatmap as float64 magnitudes scaled to a maximum of 1 (all zeros stay zeros)."""
    if field.heatmap is None:
        return None
    heat = np.abs(field.heatmap.detach().to("cpu", torch.float64).numpy())
    if not np.isfinite(heat).all():
        raise ValueError("field.heatmap holds NaN or infinite values; it must be finite to be drawn")
    peak = heat.max(initial=0.0)
    return heat / peak if peak > 0 else heat


def _prepared_image(image: ImageLike | None, spatial: tuple[int, ...]) -> np.ndarray | None:
    """Returns ``image`` as float64 ``(*spatial)`` (grey) or ``(*spatial, 3)`` (RGB) scaled to ``[0, 1]``."""
    if image is None:
        return None
    if isinstance(image, torch.Tensor):
        array, channels_first = image.detach().to("cpu", torch.float64).numpy(), True
    elif isinstance(image, np.ndarray):
        array, channels_first = image.astype(np.float64), False
    else:
        raise TypeError(f"image must be a torch.Tensor or a numpy.ndarray, got {type(image).__name__}")
    given = tuple(array.shape)
    if array.ndim == len(spatial) + 2 and array.shape[0] == 1:
        array = array[0]
    shape = tuple(array.shape)
    fits_last = shape in ((*spatial, 1), (*spatial, 3))
    fits_first = array.ndim == len(spatial) + 1 and shape[0] in (1, 3) and shape[1:] == spatial
    if fits_first and (channels_first or not fits_last):
        array = np.moveaxis(array, 0, -1)
    elif shape != spatial and not fits_last:
        dims = ", ".join(str(n) for n in spatial)
        raise ValueError(
            f"image has shape {given}; it must match the input's spatial shape {spatial}: ({dims}) grey, "
            f"({dims}, 3) RGB, or (C, {dims}) with C in {{1, 3}}, optionally with a leading batch axis of 1"
        )
    if array.shape[-1:] == (1,) and array.ndim == len(spatial) + 1:
        array = array[..., 0]
    if not np.isfinite(array).all():
        raise ValueError("image holds NaN or infinite values; it must be finite to be drawn")
    low, high = array.min(), array.max()
    return (array - low) / (high - low) if high > low else np.zeros_like(array)


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


def _depth_slices(bounds: Bounds) -> list[int]:
    """Returns up to ``_MAX_DEPTH_SLICES`` depth indices spread evenly over ``bounds``, both ends included."""
    first, last = bounds
    count = min(_MAX_DEPTH_SLICES, last - first + 1)
    return [int(d) for d in np.unique(np.rint(np.linspace(first, last, count)).astype(int))]


def _figure_size(field: ReceptiveField) -> tuple[float, float]:
    """Returns the figure size in inches for ``field``'s layout."""
    n_axes = len(field.input_shape) - 2
    if n_axes == 1:
        return 10.0, 3.6
    if n_axes == 2:
        return 11.0, 4.8
    return 2.4 * len(_depth_slices(field.bounds[0])) + 1.5, 3.4


def _layout(fig: Figure, field: ReceptiveField, *, colorbar: bool) -> tuple[list[Axes], Axes | None]:
    """Adds the empty panels for ``field`` to ``fig``: its input axes, and its output axes (``None`` for 3D).

    The colorbar of the normalised heatmap is drawn here, once: it does not depend on the field.
    """
    n_axes = len(field.input_shape) - 2
    if n_axes == 3:
        inputs, output = list(fig.subplots(1, len(_depth_slices(field.bounds[0])), squeeze=False)[0]), None
    else:
        ax_in, output = fig.subplots(2, 1) if n_axes == 1 else fig.subplots(1, 2, width_ratios=[1.25, 1])
        inputs = [ax_in]
    if colorbar:
        colors = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=_HEATMAP_CMAP)
        # A 1D strip is short: a stubbier bar keeps its label readable.
        fig.colorbar(colors, ax=inputs, label="|gradient| / max", shrink=0.9, aspect=6 if n_axes == 1 else 20)
    return inputs, output


def _draw_panels(
    inputs: list[Axes],
    output: Axes | None,
    field: ReceptiveField,
    heat: np.ndarray | None,
    image: np.ndarray | None,
    *,
    annotate: bool,
) -> None:
    """Draws ``field`` into the empty panels :func:`_layout` made: the one drawing path of both public functions."""
    spatial = tuple(field.input_shape[2:])
    if len(spatial) == 3:
        for ax, depth in zip(inputs, _depth_slices(field.bounds[0]), strict=True):
            _draw_input_grid(
                ax,
                spatial[1:],
                None if heat is None else heat[depth],
                None if image is None else image[depth],
                field.bounds[1:],
                " x ".join(str(s) for s in field.size[1:]) if annotate else None,
            )
            ax.set_title(f"input d = {depth}", fontsize=10)
            ax.set_xlabel("input w")
        inputs[0].set_ylabel("input h")
        return
    (ax_in,) = inputs
    one_d = len(spatial) == 1
    grid = (1, spatial[0]) if one_d else spatial
    _draw_input_grid(
        ax_in,
        grid,
        None if heat is None else heat.reshape(grid),
        None if image is None else image.reshape(*grid, *image.shape[len(spatial) :]),
        ((0, 0), *field.bounds) if one_d else field.bounds,
        " x ".join(str(s) for s in field.size) if annotate else None,
    )
    ax_in.set_title(f"input {' x '.join(str(n) for n in spatial)}", fontsize=10)
    if one_d:
        ax_in.set_xlabel("input index")
        ax_in.set_aspect("auto")
        ax_in.tick_params(axis="y", left=False, labelleft=False)
    else:
        ax_in.set_xlabel("input w")
        ax_in.set_ylabel("input h")
    _draw_output_grid(output, tuple(field.output_shape), tuple(field.position))


def _set_title(fig: Figure, field: ReceptiveField, title: str | None) -> None:
    """Titles ``fig`` with ``title``, ``str(field)`` when it is ``None``; ``""`` leaves it untitled."""
    text = str(field) if title is None else title
    if text:
        fig.suptitle(text, fontsize=11)


def _draw_input_grid(
    ax: Axes,
    grid: tuple[int, int],
    heat: np.ndarray | None,
    image: np.ndarray | None,
    box: tuple[Bounds, Bounds],
    size_text: str | None,
) -> None:
    """Draws a ``(rows, cols)`` input grid: the image, the heatmap over it, the field's box and its size."""
    rows, cols = grid
    if image is not None:
        ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    if heat is not None:
        shown, alpha = (heat, None) if image is None else (np.ma.masked_equal(heat, 0.0), _OVERLAY_ALPHA)
        ax.imshow(shown, cmap=_HEATMAP_CMAP, vmin=0.0, vmax=1.0, alpha=alpha, interpolation="nearest")
    (top, bottom), (left, right) = box
    ax.add_patch(
        Rectangle(
            (left - 0.5, top - 0.5),
            right - left + 1,
            bottom - top + 1,
            # Without a heatmap, a light fill shows the field; with one, the box only outlines it.
            facecolor=(*to_rgb(_BOX_COLOR), 0.25) if heat is None else "none",
            edgecolor=_BOX_COLOR,
            linewidth=2,
            gid=_BOX_GID,
        )
    )
    if size_text is not None:
        ax.annotate(
            size_text,
            xy=(left - 0.5, top - 0.5),
            xytext=(3, -3),
            textcoords="offset points",
            ha="left",
            va="top",
            fontsize=8,
            color="white",
            bbox={"facecolor": "black", "alpha": 0.6, "edgecolor": "none", "pad": 1.5},
        )
    _frame_grid(ax, rows, cols)


def _draw_output_grid(ax: Axes, output_shape: tuple[int, ...], position: tuple[int, ...]) -> None:
    """Draws the output map (a one-row strip for 1D) with the chosen cell filled and outlined."""
    if len(output_shape) == 1:
        (rows, cols), (row, col) = (1, output_shape[0]), (0, position[0])
    else:
        (rows, cols), (row, col) = output_shape, position
    chosen = np.zeros((rows, cols))
    chosen[row, col] = 1.0
    ax.imshow(chosen, cmap=ListedColormap(["#e8e8e8", _BOX_COLOR]), vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.5, gid=_CELL_GID))
    if max(rows, cols) <= _CELL_BORDERS_UP_TO:
        ax.set_xticks(np.arange(cols + 1) - 0.5, minor=True)
        ax.set_yticks(np.arange(rows + 1) - 0.5, minor=True)
        ax.grid(which="minor", color="white", linewidth=0.8)
        ax.tick_params(which="minor", length=0)
    _frame_grid(ax, rows, cols)
    where = ", ".join(str(i) for i in position)
    ax.set_title(f"output {' x '.join(str(n) for n in output_shape)}, position ({where})", fontsize=10)
    if len(output_shape) == 1:
        ax.set_xlabel("output index")
        ax.set_aspect("auto")
        ax.tick_params(axis="y", which="both", left=False, labelleft=False)
    else:
        ax.set_xlabel("output w")
        ax.set_ylabel("output h")


def _frame_grid(ax: Axes, rows: int, cols: int) -> None:
    """Fits the view to a ``(rows, cols)`` grid of unit cells, row 0 at the top, with integer ticks."""
    ax.set_aspect("equal")
    ax.set_xlim(-0.5, cols - 0.5)
    ax.set_ylim(rows - 0.5, -0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
