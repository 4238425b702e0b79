"""The geometry carried along the forward pass: each tensor's (r, S, P) per axis, from the probe's input onwards.

The probe's theoretical forward already runs every function of the model under the probe's function mode. This
module lets the mode carry, beside each tensor that depends on the input, the algebra of its fields along each
spatial axis (:class:`~rf_callback.core.geometry.AxisGeometry`): a convolution or pooling composes it with its
kernel, stride, padding and dilation; an activation, a normalisation of the linearised copy, a slice of channels
keep it (of a concatenation's channels: the hull of the branches it keeps); a sum, a product or a concatenation of
channels takes the hull of its operands' fields where their strides agree; a reduction along a whole spatial axis (a
global pooling, a squeeze-and-excitation gate) makes every later field span that axis, whatever its length (the axis
then carries that call's name). Any other function that takes such a tensor ends the flow: its output carries
nothing, and the geometry is left to the measurement on other inputs (:mod:`~rf_callback.core.geometry_probe`). What
the flow gives is only a candidate: the probe checks it against the fields it measured before it reports it.
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from rf_callback.core.geometry import AxisGeometry, consistent

AxisFlow = AxisGeometry | str  # an AxisGeometry, or the name of the call that made the axis whole
Flow = tuple[AxisFlow, ...]  # per spatial axis of a channels-first tensor (N, C, *spatial)


@dataclass(frozen=True)
class _Periodic:
    """Fields that follow one (r, S, P) per residue class of the index: ``[i*S - P_c, i*S - P_c + r_c - 1]``.

    ``c = i % period``. A nearest-neighbour upsampling by ``k`` gives ``k`` classes (outputs ``k*m .. k*m + k - 1``
    all see input ``m``'s field); a later strided layer can merge them back into one, as HRNet's fusions do. With
    one class it is an :class:`AxisGeometry`.
    """

    stride: int
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    def field(self, index: int) -> tuple[int, int]:
        """The unclipped first and last input index of output ``index``'s field."""
        c = index % len(self.offsets)
        first = index * self.stride - self.offsets[c]
        return first, first + self.sizes[c] - 1

    def simplified(self) -> _Periodic:
        """The same fields with as few classes as they need (one, where every class is alike)."""
        period = len(self.offsets)
        for divisor in range(1, period):
            if period % divisor == 0 and all(
                (self.offsets[c], self.sizes[c]) == (self.offsets[c % divisor], self.sizes[c % divisor])
                for c in range(period)
            ):
                return _Periodic(self.stride, self.offsets[:divisor], self.sizes[:divisor])
        return self

    def geometry(self) -> AxisGeometry | None:
        """The (r, S, P) of these fields where one class describes them all, else None."""
        return AxisGeometry(self.sizes[0], self.stride, self.offsets[0]) if len(self.offsets) == 1 else None


_Axis = _Periodic | str  # what the flow carries per axis: fields, or the name of the call that made the axis whole

# Whether probes read the flow (tests of the measured geometry turn it off).
ENABLED = True

_CONVS = {"conv1d": 1, "conv2d": 2, "conv3d": 3}
_MAX_POOLS = {"max_pool1d": 1, "max_pool2d": 2, "max_pool3d": 3}
_AVG_POOLS = {"avg_pool1d": 1, "avg_pool2d": 2, "avg_pool3d": 3}
_ADAPTIVE_POOLS = {f"adaptive_{kind}_pool{n}d": n for kind in ("avg", "max") for n in (1, 2, 3)}
# Functions that act on each position alone (the linearised copy's activations and normalisations are identities).
_POINTWISE = frozenset(
    {
        "relu", "relu6", "leaky_relu", "gelu", "silu", "sigmoid", "tanh", "elu", "selu", "celu", "hardswish",
        "hardsigmoid", "hardtanh", "mish", "softplus", "prelu", "softsign", "threshold", "logsigmoid", "tanhshrink",
        "hardshrink", "softshrink", "batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm",
        "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "clone",
        "contiguous", "to", "float", "double", "half", "bfloat16", "type_as", "neg", "__neg__", "abs", "exp",
        "sqrt", "rsqrt", "square", "clamp", "clip", "clamp_min", "clamp_max", "detach_", "requires_grad_",
    }
)  # fmt: skip
# Elementwise functions of several tensors (broadcast): the hull of their operands' fields.
_ELEMENTWISE = frozenset(
    {
        "add", "sub", "mul", "div", "true_divide", "multiply", "subtract", "maximum", "minimum", "where", "addcmul",
        "addcdiv", "pow", "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__",
        "__rmul__", "__imul__", "__truediv__", "__rtruediv__", "__itruediv__", "__pow__",
    }
)  # fmt: skip
# Elementwise calls that a constant operand's zeros cut (``x * window``, ``c / x``, ``x ** 0``), and which of their
# operands can cut (by position; a divisor's zeros or an added term's cut nothing): where the zeros move along an
# axis, the fields there are no translates of each other (a Hann window's 0 hides input 0 from output 0).
_CUT_BY_ZEROS = {
    **dict.fromkeys(("mul", "multiply", "__mul__", "__rmul__", "__imul__", "pow", "__pow__"), (0, 1)),
    **dict.fromkeys(("div", "true_divide", "__truediv__", "__itruediv__"), (0,)),
    "__rtruediv__": (1,),  # other / self
    "addcmul": (1, 2),  # input + value * tensor1 * tensor2
    "addcdiv": (1,),  # input + value * tensor1 / tensor2
}
# Their operands' keywords, by position, where they are not (input, other)
_OPERAND_KEYWORDS = {
    "pow": ("input", "exponent"),
    "addcmul": ("input", "tensor1", "tensor2"),
    "addcdiv": ("input", "tensor1", "tensor2"),
}
_REDUCTIONS = frozenset({"mean", "sum", "amax", "amin", "max", "min", "std", "var", "logsumexp", "norm"})
_SPLITS = frozenset({"split", "chunk", "tensor_split", "split_with_sizes", "unbind"})
# Calls that keep every element in place where the shape stays (a permute or transpose of equal dims does not).
_RESHAPES = frozenset({"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze"})


class GeometryFlow:
    """Carries each input-dependent tensor's flow along one forward pass.

    A tensor's flow comes with the dims its spatial axes lie at: ``(2, 3)`` for ``(N, C, H, W)``, ``(1, 2)`` once
    permuted to ``(N, H, W, C)`` (a ConvNeXt block's layer norm and linear layers act on its last dim, the channels).
    Tensors are held by weak reference: the flow keeps none alive.
    """

    def __init__(self):
        self._tags: dict[int, tuple[weakref.ref, _Tag]] = {}
        # Tensors whose channels hold different fields (a concatenation of branches of other fields, and what keeps
        # its channels apart after it), by id: their tag is the hull over the channels, which a slice of channels
        # need not keep. Straight out of the concatenation they keep its segments (dim, then channels and tag per
        # operand), from which a slice's fields are the hull of the segments it keeps.
        self._mixed: dict[int, tuple[weakref.ref, _Segments | None]] = {}
        # Boolean masks computed from the input or the weights, by id: the probe's function mode shares its own.
        self.masks: Mapping[int, torch.Tensor] = {}
        # Per axis, the runs of leading and trailing positions whose field is empty (a zero padding of a feature map
        # reads nothing there, though the span the flow composes for it reaches into the input), by id; tensors
        # without such positions have no entry.
        self._empty: dict[int, tuple[weakref.ref, _Borders]] = {}
        self._input_lengths: tuple[int, ...] = ()

    def start(self, inputs: torch.Tensor) -> None:
        """Gives the probe's input ``(N, C, *spatial)`` the identity geometry on every axis.

        Args:
            inputs: the input leaf.
        """
        n_axes = inputs.dim() - 2
        self._input_lengths = tuple(inputs.shape[2:])
        self._set(inputs, ((_Periodic(1, (0,), (1,)),) * n_axes, tuple(range(2, 2 + n_axes))))

    def of(self, tensor) -> Flow | None:
        """The flow of a channels-first ``tensor``, or ``None`` where the flow ended before it.

        Args:
            tensor: a tensor of the forward pass, ``(N, C, *spatial)``.

        Returns:
            Per spatial axis, its geometry, or the name of the call that made its fields span the whole axis;
            ``None`` if unknown, if ``tensor`` does not depend on the input, or if its axes are laid out otherwise.
        """
        tag = self._tag(tensor)
        if tag is None or tag[1] != tuple(range(2, tensor.dim())):
            return None
        flow: list[AxisFlow] = []
        for axis in tag[0]:
            geometry = axis if isinstance(axis, str) else axis.simplified().geometry()
            if geometry is None:
                return None  # fields of several classes: no (r, S, P) to offer
            flow.append(geometry)
        return tuple(flow)

    def spatial_dims(self, tensor) -> tuple[int, ...] | None:
        """The dims of ``tensor`` that hold the input's spatial axes, where the flow reached it (else ``None``)."""
        tag = self._tag(tensor)
        return None if tag is None else tuple(tag[1])

    def channels_first(self, tensor) -> bool | None:
        """Whether ``tensor``'s dim 1 holds no spatial axis, as the flow followed them (through permutes).

        Args:
            tensor: a tensor of the forward pass.

        Returns:
            True or False where the flow reached ``tensor``; ``None`` where it ended before.
        """
        tag = self._tag(tensor)
        return None if tag is None else 1 not in tag[1]

    def _tag(self, tensor) -> _Tag | None:
        if not isinstance(tensor, torch.Tensor):
            return None
        entry = self._tags.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def _set(self, tensor: torch.Tensor, tag: _Tag | None, empty: _Borders | None = None) -> None:
        if tag is None:
            self._tags.pop(id(tensor), None)
        else:
            self._tags[id(tensor)] = (weakref.ref(tensor), tag)
        if tag is None or empty is None:
            self._empty.pop(id(tensor), None)
        else:
            self._empty[id(tensor)] = (weakref.ref(tensor), empty)

    def _empty_of(self, tensor) -> _Borders | None:
        """Per axis, the leading and trailing positions of ``tensor`` whose field is empty; None where none is."""
        entry = self._empty.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def _empty_after(self, name: str, args, kwargs, result: torch.Tensor, dependent, tag: _Tag) -> _Borders | None:
        """The empty border positions of ``result``, tagged ``tag`` by the call's rule.

        Raises:
            _Inexact: a field at the border is not what the flow composes for it where that matters: an end of the
                composed span inside the input that an empty position gave (``F.pad(valid_conv(x)) + other(x)``:
                the padded positions read nothing, the hull only the other branch), or an empty field whose span
                lies inside the input.
        """
        axes, dims = tag
        first = args[0] if args else kwargs.get("input")
        if _is_layer(name, len(dims)) and (source := self._tag(first)) is not None:
            layers = cast(list, _layers(name, args, kwargs, len(dims)))  # not None: _tags_of composed them
            empty = self._empty_of(first) or ((0, 0),) * len(dims)
            return _normalised(
                [
                    (0, 0) if isinstance(axis, str) else _layer_empty(axis, layer, ends, n, m, length)
                    for axis, layer, ends, n, m, length in zip(
                        source[0], layers, empty, first.shape[2:], result.shape[2:], self._input_lengths
                    )
                ]
            )
        known = [self._empty_of(t) for t in dependent]
        if all(e is None for e in known):
            return None
        if _base(name) in _ELEMENTWISE and name != "where":
            operands = [(cast(_Tag, self._tag(t))[0], e or ((0, 0),) * len(axes)) for t, e in zip(dependent, known)]
            return _hull_empty(axes, operands, [result.shape[d] for d in dims], self._input_lengths)
        if len(dependent) > 1:  # cat, where: operands empty alike, or no rule
            if len(set(known)) == 1:
                return known[0]
            raise _Inexact
        if first is not dependent[0] or known[0] is None:
            raise _Inexact
        runs = []
        for axis, d, e, (lead, trail) in zip(axes, cast(_Tag, self._tag(first))[1], dims, known[0]):
            size, kept = first.shape[d], result.shape[e]
            if isinstance(axis, str) or kept == size:
                runs.append((0, 0) if isinstance(axis, str) else (lead, trail))
            elif name == "__getitem__" and kept < size:  # x[..., :n], the one crop the rules follow: the runs left
                lead = min(lead, kept)
                runs.append((lead, 0 if lead == kept else max(0, trail - (size - kept))))
            else:
                raise _Inexact  # an upsampling of a map with empty border positions: no rule follows them
        return _normalised(runs)

    def after(self, name: str, args: tuple, kwargs: dict, result: Any) -> None:
        """Gives ``result`` the flow of the call ``name(*args, **kwargs)``, or none where the rules do not cover it.

        Args:
            name: the function's name.
            args: its positional arguments.
            kwargs: its keyword arguments.
            result: what it returned.
        """
        target = args[0] if writes_in_place(name) and args and isinstance(args[0], torch.Tensor) else None
        before = self._tag(target)
        if target is not None and name in _PARTIAL_WRITES:
            self._forget_storage(target)
        elif target is not None and target._base is not None:
            # A whole view written in place (x += shortcut, x a channel slice): the view gets its flow from the
            # call's rule below; the tensor it looks into, and its other views, have changed in part.
            self._forget_storage(target, keep=target)
        operands = [*args, *kwargs.values()]
        if name in ("cat", "concat", "concatenate") and args and isinstance(args[0], (list, tuple)):
            operands = [*args[0], *args[1:], *kwargs.values()]
        dependent = [t for t in operands if isinstance(t, torch.Tensor) and (t.requires_grad or self._tag(t))]
        if not dependent:
            return
        results = result if isinstance(result, (tuple, list)) else (result,)
        try:
            tags = self._tags_of(name, args, kwargs, result, dependent)
            mixed = self._mixed_results(name, args, kwargs, dependent, results)
        except (TypeError, ValueError, IndexError, AttributeError):  # arguments spelled in a way the rules do not read
            tags, mixed = None, [None] * len(results)
        if tags is not None and _selects_channels(name, args, kwargs) and self._segments(args[0]) is not None:
            # which channels it keeps, and so which fields: the segments it keeps tell, where they are known
            tags = self._selected(name, args, kwargs, results)
        for index, item in enumerate(results):
            if isinstance(item, torch.Tensor):
                tag = None if tags is None or index >= len(tags) else tags[index]
                empty = None
                if tag is not None:
                    try:
                        empty = self._empty_after(name, args, kwargs, item, dependent, tag)
                    except (_Inexact, TypeError, ValueError, IndexError, AttributeError):  # as _tags_of: no flow
                        tag = None
                self._set(item, tag, empty)
                segments = mixed[index] if index < len(mixed) else None
                if segments is None:
                    self._mixed.pop(id(item), None)
                else:
                    self._mixed[id(item)] = (weakref.ref(item), segments if isinstance(segments, tuple) else None)
        if target is not None and target._base is None and name not in _PARTIAL_WRITES and self._tag(target) != before:
            # A tensor written whole with other fields (y += branch): its views taken before (a = y[:, :2]) read
            # the new values, whose fields no longer are the ones they were given.
            self._forget_storage(target, keep=target)

    def _forget_storage(self, target: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Ends the flow of every tensor that shares ``target``'s memory, after a write into part of it.

        A write into part of a tensor (``y[..., -3:] = 0``, a view's ``copy_``) changes the fields there, which no
        rule here follows, and so does every view of that memory, taken before the write or after; ``keep`` (a view
        written whole, whose own flow the call's rule gives) keeps its flow.
        """
        memory = target.untyped_storage().data_ptr()
        for key, (reference, _) in list(self._tags.items()):
            tensor = reference()
            if tensor is None or (tensor is not keep and tensor.untyped_storage().data_ptr() == memory):
                self._tags.pop(key, None)
                self._empty.pop(key, None)

    def _segments(self, tensor) -> _Segments | bool | None:
        """A mixed tensor's segments (``False`` where unknown); ``None`` if its channels hold one field."""
        entry = self._mixed.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None
        if entry is None or entry[0]() is not tensor:
            return None
        return entry[1] or False

    def _mixed_results(self, name: str, args, kwargs, dependent, results) -> list[_Segments | bool | None]:
        """Per result, its segments, ``False`` where its channels may hold different fields unknown, else None."""
        if name in ("cat", "concat", "concatenate"):
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            operands = [t for t in args[0] if isinstance(t, torch.Tensor)]
            tags = [self._tag(t) for t in operands]
            if any(self._segments(t) is not None for t in operands):
                return [False]
            if len(set(tags)) == 1:
                return [None]
            if None in tags or not isinstance(dim, int):
                return [False]
            return [(dim % results[0].dim(), tuple((t.shape[dim], tag) for t, tag in zip(operands, tags)))]
        if any(self._segments(t) is not None for t in dependent) and not _mixes_all_channels(name, args, kwargs):
            return [False] * len(results)
        return [None] * len(results)

    def _selected(self, name: str, args, kwargs, results) -> list[_Tag | None] | None:
        """The tags of the pieces a slice or split keeps of a concatenation's channels: the hull of their segments."""
        segments = self._segments(args[0])
        if not isinstance(segments, tuple):
            return None
        dim, parts = segments
        if name in _SPLITS:
            split_dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
            if not isinstance(split_dim, int) or split_dim % args[0].dim() != dim:
                return None
            starts = itertools.accumulate((r.shape[dim] for r in results), initial=0)
            ranges = [(start, start + r.shape[dim]) for start, r in zip(starts, results)]
        else:
            kept = _channel_range(args[1], args[0], dim)
            if kept is None:
                return None
            ranges = [kept]
        ends = list(itertools.accumulate(count for count, _ in parts))
        pieces: list[_Tag | None] = []
        for (first, stop), result in zip(ranges, results):
            overlapping = [
                (tag, result.shape) for (count, tag), end in zip(parts, ends) if end - count < stop and first < end
            ]
            pieces.append(_hull_of(overlapping, result.shape) if overlapping else None)
        return pieces

    def _tags_of(self, name: str, args, kwargs, result, dependent: list[torch.Tensor]) -> list[_Tag | None] | None:
        first = args[0] if args else kwargs.get("input")
        source = self._tag(first)
        if name in _SPLITS:
            dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
            keeps = source is not None and _is_feature_dim(dim, first, source[1]) and name != "unbind"
            return [source] * len(result) if keeps else None
        if isinstance(result, (tuple, list)):  # max_pool with indices, max along a dim: the values
            result = result[0]
        if not isinstance(result, torch.Tensor):
            return None
        if name in ("cat", "concat", "concatenate"):
            hull = _hull(self, dependent, result)
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            return [hull] if hull is not None and _is_feature_dim(dim, result, hull[1]) else None
        if name == "where":
            return _where_tags(self, args, kwargs, result, dependent)
        if _base(name) in _ELEMENTWISE:
            hull = _hull(self, dependent, result)
            if hull is not None and zeros_move(name, args, kwargs, dependent, hull[1], result):
                return None
            return [hull]
        if source is None or len(dependent) > 1 or first is not dependent[0] or result.dim() != first.dim():
            return None
        flow, dims = source
        if _base(name) in _POINTWISE or (name in _RESHAPES and result.shape == first.shape):
            return [source] if result.shape == first.shape else None
        if name == "__getitem__":
            return [source] if _keeps_positions(args[1], first.dim(), dims) else None
        if name in ("permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis"):
            order = permutation(name, args[1:], kwargs, first.dim())
            return [(flow, tuple(order.index(d) for d in dims))] if order[0] == 0 else None
        if name == "linear" or _by_fixed_matrix(name, args):  # acts on the last dim
            return [source] if first.dim() - 1 not in dims else None
        if name in _REDUCTIONS:
            return [_reduced(name, source, args, kwargs, first)]
        n_axes = len(dims)
        if dims != tuple(range(2, 2 + n_axes)) or first.dim() != n_axes + 2:
            return None  # the layers below read (N, C, *spatial)
        if _is_layer(name, n_axes):
            layers = _layers(name, args, kwargs, n_axes)
            return None if layers is None else [(_composed(flow, layers), dims)]
        if _ADAPTIVE_POOLS.get(name) == n_axes and all(n == 1 for n in result.shape[2:]):
            return [((name,) * n_axes, dims)]
        if name == "interpolate" and _argument(args, kwargs, 3, "mode", "nearest") in ("nearest", "nearest-exact"):
            scale = _argument(args, kwargs, 2, "scale_factor", None)
            if scale is not None and not _argument(args, kwargs, 5, "recompute_scale_factor", None):
                # output i reads input floor(i / scale): i // k only where the factor is the whole k
                if any(float(f) != int(f) for f in (scale if isinstance(scale, (tuple, list)) else (scale,))):
                    return None
            return _upsampled(flow, dims, first, result)
        return None


_Tag = tuple[tuple[_Axis, ...], tuple[int, ...]]  # a tensor's fields per axis, and the dims its spatial axes lie at
_Borders = tuple[tuple[int, int], ...]  # per axis, how many leading and trailing positions have an empty field


class _Inexact(Exception):
    """A field at the border of a map is not the one the flow composes for it (see GeometryFlow._empty_after)."""


def _normalised(empty: Sequence[tuple[int, int]]) -> _Borders | None:
    return None if all(ends == (0, 0) for ends in empty) else tuple(empty)


def _span_hull(spans: Sequence[tuple[int, int]]) -> tuple[int, int]:
    return min(first for first, _ in spans), max(last for _, last in spans)


def _border_field(spans: Sequence[tuple[int, int]], read: Sequence[tuple[int, int]], length: int) -> bool:
    """Whether a position whose span is the hull of ``spans`` but which reads only ``read``'s fields is empty.

    Raises:
        _Inexact: an end of the span inside the input (of ``length``) is not the field's: it reads nothing though
            its span lies inside, or an end inside comes from a position that reads nothing.
    """
    first, last = _span_hull(spans)
    if not read:
        if first >= 0 and last <= length - 1:
            raise _Inexact
        return True
    read_first, read_last = _span_hull(read)
    if (first >= 0 and first != read_first) or (last <= length - 1 and last != read_last):
        raise _Inexact
    return False


def _runs(empty: dict[int, bool], count: int) -> tuple[int, int]:
    """The leading and trailing runs of empty positions among ``count``, from each border position's emptiness.

    Raises:
        _Inexact: an empty position between positions that read something.
    """
    lead = next((o for o in range(count) if not empty.get(o, False)), count)
    trail = 0 if lead == count else next(o for o in range(count) if not empty.get(count - 1 - o, False))
    if sum(empty.values()) != lead + trail:
        raise _Inexact
    return lead, trail


def _layer_empty(
    axis: _Periodic, layer: tuple[int, int, int, int], empty: tuple[int, int], size: int, out_size: int, length: int
) -> tuple[int, int]:
    """The empty runs of a layer's output along one axis, checking the border outputs' fields against their spans.

    ``size`` and ``out_size`` are the layer's input and output lengths, ``length`` the probe's input's; output
    ``o`` reads the positions ``o*stride - padding + t*dilation`` that lie inside its input and are not empty.
    """
    kernel, stride, padding, dilation = layer
    reach = (kernel - 1) * dilation
    if (
        empty == (0, 0)
        and len(axis.offsets) == 1
        and padding <= reach
        and (out_size - 1) * stride - padding < size
        and axis.field(size)[1] > length - 1
    ):
        # Every window reads a position, and its padded taps' spans lie beyond the input on their side (at one
        # class the fields move away from the border; after the last position's, unless a crop of the end dropped
        # positions whose spans lie inside): no border output's span has an end inside that its field lacks.
        return 0, 0
    first_read, last_read = empty[0], size - 1 - empty[1]

    def is_empty(o: int) -> bool | None:  # None: every tap reads
        taps = range(o * stride - padding, o * stride - padding + reach + 1, dilation)
        read = [axis.field(t) for t in taps if first_read <= t <= last_read]
        return None if len(read) == kernel else _border_field([axis.field(t) for t in taps], read, length)

    found: dict[int, bool] = {}
    for order in (range(out_size), range(out_size - 1, -1, -1)):
        for o in order:
            if o in found or (kind := is_empty(o)) is None:
                break
            found[o] = kind
    return _runs(found, out_size)


def _hull_empty(
    axes: tuple[_Axis, ...], operands: list[tuple[tuple[_Axis, ...], _Borders]], sizes: list[int], lengths
) -> _Borders | None:
    """The empty runs of an elementwise function's result (the hull of its operands' fields), checked as a layer's.

    Each operand reads inside its box (the positions clear of its empty runs on every axis), so which operands a
    position reads depends on all its indices: along each axis, every index is checked with every pattern of the
    other axes' boxes (at a corner of ``a(x) + pad_rows(b(x)) + pad_columns(c(x))``, ``a`` alone). The result's
    empty positions are those outside every box, which must themselves make one box (one operand's holding the
    others').

    Raises:
        _Inexact: as :func:`_border_field`, or the boxes' union is no box.
    """
    empties = [empty for _, empty in operands]
    if len(set(empties)) == 1:
        return _normalised([(0, 0) if isinstance(axis, str) else ends for axis, ends in zip(axes, empties[0])])
    if any(isinstance(axis, str) and len({e[a] for e in empties}) > 1 for a, axis in enumerate(axes)):
        raise _Inexact
    boxes = [[(e[a][0], size - 1 - e[a][1]) for a, size in enumerate(sizes)] for e in empties]
    union = _union_box(boxes)
    # Per axis and index, which operands' boxes hold it; per axis, the patterns that occur.
    inside = [
        [tuple(box[a][0] <= o <= box[a][1] for box in boxes) for o in range(size)] for a, size in enumerate(sizes)
    ]
    patterns = [sorted(set(along)) for along in inside]
    for a, (axis, length) in enumerate(zip(axes, lengths)):
        if isinstance(axis, str):
            continue
        others = itertools.product(*(patterns[b] for b in range(len(axes)) if b != a))
        # Per combination of the other axes' patterns, which operands' boxes hold those indices (along a 1D map's
        # one axis, the product of no other axes is one empty combination: every operand's).
        for other in [tuple(map(all, zip(*combination))) or (True,) * len(boxes) for combination in others]:
            for o, here in enumerate(inside[a]):
                if all(here) and all(other):
                    continue  # read by every operand: the hull of their fields, exact as each is
                reads = [i for i, flag in enumerate(here) if flag and other[i]]
                if not reads:
                    continue  # empty in every operand: each one's span leaves the input where its runs were made
                spans = [cast(_Periodic, own[a]).field(o) for own, _ in operands]
                _border_field(spans, [spans[i] for i in reads], length)
    return _normalised([(box[0], size - 1 - box[1]) for box, size in zip(union, sizes)])


def _union_box(boxes: list[list[tuple[int, int]]]) -> list[tuple[int, int]]:
    """The union of boxes (per axis, inclusive first and last index) where it is one box.

    One box holding the others, or boxes alike on every axis but one, along which they join without a gap (in 1D,
    ``F.pad(x, (0, 4)) + F.pad(x, (2, 2))``).

    Raises:
        _Inexact: the union is no box, or a box is empty.
    """
    if any(first > last for box in boxes for first, last in box):
        raise _Inexact
    for box in boxes:
        if all(first <= other[0] and other[1] <= last for o in boxes for (first, last), other in zip(box, o)):
            return box
    differ = [a for a in range(len(boxes[0])) if len({box[a] for box in boxes}) > 1]
    if len(differ) != 1:
        raise _Inexact
    (axis,) = differ
    intervals = sorted(box[axis] for box in boxes)
    first, last = intervals[0]
    for start, end in intervals[1:]:
        if start > last + 1:
            raise _Inexact
        last = max(last, end)
    return [(first, last) if a == axis else ends for a, ends in enumerate(boxes[0])]


_Segments = tuple[int, tuple[tuple[int, "_Tag | None"], ...]]  # a concatenation's dim, and each operand's size and tag


def _base(name: str) -> str:
    """The name without the trailing underscore of an in-place variant (``add_`` is ``add``; ``__iadd__`` stays)."""
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


def _expanded(index, n_dims: int) -> list:
    """``index`` as a list, its ``...`` replaced by the whole slices it stands for."""
    index = list(index) if isinstance(index, tuple) else [index]
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index[at : at + 1] = [slice(None)] * (n_dims - len(index) + 1)
    return index


def _selects_channels(name: str, args, kwargs) -> bool:
    """Whether the call keeps only some channels of its input (``x[:, :3]``, a split): unsure is yes."""
    if name in _SPLITS:
        return True
    if name != "__getitem__" or len(args) < 2 or not isinstance(args[0], torch.Tensor):
        return False
    tensor, index = args[0], _expanded(args[1], args[0].dim())
    return any(
        not (isinstance(i, slice) and i.start in (None, 0) and i.step in (None, 1) and (i.stop or n) >= n)
        for d, (i, n) in enumerate(zip(index, tensor.shape))
        if d > 0  # a slice along a spatial dim is the tag's business; along a channel dim it picks fields
    )


def _channel_range(index, tensor: torch.Tensor, dim: int) -> tuple[int, int] | None:
    """The channels ``tensor[index]`` keeps along ``dim``, ``(first, stop)``, where it slices them by step 1."""
    listed = list(index) if isinstance(index, tuple) else [index]
    if listed.count(Ellipsis) > 1 or not all(isinstance(i, slice) or i is Ellipsis for i in listed):
        return None
    index = _expanded(index, tensor.dim())
    if dim >= len(index):
        return 0, tensor.shape[dim]
    first, stop, step = index[dim].indices(tensor.shape[dim])
    return (first, stop) if step == 1 and stop > first else None


def _by_fixed_matrix(name: str, args) -> bool:
    """Whether the call is ``x @ w`` of a 2-D ``w`` without gradient: a linear layer's product on the last dim.

    The copy's parameters carry no gradient, and an input-dependent ``w`` (which does) makes the flow's
    ``dependent`` hold two tensors, which ends the flow before this is asked.
    """
    return (
        name in ("matmul", "__matmul__")
        and len(args) == 2
        and isinstance(args[1], torch.Tensor)
        and args[1].dim() == 2
        and not args[1].requires_grad
    )


def _mixes_all_channels(name: str, args, kwargs) -> bool:
    """Whether each channel of the call's output reads every channel of its input: a dense convolution or linear."""
    if name == "linear":
        return True
    return name in _CONVS and _argument(args, kwargs, 6, "groups", 1) == 1


def _is_feature_dim(dim, tensor: torch.Tensor, spatial: tuple[int, ...]) -> bool:
    """Whether ``dim`` is neither the batch nor a spatial dim of ``tensor``: the channels."""
    if not isinstance(dim, int) or isinstance(dim, bool):
        return False
    dim %= tensor.dim()
    return dim != 0 and dim not in spatial


def permutation(name: str, dims, kwargs, n_dims: int) -> list[int]:
    """The permutation of ``permute(*dims)``, ``transpose(d0, d1)`` or ``movedim(source, destination)``.

    Args:
        name: ``"permute"``, ``"movedim"`` (``moveaxis``), or ``"transpose"`` (``swapaxes``, ``swapdims``).
        dims: the call's arguments after the tensor.
        kwargs: its keyword arguments (a permute's ``dims=``).
        n_dims: the tensor's number of dims.

    Returns:
        The order: new dim ``i`` is old dim ``order[i]``.

    Raises:
        ValueError: the dims are no permutation.
    """
    if name == "permute":
        dims = kwargs.get("dims", dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims)
        order = [int(d) % n_dims for d in dims]
        if sorted(order) != list(range(n_dims)):
            raise ValueError("not a permutation")
        return order
    if name in ("movedim", "moveaxis"):
        source, destination = (dims[0], dims[1]) if len(dims) >= 2 else (kwargs["source"], kwargs["destination"])
        sources, destinations = ([int(d) % n_dims for d in (d if isinstance(d, (tuple, list)) else (d,))]
                                 for d in (source, destination))  # fmt: skip
        if len(set(sources)) != len(sources) or len(set(destinations)) != len(sources):
            raise ValueError("not a permutation")
        order = [d for d in range(n_dims) if d not in sources]
        for target, moved in sorted(zip(destinations, sources)):
            order.insert(target, moved)
        return order
    first, second = (int(d) % n_dims for d in dims[:2])
    order = list(range(n_dims))
    order[first], order[second] = second, first
    return order


def _keeps_positions(index, n_dims: int, spatial: tuple[int, ...]) -> bool:
    """Whether ``x[index]`` keeps every sample and every position at its index: ``x[:, a:b]``, ``x[..., :n]``.

    Channels may be sliced at will; a spatial axis only from its start, step 1 (so output ``i`` is still input
    ``i``). Integers, ``None`` and tensors as indices change the axes: no.
    """
    index = list(index) if isinstance(index, tuple) else [index]
    if index.count(Ellipsis) > 1 or not all(isinstance(i, slice) or i is Ellipsis for i in index):
        return False
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index[at : at + 1] = [slice(None)] * (n_dims - len(index) + 1)
    if len(index) > n_dims or (index and index[0] != slice(None)):
        return False
    return all(i.start in (None, 0) and i.step in (None, 1) for d, i in enumerate(index) if d in spatial)


def _where_tags(flow: GeometryFlow, args, kwargs, result, dependent: list[torch.Tensor]) -> list[_Tag | None] | None:
    """The tag of ``torch.where(condition, input, other)`` (``input.where(condition, other)``).

    A condition made from the input or the weights (a mask, ``x > 0``; ``flow.masks`` holds them) may pick either
    operand at any position: the hull of their fields, as the theoretical copy reads both (the condition's own
    values pass no gradient). A condition that nothing decides picks one operand per position: where it picks the
    same one everywhere, that operand's field; where it picks by position (even rows from one branch, odd rows from
    another), the field depends on the position, which no single (r, S, P) may describe.
    """
    condition, picks = where_operands(args, kwargs)
    if not isinstance(condition, torch.Tensor) or id(condition) in flow.masks:
        return [_hull(flow, [t for t in dependent if any(t is p for p in picks)], result)]
    chosen = picks[0] if bool(condition.all()) else picks[1] if not bool(condition.any()) else None
    if not isinstance(chosen, torch.Tensor) or not any(chosen is t for t in dependent):
        return None  # picked by position, or a constant picked everywhere
    return [_hull(flow, [chosen], result)]


def where_operands(args, kwargs) -> tuple:
    """The condition and the two operands of a ``where`` call, however they are passed.

    ``torch.where(condition, input, other)`` or ``input.where(condition, other)``, positionally or by name.
    """
    if args and isinstance(args[0], torch.Tensor) and args[0].dtype == torch.bool:
        names: tuple[str, ...] = ("condition", "input", "other")
    else:
        names = ("input", "condition", "other")
    named = {**kwargs, **dict(zip(names, args))}
    return named.get("condition"), [named.get("input"), named.get("other")]


def cuts_by_zeros(name: str) -> bool:
    """Whether the call ``name`` is one whose constant operand's zeros cut paths (a product, a quotient)."""
    return _base(name) in _CUT_BY_ZEROS


def zeros_move(name: str, args, kwargs, dependent: list, dims: Sequence[int], result: torch.Tensor) -> bool:
    """Whether a constant operand that cuts by its zeros (:data:`_CUT_BY_ZEROS`) has them along a spatial dim unevenly.

    That is, at some positions along the dim and not at others.

    Such zeros (a window, a validity mask, a blend of two branches by a fixed mask) cut some fields and not their
    translates. ``dependent``: the input-dependent operands; ``dims``: the result's spatial dims.
    """
    keywords = _OPERAND_KEYWORDS.get(_base(name), ("input", "other"))
    cutting = [args[i] if i < len(args) else kwargs.get(keywords[i]) for i in _CUT_BY_ZEROS.get(_base(name), ())]
    for value in cutting:
        if not isinstance(value, torch.Tensor) or any(value is d for d in dependent) or value.dim() == 0:
            continue
        zeros, offset = value == 0, result.dim() - value.dim()  # broadcasting aligns the trailing dims
        for dim in (d - offset for d in dims if d - offset >= 0 and value.shape[d - offset] > 1):
            if not torch.equal(zeros, zeros.narrow(dim, 0, 1).expand_as(zeros)):
                return True
    return False


def _hull(flow: GeometryFlow, dependent: list[torch.Tensor], result: torch.Tensor) -> _Tag | None:
    """The tag of an elementwise function of ``dependent`` (broadcast to ``result``): the hull of their fields."""
    return _hull_of([(flow._tag(t), t.shape) for t in dependent], result.shape)


def _hull_of(tagged: list[tuple[_Tag | None, torch.Size]], shape: torch.Size) -> _Tag | None:
    """The hull of the fields of tensors (their tags and shapes) broadcast to ``shape``."""
    flows, layout = [], None
    for tag, own_shape in tagged:
        if tag is None or len(own_shape) != len(shape) or (layout is not None and tag[1] != layout):
            return None
        own, layout = tag
        # An operand of length 1 broadcast along a longer axis gives every position the same field: whole, or none.
        flows.append(
            tuple(
                a if isinstance(a, str) else None if own_shape[d] == 1 and shape[d] > 1 else a
                for a, d in zip(own, layout)
            )
        )
    axes: list[_Axis] = []
    for per_operand in zip(*flows):
        if None in per_operand:
            return None
        whole = [a for a in per_operand if isinstance(a, str)]
        if whole:
            axes.append(whole[0])
            continue
        fields: list[_Periodic] = list(per_operand)
        if len({g.stride for g in fields}) > 1:
            return None  # fields that move at different rates: no (r, S, P)
        period = math.lcm(*(len(g.offsets) for g in fields))
        ends = [[g.field(c) for c in range(period)] for g in fields]
        firsts = [min(e[c][0] for e in ends) for c in range(period)]
        lasts = [max(e[c][1] for e in ends) for c in range(period)]
        stride = fields[0].stride
        offsets = tuple(c * stride - first for c, first in enumerate(firsts))
        axes.append(_Periodic(stride, offsets, tuple(last - first + 1 for first, last in zip(firsts, lasts))))
    return (tuple(axes), layout) if layout is not None else None


def _composed(source: tuple[_Axis, ...], layers: list[tuple[int, int, int, int]]) -> tuple[_Axis, ...]:
    """The flow after a layer of ``(kernel, stride, padding, dilation)`` per axis.

    Output ``o`` reads inputs ``o*stride - padding + t*dilation``: its field is the hull of theirs (with one class,
    distill.pub's recurrence). The classes of the output follow the period of the input's over the stride.
    """
    out: list[_Axis] = []
    for axis, (kernel, stride, padding, dilation) in zip(source, layers):
        if isinstance(axis, str):
            out.append(axis)
            continue
        period = len(axis.offsets) // math.gcd(len(axis.offsets), stride)
        new_stride, offsets, sizes = axis.stride * stride, [], []
        for o in range(period):
            ends = [axis.field(o * stride - padding + t * dilation) for t in range(kernel)]
            first, last = min(e[0] for e in ends), max(e[1] for e in ends)
            offsets.append(o * new_stride - first)
            sizes.append(last - first + 1)
        out.append(_Periodic(new_stride, tuple(offsets), tuple(sizes)).simplified())
    return tuple(out)


def _upsampled(flow: tuple[_Axis, ...], dims: tuple[int, ...], first: torch.Tensor, result: torch.Tensor):
    """The flow after a nearest-neighbour upsampling by whole factors: output ``i`` sees input ``i // k``'s field.

    Where the input's stride is a multiple of ``k``, the output's is ``S / k``, with ``k`` times as many classes;
    else (or a factor that is no whole number) the flow ends.
    """
    out: list[_Axis] = []
    for axis, d in zip(flow, dims):
        length, grown = first.shape[d], result.shape[d]
        if grown % length:
            return None
        k = grown // length
        if isinstance(axis, str) or k == 1:
            out.append(axis)
            continue
        if axis.stride % k:
            return None
        stride, period = axis.stride // k, len(axis.offsets) * k
        offsets = tuple(axis.offsets[c // k] + (c % k) * stride for c in range(period))
        sizes = tuple(axis.sizes[c // k] for c in range(period))
        out.append(_Periodic(stride, offsets, sizes).simplified())
    return [(tuple(out), dims)]


# Python's in-place operators, as __torch_function__ names them.
_IN_PLACE_OPERATORS = frozenset(
    {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__",
     "__imatmul__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__"}
)  # fmt: skip
# In-place calls that write into part of their target only.
_PARTIAL_WRITES = frozenset(
    {"__setitem__", "index_put_", "index_fill_", "index_copy_", "index_add_", "masked_fill_", "masked_scatter_",
     "scatter_", "scatter_add_", "scatter_reduce_", "put_"}
)  # fmt: skip


def writes_in_place(name: str) -> bool:
    """Whether the call ``name`` (as ``__torch_function__`` names it) writes into its first argument."""
    return (name.endswith("_") and not name.startswith("_") and name != "requires_grad_") or name in _IN_PLACE_OPERATORS


def _per_axis(value, n_axes: int) -> tuple[int, ...]:
    if isinstance(value, (tuple, list)):
        values = tuple(int(v) for v in value)
        return values * n_axes if len(values) == 1 else values
    return (int(value),) * n_axes


def _argument(args, kwargs, position: int, name: str, default):
    return kwargs.get(name, args[position] if len(args) > position else default)


def _conv_layers(args, kwargs, n_axes: int) -> list[tuple[int, int, int, int]]:
    """``conv(input, weight, bias, stride, padding, dilation, groups)`` per axis."""
    weight = _argument(args, kwargs, 1, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.requires_grad:
        raise ValueError("a convolution whose weight depends on the input")
    kernel = tuple(weight.shape[2:])
    stride = _per_axis(_argument(args, kwargs, 3, "stride", 1), n_axes)
    dilation = _per_axis(_argument(args, kwargs, 5, "dilation", 1), n_axes)
    padding = _argument(args, kwargs, 4, "padding", 0)
    if isinstance(padding, str):  # "valid", or "same": PyTorch pads the smaller half first
        padding = tuple(0 if padding == "valid" else d * (k - 1) // 2 for k, d in zip(kernel, dilation))
    return list(zip(kernel, stride, _per_axis(padding, n_axes), dilation))


def _is_layer(name: str, n_axes: int) -> bool:
    """Whether ``name`` is a convolution, a zero padding or a pooling of ``n_axes`` spatial axes (see _layers)."""
    name = name.removesuffix("_with_indices")
    return name == "pad" or n_axes == _CONVS.get(name, _MAX_POOLS.get(name, _AVG_POOLS.get(name)))


def _layers(name: str, args, kwargs, n_axes: int) -> list[tuple[int, int, int, int]] | None:
    """The ``(kernel, stride, padding, dilation)`` per axis of a call that :func:`_is_layer`; None for no rule."""
    if name in _CONVS:
        return _conv_layers(args, kwargs, n_axes)
    if name == "pad":
        return _pad_layers(args, kwargs, n_axes)
    return _pool_layers(args, kwargs, n_axes, dilated=name.removesuffix("_with_indices") in _MAX_POOLS)


def _pad_layers(args, kwargs, n_axes: int) -> list[tuple[int, int, int, int]] | None:
    """``F.pad(input, pad, mode="constant")`` per axis, as a layer of kernel 1 padded by the leading amount.

    ``pad`` lists (before, after) per dim from the last: output ``o`` reads input ``o - before``. Only spatial dims
    may be padded. A negative amount crops, and the cropped inputs no field reaches lie inside the input, where no
    span clipped to it can leave them out; a padding that reads the input's own values (reflect, replicate,
    circular) folds the border's fields: neither has a rule.
    """
    pad = _argument(args, kwargs, 1, "pad", None)
    if _argument(args, kwargs, 2, "mode", "constant") not in (None, "constant"):
        return None
    if not isinstance(pad, (list, tuple)) or len(pad) % 2 or len(pad) // 2 > n_axes or min(pad, default=0) < 0:
        return None
    before = [0] * n_axes
    for i in range(len(pad) // 2):
        before[n_axes - 1 - i] = int(pad[2 * i])
    return [(1, 1, b, 1) for b in before]


def _pool_layers(args, kwargs, n_axes: int, *, dilated: bool) -> list[tuple[int, int, int, int]]:
    """A pooling's layer per axis.

    ``max_pool(input, kernel_size, stride, padding, dilation, ...)``, ``avg_pool(input, kernel_size, stride, padding,
    ...)``.
    """
    kernel = _per_axis(_argument(args, kwargs, 1, "kernel_size", None), n_axes)
    stride = _argument(args, kwargs, 2, "stride", None)
    stride = kernel if stride is None or stride == [] or stride == () else _per_axis(stride, n_axes)
    padding = _per_axis(_argument(args, kwargs, 3, "padding", 0), n_axes)
    dilation = _per_axis(_argument(args, kwargs, 4, "dilation", 1), n_axes) if dilated else (1,) * n_axes
    return list(zip(kernel, stride, padding, dilation))


def _reduced(name: str, source: _Tag, args, kwargs, tensor: torch.Tensor) -> _Tag | None:
    """A reduction with ``keepdim=True``: its spatial dims become whole; over the channels alone, nothing changes."""
    flow, spatial = source
    dim = _argument(args, kwargs, 1, "dim", None)
    keepdim = _argument(args, kwargs, 2, "keepdim", False)
    if dim is None or keepdim is not True:
        return None
    dims = {dim % tensor.dim()} if isinstance(dim, int) else {d % tensor.dim() for d in dim}
    if 0 in dims:
        return None
    return tuple(name if d in dims else a for a, d in zip(flow, spatial)), spatial


def checked_flow(
    candidate: tuple, fields: Sequence[tuple[tuple[int, ...], tuple]], shape: Sequence[int], table: list | None = None
) -> tuple[tuple, dict[int, str]] | None:
    """A geometry read without a pass, checked against theoretical fields as a measured one is; ``None`` if refuted.

    An axis with an (r, S, P) must be :func:`consistent` with every field (each equals its span where the span lies
    inside the input); an axis a whole-axis call made whole must have every field span the whole input. ``fields``
    are the probed ones (position, bounds); ``table``, where measured, per axis every index's theoretical bounds.

    Args:
        candidate: per axis, an (r, S, P), or the name of the call that made the axis whole.
        fields: theoretical fields as (position, per-axis bounds).
        shape: the input shape ``(N, C, *spatial)``.
        table: per axis, ``{index: bounds or None}`` for every output index, where measured.

    Returns:
        The geometry (``None`` on whole axes) and the reasons of its ``None`` axes; ``None`` where refuted.
    """
    geometry: list[AxisGeometry | None] = []
    reasons: dict[int, str] = {}
    for axis, axis_flow in enumerate(candidate):
        length = shape[2 + axis]
        # One table per field: fields at one index of this axis and others of the other axes must all agree.
        tables = [{position[axis]: bounds[axis]} for position, bounds in fields] + ([table[axis]] if table else [])
        if isinstance(axis_flow, str):
            if any(bounds != (0, length - 1) for t in tables for bounds in t.values()):
                return None
            geometry.append(None)
            reasons[axis] = (
                f"a {axis_flow}() along the whole axis on the path (a global pooling, a gate or attention): the field "
                f"spans the input however long it is"
            )
            continue
        if not all(consistent(axis_flow, t, length) for t in tables):
            return None
        geometry.append(axis_flow)
    return tuple(geometry), reasons
