"""Many output positions per backward pass: lattices of positions whose fields cannot touch, and the per-axis table.

A field is a box, so the theoretical bounds along one axis depend on the index along that axis alone. One backward
pass from a lattice of positions spaced so their fields are apart splits, projected on each axis, into one run per
lattice index; ``max_a g_a`` such passes measure every position's bounds.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rf_callback.core.geometry import MIN_WHOLE_FIELDS, Bounds, is_whole, whole_fields
from rf_callback.core.graph import ProbeGraph
from rf_callback.core.support import (
    Box,
    Position,
    box_of,
    box_slices,
    hull,
    inside_boxes,
    largest_hole,
    marginal,
    runs,
)

_MAX_CODED_MEMBERS = 4096  # members of one lattice pass whose pairing one coded pass can check in float32
# How far a coded pass may stray from the codes times the plain one, relative: far above the rounding of two
# backward passes that differ by integer factors, far below a leak of a few percent of the owner's gradient (a
# quarter of a unit over the member count let a weak far tap of one position hide in its neighbours' boxes).
_CODED_TOLERANCE = 2e-4


@dataclass
class AxisTable:
    """Per axis, the theoretical bounds of each measured output index, and the smallest gap between two fields.

    Attributes:
        table: per axis, ``{output index: (first, last) or None}`` (``None``: the field is empty on that axis).
        gaps: per axis, one more than the largest hole inside the centre field (dilation); fields at least this far
            apart are told apart.
    """

    table: list[dict[int, Bounds | None]]
    gaps: list[int]

    def box(self, position: Position) -> Box | None:
        """The predicted box of ``position``, ``None`` where an axis has no field or was not measured."""
        bounds = [self.table[a].get(i) for a, i in enumerate(position)]
        box = tuple(b for b in bounds if b is not None)
        return box if len(box) == len(bounds) else None

    def conclusive(self, axis: int, length: int) -> bool:
        """Whether the table holds enough certainly unclipped fields along ``axis`` to decide its geometry."""
        return len(whole_fields(self.table[axis], length, self.gaps[axis])) >= MIN_WHOLE_FIELDS


def lattice(anchor: Position, spacing: Sequence[int], output_shape: Sequence[int]) -> list[list[int]]:
    """Per axis, the indices of the lattice through ``anchor`` with the given spacing."""
    return [list(range(a % g, n, g)) for a, g, n in zip(anchor, spacing, output_shape)]


def spacing_for_gap(table: list[dict[int, Bounds | None]], gaps: Sequence[int]) -> list[int]:
    """Per axis, the smallest lattice spacing whose fields are separated by at least ``gaps[a]`` empty inputs."""
    spacing = []
    for axis_table, gap in zip(table, gaps):
        n = max(axis_table, default=0) + 1
        first, last = torch.zeros(n, dtype=torch.int64), torch.full((n,), -1, dtype=torch.int64)
        valid = torch.zeros(n, dtype=torch.bool)
        for index, bounds in axis_table.items():
            if bounds is not None:
                first[index], last[index], valid[index] = bounds[0], bounds[1], True
        g = 1
        while g < n and not _lattice_separated(first, last, valid, g, gap):
            g += 1
        spacing.append(g)
    return spacing


def _lattice_separated(first: torch.Tensor, last: torch.Tensor, valid: torch.Tensor, spacing: int, gap: int) -> bool:
    n = len(first)
    for shift in range(spacing, n, spacing):
        a, b = slice(0, n - shift), slice(shift, n)
        apart = (first[b] - last[a] - 1 >= gap) | (first[a] - last[b] - 1 >= gap)
        if (valid[a] & valid[b] & ~apart).any():
            return False
    return True


def groups(positions: Sequence[Position], spacing: Sequence[int]) -> list[list[Position]]:
    """Buckets positions by their residues modulo the lattice spacing: each bucket's fields are pairwise apart."""
    buckets: dict[Position, list[Position]] = {}
    for p in positions:
        buckets.setdefault(tuple(i % g for i, g in zip(p, spacing)), []).append(p)
    return list(buckets.values())


class PassLimit(Exception):
    """Measuring the table would take more backward passes than ``measure_axis_table``'s ``max_passes``."""


def measure_axis_table(
    graph: ProbeGraph,
    *,
    full: bool,
    known: dict[Position, torch.Tensor] | None = None,
    centre_is_whole: Callable[[int, torch.Tensor], bool] | None = None,
    max_passes: int | None = None,
) -> AxisTable | None:
    """Measures the theoretical bounds along each axis, as a function of the index along that axis alone.

    A pilot pass from the centre position (the least clipped) gives the field's size and the largest hole inside
    it (dilation). Along an axis where that field is cut by the input's ends (it comes near them, or
    ``centre_is_whole(axis, support)`` says it changes on a longer input), its holes may be hidden, and fields that
    look apart may interleave: every index gets a pass of its own along that axis. Then each pass backpropagates
    from a whole lattice of positions spaced so that their fields should not touch, and reads every lattice index's
    bounds from the runs of the support projected on each axis. A pass whose runs do not match its indices, or
    whose positions do not fill their boxes exactly, is retried with twice the spacing. ``full`` measures every
    index (else one lattice through the centre); ``known`` holds exact single-position supports already computed,
    which join the table. The full table is checked against exact single-position passes at the corners, the
    centre and two random positions; on any disagreement (a field that is not a box) this returns None and callers
    fall back to one pass per position. ``max_passes``: past that many backward passes, it raises
    :class:`PassLimit`.
    """
    shape = graph.output_shape
    known = dict(known or {})
    anchor = graph.center
    limit = None if max_passes is None else graph.passes + max_passes
    if anchor not in known:
        known[anchor] = graph.support([anchor])
    pilot = known[anchor]
    table: list[dict[int, Bounds | None]] = [{} for _ in shape]
    for position, support in known.items():
        if support.any():  # an empty field does not tell which axis emptied it
            for axis in range(len(shape)):
                table[axis][position[axis]] = hull(marginal(support, axis))
    gaps, spacing = [], []
    for axis, n in enumerate(shape):
        mask = marginal(pilot, axis)
        pilot_hull = hull(mask)
        gaps.append(largest_hole(mask) + 1)
        size = 1 if pilot_hull is None else pilot_hull[1] - pilot_hull[0] + 1
        stride = max(1, graph.spatial_input_shape[axis] // n)
        whole = is_whole(pilot_hull, graph.spatial_input_shape[axis], gaps[-1])
        if not whole or (centre_is_whole is not None and not centre_is_whole(axis, pilot)):
            # A field cut by the input's ends can hide its holes (dilation), and then fields of a lattice would
            # interleave unseen: one index per pass along this axis.
            spacing.append(n)
            continue
        spacing.append(min(n, _spaced(math.ceil((size + gaps[-1]) / stride), full)))
    todo = [set(range(n)) if full else {anchor[a]} for a, n in enumerate(shape)]
    lattice_done = False
    while any(todo[a] - table[a].keys() for a in range(len(shape))) or not lattice_done:
        if limit is not None and graph.passes > limit:
            raise PassLimit
        start = tuple(min(todo[a] - table[a].keys(), default=anchor[a]) for a in range(len(shape)))
        decoded = _decode_lattice(graph, lattice(start, spacing, shape), gaps)
        if decoded is None:
            if all(g >= n for g, n in zip(spacing, shape)):
                return None
            spacing = [min(n, _spaced(2 * g, full)) for g, n in zip(spacing, shape)]
            continue
        for axis, bounds in enumerate(decoded):
            for index, b in bounds.items():
                if table[axis].setdefault(index, b) != b:
                    return None
        lattice_done = True
    result = AxisTable(table=table, gaps=gaps)
    if full and not _agrees_with_exact_passes(graph, result, known):
        return None
    return result


def _spaced(spacing: int, full: bool) -> int:
    """A lattice's spacing along an axis: ``spacing``, or coprime to small periods for one lattice alone.

    A full table's lattices go through every index, whatever their spacing (a coprime one would take more passes:
    11 x 11 lattices for 4 x 4); one lattice through the centre must see every phase of fields that repeat.
    """
    return max(1, spacing) if full else coprime_to_small_periods(spacing)


def coprime_to_small_periods(spacing: int) -> int:
    """The smallest spacing at least ``spacing`` (and 1) that shares no factor with 2, 3, 5 or 7.

    Fields that repeat with such a period (an upsampling path, a transposed convolution whose odd outputs are empty,
    a strided slice) then show every phase in a lattice through the centre; an even spacing read one parity only,
    and a geometry fitted to it was wrong for the other.
    """
    spacing = max(1, spacing)
    while any(spacing % p == 0 for p in (2, 3, 5, 7)) and spacing > 1:
        spacing += 1
    return spacing


def _decode_lattice(graph: ProbeGraph, indices: list[list[int]], gaps: list[int]) -> list[dict] | None:
    members = list(itertools.product(*indices))
    if len(members) > _MAX_CODED_MEMBERS:
        return None  # the caller retries with a sparser lattice
    values = graph.gradient_map(members)
    support = values > 0
    if not support.any():
        return None
    decoded = []
    for axis, axis_indices in enumerate(indices):
        mask = marginal(support, axis)
        if len(axis_indices) == 1:
            decoded.append({axis_indices[0]: hull(mask)})
            continue
        found = runs(mask, gaps[axis])
        if len(found) != len(axis_indices):
            return None
        decoded.append(dict(zip(axis_indices, found)))
    for p in members:
        bounds = [decoded[a][i] for a, i in enumerate(p)]
        box = tuple(b for b in bounds if b is not None)
        if len(box) != len(bounds):
            return None
        if box_of(support[box_slices(box)]) != tuple((0, last - first) for first, last in box):
            return None
    if len(members) > 1 and not _pairing_holds(graph, members, indices, decoded, values):
        return None
    return decoded


def _pairing_holds(
    graph: ProbeGraph, members: list[Position], indices: list[list[int]], decoded: list[dict], values: torch.Tensor
) -> bool:
    """Whether each run decoded along an axis belongs to the lattice index it was paired with.

    Runs are paired with indices in sorted order, which assumes the fields move along the axis as the index does; a
    concatenation along a spatial axis, a flip or a permutation breaks that, and a swapped pair fills the same
    support. Each member's code is ``1 + Σ_a rank_a · radix_a``, laid out per axis (see :func:`_codes_hold`).
    """
    radix = [math.prod(len(axis_indices) for axis_indices in indices[:axis]) for axis in range(len(indices))]
    ranks = [{index: rank for rank, index in enumerate(axis_indices)} for axis_indices in indices]
    codes = [1 + sum(ranks[a][i] * radix[a] for a, i in enumerate(member)) for member in members]
    expected = torch.ones_like(values)
    for axis, bounds in enumerate(decoded):
        along = torch.zeros(values.shape[axis], dtype=values.dtype)
        for index, run in bounds.items():
            if run is not None:
                along[run[0] : run[1] + 1] = ranks[axis][index] * radix[axis]
        view = [1] * values.dim()
        view[axis] = -1
        expected = expected + along.view(view)
    return _codes_hold(graph, members, codes, expected, values)


def boxes_hold(graph: ProbeGraph, members: list[Position], boxes: list[Box | None], values: torch.Tensor) -> bool:
    """Whether each member's gradient in a shared pass lies in its own box, not in another member's.

    ``values`` is the gradient map of the pass from all ``members`` at once; ``boxes`` their predicted boxes
    (``None``: a field predicted empty). The support must lie inside the boxes, and a field that leaks into another
    member's box (a prediction that missed how the field depends on the other axes' indices, as branches
    interleaved by a pixel shuffle) mixes two members' codes there (see :func:`_codes_hold`).
    """
    if not inside_boxes(values > 0, boxes):
        return False
    if len(members) == 1:
        return True  # a pass of its own
    if len(members) > _MAX_CODED_MEMBERS:
        return False
    codes = list(range(1, len(members) + 1))
    expected = torch.zeros_like(values)
    for box, code in zip(boxes, codes):
        if box is not None:  # a field predicted empty: its gradient would show in another's box, or outside all
            expected[box_slices(box)] = code
    return _codes_hold(graph, members, codes, expected, values)


def _codes_hold(
    graph: ProbeGraph, members: list[Position], codes: list[int], expected: torch.Tensor, values: torch.Tensor
) -> bool:
    """Whether a pass that weights each member by its code gives ``expected`` (the codes laid out) times ``values``.

    Gradients are linear in the cotangent and the members' fields should be disjoint, so inside each member's box
    the weighted map must be the unweighted one times that member's code; a field that reaches into another's box
    mixes two codes there, off by the leak times the codes' difference (at least 1). The tolerance is rounding's
    alone: a leak under ``_CODED_TOLERANCE`` times the owner's code of the owner's own gradient there goes unseen
    (it takes passes of one position each to tell).
    """
    weighted = graph.gradient_map(members, scale=codes)
    support = values > 0
    if not torch.equal(weighted > 0, support):
        return False
    scaled = expected[support] * values[support]
    # Not looser in 16 bits: a 16-bit pass's rounding fails the check (its positions get passes of their own), where
    # twice its unit let a leak of 1.6 % pass.
    return bool(((weighted[support] - scaled).abs() <= _CODED_TOLERANCE * scaled).all())


def _agrees_with_exact_passes(graph: ProbeGraph, axes: AxisTable, known: dict[Position, torch.Tensor]) -> bool:
    """Checks predicted boxes against exact single-position passes.

    The positions are the corners, the centre and two positions drawn from a private generator. Each gets a
    pass of its own (or reuses one already run): a shared pass could be fooled the way a lattice pass can, by
    fields whose holes (dilation) interleave.
    """
    shape = graph.output_shape
    samples = set(itertools.product(*({0, n - 1} for n in shape)))
    samples.add(graph.center)
    generator = torch.Generator().manual_seed(len(shape) * 7919 + sum(shape))
    for _ in range(2):
        samples.add(tuple(int(torch.randint(n, (1,), generator=generator)) for n in shape))
    for p in sorted(samples):
        support = known[p] if p in known else graph.support([p])
        if box_of(support) != axes.box(p):
            return False
    return True
