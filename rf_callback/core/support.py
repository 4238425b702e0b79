"""Reading fields off gradient supports: per-axis projections, hulls, runs and boxes (boolean tensor maths only)."""

from __future__ import annotations

import torch

from rf_callback.core.geometry import Bounds

Position = tuple[int, ...]
Box = tuple[Bounds, ...]


def marginal(support: torch.Tensor, axis: int) -> torch.Tensor:
    """The support projected on ``axis``: true where any input along the other axes is."""
    other = tuple(a for a in range(support.dim()) if a != axis)
    return support.any(dim=other) if other else support


def hull(mask: torch.Tensor) -> Bounds | None:
    """The first and last true index of a 1D mask, ``None`` when it is empty."""
    nonzero = torch.nonzero(mask).flatten()
    return None if nonzero.numel() == 0 else (int(nonzero[0]), int(nonzero[-1]))


def largest_hole(mask: torch.Tensor) -> int:
    """The longest run of false entries between two true ones (dilation leaves such holes)."""
    nonzero = torch.nonzero(mask).flatten()
    return int((nonzero.diff() - 1).max()) if nonzero.numel() > 1 else 0


def runs(mask: torch.Tensor, min_gap: int) -> list[Bounds]:
    """Maximal runs of ``mask``, where zero gaps shorter than ``min_gap`` do not split a run."""
    nonzero = torch.nonzero(mask).flatten()
    if nonzero.numel() == 0:
        return []
    breaks = torch.nonzero(nonzero.diff() - 1 >= min_gap).flatten()
    starts = [0, *(int(b) + 1 for b in breaks)]
    ends = [*(int(b) for b in breaks), nonzero.numel() - 1]
    return [(int(nonzero[s]), int(nonzero[e])) for s, e in zip(starts, ends)]


def box_of(support: torch.Tensor) -> Box | None:
    """The smallest box holding the support, ``None`` when it is empty."""
    hulls = [hull(marginal(support, a)) for a in range(support.dim())]
    box = tuple(h for h in hulls if h is not None)
    return box if len(box) == len(hulls) else None


def box_slices(box: Box) -> tuple[slice, ...]:
    """Slices that select ``box`` (inclusive bounds) from a tensor."""
    return tuple(slice(first, last + 1) for first, last in box)


def inside_boxes(support: torch.Tensor, boxes: list[Box | None]) -> bool:
    """Whether every true entry of ``support`` lies inside one of ``boxes``."""
    covered = torch.zeros_like(support)
    for box in boxes:
        if box is not None:
            covered[box_slices(box)] = True
    return not bool((support & ~covered).any())


def restricted(gradient: torch.Tensor, box: Box | None) -> torch.Tensor:
    """A copy of ``gradient`` that is zero outside ``box`` (all zero for ``None``)."""
    own = torch.zeros_like(gradient)
    if box is not None:
        own[box_slices(box)] = gradient[box_slices(box)]
    return own
