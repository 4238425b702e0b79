"""Effective-receptive-field metrics of a gradient map: pure tensor maths, no model."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Bounds = tuple[int, int]

# RepLKNet's thresholds for the high-contribution area ratio (Ding et al., CVPR 2022).
HIGH_CONTRIBUTION_THRESHOLDS = (0.2, 0.3, 0.5, 0.99)
# Mass fractions compare with a relative tolerance, so that a window holding exactly q of the mass counts: maps come
# from float32 gradients (rounding about 1e-7 of each value), so 1e-12 let [2, 3, 4, 3] of [1, 2, 3, 4, 3, 2, 1]
# hold "less" than its exact 0.75. Distances to the centre of mass tie within it too (of the axis's length).
_MASS_TOLERANCE = 1e-6


def checked_map(heatmap: torch.Tensor) -> torch.Tensor:
    """Returns the map as float64, or raises if it cannot carry metrics.

    Raises:
        ValueError: the map is empty, not finite, has negative values, or holds no mass.
    """
    if not isinstance(heatmap, torch.Tensor) or heatmap.dim() < 1 or heatmap.numel() == 0:
        raise ValueError(f"heatmap must be a non-empty tensor over the input's spatial axes, got {heatmap!r}")
    values = heatmap.detach().to("cpu", torch.float64)
    if not torch.isfinite(values).all():
        raise ValueError("the gradient map is degenerate: it holds inf or NaN (check the model and inputs)")
    if (values < 0).any():
        raise ValueError("the gradient map must be non-negative (gradient magnitudes)")
    if values.sum() <= 0:
        raise ValueError("the gradient map is degenerate: it is zero everywhere (dead units or zero weights)")
    return values


def marginal(heatmap: torch.Tensor, axis: int) -> torch.Tensor:
    """The map summed over every axis but ``axis``."""
    other = tuple(a for a in range(heatmap.dim()) if a != axis)
    return heatmap.sum(dim=other) if other else heatmap


def center_of_mass(heatmap: torch.Tensor) -> tuple[float, ...]:
    """Per axis, the mean input index weighted by the map."""
    values = checked_map(heatmap)
    total = values.sum()
    return tuple(float((marginal(values, a) * _indices(n)).sum() / total) for a, n in enumerate(values.shape))


def _indices(n: int) -> torch.Tensor:
    """``0 .. n-1`` in float64: a float32 index minus a float mean keeps 7 digits (std off by 1.5e-5 at 1e5)."""
    return torch.arange(n, dtype=torch.float64, device="cpu")  # beside the CPU heatmaps, whatever the default device


def spread(heatmap: torch.Tensor) -> tuple[float, ...]:
    """Per axis, the standard deviation of the index from the map's second moments (no curve fitting)."""
    values = checked_map(heatmap)
    total = values.sum()
    result = []
    for axis, (n, mean) in enumerate(zip(values.shape, center_of_mass(values))):
        weights = marginal(values, axis)
        result.append(math.sqrt(max(float((weights * (_indices(n) - mean) ** 2).sum() / total), 0.0)))
    return tuple(result)


def mass_extent(heatmap: torch.Tensor, q: float = 0.95) -> tuple[Bounds, ...]:
    """Per axis, the shortest interval holding at least fraction ``q`` of the marginal mass.

    Ties go to the interval holding more mass, then to the one whose centre is nearer the centre of mass.

    Args:
        heatmap: non-negative map over the input's spatial axes.
        q: the mass fraction, in (0, 1]; 1 spans every cell with mass, however little.

    Returns:
        Per axis, the inclusive ``(first, last)`` input indices.

    Raises:
        ValueError: ``q`` is outside (0, 1], or the map is degenerate.
    """
    if not 0 < q <= 1:
        raise ValueError(f"q={q!r} must be a mass fraction in (0, 1]")
    values = checked_map(heatmap)
    centers = center_of_mass(values)
    return tuple(_shortest_interval(marginal(values, a), q, centers[a]) for a in range(values.dim()))


def _shortest_interval(weights: torch.Tensor, q: float, center: float) -> Bounds:
    if q == 1:  # every cell with mass, however little: the tolerance below is for prefix-sum rounding only
        nonzero = torch.nonzero(weights).flatten()
        return int(nonzero[0]), int(nonzero[-1])
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64, device=weights.device), weights.cumsum(0)]).tolist()
    total = prefix[-1]
    need = q * total * (1 - _MASS_TOLERANCE)
    candidates: list[tuple[int, float, int, int]] = []  # (width, mass, first, last) of each shortest window
    last = 0
    for first in range(len(weights)):
        last = max(last, first)
        while last < len(weights) and prefix[last + 1] - prefix[first] < need:
            last += 1
        if last == len(weights):
            break
        candidates.append((last - first, prefix[last + 1] - prefix[first], first, last))
    assert candidates  # q <= 1 and the total mass is positive: the whole axis always qualifies
    width = min(c[0] for c in candidates)
    shortest = [c for c in candidates if c[0] == width]
    # Masses differ by prefix-sum rounding where they are equal (a periodic map): within the tolerance they tie.
    heaviest = max(c[1] for c in shortest) - _MASS_TOLERANCE * total
    tied = [c for c in shortest if c[1] >= heaviest]
    distances = [abs((c[2] + c[3]) / 2 - center) for c in tied]
    nearest = min(distances) + _MASS_TOLERANCE * len(weights)
    _, _, first, last = min((c for c, d in zip(tied, distances) if d <= nearest), key=lambda c: c[2])
    return first, last


def high_contribution(heatmap: torch.Tensor, t: float, center: Sequence[int] | None = None) -> tuple[int, float] | None:
    """RepLKNet's high-contribution area ratio at threshold ``t``.

    The map is normalised as ``log10(A + 1) / max``; the result is the side of the smallest square (interval,
    cube) centred on ``center`` that holds more than fraction ``t`` of the normalised total, and that square's
    share of the input. RepLKNet starts at side 3; this starts at side 1.

    Args:
        heatmap: non-negative map over the input's spatial axes.
        t: the fraction, in (0, 1).
        center: the input index the squares are centred on; default, the map's centre ``n // 2`` per axis.

    Returns:
        ``(side, share)``, or ``None`` where no centred square inside the input holds that much.
    """
    if not 0 < t < 1:
        raise ValueError(f"t={t!r} must be a fraction in (0, 1)")
    values = checked_map(heatmap)
    values = torch.log10(values + 1)
    values = values / values.max()
    center = tuple(n // 2 for n in values.shape) if center is None else tuple(center)
    total = float(values.sum())
    for radius in range(max(values.shape)):
        box = tuple(slice(max(c - radius, 0), c + radius + 1) for c in center)
        if any(c - radius < 0 or c + radius >= n for c, n in zip(center, values.shape)):
            return None
        if float(values[box].sum()) > t * total:
            side = 2 * radius + 1
            return side, side ** values.dim() / values.numel()
    return None
