"""Matplotlib figures of receptive fields: one field on its input and output grids, an effective field, its growth."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from rf_callback.core.layouts import AXIS_NAMES
from rf_callback.core.result import EffectiveField, ReceptiveField
from rf_callback.plotting.drawing import (
    _checked_field,
    _depth_slices,
    _draw_panels,
    _figure_size,
    _layout,
    _normalised_heatmap,
    _prepared_image,
    _set_title,
)
from rf_callback.plotting.style import _BOX_GID, _EXTENT_COLOR, _EXTENT_GID, _TARGET_COLOR, _TARGET_GID, ImageLike

__all__ = ["plot_effective", "plot_growth", "plot_rf"]


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
    panels = [ax for ax in fig.axes if any(patch.get_gid() == _BOX_GID for patch in ax.patches)]
    # A 3D field is drawn as depth slices: each box goes on the slices its depth range holds (pixel d covers d +- 0.5)
    depths: list[int | None] = [*_depth_slices(shown)] if len(extent) == 3 else [None] * len(panels)
    for ax, depth in zip(panels, depths, strict=True):
        (top, bottom), (left, right) = box
        if depth is None or extent[0][0] <= depth <= extent[0][1]:
            ax.add_patch(
                Rectangle(
                    (left - 0.5, top - 0.5), right - left + 1, bottom - top + 1, facecolor="none",
                    edgecolor=_EXTENT_COLOR, linewidth=2, linestyle="--", gid=_EXTENT_GID,
                )
            )  # fmt: skip
        center = field.theoretical.center
        if target is not None and (depth is None or abs(depth - center[0]) < (target[0] + 1) / 2):
            ax.add_patch(_target_box(center, target))
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
    target: Sequence[int] | int | None = None,
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
    target = (
        [] if target is None else [int(target)] if isinstance(target, (int, np.integer)) else [int(t) for t in target]
    )
    axes = AXIS_NAMES.get(len(target), ())
    for size in sorted(set(target)):  # one line per size; named by axis where the axes' targets differ
        named = "" if len(set(target)) == 1 else " " + ", ".join(a for a, t in zip(axes, target) if t == size)
        ax_extent.axhline(size, color="0.35", linestyle="--", linewidth=1.2, label=f"target{named} {size}")
    for ax, label in ((ax_extent, "mass extent (inputs)"), (ax_std, "standard deviation (inputs)")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(set(epochs)) == 1:  # one epoch: a span of 0.1 would get ticks at -0.04, 0.00, 0.04
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    return fig
