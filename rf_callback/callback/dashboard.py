"""The names the callback logs under, and the charts that put them together (no Lightning, no matplotlib).

Tags name a position by its index in ``pos`` (``pos0``, ``pos1``, ...), not by its coordinates, so two runs
probed at different positions (a shallow and a deep network, whose output maps differ) share charts. Which cell
each index is, is written once per fit as a text note (:func:`positions_note`).

Scalars, for layer ``L``, position ``posI`` and spatial axis ``a`` (``l``; ``h``, ``w``; or ``d``, ``h``, ``w``),
in the order the story reads. TensorBoard sorts tags treating ``/``, ``_`` and digits as equal separators (so
``rf_effective/features`` would come before ``rf/features``: ``e`` < ``f``); the hyphens keep ``rf`` first whatever
the layer's name, then ``rf-effective``, then ``rf-span``:

- ``rf/L/posI/size_a/{theoretical,weights,effective,target}``: the sizes that answer "does it look far enough?";
- ``rf/L/posI/target/{covered,margin}``: whether the effective extent covers the target, and by how much;
- ``rf-effective/L/posI/{ratio_a,offset_a,spread_a}``: the effective extent over the theoretical size, the centre
  of mass's offset from the theoretical centre, and the standard deviation (every metric with ``"all"``);
- ``rf-span/L/posI/{theoretical,weights}/{first_a,last_a}``: the first and last input index of the field.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from rf_callback.core.layouts import AXIS_NAMES
from rf_callback.core.result import EffectiveField, ReceptiveField

__all__ = [
    "EFFECTIVE_SCALARS",
    "chart_layout",
    "coverage_scalars",
    "effective_scalars",
    "field_scalars",
    "image_tag",
    "size_scalars",
    "note_tag",
    "positions_note",
    "target_scalars",
]

EFFECTIVE_SCALARS = ("summary", "all")  # the effective-field scalars logged: the summary, or every metric
_SUMMARY = {"extent{q}_ratio_{a}": "ratio_{a}", "com_offset_{a}": "offset_{a}", "std_{a}": "spread_{a}"}


def _base(group: str, layer: str, index: int) -> str:
    return f"{group}/{layer}/pos{index}"


def size_scalars(layer: str, index: int, field: ReceptiveField, kind: str) -> dict[str, float]:
    """The size of a probed field along each axis.

    Args:
        layer: the probed layer as logged (``output``, or its dotted name).
        index: the position's index in ``pos``.
        field: the probed field.
        kind: ``"theoretical"`` or ``"weights"``.

    Returns:
        ``rf/L/posI/size_a/<kind>`` for every axis.
    """
    names = AXIS_NAMES[len(field.bounds)]
    return {f"{_base('rf', layer, index)}/size_{axis}/{kind}": float(size) for axis, size in zip(names, field.size)}


def field_scalars(layer: str, index: int, field: ReceptiveField, kind: str) -> dict[str, float]:
    """The size, first and last index of a probed field along each axis.

    Args:
        layer: the probed layer as logged (``output``, or its dotted name).
        index: the position's index in ``pos``.
        field: the probed field.
        kind: ``"theoretical"`` or ``"weights"``.

    Returns:
        :func:`size_scalars`, and ``rf-span/L/posI/<kind>/{first_a,last_a}`` for every axis.
    """
    metrics = size_scalars(layer, index, field, kind)
    for axis, (first, last) in zip(AXIS_NAMES[len(field.bounds)], field.bounds):
        metrics[f"{_base('rf-span', layer, index)}/{kind}/first_{axis}"] = float(first)
        metrics[f"{_base('rf-span', layer, index)}/{kind}/last_{axis}"] = float(last)
    return metrics


def target_scalars(layer: str, index: int, target: Sequence[int]) -> dict[str, float]:
    """The target size along each axis, logged beside the sizes so the charts draw it as a line.

    Args:
        layer: the probed layer as logged.
        index: the position's index in ``pos``.
        target: the target size, one per spatial axis.

    Returns:
        ``rf/L/posI/size_a/target`` for every axis.
    """
    names = AXIS_NAMES[len(target)]
    return {f"{_base('rf', layer, index)}/size_{axis}/target": float(t) for axis, t in zip(names, target)}


def effective_scalars(
    layer: str, index: int, field: EffectiveField, metrics: dict[str, float], q: float, *, full: bool
) -> dict[str, float]:
    """The effective field's extent beside the sizes, and its summary (or every metric) in ``rf-effective``.

    Args:
        layer: the probed layer as logged.
        index: the position's index in ``pos``.
        field: the effective field (its number of axes names them).
        metrics: ``field.metrics((q,))`` without its ``None`` values.
        q: the mass fraction of the extent.
        full: log every metric (RepLKNet areas, centres of mass, ...), not only the summary.

    Returns:
        ``rf/L/posI/size_a/effective`` and ``rf-effective/L/posI/{ratio_a,offset_a,spread_a}`` (and, with
        ``full``, every other metric under its own name).
    """
    base = _base("rf-effective", layer, index)
    logged, summarised = {}, set()
    for axis in AXIS_NAMES[field.heatmap.dim()]:
        extent = f"extent{q:g}_{axis}"
        logged[f"{_base('rf', layer, index)}/size_{axis}/effective"] = float(metrics[extent])
        summarised.add(extent)
        for source, name in _SUMMARY.items():
            key = source.format(q=f"{q:g}", a=axis)
            logged[f"{base}/{name.format(a=axis)}"] = float(metrics[key])
            summarised.add(key)
    if full:
        logged.update({f"{base}/{key}": float(value) for key, value in metrics.items() if key not in summarised})
    return logged


def no_effective_scalars(layer: str, index: int, n_axes: int) -> dict[str, float]:
    """The extent of a position whose output no longer depends on the inputs (a zero gradient map): 0 on each axis.

    Logged in place of :func:`effective_scalars`, so a monitor of the extent reads 0, not the last live value;
    the summary (ratio, offset, spread) has no value to log.

    Args:
        layer: the probed layer as logged.
        index: the position's index in ``pos``.
        n_axes: the number of spatial axes.

    Returns:
        ``rf/L/posI/size_a/effective`` = 0 for every axis.
    """
    return {f"{_base('rf', layer, index)}/size_{axis}/effective": 0.0 for axis in AXIS_NAMES[n_axes]}


def coverage_scalars(layer: str, index: int, covered: bool, margin: float) -> dict[str, float]:
    """Whether the effective extent covers the target (1 or 0), and the smallest extent minus target over the axes.

    Args:
        layer: the probed layer as logged.
        index: the position's index in ``pos``.
        covered: the coverage tracker's state.
        margin: the smallest extent minus target over the axes.

    Returns:
        ``rf/L/posI/target/covered`` and ``rf/L/posI/target/margin``.
    """
    base = _base("rf", layer, index)
    return {f"{base}/target/covered": float(covered), f"{base}/target/margin": float(margin)}


def image_tag(layer: str, index: int, name: str) -> str:
    """The tag of an image: ``rf/L/posI/<name>`` (``heatmap/weights``, ``figure``, ``overlay``, ``growth``, ...).

    Args:
        layer: the probed layer as logged.
        index: the position's index in ``pos``.
        name: what the image shows.

    Returns:
        The tag.
    """
    return f"{_base('rf', layer, index)}/{name}"


def chart_layout(
    layer: str, positions: int, axes: int, *, target: bool = True, effective: bool = True
) -> dict[str, dict[str, list[str]]]:
    """Charts overlaying, per position and axis, the theoretical, weights, effective and target sizes.

    Chart titles hold the layer and position index only, so the layouts of two runs merge into the same charts.

    Args:
        layer: the probed layer as logged.
        positions: how many positions are probed.
        axes: how many spatial axes the input has.
        target: a target size is logged: add the charts of its coverage and margin (with the effective field).
        effective: the effective field is logged: add the chart of its extent over the theoretical size.

    Returns:
        ``{category: {chart title: [tag regex, ...]}}``: one category per layer; per position a chart per axis
        (the four sizes), then, where logged, whether the target is covered, the margin, and the effective extent
        over the theoretical size.
    """
    charts: dict[str, list[str]] = {}
    escaped = re.escape(layer)
    for index in range(positions):
        base = f"rf/{escaped}/pos{index}"
        for axis in AXIS_NAMES[axes]:
            charts[f"{layer} · pos{index} · size along {axis}"] = [f"^{base}/size_{axis}/"]
        if target and effective:
            charts[f"{layer} · pos{index} · covers the target (1 = yes)"] = [f"^{base}/target/covered$"]
            charts[f"{layer} · pos{index} · margin: effective extent − target"] = [f"^{base}/target/margin$"]
        if effective:
            charts[f"{layer} · pos{index} · effective extent / theoretical size"] = [
                f"^rf-effective/{escaped}/pos{index}/ratio_"
            ]
    return {f"receptive field of {layer}": charts}


def note_tag(layer: str) -> str:
    """The tag of the note saying which cell each position index is: ``rf/L/positions``.

    Args:
        layer: the probed layer as logged.

    Returns:
        The tag.
    """
    return f"rf/{layer}/positions"


def positions_note(
    layer: str, fields: Sequence[ReceptiveField | None], target: Sequence[int] | None, *, effective: bool = False
) -> str:
    """A Markdown note saying which output cell each position index is, and its theoretical field.

    Args:
        layer: the probed layer as logged.
        fields: the theoretical fields, in the order of ``pos`` (``None`` for a position off the map of validation
            inputs shaped otherwise).
        target: the target size per axis, or ``None``.
        effective: the fields are the effective field's, on validation inputs shaped unlike the probed input.

    Returns:
        The note.
    """
    shape = " × ".join(map(str, next(f for f in fields if f is not None).input_shape[1:]))
    heading = (
        f"Effective field of `{layer}` (validation inputs {shape})"
        if effective
        else f"Receptive field of `{layer}` (input {shape})"
    )
    lines = [f"{heading}:", ""]
    for index, field in enumerate(fields):
        if field is None:
            lines.append(f"- **pos{index}**: off the output map of these inputs: no effective field")
            continue
        output = " × ".join(map(str, field.output_shape))
        size = " × ".join(map(str, field.size))
        spans = ", ".join(f"{first}..{last}" for first, last in field.bounds)
        lines.append(f"- **pos{index}**: output cell {field.position} of a {output} map: theoretical field {size}"
                     f" (input indices {spans})")  # fmt: skip
    if target is not None:
        lines += ["", f"Target object size: {' × '.join(map(str, target))}."]
    return "\n".join(lines)


def position_label(position: tuple[int, ...]) -> str:
    """A cell's key in the history's effective metrics and the coverage trackers, e.g. ``"8_8"``.

    Args:
        position: the output cell.

    Returns:
        Its indices joined by underscores.
    """
    return "_".join(str(i) for i in position)
