"""The numeric receptive-field probe: exact, n-dimensional, and many output positions per backward pass.

The flow: a theoretical or weights-mode graph of the copy (``graph``), one backward pass per position or per
lattice of disjoint fields (``lattice``), boxes read off the supports (``support``), and the geometry measured only
when asked for (``geometry_probe``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import warnings
from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from rf_callback.core.arguments import as_index, positions_of_index_columns
from rf_callback.core.geometry import AxisGeometry, Bounds, LazyGeometry, consistent, is_whole
from rf_callback.core.geometry_flow import checked_flow
from rf_callback.core.geometry_probe import NO_FIT, Budget, centre_field_is_whole, graph_factory, measure_geometry
from rf_callback.core.graph import (
    EveryValueFlushed,
    GraphShapes,
    ProbeError,
    ProbeGraph,
    Underflow,
    exact_kernels,
    where,
    with_article,
)
from rf_callback.core.lattice import (
    AxisTable,
    PassLimit,
    boxes_hold,
    groups,
    lattice,
    measure_axis_table,
    spacing_for_gap,
)
from rf_callback.core.layouts import CHANNELS_FIRST, Tokens
from rf_callback.core.model_copy import (
    ZEROS_PICK,
    constants_materialised,
    materialised_constants,
    prepared_copy,
    probe_scope,
    with_materialised_fallback,
)
from rf_callback.core.request import ProbeRequest
from rf_callback.core.result import ReceptiveField, ReceptiveFieldMap
from rf_callback.core.support import Box, Position, box_of, hull, largest_hole, marginal, restricted, runs

__all__ = ["ProbeError", "probe_rf"]

# Up to this many positions, one backward pass each is cheaper than measuring the table that lets them share passes.
_SHARED_PASSES_FROM = 9


def probe_rf(
    model: nn.Module,
    input_shape: Sequence[int],
    pos: str | int | Sequence[int] | Sequence[Sequence[int]] = "center",
    *,
    layer: str | None = None,
    mode: str = "theoretical",
    draws: int = 8,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    element: int | str | None = None,
    layout: str | Tokens = CHANNELS_FIRST,
    device: str | torch.device | None = None,
) -> ReceptiveField | list[ReceptiveField] | ReceptiveFieldMap:
    """Measures which input positions can influence an output position, by backpropagating from that position.

    The model itself is never touched: the probe runs on a deep copy in eval mode with every bias zeroed, and
    leaves the model's parameters, buffers, ``.grad``, ``requires_grad`` flags, train/eval modes, hooks and the
    global random states as it found them. It works inside ``torch.no_grad()`` and ``torch.inference_mode()``.

    Args:
        model: a network taking inputs shaped ``(N, C, *spatial)`` with 1, 2 or 3 spatial axes.
        input_shape: the full input shape ``(N, C, *spatial)``; ``N`` is ignored.
        pos: the output position(s): an index tuple (an int for 1D), a list of tuples, ``"center"`` (index
            ``n // 2`` on every axis), or ``"all"`` for the map of every position. Negative indices count from
            the end.
        layer: dotted name of a submodule (as in ``model.named_modules()``) whose output is probed instead of the
            model's, e.g. the last feature map of a classifier.
        mode: ``"theoretical"`` (the field of the architecture, whatever the weights: activations are treated as
            identities, max-pools as mean-pools over the same windows, normalisations as unit scales and every
            weight as a positive constant) or ``"weights"`` (what the current weights connect: the real network,
            bias-free, on ``draws`` random inputs; pruned or dead paths shrink it).
        draws: weights mode: how many random inputs the field is the union over.
        seed: weights mode: seed of the private generator that draws the inputs (the global one is not used).
        dtype: floating type the copy runs in. ``None`` (default): float32, redone in float64 when the smallest
            non-zero gradient comes within 8 orders of magnitude of float32's range, where the far tails of a very
            deep field could underflow to zero.
        element: where the probed output is a tuple, list, dict or dataclass of feature maps, the index (negative
            from the end) or key (field name) of the one to probe (required there: the probe never guesses).
        layout: how the probed output lays out its axes: ``"channels_first"`` (default, ``(N, C, *spatial)``),
            ``"channels_last"`` (``(N, *spatial, C)``, as a Swin stage or a ConvNeXt MLP returns it), or tokens on a
            grid, ``Tokens(grid=(H, W), prefix=P)`` or ``"tokens:HxW+P"`` (a ViT's ``(N, P + H*W, C)``, whose ``P``
            leading class or register tokens are dropped). ``pos`` is then an index on the spatial grid. An output
            whose shape does not fit the layout is refused (the probe never guesses a grid); a channels-last output
            with as many axes as a channels-first one cannot be told apart by its shape, so say which it is.
        device: where the probe's copy runs; ``None`` (default): the model's device. ``"cpu"`` probes a model on a
            GPU without taking GPU memory (its copy is made on the CPU directly).

    Returns:
        A :class:`ReceptiveField` (with heatmap) for one position, a list of them for a list of positions, or a
        :class:`ReceptiveFieldMap` of bounds for ``"all"``. Bounds and heatmaps cost one forward pass and as few
        backward passes as the positions need; the geometry (``geometry``, ``span``, ``stride``, ``offset``,
        ``center``, ``to_dict()``, ``str()``) is measured on first use, once for all fields of the call.

    Raises:
        ValueError: an argument is wrong (the message names it, the value given and what is allowed), or the output's
            shape does not fit ``layout``.
        ProbeError: the forward raised (chained), the output does not depend on the input, or the gradient is
            zero or not finite.
    """
    request = ProbeRequest.checked(
        model, input_shape, layer=layer, mode=mode, draws=draws, seed=seed, dtype=dtype, element=element,
        layout=layout, device=device,
    )  # fmt: skip

    def attempts():
        try:
            return _probe(model, request, pos)
        except EveryValueFlushed:
            try:
                return _probe(model, request.in_dtype(torch.float64), pos)
            except (ValueError, ProbeError):  # no float64 forward (a float32-only model): the zeros stand, and say why
                return _probe(model, dataclasses.replace(request, guard=False), pos)
        except Underflow:
            return _probe(model, request.in_dtype(torch.float64), pos)

    with _probe_context(request.device):
        return with_materialised_fallback(attempts)


@contextlib.contextmanager
def _probe_context(device: torch.device):
    """:func:`probe_scope` (gradients on, inference mode off, random states restored after), with exact kernels."""
    with probe_scope(device), exact_kernels(device):
        yield


def _probe(model: nn.Module, request: ProbeRequest, pos):
    prober = _Prober(model, request)
    positions, kind = normalised_positions(pos, prober.measured.output_shape, request.layer)
    if kind == "all":
        return prober.field_map()
    fields = prober.fields(positions)
    if isinstance(request.parsed_layout, Tokens):
        _warn_off_the_grid(fields, request.parsed_layout, request.layout, tuple(request.input_shape[2:]))
    return fields[0] if kind == "single" else fields


def _warn_off_the_grid(fields: list[ReceptiveField], tokens: Tokens, layout, lengths: tuple[int, ...]) -> None:
    """Warns where a token's field misses its own patch: the grid does not start after the prefix given.

    Register tokens after the patch tokens (as some models append them), read with their count as a prefix, shift
    the grid: token (0, 0) was patch (0, 4), and every position read another patch's field without a word. A
    token's field meets its own patch wherever the grid is the model's (an attention spans it, a stem's overlap
    holds it), so a field beside it shows the shift.
    """
    if not all(n % g == 0 for n, g in zip(lengths, tokens.grid)):
        return
    patch = [n // g for n, g in zip(lengths, tokens.grid)]
    for field in fields:
        own = [(p * s, (p + 1) * s - 1) for p, s in zip(field.position, patch)]
        if any(last < start or first > end for (start, end), (first, last) in zip(own, field.bounds)):
            shown = ", ".join(f"{start}..{end}" for start, end in own)
            warnings.warn(
                f"layout={layout!r}: the field of token {field.position} does not meet its own patch (input {shown}) "
                f"but reads {', '.join(f'{a}..{b}' for a, b in field.bounds)}: the tokens do not lie on the grid "
                f"after the {tokens.prefix} tokens given as the prefix (register tokens after the patch tokens, a "
                f"prefix of another length); probe a module that returns the patch tokens alone, or give the number "
                f"of tokens before the grid",
                stacklevel=6,  # probe_rf's caller
            )
            return


_POS_ALLOWED = "an index tuple (an int in 1D), a list of them, 'center' or 'all'"


def normalised_positions(pos, output_shape: tuple[int, ...], layer: str | None) -> tuple[list[Position], str]:
    """Resolves ``pos`` on an output map: its positions (indices from 0) and ``"single"``, ``"list"`` or ``"all"``.

    Indices may be numpy or torch integers; floats and bools are refused.

    Raises:
        ValueError: ``pos`` is not a position, a list of them, ``"center"`` or ``"all"``, or is outside the map.
    """
    place = where(layer)
    if isinstance(pos, str) and pos in ("center", "all") and 0 in output_shape:
        raise ValueError(
            f"the output map of {place} has spatial shape {tuple(output_shape)}: an axis without positions, so "
            f"pos={pos!r} names none; probe a larger input or a layer before the one that empties it"
        )
    if isinstance(pos, str):
        if pos == "center":
            return [tuple(n // 2 for n in output_shape)], "single"
        if pos == "all":
            return [], "all"
        raise ValueError(f"pos={pos!r} is not allowed; use {_POS_ALLOWED}")
    listed = isinstance(pos, list)  # a list of ints names positions on a 1D map; a tensor's values one position
    if isinstance(pos, torch.Tensor) or type(pos).__module__ == "numpy":
        pos = pos.tolist()
    pos = positions_of_index_columns(pos)
    if isinstance(pos, (list, tuple)) and any(isinstance(p, torch.Tensor) and p.dim() == 1 for p in pos):
        pos = [p.tolist() if isinstance(p, torch.Tensor) else p for p in pos]  # rows of torch.nonzero(mask)
    elif isinstance(pos, (list, tuple)) and any(type(p).__module__ == "numpy" and getattr(p, "ndim", 0) for p in pos):
        pos = [p.tolist() if type(p).__module__ == "numpy" else p for p in pos]  # rows of np.argwhere(mask)
    if isinstance(pos, list) and len(output_shape) == 1 and all(_scalar(i) for i in pos) and (listed or len(pos) > 1):
        return [checked_position(p, output_shape, place) for p in pos], "list"  # [1, 6] on a 1D map: two positions
    if as_index(pos) is not None or (isinstance(pos, Sequence) and pos and all(_scalar(i) for i in pos)):
        return [checked_position(pos, output_shape, place)], "single"
    if isinstance(pos, Sequence) and pos and all(isinstance(p, Sequence) and not isinstance(p, str) for p in pos):
        return [checked_position(p, output_shape, place) for p in pos], "list"
    raise ValueError(f"pos={pos!r} is not allowed; use {_POS_ALLOWED}")


def _scalar(value) -> bool:
    return not isinstance(value, (Sequence, torch.Tensor)) or (isinstance(value, torch.Tensor) and value.dim() == 0)


def checked_position(pos, output_shape: tuple[int, ...], where: str) -> Position:
    """Returns ``pos`` with non-negative indices, after checking it is a position inside ``output_shape``."""
    index = (pos,) if as_index(pos) is not None else tuple(pos)
    as_ints = [as_index(i) for i in index]
    if None in as_ints:
        wrong = index[as_ints.index(None)]
        raise ValueError(
            f"pos={pos!r} has the index {wrong!r} ({type(wrong).__name__}): indices must be ints (numpy and torch "
            f"integers are accepted), e.g. pos={tuple(int(i) if isinstance(i, float) else i for i in index)!r}"
            if isinstance(wrong, float) and float(wrong).is_integer()
            else f"pos={pos!r} has the index {wrong!r} ({type(wrong).__name__}): indices must be ints (numpy and "
            f"torch integers are accepted)"
        )
    if len(as_ints) != len(output_shape):
        raise ValueError(
            f"pos={pos!r} must have {len(output_shape)} int index(es), one per spatial axis of the output of "
            f"{where}, whose spatial shape is {output_shape}"
        )
    ints = [i for i in as_ints if i is not None]  # all of them: a None was refused above
    if not all(-n <= i < n for i, n in zip(ints, output_shape)):
        raise ValueError(
            f"pos={pos!r} is outside the output map of {where}, whose spatial shape is {output_shape}: each index "
            f"must be in 0..n-1 (negative indices count from the end)"
        )
    return tuple(i % n for i, n in zip(ints, output_shape))


class _ForwardChanged(ProbeError):
    """The forward run on the copy kept from the probe is not the one probed (see :class:`_TheoryOnDemand`)."""


class _TheoryOnDemand(GraphShapes):
    """The theoretical graph on the user's input, run only if a pass on it is needed (its shapes are known).

    The copy kept from the probe holds the model's modules as they were, but its class code, the globals and class
    attributes it reads, and the functions it calls are the process's as they are now: a forward whose output's
    shape is no longer the probe's is refused at once, and :meth:`not_probed` compares its calls with the probe's.
    """

    def __init__(
        self, input_shape: tuple[int, ...], output_shape: tuple[int, ...], graph_on, *, trace=None, draws=None,
        names_only: bool = False,
    ):  # fmt: skip
        self.input_shape, self.output_shape, self._graph_on = input_shape, output_shape, graph_on
        self._graph: ProbeGraph | None = None
        self._trace, self._draws, self._names_only = trace, draws, names_only or draws is not None

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.ran(), name)

    def ran(self) -> ProbeGraph:
        """The graph, run now if it was not yet.

        Raises:
            ProbeError: the copy no longer runs on the input it was probed on.
            _ForwardChanged: its output's shape is not the probe's.
        """
        graph = self._graph
        if graph is None:
            graph = self._graph_on(self.input_shape)
            if graph is None:
                raise ProbeError(
                    "the theoretical copy kept from the probe no longer runs on the input shape it was probed on"
                )
            if tuple(graph.output_shape) != tuple(self.output_shape):
                raise _ForwardChanged(self._why_changed())
            self._graph = graph
        return graph

    def not_probed(self, geometry: tuple) -> str | None:
        """Why ``geometry``, found on the kept copy, is not the probed forward's (its calls on the input), or None.

        A geometry found costs the forward on the user's input where the measurement did not run it; a ``None``
        found without it describes no other network's field, and is checked only where that forward ran already.
        In weights mode (``draws``: its batch, run on another copy) and on a float64 twin (``names_only``) the
        functions' names alone are compared; in theoretical mode the same copy ran the probe on this input, so their
        plain arguments are compared too.
        """
        if not self._trace or (self._graph is None and all(g is None for g in geometry)):
            return None
        graph = self.ran()
        now = [entry[:1] for entry in graph.trace] if self._names_only else graph.trace
        then = [entry[:1] for entry in self._trace] if self._names_only else self._trace
        return None if now == then else self._why_changed()

    def _why_changed(self) -> str:
        draws = self._draws
        batch = (
            f"; where the forward branches on its batch's size (weights mode probed a batch of draws={draws}, the "
            f"geometry is read on one input), probe with draws=1"
            if draws is not None and draws > 1
            else ""
        )
        return (
            "the model's forward is no longer the one probed: its code, a global or class attribute it reads, or a "
            "function it calls changed since, so a geometry measured now would describe another network; read the "
            f"geometry (str(field), field.stride) before such a change, or probe again{batch}"
        )


def _within_spans(geometry, axis: int, fields: Sequence[tuple[Position, Box]], shape) -> bool:
    """Whether every field's bounds along ``axis`` lie inside the clipped span the geometry gives its position."""
    if geometry is None:
        return True
    length = shape[2 + axis]
    for position, bounds in fields:
        first, last = geometry.span(position[axis])
        if bounds[axis][0] < max(first, 0) or bounds[axis][1] > min(last, length - 1):
            return False
    return True


def _follows(
    geometry, axis: int, fields: Sequence[tuple[Position, Box]], table: AxisTable | None, shape, *, exact=False
) -> bool:
    """Whether the probed fields, and every index of the axis table where one was measured, follow the geometry.

    The measured geometry is read near the centre; the table (a map, or a long list of positions) also holds the
    ends of the axis, where a roll, a circular padding or a concatenation along the axis shows. ``exact``: each
    field must equal its span where the span lies inside the input (:func:`consistent`), not only lie inside it.
    """
    if geometry is None:
        return True
    length = shape[2 + axis]
    if table is not None and not consistent(geometry, table.table[axis], length):
        return False
    if exact:
        return all(consistent(geometry, {position[axis]: box[axis]}, length) for position, box in fields)
    return _within_spans(geometry, axis, fields, shape)


_STRAYED = (
    "the fields at an end of the axis lie elsewhere than the span (r, S, P) gives them (a roll, a flip, a wrap, a "
    + "crop, a reflection, a window's zeros)"
)


def border_followed(theory, geometry: tuple, output_shape: tuple[int, ...], shape, known) -> tuple:
    """``geometry`` without the axes whose border fields do not follow it (:func:`border_follows`).

    An axis may explain another's empty seams; where it is dropped, the others are checked again without it.
    """
    while True:
        strayed = [
            a
            for a, g in enumerate(geometry)
            if g is not None and not border_follows(theory, g, a, output_shape, shape, known, others=geometry)
        ]
        if not strayed:
            return geometry
        geometry = tuple(None if a in strayed else g for a, g in enumerate(geometry))


def border_follows(
    theory, geometry: AxisGeometry, axis: int, output_shape: tuple[int, ...], shape, known, others: tuple = ()
) -> bool:
    """Whether the fields at the border follow ``geometry`` along ``axis``.

    A geometry read near the centre must hold there too: a roll, a flip, a wrap or a crop along the axis moves the
    fields of the border, which the centre does not see. At the centre of the other axes, the first and last index
    and the first index on each side whose span lies inside the input must be :func:`consistent` with it (one pass
    each), and so must the other indices whose span leaves the input on that side (a band as wide as the padding),
    one pass each, outermost first, where the band holds a few or the forward pads with the input's own values (a
    reflection or a replication folds a field back inside there, where the band's union hides it); otherwise the
    band must together lie inside its clipped spans (one pass), which a wrap to the far end breaks. At the
    ends of the other axes, the centre index's and both ends' fields (the corners) must each be their spans (one
    pass per index where they lie apart, else one per field, which ``known`` keeps for the other axes), or be empty
    where ``others`` (the geometry of every axis) puts each of them beyond the input along another axis: a dilated
    field at the end of that axis can fall between the input's rows.
    """
    length, count = shape[2 + axis], output_shape[axis]
    centre = [n // 2 for n in output_shape]

    def at(index: int) -> Position:
        return tuple(index if a == axis else c for a, c in enumerate(centre))

    def follows_at(index: int) -> bool:
        support = known[at(index)] if at(index) in known else theory.support([at(index)])
        box = box_of(support)
        return consistent(geometry, {index: None if box is None else box[axis]}, length)

    # The centre index at the ends of the other axes: a field that depends on another axis's index (branches of
    # other strides concatenated along it, a roll of some rows) differs there. Each must follow on its own (a
    # union would hide a smaller one): one pass for all where their fields lie apart, else one pass each.
    # The ends of the axis at the ends of the others too (the corners): where two branches padded along different
    # axes meet (F.pad of a valid convolution along the rows, another along the columns), the field is neither's.
    for index in sorted({centre[axis], 0, count - 1}):
        seams = set(itertools.product(*({index} if a == axis else {0, n - 1} for a, n in enumerate(output_shape))))
        seams.discard(at(index))  # read below, or the centre
        if not _seams_follow(theory, geometry, sorted(seams), axis, index, length, others, shape, known):
            return False

    for end in sorted({0, count - 1}):
        leaves = (lambda x: geometry.span(x)[0] < 0) if end == 0 else (lambda x: geometry.span(x)[1] > length - 1)
        # The end itself, and the first index inside the band (a crop or a roll shows there and nowhere nearer).
        inside = next((x for x in (range(count) if end == 0 else reversed(range(count))) if not leaves(x)), end)
        band = [x for x in range(count) if x != end and leaves(x)]
        # A fold back inside (reflect or replicate padding) hides in the band's union: read it index by index.
        one_by_one = band if len(band) <= _BAND_READ_ONE_BY_ONE or theory.border_modes else []
        outermost_first = sorted({end, inside, *one_by_one}, key=lambda x: abs(x - end))
        if not all(follows_at(index) for index in outermost_first):
            return False
        if not band or one_by_one:
            continue
        low = max(min(geometry.span(x)[0] for x in band), 0)
        high = min(max(geometry.span(x)[1] for x in band), length - 1)
        if (low, high) == (0, length - 1):  # the band's spans cover the input: nothing could lie outside them
            continue
        box = box_of(theory.support([at(x) for x in band]))
        if box is not None and (box[axis][0] < low or box[axis][1] > high):
            return False
    return True


def _seams_follow(
    theory, geometry: AxisGeometry, seams: list[Position], axis: int, index: int, length: int, others: tuple,
    shape, known: dict,
) -> bool:  # fmt: skip
    """Whether the fields at ``seams`` (each at ``index`` along ``axis``) are :func:`consistent` with ``geometry``.

    An empty one is, where its span leaves the input along ``axis`` or along another axis (``others``).
    """
    for seam, bounds in _seam_fields(theory, seams, axis, known).items():
        if bounds is not None:
            if not consistent(geometry, {index: bounds}, length):
                return False
        elif not consistent(geometry, {index: None}, length) and not _empty_along_another_axis(
            seam, axis, others, shape
        ):
            return False
    return True


def _seam_fields(theory, seams: list[Position], axis: int, known: dict) -> dict[Position, Bounds | None]:
    """Per position of ``seams`` (which differ along the axes other than ``axis`` only), its bounds along ``axis``.

    One pass from all of them, split along each other axis into one run per index, where their fields lie apart
    there; else one pass each, kept in ``known`` (the corners serve every axis).
    """
    if not seams:
        return {}
    if all(seam in known for seam in seams):
        return {seam: hull(marginal(known[seam], axis)) for seam in seams}
    support = theory.support(seams)
    slabs: dict[int, dict[int, Bounds]] = {}
    for other in range(support.dim()):
        if other == axis:
            continue
        indices = sorted({seam[other] for seam in seams})
        found = runs(marginal(support, other), 1)
        if len(found) != len(indices):  # fields that touch along this axis, or an empty one
            for seam in seams:
                if seam not in known:
                    known[seam] = theory.support([seam])
            return {seam: hull(marginal(known[seam], axis)) for seam in seams}
        slabs[other] = dict(zip(indices, found))
    fields = {}
    for seam in seams:
        slab = tuple(
            slice(None) if b == axis else slice(slabs[b][i][0], slabs[b][i][1] + 1) for b, i in enumerate(seam)
        )
        fields[seam] = hull(marginal(support[slab], axis))
    return fields


def _empty_along_another_axis(position: Position, axis: int, others: tuple, shape) -> bool:
    """Whether another axis's geometry allows an empty field at ``position``: its span there leaves the input."""
    return any(
        g is not None and consistent(g, {position[b]: None}, shape[2 + b]) for b, g in enumerate(others) if b != axis
    )


# Up to this many indices whose spans leave the input on one side are checked one pass each; a wider band together.
_BAND_READ_ONE_BY_ONE = 4


def _followed(
    geometry: tuple, fields, table: AxisTable | None, shape, theory, output_shape, known, reasons, *, exact=False
) -> tuple:
    """The geometry without the axes that the fields, the table or the border fields (without a table) do not follow.

    ``exact``: each field must be :func:`consistent` with it (theoretical fields), not only lie inside its span.
    Each dropped axis gets its reason in ``reasons``.
    """
    outside = [a for a, g in enumerate(geometry) if not _follows(g, a, fields, table, shape, exact=exact)]
    relation = "is not" if exact else "lies outside"
    reasons.update(dict.fromkeys(outside, f"a probed field {relation} the span (r, S, P) gives it"))
    geometry = tuple(None if a in outside else g for a, g in enumerate(geometry))
    if table is None:
        followed = border_followed(theory, geometry, output_shape, shape, known)
        reasons.update(
            dict.fromkeys((a for a, g in enumerate(geometry) if g is not None and followed[a] is None), _STRAYED)
        )
        geometry = followed
    return geometry


# Checking every index after a pick by position may take at most this many backward passes on the user's input.
_PICK_CHECK_PASSES = 64


def _picks_say(found: list[str], detail: str) -> str:
    subject = f"{with_article(found[0])} lies on the path"
    differ = "so the fields may differ from one position to another (a branch or an index chosen by position)"
    return f"{subject}, {differ}: {detail}"


def table_for_picks(theory: ProbeGraph, found: list[str], known: dict) -> AxisTable | str | None:
    """The full axis table that picks by position ``found`` call for, or why no geometry holds, or None.

    After a pick (see ``ProbeGraph.position_picks``) a geometry read at a few positions need not hold in between:
    every index of every axis is measured, where that takes at most ``_PICK_CHECK_PASSES`` passes. None: the picks
    are constants' zeros alone (a window, a validity mask), whose empty fields leave no full table; the geometry is
    then read as without a pick, its ends checked as ever.
    """
    centre = theory.center
    support = known[centre] if centre in known else theory.support([centre])
    passes = _table_passes(theory, support)  # the first round's, from the centre's field: a quick refusal
    table, over = None, passes is not None and passes > _PICK_CHECK_PASSES
    if passes is not None and not over:
        try:
            table = measure_axis_table(theory, full=True, known=known, max_passes=_PICK_CHECK_PASSES)
        except PassLimit:
            over = True
    if table is not None:
        return table
    if all(pick.endswith(ZEROS_PICK) for pick in found):
        return None
    if over:
        return _picks_say(found, f"checking every index would take more than {_PICK_CHECK_PASSES} passes")
    return _picks_say(found, "they are not one box at every index, which no single (r, S, P) describes")


def _table_passes(theory: ProbeGraph, support: torch.Tensor) -> int | None:
    """About how many passes a full axis table takes (see lattice.measure_axis_table), None for an empty field."""
    passes = 1
    for axis, (n, length) in enumerate(zip(theory.output_shape, theory.spatial_input_shape)):
        mask = marginal(support, axis)
        bounds, gap = hull(mask), largest_hole(mask) + 1
        if bounds is None:
            return None
        size, stride = bounds[1] - bounds[0] + 1, max(1, length // n)
        passes *= min(n, math.ceil((size + gap) / stride)) if is_whole(bounds, length, gap) else n
    return passes


def _blame_the_picks(found: list[str], geometry: tuple, reasons: dict[int, str]) -> None:
    """Says the picks ``found``, not "no fit" nor "a probed field", are why an axis of ``geometry`` has none."""
    for axis, axis_geometry in enumerate(geometry):
        why = reasons.get(axis, "")
        if axis_geometry is None and (why == NO_FIT or why.startswith("a probed field")):
            reasons[axis] = _picks_say(found, "at some indices along this axis they are not the span (r, S, P) gives")


def _is_full(table: AxisTable, output_shape: tuple[int, ...]) -> bool:
    """Whether ``table`` holds every index of every axis of the output."""
    return all(len(rows) == n for rows, n in zip(table.table, output_shape))


def table_followed(geometry: tuple, table: AxisTable, shape) -> tuple:
    """``geometry`` without the axes that some index of the full ``table`` does not follow."""
    return tuple(g if _follows(g, a, (), table, shape) else None for a, g in enumerate(geometry))


def _rows_of(table: AxisTable | None) -> list[dict] | None:
    return None if table is None else table.table


def _flow_on_theory(theory, fields: list[tuple[Position, Box]], table: AxisTable | None, shape) -> tuple | None:
    """Weights mode: the flow of the theoretical forward on the user's input, checked on its theoretical ``fields``."""
    flow = theory.flow
    if flow is None:
        return None
    return checked_flow(flow, fields, shape, _rows_of(table))


# Weights mode checks the theoretical geometry on the theoretical fields of at most this many probed positions.
_THEORY_CHECKS = 8


def _checked_positions(positions: list[Position], output_shape: tuple[int, ...]) -> list[Position]:
    """The probed positions whose theoretical fields a weights-mode geometry must follow: all of a short list.

    Of a longer list or a map, the first, the centre and the ends of each axis among them: a field that depends on
    another axis's index (branches stacked along it) differs there.
    """
    if len(positions) <= _THEORY_CHECKS:
        return positions
    centre = tuple(n // 2 for n in output_shape)
    chosen = [positions[0], min(positions, key=lambda p: sum(abs(i - c) for i, c in zip(p, centre)))]
    for axis in range(len(output_shape)):
        chosen += [min(positions, key=lambda p: p[axis]), max(positions, key=lambda p: p[axis])]
    return list(dict.fromkeys(chosen))[:_THEORY_CHECKS]


def _theoretical_copy_or_reason(model: nn.Module, request: ProbeRequest) -> nn.Module | ValueError:
    """The theoretical copy a weights-mode probe keeps for its geometry, or why there is none (TorchScript)."""
    try:
        return prepared_copy(model, "theoretical", request.dtype, device=request.device)
    except ValueError as error:
        return error


class _Prober:
    """Answers field questions for one model, layer and mode, with as few backward passes as it can prove exact.

    The graph whose gradients are the answer (``measured``) is built first; the theoretical graph on the user's
    input, which tables and the geometry need, only when they are asked for (it is the same graph in theoretical
    mode).
    """

    def __init__(self, model: nn.Module, request: ProbeRequest):
        self.model, self.request = model, request
        self.shape, self.layer, self.mode = request.input_shape, request.layer, request.mode
        self.element, self.layout, self.draws = request.element, request.layout, request.draws
        self.measured = ProbeGraph(model, request, check_layout=True)
        # The theoretical copy the geometry is measured on, now or later: its weights are constants (it costs its
        # buffers), and a field keeps it, so what it reports later is what the model was when it was probed.
        skeleton = self.measured.copy if self.mode == "theoretical" else _theoretical_copy_or_reason(model, request)
        assert skeleton is not None, "a graph that ran its own forward pass holds its copy"
        self.skeleton = skeleton
        self.graph_on = graph_factory(skeleton, request)
        self._theory = self.measured if self.mode == "theoretical" else None
        # Exact single-position theoretical supports already computed on the user's input, for reuse.
        self.known: dict[Position, torch.Tensor] = {}
        self.table: AxisTable | None = None

    @property
    def theory(self) -> ProbeGraph:
        """The theoretical graph on the user's input."""
        if isinstance(self.skeleton, ValueError):
            raise self.skeleton
        if self._theory is None:
            request = self.request.theoretical()
            self._theory = self.graph_on(self.shape) or ProbeGraph(self.skeleton, request, copy=self.skeleton)
        return self._theory

    def geometry(self, fields: Sequence[tuple[Position, Box]] = (), *, exact: bool = False) -> LazyGeometry:
        """The per-axis geometry, measured on first use (in the context a probe runs in).

        The measurement keeps the theoretical copy made at probe time (its weights are constants, so it holds
        little more than the model's buffers), the arguments and the small supports already read, never the live
        model, which training moves, changes and frees: what it measures later is the model as it was probed. It
        keeps none of this probe's graphs. An axis on which one of ``fields`` (position, bounds) lies outside its
        clipped span has no geometry: the fields do not follow it. ``exact`` (theoretical fields of a whole map): each
        field must be :func:`consistent` with the geometry, equal to its span where that lies inside the input.
        """
        skeleton, request, shape, output_shape = self.skeleton, self.request, self.shape, self.measured.output_shape
        known, table = dict(self.known), self.table
        reasons: dict[int, str] = {}
        materialised = constants_materialised()
        flowed = self._flowed(fields)
        weights_positions = _checked_positions([p for p, _ in fields], output_shape) if self.mode == "weights" else []
        # The theoretical forward on the user's input is the measured one in theoretical mode: its couplings are known.
        couplings = list(self.measured.couplings) if self.mode == "theoretical" else None
        user_work = self.measured.work or None  # the cost of the probe's own forward (see geometry_probe.Budget)

        def _no_theory(reason: str) -> tuple[None, ...]:
            reasons.update(dict.fromkeys(range(len(shape) - 2), reason))
            return (None,) * (len(shape) - 2)

        # The theoretical forward's selections by position (weights mode reads them off its theoretical graph).
        picks = list(self.measured.position_picks) if self.mode == "theoretical" else None
        trace = list(self.measured.trace)  # what the forward called, for a measurement that comes later

        def measure():
            nonlocal table
            if flowed is not None and not picks:
                geometry, why = flowed
                reasons.update(why)
                return geometry
            if isinstance(skeleton, ValueError):
                return _no_theory(f"the geometry is measured on a theoretical copy, and {skeleton}")
            with _probe_context(request.device), materialised_constants(materialised):
                for attempt in (request, request.in_dtype(torch.float64)):
                    copy = skeleton if attempt is request else prepared_copy(skeleton, "theoretical", attempt.dtype)
                    graph_on = graph_factory(copy, attempt, widen=True)
                    # It forwards every other attribute to the ProbeGraph it builds on first use.
                    on_demand = _TheoryOnDemand(
                        shape, output_shape, graph_on, trace=trace,
                        draws=self.draws if self.mode == "weights" else None,
                        names_only=attempt is not request,  # a float64 twin's calls cast to float64
                    )  # fmt: skip
                    theory = cast(ProbeGraph, on_demand)
                    reasons.clear()
                    try:
                        found = picks if picks is not None else theory.position_picks
                        if found and (table is None or not _is_full(table, output_shape)):
                            checked = table_for_picks(theory, found, known)
                            if isinstance(checked, str):
                                return _no_theory(checked)
                            table = checked or table
                        # Weights mode: the geometry is the theoretical one, which the theoretical fields at the
                        # probed positions must follow exactly (the weights' fields only lie inside their spans).
                        theoretical = [(p, box) for p in weights_positions if (box := box_of(theory.support([p])))]
                        if theoretical and attempt is request:
                            on_theory = _flow_on_theory(theory, theoretical, table, shape)
                            if on_theory is not None:
                                geometry, why = on_theory
                                reasons.update(why)
                                changed = on_demand.not_probed(geometry)
                                return _no_theory(changed) if changed else geometry
                        geometry = measure_geometry(
                            theory, graph_on, known=known, table=table, reasons=reasons,
                            budget=Budget(shape, work=user_work), one_shape=isinstance(request.parsed_layout, Tokens),
                            user_couplings=couplings,
                        )  # fmt: skip
                        geometry = _followed(
                            geometry, fields, table, shape, theory, output_shape, known, reasons, exact=exact
                        )
                        if theoretical:
                            geometry = _followed(geometry, theoretical, table, shape, theory, output_shape, known,
                                                 reasons, exact=True)  # fmt: skip
                        if found:
                            _blame_the_picks(found, geometry, reasons)
                        if changed := on_demand.not_probed(geometry):
                            return _no_theory(changed)
                    except Underflow:  # the end fields' passes too: a deep chain's corners can underflow float32
                        continue
                    except _ForwardChanged as refused:
                        return _no_theory(str(refused))
                    except ProbeError as error:  # weights mode: the theoretical copy refuses (theirs would have)
                        return _no_theory(f"the geometry is measured on a theoretical copy, and {error}")
                    return geometry
            raise AssertionError("float64 does not underflow")

        return LazyGeometry(len(self.shape) - 2, measure, reasons)

    def _flowed(self, fields: Sequence[tuple[Position, Box]]) -> tuple[tuple, dict[int, str]] | None:
        """Theoretical mode: the geometry the probe's own forward carried, if the probed fields agree with it.

        See :mod:`~rf_callback.core.geometry_flow`; weights mode reads the flow at measuring time, on the theoretical
        graph (see :meth:`geometry`). Returns the geometry and the reasons of its ``None`` axes, or ``None`` where
        it must be measured.
        """
        if self.mode != "theoretical" or self.measured.flow is None:
            return None
        return checked_flow(self.measured.flow, fields, self.shape, _rows_of(self.table))

    def _full_table(self) -> AxisTable | None:
        """Every index's theoretical bounds on the user's input; a centre field that only looks whole is found."""

        def centre_is_whole(axis: int, support: torch.Tensor) -> bool:
            return centre_field_is_whole(self.theory, self.graph_on, axis, support)

        try:
            return measure_axis_table(self.theory, full=True, known=self.known, centre_is_whole=centre_is_whole)
        except (ValueError, ProbeError):
            if self.mode != "weights":
                raise
            # No theoretical copy to plan shared passes with (TorchScript, a custom Function's backward that cuts on
            # its values): each position gets a pass of its own, as the theoretical reason does not concern what
            # the current weights connect.
            return None

    def _field(self, position: Position, bounds: Box | None, heatmap: torch.Tensor, geometry) -> ReceptiveField:
        if bounds is None:
            raise self._empty_field_error(position)
        return ReceptiveField(
            position=position, bounds=bounds, input_shape=self.shape, output_shape=self.measured.output_shape,
            geometry=geometry, mode=self.mode, layer=self.layer, heatmap=heatmap, element=self.element,
            layout=self.layout,
        )  # fmt: skip

    def _empty_field_error(self, position: Position | None) -> ProbeError:
        """Why no input influences ``position`` (``None``: any position of the map, which is then all empty)."""
        if self.mode == "weights":
            at = (
                f"at {position}" if position is not None else f"at any position of its {self.measured.output_shape} map"
            )
            return ProbeError(
                f"no input position influences {where(self.layer)} {at} with the current weights "
                f"(the gradient is zero on all {self.draws} random inputs): its units are dead (e.g. ReLUs that "
                f"never fire without biases) or the weights on every path are zero; mode='theoretical' gives the "
                f"field of the architecture"
            )
        every = list(itertools.product(*(range(n) for n in self.measured.output_shape)))
        if position is not None and bool(self.measured.support(every).any()):
            inside = self._window_inside(position)
            vanishing = (
                "a call on the path whose derivative vanishes at the theoretical copy's equal values (a power whose "
                "base is 1, a logit at its clamp, a loss of two equal values)"
            )
            if inside is True:
                return ProbeError(
                    f"no input position influences {where(self.layer)} at {position}, though its window lies "
                    f"inside the input: the gradient there is zero on {vanishing}; use mode='weights' (what the "
                    f"current weights connect)"
                )
            if inside is None:  # the forward's geometry does not say where the window lies
                return ProbeError(
                    f"no input position influences {where(self.layer)} at {position}: its window covers only "
                    f"padding, or {vanishing}; mode='weights' (what the current weights connect) tells them apart"
                )
            return ProbeError(
                f"no input position influences {where(self.layer)} at {position}: its window covers only padding"
            )
        return ProbeError(
            f"no input position influences {where(self.layer)} at any position of its "
            f"{tuple(self.measured.output_shape)} map: the gradient from the whole output is zero on the theoretical "
            f"copy, because every window covers only padding (an input too small for the layers) or the forward "
            f"zeroes it (a multiplication by zero, a constant output, a weight that it computes to zero); probe a "
            f"larger input or a layer whose output depends on the input, or use mode='weights'"
        )

    def _window_inside(self, position: Position) -> bool | None:
        """Whether ``position``'s window lies inside the input (True) or outside it (False), by the forward's geometry.

        None where the geometry does not say, or the window straddles an end (a dilated one's taps may all be padding).
        """
        flow = self.measured.flow
        if not flow or not all(isinstance(axis, AxisGeometry) for axis in flow):
            return None
        spans = [cast(AxisGeometry, axis).span(index) for axis, index in zip(flow, position)]
        lengths = self.shape[2:]
        if all(first >= 0 and last <= n - 1 for (first, last), n in zip(spans, lengths)):
            return True
        return False if any(last < 0 or first > n - 1 for (first, last), n in zip(spans, lengths)) else None

    # -- one or several positions, with heatmaps

    def fields(self, positions: list[Position]) -> list[ReceptiveField]:
        """Returns the exact field and heatmap of every position, in order; their geometry is measured lazily."""
        unique = list(dict.fromkeys(positions))
        if len(unique) < _SHARED_PASSES_FROM:
            heatmaps = {p: self.measured.gradient_map([p]) for p in unique}
            if self.mode == "theoretical":
                self.known.update({p: h > 0 for p, h in heatmaps.items()})
        else:
            self.table = self._full_table()
            heatmaps = self._grouped_heatmaps(unique, self.table)
        bounds = {p: box_of(h > 0) for p, h in heatmaps.items()}
        geometry = self.geometry([(p, b) for p, b in bounds.items() if b is not None], exact=self.mode == "theoretical")
        fields = [self._field(p, bounds[p], heatmaps[p], geometry) for p in unique]
        by_position = dict(zip(unique, fields))
        # A position asked for twice gets a field of its own: no heatmap shared, no write into one seen through another.
        return [by_position.pop(p) if p in by_position else self._field(p, bounds[p], heatmaps[p].clone(), geometry)
                for p in positions]  # fmt: skip

    def _grouped_heatmaps(self, positions: list[Position], axes: AxisTable | None) -> dict:
        """Heatmaps of many positions, in as few passes as their disjoint fields allow.

        Positions whose theoretical boxes are disjoint share one backward pass and each reads its own box.
        Gradients are linear in the cotangent and no path joins two disjoint fields, so each box holds exactly what
        a pass of its own would give. Falls back to one pass per position.
        """
        graph = self.measured
        if axes is None:
            return {p: graph.gradient_map([p]) for p in positions}
        gaps = axes.gaps if self.mode == "theoretical" else [1] * len(axes.gaps)
        heatmaps = {}
        for members in groups(positions, spacing_for_gap(axes.table, gaps)):
            if len(members) == 1:
                heatmaps[members[0]] = graph.gradient_map(members)
                continue
            gradient = graph.gradient_map(members)
            boxes = [axes.box(p) for p in members]
            if all(b is not None for b in boxes) and boxes_hold(graph, members, boxes, gradient):
                heatmaps.update({p: restricted(gradient, box) for p, box in zip(members, boxes)})
            else:
                heatmaps.update({p: graph.gradient_map([p]) for p in members})
        return heatmaps

    # -- every position, bounds only

    def field_map(self) -> ReceptiveFieldMap:
        """Returns the bounds of every output position."""
        graph = self.measured
        self.table = axes = self._full_table()
        shape = (*graph.output_shape, len(graph.output_shape))
        first = torch.zeros(shape, dtype=torch.int64)
        last = torch.full(shape, -1, dtype=torch.int64)
        fields = []
        for p, box in self._map_boxes(axes):
            if box is not None:
                first[p] = torch.tensor([b[0] for b in box])
                last[p] = torch.tensor([b[1] for b in box])
                fields.append((p, box))
        if not fields:  # as a single probe of any of its positions says
            raise self._empty_field_error(None)
        # The fields read, not the table's predictions, are what the map's geometry must hold at every index.
        geometry = self.geometry(fields, exact=self.mode == "theoretical")
        return ReceptiveFieldMap(
            first=first, last=last, input_shape=self.shape, output_shape=graph.output_shape,
            geometry=geometry, mode=self.mode, layer=self.layer, element=self.element, layout=self.layout,
        )  # fmt: skip

    def _map_boxes(self, axes: AxisTable | None):
        """Yields (position, box) for every position, each read off a shared pass (or a pass of its own).

        The table predicts every box from the fields along each axis, read on lattices that meet each index once:
        where a field depends on the other axes' indices too (a concatenation of branches of different strides
        along another axis, a roll of some rows), it predicts wrong. Every position is therefore read in a pass
        whose members' predicted boxes are disjoint; where the pass leaves them, its members get passes of their own.
        """
        graph = self.measured
        positions = itertools.product(*(range(n) for n in graph.output_shape))
        if axes is None:
            yield from ((p, box_of(graph.support([p]))) for p in positions)
            return
        spacing = spacing_for_gap(axes.table, [1] * len(axes.gaps))
        for residue in itertools.product(*(range(g) for g in spacing)):
            members = list(itertools.product(*lattice(residue, spacing, graph.output_shape)))
            if not members:
                continue
            gradient = graph.gradient_map(members)
            boxes = [axes.box(p) for p in members]
            if not boxes_hold(graph, members, boxes, gradient):
                yield from ((p, box_of(graph.support([p]))) for p in members)
                continue
            for p, box in zip(members, boxes):
                yield p, None if box is None else box_of(restricted(gradient > 0, box))
