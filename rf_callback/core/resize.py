"""Linear and cubic resizing, and bilinear grid sampling, with exact weights, for the probe's copy.

PyTorch computes a resize's source coordinate in the tensor's floating type: by a factor such as 7 → 13, a source
that is exactly an input index comes out a few ulps off it, and the neighbour gets a weight of about 1e-8 where the
true weight is 0. The gradient then reaches inputs the network does not look at, and the field comes out wider.
Here the same formulas (ATen's ``area_pixel_compute_source_index`` and cubic convolution with A = -0.75; for an
antialiased resize, ``_compute_indices_min_size_weights_aa``'s scaled triangle or cubic filter with A = -0.5,
normalised) run in rational arithmetic, so the weights that are 0 are exactly 0. Where no source falls exactly on an
input index (a factor of 2 without aligned corners, the common upsampling), PyTorch's own kernel has the exact
support and runs as it is: the exact resize costs several of its passes.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
from fractions import Fraction
from typing import NamedTuple

import torch
import torch.nn.functional as F

_SPATIAL_AXES = {"linear": 1, "bilinear": 2, "bicubic": 2, "trilinear": 3}
_CUBIC_A = Fraction(-3, 4)
_ANTIALIASED_CUBIC_A = Fraction(-1, 2)
_INTERPOLATE = inspect.signature(F.interpolate)
_GRID_SAMPLE = inspect.signature(F.grid_sample)
# A sampling coordinate within this many ulps (of the grid's type, times the axis length) of an input index is that
# index: the grid holds it no more precisely, and the neighbour's weight would be rounding noise.
_GRID_ULPS = 8


def _snap_tolerance(values: torch.Tensor, length: int) -> torch.Tensor | float:
    """How far (in input pixels) a grid coordinate may lie off an input index and still be taken for it.

    In float32, 8 units of 1's last place: a ten-thousandth of a pixel on a thousand pixels, far below any warp's own
    offset. In a 16-bit grid one such unit is a good part of a pixel (a 0.3-pixel shift on 96 pixels is 4 of
    bfloat16's), so a coordinate counts as the index only where the grid value is the index's position rounded to
    the grid's type (half a unit of the value's own last place), plus a float32 computation's rounding.
    """
    scale = max(length, 1)
    if torch.finfo(values.dtype).bits > 16:
        return _GRID_ULPS * torch.finfo(values.dtype).eps * scale
    spacing = (torch.nextafter(values, torch.full_like(values, 2.0)) - values).abs().double()
    return (spacing / 2 + _GRID_ULPS * torch.finfo(torch.float32).eps) * scale / 2


def exact_resize(args, kwargs, *, unsigned: bool) -> torch.Tensor | None:
    """``F.interpolate(*args, **kwargs)`` with exact weights, or ``None`` where the call is not a plain linear one.

    Args:
        args: the positional arguments of the ``interpolate`` call.
        kwargs: its keyword arguments.
        unsigned: use the weights' magnitudes (the theoretical copy: a cubic kernel's negative lobes must not
            cancel a path).

    Returns:
        The resized tensor, or ``None`` for a mode other than linear, bilinear, trilinear or bicubic, or arguments
        that the call itself would refuse (it then runs, and raises, as it is).
    """
    arguments = _bound(_INTERPOLATE, args, kwargs)
    if arguments is None:
        return None
    x, mode = arguments["input"], arguments["mode"]
    if not isinstance(x, torch.Tensor) or _SPATIAL_AXES.get(mode) != x.dim() - 2:
        return None
    if arguments["antialias"] and mode not in ("bilinear", "bicubic"):
        return None
    if not x.is_floating_point():
        return None
    plans = _axis_plans(x.shape[2:], arguments)
    cubic_signs = unsigned and mode == "bicubic"  # a negative lobe could cancel a path on the theoretical copy
    if plans is None or not (cubic_signs or any(plan.rounded for plan in plans)):
        return None
    for axis, (sources, weights, _) in enumerate(plans):
        x = _resized_along(x, 2 + axis, sources, weights, unsigned)
    return x


class _Plan(NamedTuple):
    """One axis of a resize: per output index, the input indices it reads and their exact weights."""

    sources: list[list[int]]
    weights: list[list[Fraction]]
    # Whether PyTorch's kernel rounds a weight of exactly 0 to a tiny non-zero one here (a source on an input index,
    # or a filter's edge on one): only then is the exact resize needed.
    rounded: bool


def _bound(signature: inspect.Signature, args, kwargs) -> dict | None:
    """The call's arguments by name, defaults filled in, or None where they do not fit the signature."""
    try:
        call = signature.bind(*args, **kwargs)
    except TypeError:
        return None
    call.apply_defaults()
    return call.arguments


def _axis_plans(lengths, arguments) -> list[_Plan] | None:
    size, factor = arguments["size"], arguments["scale_factor"]
    if (size is None) == (factor is None):
        return None
    cubic = arguments["mode"] == "bicubic"
    corners = bool(arguments["align_corners"])
    antialias = bool(arguments["antialias"])
    n = len(lengths)
    sizes = _per_axis(size, n)
    factors = _per_axis(factor, n)
    if (size is not None and sizes is None) or (factor is not None and factors is None):
        return None
    plans = []
    for axis, length in enumerate(lengths):
        if sizes is not None:
            out, scale = sizes[axis], None
        else:
            assert factors is not None
            out = math.floor(length * factors[axis])
            scale = None if arguments["recompute_scale_factor"] else factors[axis]
        if not isinstance(out, int) or out <= 0 or (scale is not None and scale <= 0):
            return None
        plan = _antialiased_plan if antialias else _axis_plan
        plans.append(plan(length, out, scale, corners, cubic))
    return plans


def _per_axis(value, n: int) -> list | None:
    if value is None:
        return None
    values = list(value) if isinstance(value, (list, tuple, torch.Size)) else [value] * n
    if len(values) != n or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return None
    return values


def _rational(value: float) -> Fraction:
    """The simple fraction a float spells (1/3 for 0.333...), or its exact binary value where none is that close."""
    exact = Fraction(value)
    simple = exact.limit_denominator(1 << 20)
    return simple if abs(simple - exact) <= abs(exact) * Fraction(1, 10**12) else exact


def _scale(length: int, out: int, factor: float | None, corners: bool) -> Fraction:
    """Input indices per output index (ATen's ``area_pixel_compute_scale``)."""
    if corners:
        return Fraction(length - 1, out - 1) if out > 1 else Fraction(0)
    if factor is not None:
        return 1 / _rational(factor)
    return Fraction(length, out)


@functools.lru_cache(maxsize=256)
def _axis_plan(length: int, out: int, factor: float | None, corners: bool, cubic: bool) -> _Plan:
    """Per output index, the input indices it reads and their weights, as ATen's kernels define them."""
    scale = _scale(length, out, factor, corners)
    sources, weights, rounded = [], [], False
    for index in range(out):
        source = scale * index if corners else scale * (index + Fraction(1, 2)) - Fraction(1, 2)
        if not cubic and source < 0:
            source = Fraction(0)
        first = math.floor(source)
        t = source - first
        # A source of exactly 0 is computed exactly (0 * scale, or a clamp); a larger one on an index may not be.
        rounded = rounded or (t == 0 and source > 0)
        if cubic:
            taps = [first - 1, first, first + 1, first + 2]
            kernel = [_cubic_far(t + 1), _cubic_near(t), _cubic_near(1 - t), _cubic_far(2 - t)]
        else:
            taps, kernel = [first, first + 1], [1 - t, t]
        sources.append([min(max(tap, 0), length - 1) for tap in taps])
        weights.append(kernel)
    return _Plan(sources, weights, rounded)


@functools.lru_cache(maxsize=256)
def _antialiased_plan(length: int, out: int, factor: float | None, corners: bool, cubic: bool) -> _Plan:
    """The same for an antialiased resize: a filter stretched by the scale where it shrinks, its weights normalised."""
    scale = _scale(length, out, factor, corners)
    half_width = 2 if cubic else 1  # ATen's interp_size / 2
    support = half_width * scale if scale >= 1 else Fraction(half_width)
    stretch = 1 / scale if scale >= 1 else Fraction(1)
    sources, weights = [], []
    for index in range(out):
        center = scale * (index + Fraction(1, 2))
        first = max(math.trunc(center - support + Fraction(1, 2)), 0)
        end = min(math.trunc(center + support + Fraction(1, 2)), length)
        taps = list(range(first, max(end, first + 1)))
        kernel = [_antialiasing_filter((tap - center + Fraction(1, 2)) * stretch, cubic) for tap in taps]
        total = sum(kernel)
        sources.append([min(tap, length - 1) for tap in taps])
        weights.append([w / total for w in kernel] if total != 0 else kernel)
    # The filter's edges fall on input indices for many scales, and the range ATen reads is cut from float bounds:
    # always exact (an antialiased resize inside a network is rare; in preprocessing, it is not probed).
    return _Plan(sources, weights, rounded=True)


def _antialiasing_filter(x: Fraction, cubic: bool) -> Fraction:
    x = abs(x)
    if not cubic:
        return 1 - x if x < 1 else Fraction(0)
    a = _ANTIALIASED_CUBIC_A
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return Fraction(0)


def _cubic_near(x, a=_CUBIC_A):
    """The cubic convolution kernel on [0, 1], for a Fraction (``a`` a Fraction) or a tensor (``a`` a float)."""
    return ((a + 2) * x - (a + 3)) * x * x + 1


def _cubic_far(x, a=_CUBIC_A):
    """The cubic convolution kernel on [1, 2], as :func:`_cubic_near`."""
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a


def _resized_along(x: torch.Tensor, dim: int, sources, weights, unsigned: bool) -> torch.Tensor:
    taps = max(len(row) for row in sources)
    rows = []
    for row_sources, row_weights in zip(sources, weights):
        # A zero weight reads an index the output already reads: its product adds nothing, value or gradient.
        live = next((tap for tap, w in zip(row_sources, row_weights) if w != 0), row_sources[0])
        padding = taps - len(row_sources)
        rows.append(([tap if w != 0 else live for tap, w in zip(row_sources, row_weights)] + [live] * padding,
                     [float(abs(w) if unsigned else w) for w in row_weights] + [0.0] * padding))  # fmt: skip
    index = torch.tensor([r[0] for r in rows], dtype=torch.long, device=x.device)
    weight = torch.tensor([r[1] for r in rows], dtype=x.dtype, device=x.device)
    shape = [1] * x.dim()
    shape[dim] = len(sources)
    result = x.index_select(dim, index[:, 0]) * weight[:, 0].reshape(shape)
    for tap in range(1, taps):
        result = result + x.index_select(dim, index[:, tap]) * weight[:, tap].reshape(shape)
    return result


def exact_grid_sample(args, kwargs, *, unsigned: bool = False) -> torch.Tensor | None:
    """``F.grid_sample(*args, **kwargs)`` in bilinear or bicubic mode without the neighbour weights rounding makes.

    An identity warp's grid (``F.affine_grid``) puts output pixel i at input coordinate i up to float32 rounding,
    and bilinear sampling then gives input i + 1 a weight of about 6e-8 (bicubic: inputs i - 1 .. i + 2): the field
    grows by a row and a column or more. Here the coordinates are unnormalised in float64, a coordinate within a
    few ulps of an input index is that index (the grid holds it no more precisely), and the taps per axis (two, or
    four for bicubic) are weighted as ATen does, with zero, border or reflection padding. Where no coordinate lies on
    an input index (a learned flow), PyTorch's kernel runs.

    Args:
        args: the positional arguments of the ``grid_sample`` call.
        kwargs: its keyword arguments.
        unsigned: the theoretical copy's twin: the bicubic kernel's negative lobes as their magnitudes (they could
            cancel another path to the same input).

    Returns:
        The sampled tensor, or ``None`` where PyTorch's kernel is exact, for another mode, or for arguments the call
        itself would refuse.
    """
    arguments = _bound(_GRID_SAMPLE, args, kwargs)
    if arguments is None:
        return None
    x, grid = arguments["input"], arguments["grid"]
    mode, padding = arguments["mode"], arguments["padding_mode"]
    if not (isinstance(x, torch.Tensor) and isinstance(grid, torch.Tensor)) or mode not in ("bilinear", "bicubic"):
        return None
    cubic = mode == "bicubic"
    if cubic and torch.finfo(grid.dtype).bits <= 16:
        # A 16-bit grid's coordinates lie several of its units off (affine_grid computed in it): PyTorch's kernel,
        # computing in the same type, lands them on the index where float64 weights would read the neighbours.
        return None
    n_axes = x.dim() - 2
    if n_axes not in ((2,) if cubic else (2, 3)) or grid.dim() != x.dim() or grid.shape[-1] != n_axes:
        return None
    if grid.shape[0] != x.shape[0] or padding not in ("zeros", "border", "reflection") or not grid.is_floating_point():
        return None
    corners = bool(arguments["align_corners"])
    # grid[..., 0] indexes the last axis (x, the width), grid[..., 1] the one before, as in ATen.
    lengths = x.shape[2:][::-1]
    taps, snapped = [], False
    for axis, length in enumerate(lengths):
        # Bicubic sampling folds each tap's index by the padding, not the coordinate (ATen's get_value_bounded).
        coordinate = _unnormalised(grid[..., axis].double(), length, corners, "zeros" if cubic else padding)
        tolerance = _snap_tolerance(grid[..., axis], length)
        nearest = coordinate.round()
        on_an_index = (coordinate - nearest).abs() <= tolerance
        snapped = snapped or bool(on_an_index.any())
        coordinate = torch.where(on_an_index, nearest, coordinate)
        low = coordinate.floor()
        t = coordinate - low
        if cubic:
            a = float(_CUBIC_A)
            weights = (_cubic_far(t + 1, a), _cubic_near(t, a), _cubic_near(1 - t, a), _cubic_far(2 - t, a))
            taps.append([(_folded(low + k - 1, length, corners, padding), w) for k, w in enumerate(weights)])
        else:
            taps.append([(low, 1 - t), (low + 1, t)])
    if not snapped:  # no coordinate on an input index: PyTorch's kernel has the exact support (a learned flow)
        return None
    out = None
    for corner in itertools.product(*taps):
        weight = torch.ones_like(corner[0][1])
        inside = torch.ones_like(weight, dtype=torch.bool)
        indices = []
        for (index, axis_weight), length in zip(corner, lengths):
            weight = weight * (axis_weight.abs() if unsigned else axis_weight)
            inside = inside & (index >= 0) & (index <= length - 1) & (axis_weight != 0)
            indices.append(index.clamp(0, length - 1).long())
        term = _gathered(x, indices[::-1]) * (weight * inside).to(x.dtype).unsqueeze(1)
        out = term if out is None else out + term
    return out


def _unnormalised(coordinate: torch.Tensor, length: int, corners: bool, padding: str) -> torch.Tensor:
    """ATen's ``grid_sampler_compute_source_index``: from [-1, 1] to input indices, with the padding's folding."""
    coordinate = (coordinate + 1) / 2 * (length - 1) if corners else ((coordinate + 1) * length - 1) / 2
    return _folded(coordinate, length, corners, padding)


def _folded(coordinate: torch.Tensor, length: int, corners: bool, padding: str) -> torch.Tensor:
    """ATen's ``compute_coordinates``: an input coordinate folded into the input by the padding (zeros: as it is)."""
    if padding == "border":
        return coordinate.clamp(0, length - 1)
    if padding == "reflection":
        low, high = (0.0, 2.0 * (length - 1)) if corners else (-1.0, 2.0 * length - 1)
        coordinate = _reflected(coordinate, low, high)
        return coordinate.clamp(0, length - 1)
    return coordinate


def _reflected(coordinate: torch.Tensor, twice_low: float, twice_high: float) -> torch.Tensor:
    if twice_low == twice_high:
        return torch.zeros_like(coordinate)
    low, span = twice_low / 2, (twice_high - twice_low) / 2
    distance = (coordinate - low).abs()
    extra, flips = torch.fmod(distance, span), torch.floor(distance / span)
    return torch.where(flips % 2 == 0, extra + low, span - extra + low)


def _gathered(x: torch.Tensor, indices: list[torch.Tensor]) -> torch.Tensor:
    """``x[n, :, i, j]`` (or ``[n, :, d, i, j]``) for every grid point, channels at dim 1: ``(N, C, *grid)``."""
    batch = torch.arange(x.shape[0], device=x.device).reshape(-1, *([1] * (indices[0].dim() - 1)))
    picked = x.movedim(1, -1)[tuple([batch, *indices])]  # (N, *grid, C)
    return picked.movedim(-1, 1)
