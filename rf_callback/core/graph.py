"""One forward pass of the probe's copy, kept to backpropagate from many cotangents, and the errors of running it."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import functools
import itertools
import math
import re
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from rf_callback.core.arguments import checked_layout
from rf_callback.core.geometry_flow import Flow
from rf_callback.core.layouts import CHANNELS_FIRST, CHANNELS_LAST, Tokens, axis_letters
from rf_callback.core.model_copy import (
    DROPPED_HOOKS,
    GRADIENT_OFF,
    WALK_LIMIT,
    ProbeError,
    autograd_nodes,
    checkpoints_run_through,
    global_hooks_suspended,
    integer_quantized,
    picks_on_path,
    pooled_length,
    prepared_copy,
    probe_functions,
)
from rf_callback.core.request import ProbeRequest
from rf_callback.core.support import Position, hull, marginal

if TYPE_CHECKING:  # geometry_probe imports this module
    from rf_callback.core.geometry_probe import Budget


class Underflow(Exception):
    """A float32 gradient came close to underflow, or overflowed, so that the probe is redone in float64."""


class EveryValueFlushed(Underflow):
    """A float32 map of zeros alone, where the forward may have flushed every value (or its units are dead)."""


def underflow_guard(dtype: torch.dtype) -> float:
    """A gradient magnitude below which neighbours of a non-zero value may have underflowed to zero in ``dtype``.

    The smallest normal number over the machine epsilon (1e-31 in float32 and bfloat16, 1e-292 in float64): a value
    decaying smoothly into that range has neighbours below the smallest subnormal. In float16, whose whole range a
    shallow network's gradient can span (0.06 by that rule), the smallest normal number itself: a gradient in the
    subnormal range (below 6e-5).
    """
    info = torch.finfo(dtype)
    return info.tiny if dtype == torch.float16 else info.tiny / info.eps


class _Captured(Exception):
    """Stops the forward pass once the probed layer has produced its output."""


class _CalledAgain(Exception):
    """The probed layer runs a second time in the forward pass: its output names no single field."""


# Per theoretical or measured copy, the layers whose forward was run to its end and that ran once.
_runs_once: weakref.WeakKeyDictionary[nn.Module, set[str | None]] = weakref.WeakKeyDictionary()


def called_again_message(layer: str | None) -> str:
    """Why a layer that runs more than once names no field, and what to name instead.

    Args:
        layer: the layer's dotted name.

    Returns:
        The message.
    """
    parent = layer.rpartition(".")[0] if layer else ""
    enclosing = f" or the module that encloses its calls (e.g. layer={parent!r}, after its last call)" if parent else ""
    return (
        f"layer={layer!r} runs more than once in the model's forward (one module applied at several places, e.g. a "
        f"ReLU shared by a block's convolutions): each call has a field of its own, and its name does not say which; "
        f"name a module that runs once: the layer that the call you mean follows (an activation keeps its field)"
        f"{enclosing}"
    )


def _detached(output):
    """A copy of a layer's output (tensors detached and cloned, in the same containers) for the rest of the forward."""
    if isinstance(output, torch.Tensor):
        return output.detach().clone()
    if isinstance(output, (tuple, list)):
        items = [_detached(item) for item in output]
        return type(output)(*items) if hasattr(output, "_fields") else type(output)(items)
    if isinstance(output, dict):
        # The same mapping type: the rest of the forward may read it by attribute (an OrderedDict subclass such as
        # transformers' ModelOutput), and a forward that raised would hide a second call of the layer.
        try:
            detached = copy.copy(output)
        except Exception:  # noqa: BLE001 - a mapping that does not copy: its items, in a plain dict
            detached = {}
        for key, value in output.items():
            detached[key] = _detached(value)
        return detached
    return output


@contextlib.contextmanager
def exact_kernels(device: torch.device, *, exact_zeros: bool = True):
    """Runs the probe with autocast off, full float32 matmul precision, no global hooks, no Winograd or FFT kernels.

    Their rounding noise would turn exact zeros of the gradient into tiny non-zero values and widen the field; a
    global hook would see (and could change) the probe's copy. ``exact_zeros=False`` keeps cuDNN (several times
    faster on a batch): for a gradient's mass (the effective field), not its support.
    """
    # Mixed precision (a Trainer's bf16-mixed or 16-mixed) must not recast the probe's copy.
    with (
        torch.autocast("cpu", enabled=False),
        global_hooks_suspended(),
        checkpoints_run_through(),
        contextlib.ExitStack() as stack,
    ):
        if exact_zeros:
            # A run's `set_float32_matmul_precision("high")` (TF32 on CUDA, bf16 passes on some CPUs) rounds the
            # linear layers' maps to 10 bits: the lattice's coded check would fail and fall back to slow passes.
            _full_matmul_precision(stack)
        if device.type == "cuda":
            stack.enter_context(torch.autocast("cuda", enabled=False))
            cudnn = torch.backends.cudnn
            # TF32 would round the map to 10 bits: a run's settings must not change what the probe measures.
            settings = dict(benchmark=cudnn.benchmark, deterministic=cudnn.deterministic, allow_tf32=False)
            stack.enter_context(cudnn.flags(enabled=not exact_zeros, **settings))
        yield


def _full_matmul_precision(stack: contextlib.ExitStack) -> None:
    """Full float32 matmul precision until ``stack`` closes, set and restored through the API the run uses.

    torch's per-backend settings (``torch.backends.cuda.matmul.fp32_precision = "tf32"``) make the legacy getter
    raise once they differ: every probe failed.
    """
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # the per-backend API is in use
        for backend in (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul):  # type: ignore[attr-defined]
            stack.callback(setattr, backend, "fp32_precision", backend.fp32_precision)
            backend.fp32_precision = "ieee"
        return
    stack.callback(torch.set_float32_matmul_precision, legacy)
    torch.set_float32_matmul_precision("highest")


def where(layer: str | None) -> str:
    """Names the probed output in messages."""
    return f"layer {layer!r}" if layer else "the model"


def submodule(model: nn.Module, layer: str | None) -> nn.Module | None:
    """Returns the submodule named ``layer`` (``None`` for the model's output).

    Raises:
        ValueError: ``layer`` names no submodule (the message lists the nearest names).
    """
    if layer is None:
        return None
    # A module registered under two names (self.alias = self.conv) answers to both.
    names = [name for name, _ in model.named_modules(remove_duplicate=False) if name]
    if isinstance(layer, str) and layer in names:
        return model.get_submodule(layer)
    # FSDP1 wraps modules in place (`features.1` holds `features.1._fsdp_wrapped_module`): the names of the user's
    # code name them too, the wrapper first, as Lightning's state dicts do.
    plain: dict[str, str] = {}
    for name in names:
        plain.setdefault(".".join(part for part in name.split(".") if part != "_fsdp_wrapped_module"), name)
    plain.pop("", None)
    if isinstance(layer, str) and layer in plain:
        return model.get_submodule(plain[layer])
    known = list(plain) if len(plain) < len(names) else names
    close = difflib.get_close_matches(str(layer), known, n=5, cutoff=0.3) or known[-5:]
    raise ValueError(f"layer={layer!r} is not a submodule of the model; nearest names: {close}")


class GraphShapes:
    """The shapes every graph-like object of the probe answers with: ``input_shape`` and ``output_shape`` set."""

    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]

    @property
    def spatial_input_shape(self) -> tuple[int, ...]:
        """The input's spatial shape."""
        return self.input_shape[2:]

    @property
    def center(self) -> Position:
        """The output position ``n // 2`` on every axis."""
        return tuple(n // 2 for n in self.output_shape)


class ProbeGraph(GraphShapes):
    """One forward pass of a prepared copy, kept to backpropagate from many cotangents.

    Attributes:
        input_shape: the full input shape ``(N, C, *spatial)`` the pass ran on.
        output_shape: the spatial shape of the probed output.
        passes: how many backward passes it has run.
    """

    def __init__(
        self,
        model: nn.Module,
        request: ProbeRequest,
        *,
        captured: tuple[torch.Tensor, torch.Tensor] | None = None,
        copy: nn.Module | None = None,
        check_layout: bool = False,
        carry_flow: bool = True,
    ):
        """Runs the forward pass that ``request`` asks for, or takes ``captured``: the ``(inputs, output)`` of one.

        A captured output comes from a copy prepared for the request's mode, already channels first (see
        :func:`as_channels_first`); one forward pass can serve every layer of a table. ``copy`` is a copy already
        prepared for the mode (by :func:`prepared_copy`), to share between graphs. ``check_layout``: on the user's
        input, refuse (or warn of) a channels-first reading that the output's shape contradicts (see
        :func:`check_channels_first`). ``carry_flow``: a theoretical forward carries the geometry along
        (:mod:`~rf_callback.core.geometry_flow`), which only a graph on the user's input needs.
        """
        self.model, self.request, self.copy = model, request, copy
        self.input_shape, self.layer, self.mode = request.input_shape, request.layer, request.mode
        self.dtype, self.device, self.guard = request.dtype, request.device, request.guard
        self.fixed_size: list = []  # calls with a fixed output size on the way, and their dims (see probe_functions)
        self.couplings: list = []  # reductions and softmaxes on the way (see probe_functions)
        self.border_modes: list[str] = []  # paddings that read the input past its border (see probe_functions)
        self.position_picks: list[str] = []  # selections by a fixed condition that picks by position (the same)
        self.comparison: str | None = None  # the comparison whose mask, used as values, the output was made of
        self.budget: Budget | None = None  # what measuring the geometry may still spend (see geometry_probe.Budget)
        # Builds this graph's float64 twin, where a float32 pass near underflow may be redone in it alone (the
        # geometry's graphs on other inputs): the passes already read in float32 were exact and stay.
        self.wider: Callable[[], ProbeGraph | None] | None = None
        self._wide: ProbeGraph | None = None
        self.work = 0  # elements the forward's calls returned: its cost (see probe_functions)
        self.float16_inside = False  # a call on the way returned float16 (see probe_functions)
        self.trace: list[tuple] = []  # the calls on input-dependent tensors (see probe_functions)
        self._supports: dict[tuple, torch.Tensor] = {}
        # The geometry carried along the theoretical forward to the output (see geometry_flow), a candidate only.
        self.flow: Flow | None = None
        if captured is None:
            if copy is None:
                copy = self.copy = prepared_copy(model, request.mode, request.dtype, device=request.device)
            self.inputs = probe_inputs(request)
            functions = probe_functions(
                request.mode, flow=carry_flow and request.mode == "theoretical", whole_windows=True
            )
            if functions.flow is not None:
                functions.flow.start(self.inputs)
            self.output = forward_to(copy, self.inputs, request, functions)
            self.flow = None if functions.flow is None else functions.flow.of(self.output)
            self.fixed_size, self.couplings = functions.fixed_size, functions.couplings
            self.work, self.float16_inside = functions.work, functions.float16_inside
            self.border_modes, self.trace = functions.border_modes, functions.trace
            self.position_picks = picks_on_path(functions.position_picks, self.output)
            self.comparison = functions.comparison_behind(self.output)
            walk = functions.read_without_grad
            if self.output.dim() < 3:
                raise ValueError(_no_spatial_axes_message(copy, self.inputs, request.mode, self.output, request.layer))
            if check_layout and request.parsed_layout == CHANNELS_FIRST:
                laid_out = functions.output_channels_first
                check_channels_first(
                    copy, self.output, functions.last_axis_sizes, request, laid_out, moved=functions.moved_channels
                )
            elif check_layout and functions.output_channels_first:
                raise ValueError(_channels_first_read_otherwise(self.output, request))
            elif check_layout and functions.output_channels_first is None:
                check_channels_last(copy, self.output, request)
        else:
            self.inputs, self.output = captured
            walk = True
        if not self.output.requires_grad:
            raise ProbeError(without_gradient(where(self.layer), self.comparison))
        self.output_shape = tuple(self.output.shape[2:])
        dtype, device = self.dtype, self.device
        # Custom autograd Functions whose hand-written elementwise backward gave no gradient where their output's was
        # not zero, on the theoretical copy's values (see _watch_custom_functions).
        self._blocked: list[str] = []
        # And those whose backward gave an input no gradient at all where an output had one (a stop-gradient).
        self._stopped: list[str] = []
        # Custom Functions' forwards read the input with gradients off: without such a read, a walk of the nearest
        # nodes is enough (see autograd_nodes: a whole walk of a deep graph overflows the C stack when it is freed).
        limit = None if walk else WALK_LIMIT
        _watch_custom_functions(self.output, self._blocked, self._stopped, theoretical=self.mode == "theoretical",
                                limit=limit)  # fmt: skip
        if self.mode == "theoretical":
            self.channel_weights = torch.ones(self.output.shape[:2], dtype=dtype, device=device)
        else:
            # Random positive weights per (draw, channel): signed gradients of different output channels cannot
            # cancel except on a set of measure zero, and one pass serves every channel.
            generator = torch.Generator().manual_seed(request.seed + 1 if request.seed + 1 < 2**64 else 0)  # its range
            weights = 0.5 + torch.rand(self.output.shape[:2], dtype=dtype, generator=generator)
            self.channel_weights = weights.to(device)
        self.passes = 0
        self._any_gradient = False  # whether a pass gave some gradient (see gradient_map's float64 redo of zeros)
        if check_layout and isinstance(request.parsed_layout, Tokens):
            self._check_grid_order(request.parsed_layout)

    def _check_grid_order(self, tokens: Tokens) -> None:
        """Refuses a token grid that is not the model's (written W x H, or another factoring of as many tokens).

        On the model's grid, the tokens one step and all the way along an axis read the input elsewhere along that
        axis only: along every other axis, where the first token reads. Where the given grid breaks that and
        another grid of as many tokens that divides the input keeps it (the given lengths in another order; another
        factoring only where the first token's field spans no axis whole and no axis holds one token, where the
        rule holds whatever the grid), every position would be read as another token's field: refused, naming
        that grid. Fields that tell nothing (global attention) leave the grid as given, and so does a grid that
        keeps the rule (a model that resizes its input), and one that cuts the input into square or cubic patches,
        which no other grid of as many tokens does (a ViT's: not checked).
        """
        grid, lengths = tokens.grid, self.spatial_input_shape
        if len(grid) < 2 or len(lengths) != len(grid):
            return
        if all(n % g == 0 for n, g in zip(lengths, grid)) and len({n // g for n, g in zip(lengths, grid)}) == 1:
            return
        read: dict[int, tuple] = {}

        def hulls(flat: int) -> tuple:
            """Per axis, where the token ``flat`` (counted after the prefix, row-major) reads the input."""
            if flat not in read:
                support = self.support([_grid_position(flat, grid)])
                read[flat] = tuple(hull(marginal(support, a)) for a in range(len(grid)))
            return read[flat]

        first = hulls(0)
        if None in first or all(h == (0, n - 1) for h, n in zip(first, lengths)):
            return
        # Along an axis the first token's field spans whole, or of one token, another grid's rule holds whatever the
        # grid (tokens mixed in their flat order, as a PEG or Conformer convolution mixes them, read a whole row):
        # only the given grid's lengths in another order (W x H) may be told from it there.
        vague = any(h == (0, n - 1) for h, n in zip(first, lengths))

        def broken(order: tuple[int, ...], must_move: bool) -> tuple[int, int] | None:
            """The first token (counted after the prefix) and axis where ``order`` breaks the rule, or None."""
            for axis, n in enumerate(order):
                for steps in dict.fromkeys((1, n - 1)) if n > 1 else ():
                    flat = steps * math.prod(order[axis + 1 :])
                    there = hulls(flat)
                    others = [b for b in range(len(order)) if b != axis and there[b] != first[b]]
                    if None in there or others or (must_move and there[axis] == first[axis]):
                        return flat, (others or [axis])[0]
            return None

        wrong = broken(grid, must_move=False)
        if wrong is None:
            return
        for order in _grids_dividing(lengths, math.prod(grid)):
            reordered = sorted(order) == sorted(grid)
            if order == grid or (not reordered and (vague or 1 in order)):
                continue
            if broken(order, must_move=True) is None:
                flat, axis = wrong
                layout = self.request.layout
                raise ValueError(
                    f"layout={layout!r} lays the tokens on a {' x '.join(map(str, grid))} grid, but its token "
                    f"{_grid_position(flat, grid)} reads the input elsewhere along axis "
                    f"{axis_letters(len(grid))[axis]} than token {_grid_position(0, grid)}: the grid is not the "
                    f"model's (written W x H, or another factoring of as many tokens), and every position would read "
                    f"another token's field; the tokens lie on a {' x '.join(map(str, order))} grid (rows first, "
                    f"H x W): pass layout={_spelled(layout, Tokens(order, tokens.prefix))}"
                )

    def gradient_map(self, positions: Sequence[Position], scale: Sequence[float] | None = None) -> torch.Tensor:
        """One backward pass from all ``positions`` at once, each weighted by its ``scale`` (default 1).

        Returns |d output / d input| summed over the batch and channels, on the CPU, shaped like the input's spatial
        axes.
        """
        if self._wide is not None:
            self.passes += 1
            return self._wide.gradient_map(positions, scale)
        if self.budget is not None:
            self.budget.charge(self.input_shape)
        cotangent = torch.zeros_like(self.output)
        index = tuple(torch.tensor(axis, device=self.device) for axis in zip(*positions))
        at: tuple[slice | torch.Tensor, ...] = (slice(None), slice(None), *index)
        weights = self.channel_weights[:, :, None]
        if scale is not None:
            weights = weights * torch.tensor(scale, dtype=weights.dtype, device=weights.device)
        cotangent[at] = weights.to(cotangent.dtype)  # an output of another dtype (autocast, a cast at the end)
        (gradient,) = torch.autograd.grad(self.output, self.inputs, cotangent, retain_graph=True)
        self.passes += 1
        if self._blocked and not self._stopped:
            raise ProbeError(
                f"the backward of the custom autograd Function {self._blocked[0]} on the path to {where(self.layer)} "
                f"gives no gradient to inputs whose output has one, on the theoretical copy's values (a "
                f"straight-through estimator past its range, a saturating function written by hand): theoretical "
                f"mode runs such a backward as written and cannot linearise it, so the field would miss paths; use "
                f"mode='weights' (what the current weights connect), or probe a layer before it with layer="
            )
        if self._stopped:
            raise ProbeError(
                f"the backward of the custom autograd Function {self._stopped[0]} on the path to {where(self.layer)} "
                f"gives no gradient at all to an input whose output has one (a stop-gradient written by hand, or a "
                f"straight-through estimator past its range on every input probed): the input still changes the "
                f"output, so the field would miss paths, as after a detach(); probe a layer before it with layer="
            )
        absolute = gradient.abs()
        magnitude = absolute.sum(dim=(0, 1)).to("cpu", torch.float64)
        any_gradient = bool(magnitude.any())  # a sum of magnitudes is zero only where each of them is
        # A float16 part of the forward flushes its gradient at float16's edge, however wide the input's dtype.
        narrowest = torch.float16 if self.float16_inside else gradient.dtype
        guard = max(underflow_guard(gradient.dtype), underflow_guard(narrowest))
        if any_gradient and bool(((absolute < guard) & (absolute > 0)).any()):
            if self.guard and gradient.dtype == torch.float32:
                return self._in_float64(positions, scale)
            raise self._underflow_error(narrowest)
        if any_gradient:
            self._any_gradient = True
        elif self.guard and gradient.dtype == torch.float32 and self.mode == "weights" and not self._any_gradient:
            # Every value flushed at once (20 layers of weights near 0.0005: 1e-47) reads as dead units; float64
            # tells, once, before any pass gave a gradient (a padding-only position of a map is no underflow).
            self._any_gradient = True
            if self.wider is None:
                raise EveryValueFlushed
            try:
                return self._in_float64(positions, scale)
            except Exception:  # noqa: BLE001 - no float64 twin runs (a float32-only forward): the zeros stand
                return magnitude
        if not torch.isfinite(magnitude).all():
            if self.guard and gradient.dtype == torch.float32:
                # float32's range overflows (the copy's constants grow through a deep residual stack)
                return self._in_float64(positions, scale)
            raise self._not_finite_error()
        return magnitude

    def _in_float64(self, positions: Sequence[Position], scale: Sequence[float] | None) -> torch.Tensor:
        """The map of :meth:`gradient_map` from this graph's float64 twin, which answers every later pass too.

        Raises:
            Underflow: no twin can be built here: the caller redoes its whole reading in float64.
        """
        if self.wider is None:
            raise Underflow
        if self.budget is not None:
            self.budget.charge(self.input_shape)  # the twin's forward
        wide = self.wider()
        if wide is None:
            raise Underflow
        wide.budget, self._wide = self.budget, wide
        return wide.gradient_map(positions, scale)

    def _underflow_error(self, dtype: torch.dtype) -> ProbeError:
        """Why a gradient that fades to the edge of ``dtype``'s range gives no field."""
        if self.float16_inside:
            fix = (
                "a part of the forward computes in float16 (torch.autocast with dtype=torch.float16, or a .half() "
                "cast), whose gradient flushes to zero there: probe with that part in float32 or bfloat16 (an "
                "autocast to torch.bfloat16, no cast to float16)"
            )
        elif dtype != torch.float64:
            fix = "pass dtype=None (float32, redone in float64 near underflow) or dtype=torch.float64"
        elif self.mode == "weights":
            fix = (
                "a long recurrence or a deep chain of small weights fades below any number format: use "
                "mode='theoretical' (the architecture's field), or probe a layer closer to the input with layer="
            )
        else:  # the copy's constants decay (an exponential decay along a long sequence, as RWKV's or S4's)
            fix = (
                "the theoretical copy's constants make it decay below any number format: use mode='weights', or "
                "probe a layer closer to the input with layer="
            )
        return ProbeError(
            f"the gradient of {where(self.layer)} fades to the edge of {str(dtype).removeprefix('torch.')}'s range "
            f"(below {underflow_guard(dtype):.1e}): its neighbours may have underflowed to zero, so the field's "
            f"edge would be set by the number format, not by the model; {fix}"
        )

    def _not_finite_error(self) -> ProbeError:
        """Why the gradient is not finite: the forward's own output, or the weights and buffers."""
        if self.mode == "weights" and not bool(torch.isfinite(self.output.detach()).all()):
            return ProbeError(
                f"the output of {where(self.layer)} is not finite (inf or NaN) on the probe's random inputs, so its "
                f"gradient is not either: a function undefined on some inputs (a power p of a negative value, as "
                f"LPPool with an odd p computes, a log or a square root of a negative one) or non-finite weights or "
                f"buffers; mode='theoretical' runs on positive values"
            )
        if self.mode == "theoretical":
            return ProbeError(
                f"the gradient of {where(self.layer)} is not finite (inf or NaN) on the theoretical copy: its "
                f"constants overflow on the way (an exponential of a running sum along a long axis, as a selective "
                f"scan's parallel form computes), a value the copy makes negative reaches a log or a square root "
                f"(log(y - 3): the copy keeps a constant's sign), or the model's buffers hold non-finite values; use "
                f"mode='weights' (the real weights' field), or probe a layer before it with layer="
            )
        return ProbeError(
            f"the gradient of {where(self.layer)} is not finite (inf or NaN): check the model's weights and "
            f"buffers for non-finite values"
        )

    def support(self, positions: Sequence[Position]) -> torch.Tensor:
        """The inputs that influence any of ``positions``: where :meth:`gradient_map` is non-zero.

        A single position's support is kept: the geometry's readings ask for the centre's more than once.
        """
        if len(positions) != 1:
            return self.gradient_map(positions) > 0
        key = tuple(positions[0])
        if key not in self._supports:
            self._supports[key] = self.gradient_map(positions) > 0
        return self._supports[key]


def _watch_custom_functions(
    output: torch.Tensor, blocked: list[str], stopped: list[str], *, theoretical: bool, limit: int | None
) -> None:
    """Hooks each custom ``autograd.Function`` on ``output``'s graph, to note a backward that cuts.

    A backward that gives an input that needs a gradient none at all (``None``, or zeros) where its outputs have one
    cuts every path through it (noted in ``stopped``): a stop-gradient written by hand, whose input still changes
    the output. On the theoretical copy's values (noted in ``blocked``), so does an elementwise backward (its
    input's gradient non-zero only where its output's is, of the same shape) that zeroes the gradient anywhere its
    output's is not zero; with the real weights, that is a unit dead on that draw (a ReLU written by hand). A
    backward that moves the gradient elsewhere (a sampling, a convolution written by hand) tells nothing this way.
    On the theoretical copy, a backward's negative gradients (a fused ``a - b`` written by hand, a gradient reversal
    layer) pass on as their magnitudes, as every other call's: they would cancel another branch's on its equal
    constants. ``limit``: the nodes walked at most (see :func:`autograd_nodes`).
    """

    def hook(grad_inputs, grad_outputs, name, needed):
        given = [out is not None and bool(out.any()) for out in grad_outputs]
        reached = [need and into is not None and bool(into.any()) for into, need in zip(grad_inputs, needed)]
        if any(given) and any(needed) and not any(reached):
            stopped.append(name)  # no gradient at all, though an output has one
        # An input paired by index and shape with an output that has a gradient, and given none: an output that
        # feeds nothing (a fused pair whose second half goes to an auxiliary head) leaves its own input none,
        # rightly. (On the theoretical copy's constants a gradient may be zero where the real one is not, as a
        # sampling's to its offsets on a constant map: there, only a one-to-one elementwise backward's tells.)
        for into, out, need, has in zip(grad_inputs, grad_outputs, needed, given):
            if not (need and has) or (theoretical and len(grad_inputs) != 1):
                continue
            if into is None or (into.shape == out.shape and not bool(into.any())):
                stopped.append(name)
        for into, out in zip(grad_inputs, grad_outputs):
            if not theoretical or into is None or out is None or into.shape != out.shape:
                continue
            reached, given = into != 0, out != 0
            if bool((given & ~reached).any()) and not bool((reached & ~given).any()):
                blocked.append(name)
        return tuple(None if into is None else into.abs() for into in grad_inputs) if theoretical else None

    for node in autograd_nodes(output, limit):
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            name = getattr(getattr(node, "_forward_cls", None), "__name__", type(node).__name__)
            needed = [next_node is not None for next_node, _ in node.next_functions]
            node.register_hook(functools.partial(hook, name=name, needed=needed))


def _channels_first_read_otherwise(
    output: torch.Tensor, request: ProbeRequest, why: str = "no call after its convolutions moved dim 1"
) -> str:
    """The refusal of a channels-last or token reading of an output whose dim 1 holds its channels (``why``)."""
    return (
        f"layout={request.layout!r} reads the output of {where(request.layer)} with its channels on the last axis, "
        f"but the forward leaves them on dim 1, channels first ({why}); the reading would put the channels on a "
        f"spatial axis and answer for the wrong cell: pass layout='channels_first' (the default)"
    )


def check_channels_last(copy: nn.Module, output: torch.Tensor, request: ProbeRequest) -> None:
    """Refuses a channels-last or token reading of ``output`` where another input shows its channels on dim 1.

    Where the forward cannot tell (weights mode carries no flow; a theoretical flow that ended before the output,
    after a permute somewhere), one forward pass without gradient on an input half as long on every axis decides:
    read as laid out, the last axis holds the channels and keeps its length, and dim 1 (a spatial axis or the
    tokens) follows the input. A last axis that follows the input beside a dim 1 that keeps its length is a
    channels-first output. A model that does not run on that input is not checked.

    Raises:
        ValueError: the output is channels first (the message says what to pass).
    """
    input_shape = request.input_shape
    other_shape = (1, input_shape[1], *(max(n // 2, 1) for n in input_shape[2:]))
    if other_shape == (1, *input_shape[1:]):
        return
    other = _output_on(copy, request.on(other_shape), raw=True)
    layout = request.parsed_layout
    if not isinstance(other, torch.Tensor) or other.dim() != (3 if isinstance(layout, Tokens) else output.dim()):
        return
    first = layout.prefix + math.prod(output.shape[2:]) if isinstance(layout, Tokens) else output.shape[2]
    raw = (first, output.shape[1])  # dim 1 and the last axis of the output as the forward returned it
    if other.shape[1] == raw[0] and other.shape[-1] != raw[1]:
        why = (
            f"on an input half as long, {other_shape}, its last axis follows the input, {raw[1]} -> "
            f"{other.shape[-1]}, and dim 1 keeps its length, {raw[0]}"
        )
        raise ValueError(_channels_first_read_otherwise(output, request, why))


def check_channels_first(
    copy: nn.Module,
    output: torch.Tensor,
    last_axis_sizes: set[int],
    request: ProbeRequest,
    laid_out: bool | None,
    *,
    moved: bool = False,
) -> None:
    """Refuses a channels-first reading of ``output`` where the forward shows it is laid out otherwise.

    A channels-last ``(N, H, W, C)`` output read channels first puts a spatial axis where the channels are and the
    channels where a spatial axis is: the probe would answer for the wrong cell. ``laid_out`` is what the theoretical
    forward saw (the geometry flow follows the spatial axes through permutes): True settles it, False refuses.
    Where it is unknown (``None``), one forward pass without gradient on another input decides: a channel axis
    keeps its length, a spatial one follows the input. The input is twice as long on every axis where the shapes
    hint at channels last (a last axis longer than the input's, or as long as the features of a linear layer or
    layer norm in the forward), else half as long (cheaper). A model that does not run on it is not checked: a
    warning says so where the shapes hint at channels last, or where the forward moved dim 1 (``moved``: a
    permute) and the axes after dim 1 follow the input by one stride while those read as the map do not.

    Raises:
        ValueError: the output is not channels first (the message says what to pass).
    """
    if laid_out:
        return
    input_shape, layer = request.input_shape, request.layer
    channels, spatial, lengths = output.shape[1], tuple(output.shape[2:]), tuple(input_shape[2:])
    shape, letters = (input_shape[0], *output.shape[1:]), axis_letters(len(lengths))  # weights mode: draws
    last = f"(N, {', '.join(letters)}, C)"
    if laid_out is False:
        raise ValueError(
            f"the output of {where(layer)} is {shape}, which layout='channels_first' reads as {channels} channels of "
            f"a {' x '.join(map(str, spatial))} map, but the forward moved its spatial axes (a permute or transpose "
            f"after the last convolution): pass layout='channels_last' if it is {last}"
        )
    longer = spatial[-1] > lengths[-1]
    features = spatial[-1] in last_axis_sizes
    other_lengths = tuple(2 * n for n in lengths) if longer or features else tuple(max(n // 2, 1) for n in lengths)
    other_shape = (1, input_shape[1], *other_lengths)
    other = _output_on(copy, request.on(other_shape))
    if other is not None and other.dim() == output.dim() and other.shape[1] != channels:
        grown = "twice" if longer or features else "half"
        raise ValueError(
            f"the output of {where(layer)} is {shape}, which layout='channels_first' reads as {channels} channels "
            f"of a {' x '.join(map(str, spatial))} map, but it is channels last {last}: on an input {grown} as long "
            f"({other_shape}) the axis read as the channels follows the input ({channels} -> {other.shape[1]}) and "
            f"the last axis keeps its length ({spatial[-1]}); pass layout='channels_last'"
        )
    # A forward that moved dim 1, on an output whose axes after dim 1 follow the input by one stride where those
    # read as the map follow it by none (per axis, down or up): channels last, though no other input ran to tell.
    follows = (
        moved
        and not all(_follows(n, m) for n, m in zip(spatial, lengths))
        and _one_stride(tuple(output.shape[1:-1]), lengths)
    )
    if not (longer or features or (follows and other is None)):
        return
    if other is not None and other.dim() == output.dim() and tuple(other.shape[2:]) != spatial:
        return  # the channels keep their length, the spatial axes follow the input: channels first
    if longer:
        why = f"its last axis ({spatial[-1]}) is longer than the input's ({lengths[-1]})"
    elif features:
        why = f"its last axis ({spatial[-1]}) is as long as the features of a linear layer or layer norm before it"
    else:
        why = (
            f"the forward moved dim 1 (a permute or transpose), and its axes after dim 1, "
            f"{' x '.join(map(str, output.shape[1:-1]))}, follow the input's {' x '.join(map(str, lengths))} by one "
            f"stride where those read as its map do not"
        )
    warnings.warn(
        f"the output of {where(layer)} is {shape}, read channels first (N, C, {', '.join(letters)}), but {why}: it "
        f"may be channels last {last} (the probe could not run the model on another input to tell); if it is, pass "
        f"layout='channels_last', or the tokens' grid as layout='tokens:HxW+P'",
        stacklevel=4,
    )


def _follows(n: int, length: int) -> bool:
    """Whether an axis of ``n`` is one of ``length`` divided or multiplied by some stride (rounded either way)."""
    return n % length == 0 or any(n in (length // stride, -(-length // stride)) for stride in range(1, length + 1))


def _one_stride(spatial: tuple[int, ...], lengths: tuple[int, ...]) -> bool:
    """Whether ``spatial`` is ``lengths`` divided by one stride on every axis (rounded either way), as a map's is."""
    return len(spatial) == len(lengths) and any(
        all(n in (m // stride, -(-m // stride)) for n, m in zip(spatial, lengths))
        for stride in range(1, max(lengths) + 1)
    )


def _output_on(copy: nn.Module, request: ProbeRequest, *, raw: bool = False) -> torch.Tensor | None:
    """The probed output on the request's input, channels first, by a forward pass without gradient; None if it fails.

    It is read channels first whatever the request's layout (the check compares a channels-first reading), or as
    the forward returns it (``raw``). The copy's buffers are swapped for clones during the pass: a forward that
    writes into one (a step counter) must not change what the probe's own graph saved for its backward passes.
    """
    request = dataclasses.replace(request, layout=CHANNELS_FIRST, draws=1)
    buffers = {name: buffer.clone() for name, buffer in copy.named_buffers()}
    try:
        with torch.no_grad(), _reparametrized(copy, buffers):
            return forward_to(copy, probe_inputs(request).detach(), request, _ShapesOnly(), raw=raw)
    except (ValueError, ProbeError, RuntimeError):
        return None


def _reparametrized(module: nn.Module, tensors: dict[str, torch.Tensor]) -> contextlib.AbstractContextManager:
    """``module`` with some of its tensors swapped for others, as ``torch.func.functional_call`` runs it."""
    try:
        from torch.nn.utils.stateless import _reparametrize_module
    except ImportError:  # a torch without it: the copy's own buffers
        return contextlib.nullcontext()
    return _reparametrize_module(module, tensors)


class _ShapesOnly(contextlib.nullcontext):
    """:func:`forward_to`'s function mode where only the output's shape is read: no twins, a third faster.

    The twins keep every shape, so the copy's own calls give the same one; a forward that fails without them leaves
    the check it serves undecided, as any forward on another input may.
    """

    recording, flow, moved_channels, reshaped_channels, output_channels_first = True, None, False, False, None
    last_axis_sizes: set[int] = set()
    cuts: list[str] = []
    random_draws: list[str] = []
    branches: list[str] = []
    operator_calls: list[str] = []
    input_read_otherwise: list[str] = []

    def cut_reason(self, tensor) -> None:
        return None


def probe_inputs(request: ProbeRequest) -> torch.Tensor:
    """The probe's input leaf: ones in theoretical mode, ``draws`` normal samples from a private generator else.

    Args:
        request: the probe's request (input shape, mode, draws, seed, dtype, device).

    Returns:
        The input, requiring grad, on the request's device.
    """
    input_shape, dtype = request.input_shape, request.dtype
    spatial = tuple(input_shape[2:])
    if request.mode == "theoretical":
        inputs = torch.ones((1, input_shape[1], *spatial), dtype=dtype)
    else:
        generator = torch.Generator().manual_seed(request.seed)
        inputs = torch.randn((request.draws, input_shape[1], *spatial), dtype=dtype, generator=generator)
    return inputs.to(request.device).requires_grad_(True)


def forward_to(
    copy: nn.Module, inputs: torch.Tensor, request: ProbeRequest, functions=None, *, raw: bool = False
) -> torch.Tensor:
    """Runs the copy's forward under the probe's function mode and returns the requested layer's output.

    The forward stops once the request's layer (the model's output if ``None``) has produced its output; the
    request's ``element`` picks one feature map from an output that is a tuple, list or dict, which is returned
    channels first, read in the request's ``layout`` (:func:`as_channels_first`). ``functions`` is the function
    mode to run under (:func:`probe_functions`), to read what it saw afterwards. ``raw``: the output as the forward
    returns it, not read in any layout.

    Raises:
        ValueError: the input's rank does not fit the model's convolutions, ``target`` never runs, the output is
            not a tensor and ``element`` does not pick one, or its shape does not fit ``layout``.
        ProbeError: the forward raised (chained), or it cuts the gradient on an input-dependent tensor.
    """
    mode, input_shape, layer, element = request.mode, request.input_shape, request.layer, request.element
    target = submodule(copy, layer)
    captured: list = []
    functions = functions or probe_functions(mode)
    # Once per copy and layer, the forward goes on past the layer's output, to find a second call of it.
    checked = _runs_once.setdefault(copy, set())
    look_further = target is not None and layer not in checked

    def capture(_module, _args, output):
        if captured:
            raise _CalledAgain
        captured.append(output)
        if not look_further:
            raise _Captured
        # The rest of the forward only looks for a second call: it records nothing, builds no graph, and runs on
        # copies, so that no in-place op changes the captured output or what its backward saved.
        functions.recording = False
        torch.set_grad_enabled(False)
        return _detached(output)

    handles = forward_checks(copy, captured)
    if target is not None:
        handles.append(target.register_forward_hook(capture))
    grad_enabled = torch.is_grad_enabled()
    ran_to_the_end = False
    if hasattr(functions, "start_input"):
        functions.start_input(inputs)
    if _wider(inputs.dtype, torch.get_default_dtype()) and hasattr(functions, "factory_dtype"):
        functions.factory_dtype = inputs.dtype  # float64: not float16, where a -1e9 mask made in it would overflow
    try:
        with functions:
            output = copy(inputs.clone())  # a forward may scale its input in place (x /= 255): not the leaf itself
        ran_to_the_end = True
    except _Captured:
        pass
    except _CalledAgain:
        raise ValueError(called_again_message(layer)) from None
    except _IntegerQuantized as error:
        raise ValueError(
            f"the forward up to the output of {where(layer)} runs {type(error.module).__name__} of "
            f"{type(error.module).__module__}, converted to integer quantization (torch.ao.quantization's convert): "
            f"integers carry no gradient, so no probe can read the fields past it; probe the float model before "
            f"convert (a quantization-aware model, its fake quantizers on, is probed as it is), or a layer before it "
            f"with layer="
        ) from None
    except Unbatched as error:
        if not captured:
            raise rank_error(copy, error.module, input_shape) from None
    except Exception as error:
        if not captured:  # past the layer's output (a head that needs another input size), nothing is measured
            raise forward_error(copy, input_shape, error, draws=len(inputs) if mode == "weights" else None) from error
    finally:
        torch.set_grad_enabled(grad_enabled)
        functions.recording = True
        for handle in handles:
            handle.remove()
    if captured:
        output = captured[0]
        if look_further and ran_to_the_end:  # a forward that raised past the layer proved nothing: look again
            checked.add(layer)
    if target is not None and not captured:
        raise ValueError(
            f"layer={layer!r} never runs in the model's forward on an input of shape {tuple(input_shape)} (a spare "
            f"head, or a ModuleList/ModuleDict container whose children run instead), so it has no field; name a "
            f"submodule that runs, e.g. one of {_run_modules(copy, inputs, mode)}"
        )
    if functions.random_draws:
        raise ProbeError(
            f"the field of {where(layer)} depends on a random draw in its forward "
            f"({', '.join(dict.fromkeys(functions.random_draws))}): it would be one draw's, and follow the global "
            f"random state; draw only when self.training (as dropout does), or from a generator= seeded in the "
            f"forward, or probe a layer before the draw with layer="
        )
    if functions.input_read_otherwise:
        raise ValueError(
            f"input_shape={tuple(input_shape)} is read channels first, (N, C, *spatial): dim 1 ({input_shape[1]} "
            f"long) as the channels, the rest as positions; but the model's first layer on its input reads another "
            f"dim as its channels ({functions.input_read_otherwise[0]}): its input is laid out otherwise, (N, L, C) "
            f"or (N, *spatial, C), and a field would be read across its channels; probe a module that takes the "
            f"input channels first (forward(x) returns model(x.permute(...)) in the model's layout, on an "
            f"input_shape whose dim 1 is the channels)"
        )
    if functions.operator_calls:
        calls = list(dict.fromkeys(functions.operator_calls))
        named = f"{', '.join(calls[:4])}{', ...' if len(calls) > 4 else ''}"
        if any(not call.startswith(("aten.", "prims.")) for call in calls):
            raise ProbeError(
                f"the forward up to the output of {where(layer)} calls custom ops on values of the input ({named}): "
                f"the theoretical copy cannot see inside them, where an activation or a tie could hide pixels; write "
                f"the op with torch functions in the forward, or use mode='weights' (what the current weights connect)"
            )
        raise ProbeError(
            f"the forward up to the output of {where(layer)} calls aten's operator overloads on values of the input "
            f"({named}: a torch.export or make_fx graph), below the functions (F.max_pool2d, F.relu, torch.sub) that "
            f"the theoretical copy replaces by twins that hide no pixel, so a tie or an activation could hide some; "
            f"probe the eager module it was made from, or use mode='weights' (what the current weights connect)"
        )
    if functions.branches:
        raise ProbeError(
            f"the field of {where(layer)} depends on a branch the forward takes in Python on values computed from "
            f"the input ({', '.join(dict.fromkeys(functions.branches))}): on the theoretical copy's constant input "
            f"it takes one side, whose field need not hold the other's; probe mode='weights' (the union over random "
            f"inputs, which take either side), or a layer before the branch with layer= (a check that only raises, "
            f"assert (x >= 0).all(), can move out of the forward)"
        )
    output = selected_element(output, element, layer)
    if hasattr(functions, "read_output"):
        functions.read_output(output)
    # Only the probed element's cut matters: a model may return a pick's indices beside its feature map.
    cuts = [*functions.cuts, *filter(None, [functions.cut_reason(output)])]
    if cuts:
        fix = "remove the cut from the forward, or probe a layer before it with layer="
        if any(cut.endswith(GRADIENT_OFF) for cut in cuts):
            # A frozen feature extractor run without gradients: no layer inside it has one either.
            fix = (
                "remove the cut from the forward (a frozen feature extractor run inside the block is frozen as well "
                "by requires_grad_(False) on its parameters, which lets the gradient reach the input), or probe a "
                "layer before the block with layer=, or the part inside it as a model of its own (e.g. "
                "probe_rf(model.backbone, input_shape))"
            )
        raise ProbeError(
            f"the forward up to the output of {where(layer)} cuts the gradient on a path from the input "
            f"({', '.join(dict.fromkeys(cuts))}): the probe reads fields from gradients and would miss the "
            f"inputs on that path; {fix}"
        )
    # Whether the output's dim 1 holds its channels, as the forward laid it out (read before any layout moves it).
    functions.output_channels_first = None if functions.flow is None else functions.flow.channels_first(output)
    if functions.output_channels_first is None and not functions.moved_channels:
        # No call moved a tensor's dim 1: it holds no spatial axis, unless a reshape made it (x.unfold(-1, 8, 4)
        # .squeeze(1): patches on dim 1) and the last axis is as long as a linear layer's features, which the
        # layout check then decides on another input.
        features = output.dim() >= 3 and output.shape[-1] in functions.last_axis_sizes
        if not (functions.reshaped_channels and features):
            functions.output_channels_first = True
    if raw:
        return output
    folded = output.dim() >= 3 and len(output) != len(inputs)
    if folded and inputs.requires_grad and not output.requires_grad:  # a constant map, not samples folded into it
        comparison = functions.comparison_behind(output) if hasattr(functions, "comparison_behind") else None
        raise ProbeError(without_gradient(where(layer), comparison))
    merged = _merged_back(copy, inputs, mode, layer) if folded else []
    laid_out = as_channels_first(output, request.layout, input_shape, layer, batch=len(inputs), merged=merged)
    flow = getattr(functions, "flow", None)
    if flow is not None and laid_out is not output and request.parsed_layout == CHANNELS_LAST:
        flow.after("movedim", (output, -1, 1), {}, laid_out)  # the flow carries on through the layout's own move
    return laid_out


def _merged_back(copy: nn.Module, inputs, mode: str, layer: str | None) -> list[str]:
    """The first module after ``layer`` whose output holds one map per sample, an enclosing one first (a courtesy)."""
    outputs = outputs_by_module(copy, inputs, mode)
    names = list(outputs)
    later = names[names.index(layer) + 1 :] if layer in names else []
    whole = [n for n in later if isinstance(t := outputs[n], torch.Tensor) and t.dim() >= 3 and len(t) == len(inputs)]
    enclosing = [n for n in whole if layer and layer.startswith(n + ".")]
    return (enclosing or whole)[:1]


def selected_element(output, element, layer: str | None) -> torch.Tensor:
    """Returns the feature map ``element`` picks from an output (the output itself when it is a tensor).

    Raises:
        ValueError: the output is a tuple, list or dict and ``element`` does not name one of its tensors, or it is a
            tensor and ``element`` is given, or it is something else.
    """
    if isinstance(output, torch.Tensor):
        if element is not None:
            raise ValueError(
                f"element={element!r} picks from a tuple, list or dict output, but the output of {where(layer)} is a "
                f"tensor; leave element=None"
            )
        return output
    if dataclasses.is_dataclass(output) and not isinstance(output, type):  # a model's output record
        output = {field.name: getattr(output, field.name) for field in dataclasses.fields(output)}
    if isinstance(output, (tuple, list, dict)):
        keys = list(output.keys()) if isinstance(output, dict) else list(range(len(output)))
        choices = ", ".join(f"{k!r}: {_describe(output[k])}" for k in keys)
        what = "key" if isinstance(output, dict) else "index"
        if element is None:
            raise ValueError(
                f"the output of {where(layer)} is a {type(output).__name__} of {len(keys)} ({choices}); pass "
                f"element= with the {what} of the feature map to probe"
            )
        if isinstance(element, str) and hasattr(output, "_fields") and element in output._fields:  # a namedtuple's
            element = output._fields.index(element)
        elif isinstance(element, int) and isinstance(output, dict) and element not in keys and str(element) in keys:
            element = str(element)  # rf-probe --element 1 on torchvision's FPN levels, keyed '0', '1'
        allowed = keys if isinstance(output, dict) else range(-len(keys), len(keys))  # -1: the last
        if isinstance(element, bool) or element not in allowed:
            raise ValueError(
                f"element={element!r} is not {with_article(what)} of the output of {where(layer)}: {choices}"
            )
        output = output[element]
        if isinstance(output, torch.Tensor):
            return output
    raise ValueError(
        f"the output of {where(layer)} is a {type(output).__name__}, not a tensor; pass layer= naming a "
        f"submodule that returns a feature map"
    )


def without_gradient(subject: str, comparison: str | None) -> str:
    """Why a probe of ``subject`` has nothing to backpropagate: its output carries no gradient from the input.

    ``comparison``: the comparison of input-dependent values whose mask, used as values, the output was made of.
    """
    if comparison is None:
        return f"the output of {subject} does not depend on the input: nothing to backpropagate"
    return (
        f"the output of {subject} carries no gradient from the input, which the forward reads through a comparison "
        f"({comparison}) before it: a mask used as values ((x > 0).float()) has a zero gradient, "
        f"so the probe, which reads fields from gradients, cannot see what it reads; probe a layer before the "
        f"comparison with layer=, or gate values with the mask (y * (x > 0)) rather than use it as values"
    )


def with_article(noun: str) -> str:
    """``noun`` after "a" or "an"."""
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def as_channels_first(
    output: torch.Tensor, layout, input_shape, layer: str | None, *, batch: int, merged: Sequence[str] = ()
) -> torch.Tensor:
    """Returns the probed output as a feature map ``(N, C, *spatial)``, reading its axes as ``layout`` lays them out.

    Channels last ``(N, *spatial, C)`` is permuted; tokens ``(N, P + prod(grid), C)`` lose their ``P`` leading tokens
    and the others are reshaped onto the grid, row-major. Both are differentiable, so the backward probe stays exact.
    An output without spatial axes, ``(N, C)``, is returned as it is: the caller names layers that have them.
    ``batch`` is the batch of the input the forward ran on; ``merged`` names layers to suggest where the output's
    batch holds more (the layers where windows are merged back).

    Raises:
        ValueError: the output's first axis is not the input's batch (windows or heads folded into it: any field read
            from it would be a union over them, no map of the input), or its shape does not fit ``layout`` on an
            input of ``input_shape``: another number of spatial axes than the input's, or, for tokens, another number
            of tokens than the grid's and the prefix's (the message shows the shape and the fix).
    """
    parsed = checked_layout(layout)
    axes = len(input_shape) - 2
    if output.dim() < 3:
        return output
    if len(output) != batch:
        raise ValueError(_folded_batch(output, batch, layer, merged))
    if isinstance(parsed, Tokens):
        return _tokens_on_grid(output, parsed, layout, input_shape, layer)
    if output.dim() != axes + 2:
        raise ValueError(_rank_mismatch(output, parsed, layout, input_shape, layer))
    return output if parsed == CHANNELS_FIRST else output.movedim(-1, 1)


def _tokens_on_grid(output: torch.Tensor, tokens: Tokens, layout, input_shape, layer) -> torch.Tensor:
    shape, axes, grid = tuple(output.shape), len(input_shape) - 2, tokens.grid
    if len(grid) != axes:
        raise ValueError(
            f"layout={layout!r} lays the tokens on a grid of {len(grid)} {_axes(len(grid))} {grid}, but the input "
            f"{tuple(input_shape)} has {axes} spatial axes; give one grid length per axis, e.g. "
            f"layout={_tokens_hint(layout, axes)}"
        )
    if output.dim() != 3:
        fix = (
            "; for a feature map (N, *spatial, C) pass layout='channels_last', for (N, C, *spatial) "
            "layout='channels_first'"
            if output.dim() == axes + 2
            else "; name a layer whose output is tokens with layer="
        )
        raise ValueError(
            f"layout={layout!r} reads tokens (N, L, C), but the output of {where(layer)} is {shape} "
            f"({output.dim()} axes){fix}"
        )
    count, on_grid = shape[1], math.prod(grid)
    if count != tokens.tokens:
        said = f"{tokens.prefix} + {'*'.join(map(str, grid))} = {tokens.tokens}"
        if count > on_grid:
            extra = count - on_grid
            first = "token is a class or register token" if extra == 1 else f"{extra} are class or register tokens"
            fix = f"; if the first {first}, pass layout={_spelled(layout, Tokens(grid, extra))}"
        else:
            fix = "; pass layout= with the grid the tokens lie on (per axis, the input's length over the patch's)"
        raise ValueError(
            f"the output of {where(layer)} is {shape}: {count} tokens, not {said} as layout={layout!r} says{fix}"
        )
    return output[:, tokens.prefix :].transpose(1, 2).reshape(shape[0], shape[2], *grid)


def _grid_position(flat: int, grid: tuple[int, ...]) -> tuple[int, ...]:
    """The grid position of the ``flat``-th token (counted after the prefix, row-major)."""
    return tuple(flat // math.prod(grid[a + 1 :]) % n for a, n in enumerate(grid))


def _grids_dividing(lengths: Sequence[int], tokens: int) -> list[tuple[int, ...]]:
    """Every grid of ``tokens`` tokens whose length on each axis divides the input's there, in lexicographic order."""
    if len(lengths) == 1:
        return [(tokens,)] if lengths[0] % tokens == 0 else []
    grids = []
    for n in range(1, lengths[0] + 1):
        if lengths[0] % n == 0 and tokens % n == 0:
            grids += [(n, *rest) for rest in _grids_dividing(lengths[1:], tokens // n)]
    return grids


def _folded_batch(output: torch.Tensor, batch: int, layer: str | None, merged: Sequence[str]) -> str:
    held = "one sample" if batch == 1 else f"{batch} samples (the batch the probe ran)"
    fix = (
        f"probe the layer that merges them back instead, layer={merged[0]!r}"
        if merged
        else "probe a layer whose output holds one map per sample instead (where they are merged back)"
    )
    return (
        f"the output of {where(layer)} is {tuple(output.shape)}: its first axis holds {len(output)} where the input "
        f"holds {held}: the forward folds something into the batch axis before it (windows or heads), so it is no "
        f"feature map of the input and a field read from it would be the union over them; {fix}"
    )


def _rank_mismatch(output: torch.Tensor, parsed: str, layout, input_shape, layer) -> str:
    # one sample's output, as the input is shown (weights mode runs its draws as a batch)
    shape, axes, seen = (input_shape[0], *output.shape[1:]), len(input_shape) - 2, output.dim() - 2
    letters = ", ".join(axis_letters(axes))
    read = f"channels first (N, C, {letters})" if parsed == CHANNELS_FIRST else f"channels last (N, {letters}, C)"
    text = (
        f"the output of {where(layer)} is {shape}, which layout={layout!r} reads as {seen} spatial "
        f"{_axes(seen)}, but the input {tuple(input_shape)} has {axes}: it is not {read}"
    )
    if seen > axes:
        return f"{text}; pass layer= naming a feature map with {axes} spatial axes"
    fix = (
        f"; if it holds tokens (N, L, C), pass layout={_tokens_hint(layout, axes)}: the grid its patch tokens lie on "
        f"(row-major) after P leading class or register tokens"
    )
    if parsed == CHANNELS_FIRST:
        fix += f"; if it is channels last (N, {letters}, C), pass layout='channels_last'"
    if 0 < seen < axes:
        fix += (
            "; if an axis was pooled or squeezed away (a text line's height in a CRNN), pass layer= naming the "
            "module before the squeeze, whose output keeps it with length 1"
        )
    return text + fix


def _axes(n: int) -> str:
    return "axis" if n == 1 else "axes"


def _tokens_hint(layout, axes: int) -> str:
    """The tokens layout to pass, with placeholders, in the form the user wrote the layout."""
    letters = axis_letters(axes)
    if isinstance(layout, Tokens):
        grid = f"({letters[0]},)" if axes == 1 else f"({', '.join(letters)})"
        return f"Tokens(grid={grid}, prefix=P)"
    return f"'tokens:{'x'.join(letters)}+P'"


def _spelled(layout, tokens: Tokens) -> str:
    """``tokens`` written as the user wrote ``layout``: a ``Tokens(...)`` or its string form."""
    return repr(tokens) if isinstance(layout, Tokens) else repr(str(tokens))


def _describe(value) -> str:
    return f"tensor {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


def _run_modules(copy: nn.Module, inputs, mode: str) -> list[str]:
    """The names of the submodules that run in a forward pass, the last five (a courtesy for messages)."""
    return list(outputs_by_module(copy, inputs, mode))[-5:]


def outputs_by_module(copy: nn.Module, inputs, mode: str, skip: str | None = None) -> dict[str, object]:
    """Each submodule that runs in a forward pass (but ``skip``), with its first output, in the order they run.

    A forward that raises ends the record, nothing more (a courtesy for messages, and evidence from shapes).

    Args:
        copy: the probe's copy of the model.
        inputs: the input to run it on.
        mode: the copy's mode, for its function mode.
        skip: a submodule name to leave out.

    Returns:
        The outputs by submodule name.
    """
    outputs: dict[str, object] = {}

    def recorder(name: str):
        def record(_module, _args, output) -> None:  # returns None: a hook's value would replace the output
            outputs.setdefault(name, output)

        return record

    handles = [m.register_forward_hook(recorder(n)) for n, m in copy.named_modules() if n and n != skip]
    try:
        with torch.no_grad(), probe_functions(mode):
            copy(inputs.clone())
    except Exception:  # noqa: BLE001 - a courtesy; the caller's error is raised either way
        pass
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def forward_checks(copy: nn.Module, captured: list, *, quantized: bool = True, spatial: int | None = None) -> list:
    """Pre-hooks that refuse what no probe can read, until the probed output is ``captured``.

    A convolution input without a batch axis ((1, C, L) would reach a Conv2d as (C, H, W)), and a module converted to
    integer quantization (integers carry no gradient; ``quantized=False``: not checked). ``spatial``: the input's
    number of spatial axes, where only a convolution of another rank is refused (a forward that runs a head per
    sample, unbatched, is not).
    """

    def batched_only(module, args):
        takes = len(module.kernel_size)
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() != takes + 2 and spatial != takes:
            raise Unbatched(module)

    def float_only(module, _args):
        if not captured:
            raise _IntegerQuantized(module)

    handles = []
    for module in copy.modules():  # one walk: ViT-sized trees make each walk cost
        if quantized and integer_quantized(module):
            handles.append(module.register_forward_pre_hook(float_only))
        elif isinstance(module, _ConvNd):
            handles.append(module.register_forward_pre_hook(batched_only))
    return handles


@contextlib.contextmanager
def dead_windows_watched(copy: nn.Module, axes: Sequence[int], found: list[str]):
    """Records, in ``found``, every convolution or pooling with an output whose window along ``axes`` is all padding.

    On such an input some paths of the network carry nothing, so a field read on it can be smaller than the field
    on a longer input. ``axes`` are spatial axes (0 for the first).
    """

    def check(module, args):
        if not args or not isinstance(args[0], torch.Tensor) or getattr(module, "padding_mode", "zeros") != "zeros":
            return
        spatial = args[0].shape[2:]
        window = _window(module, len(spatial))
        for axis in axes:
            if axis < len(spatial) and _has_dead_window(spatial[axis], *(w[axis] for w in window[:4]), window[4]):
                found.append(f"{type(module).__name__} {tuple(window[0])}")

    watched = [m for m in copy.modules() if (isinstance(m, _ConvNd) and not m.transposed) or isinstance(m, _POOLS)]
    handles = [m.register_forward_pre_hook(check) for m in watched]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


_POOLS = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)


def _window(module: nn.Module, n: int):
    """Per axis, the (kernel, stride, padding, dilation) of a convolution or pooling, and its ceil_mode."""

    def per_axis(value, default=None):
        value = default if value is None else value
        return (value,) * n if isinstance(value, int) else tuple(value)

    kernel = per_axis(module.kernel_size)
    dilation = per_axis(getattr(module, "dilation", 1))
    padding: object = module.padding
    if isinstance(padding, str):
        padding = tuple(d * (k - 1) // 2 if padding == "same" else 0 for k, d in zip(kernel, dilation))
    return kernel, per_axis(module.stride, kernel), per_axis(padding), dilation, getattr(module, "ceil_mode", False)


@functools.lru_cache(maxsize=4096)
def _has_dead_window(length: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> bool:
    """Whether some output's window (taps ``o*stride - padding + t*dilation``) lies wholly outside ``[0, length)``."""
    for output in range(max(pooled_length(length, kernel, stride, padding, dilation, ceil_mode), 0)):
        start = output * stride - padding
        first_inside = max(0, -(start // dilation))  # the first tap at or right of 0: ceil(-start / dilation)
        if first_inside > kernel - 1 or start + first_inside * dilation > length - 1:
            return True
    return False


def _wider(dtype: torch.dtype, than: torch.dtype) -> bool:
    return dtype.is_floating_point and than.is_floating_point and torch.finfo(dtype).bits > torch.finfo(than).bits


class _IntegerQuantized(Exception):
    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


class Unbatched(Exception):
    """A convolution received an input without a batch axis (see :func:`forward_checks`)."""

    def __init__(self, module: _ConvNd):
        super().__init__()
        self.module = module


def rank_error(copy: nn.Module, module: _ConvNd, input_shape) -> ValueError:
    """The refusal of ``input_shape``, whose rank made ``module`` receive an input without a batch axis."""
    name = next((n for n, m in copy.named_modules() if m is module), "")
    takes = len(module.kernel_size)
    wanted = ("(N, C, L)", "(N, C, H, W)", "(N, C, D, H, W)")[takes - 1]
    if len(input_shape) - 2 == takes:  # the input fits: the forward dropped the batch axis on its way
        return ValueError(
            f"the convolution {name or 'the model'} ({type(module).__name__}) receives an input without a batch "
            f"axis, though input_shape={tuple(input_shape)} has its {takes} spatial axes: the forward drops the "
            f"batch axis before it (a loop over the samples, a squeeze(0)), and the probe reads one batch; probe a "
            f"layer before it with layer="
        )
    return ValueError(
        f"input_shape={tuple(input_shape)} has {len(input_shape) - 2} spatial axes, but the convolution "
        f"{name or 'the model'} ({type(module).__name__}) receives an input without a batch axis: it takes {takes} "
        f"spatial axes; pass a shape {wanted}"
    )


def forward_error(copy: nn.Module, input_shape, error: Exception, *, draws: int | None = None) -> Exception:
    """The error to raise for a forward that raised: a rank mismatch with the first convolution, or a ProbeError.

    ``draws``: weights mode's random inputs, which the forward ran on as one batch.
    """
    if isinstance(error, ProbeError):  # the probe's copy refused something (see probe_functions): its own words
        return ProbeError(str(error))
    spatial = len(input_shape) - 2
    first = first_convolution_run(copy, (1, *tuple(input_shape)[1:]))
    if first is not None and len(first[1].kernel_size) != spatial:
        name, module = first
        takes = len(module.kernel_size)
        wanted = ("(N, C, L)", "(N, C, H, W)", "(N, C, D, H, W)")[takes - 1]
        return ValueError(
            f"input_shape={tuple(input_shape)} has {spatial} spatial axes, but the model's first convolution "
            f"({name or 'the model'}: {type(module).__name__}) takes {takes}; pass a shape {wanted}"
        )
    if draws is not None and draws > 1:
        return ProbeError(
            f"the model's forward raised on a batch of {draws} random inputs of shape {tuple(input_shape[1:])} "
            f"(weights mode runs its draws={draws} as one batch): {error}; if the model runs on one sample at a time "
            f"(a buffer of batch 1), pass draws=1{_cast_hint(copy, error)}"
        )
    hooked = copy.__dict__.get(DROPPED_HOOKS)
    named = ", ".join(repr(name or "the model") for name in (hooked or [])[:3])
    hooks = (
        f" (note: the probe's copy runs without your forward hooks, here on {named}; if the forward reads what "
        f"a hook collected, as timm's FeatureHookNet of features_only=True does, it cannot run on the copy: probe "
        f"a model that returns the feature map itself, e.g. one whose forward calls forward_features, or pass "
        f"layer= naming the hooked module)"
        if hooked
        else ""
    )
    return ProbeError(
        f"the model's forward raised on an input of shape {tuple(input_shape)}: {error}{hooks}{_cast_hint(copy, error)}"
    )


# torch's words for operands of two dtypes (a convolution's, linear's, matmul's, a norm's, an RNN's, an index_put's);
# not those of two devices ("Input type (torch.FloatTensor) and weight type (torch.cuda.FloatTensor)").
_DTYPE_MISMATCH = re.compile(
    r"same dtype|share same datatype|dtypes match|does not match weight dtype|expected scalar type \w+ but found"
    r"|input type \((?:float|double|half|c10::half|c10::bfloat16)\) and \w+ type \(\S+\) should be the same",
    re.IGNORECASE,
)


def _cast_hint(copy: nn.Module, error: Exception) -> str:
    """Why a forward that casts to a dtype of its own fails on the copy, whose tensors all run in one dtype."""
    if not _DTYPE_MISMATCH.search(str(error)):
        return ""
    dtypes = {t.dtype for t in itertools.chain(copy.parameters(), copy.buffers()) if t.is_floating_point()}
    if len(dtypes) != 1:
        return ""
    (dtype,) = dtypes
    return (
        f" (note: the probe's copy runs every floating parameter and buffer in {dtype}, whatever dtype each has in "
        f"the model; a forward that casts a tensor to a dtype of its own, as x.double() or x.to(torch.bfloat16) "
        f"before a part kept in that dtype, meets weights of another: cast to the part's weights instead, "
        f"x.to(self.head.weight.dtype), or pass dtype= the dtype the forward casts to, or probe that part alone)"
    )


class _Reached(Exception):
    pass


def first_convolution_run(model: nn.Module, shape: tuple[int, ...]) -> tuple[str, _ConvNd] | None:
    """The first convolution the forward runs on an input of ``shape`` (the first defined, where none is reached).

    A model may define a 1D head before the 2D body it runs first (a CRNN): blaming the head's rank sent the user
    to a shape that failed too. The forward stops as it reaches the first convolution (called on an error's path
    only: a module before it may have run).
    """
    convolutions = [(name, m) for name, m in model.named_modules() if isinstance(m, _ConvNd)]
    reached: list[tuple[str, _ConvNd]] = []

    def stop(module, _args, *, name):
        reached.append((name, module))
        raise _Reached

    handles = [conv.register_forward_pre_hook(functools.partial(stop, name=name)) for name, conv in convolutions]
    weight = convolutions[0][1].weight if convolutions else None
    like = weight if isinstance(weight, torch.Tensor) else torch.zeros(())
    try:
        with torch.no_grad():
            model(torch.zeros(shape, device=like.device, dtype=like.dtype))
    except Exception:  # noqa: BLE001, S110 - _Reached, or the forward failed before any convolution
        pass
    finally:
        for handle in handles:
            handle.remove()
    return reached[0] if reached else next(iter(convolutions), None)


def _no_spatial_axes_message(copy: nn.Module, inputs, mode: str, output, layer) -> str:
    outputs = outputs_by_module(copy, inputs, mode, skip=layer)
    shapes = {n: tuple(o.shape) for n, o in outputs.items() if isinstance(o, torch.Tensor) and o.dim() >= 3}
    candidates = [f"{name} {shape}" for name, shape in list(shapes.items())[-5:]]
    return (
        f"the output of {where(layer)} has shape {tuple(output.shape)}: no spatial axes to probe (expected "
        f"(N, C, *spatial)); pass layer= naming a feature map, e.g. one of: {candidates}"
    )
