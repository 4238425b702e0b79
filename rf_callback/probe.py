"""The numeric receptive-field probe: exact, n-dimensional, and many output positions per backward pass."""

from __future__ import annotations

import contextlib
import difflib
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from rf_callback._model_copy import MODES, model_device, prepared_copy, preserved_random_state, probe_functions
from rf_callback.effective import checked_map
from rf_callback.result import AxisGeometry, Bounds, EffectiveField, ReceptiveField, ReceptiveFieldMap

Position = tuple[int, ...]
Box = tuple[Bounds, ...]
# Geometry that cannot be read on the user's input (every field clipped) is read on inputs up to this many times
# larger per axis, as long as the input stays under _MAX_GEOMETRY_ELEMENTS.
_GEOMETRY_GROWTH = (2, 4, 8, 16, 32)
_MAX_GEOMETRY_ELEMENTS = 1 << 24
# Two fields can both look unclipped and still be cut by the input's edges when dilation leaves holes in them;
# the geometry is read off no fewer than three.
_MIN_WHOLE_FIELDS = 3


class ProbeError(RuntimeError):
    """The probe ran but could not measure a field: the forward raised, or the gradient was zero or not finite."""


class _Underflow(Exception):
    """A float32 gradient came close enough to underflow that the probe is redone in float64."""


# Float32's smallest normal number is 1.2e-38; a non-zero gradient below this may have neighbours that underflowed.
_UNDERFLOW_GUARD = 1e-30


class _Captured(Exception):
    """Stops the forward pass once the probed layer has produced its output."""


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

    Returns:
        A :class:`ReceptiveField` (with heatmap) for one position, a list of them for a list of positions, or a
        :class:`ReceptiveFieldMap` of bounds for ``"all"``.

    Raises:
        ValueError: an argument is wrong (the message names it, the value given and what is allowed).
        ProbeError: the forward raised (chained), the output does not depend on the input, or the gradient is
            zero or not finite.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not a probe mode; use one of {MODES}")
    shape = _checked_input_shape(input_shape)
    if not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws={draws!r} must be a positive int (the number of random inputs in weights mode)")
    device = model_device(model)
    with preserved_random_state(device), torch.inference_mode(False), torch.enable_grad(), _exact_kernels(device):
        try:
            return _probe(model, shape, pos, layer, mode, draws, seed, dtype or torch.float32, guard=dtype is None)
        except _Underflow:
            return _probe(model, shape, pos, layer, mode, draws, seed, torch.float64, guard=False)


def _probe(model, shape, pos, layer, mode, draws, seed, dtype, *, guard: bool):
    theory = _Graph(model, shape, layer, "theoretical", dtype=dtype, device=model_device(model), guard=guard)
    positions, kind = _normalised_positions(pos, theory.output_shape, layer)
    prober = _Prober(model, theory, mode, draws=draws, seed=seed)
    if kind == "all":
        return prober.field_map()
    fields = prober.fields(positions)
    return fields[0] if kind == "single" else fields


@contextlib.contextmanager
def _exact_kernels(device: torch.device):
    """Runs the probe with autocast off and, on CUDA, without cuDNN's Winograd or FFT kernels.

    Their rounding noise would turn exact zeros of the gradient into tiny non-zero values and widen the field.
    """
    # Mixed precision (a Trainer's bf16-mixed or 16-mixed) must not recast the probe's copy.
    with torch.autocast("cpu", enabled=False), contextlib.ExitStack() as stack:
        if device.type == "cuda":
            stack.enter_context(torch.autocast("cuda", enabled=False))
            stack.enter_context(torch.backends.cudnn.flags(enabled=False))
        yield


def _checked_input_shape(input_shape) -> tuple[int, ...]:
    allowed = "a sequence (N, C, L), (N, C, H, W) or (N, C, D, H, W) of positive ints"
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise ValueError(f"input_shape={input_shape!r} is not {allowed}") from None
    if not 3 <= len(shape) <= 5 or min(shape) < 1 or any(s != v for s, v in zip(shape, input_shape)):
        raise ValueError(f"input_shape={input_shape!r} is not {allowed}")
    return shape


def _normalised_positions(pos, output_shape: tuple[int, ...], layer: str | None) -> tuple[list[Position], str]:
    where = f"layer {layer!r}" if layer else "the model"
    if isinstance(pos, str):
        if pos == "center":
            return [tuple(n // 2 for n in output_shape)], "single"
        if pos == "all":
            return [], "all"
        raise ValueError(f"pos={pos!r} is not allowed; use an index tuple, a list of them, 'center' or 'all'")
    if isinstance(pos, int) or (isinstance(pos, Sequence) and all(isinstance(i, int) for i in pos)):
        return [_checked_position(pos, output_shape, where)], "single"
    if isinstance(pos, Sequence) and len(pos) > 0:
        return [_checked_position(p, output_shape, where) for p in pos], "list"
    raise ValueError(f"pos={pos!r} is not allowed; use an index tuple, a list of them, 'center' or 'all'")


def _checked_position(pos, output_shape: tuple[int, ...], where: str) -> Position:
    index = (pos,) if isinstance(pos, int) else tuple(pos)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in index) or len(index) != len(output_shape):
        raise ValueError(
            f"pos={pos!r} must have {len(output_shape)} int index(es), one per spatial axis of the output of "
            f"{where}, whose spatial shape is {output_shape}"
        )
    if not all(-n <= i < n for i, n in zip(index, output_shape)):
        raise ValueError(
            f"pos={pos!r} is outside the output map of {where}, whose spatial shape is {output_shape}: each index "
            f"must be in 0..n-1 (negative indices count from the end)"
        )
    return tuple(i % n for i, n in zip(index, output_shape))


class _Graph:
    """One forward pass of a prepared copy, kept to backpropagate from many cotangents."""

    def __init__(
        self,
        model: nn.Module,
        input_shape: tuple[int, ...],
        layer: str | None,
        mode: str,
        *,
        dtype: torch.dtype,
        device: torch.device,
        draws: int = 1,
        seed: int = 0,
        guard: bool = False,
        captured: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        """Runs the forward pass, or takes ``captured``: the ``(inputs, output)`` of one that already ran.

        A captured output comes from a copy prepared for ``mode``; one forward pass can serve every layer of a table.
        """
        self.model, self.input_shape, self.layer, self.mode = model, input_shape, layer, mode
        self.dtype, self.device, self.guard = dtype, device, guard
        if captured is None:
            copy = prepared_copy(model, mode, dtype)
            target = _submodule(copy, layer)
            spatial = input_shape[2:]
            if mode == "theoretical":
                inputs = torch.ones((1, input_shape[1], *spatial), dtype=dtype)
            else:
                generator = torch.Generator().manual_seed(seed)
                inputs = torch.randn((draws, input_shape[1], *spatial), dtype=dtype, generator=generator)
            self.inputs = inputs.to(device).requires_grad_(True)
            self.output = _forward(copy, target, self.inputs, mode, input_shape, layer)
            if self.output.dim() < 3:
                raise ValueError(_no_spatial_axes_message(copy, self.inputs, mode, self.output, layer))
        else:
            self.inputs, self.output = captured
        if not self.output.requires_grad:
            raise ProbeError(f"the output of {_where(layer)} does not depend on the input: nothing to backpropagate")
        self.output_shape = tuple(self.output.shape[2:])
        if mode == "theoretical":
            self.channel_weights = torch.ones(self.output.shape[:2], dtype=dtype, device=device)
        else:
            # Random positive weights per (draw, channel): signed gradients of different output channels cannot
            # cancel except on a set of measure zero, and one pass serves every channel.
            generator = torch.Generator().manual_seed(seed + 1)
            weights = 0.5 + torch.rand(self.output.shape[:2], dtype=dtype, generator=generator)
            self.channel_weights = weights.to(device)
        self.passes = 0

    @property
    def spatial_input_shape(self) -> tuple[int, ...]:
        return self.input_shape[2:]

    def gradient_map(self, positions: Sequence[Position]) -> torch.Tensor:
        """One backward pass from all ``positions`` at once.

        Returns |d output / d input| summed over the batch and channels, on the CPU, shaped like the input's spatial
        axes.
        """
        cotangent = torch.zeros_like(self.output)
        index = tuple(torch.tensor(axis, device=self.device) for axis in zip(*positions))
        cotangent[(slice(None), slice(None), *index)] = self.channel_weights[:, :, None]
        (gradient,) = torch.autograd.grad(self.output, self.inputs, cotangent, retain_graph=True)
        self.passes += 1
        magnitude = gradient.abs().sum(dim=(0, 1)).to("cpu", torch.float64)
        if self.guard and gradient.dtype == torch.float32:
            positive = gradient.abs()[gradient != 0]
            if positive.numel() and float(positive.min()) < _UNDERFLOW_GUARD:
                raise _Underflow
        if not torch.isfinite(magnitude).all():
            raise ProbeError(
                f"the gradient of {_where(self.layer)} is not finite (inf or NaN): check the model's weights and "
                f"buffers for non-finite values"
            )
        return magnitude


def _where(layer: str | None) -> str:
    return f"layer {layer!r}" if layer else "the model"


def _submodule(model: nn.Module, layer: str | None) -> nn.Module | None:
    if layer is None:
        return None
    names = [name for name, _ in model.named_modules() if name]
    if not isinstance(layer, str) or layer not in names:
        close = difflib.get_close_matches(str(layer), names, n=5, cutoff=0.3) or names[-5:]
        raise ValueError(f"layer={layer!r} is not a submodule of the model; nearest names: {close}")
    return model.get_submodule(layer)


def _forward(copy: nn.Module, target, inputs, mode: str, input_shape, layer) -> torch.Tensor:
    captured: list[torch.Tensor] = []

    def capture(_module, _args, output):
        captured.append(output[0] if isinstance(output, (tuple, list)) else output)
        raise _Captured

    def batched_only(module, args):
        # A convolution also takes an unbatched input: (1, C, L) would reach a Conv2d as one (C, H, W) image.
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() != len(module.kernel_size) + 2:
            raise _Unbatched(module)

    handles = [m.register_forward_pre_hook(batched_only) for m in copy.modules() if isinstance(m, _ConvNd)]
    if target is not None:
        handles.append(target.register_forward_hook(capture))
    try:
        with probe_functions(mode):
            output = copy(inputs)
    except _Captured:
        output = captured[0]
    except _Unbatched as error:
        raise _rank_error(copy, error.module, input_shape) from None
    except Exception as error:
        raise _forward_error(copy, input_shape, error) from error
    finally:
        for handle in handles:
            handle.remove()
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise ValueError(
            f"the output of {_where(layer)} is a {type(output).__name__}, not a tensor; pass layer= naming a "
            f"submodule that returns a feature map"
        )
    return output


class _Unbatched(Exception):
    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


def _rank_error(copy: nn.Module, module: nn.Module, input_shape) -> ValueError:
    name = next((n for n, m in copy.named_modules() if m is module), "")
    takes = len(module.kernel_size)
    wanted = ("(N, C, L)", "(N, C, H, W)", "(N, C, D, H, W)")[takes - 1]
    return ValueError(
        f"input_shape={tuple(input_shape)} has {len(input_shape) - 2} spatial axes, but the convolution "
        f"{name or 'the model'} ({type(module).__name__}) receives an input without a batch axis: it takes {takes} "
        f"spatial axes; pass a shape {wanted}"
    )


def _forward_error(copy: nn.Module, input_shape, error: Exception) -> Exception:
    spatial = len(input_shape) - 2
    for name, module in copy.named_modules():
        kernel = getattr(module, "kernel_size", None)
        if isinstance(module, nn.modules.conv._ConvNd) and len(kernel) != spatial:
            wanted = ("(N, C, L)", "(N, C, H, W)", "(N, C, D, H, W)")[len(kernel) - 1]
            return ValueError(
                f"input_shape={tuple(input_shape)} has {spatial} spatial axes, but the model's first convolution "
                f"({name or 'the model'}: {type(module).__name__}) takes {len(kernel)}; pass a shape {wanted}"
            )
        if isinstance(module, nn.modules.conv._ConvNd):
            break
    return ProbeError(f"the model's forward raised on an input of shape {tuple(input_shape)}: {error}")


def _no_spatial_axes_message(copy: nn.Module, inputs, mode: str, output, layer) -> str:
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name):
        def hook(_module, _args, out):
            if isinstance(out, torch.Tensor) and out.dim() >= 3:
                shapes[name] = tuple(out.shape)

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in copy.named_modules() if n and n != layer]
    try:
        with torch.no_grad(), probe_functions(mode):
            copy(inputs)
    except Exception:  # noqa: BLE001 - the candidates are a courtesy; the error below is raised either way
        pass
    finally:
        for handle in handles:
            handle.remove()
    candidates = [f"{name} {shape}" for name, shape in list(shapes.items())[-5:]]
    return (
        f"the output of {_where(layer)} has shape {tuple(output.shape)}: no spatial axes to probe (expected "
        f"(N, C, *spatial)); pass layer= naming a feature map, e.g. one of: {candidates}"
    )


# --- reading fields off gradient maps -------------------------------------------------------------------------


def _marginal(support: torch.Tensor, axis: int) -> torch.Tensor:
    other = tuple(a for a in range(support.dim()) if a != axis)
    return support.any(dim=other) if other else support


def _hull(mask: torch.Tensor) -> Bounds | None:
    nonzero = torch.nonzero(mask).flatten()
    return None if nonzero.numel() == 0 else (int(nonzero[0]), int(nonzero[-1]))


def _largest_hole(mask: torch.Tensor) -> int:
    nonzero = torch.nonzero(mask).flatten()
    return int((nonzero.diff() - 1).max()) if nonzero.numel() > 1 else 0


def _runs(mask: torch.Tensor, min_gap: int) -> list[Bounds]:
    """Maximal runs of ``mask``, where zero gaps shorter than ``min_gap`` do not split a run."""
    nonzero = torch.nonzero(mask).flatten()
    if nonzero.numel() == 0:
        return []
    breaks = torch.nonzero(nonzero.diff() - 1 >= min_gap).flatten()
    starts = [0, *(int(b) + 1 for b in breaks)]
    ends = [*(int(b) for b in breaks), nonzero.numel() - 1]
    return [(int(nonzero[s]), int(nonzero[e])) for s, e in zip(starts, ends)]


def _box_of(support: torch.Tensor) -> Box | None:
    hulls = [_hull(_marginal(support, a)) for a in range(support.dim())]
    return None if any(h is None for h in hulls) else tuple(hulls)


def _box_slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(first, last + 1) for first, last in box)


def _lattice(anchor: Position, spacing: Sequence[int], output_shape: Sequence[int]) -> list[list[int]]:
    return [list(range(a % g, n, g)) for a, g, n in zip(anchor, spacing, output_shape)]


def _spacing_for_gap(table: list[dict[int, Bounds | None]], gaps: Sequence[int]) -> list[int]:
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


def _groups(positions: Sequence[Position], spacing: Sequence[int]) -> list[list[Position]]:
    """Buckets positions by their residues modulo the lattice spacing: each bucket's fields are pairwise apart."""
    groups: dict[Position, list[Position]] = {}
    for p in positions:
        groups.setdefault(tuple(i % g for i, g in zip(p, spacing)), []).append(p)
    return list(groups.values())


# --- the probe ------------------------------------------------------------------------------------------------


@dataclass
class _AxisTableResult:
    table: list[dict[int, Bounds | None]]
    gaps: list[int]


class _Prober:
    """Answers field questions for one model, layer and mode, with as few backward passes as it can prove exact."""

    def __init__(self, model: nn.Module, theory: _Graph, mode: str, *, draws: int, seed: int):
        self.model, self.theory, self.mode = model, theory, mode
        self.draws, self.seed = draws, seed
        self._weights: _Graph | None = None

    @property
    def measured(self) -> _Graph:
        """The graph whose gradients are the answer: the theoretical one, or the real bias-free network."""
        if self.mode == "theoretical":
            return self.theory
        if self._weights is None:
            t = self.theory
            self._weights = _Graph(
                self.model, t.input_shape, t.layer, "weights", dtype=t.dtype, device=t.device, draws=self.draws,
                seed=self.seed, guard=t.guard,
            )  # fmt: skip
        return self._weights

    def _field(self, position: Position, heatmap: torch.Tensor | None, bounds: Box, geometry) -> ReceptiveField:
        t = self.theory
        return ReceptiveField(
            position=position, bounds=bounds, input_shape=t.input_shape, output_shape=t.output_shape,
            geometry=geometry, mode=self.mode, layer=t.layer, heatmap=heatmap,
        )  # fmt: skip

    def _empty_field_error(self, position: Position) -> ProbeError:
        if self.mode == "weights":
            return ProbeError(
                f"no input position influences {_where(self.theory.layer)} at {position} with the current weights "
                f"(the gradient is zero on all {self.draws} random inputs): its units are dead (e.g. ReLUs that "
                f"never fire without biases) or the weights on every path are zero; mode='theoretical' gives the "
                f"field of the architecture"
            )
        return ProbeError(
            f"no input position influences {_where(self.theory.layer)} at {position}: its window covers only padding"
        )

    # -- one or several positions, with heatmaps

    def fields(self, positions: list[Position]) -> list[ReceptiveField]:
        """Returns the exact field and heatmap of every position, in order."""
        if len(positions) == 1:
            heatmap = self.measured.gradient_map(positions)
            bounds = _box_of(heatmap > 0)
            if bounds is None:
                raise self._empty_field_error(positions[0])
            known = {positions[0]: heatmap > 0} if self.mode == "theoretical" else {}
            geometry = self.geometry(self._conclusive_axis_table(known))
            return [self._field(positions[0], heatmap, bounds, geometry)]
        axes = self._axis_table(full=True)
        heatmaps = self._grouped_heatmaps(positions, axes)
        geometry = self.geometry(axes)
        result = []
        for position in positions:
            bounds = _box_of(heatmaps[position] > 0)
            if bounds is None:
                raise self._empty_field_error(position)
            result.append(self._field(position, heatmaps[position], bounds, geometry))
        return result

    def _grouped_heatmaps(self, positions: list[Position], axes: _AxisTableResult | None) -> dict:
        """Heatmaps of many positions, in as few passes as their disjoint fields allow.

        Positions whose theoretical boxes are disjoint share one backward pass and each reads its own box.
        Gradients are linear in the cotangent and no path joins two disjoint fields, so each box holds exactly what
        a pass of its own would give. Falls back to one pass per position.
        """
        unique = list(dict.fromkeys(positions))
        graph = self.measured
        if axes is None:
            return {p: graph.gradient_map([p]) for p in unique}
        gaps = axes.gaps if self.mode == "theoretical" else [1] * len(axes.gaps)
        heatmaps = {}
        for members in _groups(unique, _spacing_for_gap(axes.table, gaps)):
            gradient = graph.gradient_map(members) if len(members) > 1 else None
            for p in members:
                box = tuple(axes.table[a][i] for a, i in enumerate(p))
                if gradient is None or any(b is None for b in box):
                    heatmaps[p] = graph.gradient_map([p])
                    continue
                own = torch.zeros_like(gradient)
                own[_box_slices(box)] = gradient[_box_slices(box)]
                heatmaps[p] = own
            if gradient is not None and not _inside_boxes(gradient > 0, [self._box(axes, p) for p in members]):
                heatmaps.update({p: graph.gradient_map([p]) for p in members})
        return heatmaps

    @staticmethod
    def _box(axes: _AxisTableResult, position: Position) -> Box | None:
        box = tuple(axes.table[a][i] for a, i in enumerate(position))
        return None if any(b is None for b in box) else box

    # -- every position, bounds only

    def field_map(self) -> ReceptiveFieldMap:
        """Returns the bounds of every output position."""
        t = self.theory
        axes = self._axis_table(full=True)
        shape = (*t.output_shape, len(t.output_shape))
        first = torch.zeros(shape, dtype=torch.int64)
        last = torch.full(shape, -1, dtype=torch.int64)
        positions = list(itertools.product(*(range(n) for n in t.output_shape)))
        if axes is not None and self.mode == "theoretical":
            for p in positions:
                box = self._box(axes, p)
                if box is not None:
                    first[p] = torch.tensor([b[0] for b in box])
                    last[p] = torch.tensor([b[1] for b in box])
        else:
            for p, heatmap in self._map_heatmaps(positions, axes):
                box = _box_of(heatmap > 0)
                if box is not None:
                    first[p] = torch.tensor([b[0] for b in box])
                    last[p] = torch.tensor([b[1] for b in box])
        return ReceptiveFieldMap(
            first=first, last=last, input_shape=t.input_shape, output_shape=t.output_shape,
            geometry=self.geometry(axes), mode=self.mode, layer=t.layer,
        )  # fmt: skip

    def _map_heatmaps(self, positions: list[Position], axes: _AxisTableResult | None):
        """Yields (position, heatmap) for every position, grouping passes by disjoint theoretical boxes."""
        graph = self.measured
        if axes is None:
            for p in positions:
                yield p, graph.gradient_map([p])
            return
        spacing = _spacing_for_gap(axes.table, [1] * len(axes.gaps))
        for residue in itertools.product(*(range(g) for g in spacing)):
            members = list(itertools.product(*_lattice(residue, spacing, graph.output_shape)))
            if not members:
                continue
            gradient = graph.gradient_map(members)
            boxes = [self._box(axes, p) for p in members]
            if not _inside_boxes(gradient > 0, boxes):
                for p in members:
                    yield p, graph.gradient_map([p])
                continue
            for p, box in zip(members, boxes):
                own = torch.zeros_like(gradient)
                if box is not None:
                    own[_box_slices(box)] = gradient[_box_slices(box)]
                yield p, own

    # -- the theoretical per-axis table

    def _axis_table(self, *, full: bool, known: dict[Position, torch.Tensor] | None = None) -> _AxisTableResult | None:
        """Measures the theoretical bounds along each axis, as a function of the index along that axis alone.

        A pilot pass from the centre position (the least clipped) gives the field's size and the largest hole
        inside it (dilation). Then each pass backpropagates from a whole lattice of positions spaced so that their
        fields should not touch, and reads every lattice index's bounds from the runs of the support projected on
        each axis. A pass whose runs do not match its indices, or whose positions do not fill their boxes exactly,
        is retried with twice the spacing. ``full`` measures every index (else one lattice through the centre,
        enough for the geometry); ``known`` holds exact single-position supports already computed, which join the
        table. The full table is checked against exact single-position passes at the corners, the centre and two
        random positions; on any disagreement (a field that is not a box) this returns None and callers fall
        back to one pass per position.
        """
        graph = self.theory
        shape = graph.output_shape
        known = dict(known or {})
        anchor = tuple(n // 2 for n in shape)
        if anchor not in known:
            known[anchor] = graph.gradient_map([anchor]) > 0
        pilot = known[anchor]
        table: list[dict[int, Bounds | None]] = [{} for _ in shape]
        for position, support in known.items():
            if support.any():  # an empty field does not tell which axis emptied it
                for axis in range(len(shape)):
                    table[axis][position[axis]] = _hull(_marginal(support, axis))
        gaps, spacing = [], []
        for axis, n in enumerate(shape):
            mask = _marginal(pilot, axis)
            hull = _hull(mask)
            gaps.append(_largest_hole(mask) + 1)
            size = 1 if hull is None else hull[1] - hull[0] + 1
            stride = max(1, graph.spatial_input_shape[axis] // n)
            spacing.append(min(n, max(1, math.ceil((size + gaps[-1]) / stride))))
        todo = [set(range(n)) if full else {anchor[a]} for a, n in enumerate(shape)]
        lattice_done = False
        while any(todo[a] - table[a].keys() for a in range(len(shape))) or not lattice_done:
            start = tuple(min(todo[a] - table[a].keys(), default=anchor[a]) for a in range(len(shape)))
            indices = _lattice(start, spacing, shape)
            decoded = self._decode_lattice(graph, indices, gaps)
            if decoded is None:
                if all(g >= n for g, n in zip(spacing, shape)):
                    return None
                spacing = [min(n, 2 * g) for g, n in zip(spacing, shape)]
                continue
            for axis, bounds in enumerate(decoded):
                for index, b in bounds.items():
                    if table[axis].setdefault(index, b) != b:
                        return None
            lattice_done = True
        result = _AxisTableResult(table=table, gaps=gaps)
        if full and not self._agrees_with_exact_passes(result):
            return None
        return result

    def _conclusive_axis_table(self, known: dict[Position, torch.Tensor] | None = None) -> _AxisTableResult | None:
        """The table of one lattice through the centre, or of every index if that cannot decide the geometry."""
        axes = self._axis_table(full=False, known=known)
        lengths = self.theory.spatial_input_shape
        if axes is None or not all(_conclusive(axes, a, n) for a, n in enumerate(lengths)):
            axes = self._axis_table(full=True, known=known) or axes
        return axes

    @staticmethod
    def _decode_lattice(graph: _Graph, indices: list[list[int]], gaps: list[int]) -> list[dict] | None:
        members = list(itertools.product(*indices))
        support = graph.gradient_map(members) > 0
        if not support.any():
            return None
        decoded = []
        for axis, axis_indices in enumerate(indices):
            mask = _marginal(support, axis)
            if len(axis_indices) == 1:
                decoded.append({axis_indices[0]: _hull(mask)})
                continue
            runs = _runs(mask, gaps[axis])
            if len(runs) != len(axis_indices):
                return None
            decoded.append(dict(zip(axis_indices, runs)))
        for p in members:
            box = tuple(decoded[a][i] for a, i in enumerate(p))
            if any(b is None for b in box):
                return None
            if _box_of(support[_box_slices(box)]) != tuple((0, last - first) for first, last in box):
                return None
        return decoded

    def _agrees_with_exact_passes(self, axes: _AxisTableResult) -> bool:
        """Checks predicted boxes against exact single-position passes.

        The positions are the corners, the centre and two positions drawn from a private generator. Each gets a
        pass of its own: a shared pass could be fooled the way a lattice pass can, by fields whose holes
        (dilation) interleave.
        """
        shape = self.theory.output_shape
        samples = set(itertools.product(*({0, n - 1} for n in shape)))
        samples.add(tuple(n // 2 for n in shape))
        generator = torch.Generator().manual_seed(len(shape) * 7919 + sum(shape))
        for _ in range(2):
            samples.add(tuple(int(torch.randint(n, (1,), generator=generator)) for n in shape))
        return all(_box_of(self.theory.gradient_map([p]) > 0) == self._box(axes, p) for p in sorted(samples))

    # -- geometry

    def geometry(self, axes: _AxisTableResult | None) -> tuple[AxisGeometry | None, ...]:
        """Fits the per-axis geometry (r, S, P) to the measured bounds.

        It is read on a larger input where too few fields on the user's input are certainly unclipped; a geometry
        read there must still match every field measured on the user's input. An axis whose unclipped fields fit no
        single geometry (an upsampling path) has none.
        """
        t = self.theory
        if len(t.output_shape) != len(t.spatial_input_shape) or axes is None:
            return (None,) * len(t.spatial_input_shape)
        lengths = t.spatial_input_shape
        geometry = [_fit_axis(axes.table[a], lengths[a], axes.gaps[a]) for a in range(len(lengths))]
        undecided = {a for a, g in enumerate(geometry) if g is None and not _conclusive(axes, a, lengths[a])}
        for growth in _GEOMETRY_GROWTH:
            if not undecided:
                break
            larger = [*t.input_shape]
            for a in undecided:
                larger[2 + a] *= growth
            if math.prod(larger[1:]) > _MAX_GEOMETRY_ELEMENTS:
                break
            larger_axes = self._axis_table_on(tuple(larger))
            if larger_axes is None:
                break
            for a in list(undecided):
                found = _fit_axis(larger_axes.table[a], larger[2 + a], larger_axes.gaps[a])
                if found is not None and _consistent(found, axes.table[a], lengths[a]):
                    geometry[a] = found
                if found is not None or _conclusive(larger_axes, a, larger[2 + a]):
                    undecided.discard(a)
        return tuple(geometry)

    def _axis_table_on(self, input_shape: tuple[int, ...]) -> _AxisTableResult | None:
        t = self.theory
        try:
            graph = _Graph(
                self.model, input_shape, t.layer, "theoretical", dtype=t.dtype, device=t.device, guard=t.guard
            )
        except (ValueError, ProbeError):
            return None
        if len(graph.output_shape) != len(input_shape) - 2:
            return None
        return _Prober(self.model, graph, "theoretical", draws=1, seed=0)._conclusive_axis_table()


def _conclusive(axes: _AxisTableResult, axis: int, length: int) -> bool:
    """Whether the table holds enough certainly unclipped fields along ``axis`` to decide its geometry."""
    return len(_whole_fields(axes.table[axis], length, axes.gaps[axis])) >= _MIN_WHOLE_FIELDS


def _inside_boxes(support: torch.Tensor, boxes: list[Box | None]) -> bool:
    covered = torch.zeros_like(support)
    for box in boxes:
        if box is not None:
            covered[_box_slices(box)] = True
    return not bool((support & ~covered).any())


def _whole_fields(axis_table: dict[int, Bounds | None], length: int, gap: int) -> list[tuple[int, Bounds]]:
    """Fields that are certainly unclipped.

    A field with holes of up to ``gap - 1`` inputs (dilation) whose span
    starts left of the input can start up to that far inside it, so only fields at least ``gap`` from both ends
    count.
    """
    return sorted((i, b) for i, b in axis_table.items() if b is not None and b[0] >= gap and b[1] <= length - 1 - gap)


def _fit_axis(axis_table: dict[int, Bounds | None], length: int, gap: int) -> AxisGeometry | None:
    """The (r, S, P) with ``clip([x*S - P, x*S - P + r - 1])`` equal to every measured field, if there is one.

    It is read off at least three fields of the largest size among the certainly unclipped ones (a field can
    still lose trailing inputs that no strided window reaches, which only makes it smaller) and checked against
    every field.
    """
    whole = _whole_fields(axis_table, length, gap)
    size = max((last - first + 1 for _, (first, last) in whole), default=0)
    whole = [(i, (first, last)) for i, (first, last) in whole if last - first + 1 == size]
    if len(whole) < _MIN_WHOLE_FIELDS:
        return None
    stride = _common_slope([(i, first) for i, (first, _) in whole])
    if stride is None:
        return None
    index, (first, _) = whole[0]
    geometry = AxisGeometry(size=size, stride=stride, offset=index * stride - first)
    return geometry if _consistent(geometry, axis_table, length) else None


def _common_slope(points: list[tuple[int, int]]) -> int | None:
    if len(points) < 2:
        return None
    (i0, v0), (i1, v1) = points[0], points[-1]
    slope, remainder = divmod(v1 - v0, i1 - i0)
    if remainder or slope < 1 or any(v != v0 + (i - i0) * slope for i, v in points):
        return None
    return slope


def _consistent(geometry: AxisGeometry, axis_table: dict[int, Bounds | None], length: int) -> bool:
    """Whether every measured field matches the geometry.

    Exactly where the span is inside the input, and inside the clipped span where it is not (a strided layer can
    drop trailing inputs that no window reaches).
    """
    for index, bounds in axis_table.items():
        first, last = geometry.span(index)
        if bounds is None:
            if first <= length - 1 and last >= 0 and first >= 0 and last <= length - 1:
                return False
            continue
        if (first >= 0 and bounds[0] != first) or (first < 0 and bounds[0] < 0):
            return False
        if (last <= length - 1 and bounds[1] != last) or (last > length - 1 and bounds[1] > length - 1):
            return False
        if bounds[0] < max(first, 0) or bounds[1] > min(last, length - 1):
            return False
    return True


# --- the seed's verification ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RFVerification:
    """What :func:`verify_rf` found; true when the field passed.

    Attributes:
        passed: the output depends on the input, nothing outside the bounds influences it, and every face of the
            bounds does (so the bounds are exact, not merely large enough).
        reaches_output: with an input of ones, the probed output is non-zero.
        outside_influence: with everything inside the bounds zeroed, the probed output is still non-zero.
        faces: per axis, whether the first and the last slice of the bounds each influence the output.
    """

    passed: bool
    reaches_output: bool
    outside_influence: bool
    faces: tuple[tuple[bool, bool], ...]

    def __bool__(self) -> bool:
        return self.passed


def verify_rf(model: nn.Module, field: ReceptiveField, *, dtype: torch.dtype = torch.float64) -> RFVerification:
    """Checks a theoretical field by forward passes alone, as the seed project's demo does.

    It runs on the linearised, bias-free copy the theoretical probe uses (all weights positive, so no contributions
    can cancel).

    An input of ones with the bounds zeroed must give exactly zero at the probed position (nothing outside can
    change it), and an input that is one only on one face of the bounds must give a non-zero value, for every
    face (each edge of the bounds is reached). All inputs go through the network in one batched forward pass.

    Args:
        model: the network the field was measured on.
        field: a field from :func:`probe_rf` (or an entry of a :class:`ReceptiveFieldMap`), theoretical mode.
        dtype: floating type of the copy.

    Returns:
        An :class:`RFVerification`, truthy when the field passed.

    Raises:
        ValueError: ``field`` is not a theoretical field.
    """
    if not isinstance(field, ReceptiveField) or field.mode != "theoretical":
        raise ValueError(
            f"field={field!r} cannot be verified: verify_rf checks theoretical fields (probe_rf(..., "
            f"mode='theoretical')); a weights-mode field depends on random draws"
        )
    device = model_device(model)
    with preserved_random_state(device), torch.inference_mode(False), torch.no_grad():
        copy = prepared_copy(model, "theoretical", dtype)
        n, channels, *spatial = field.input_shape
        box = (slice(None), *_box_slices(field.bounds))
        inputs = [torch.ones((channels, *spatial), dtype=dtype)]
        outside = inputs[0].clone()
        outside[box] = 0
        inputs.append(outside)
        for axis, (first, last) in enumerate(field.bounds):
            for edge in (first, last):
                face = torch.zeros_like(outside)
                face_box = list(box)
                face_box[1 + axis] = slice(edge, edge + 1)
                face[tuple(face_box)] = 1
                inputs.append(face)
        batch = torch.stack(inputs).to(device)
        output = _forward(copy, _submodule(copy, field.layer), batch, "theoretical", field.input_shape, field.layer)
        values = output[(slice(None), slice(None), *field.position)].abs().sum(dim=1).cpu()
    faces = tuple((bool(values[2 + 2 * a] > 0), bool(values[3 + 2 * a] > 0)) for a in range(len(field.bounds)))
    reaches, leaks = bool(values[0] > 0), bool(values[1] != 0)
    return RFVerification(
        passed=reaches and not leaks and all(all(f) for f in faces),
        reaches_output=reaches,
        outside_influence=leaks,
        faces=faces,
    )


# --- the effective field on real inputs -----------------------------------------------------------------------


def effective_rf(
    model: nn.Module,
    inputs: torch.Tensor,
    pos: str | int | Sequence[int] = "center",
    *,
    layer: str | None = None,
    biases: str = "trained",
    chunk_size: int = 32,
    dtype: torch.dtype = torch.float32,
) -> EffectiveField:
    """Measures the effective receptive field of one output position on real inputs (Luo et al., 2016).

    The map is the magnitude of the gradient of the chosen output position (all channels) with respect to each
    input, summed over input channels and averaged over the inputs, on a deep copy in eval mode. Biases stay as
    trained by default: with ReLUs, a bias decides which units are active, so the zero-bias network of
    :func:`probe_rf` would measure a different function. One backward pass serves each chunk of inputs.

    Args:
        model: the network (not modified).
        inputs: real inputs ``(N, C, *spatial)``.
        pos: the output position: an index tuple (an int for 1D) or ``"center"``.
        layer: dotted name of the submodule whose output is probed.
        biases: ``"trained"`` (default) or ``"zero"`` (as the theoretical and weights-mode probes).
        chunk_size: inputs per backward pass.
        dtype: floating type the copy runs in.

    Returns:
        An :class:`EffectiveField` with the averaged map, its metrics and the theoretical field for reference.

    Raises:
        ValueError: an argument is wrong, or the map is degenerate (all zero or not finite).
        ProbeError: the forward raised or the output does not depend on the input.
    """
    if biases not in ("trained", "zero"):
        raise ValueError(f"biases={biases!r} must be 'trained' or 'zero'")
    if not isinstance(inputs, torch.Tensor) or not 3 <= inputs.dim() <= 5 or inputs.shape[0] < 1:
        raise ValueError(f"inputs must be a tensor (N, C, *spatial) with 1 to 3 spatial axes, got {_shape_of(inputs)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int")
    shape = (1, *inputs.shape[1:])
    theoretical = probe_rf(model, shape, pos, layer=layer)
    device = model_device(model)
    with preserved_random_state(device), torch.inference_mode(False), torch.enable_grad(), _exact_kernels(device):
        copy = prepared_copy(model, "weights", dtype, zero_biases=biases == "zero")
        target = _submodule(copy, layer)
        total = torch.zeros(inputs.shape[2:], dtype=torch.float64)
        for chunk in inputs.detach().split(chunk_size):
            x = chunk.clone().to(device=device, dtype=dtype).requires_grad_(True)
            output = _forward(copy, target, x, "weights", shape, layer)
            cotangent = torch.zeros_like(output)
            cotangent[(slice(None), slice(None), *theoretical.position)] = 1
            (gradient,) = torch.autograd.grad(output, x, cotangent)
            total += gradient.abs().sum(dim=1).sum(dim=0).to("cpu", torch.float64)
    heatmap = checked_map(total / inputs.shape[0])
    return EffectiveField(
        position=theoretical.position, heatmap=heatmap, theoretical=theoretical, samples=int(inputs.shape[0]),
        biases=biases, layer=layer,
    )  # fmt: skip


def _shape_of(value) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__
