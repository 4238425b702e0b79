"""Measuring the geometry (r, S, P) of every axis, at a small multiple of one forward and backward pass.

Where a field is clipped by the input (a ResNet's last stage sees 435 pixels of a 224 input), its unclipped size
cannot be read on that input. Each axis is then read on a *thin* input: long along that axis, as short as the
model accepts along the others, because a convolutional network's field along one axis does not depend on the
input's length along the others. The exact fields of the centre position and its neighbour give r, S and P; one
pass from a lattice of positions whose fields cannot touch checks them at every index along the axis; an input
twice as long and twice as wide must give the same centre field (nothing was hidden beyond the border, and
the other axes' lengths did not matter); and the result must match the field measured on the user's input. Where
any of that fails (fields that are not boxes, axes that interact, an input the model refuses, a convolution window that
sees only padding on the thin input), the axis falls back to the exact reading on inputs enlarged along every
undecided axis.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from rf_callback.core.geometry import MIN_WHOLE_FIELDS, AxisGeometry, Bounds, consistent, fit_axis, is_whole
from rf_callback.core.graph import ProbeError, ProbeGraph, dead_windows_watched
from rf_callback.core.lattice import AxisTable, coprime_to_small_periods, measure_axis_table
from rf_callback.core.layouts import Tokens
from rf_callback.core.model_copy import prepared_copy
from rf_callback.core.request import ProbeRequest
from rf_callback.core.support import Position, hull, largest_hole, marginal

# A field clipped on the user's input is read on thin inputs up to this many times longer along the axis (doubling:
# a thin input as wide as a VGG needs, 32, costs in proportion to its length), under _MAX_ELEMENTS; the exact
# reading enlarges every undecided axis of the user's input at once, by the same factors.
GROWTH = (1, 2, 4, 8, 16, 32)
_MAX_ELEMENTS = 1 << 24
# Beyond 32 times, a thin input keeps doubling while it holds no more elements than the user's input or than this: a
# small input on a network of large stride (3^4 = 81 on a 4-pixel input) needs more, and costs little.
_SMALL_THIN_INPUT = 1 << 16

GraphOn = Callable[..., "ProbeGraph | None"]


class _Clipped:
    """The thin input is too short along the axis: the fields it needs are cut by the input's ends."""


_CLIPPED = _Clipped()

# Measuring the geometry may cost this many passes (forward or backward) over the user's input, counted in input
# elements: enough for the thin reading of a field nine times longer than the input (DenseNet-121 at 224: r = 2071),
# and for the exact reading of a small map; past it, the undecided axes get None and say so.
BUDGET_PASSES = 96


# On a small input, the thin reading's inputs may be longer than the budget's passes (see _SMALL_THIN_INPUT).
_SMALL_BUDGET = 1 << 22

# No pass on another input may cost (in elements its calls return, see ProbeGraph.work) more than this many of the
# user's, or than _SMALL_WORK: the input elements that the budget counts grow linearly, but attention's cost grows
# with their square. A causal attention on 32 samples grew its thin input to 65,536 samples (an attention matrix of
# 10^9 elements per head) and was killed for memory. A thin input of a convolutional network costs a few of the
# user's passes; the next pass's cost is foreseen as if it grew with the square of its input.
WORK_PASSES = 64
_SMALL_WORK = 1 << 24


class OverBudget(Exception):
    """Measuring the geometry would cost more than its :class:`Budget`."""


class Budget:
    """What measuring the geometry may still spend, in input elements through the copy (one pass each).

    Attributes:
        limit: the elements it may spend, ``BUDGET_PASSES`` times the user's input's (at least 4M).
        spent: the elements spent so far.
    """

    def __init__(self, input_shape: tuple[int, ...], passes: int | None = None, work: int | None = None):
        passes = BUDGET_PASSES if passes is None else passes
        self.input_elements = math.prod(input_shape[1:])
        self.limit, self.spent = max(passes * self.input_elements, _SMALL_BUDGET), 0
        # The cost of the user's pass (ProbeGraph.work), where known: no pass on another input may cost WORK_PASSES
        # times more (see _charged).
        self.work = work
        self._progress = _Progress()

    def charge(self, shape: tuple[int, ...]) -> None:
        """Counts one pass over an input of ``shape``.

        Raises:
            OverBudget: the pass would take the total past the limit.
        """
        elements = math.prod(shape[1:])
        if self.spent + elements > self.limit:
            raise OverBudget
        self.spent += elements
        self._progress.show(
            f"rf_callback: measuring the geometry (r, S, P), input {' x '.join(map(str, shape[2:]))}, "
            f"{self.spent / self.limit:.0%} of its budget"
        )

    def done(self) -> None:
        """Clears the progress line, if one was shown."""
        self._progress.clear()


class _Progress:
    """One line on a terminal (standard error) for a measurement that takes more than a few seconds."""

    AFTER_SECONDS = 3.0

    def __init__(self):
        self.start, self.shown = time.monotonic(), False

    def show(self, text: str) -> None:
        if time.monotonic() - self.start > self.AFTER_SECONDS and sys.stderr.isatty():
            sys.stderr.write(f"\r{text[:150]}\x1b[K")
            sys.stderr.flush()
            self.shown = True

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


class _Global:
    """A reduction or softmax along the whole axis on the path: the field spans any input along it."""

    def __init__(self, name: str):
        self.name = name


# Why an axis has no geometry, by the reading's exit.
FIXED_SIZE = (
    "an adaptive pooling or a resize to a fixed size on the path: the fields change with the input's length, so no "
    "(r, S, P) holds across lengths"
)
NO_FIT = "the fields fit no single (r, S, P) along this axis (an upsampling path, windows, or fields that are no box)"
TOO_FEW_WHOLE = (
    f"fewer than {MIN_WHOLE_FIELDS} fields of the largest size lie inside the input along this axis clear of its ends "
    f"(a field that reaches an end may be clipped there), on the input probed and on every longer one the model ran "
    f"on: too few to tell r, S and P (a short token grid, a fixed size)"
)
ONE_SIZE = (
    "every field spans the whole input probed, and the model runs on no input twice as long (nor on a thin one): a "
    "global field cannot be told from one larger than the input"
)
OVER_BUDGET = (
    f"not measured: the fields did not settle within {BUDGET_PASSES} passes' worth of inputs (the exact reading would "
    f"cost more), or the next input would cost more than {WORK_PASSES} of the user's passes (attention's cost grows "
    f"with the square of the input)"
)


def graph_factory(copy: nn.Module | ValueError, request: ProbeRequest, *, widen: bool = False) -> GraphOn:
    """Returns ``graph_on(shape, thin_axes=())``: a theoretical graph of the requested layer on another input shape.

    It returns ``None`` where the model refuses the shape, or where a convolution has an output whose window along
    one of ``thin_axes`` covers only padding (paths that carry nothing on that input). Every graph runs ``copy``, a
    theoretical copy prepared by :func:`prepared_copy` (in the request's dtype): a deep copy of a large model costs
    more than a forward pass on a thin input, and the copy, not the live model, is what the graphs measure, however
    the live model changes later. The output is read as the request reads it. A token grid fits the user's input
    (the request's) alone: on another input the same number of tokens can lie on another grid, so with
    :class:`Tokens` it returns ``None`` on any other shape. Where there is no copy (``copy`` is why), it raises that.

    ``widen`` (float32 with the underflow retry): a graph whose pass comes near underflow redoes it, and its later
    ones, on a float64 twin of the same input (a field long enough to fade in float32 on a long thin input), and
    inputs at least as long are built in float64 at once; the readings already made in float32 stay, as exact.
    """
    request = request.theoretical()
    fixed = request.input_shape if isinstance(request.parsed_layout, Tokens) else None
    widen = widen and request.guard and request.dtype == torch.float32
    wide_request = request.in_dtype(torch.float64)
    wide_copy: list[nn.Module] = []  # the float64 twin of the copy, made on the first underflow
    faded_at = math.inf  # the shortest longest axis of an input whose pass came near underflow

    def built(on: nn.Module, asked: ProbeRequest, shape: tuple[int, ...], thin_axes) -> ProbeGraph | None:
        dead: list[str] = []
        try:
            with dead_windows_watched(on, thin_axes, dead):
                on_input = tuple(shape) == tuple(request.input_shape)  # only there is the flow read
                graph = ProbeGraph(on, asked.on(shape), copy=on, carry_flow=on_input)
        except (ValueError, ProbeError):
            return None
        # A crop to a fraction of the input (x[:, :, : H // 2]) can leave no output position on a thin input.
        return None if dead or 0 in graph.output_shape else graph

    def in_float64(shape: tuple[int, ...], thin_axes) -> ProbeGraph | None:
        nonlocal faded_at
        faded_at = min(faded_at, max(shape[2:]))
        if not wide_copy:
            assert not isinstance(copy, ValueError)
            wide_copy.append(prepared_copy(copy, "theoretical", torch.float64))
        return built(wide_copy[0], wide_request, shape, thin_axes)

    def graph_on(shape: tuple[int, ...], thin_axes: tuple[int, ...] = ()) -> ProbeGraph | None:
        if isinstance(copy, ValueError):
            raise copy
        if fixed is not None and tuple(shape) != tuple(fixed):
            return None
        if widen and max(shape[2:]) >= faded_at:
            return in_float64(shape, thin_axes)
        graph = built(copy, request, shape, thin_axes)
        if graph is not None and widen:
            graph.wider = functools.partial(in_float64, tuple(shape), thin_axes)
        return graph

    return graph_on


def measure_geometry(
    theory: ProbeGraph,
    graph_on: GraphOn,
    *,
    known: dict[Position, torch.Tensor] | None = None,
    table: AxisTable | None = None,
    reasons: dict[int, str] | None = None,
    budget: Budget | None = None,
    one_shape: bool = False,
    user_couplings: list | None = None,
) -> tuple[AxisGeometry | None, ...]:
    """Per axis, the (r, S, P) of the theoretical fields of ``theory``'s output, or ``None`` where there is none.

    Args:
        theory: the theoretical graph on the user's input.
        graph_on: builds the theoretical graph of the same output on another input shape (``None`` if refused).
        known: exact theoretical supports of single positions already measured on the user's input.
        table: an axis table already measured on the user's input, if any.
        reasons: filled, for each axis whose geometry is ``None``, with why.
        budget: what the passes on other inputs may cost (:class:`Budget`); ``None``: no limit.
        one_shape: the output is read on the user's input alone (a token grid): an axis along which the centre
            field spans that input has no geometry to read.
        user_couplings: the reductions and softmaxes of the theoretical forward on the user's input, where known
            (``ProbeGraph.couplings``): a thin input as wide as the user's is compared with it at once.

    Returns:
        Per axis, an :class:`AxisGeometry`, or ``None`` on an axis whose fields fit no single (r, S, P) (an
        upsampling path), span the input however long it is (global pooling, a gate, attention), or were not
        measured within the budget.
    """
    reasons = {} if reasons is None else reasons
    lengths = theory.spatial_input_shape
    if len(theory.output_shape) != len(lengths):
        reasons.update(dict.fromkeys(range(len(lengths)), "the output has another number of spatial axes"))
        return (None,) * len(lengths)
    settled = (known, table, reasons, one_shape, user_couplings)
    if budget is None:
        return _measured(theory, graph_on, *settled)
    try:
        return _measured(theory, _charged(graph_on, budget), *settled)
    finally:
        budget.done()


def _measured(theory, graph_on: GraphOn, known, table, reasons: dict[int, str], one_shape: bool, user_couplings):
    """:func:`measure_geometry`'s reading, once its arguments are settled."""
    lengths = theory.spatial_input_shape
    known = dict(known or {})
    center = theory.center
    if center not in known:
        known[center] = theory.support([center])
    measured = [dict(table.table[a]) if table is not None else {} for a in range(len(lengths))]
    for position, support in known.items():
        if support.any():
            for axis in range(len(lengths)):
                measured[axis][position[axis]] = hull(marginal(support, axis))
    whole = (
        None
        if one_shape or user_couplings is None
        else _global_on_a_smaller_input(theory, graph_on, known, user_couplings)
    )
    if whole is not None:
        reasons.update(dict.fromkeys(range(len(lengths)), whole))
        return (None,) * len(lengths)
    geometry: list[AxisGeometry | None] = []
    fallback = []
    for axis, length in enumerate(lengths):
        found: object = None  # a geometry, or why there is none
        if one_shape and hull(marginal(known[center], axis)) == (0, length - 1):
            reasons[axis] = (
                "the field spans the whole input probed, and a token grid is read on that input alone (on another "
                "input the same number of tokens lies on another grid)"
            )
            geometry.append(None)
            continue
        if table is not None and table.conclusive(axis, length):
            found = fit_axis(table.table[axis], length, table.gaps[axis])
        if found is None:
            try:
                start = _first_growth(known[center], axis)
                user = None if user_couplings is None else _Reading(user_couplings, _support_spans(known[center], axis))
                if user is not None and user.spans:
                    start = 1  # a coupling shows between two lengths: a thin input as long as the user's is the first
                found = _thin_read(theory, axis, graph_on, measured[axis], start_growth=start, user_reading=user)
            except OverBudget:
                found = OVER_BUDGET
        if found is _FALLBACK:
            fallback.append(axis)
        elif not isinstance(found, AxisGeometry):
            reasons[axis] = _reason(found, length)
        geometry.append(found if isinstance(found, AxisGeometry) else None)
    if fallback:
        try:
            user_reading = None if user_couplings is None else (known[center], user_couplings)
            exact = _enlarged_geometry(theory, graph_on, known, reasons, user_reading)
        except OverBudget:
            exact = [OVER_BUDGET] * len(lengths)
        for axis in fallback:
            geometry[axis] = exact[axis] if isinstance(exact[axis], AxisGeometry) else None
            if geometry[axis] is None:
                reasons[axis] = exact[axis] if isinstance(exact[axis], str) else reasons.get(axis, NO_FIT)
    for axis, found in enumerate(geometry):
        if found is not None:  # a reading of several axes at once may have said why of one the thin reading read
            reasons.pop(axis, None)
    return tuple(geometry)


def _reason(found, length: int) -> str:
    """Why the thin reading found no geometry, in words."""
    if isinstance(found, str):
        return found
    if isinstance(found, _Global):
        return (
            f"a {found.name}() along the whole axis on the path (a global pooling, a gate or attention): the field "
            f"spans the input however long it is"
        )
    if found is _FIXED:
        return FIXED_SIZE
    if found is _WINDOWS:
        return "neighbouring outputs see the same input (an upsampling, or attention in windows): no single (r, S, P)"
    if found is _CLIPPED:
        return (
            f"the field spans every input read, the longest at least {GROWTH[-1]} times as long as {length}: a global "
            f"operation on the path, or r beyond that"
        )
    return NO_FIT


def _charged(graph_on: GraphOn, budget: Budget) -> GraphOn:
    """``graph_on`` whose forward passes, and the graphs' backward passes, are charged to ``budget``.

    Raises:
        OverBudget: past the budget, or where the pass would cost more than ``WORK_PASSES`` of the user's (foreseen
            from the last pass as growing with the square of the input's elements; where the budget does not know
            the user's, the first pass's, in proportion to its input).
    """
    most: float | None = None if budget.work is None else max(WORK_PASSES * budget.work, _SMALL_WORK)
    last: tuple[int, int] | None = None  # the input elements and the work of the last pass

    def charged(shape: tuple[int, ...], thin_axes: tuple[int, ...] = ()) -> ProbeGraph | None:
        nonlocal most, last
        elements = math.prod(shape[1:])
        if last is not None and most is not None and last[1] * (elements / last[0]) ** 2 > most:
            raise OverBudget
        budget.charge(shape)
        graph = graph_on(shape, thin_axes)
        if graph is None:
            return None
        graph.budget = budget
        if graph.work:
            last = elements, graph.work
            if most is None:
                most = max(WORK_PASSES * graph.work * budget.input_elements / elements, _SMALL_WORK)
        return graph

    return charged


class _Reading(NamedTuple):
    """What the coupling check keeps of one forward: its reductions and softmaxes, and whether the centre spans.

    Both are read at once, while the forward's graph is the newest: a forward that writes into its own weights
    ends the older graphs.
    """

    couplings: list
    spans: bool
    fixed_size: list | None = None  # the calls with a fixed output size (unknown: None)


def _reading(graph: ProbeGraph, axis: int) -> _Reading:
    return _Reading(list(graph.couplings), _spans(graph, axis), list(graph.fixed_size))


def _fixes_every_axis(fixed_size: list) -> bool:
    """Whether a call fixes the length of every spatial dim it acts on (``None`` in an adaptive pooling keeps one)."""
    return any(len(dims) == len(shape) - 2 for _, shape, dims in fixed_size)


def _fixed_along(before: list, after: list) -> bool:
    """Whether a call of ``after`` fixes a dim that grew since ``before`` (the same forward on a shorter input).

    Also where the two forwards made other calls: no telling which dims follow the input then.
    """
    if [name for name, *_ in before] != [name for name, *_ in after]:
        return True
    return any(shape[d] != grown[d] for (_, shape, dims), (_, grown, _) in zip(before, after) for d in dims)


def _whole_axis_coupling(before: _Reading, after: _Reading) -> str | None:
    """A reduction or softmax of ``after`` along a dim that grew with the input, where both centre fields span it.

    ``before`` and ``after`` are the same forward on inputs that differ in length along one axis only: a dim whose
    length differs between their calls follows that axis. Where such a call reduces along it and the centre field
    spans the whole input on both, the field spans any input: no (r, S, P). Returns the call's name.
    """
    if not (before.spans and after.spans):
        return None
    return _first_grown(before.couplings, after.couplings, lambda lengths, grown: lengths != grown)


def _couples_every_axis(before, after, axes: list[int], growth: int) -> str | None:
    """As :func:`_whole_axis_coupling`, for inputs ``growth`` times longer along every one of ``axes`` at once.

    ``before`` and ``after`` are the centre support and the couplings on the shorter and the longer input (None
    where unknown: no coupling is found); ``after`` may be the longer input's graph.

    A call counts where the dims it reduces along grew by ``growth`` per axis together (a mean over H and W, a softmax
    over flattened tokens): it couples every one of them, and each centre field spans its axis on both inputs.
    """
    if before is None:
        return None
    if isinstance(after, ProbeGraph):
        after = (after.support([after.center]), after.couplings)
    (support, couplings), (longer_support, longer_couplings) = before, after
    if not all(_support_spans(support, a) and _support_spans(longer_support, a) for a in axes):
        return None
    factor = growth ** len(axes)
    return _first_grown(
        couplings, longer_couplings, lambda lengths, grown: math.prod(grown) == math.prod(lengths) * factor
    )


def _first_grown(before: list, after: list, grew: Callable[[list, list], bool]) -> str | None:
    """The name of the first call in ``after`` whose reduced dims ``grew`` since the same call in ``before``.

    ``before`` and ``after`` are the couplings of one forward on a shorter and a longer input; ``grew`` gets the
    lengths of the call's reduced dims on each. None where the two forwards made other calls.
    """
    if len(before) != len(after):
        return None
    for (name, shape, dims), (other, grown, _) in zip(before, after):
        if name != other or len(shape) != len(grown):
            return None
        if dims and grew([shape[d] for d in dims], [grown[d] for d in dims]):
            return name
    return None


def _spans(graph: ProbeGraph, axis: int) -> bool:
    """Whether the centre field spans the whole input along ``axis``."""
    return _support_spans(graph.support([graph.center]), axis)


def _support_spans(support: torch.Tensor, axis: int) -> bool:
    return hull(marginal(support, axis)) == (0, support.shape[axis] - 1)


def _first_growth(center_support: torch.Tensor, axis: int) -> int:
    """1 where the centre field fits the user's input, 2 where one end is cut, 4 where both are (then r > L)."""
    mask = marginal(center_support, axis)
    bounds, gap, length = hull(mask), largest_hole(mask) + 1, len(mask)
    if bounds is None:
        return 1
    cut = (bounds[0] < gap) + (bounds[1] > length - 1 - gap)
    return (1, 2, 4)[cut]


def centre_field_is_whole(theory: ProbeGraph, graph_on: GraphOn, axis: int, support: torch.Tensor) -> bool:
    """Whether the centre field along ``axis`` (``support`` on the user's input) is the same on a longer input.

    The input is thin and twice as long along ``axis``: a field that only looks whole (a dilated layer's other taps
    beyond the border) grows there.
    """
    thin = _thinnest_graph(theory, axis, graph_on, 2 * theory.spatial_input_shape[axis])
    if thin is None or thin[1] is None:
        return False
    graph = thin[1]
    mine, theirs = marginal(support, axis), marginal(graph.support([graph.center]), axis)
    a, b = hull(mine), hull(theirs)
    return a is not None and b is not None and torch.equal(mine[a[0] : a[1] + 1], theirs[b[0] : b[1] + 1])


class _Fallback:
    """The thin reading's assumption failed on this axis: read it the exact way."""


_FALLBACK = _Fallback()


class _Windows:
    """Neighbouring outputs see the same whole field (an upsampling, windows): no (r, S, P) along the axis."""


_WINDOWS = _Windows()
# Windows are read off output maps at least this long: on a map of a few positions, all near its ends, the inner maps'
# borders can give neighbours the same clipped field (a stride of 18 on a 9-pixel axis).
_WINDOWS_FROM = 8


class _FixedSize:
    """A call with a fixed output size on the path (adaptive pooling, a resize to a size)."""


_FIXED = _FixedSize()

ELSEWHERE = (
    "an input longer along this axis lengthened another output axis and not this one (the spatial axes were "
    "transposed or permuted): no (r, S, P) maps this input axis to this output axis"
)


def _thin_read(
    theory: ProbeGraph, axis: int, graph_on: GraphOn, user_table: dict[int, Bounds | None], *, start_growth,
    user_reading: _Reading | None = None,
):  # fmt: skip
    """Reads one axis on thin inputs, growing along the axis until its fields fit; see the module's docstring.

    ``user_reading``: the coupling check's reading of the user's input, where it is known.
    """
    length = theory.spatial_input_shape[axis]
    undecided, width, previous, windows_seen = False, None, None, False
    shapes: list[tuple[int, ...]] = []  # the output shapes of the thin inputs read, which differ in this axis only
    for growth in (1 << k for k in range(32) if 1 << k >= start_growth):
        if width is None:
            # As long as the user's input, and no thinner: that is the user's input, whose reading is known.
            known_full = growth == 1 and user_reading is not None
            thin = _thinnest_graph(theory, axis, graph_on, length * growth, below_full=known_full)
            if thin is None:
                return _FALLBACK
            width, graph = thin
            if width >= max(_other_lengths(theory, axis), default=0) and user_reading is not None:
                previous = user_reading  # no thinner input runs: the user's input differs from this one along the axis
                if graph is None and known_full:
                    continue
        else:
            shape = _thin_shape(theory.input_shape, axis, width, length * growth)
            elements, budget = math.prod(shape[1:]), max(math.prod(theory.input_shape[1:]), _SMALL_THIN_INPUT)
            if elements > _MAX_ELEMENTS or (growth > GROWTH[-1] and elements > budget):
                break
            graph = graph_on(shape, _thin_axes(theory, axis, width))
        if graph is None or len(graph.output_shape) != len(theory.output_shape):
            return _FALLBACK
        if _fixes_every_axis(graph.fixed_size):
            # Adaptive pooling or an interpolation to a size on the way: the fields change with the input's
            # length, and no (r, S, P) holds across lengths.
            return _FIXED
        shapes.append(graph.output_shape)
        if len(shapes) > 1 and shapes[-1][axis] == shapes[-2][axis] and shapes[-1] != shapes[-2]:
            return ELSEWHERE
        current = _reading(graph, axis)
        if previous is not None and (name := _whole_axis_coupling(previous, current)):
            return _Global(name)
        known_before, previous = previous, current
        if current.fixed_size:
            # Some dims of a fixed length: whether one follows this axis shows on a longer input.
            if known_before is None or known_before.fixed_size is None:
                undecided = True
                continue
            if _fixed_along(known_before.fixed_size, current.fixed_size):
                return _FIXED
        found = read_axis(graph, axis)
        if isinstance(found, _Clipped):
            continue
        if isinstance(found, _Windows):
            # Seen on two lengths, the second at least twice the first: on a short input the borders of the inner
            # maps can make two neighbours' clipped fields look alike and whole.
            if windows_seen:
                return found
            windows_seen, undecided = True, True
            continue
        # Fields that fit no geometry may still be clipped ones that looked whole (a border hides holes): grow.
        if found is None or not consistent(found, user_table, length):
            undecided = True
            continue
        if _confirmed(theory, graph, axis, graph_on, width, found):
            return found
        undecided = True
    return _FALLBACK if undecided else _CLIPPED


def read_axis(graph: ProbeGraph, axis: int) -> AxisGeometry | _Clipped | _Windows | None:
    """Reads (r, S, P) along ``axis`` from two neighbouring exact fields and checks it with one lattice pass.

    The centre field gives r and its neighbour's gives S (two neighbours also catch fields that alternate, as on an
    upsampling path). The lattice holds every ``g``-th index along the axis, ``g`` odd and large enough that their
    fields cannot touch, so its fields alternate in parity too; each must match the geometry (see
    :func:`_lattice_agrees`).

    Returns:
        The geometry; ``_CLIPPED`` when the input is too short for two whole fields; ``_WINDOWS`` when two
        neighbours see the same whole field; ``None`` when the fields do not follow one (r, S, P) along the axis.
    """
    n, length = graph.output_shape[axis], graph.spatial_input_shape[axis]
    center = graph.center
    mask = marginal(graph.support([center]), axis)
    first = hull(mask)
    if first is None:
        return None
    gap = largest_hole(mask) + 1
    if n < 2 or not is_whole(first, length, gap):
        return _CLIPPED
    neighbour = center[axis] + 1 if center[axis] + 1 < n else center[axis] - 1
    second = hull(marginal(graph.support([_moved(center, axis, neighbour)]), axis))
    if second is None:  # a whole field beside an empty one (a transposed convolution's empty phase): no box fits
        return None
    if not is_whole(second, length, gap):
        return _CLIPPED
    stride = (second[0] - first[0]) * (neighbour - center[axis])
    if first == second and n >= _WINDOWS_FROM:
        # Two neighbours see the same whole field: windows (a translate by a stride of at least 1 could look the same
        # only where the borders hide its ends; the caller confirms it on a longer input).
        return _WINDOWS
    if stride < 1 or second[1] - second[0] != first[1] - first[0]:
        return _other_neighbour_windows(graph, axis, first, neighbour, gap)
    geometry = AxisGeometry(size=first[1] - first[0] + 1, stride=stride, offset=center[axis] * stride - first[0])
    spacing = coprime_to_small_periods(math.ceil((geometry.size + gap) / stride))
    indices = list(range(center[axis] % spacing, n, spacing))
    lattice_mask = marginal(graph.support([_moved(center, axis, i) for i in indices]), axis)
    if _lattice_agrees(lattice_mask, indices, geometry, gap):
        return geometry
    return _other_neighbour_windows(graph, axis, first, neighbour, gap)


def _other_neighbour_windows(graph: ProbeGraph, axis: int, first: Bounds, neighbour: int, gap: int):
    """``_WINDOWS`` where the centre's other neighbour sees the same whole field, else None.

    Shifted windows can pair the centre with that neighbour rather than the first one read; None: the fields follow
    no (r, S, P) read so far.
    """
    center = graph.center
    other = 2 * center[axis] - neighbour
    if not 0 <= other < graph.output_shape[axis] or graph.output_shape[axis] < _WINDOWS_FROM:
        return None
    field = hull(marginal(graph.support([_moved(center, axis, other)]), axis))
    return _WINDOWS if field == first and is_whole(field, graph.spatial_input_shape[axis], gap) else None


def _lattice_agrees(mask: torch.Tensor, indices: list[int], geometry: AxisGeometry, gap: int) -> bool:
    """Checks one lattice pass's support, projected on the axis, against the geometry.

    Nothing may lie outside the predicted spans (clipped to the input), and every certainly unclipped field must
    reach both ends of its span. A clipped field can lose inputs beyond its own holes (a border cuts the paths that
    filled them), so only its containment is checked.
    """
    length = len(mask)
    predicted = torch.zeros_like(mask)
    for index in indices:
        first, last = geometry.span(index)
        predicted[max(first, 0) : max(min(last + 1, length), 0)] = True
        if is_whole((first, last), length, gap) and not (mask[first] and mask[last]):
            return False
    return not bool((mask & ~predicted).any())


def _confirmed(theory, graph: ProbeGraph, axis: int, graph_on: GraphOn, width: int, found: AxisGeometry) -> bool:
    """Whether the centre field matches the geometry on an input twice as long along ``axis`` and twice as wide.

    Longer: a field can look whole on an input that hides some of its inputs beyond the border (a dilated layer
    whose other taps fall outside), and then the geometry read off it is too small. Wider: the field along
    ``axis`` must not depend on the other axes' lengths (at most the user's).
    """
    longer = 2 * graph.spatial_input_shape[axis]
    shape = _thin_shape(theory.input_shape, axis, 2 * width, longer)
    other = graph_on(shape, _thin_axes(theory, axis, 2 * width))
    if other is None:
        return False
    index = other.center[axis]
    return hull(marginal(other.support([other.center]), axis)) == found.span(index)


def _thinnest_graph(theory: ProbeGraph, axis: int, graph_on: GraphOn, length: int, *, below_full: bool = False):
    """The graph on the thinnest input ``length`` long along ``axis`` that suits a thin read, with its width.

    The other axes are 1, 2, 4, ... long (at most the user's lengths; 0 in 1D): the first width on which the model
    runs and no convolution window along those axes covers only padding. None if the input grows too large.
    ``below_full``: where only the full width is left, return it without its graph (the caller has its reading).
    """
    longest = max(_other_lengths(theory, axis), default=0)
    width = 1 if longest else 0
    while True:
        shape = _thin_shape(theory.input_shape, axis, width, length)
        if math.prod(shape[1:]) > _MAX_ELEMENTS:
            return None
        if below_full and width >= longest:
            return width, None
        graph = graph_on(shape, _thin_axes(theory, axis, width))
        if (graph is not None and len(graph.output_shape) == len(theory.output_shape)) or width >= longest:
            return width, graph
        width *= 2


def _thin_axes(theory: ProbeGraph, axis: int, width: int) -> tuple[int, ...]:
    """The axes a thin input shortens: those other than ``axis`` that are longer than ``width`` on the user's input."""
    return tuple(b for b, n in enumerate(theory.spatial_input_shape) if b != axis and n > width)


def _other_lengths(theory: ProbeGraph, axis: int) -> list[int]:
    return [n for b, n in enumerate(theory.spatial_input_shape) if b != axis]


def _thin_shape(shape: tuple[int, ...], axis: int, width: int, length: int) -> tuple[int, ...]:
    spatial = [length if b == axis else min(width, n) for b, n in enumerate(shape[2:])]
    return (1, shape[1], *spatial)


def _moved(position: Position, axis: int, index: int) -> Position:
    return tuple(index if a == axis else i for a, i in enumerate(position))


def _enlarged_geometry(theory: ProbeGraph, graph_on: GraphOn, known, reasons: dict[int, str], user_reading) -> list:
    """The exact reading: full axis tables, on inputs enlarged along every undecided axis at once.

    Per axis, the geometry or None (``reasons`` says why where it can tell). ``user_reading``: the centre's support
    and the couplings on the user's input, where known, to find a coupling of every undecided axis at once.
    """
    lengths = theory.spatial_input_shape
    graphs: dict[tuple[int, ...], ProbeGraph | None] = {}  # by shape: the spanning check's graph serves the loop
    spanning = _spanning_axes(theory, graph_on, known, user_reading, graphs)
    if spanning is not None:
        return spanning
    axes = _conclusive_axis_table(theory, known)
    if axes is None:
        return ["the fields on the input probed are no boxes"] * len(lengths)
    geometry = [fit_axis(axes.table[a], lengths[a], axes.gaps[a]) for a in range(len(lengths))]
    undecided = {a for a, g in enumerate(geometry) if g is None and not axes.conclusive(a, lengths[a])}
    for growth in GROWTH[1:]:
        if not undecided:
            break
        larger = [*theory.input_shape]
        for a in undecided:
            larger[2 + a] *= growth
        if math.prod(larger[1:]) > _MAX_ELEMENTS:
            break
        graph = graphs[tuple(larger)] if tuple(larger) in graphs else graph_on(tuple(larger))
        if graph is None or len(graph.output_shape) != len(lengths):
            break
        if name := _couples_every_axis(user_reading, graph, sorted(undecided), growth):
            reasons.update(dict.fromkeys(undecided, _reason(_Global(name), 0)))
            break
        larger_axes = _conclusive_axis_table(graph, {})
        if larger_axes is None:
            break
        for a in list(undecided):
            found = fit_axis(larger_axes.table[a], larger[2 + a], larger_axes.gaps[a])
            if found is not None and consistent(found, axes.table[a], lengths[a]):
                geometry[a] = found
            if found is not None or larger_axes.conclusive(a, larger[2 + a]):
                undecided.discard(a)
    for axis in undecided:  # no input ran on which enough fields lie inside: the fields may well fit one
        reasons.setdefault(axis, TOO_FEW_WHOLE)
    return geometry


def _global_on_a_smaller_input(theory: ProbeGraph, graph_on: GraphOn, known, user_couplings: list) -> str | None:
    """Why no axis has a geometry, where one input half as long on every axis shows a coupling of them all; or None.

    Where the centre field spans the user's input on every axis, the same forward on an input half as long on every
    axis (a quarter of the pixels in 2D) gives the couplings of two sizes: a reduction, softmax or contraction whose
    dims grew as the input did on every axis, with the centre field spanning both inputs, makes every field span any
    input (:func:`_couples_every_axis`). One small pass for all axes, where thin inputs take two per axis.
    """
    lengths = theory.spatial_input_shape
    center = theory.center
    if any(n % 2 or n < 4 for n in lengths) or not all(_support_spans(known[center], a) for a in range(len(lengths))):
        return None
    smaller = graph_on((*theory.input_shape[:2], *(n // 2 for n in lengths)))
    if smaller is None or len(smaller.output_shape) != len(lengths):
        return None
    before = (smaller.support([smaller.center]), list(smaller.couplings))
    name = _couples_every_axis(before, (known[center], user_couplings), list(range(len(lengths))), 2)
    return None if name is None else _reason(_Global(name), 0)


def _spanning_axes(theory: ProbeGraph, graph_on: GraphOn, known, user_reading, graphs: dict) -> list | None:
    """The exact reading's answer where every field spans the user's input along every axis, before any table.

    Such fields are clipped at both ends on the user's input: its axis tables cannot tell r. One input twice as long
    along every axis decides: a coupling of every axis (:func:`_couples_every_axis`) makes every field span any
    input; a model that runs on no other input size leaves a global field and one larger than the input apart, and
    says so. Both at the cost of one forward pass, and two backward passes for the end fields. None: read on.
    ``graphs`` keeps the longer input's graph, by shape, for the reading that goes on.
    """
    lengths = theory.spatial_input_shape
    center = theory.center
    if user_reading is None or not all(_support_spans(known[center], a) for a in range(len(lengths))):
        return None
    ends = [tuple(0 for _ in lengths), tuple(n - 1 for n in theory.output_shape)]
    if not all(_support_spans(theory.support([end]), a) for end in ends for a in range(len(lengths))):
        return None  # an end field inside the input: the tables can tell r
    larger = (*theory.input_shape[:2], *(2 * n for n in lengths))
    if math.prod(larger[1:]) > _MAX_ELEMENTS:
        return None
    graph = graphs[larger] = graph_on(larger)
    if graph is None or len(graph.output_shape) != len(lengths):
        return [ONE_SIZE] * len(lengths)
    if name := _couples_every_axis(user_reading, graph, list(range(len(lengths))), 2):
        return [_reason(_Global(name), 0)] * len(lengths)
    return None


def _conclusive_axis_table(graph: ProbeGraph, known) -> AxisTable | None:
    """The table of one lattice through the centre, or of every index if that cannot decide the geometry."""
    axes = measure_axis_table(graph, full=False, known=known)
    lengths = graph.spatial_input_shape
    if axes is None or not all(axes.conclusive(a, n) for a, n in enumerate(lengths)):
        axes = measure_axis_table(graph, full=True, known=known) or axes
    return axes
