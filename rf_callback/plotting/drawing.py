"""The panels of a receptive-field figure, shared by plot_rf and animate_rf: checks, layout and drawing."""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.collections import LineCollection
from matplotlib.colors import ListedColormap, Normalize, to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from rf_callback.core.result import Bounds, ReceptiveField
from rf_callback.plotting.style import _BOX_COLOR, _BOX_GID, _CELL_GID, _HEATMAP_CMAP, _OVERLAY_ALPHA, ImageLike

_MAX_DEPTH_SLICES = 6
_CELL_BORDERS_UP_TO = 64  # output grids with at most this many cells per axis get white cell borders


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
    if 0 in field.size:  # a map's position that no input moves: bounds (0, -1)
        dead = ", or its units are dead there" if field.mode == "weights" else ""
        raise ValueError(
            f"the field at {field.position} is empty: no input position moves the output there (its window covers "
            f"only padding{dead}), so there is nothing to draw; plot a position with a field"
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


def _depth_slices(field: ReceptiveField) -> list[int]:
    """Up to ``_MAX_DEPTH_SLICES`` depth indices spread evenly over the field's depth, both ends included.

    The depth holding the most of the heatmap's mass and its centre of mass along depth are among them (each in
    place of the nearest spread one): a 7-deep field's six slices skipped its middle, the heaviest, and an
    effective field's extent box could lie on no slice drawn.
    """
    first, last = field.bounds[0]
    count = min(_MAX_DEPTH_SLICES, last - first + 1)
    depths = [int(d) for d in np.unique(np.rint(np.linspace(first, last, count)).astype(int))]
    if field.heatmap is None or len(depths) == last - first + 1:
        return depths
    mass = field.heatmap.detach().to("cpu", torch.float64).abs().flatten(1).sum(dim=1)
    if float(mass.sum()) <= 0:
        return depths
    indices = torch.arange(len(mass), dtype=torch.float64)
    kept = [int(mass.argmax()), round(float((mass * indices).sum() / mass.sum()))]
    for depth in dict.fromkeys(d for d in kept if first <= d <= last and d not in depths):
        movable = [i for i, d in enumerate(depths) if d not in kept and d not in (first, last)] or [
            i for i, d in enumerate(depths) if d not in kept
        ]
        if movable:
            depths[min(movable, key=lambda i: abs(depths[i] - depth))] = depth
    return sorted(depths)


def _figure_size(field: ReceptiveField) -> tuple[float, float]:
    """Returns the figure size in inches for ``field``'s layout."""
    n_axes = len(field.input_shape) - 2
    if n_axes == 1:
        return 10.0, 3.6
    if n_axes == 2:
        return 11.0, 4.8
    return 2.4 * len(_depth_slices(field)) + 1.5, 3.4


def _layout(fig: Figure, field: ReceptiveField, *, colorbar: bool) -> tuple[list[Axes], Axes | None]:
    """Adds the empty panels for ``field`` to ``fig``: its input axes, and its output axes (``None`` for 3D).

    The colorbar of the normalised heatmap is drawn here, once: it does not depend on the field.
    """
    n_axes = len(field.input_shape) - 2
    if n_axes == 3:
        inputs, output = list(fig.subplots(1, len(_depth_slices(field)), squeeze=False)[0]), None
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
    """Draws ``field`` into the empty panels :func:`_layout` made: the one drawing path of plot_rf and animate_rf."""
    spatial = tuple(field.input_shape[2:])
    if len(spatial) == 3:
        for ax, depth in zip(inputs, _depth_slices(field), strict=True):
            _draw_input_grid(
                ax,
                (spatial[1], spatial[2]),
                None if heat is None else heat[depth],
                None if image is None else image[depth],
                (field.bounds[1], field.bounds[2]),
                " x ".join(str(s) for s in field.size[1:]) if annotate else None,
            )
            ax.set_title(f"input d = {depth}", fontsize=10)
            ax.set_xlabel("input w")
        inputs[0].set_ylabel("input h")
        return
    (ax_in,) = inputs
    one_d = len(spatial) == 1
    grid = (1, spatial[0]) if one_d else (spatial[0], spatial[1])
    _draw_input_grid(
        ax_in,
        grid,
        None if heat is None else heat.reshape(grid),
        None if image is None else image.reshape(*grid, *image.shape[len(spatial) :]),
        ((0, 0), field.bounds[0]) if one_d else (field.bounds[0], field.bounds[1]),
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
    assert output is not None, "_layout makes an output panel for 1D and 2D fields"
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
        # One collection of lines, not a minor tick per border: ticks cost the layout a text box each.
        across = [[(-0.5, y), (cols - 0.5, y)] for y in np.arange(1, rows) - 0.5]
        down = [[(x, -0.5), (x, rows - 0.5)] for x in np.arange(1, cols) - 0.5]
        ax.add_collection(LineCollection(across + down, colors="white", linewidths=0.8, zorder=0.5))
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
