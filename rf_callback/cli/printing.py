"""The results as ``rf-probe`` prints them: a field, a whole output map or a per-layer table, as text or as JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from rf_callback.core.layouts import CHANNELS_FIRST
from rf_callback.core.result import ReceptiveField, ReceptiveFieldMap
from rf_callback.core.table import LayerField


def field_text(spec: str, field: ReceptiveField, target: tuple[int, ...] | None) -> str:
    """The field at one output position, one ``key value`` line each, and whether it covers the target.

    Args:
        spec: the model's ``MODULE:CALLABLE``, named on the first line.
        field: the probe's result.
        target: ``--target-size``, one size per spatial axis; ``None`` when not given.

    Returns:
        The text, without a final newline.
    """
    pairs = [
        ("model", spec),
        ("input", str(tuple(field.input_shape))),
        ("layer", field.layer or "(model output)"),
        ("output", f"{_axes(field.output_shape)} ({field.mode}{_layout_note(field.layout)})"),
        ("position", str(field.position)),
        ("size", _axes(field.size)),
        ("bounds", ", ".join(f"{first}..{last}" for first, last in field.bounds)),
        ("stride", _axes(field.stride)),
        ("offset", _axes(field.offset)),
        ("span", ", ".join(f"{first}..{last}" for first, last in field.span)),
        ("center", ", ".join(f"{c:.15g}" for c in field.center)),  # :g keeps 6 digits: 1.2e+06
    ]
    if target is not None:
        verdict = "covered" if _covers(field.size, target) else f"not covered by this {_axes(field.size)} field"
        pairs.append(("target", f"{_axes(target)}: {verdict}{_input_note(field.input_shape, target)}"))
    text = _lines(pairs)
    if any(s is None for s in field.stride):
        text += "\n(-: no single stride describes the fields on this axis, e.g. an upsampling path)"
    return text


def field_json(field: ReceptiveField, target: tuple[int, ...] | None) -> str:
    """The field at one output position as one JSON object: its ``to_dict()``, and whether it covers the target.

    Args:
        field: the probe's result.
        target: ``--target-size``, one size per spatial axis; ``None`` when not given.

    Returns:
        The JSON text, on one line.
    """
    record = field.to_dict()
    if target is not None:
        record.update(target_size=list(target), covers_target=_covers(field.size, target))
    return json.dumps(record)


def map_text(spec: str, fmap: ReceptiveFieldMap, target: tuple[int, ...] | None) -> str:
    """The fields over a whole output map: their range of sizes, the geometry, and how many cover the target.

    Args:
        spec: the model's ``MODULE:CALLABLE``, named on the first line.
        fmap: the probe's result for ``--pos all``.
        target: ``--target-size``, one size per spatial axis; ``None`` when not given.

    Returns:
        The text, without a final newline.
    """
    sizes = fmap.size.reshape(-1, len(fmap.input_shape) - 2)
    geometry = fmap.geometry
    pairs = [
        ("model", spec),
        ("input", str(tuple(fmap.input_shape))),
        ("layer", fmap.layer or "(model output)"),
        ("output", f"{_axes(fmap.output_shape)} ({fmap.mode}{_layout_note(fmap.layout)}), {len(fmap)} positions"),
        ("size", f"{_axes(sizes.min(dim=0).values.tolist())} to {_axes(sizes.max(dim=0).values.tolist())}"),
        ("full size", _axes([None if g is None else g.size for g in geometry])),
        ("stride", _axes([None if g is None else g.stride for g in geometry])),
        ("offset", _axes([None if g is None else g.offset for g in geometry])),
    ]
    if target is not None:
        covering = _covering_count(fmap, target)
        pairs.append(
            ("target", f"{_axes(target)}: covered at {covering} of {len(fmap)} positions"
             f"{_input_note(fmap.input_shape, target)}")
        )  # fmt: skip
    return _lines(pairs)


def map_json(fmap: ReceptiveFieldMap, target: tuple[int, ...] | None) -> str:
    """The fields over a whole output map as one JSON object: its ``to_dict()``, and how many cover the target.

    Args:
        fmap: the probe's result for ``--pos all``.
        target: ``--target-size``, one size per spatial axis; ``None`` when not given.

    Returns:
        The JSON text, on one line.
    """
    record = fmap.to_dict()
    if target is not None:
        record.update(target_size=list(target), positions_covering_target=_covering_count(fmap, target))
    return json.dumps(record)


def table_text(
    spec: str, shape: tuple[int, ...], mode: str, rows: list[LayerField], target: tuple[int, ...] | None
) -> str:
    """One row per layer (the field at the centre of its output), footnotes, and the first layer covering the target.

    Args:
        spec: the model's ``MODULE:CALLABLE``, named on the first line.
        shape: the input shape, with its batch axis.
        mode: ``--mode``.
        rows: ``rf_table``'s rows.
        target: ``--target-size``, one size per spatial axis; ``None`` when not given.

    Returns:
        The text, without a final newline.
    """
    header: tuple[str, ...] = ("layer", "type", "output", "size", "full size", "stride", "offset", "")
    cells: list[tuple[str, ...]] = [
        (r.name, r.module_type, _axes(r.output_shape), _axes(r.size), _axes(r.full_size), _axes(r.stride),
         _axes(r.offset), "*" if r.covers_input else "")
        for r in rows
    ]  # fmt: skip
    if any(r.layout != CHANNELS_FIRST for r in rows):  # how each output was read, after its shape
        header = (*header[:3], "layout", *header[3:])
        cells = [(*c[:3], r.layout, *c[3:]) for c, r in zip(cells, rows)]
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
    lines = [f"{spec} on input {shape}, field at the centre of each layer's output ({mode}):"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *cells]]
    if any(r.covers_input for r in rows):
        lines.append(
            "* the field spans the whole input (size: its bounds' extent, clipped to the input; full size: its "
            "unclipped size r): later layers on this path cannot see more of this input"
        )
    if any(s is None for r in rows for s in r.stride):
        lines.append("- no single stride describes the fields on this axis (e.g. an upsampling path)")
    if not rows:
        lines.append("(no rows: every layer was left out, for the reasons the warnings above give)")
    if target is not None:
        first = next((r for r in rows if _covers(r.size, target)), None)
        if not rows:
            lines.append(f"target {_axes(target)}: no row to compare it with")
        elif first is None:
            largest = max(rows, key=lambda r: math.prod(r.size), default=None)
            where = f" (largest: {_axes(largest.size)} at {largest.name})" if largest else ""
            lines.append(f"target {_axes(target)}: no layer covers it{where}{_input_note(shape, target)}")
        else:
            lines.append(f"target {_axes(target)}: first covered by {first.name} ({first.module_type}, field "
                         f"{_axes(first.size)})")  # fmt: skip
    return "\n".join(lines)


def table_json(rows: list[LayerField], target: tuple[int, ...] | None) -> str:
    """One JSON list of the rows' ``to_dict()``, each saying whether its field covers the target.

    Args:
        rows: ``rf_table``'s rows.
        target: ``--target-size``, one size per spatial axis; ``None`` when not given.

    Returns:
        The JSON text, on one line.
    """
    records = [row.to_dict() for row in rows]
    if target is not None:
        for record, row in zip(records, rows):
            record["covers_target"] = _covers(row.size, target)
    return json.dumps(records)


def _axes(values: Sequence[Any]) -> str:
    return " x ".join("-" if v is None else str(v) for v in values)


def _layout_note(layout) -> str:
    return "" if layout == CHANNELS_FIRST else f", read as {layout}"


def _covers(size: Sequence[int], target: Sequence[int]) -> bool:
    return all(s >= t for s, t in zip(size, target))


def _input_note(input_shape: Sequence[int], target: Sequence[int]) -> str:
    spatial = input_shape[2:]
    if any(t > n for t, n in zip(target, spatial)):
        return f"; it is larger than the input ({_axes(spatial)}), so no field on it can cover it"
    return ""


def _lines(pairs: list[tuple[str, str]]) -> str:
    return "\n".join(f"{key:<10}{value}" for key, value in pairs)


def _covering_count(fmap: ReceptiveFieldMap, target: tuple[int, ...]) -> int:
    sizes = fmap.size.reshape(-1, len(target))
    return int((sizes >= sizes.new_tensor(target)).all(dim=1).sum())
