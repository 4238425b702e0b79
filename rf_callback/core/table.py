"""The per-layer receptive-field table: the centre field of every submodule's feature map, in forward order."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from rf_callback.core.arguments import checked_layout
from rf_callback.core.geometry_flow import checked_flow
from rf_callback.core.geometry_probe import Budget, measure_geometry
from rf_callback.core.graph import (
    ProbeError,
    ProbeGraph,
    Unbatched,
    Underflow,
    as_channels_first,
    called_again_message,
    dead_windows_watched,
    exact_kernels,
    forward_checks,
    forward_error,
    outputs_by_module,
    probe_inputs,
    rank_error,
    submodule,
    without_gradient,
)
from rf_callback.core.layouts import CHANNELS_FIRST, CHANNELS_LAST, Tokens
from rf_callback.core.model_copy import (
    picks_on_path,
    prepared_copy,
    probe_functions,
    probe_scope,
    scripted_modules,
    scripted_subject,
    with_materialised_fallback,
)
from rf_callback.core.probe import border_followed, probe_rf, table_followed, table_for_picks
from rf_callback.core.request import ProbeRequest
from rf_callback.core.result import Bounds, ReceptiveField
from rf_callback.core.support import box_of


@dataclass(frozen=True)
class LayerField:
    """One row of :func:`rf_table`: the receptive field at the centre of one submodule's output.

    Attributes:
        name: the submodule's dotted name, as in ``model.named_modules()``.
        module_type: the submodule's class name (``"Conv2d"``, ``"BasicBlock"``).
        output_shape: the submodule's full output shape with ``N = 1``, as it returns it (``(N, C, *spatial)``
            channels first, ``(N, *spatial, C)`` channels last, ``(N, L, C)`` tokens).
        position: the probed output index, ``n // 2`` on every axis of the spatial grid.
        size: per axis, the number of input positions inside the (clipped) bounds.
        full_size: per axis, the unclipped size ``r`` of the field (larger than ``size`` where the input clips it,
            as the analytic tools print it); ``None`` where the stride is.
        stride: per axis, the effective stride ``S``; ``None`` where no single stride describes the fields (an
            upsampling path) or it could not be measured.
        offset: per axis, the effective offset (padding) ``P``; ``None`` where the stride is.
        bounds: per axis, the inclusive ``(first, last)`` input indices that influence the position.
        covers_input: the field spans the whole input on every axis (``bounds == (0, L - 1)``); later layers on
            this path cannot see more of it.
        layout: how the row's output was read: ``"channels_first"``, ``"channels_last"`` or ``"tokens:HxW+P"``.
    """

    name: str
    module_type: str
    output_shape: tuple[int, ...]
    position: tuple[int, ...]
    size: tuple[int, ...]
    full_size: tuple[int | None, ...]
    stride: tuple[int | None, ...]
    offset: tuple[int | None, ...]
    bounds: tuple[Bounds, ...]
    covers_input: bool
    layout: str = CHANNELS_FIRST

    def to_dict(self) -> dict:
        """Returns every attribute as JSON-serialisable built-in types (tuples become lists).

        ``layout`` is left out where it is the default, ``"channels_first"``.
        """
        record = {
            "name": self.name,
            "module_type": self.module_type,
            "output_shape": list(self.output_shape),
            "position": list(self.position),
            "size": list(self.size),
            "full_size": list(self.full_size),
            "stride": list(self.stride),
            "offset": list(self.offset),
            "bounds": [list(b) for b in self.bounds],
            "covers_input": self.covers_input,
        }
        if self.layout != CHANNELS_FIRST:
            record["layout"] = self.layout
        return record


@dataclass(frozen=True)
class _Output:
    name: str
    module_type: str
    shape: tuple[int, ...]
    depends_on_input: bool
    same_as: str | None = None  # an earlier submodule whose theoretical field this output's equals
    container: str | None = None  # "tuple", "list" or "dict" for an output that holds feature maps
    holds_maps: bool = False  # a container holding an input-dependent tensor of a feature map's rank
    after_cut: str | None = None  # a gradient cut the forward made before this output
    fixed_size: tuple = ()  # calls with a fixed output size before this output, and the dims fixed
    border_modes: tuple[str, ...] = ()  # paddings that read the input past its border, before this output
    layout: str | Tokens = CHANNELS_FIRST  # how the row's output is read
    misfit: str | None = None  # why the output does not fit that layout
    grid: tuple[int, ...] = ()  # the spatial shape of the output read in its layout
    feature_map: bool = False  # a tensor with spatial axes in some layout: a row candidate (one sample's, or why not)
    known: str | None = None  # what the module type says of the output's last axis: "channels_first", "last_axis"
    flow: tuple | None = None  # the geometry the theoretical forward carried to this output (see geometry_flow)
    picks: tuple[str, ...] = ()  # selections by position on the path to this output: no single geometry follows
    compared: str | None = None  # the comparison whose mask, used as values, this output was made of (if any)
    calls: int = 1  # how often the module runs in the forward (a ReLU shared by a block's convolutions: 2)

    @property
    def assumed(self) -> bool:
        """Read in rf_table's ``layout=`` alone: no module type fixes its layout, and it is no other row's tensor."""
        return self.same_as is None and self.known != CHANNELS_FIRST


# Modules that the theoretical copy computes as identities (per-pixel scales at most): their output's theoretical
# field is their input's. Exact types only, so a subclass with a forward of its own is probed like any module.
_THEORETICAL_IDENTITIES = frozenset(
    {
        nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.Identity, nn.Dropout, nn.Dropout1d,
        nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU,
        nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh,
        nn.Softplus,
    }
)  # fmt: skip


def _keeps_the_field(module: nn.Module) -> bool:
    """Whether the theoretical field of the module's output is its input's.

    So it is for an identity of the theoretical copy, and for a 1 x 1 convolution with stride 1 (every weight is
    positive there: a channel mix at each pixel).
    """
    if type(module) in _THEORETICAL_IDENTITIES:
        return True
    return (
        isinstance(module, _ConvNd)
        and type(module) in (nn.Conv1d, nn.Conv2d, nn.Conv3d)
        and (
            all(k == 1 for k in module.kernel_size)
            and all(s == 1 for s in module.stride)
            and module.padding in ("valid", (0,) * len(module.kernel_size))
        )
    )


# Modules whose output PyTorch defines as (N, C, *spatial): read channels first whatever rf_table's layout.
_CHANNELS_FIRST_MODULES = (
    _ConvNd, nn.modules.batchnorm._BatchNorm, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
)  # fmt: skip


def _known_reading(module: nn.Module) -> str | None:
    """What a module's type says of its output: ``channels_first``, ``last_axis`` (it acts on the last axis), or None.

    Exact ``Linear`` and ``LayerNorm`` types only: ``LayerNorm2d``-style subclasses permute inside.
    """
    if isinstance(module, _CHANNELS_FIRST_MODULES):
        return CHANNELS_FIRST
    if type(module) is nn.Linear or (type(module) is nn.LayerNorm and len(module.normalized_shape) == 1):
        return "last_axis"
    return None


def _row_layout(
    name: str, module: nn.Module, output, same_as: _Output | None, layout
) -> tuple[str | Tokens, str | None]:
    """The layout a row's output is read in, and why the output does not fit it (``None`` where it does).

    PyTorch's convolutions, batch norms and poolings give channels-first outputs; a row whose output is another
    row's tensor (a container's last child, an activation applied to it) is read as that row is; a ``Linear`` or
    ``LayerNorm`` (exactly those: ``LayerNorm2d``-style subclasses permute inside) acts on the last axis, which
    channels first would read as a spatial axis; other rows are read in ``layout``.
    """
    known = _known_reading(module)
    if known == CHANNELS_FIRST:
        return CHANNELS_FIRST, None
    if same_as is not None:
        shared = same_as.misfit and f"layer {name!r} returns the output of layer {same_as.name!r}: {same_as.misfit}"
        return same_as.layout, shared or None
    if known == "last_axis" and checked_layout(layout) == CHANNELS_FIRST:
        return layout, (
            f"the output of layer {name!r} is {tuple(output.shape)}, made by a {type(module).__name__}, which acts "
            f"on its last axis: channels (channels last) or token features, not a spatial axis as layout={layout!r} "
            f"would read it; pass layout='channels_last', or the tokens' grid as layout='tokens:HxW+P'"
        )
    return layout, None


def rf_table(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    layers: str | Sequence[str] | None = None,
    mode: str = "theoretical",
    progress: Callable[[int, int, str], None] | None = None,
    layout: str | Tokens = CHANNELS_FIRST,
) -> list[LayerField]:
    """Measures the receptive field at the centre of every submodule output that is a feature map.

    One forward pass of a private copy (the probe's: deep-copied, eval mode, user hooks dropped) records, with
    forward hooks, the order in which submodules first produce their outputs. Every submodule whose output is a
    feature map of the input in its layout (below) and depends on the input is listed, containers included (a
    ``Sequential`` gets the row of its last child as well as its own). A submodule called more than once is left
    out with a warning (each call has a field of its own, which :func:`~rf_callback.core.probe.probe_rf` refuses to
    choose), and so is one that returns a tuple, list or dict of feature maps (a row reads one map:
    ``probe_rf(..., element=...)`` probes one of them). Each row equals
    ``probe_rf(model, input_shape, "center", layer=name, mode=mode)`` with its geometry; all rows share one forward
    pass of the theoretical copy on the input (weights mode adds one of the real network per row), and the
    geometry of every row is read on thin inputs whose forward passes the rows share too. A row whose output is
    another row's tensor (a container's last child), or a BatchNorm, activation, dropout, identity or 1 x 1
    stride-1 convolution applied to it unchanged, shares that row's theoretical field instead of measuring it again.

    One network can hold several layouts (a Swin's patch-embedding convolution is channels first, its blocks
    channels last), and a channels-last output ``(N, H, W, C)`` has as many axes as a channels-first one, so each
    row is read in one layout, by these rules: the outputs of PyTorch's convolutions, batch norms and poolings are
    channels first; a row whose output is another row's tensor (a container's last child, an activation applied
    to it) is read as that row; every other row is read in ``layout``, except that a ``Linear`` or ``LayerNorm``
    (which act on the last axis) is never read channels first. A row whose output does not fit its layout
    (another number of spatial axes than the input's, another number of tokens than the grid's, a batch axis
    that holds more than the sample: windows folded into it) is left out with a warning that says why, or
    refused when ``layers`` names it. So is a row read in ``layout`` alone whose output shape is that of a row
    whose module type reads otherwise (a ConvNeXt block that permutes back to channels first, under
    ``layout="channels_last"``): the shape is the only evidence. ``LayerField.layout`` says how each row was read;
    ``layers`` reads the rows it names in ``layout`` whatever their shape.

    Args:
        model: a network taking inputs shaped ``(N, C, *spatial)`` with 1, 2 or 3 spatial axes (not modified).
        input_shape: the full input shape ``(N, C, *spatial)``; ``N`` is ignored.
        layers: dotted names of the submodules to list (a single name is allowed), instead of every feature map;
            they are listed in forward order, whatever the order given.
        mode: ``"theoretical"`` (default) or ``"weights"``, as for :func:`~rf_callback.core.probe.probe_rf`.
        progress: called as ``progress(index, total, name)`` (``index`` from 1) before each layer is probed.
        layout: how the rows that no rule above fixes lay out their outputs: ``"channels_first"`` (default),
            ``"channels_last"``, or tokens on a grid, ``Tokens(grid=(H, W), prefix=P)`` or ``"tokens:HxW+P"``, as
            for :func:`~rf_callback.core.probe.probe_rf`.

    Returns:
        One :class:`LayerField` per listed submodule, in the order of their first outputs during a forward pass.

    Raises:
        ValueError: an argument is wrong: ``mode`` or ``input_shape`` as for ``probe_rf``, a name in ``layers`` that
            is not a submodule (the message lists the nearest names) or that the forward pass never calls, or a
            named submodule whose output is not a feature map or does not fit its layout; the input shape does not
            fit the model's convolutions.
        ProbeError: the forward raised, or a named submodule's output does not depend on the input.
    """
    request = ProbeRequest.checked(model, input_shape, mode=mode, layout=layout)
    wanted = _checked_layers(model, layers)
    device = request.device

    def attempts() -> list[LayerField]:
        try:
            return _rows(model, request, wanted, progress)
        except Underflow:
            return _rows(model, request.in_dtype(torch.float64), wanted, progress)

    with probe_scope(device), exact_kernels(device):
        return with_materialised_fallback(attempts)


def _rows(model: nn.Module, request: ProbeRequest, wanted, progress) -> list[LayerField]:
    """Probes the centre of every chosen layer, all from shared forward passes of the theoretical copy."""
    shape, mode, layout = request.input_shape, request.mode, request.layout
    forwards = _SharedForwards(model, wanted, request)
    inputs, outputs, captured = forwards.run(shape, record=True)
    if wanted is None:
        chosen = [o for o in outputs if o.feature_map]
        containers = [o for o in outputs if o.holds_maps]
        if containers:
            warnings.warn(
                f"rf_table: {_left_out(len(containers))}, of modules that return several outputs "
                f"({_some(f'{o.name} ({o.container})' for o in containers)}): a row reads one feature map; probe one "
                f"element with probe_rf(model, input_shape, layer={containers[0].name!r}, element=...)",
                stacklevel=3,
            )
        cut = next((o for o in chosen if o.after_cut), None)
        after = [o.name for o in chosen if o.after_cut]  # rows off the cut's path keep their fields
        through_masks = [o for o in chosen if not o.depends_on_input and o.compared is not None]
        chosen = [o for o in chosen if o.depends_on_input]
        if through_masks:
            warnings.warn(
                f"rf_table: {_left_out(len(through_masks))}: "
                + without_gradient(f"layer {through_masks[0].name!r}", through_masks[0].compared)
                + f" (the rows left out: {_some(o.name for o in through_masks)})",
                stacklevel=3,
            )
        if cut is not None:
            warnings.warn(
                f"rf_table: the rows from {cut.name!r} on are left out ({_some(after)}): the forward cuts the gradient "
                f"before them, or runs a call the theoretical copy cannot replace ({cut.after_cut}), and a field read "
                f"from gradients would miss the inputs on that path",
                stacklevel=3,
            )
            chosen = [o for o in chosen if o.after_cut is None]
        reused = [o.name for o in chosen if o.calls > 1]
        if reused:
            warnings.warn(
                f"rf_table: {_left_out(len(reused))}, of modules that run more than once in the forward, each "
                f"call with a field of its own (a ReLU shared by a block's convolutions has the field of the layer "
                f"each call follows): {_some(reused)}",
                stacklevel=3,
            )
            chosen = [o for o in chosen if o.calls == 1]
        folded = [o for o in chosen if o.shape[0] != 1]
        if folded:
            warnings.warn(
                f"rf_table: {_left_out(len(folded))}, whose first axis holds more than the one sample "
                f"({_some(f'{o.name} {o.shape}' for o in folded)}): windows or heads folded into the batch axis (a "
                f"field read from one would be the union over them), a sequence-first layout or no feature map at "
                f"all",
                stacklevel=3,
            )
        chosen = [o for o in chosen if o.shape[0] == 1]
        misfits = [o for o in chosen if o.misfit]
        chosen = [o for o in chosen if not o.misfit]
        contradicted = _contradicted(chosen, outputs, _channels_that_follow_the_input(model, request, chosen))
        if contradicted:
            chosen = [o for o in chosen if o.name not in contradicted]
            warnings.warn(
                f"rf_table: {_left_out(len(contradicted))}, read in layout={layout!r} only because it says "
                f"so, while their shapes say otherwise (another row of the same shape laid out otherwise, or channels "
                f"that follow the input): {_some(contradicted.values())}"
                f"; list them in layers= to read them in layout={layout!r}",
                stacklevel=3,
            )
        if misfits:
            # A 4-axis output reads the same channels first or last: say which listed rows only layout= decided.
            assumed = [o.name for o in chosen if o.assumed]
            warnings.warn(
                f"rf_table: {_left_out(len(misfits))}, whose outputs do not fit the layout they are read in "
                f"({_some(f'{o.name} {o.shape}' for o in misfits)}); the first: {misfits[0].misfit}"
                + (
                    f". These rows are read in layout={layout!r} only because it says so, and may be laid out as "
                    f"those left out are: {_some(assumed)}"
                    if assumed
                    else ""
                ),
                stacklevel=3,
            )
    else:
        seen = {o.name for o in outputs}
        missing = [name for name in wanted if name not in seen]
        if missing:
            raise ValueError(
                f"layers={list(wanted)!r}: {missing} never produce an output during a forward pass on an input of "
                f"shape {shape}, so they have no receptive field"
            )
        chosen = [o for o in outputs if o.name in wanted]
        for o in chosen:
            if o.calls > 1:
                raise ValueError(f"layers={list(wanted)!r}: {called_again_message(o.name)}")
            if o.container:
                raise ValueError(
                    f"layers={list(wanted)!r}: {o.name!r} returns a {o.container} of feature maps; probe one of them "
                    f"with probe_rf(model, input_shape, layer={o.name!r}, element=...)"
                )
            if o.after_cut:
                raise ProbeError(
                    f"the forward cuts the gradient, or runs a call the theoretical copy cannot replace, before the "
                    f"output of {o.name!r} ({o.after_cut}): a field read from gradients would miss the inputs on that "
                    f"path; remove the cut or list layers before it"
                )
            if o.misfit and len(o.shape) >= 3:
                raise ValueError(f"layers={list(wanted)!r}: {o.misfit}")
    chosen_names = {o.name for o in chosen}
    forwards.names = [o.name for o in chosen if o.same_as not in chosen_names]
    theoretical: dict[str, tuple] = {}  # name -> (centre support, geometry)
    rows = []
    fieldless: list[tuple[str, str]] = []  # rows whose centre reads nothing (dead units, a window over padding)
    for index, output in enumerate(chosen, start=1):
        if progress is not None:
            progress(index, len(chosen), output.name)
        if len(output.shape) < 3:  # a named layer without spatial axes: the probe's own error names candidates
            probe_rf(model, shape, "center", layer=output.name, mode=mode)
        center = tuple(n // 2 for n in output.grid)
        if output.same_as in theoretical:
            support, geometry = theoretical[output.same_as]
        else:
            row_request = request.theoretical().replaced(layer=output.name, layout=CHANNELS_FIRST)
            theory = ProbeGraph(model, row_request, captured=(inputs, captured[output.name]))
            theory.border_modes = list(output.border_modes)
            support = theory.support([center])
            box = box_of(support)
            flowed = None if output.flow is None or box is None else checked_flow(output.flow, [(center, box)], shape)
            # As probe_rf: after a pick by position the fields may differ from one position to another.
            checked = table_for_picks(theory, list(output.picks), {center: support}) if output.picks else None
            if isinstance(checked, str):
                geometry = (None,) * (len(shape) - 2)
            elif checked is not None:
                graph_on = forwards.graph_on(output.name)
                known = {center: support}
                measured = measure_geometry(theory, graph_on, known=known, table=checked, budget=Budget(shape))
                geometry = table_followed(measured, checked, shape)
            elif flowed is not None and not output.picks:
                geometry = flowed[0]
            else:
                graph_on = forwards.graph_on(output.name)
                geometry = measure_geometry(theory, graph_on, known={center: support}, budget=Budget(shape))
                # As for probe_rf: a geometry read near the centre must hold at the border (a roll, a wrap, a crop).
                geometry = border_followed(theory, geometry, output.grid, shape, {center: support})
        theoretical[output.name] = support, geometry
        if mode == "weights":
            # The row is probe_rf's own field of that layer: its draws, and its float64 redo of that layer alone
            # where float32 flushes (a redo of the whole table drew other inputs for every row).
            try:
                field = probe_rf(
                    model, shape, "center", layer=output.name, mode=mode, layout=output.layout, device=request.device
                )
            except (ProbeError, ValueError) as error:  # a dead centre; a head run per draw in a loop
                if wanted is not None:
                    raise
                fieldless.append((output.name, str(error)))
                continue
            rows.append(_row(output, center, cast(ReceptiveField, field).bounds, geometry, shape))
            continue
        bounds = box_of(support)
        if bounds is None:  # the probe's own error: raised for a row asked for by name, else the row is left out
            try:
                probe_rf(model, shape, "center", layer=output.name, mode=mode, layout=output.layout)
            except (ProbeError, ValueError) as error:
                if wanted is not None:
                    raise
                fieldless.append((output.name, str(error)))
                continue
        rows.append(_row(output, center, bounds, geometry, shape))
    if fieldless:
        warnings.warn(
            f"rf_table: {_left_out(len(fieldless))}, whose centre has no field "
            f"({_some(name for name, _ in fieldless)}); the first: {fieldless[0][1]}",
            stacklevel=3,
        )
    return rows


def _left_out(count: int) -> str:
    return "1 row is left out" if count == 1 else f"{count} rows are left out"


def _contradicted(chosen: list[_Output], outputs: list[_Output], grown: dict[str, str]) -> dict[str, str]:
    """The rows read in ``layout=`` alone whose output shape is that of a row whose module type says otherwise.

    A 4-axis output reads the same channels first or last: a ConvNeXt block that permutes back to channels first,
    read channels last, or a Swin block read channels first, would be silently wrong. Its shape is the evidence: a
    convolution's (channels first) or a ``Linear``'s (channels last) output of the same shape. By name: the reason.
    """
    shapes: dict[str, dict[tuple[int, ...], str]] = {CHANNELS_FIRST: {}, "last_axis": {}}
    for o in outputs:
        if o.known is not None:
            shapes[o.known].setdefault(o.shape, o.name)
    found = dict(grown)  # rows whose channels follow the input (:func:`_channels_that_follow_the_input`)
    for o in chosen:
        if not o.assumed:
            continue
        reading = checked_layout(o.layout)
        other = shapes["last_axis"] if reading == CHANNELS_FIRST else shapes[CHANNELS_FIRST]
        if reading in (CHANNELS_FIRST, CHANNELS_LAST) and o.shape in other:
            kind = "channels first" if reading == CHANNELS_LAST else "acting on its last axis"
            found[o.name] = f"{o.name} {o.shape} (like {other[o.shape]}, {kind})"
    for o in chosen:  # a row returning a left-out row's tensor is read as that row: left out too
        if o.same_as in found:
            found[o.name] = f"{o.name} (the output of {o.same_as})"
    return found


def _channels_that_follow_the_input(model: nn.Module, request: ProbeRequest, chosen: list[_Output]) -> dict[str, str]:
    """The rows read in ``layout=`` alone whose axis read as the channels follows the input's length.

    A row that no module type fixes (a custom module, a container) is read in the table's layout; read in the wrong
    one, its channels and a spatial axis swap places and the row is silently wrong. One forward pass without
    gradient on an input half as long on every axis decides: the channels keep their length, a spatial axis
    follows the input. A model that refuses that input leaves the rows as they are. By name: the reason.
    """
    assumed = [o for o in chosen if o.assumed]
    if not assumed:
        return {}
    shape = request.input_shape
    half = (1, shape[1], *(max(1, n // 2) for n in shape[2:]))
    copy = prepared_copy(model, "theoretical", request.dtype)
    outputs = outputs_by_module(copy, probe_inputs(request.theoretical().on(half)).detach(), "theoretical")
    found = {}
    for o in assumed:
        other = outputs.get(o.name)
        if not isinstance(other, torch.Tensor) or other.dim() != len(o.shape):
            continue
        axis = 1 if checked_layout(o.layout) == CHANNELS_FIRST else -1
        if other.shape[axis] != o.shape[axis]:
            found[o.name] = (
                f"{o.name} {o.shape} (the axis read as its channels follows the input: {o.shape[axis]} -> "
                f"{other.shape[axis]} on an input of {half})"
            )
    return found


def _some(names) -> str:
    names = list(names)
    return ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")


class _SharedForwards:
    """One forward pass of the theoretical copy per input shape, capturing the output of every chosen layer."""

    def __init__(self, model: nn.Module, wanted: list[str] | None, request: ProbeRequest):
        self.model, self.wanted, self.request = model, wanted, request  # the table's request: its layout and input
        self.names: list[str] | None = wanted
        self._runs: dict[tuple, tuple[torch.Tensor, dict[str, _Output], dict[str, torch.Tensor]]] = {}

    def run(self, shape: tuple[int, ...], *, record: bool = False, thin_axes: tuple[int, ...] = ()):
        """The forward pass on ``shape``: the input leaf, the outputs' descriptions and the captured outputs.

        On the user's input (``record``) a forward that raises raises; on another shape it keeps what it captured,
        and captures nothing where a convolution window along ``thin_axes`` covers only padding.
        """
        request = self.request.on(shape)
        return _forward_outputs(self.model, request, self.names, tolerant=not record, thin_axes=thin_axes)

    def graph_on(self, name: str):
        """Returns ``graph_on(shape)`` for :func:`measure_geometry`: the row's graph from the pass on ``shape``."""
        row_request = self.request.theoretical().replaced(layer=name, layout=CHANNELS_FIRST)

        def graph_on(shape: tuple[int, ...], thin_axes: tuple[int, ...] = ()) -> ProbeGraph | None:
            if (shape, thin_axes) not in self._runs:
                inputs, outputs, captured = self.run(shape, thin_axes=thin_axes)
                self._runs[shape, thin_axes] = (inputs, {o.name: o for o in outputs}, captured)
            inputs, outputs, captured = self._runs[shape, thin_axes]
            if name not in captured or captured[name].dim() != len(shape) or not captured[name].requires_grad:
                return None
            if 0 in captured[name].shape:  # a crop to fixed indices can leave no output position on a thin input
                return None
            if isinstance(checked_layout(outputs[name].layout), Tokens) and shape != self.request.input_shape:
                return None  # a token grid fits the user's input alone (see graph_factory)
            graph = ProbeGraph(self.model, row_request.on(shape), captured=(inputs, captured[name]))
            graph.fixed_size = list(outputs[name].fixed_size)
            return graph

        return graph_on


def _checked_layers(model: nn.Module, layers) -> list[str] | None:
    """Returns the requested names without duplicates, after checking that each names a submodule."""
    if layers is None:
        return None
    names = [layers] if isinstance(layers, str) else list(layers) if isinstance(layers, Sequence) else None
    if not names:
        raise ValueError(f"layers={layers!r} must be a non-empty sequence of submodule names, or None for all")
    for name in names:
        submodule(model, name)
    return list(dict.fromkeys(names))


def _forward_outputs(
    model: nn.Module,
    request: ProbeRequest,
    wanted: list[str] | None,
    *,
    tolerant: bool = False,
    thin_axes: tuple[int, ...] = (),
):
    """One forward pass of the theoretical copy, recording each submodule's first output in the order produced.

    Returns the input leaf, the outputs' descriptions, and a clone of every output a row may probe (a feature map,
    or a named layer), channels first (each row read in its layout, see :func:`_row_layout`): the clone keeps the
    value and graph of that moment, where a later in-place op (a residual ``out += x``) would otherwise turn the
    captured tensor into the sum. ``tolerant``: a forward that raises keeps what it captured before (a head that
    needs the original input size does not matter to the rows before it).
    """
    shape, layout, request = request.input_shape, request.layout, request.theoretical()
    outputs: dict[str, _Output] = {}
    captured: dict[str, torch.Tensor] = {}

    # Each output tensor by (id, version), so an in-place change (a residual ``out += x``) makes it another one;
    # ``alive`` keeps the ids from being reused during the pass.
    producers: dict[tuple[int, int], str] = {}
    alive: list[torch.Tensor] = []
    functions = probe_functions("theoretical", flow=not tolerant)  # the rows read the flow on the user's input
    # A feature map has the input's rank (tokens: 3, under a token layout): a recurrence's (N, L, C) beside an
    # image's rows, or an attention's weights, in a tuple output is none.
    map_rank = 3 if isinstance(checked_layout(layout), Tokens) else len(shape)

    def recorder(name: str):
        def record(module, args, output):
            if name in outputs:
                outputs[name] = dataclasses.replace(outputs[name], calls=outputs[name].calls + 1)
                return
            if isinstance(output, (tuple, list, dict)):
                elements = output.values() if isinstance(output, dict) else output
                holds_maps = any(torch.is_tensor(e) and e.dim() == map_rank and e.requires_grad for e in elements)
                outputs[name] = _Output(
                    name, type(module).__name__, (), False, container=type(output).__name__, holds_maps=holds_maps
                )
                return
            if not isinstance(output, torch.Tensor):
                return
            key = (id(output), _version(output))
            same_as = producers.get(key)
            if same_as is None and _keeps_the_field(module) and args and torch.is_tensor(args[0]):
                producer = outputs.get(producers.get((id(args[0]), _version(args[0])), ""))
                # Its input's field, read in the same layout: a 1 x 1 convolution of a map a row read channels last
                # (a Linear's) reads that map's channels as positions (its tokens as channels), another field.
                reading = _known_reading(module)
                if producer is not None and reading in (None, producer.layout):
                    same_as = producer.name
            producers.setdefault(key, same_as or name)
            alive.append(output)
            # An operator overload (aten.max_pool2d.default) runs below the twins that hide no pixel: like a cut, the
            # rows after it would read another field than the architecture's.
            overloads = [f"{call}, an operator overload the copy cannot replace" for call in functions.operator_calls]
            reasons = [*functions.cuts, *filter(None, [functions.cut_reason(output)]), *overloads]
            cut = ", ".join(dict.fromkeys(reasons)) or None
            row_layout, misfit = _row_layout(
                name, module, output, None if same_as is None else outputs.get(same_as), layout
            )
            spatial = output.dim() >= 3
            if misfit is None and spatial and row_layout == CHANNELS_FIRST and functions.flow is not None:
                if functions.flow.channels_first(output) is False:  # a batch norm over a transposed map (PANNs)
                    misfit = (
                        f"the output of layer {name!r} is {tuple(output.shape)}, whose dim 1 channels first would "
                        f"read as channels, but the forward moved a spatial axis of the input there (a permute or "
                        f"transpose before it), as probe_rf(..., layer={name!r}) says; pass layout='channels_last' if "
                        f"it is laid out (N, *spatial, C)"
                    )
            feature_map = None
            grid: tuple[int, ...] = ()
            if spatial and misfit is None:
                try:
                    feature_map = as_channels_first(output, row_layout, shape, name, batch=len(inputs))
                    grid = tuple(feature_map.shape[2:])
                except ValueError as error:
                    misfit = str(error)
            outputs[name] = _Output(
                name, type(module).__name__, tuple(output.shape), output.requires_grad, same_as, after_cut=cut,
                fixed_size=tuple(functions.fixed_size), border_modes=tuple(functions.border_modes),
                layout=row_layout, misfit=misfit, grid=grid,
                feature_map=spatial,
                known=_known_reading(module),
                flow=functions.flow.of(output) if functions.flow is not None and row_layout == CHANNELS_FIRST else None,
                picks=tuple(picks_on_path(functions.position_picks, output)) if output.requires_grad else (),
                compared=functions.comparison_behind(output),
            )  # fmt: skip
            if feature_map is not None and (wanted is None or name in wanted):
                captured[name] = feature_map.clone()

        return record

    if scripted := scripted_modules(model):
        where = scripted_subject(scripted)
        raise ValueError(
            f"rf_table reads every row on the theoretical copy, and {where} TorchScript (torch.jit.script or "
            f"trace), whose compiled functions it cannot replace by twins that hide no pixel: build the table on the "
            f"Python module it was scripted from"
        )
    copy = prepared_copy(model, "theoretical", request.dtype)
    named = {name: module for name, module in copy.named_modules() if name}
    # A module registered under a second name (self.alias = self.conv) is listed once, under its first; a layer
    # asked for by its second name is recorded under that one too.
    named.update({name: submodule(copy, name) for name in wanted or () if name not in named})
    for name, module in named.items():
        module.register_forward_hook(recorder(name))
    inputs = probe_inputs(request)
    if functions.flow is not None:
        functions.flow.start(inputs)
    dead: list[str] = []
    # (1, 1, 40) would reach a Conv2d unbatched, and the table show 1D rows of a 2D network on a shape probe_rf
    # refuses; a head run per sample of the right rank (a loop, a squeeze(0)) is left out as before, after its rows.
    handles = forward_checks(copy, [], quantized=False, spatial=len(shape) - 2)
    try:
        with functions, dead_windows_watched(copy, thin_axes, dead):
            copy(inputs.clone())  # a forward may scale its input in place: not the leaf itself
    except Unbatched as error:
        raise rank_error(copy, error.module, shape) from None
    except Exception as error:
        if not tolerant:
            raise forward_error(copy, shape, error) from error
    finally:
        for handle in handles:
            handle.remove()
    calls = list(dict.fromkeys(functions.operator_calls))
    if calls and not outputs and all(call.startswith(("aten.", "prims.")) for call in calls):
        raise ProbeError(
            f"rf_table: the forward calls aten's operator overloads on values of the input ({', '.join(calls[:4])}"
            f"{', ...' if len(calls) > 4 else ''}: a torch.export or make_fx graph), not its submodules' forwards, "
            f"so no row can be read off them, and the theoretical copy cannot replace the activations and pools "
            f"below the functions it knows; build the table on the eager module the graph was made from"
        )
    return inputs, list(outputs.values()), {} if dead else captured


def _version(tensor: torch.Tensor) -> int:
    """How often ``tensor`` was changed in place; an inference-mode tensor keeps no count (and carries no field)."""
    return 0 if tensor.is_inference() else tensor._version


def _row(output: _Output, center, bounds, geometry, shape) -> LayerField:
    lengths = shape[2:]
    return LayerField(
        name=output.name,
        module_type=output.module_type,
        output_shape=(1, *output.shape[1:]),
        position=center,
        size=tuple(last - first + 1 for first, last in bounds),
        full_size=tuple(None if g is None else g.size for g in geometry),
        stride=tuple(None if g is None else g.stride for g in geometry),
        offset=tuple(None if g is None else g.offset for g in geometry),
        bounds=bounds,
        covers_input=all(b == (0, n - 1) for b, n in zip(bounds, lengths)),
        layout=str(output.layout),
    )
