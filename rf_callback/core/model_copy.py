"""The probe's private copy of a model: deep-copied, bias-free, eval mode, and optionally linearised."""

from __future__ import annotations

import collections
import contextlib
import contextvars
import copy
import functools
import inspect
import math
import random
import re
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from rf_callback.core import geometry_flow
from rf_callback.core.errors import CopyError, ProbeError
from rf_callback.core.geometry_flow import GeometryFlow
from rf_callback.core.resize import exact_grid_sample, exact_resize
from rf_callback.core.sharding import (
    Unwrapped,
    check_gathered_fits,
    fsdp1_parameters_whole,
    is_distributed_hook,
    is_fsdp1_wrapper,
    is_sharded,
    sharded_class_origin,
)

MODES = ("theoretical", "weights")


_ACTIVATIONS = frozenset(
    {
        "relu", "relu6", "leaky_relu", "gelu", "silu", "sigmoid", "tanh", "elu", "selu", "celu", "hardswish",
        "hardsigmoid", "hardtanh", "mish", "softplus", "prelu", "softsign", "rrelu", "threshold", "logsigmoid",
        "tanhshrink", "hardshrink", "softshrink",
    }
)  # fmt: skip
# Clamps of input-dependent values are activations (a ReLU6 written as x.clamp(0, 6)): past a bound their gradient
# is zero, and the theoretical copy's values grow block after block (x + f(x) doubles them). Integer clamps of
# indices do not depend on the input and stay real.
_CLAMPS = frozenset({"clamp", "clip", "clamp_min", "clamp_max"})
# Fake quantization (quantization-aware training) rounds and clamps to the quantized range: past it, the gradient is
# zero, as a clamp's.
_FAKE_QUANTIZERS = frozenset(
    {"fake_quantize_per_tensor_affine", "fake_quantize_per_channel_affine",
     "_fake_quantize_learnable_per_tensor_affine", "_fake_quantize_learnable_per_channel_affine",
     "fused_moving_avg_obs_fake_quant"}
)  # fmt: skip
# Calls that read a softmax's zeroed entries as the real probabilities they stand for (see _ProbeFunctions._zeroed).
_LOGARITHMS = frozenset({"log", "log2", "log10"})
_SHIFTS_AND_CLAMPS = frozenset({"add", "__add__", "__radd__", "clamp", "clamp_min", "clip"})
_DROPOUTS = frozenset({"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"})
_NORMALISATIONS = frozenset(
    {"batch_norm", "instance_norm", "group_norm", "layer_norm", "local_response_norm", "rms_norm"}
)
_MAX_POOLS = {"max_pool1d": 1, "max_pool2d": 2, "max_pool3d": 3}
# Products of two input-dependent tensors (a squeeze-and-excitation gate, attention): with activations as
# identities, their magnitudes square block after block until they overflow or underflow. The theoretical copy divides
# such a product by its largest magnitude (a positive constant: the gradient's support does not change).
# Products of whole tensors, linear in each operand: a zero operand on the copy cuts the other's paths.
_BILINEAR = frozenset({"matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "mv", "dot", "einsum"})
_PRODUCTS = frozenset({"mul", "mul_", "__mul__", "__rmul__", "__imul__", "multiply", *_BILINEAR})  # fmt: skip
# Functions that couple every element along a dim: on the theoretical copy's equal values their real gradient cancels.
_SOFTMAXES = frozenset({"softmax", "log_softmax", "softmin", "special_softmax", "special_log_softmax", "_softmax",
                        "_log_softmax"})  # fmt: skip
# A softmax input this far below every live one of its dim (a gap this wide under the lowest) is masked: a mask added
# to attention scores (-inf, finfo.min, -1e9, -1e4, or Swin's -100) puts it there, and its share of the output is
# below exp(-50) = 2e-22 of the largest. A graded bias (ALiBi) leaves no such gap (see _above_every_gap). On the
# theoretical copy the live scores are bounded products (at most 1 in magnitude, times a scale) plus position biases
# (Swin V2's at most 16 either way), so a smaller gap comes from the copy's values, not the architecture.
_MASKED_GAP = 50.0
_ADAPTIVE_MAX_POOLS = {
    "adaptive_max_pool1d": F.adaptive_avg_pool1d,
    "adaptive_max_pool2d": F.adaptive_avg_pool2d,
    "adaptive_max_pool3d": F.adaptive_avg_pool3d,
}


def _tuple(value, n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    return value * n if len(value) == 1 else value


def pooled_length(length: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    """Returns PyTorch's output length of a pooling window (the ``MaxPool`` formula, ``ceil_mode`` included)."""
    span = length + 2 * padding - dilation * (kernel - 1) - 1
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= length + padding:
        out -= 1
    return out


_MAX_UNPOOLS = {"max_unpool1d": 1, "max_unpool2d": 2, "max_unpool3d": 3}


def max_unpool_twin(n_axes: int, input, indices, kernel_size, stride=None, padding=0, output_size=None):
    """The linear twin of ``max_unpoolNd``: each value spread over its whole window, not its arg-max alone.

    Any element of a pooling window may be its maximum, so every output position of the window is reachable from
    that window's value (a transposed convolution with a kernel of ones). ``indices`` only tell which one the real
    values chose. Positions that no window reaches (an ``output_size`` larger than the windows cover) stay zero.
    """
    kernel = _tuple(kernel_size, n_axes)
    strides = kernel if stride is None or (not isinstance(stride, int) and len(stride) == 0) else _tuple(stride, n_axes)
    unbatched = input.dim() == n_axes + 1
    x = input.unsqueeze(0) if unbatched else input
    weight = x.new_ones((x.shape[1], 1, *kernel))
    conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n_axes - 1]
    y = conv(x, weight, stride=strides, padding=_tuple(padding, n_axes), groups=x.shape[1])
    if output_size is not None:
        target = tuple(output_size)[-n_axes:]
        pads: list[int] = []
        for have, want in reversed(list(zip(y.shape[2:], target))):
            pads += [0, want - have]
        y = F.pad(y, pads)
    return y.squeeze(0) if unbatched else y


def max_pool_twin(n_axes: int, input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """The linear twin of ``max_poolNd``: the mean over exactly the same windows.

    Every window element gets a share of the gradient instead of the arg-max alone. Supports dilation and
    ``ceil_mode``, which ``avg_poolNd`` does not.
    """
    kernel = _tuple(kernel_size, n_axes)
    strides = kernel if stride is None or (not isinstance(stride, int) and len(stride) == 0) else _tuple(stride, n_axes)
    pads, dilations = _tuple(padding, n_axes), _tuple(dilation, n_axes)
    spatial = input.shape[-n_axes:]
    out = [pooled_length(*args, ceil_mode) for args in zip(spatial, kernel, strides, pads, dilations)]
    pad_arg: list[int] = []
    for length, k, s, p, d, o in reversed(list(zip(spatial, kernel, strides, pads, dilations, out))):
        pad_arg += [p, p + max(0, (o - 1) * s + d * (k - 1) + 1 - (length + 2 * p))]
    unbatched = input.dim() == n_axes + 1
    x = input.unsqueeze(0) if unbatched else input
    x = F.pad(x, pad_arg)
    channels = x.shape[1]
    weight = x.new_full((channels, 1, *kernel), 1.0 / math.prod(kernel))
    conv = (F.conv1d, F.conv2d, F.conv3d)[n_axes - 1]
    y = conv(x, weight, stride=strides, dilation=dilations, groups=channels)
    cropped: tuple[types.EllipsisType | slice, ...] = (..., *(slice(0, o) for o in out))
    y = y[cropped]
    return y.squeeze(0) if unbatched else y


def _returns_its_input(args, kwargs) -> bool:
    """Whether a dropout call returns its input itself in torch (in eval mode, or p=0): the twin does too.

    Each of a model's dropouts in eval mode (timm's EfficientViT runs 41) was cloned, a copy of its feature map.
    """
    p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
    training = kwargs.get("training", kwargs.get("train", args[2] if len(args) > 2 else True))
    return training is False or (isinstance(p, (int, float)) and p == 0)


def _gradient_off() -> str:
    """The block that turned gradients off around the call being run, as the forward wrote it."""
    return "torch.inference_mode()" if torch.is_inference_mode_enabled() else "torch.no_grad()"


# Cut reasons of a block without gradients (see _gradient_off): a frozen part run in one needs another fix.
GRADIENT_OFF = ("inside torch.no_grad()", "inside torch.inference_mode()")


class _ProbeFunctions(TorchFunctionMode):
    """Replaces torch functions while the probe's copy runs.

    Functional calls in a user's ``forward`` (``F.relu``, ``torch.sigmoid``, ``F.max_pool2d``) are treated like
    their module twins.

    Both modes: dropout is the identity (a ``forward`` calling ``F.dropout(x)`` with its default ``training=True``
    would otherwise zero pixels at random and draw from the global random generator), and a softmax's masked inputs
    get no gradient (a -100 mask leaves them a tiny one; see :func:`_masked_softmax`).
    Theoretical mode also: activations and normalisations are the identity, max-pooling is its mean-pool twin,
    ``max``/``min`` along a dim give the mean's values, softmax along a dim passes every live (unmasked) input an equal
    share of the gradient (see :func:`_softmax_twin`; ``scaled_dot_product_attention`` is spelled out with it;
    ``multi_head_attention_forward`` is refused where its hidden softmax would lose a path), and a product of two
    input-dependent tensors is divided by its largest magnitude (no overflow, no underflow).

    ``cuts`` records how the forward cuts the gradient on an input-dependent tensor: a function whose gradient is
    zero (``round``, ``argmax``), or a tensor made without gradient from the input (``.detach()``, an op inside
    ``torch.no_grad()``, an integer cast) that a later op or the output uses. A custom ``autograd.Function`` runs
    its forward without gradient too, but its output carries one, so it is no cut.
    """

    def __init__(
        self, linearise: bool, flow: GeometryFlow | None = None, exact_values: bool = False, whole_windows: bool = False
    ):
        super().__init__()
        self.linearise = linearise
        # Weights mode's fields: a max-pooling's gradient reaches its whole windows (see probe_functions).
        self.whole_windows = whole_windows and not linearise
        # Samplings and resizes give their exact values too, not PyTorch's kernel's (see _real_values): a check by
        # forward passes alone (verify_rf) reads values, and rounding's weights of 1e-16 would move the output (a
        # bilinear resize of 7 to 25 rows gives row 4 a weight of 6e-16 at output row 12, whose source is row 3).
        self.exact_values = exact_values
        # The geometry carried beside each input-dependent tensor (see geometry_flow), where it is asked for.
        self.flow = flow
        self.cuts: list[str] = []
        # Calls whose output size is fixed rather than following the input's (adaptive pooling, an interpolation
        # to a size), as (name, input shape, dims whose length is fixed): along an axis that reaches such a dim the
        # fields change with the input's length, and no (r, S, P) describes them. An adaptive pooling's ``None``
        # leaves its dim free (``AdaptiveAvgPool2d((1, None))`` of a text line).
        self.fixed_size: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
        # The feature sizes of linear layers and layer norms (the length of the last axis they act on): an output
        # whose last axis has one of them may be channels last (see graph.check_channels_first).
        self.last_axis_sizes: set[int] = set()
        # Whether a permute-like call moved dim 1 (the channels of a convolution's output) of a tensor of 3 or more
        # dims: only then can an output read channels first hold a spatial axis at dim 1 (see check_channels_first).
        self.moved_channels = False
        # Whether a reshape gave a tensor's dim 1 another length (patches cut from a series): see graph.forward_to.
        self.reshaped_channels = False
        # Whether the probed output's dim 1 holds its channels (True), a spatial axis (False), or unknown (None).
        self.output_channels_first: bool | None = None
        # Reductions and softmaxes of input-dependent tensors, as (name, input shape, dims reduced), in call order:
        # one over a dim that follows the input's length couples a whole axis (see geometry_probe).
        self.couplings: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
        # Those whose result no call has read with a gradient yet, by the result's id: a mean that only a comparison
        # reads (a hard gate, y > y.mean()) couples nothing, and joins the couplings only once a gradient reads it.
        self._unread_couplings: dict[int, tuple[weakref.ref, tuple]] = {}
        # Tensors made without gradient from input-dependent ones, by id, with the reason (kept alive: ids stay
        # unique).
        self._cut_from_input: dict[int, tuple[torch.Tensor, str]] = {}
        # Paddings that read the input's own values past its border (reflect, replicate, circular), as
        # "pad(mode='reflect')": the border's fields then fold back inside the input (see probe.border_follows).
        self.border_modes: list[str] = []
        # Calls after which the fields may differ from one position to the next (see _note_pick_by_position): a
        # torch.where by a fixed condition, a concatenation or a partial write that joins two branches along a
        # spatial axis, a product by a constant whose zeros lie at some positions only. Each with its result's
        # autograd node, which tells the outputs it reaches (see picks_on_path).
        self.position_picks: list[tuple[str, Any]] = []
        # Whether a call read input-dependent values with gradients off: a custom autograd.Function's forward runs
        # so (as does a torch.no_grad() block), and only then need its graph be walked for them (see graph.py).
        self.read_without_grad = False
        # Boolean masks computed from input-dependent tensors (x > y), by id (weakly: a mask freed leaves, so a
        # later tensor reusing its id is not taken for one): a selection by such a mask (torch.where) picks
        # between paths by value, as a max does.
        self._input_masks: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        # Those whose Python value is no branch of the input's: checks that its values are numbers (isnan, x != x,
        # and masks made of them alone: if isnan(x).any(): raise takes the side any finite input takes), and masks
        # computed from the weights alone (the copy's constants stand for any weights, as they do without a branch).
        self._unbranching: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        # Integers computed from those masks alone (a count, a cumsum, the positions nonzero() gives): indices keep
        # their values, a factor of a product is 0.5 as a mask is, and a Python value read from one is a branch.
        self._mask_numbers: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        # Python values read from input-dependent masks in theoretical mode (if (x < 0).any(): ...), by their call:
        # the copy's constant input takes one branch, whose field need not hold the others' (see graph.forward_to).
        self.branches: list[str] = []
        # Comparisons of input-dependent values (x > 0) and what was made of them without a gradient, by id (weakly),
        # with the comparison's name: a mask used as values ((x > 0).float()) carries no gradient, so an output made
        # of it alone seems not to depend on the input (see comparison_behind, graph.without_gradient).
        self._compared: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        self._compared_by: dict[int, str] = {}
        # Operator overloads called on input-dependent tensors in theoretical mode (aten.max_pool2d.default, what a
        # torch.export or make_fx graph calls): they come below the functions whose twins the copy runs.
        self.operator_calls: list[str] = []
        # The calls on input-dependent tensors, in order, with their plain arguments on the theoretical copy (a
        # stride, a padding mode, a slice): what a field measured later on a copy kept from the probe must find
        # again, where the forward's code, a global or a class attribute it reads may have changed since.
        self.trace: list[tuple] = []
        # The probe's input and what the forward made of it by layout and pointwise calls alone, by id: (a weak
        # reference, the dim its channels lie at); and the first layers that read another dim of it as channels or
        # features (an (N, L, C) series permuted before its Conv1d): the input is not channels first.
        self._raw: dict[int, tuple[weakref.ref, int]] = {}
        self.input_read_otherwise: list[str] = []
        if flow is not None:
            flow.masks = self._input_masks  # a where() by such a mask may pick either operand (see geometry_flow)
        # What the forward drew at random and what it computed from the draws alone, by id: (a weak reference, "value",
        # "choice" (positions) or "mask", the draw's name); and where a draw decides the field (see
        # _note_random_draws).
        self._drawn: dict[int, tuple[weakref.ref, str, str]] = {}
        self.random_draws: list[str] = []
        # Tensors computed from the model's parameters without the input, by id (weakly, as the masks): on the
        # theoretical copy their values are constants that stand for any weights, so a choice they make (a mask from
        # a learned score, a sampling grid from a learned affine) is no fixed choice of the architecture.
        self._from_weights: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        # Beside each of those (by id, with a weak reference), its values on three draws of generic weights (see
        # _on_generic_weights) and where they may be non-zero whatever the draws show (they follow positions the
        # weights picked), and those draws of the copy's parameters, from a generator of their own.
        self._generic: dict[int, tuple[weakref.ref, tuple[torch.Tensor, ...], torch.Tensor | None]] = {}
        self._jitters: dict[int, tuple[weakref.ref, tuple[torch.Tensor, ...]]] = {}
        self._jitter_generator = torch.Generator().manual_seed(0)
        # Softmax outputs (and their dropouts' twins), by id (weakly, as the masks): see _lifted_bilinear.
        self._probabilities: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        # Weights mode: softmax outputs whose masked entries were set to exactly 0 (see _masked_out), and what a
        # constant added or a clamp made of them, by id, with a weak reference and how to compute their real
        # values: a log reads those (log(p) of an entry 50 below the others has a gradient near 1, not 0). An entry
        # (and the softmax input it holds) goes at the tensor's first other use (see _with_real_values).
        self._zeroed: dict[int, tuple[weakref.ref, Callable[[], torch.Tensor]]] = {}
        # Weights mode: a max-pooling's values (whose gradient reaches the whole window) with indices, by id, and the
        # same values gathered at the indices (whose gradient reaches the winners alone), for an unpooling of them.
        self._pooled: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}
        # False past the probed layer's output, where the forward only looks for a second call of that layer.
        self.recording = True
        # Elements of every tensor the forward's calls returned: its cost, which attention makes grow faster than the
        # input (see geometry_probe.Budget).
        self.work = 0
        # Whether some call on the path to the probed output returned an input-dependent float16 tensor (autocast,
        # a half-precision part): its gradient flushes to zero far above float32's range, where the input's own
        # gradient does not show it (see graph.underflow_guard).
        self.float16_inside = False
        # The copy's dtype where it is not the default one (a float64 probe): tensors the forward makes at the
        # default dtype (a mask built with torch.zeros(T, T)) are made in it, as they are beside the user's model.
        self.factory_dtype: torch.dtype | None = None

    def __exit__(self, exc_type, exc_value, traceback):
        # The twins serve the forward alone; dropped now, not when a garbage collection finds their cycle
        self._generic.clear()
        self._jitters.clear()
        return super().__exit__(exc_type, exc_value, traceback)

    def start_input(self, inputs: torch.Tensor) -> None:
        """Follows the probe's input ``(N, C, *spatial)``, its channels at dim 1, to the first layers that read it.

        Args:
            inputs: the input leaf.
        """
        self._raw = {id(inputs): (weakref.ref(inputs), 1)}

    def _follow_input(self, func, name: str, args, kwargs, result) -> None:
        """Moves the input's channel dim through a layout or pointwise call, or checks the layer that reads it."""
        if name == "einsum" and len(args) == 2 and isinstance(args[0], str):  # einsum("nlc->ncl", x)
            name, args = "permute", (args[1], *_einsum_order(args[0]))
        operand = args[0] if args else kwargs.get("input")
        if not isinstance(operand, torch.Tensor):
            return
        first: torch.Tensor = operand
        entry = self._raw.get(id(first))
        if entry is None or entry[0]() is not first:
            return
        channels: int | None = entry[1]
        rank = first.dim()
        if name in _INPUT_LAYERS:
            features = 1 if name.startswith("conv") else rank - 1
            if channels != features:
                self.input_read_otherwise.append(
                    f"{name}() reads dim {features} of the input as its {'channels' if features == 1 else 'features'},"
                    f" where the input's dim 1 lies at dim {channels}"
                )
            return
        if not isinstance(result, torch.Tensor) or result.dim() != rank:
            return
        if name in _LAYOUT_MOVES:
            channels = _moved_dim(name, args[1:], kwargs, rank, entry[1])
        elif name == "__get__" and getattr(getattr(func, "__self__", None), "__name__", "") in ("mT", "mH"):
            channels = _moved_dim("transpose", (-2, -1), {}, rank, entry[1])  # x.mT
        elif name in _KEEPING_DIMS:  # a pad, a slice (x[:, 1:]): the dims stay where they were
            pass
        elif not (name.rstrip("_") in _POINTWISE_ON_INPUT and result.shape == first.shape):
            return
        if channels is not None:
            self._raw[id(result)] = (weakref.ref(result), channels)

    def cut_reason(self, tensor) -> str | None:
        """Why ``tensor`` depends on the input without a gradient to it, or None."""
        if isinstance(tensor, torch.Tensor) and not tensor.requires_grad and id(tensor) in self._cut_from_input:
            return self._cut_from_input[id(tensor)][1]
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = called = getattr(func, "__name__", "")
        if isinstance(func, torch._ops.OpOverload):
            # aten.topk.default is read as topk (its cuts, picks and draws), and runs as it is: the twins take torch's
            # signatures, not aten's (theoretical mode refuses such calls, see graph.forward_to)
            name = func.overloadpacket.__name__
        if name in _ATTENTIONS:
            self.work += _attention_score_count(name, args, kwargs)  # made inside the call, unseen here
        if not self.recording:
            return self._counted(self._called(func, called, args, kwargs))
        tensors = _tensors_among((*args, *kwargs.values()))  # a list's too: cat([a.detach(), b]), y[..., order]
        if name in _LIKE_ANOTHER and tensors:  # the other tensor lends its dtype or shape, none of its values
            tensors = tensors[:1]
        from_input = any(t.requires_grad or id(t) in self._cut_from_input for t in tensors)
        if self.linearise and not from_input and (self._input_masks or self._mask_numbers):
            direct = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]  # a list's mask: _of_masks
            if any(id(t) in self._input_masks for t in direct):
                return self._of_masks(func, args, kwargs)
            if any(id(t) in self._mask_numbers for t in direct):
                return self._of_mask_numbers(func, name, args, kwargs)
        if self.linearise and from_input and name in _TO_PYTHON and not torch.is_grad_enabled():
            self.branches.append(f"{name}() of the input inside {_gradient_off()}")
        coupling = None
        if from_input and torch.is_grad_enabled():
            self.cuts += [reason for t in tensors if (reason := self.cut_reason(t))]
            if name in _COUPLINGS and args and isinstance(args[0], torch.Tensor) and args[0].dim():
                dims = _reduced_dims(name, args, kwargs)
                if dims:
                    coupling = (name, tuple(args[0].shape), dims)
            elif name in _RECURRENCES and len(args) >= 9 and isinstance(args[3], bool) and args[0].dim() == 3:
                # A recurrence runs along its time dim: a bidirectional one couples it whole (the readings check
                # that the centre field spans the input, which a one-way recurrence's prefix does not).
                coupling = (name, tuple(args[0].shape), (1 if args[8] else 0,))
            elif name in _KEY_DIMS and _unmasked(name, args, kwargs):
                # A softmax over all the keys inside one call (no mask: a band or a causal mask keeps it local)
                key = _key_of(name, args, kwargs)
                if isinstance(key, torch.Tensor):
                    coupling = (name, tuple(key.shape), _KEY_DIMS[name](key))
            if name.rstrip("_") in _ZERO_GRADIENT or _zero_gradient_call(name, args, kwargs):
                self.cuts.append(f"{name}(), whose gradient is zero")
            if name in _TO_PYTHON:
                self.cuts.append(f"{name}(), a Python value made from the input")
            if name.startswith("fractional_max_pool"):
                self.cuts += _fractional_pool_cut(name, args, kwargs, self.linearise)
        if from_input and not torch.is_grad_enabled():
            self.read_without_grad = True
        if from_input and not torch.is_grad_enabled() and geometry_flow.writes_in_place(name) and args:
            # Written in place without gradient: the target keeps no trace of what flowed into it.
            target = args[0]
            if isinstance(target, torch.Tensor) and target.requires_grad:
                self.cuts.append(f"{name}() inside {_gradient_off()}")
            elif isinstance(target, torch.Tensor):
                self._cut_from_input[id(target)] = (target, f"{name}() inside {_gradient_off()}")
        if args and isinstance(args[0], torch.Tensor) and (dims := _fixed_dims(name, args, kwargs)):
            self.fixed_size.append((f"{name}()", tuple(args[0].shape), dims))
        if name in ("linear", "layer_norm") and args and isinstance(args[0], torch.Tensor) and args[0].dim():
            self.last_axis_sizes.add(args[0].shape[-1])
        if name == "pad" and from_input and (mode := kwargs.get("mode", args[2] if len(args) > 2 else None)):
            if mode != "constant":
                self.border_modes.append(f"pad(mode={mode!r})")
        if not self.moved_channels and name in _PERMUTES:
            self.moved_channels = _moves_dim_one(name, args, kwargs)
        of_weights = (
            self.linearise
            and not from_input
            and not _from_shape_alone(name)
            and name != "new_tensor"
            and any(_is_weight(t, self._from_weights) for t in tensors)
        )
        # An in-place write into a tensor without generic twins (a kernel built in a buffer): its state before it
        unwritten = self._unwritten(name, args) if of_weights else None
        result = self._called(func, called, args, kwargs)
        if from_input and _tensors_among((result,)):  # not a shape or a dim read (the probe's own hooks read them)
            self.trace.append((name, _plain_arguments((args, kwargs))) if self.linearise else (name,))
        if from_input and self.recording:
            self._note_pick_by_position(name, args, kwargs, result)
        if self._unread_couplings and from_input:
            # A write in place (z[:] = y.amax(...)) returns nothing: what it wrote into carries the gradient on.
            written = args[0] if result is None and args and geometry_flow.writes_in_place(name) else result
            self._read_couplings(tensors, written)
        if coupling is not None:
            if isinstance(result, torch.Tensor):
                self._unread_couplings[id(result)] = (weakref.ref(result), coupling)
            else:
                self.couplings.append(coupling)
        if of_weights:
            self._note_from_weights(result)
            written = result
            if result is None and args and geometry_flow.writes_in_place(name):
                written = args[0]  # a write in place returns nothing (k[:, :, 3:] = 0): what it wrote into
            if _tensors_among((written,)):  # not a shape, a dtype, a number read off a weight
                self._note_generic(written, self._on_generic_weights(func, name, args, kwargs, unwritten, written))
        if not self.reshaped_channels and from_input and name in _RESHAPES:
            self.reshaped_channels = _reshapes_dim_one(args, result)
        if self.flow is not None:
            self.flow.after(name, args, kwargs, result)
        if name == "linear" and isinstance(result, torch.Tensor) and result.dim():
            self.last_axis_sizes.add(result.shape[-1])
        if self.recording and (self._compared or (from_input and name in _COMPARISONS)):
            self._follow_comparisons(name, args, kwargs, result, from_input)
        # A boolean mask (x > 0) gates values that carry their own gradient, and a tensor made from another's shape
        # alone (new_zeros, ones_like) holds none of its values: neither is a cut.
        if self.linearise and from_input and isinstance(result, torch.Tensor) and result.dtype == torch.bool:
            self._input_masks[id(result)] = result
            if name in _VALIDITY_CHECKS or (name in _SELF_COMPARISONS and len(args) > 1 and args[0] is args[1]):
                self._unbranching[id(result)] = result
        if self._raw:
            self._follow_input(func, name, args, kwargs, result)
        if self.linearise and from_input and isinstance(func, torch._ops.OpOverload):
            self.operator_calls.append(str(func))
        if self.linearise and from_input and name in _PYTHON_COMPARISONS:
            self.branches.append(f"{name}() of input-dependent values")
        if from_input and name.rstrip("_") in _INDEXED_PICKS and isinstance(result, (tuple, list)):
            # The positions a pick chose, as argmax's: a gather by them reads what the input's values chose, which
            # no gradient follows (and the theoretical copy's ties would choose a fixed few).
            for indices in result[1:]:
                if (
                    isinstance(indices, torch.Tensor)
                    and not indices.is_floating_point()
                    and indices.dtype != torch.bool
                ):
                    self._cut_from_input[id(indices)] = (indices, f"the indices of {name}()")
        if (
            from_input
            and isinstance(result, torch.Tensor)
            and not result.requires_grad
            and result.dtype != torch.bool
            and not _from_shape_alone(name)
        ):
            reason = f"{name}() inside {_gradient_off()}" if not torch.is_grad_enabled() else f"{name}()"
            self._cut_from_input[id(result)] = (result, reason)
        self._note_random_draws(name, args, kwargs, tensors, result)
        return self._counted(result)

    def _note_random_draws(self, name: str, args, kwargs, operands: list[torch.Tensor], result) -> None:
        """Follows what the forward draws at random, and notes in :attr:`random_draws` where a draw decides the field.

        A forward that reads an input-dependent tensor at random positions (``y[..., randperm(L)]``, the ``argsort``
        of ``rand`` as masked autoencoders shuffle their tokens), multiplies it by a random mask (``rand(...) < keep``,
        ``(keep + rand(...)).floor()``, a hard Gumbel one-hot: a drop-path or a branch left random in eval mode) or
        branches in Python on a draw has one draw's field, which would follow the global random state: the probe
        refuses it. Draws that decide nothing are probed: noise added to a map, a random timestep that picks a
        positive coefficient from a table. A ``bernoulli`` draw keeps everything instead (see :func:`_kept_draw`),
        and a draw from a ``generator=`` the forward passes is its own to fix.
        """
        if not self._drawn and name not in _RANDOM_DRAWS:
            return  # the common case: nothing drawn so far
        kinds = [entry for t in operands if (entry := self._drawn_entry(t)) is not None]
        if kinds and any(t.requires_grad for t in operands):
            for kind, origin in kinds:
                if (kind == "choice" and (name in _INDEXINGS or name.rstrip("_") in _INDEXINGS)) or (
                    kind == "mask" and name in _MASK_USES
                ):
                    self.random_draws.append(f"{origin}() {_DECIDES[kind]}")
        if kinds and name in _TO_PYTHON and any(kind != "value" for kind, _ in kinds):
            self.random_draws.append(f"{kinds[0][1]}() {_DECIDES['python']}")
        if kwargs.get("generator") is not None:
            return
        results = [t for t in _tensors_among((result,)) if not t.requires_grad]
        if name in _RANDOM_CHOICES:
            kind, origin = "choice", name
        elif name == "gumbel_softmax" and kwargs.get("hard", args[2] if len(args) > 2 else False):
            kind, origin = "mask", name
        elif name in _RANDOM_VALUES or name == "gumbel_softmax":  # integer values (random_) are positions
            kind, origin = "value", name
            if any(not t.is_floating_point() for t in results):
                kind = "choice"
        elif kinds:
            origin = kinds[0][1]
            if name.rstrip("_") in _RANDOM_MASKINGS:
                kind = "mask"
            elif name in _CHOICES_BY_VALUE or any(kind == "choice" for kind, _ in kinds):
                kind = "choice"
            else:
                kind = "mask" if any(kind == "mask" for kind, _ in kinds) else "value"
        else:
            return
        for t in results:  # a float computed from positions (a coefficient a random timestep picks) is a value
            self._drawn[id(t)] = (
                weakref.ref(t),
                "value" if kind == "choice" and t.is_floating_point() else kind,
                origin,
            )

    @property
    def drew_at_random(self) -> bool:
        """Whether the forward drew anything at random (noise, a mask) from the global random state."""
        return bool(self._drawn)

    def _drawn_entry(self, tensor: torch.Tensor) -> tuple[str, str] | None:
        entry = self._drawn.get(id(tensor))
        return None if entry is None or entry[0]() is not tensor else entry[1:]

    def _called(self, func, name: str, args, kwargs):
        """:meth:`_call`'s result, a softmax's output noted as probabilities (see :func:`_lifted_bilinear`)."""
        result = self._call(func, name, args, kwargs)
        if self.linearise and isinstance(result, torch.Tensor) and args and isinstance(args[0], torch.Tensor):
            if (name in _SOFTMAXES and "log" not in name) or (
                name.rstrip("_") in _DROPOUTS and id(args[0]) in self._probabilities
            ):
                self._probabilities[id(result)] = result
        return result

    def _counted(self, result):
        """``result``, its tensors' elements added to :attr:`work`."""
        tensors = [result] if isinstance(result, torch.Tensor) else result if isinstance(result, (tuple, list)) else []
        tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
        self.work += sum(t.numel() for t in tensors)
        if self.recording and not self.float16_inside:
            self.float16_inside = any(t.dtype == torch.float16 and t.requires_grad for t in tensors)
        return result

    def _read_couplings(self, tensors: list[torch.Tensor], result) -> None:
        """Moves the couplings whose results a call read into a result that carries a gradient to the couplings."""
        results = result if isinstance(result, (tuple, list)) else (result,)
        if not any(isinstance(r, torch.Tensor) and r.requires_grad for r in results):
            return  # a comparison, a shape: no gradient goes through
        for tensor in tensors:
            entry = self._unread_couplings.get(id(tensor))
            if entry is not None and entry[0]() is tensor:
                self.couplings.append(entry[1])
                del self._unread_couplings[id(tensor)]

    def read_output(self, output) -> None:
        """Counts the couplings whose result is the probed output itself (a global pooling with ``keepdim``)."""
        if isinstance(output, torch.Tensor) and self._unread_couplings:
            self._read_couplings([output], output)

    def _note_from_weights(self, result) -> None:
        """Notes the tensors of ``result`` as computed from the weights; a boolean one is a mask no weight fixes."""
        for item in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(item, torch.Tensor):
                self._from_weights[id(item)] = item
                if item.dtype == torch.bool:
                    self._input_masks[id(item)] = item
                    self._unbranching[id(item)] = item

    def _unwritten(self, name: str, args) -> torch.Tensor | None:
        """A clone of the target of an in-place call that has no generic twins, or None."""
        if not (args and isinstance(args[0], torch.Tensor) and geometry_flow.writes_in_place(name)):
            return None
        return None if self._generic_of(args[0]) is not None else args[0].clone()

    def _generic_of(self, value) -> tuple[torch.Tensor, ...] | None:
        entry = self._generic.get(id(value))
        return entry[1] if entry is not None and entry[0]() is value else None

    def _possible_of(self, value) -> torch.Tensor | None:
        """Where ``value`` may be non-zero whatever its draws show (after positions the weights picked), or None."""
        entry = self._generic.get(id(value)) if isinstance(value, torch.Tensor) else None
        return entry[2] if entry is not None and entry[0]() is value else None

    def _on_generic_weights(self, func, name: str, args, kwargs, unwritten: torch.Tensor | None, written):
        """The call on three draws of generic weights: its results, and where they follow picked positions.

        Returns None where the call reads no weights; else the results per draw, and per result where it may be
        non-zero whatever the draws show (:meth:`_possible`). ``written`` is the call's own result (the tensor it
        wrote into, for a write in place).

        The copy's weights are equal constants, and a weight computed from them may lose taps that any trained
        weights have: standardisation (``(w - w.mean()) / w.std()``) makes them all zero, a combination of fixed
        bases (``einsum(alpha, haar)``) or increments (``diff(w)``) cancels all but a few. Beside each such tensor the
        copy computes the same on three draws of generic weights, each constant times ``1 + u`` (positive),
        ``2 - 4u`` and ``4u - 2`` (signed) for one fixed uniform draw ``u``: values in opposite orders and of both
        signs on every tap, so a zero that follows their order or sign (a threshold, ``relu``) falls on other taps.
        Activations and normalisations run as they are (``sigmoid`` of a zero is not zero), a pick along a dim
        (``amin``, ``median``) is the mean there, as the copy's twin of a pick of the input is, and a mask computed
        from them is 0.5 as a number, as the copy's own is. Where every draw is zero, the zero is the
        architecture's (a mask's); a layer that uses the tensor fills in the others (see
        :meth:`_generic_zeros_filled`), and wherever positions the weights pick (the indices of a ``topk``, an
        ``argmax``) may put a value (:meth:`_possible`).
        """
        read = False

        def generic(value, draw: int):
            nonlocal read
            if not isinstance(value, torch.Tensor):
                return value
            twins = self._generic_of(value)
            if twins is not None:
                read = True
                return twins[draw]
            if isinstance(value, nn.Parameter) and _stands_for_weights(value):
                read = True
                return self._jittered(value)[draw]
            return value

        base = name.rstrip("_")
        results = []
        try:
            for draw in range(_GENERIC_DRAWS):
                generic_args = _each_operand(functools.partial(generic, draw=draw), args)
                generic_kwargs = {k: generic(v, draw) for k, v in kwargs.items()}
                if not read:
                    return None
                # Never written into the copy's own tensors: an in-place target without twins, an out=
                if unwritten is not None:
                    generic_args = (unwritten.clone(), *generic_args[1:])
                if isinstance(kwargs.get("out"), torch.Tensor):
                    generic_kwargs["out"] = torch.empty_like(kwargs["out"])
                with torch.no_grad():
                    if base in _PICKS_ALONG_A_DIM or (
                        base in ("max", "min") and _reduces_along_a_dim(generic_args, generic_kwargs)
                    ):  # any weights may pick any element: a zero at the pick (w - w.median()) is none of theirs
                        results.append(_picks_twin(func, base, generic_args, generic_kwargs))
                    elif base in _ACTIVATIONS or base in _NORMALISATIONS:
                        results.append(func(*generic_args, **generic_kwargs))
                    else:
                        result = self._call(func, name, generic_args, generic_kwargs)
                        in_place = generic_args and geometry_flow.writes_in_place(name)
                        results.append(generic_args[0] if in_place else result)  # __setitem__ returns None
            possible = self._possible(func, name, args, kwargs, unwritten, written)
        except Exception:  # a call that refuses the generic values: the layer keeps the copy's own
            return None
        return results, possible

    def _possible(self, func, name: str, args, kwargs, unwritten, written) -> list | None:
        """Per result of a call on the weights alone, where it may be non-zero whatever its draws show, or None.

        The positions a pick returns (a ``topk``'s, an ``argmax``'s) could be any, and what they index, scatter or
        gather may be non-zero anywhere: the draws say nothing of it. Through products, sums, selections and
        reshapes that follow, the same call on "may be non-zero" (1 or 0; a fixed operand's magnitude) says where:
        a causal mask multiplied in keeps its zeros. After any other call, everywhere.
        """
        base = name.rstrip("_")
        operands = _tensors_among((*args, *kwargs.values()))
        marked = [t for t in operands if self._possible_of(t) is not None]
        picks = base in _CHOICES_BY_VALUE or base in _INDEXED_PICKS or base in ("nonzero", "argwhere")
        if not marked and not picks:
            return None
        items = written if isinstance(written, (tuple, list)) else (written,)
        anywhere = [torch.ones(t.shape, dtype=torch.bool, device=t.device) if isinstance(t, torch.Tensor) else None
                    for t in items]  # fmt: skip
        if picks:  # its positions could be any; its values are their mean (see _on_generic_weights)
            return [p if _is_position(t) else None for p, t in zip(anywhere, items)]
        subtraction = name in _SUBTRACTIONS or name in _REVERSED_SUBTRACTIONS
        if any(_is_position(t) for t in marked) or (base not in _KEEPING_ZEROS and not subtraction):
            return anywhere

        def indicator(value):
            if not isinstance(value, torch.Tensor):
                return value
            possible, twins = self._possible_of(value), self._generic_of(value)
            if possible is None and twins is None:
                if isinstance(value, nn.Parameter) and _stands_for_weights(value):
                    return torch.ones_like(value)
                return value.abs() if value.is_floating_point() else value
            nonzero = torch.zeros_like(value, dtype=torch.bool) if possible is None else possible
            for twin in twins or ():
                nonzero = nonzero | ((twin != 0) & torch.isfinite(twin))
            return nonzero.to(value.dtype) if value.is_floating_point() else value

        call = func
        if subtraction:  # 1 - 1 is no zero of theirs
            call = torch.Tensor.add_ if geometry_flow.writes_in_place(name) else torch.add
        indicators = _each_operand(indicator, args)
        if unwritten is not None or (indicators and geometry_flow.writes_in_place(name)):
            indicators = (indicator(unwritten if unwritten is not None else args[0]).clone(), *indicators[1:])
        with torch.no_grad():
            result = call(*indicators, **{k: indicator(v) for k, v in kwargs.items()})
        if geometry_flow.writes_in_place(name):
            result = indicators[0]
        results = result if isinstance(result, (tuple, list)) else (result,)
        return [r != 0 if isinstance(r, torch.Tensor) and r.shape == t.shape else p
                for r, t, p in zip(results, items, anywhere)]  # fmt: skip

    def _jittered(self, param: nn.Parameter) -> tuple[torch.Tensor, ...]:
        entry = self._jitters.get(id(param))
        if entry is None or entry[0]() is not param:
            draw = torch.rand(param.shape, generator=self._jitter_generator, dtype=param.dtype).to(param.device)
            value = param.detach()
            draws = (value * (1 + draw), value * (2 - 4 * draw), value * (4 * draw - 2))
            entry = self._jitters[id(param)] = (weakref.ref(param), draws)
        return entry[1]

    def _note_generic(self, result, generic: tuple[list, list | None] | None) -> None:
        if generic is None:
            return
        generics, possible = generic
        results = result if isinstance(result, (tuple, list)) else (result,)
        per_draw = [g if isinstance(g, (tuple, list)) else (g,) for g in generics]
        for index, (item, *twins) in enumerate(zip(results, *per_draw)):
            if not all(isinstance(t, torch.Tensor) and t.shape == item.shape for t in (item, *twins)):
                continue
            if any(_shares_memory(twin, item) for twin in twins):  # buf.to(w) returns buf itself
                twins = [twin.clone() for twin in twins]  # a later write into it must not reach the copy's
            key = id(item)
            # Forgotten with the tensor: a twin never outlives what it stands beside (a bias table per block).
            forget = weakref.ref(item, functools.partial(_forget, self._generic, key))
            anywhere = possible[index] if possible is not None and index < len(possible) else None
            self._generic[key] = (forget, tuple(twins), anywhere)
            if item.dtype == torch.bool:
                self._input_masks.update((id(twin), twin) for twin in twins)

    def _generic_zeros_filled(self, name: str, args, kwargs):
        """``args`` and ``kwargs`` with each weight computed in the forward filled where generic weights are not zero.

        A layer's weight (a convolution's, a linear layer's) gets ``1 / fan_in`` there, as the copy's own weights
        are; another operand (a product's, a matmul's) the generic value's magnitude. A value the copy's constants
        make undefined (``0 / 0``: a standardisation without an epsilon) is filled the same way, or 0 where generic
        weights give 0. Only where an operand depends on the input (see :meth:`_on_generic_weights`).
        """
        flat = [*args, *kwargs.values()]
        if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in flat):
            return args, kwargs

        def filled(value, weight: bool):
            twins = self._generic_of(value) if isinstance(value, torch.Tensor) else None
            if twins is None or not value.is_floating_point():
                return value
            undefined = ~torch.isfinite(value)
            generic = functools.reduce(torch.logical_or, [(twin != 0) & torch.isfinite(twin) for twin in twins])
            possible = self._possible_of(value)  # where positions the weights picked may put a value
            if possible is not None:
                generic = generic | possible
            missing = ((value == 0) | undefined) & generic
            if not bool(missing.any()):
                return value  # undefined on every draw too (w / (w - w)): refused as not finite
            value = torch.where(undefined & generic, torch.zeros_like(value), value)
            if weight and value.dim() >= 2:
                return torch.where(missing, 1.0 / math.prod(value.shape[1:]), value)
            magnitude = functools.reduce(torch.maximum, [twin.abs() for twin in twins]).to(value.dtype)
            magnitude = torch.where(torch.isfinite(magnitude) & (magnitude > 0), magnitude, 1.0)
            return torch.where(missing, magnitude, value)

        weighed = name in _WEIGHED
        args = tuple(filled(a, weighed and i == 1) for i, a in enumerate(args))
        return args, {k: filled(v, weighed and k == "weight") for k, v in kwargs.items()}

    def _of_masks(self, func, args, kwargs):
        """A function of masks computed from the input alone (``~m``, ``m & n``, ``m.float()``): a mask again.

        On the copy's values a mask is all True or all False, and which, the architecture does not say: in numbers
        it is 0.5, so a gate by it (``a * m + b * (1 - m)``) keeps both paths. A Python value read from it
        (``if m.any():``) is a branch the copy's input decides (:attr:`branches`), unless the mask only checks that
        the input holds numbers or comes from the weights alone; an integer made of it (a count, positions) is
        followed as such (:meth:`_of_mask_numbers`).
        """
        masks = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and id(a) in self._input_masks]
        unbranching = all(id(mask) in self._unbranching for mask in masks)
        name = getattr(func, "__name__", "")
        result = func(*args, **kwargs)
        if (name in _TO_PYTHON or name in _PYTHON_COMPARISONS) and not unbranching:
            self.branches.append(f"{name}() of a mask computed from the input")
        if isinstance(result, torch.Tensor) and result.is_floating_point():
            result = torch.full_like(result, 0.5)
        for item in result if isinstance(result, (tuple, list)) else (result,):  # unbind(): for m in masks
            if not isinstance(item, torch.Tensor) or item.is_complex():
                continue
            if item.dtype == torch.bool or item.is_floating_point():
                self._input_masks[id(item)] = item
                if unbranching:
                    self._unbranching[id(item)] = item
            elif not unbranching:  # a count or positions, int((y > 0).sum()), m.nonzero(): no mask to twin
                self._mask_numbers[id(item)] = item
        if self.recording and self._compared:
            self._follow_comparisons(name, args, kwargs, result, False)
        return result

    def _of_mask_numbers(self, func, name: str, args, kwargs):
        """A call on integers computed from masks of the input alone (a count, positions).

        A Python value made of them is a branch (:attr:`branches`); a result whose elements are all equal (a share
        of a count, ``(y > 0).sum() / n``) is a mask's number, 0.5; positions keep their values (an index, a one-hot).
        """
        if name in _TO_PYTHON or name in _PYTHON_COMPARISONS:
            self.branches.append(f"{name}() of a number computed from a mask of the input")
        result = func(*args, **kwargs)
        if isinstance(result, torch.Tensor) and result.is_floating_point() and _all_equal(result):
            result = torch.full_like(result, 0.5)  # a share of a count, (y > 0).sum() / n: a mask's number
        for item in _tensors_among((result,)):  # (y > 0).sum() > 0 is a mask of the input again
            if item.dtype == torch.bool or (item.is_floating_point() and _all_equal(item)):
                self._input_masks[id(item)] = item
            else:  # a count, positions, a one-hot of positions: its values, a branch where Python reads them
                self._mask_numbers[id(item)] = item
        return result

    def _mask_as_number(self, operand, args):
        """A mask computed from the input, or an integer made of one, as the factor of a product: 0.5.

        See :meth:`_of_masks`: ``a * (y > 0).long() + b * (1 - ...)`` keeps both paths.
        """
        if not isinstance(operand, torch.Tensor):
            return operand
        counted = id(operand) in self._mask_numbers and _all_equal(operand)  # a gate; positions keep their values
        if not (operand.dtype == torch.bool and id(operand) in self._input_masks) and not counted:
            return operand
        dtype = next((a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
        return torch.full(operand.shape, 0.5, dtype=dtype or torch.get_default_dtype(), device=operand.device)

    def _follow_comparisons(self, name: str, args, kwargs, result, from_input: bool) -> None:
        """Notes a comparison of input-dependent values, or a tensor made of one without a gradient."""
        by: str | None
        if from_input and name in _COMPARISONS and not (len(args) > 1 and args[0] is args[1]):  # not x != x
            by = f"{name}()"
        else:
            direct = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            found = [self.comparison_behind(a) for a in direct]
            by = next((b for b in found if b is not None), None)
        if by is None:
            return
        for item in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(item, torch.Tensor) and not item.requires_grad:
                self._compared[id(item)] = item
                self._compared_by[id(item)] = by

    def comparison_behind(self, tensor) -> str | None:
        """The comparison of input-dependent values that ``tensor`` was made of without a gradient, or None.

        Args:
            tensor: a tensor of the forward pass.

        Returns:
            The comparison's call (``"gt()"``), where ``tensor`` is a mask of the input or was made of one by calls
            that carry no gradient (``(x > 0).float()``, a convolution of it); else None.
        """
        if isinstance(tensor, torch.Tensor) and self._compared.get(id(tensor)) is tensor:
            return self._compared_by.get(id(tensor))
        return None

    def _note_pick_by_position(self, name: str, args, kwargs, result) -> None:
        """Notes in :attr:`position_picks` a call after which fields may differ from one position to another.

        A ``where`` by a fixed condition between two branches, a concatenation or a partial write that joins two
        branches along a spatial dim (:func:`_stitched`, :func:`_stitched_write`), a product by a constant whose
        zeros lie at some positions along a spatial dim and not at others (a blend by a fixed mask, a window). The
        probe then checks its geometry at every index (see probe.py). Spatial dims are those the geometry flow
        followed, else dims 2 on where no permute or reshape moved the channels.
        """
        if name == "where":
            picked = _picks_by_position(args, kwargs, self._input_masks)
            pick = "where() that picks one branch or the other by a fixed condition" if picked else None
        elif name in _JOINS:
            pick = _stitched(name, args, kwargs, self._spatial_dims)
        elif name in _PARTIAL_COPIES:
            pick = _stitched_write(name, args, kwargs, self._spatial_dims)
        elif name in _PICKS_BY_INDEX:
            pick = _reordered(name, args, kwargs, self._spatial_dims)
        elif geometry_flow.cuts_by_zeros(name) and isinstance(result, torch.Tensor):
            dependent = [t for t in (*args, *kwargs.values()) if _depends_on_input(t)]
            dims = self._spatial_dims(result)
            moving = dims is not None and geometry_flow.zeros_move(name, args, kwargs, dependent, dims, result)
            pick = f"{name}() {ZEROS_PICK}" if moving else None
        else:
            return
        if pick == BORDER_PIECES:
            self.border_modes.append(f"{name}(), {BORDER_PIECES}")
            return
        if pick is None:
            return
        # A write in place returns nothing (y[...] = b) or a view: what it wrote into carries the pick on.
        written = result if isinstance(result, torch.Tensor) and not geometry_flow.writes_in_place(name) else args[0]
        written = written if written._base is None or not geometry_flow.writes_in_place(name) else written._base
        if written.grad_fn is not None:
            self.position_picks.append((pick, written.grad_fn))

    def _spatial_dims(self, tensor: torch.Tensor) -> tuple[int, ...] | None:
        """The dims of ``tensor`` that hold the input's spatial axes, where known (see _note_pick_by_position)."""
        dims = None if self.flow is None else self.flow.spatial_dims(tensor)
        if dims is None and tensor.dim() >= 3 and not (self.moved_channels or self.reshaped_channels):
            dims = tuple(range(2, tensor.dim()))
        return dims

    def _note_zeroed(self, zeroed: torch.Tensor, real: Callable[[], torch.Tensor]) -> None:
        self._zeroed[id(zeroed)] = (weakref.ref(zeroed), real)

    def _with_real_values(self, func, name: str, args, kwargs) -> tuple[torch.Tensor] | None:
        """A log of zeroed probabilities (see :attr:`_zeroed`) computed on their real values, or None.

        A constant added or a clamp (``log(p + 1e-30)``, ``p.clamp_min(eps).log()``) keeps the mark on its result.
        """
        zeroed = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and id(a) in self._zeroed]
        entry = self._zeroed.get(id(args[0])) if zeroed and zeroed[0] is args[0] else None
        if entry is not None and entry[0]() is args[0]:
            real = entry[1]
            if name in _LOGARITHMS:
                del self._zeroed[id(args[0])]
                return (func(real(), *args[1:], **kwargs),)
            others = (*args[1:], *kwargs.values())
            if name in _SHIFTS_AND_CLAMPS and not any(isinstance(a, torch.Tensor) and a.requires_grad for a in others):
                result = func(*args, **kwargs)
                self._note_zeroed(result, lambda: func(real(), *args[1:], **kwargs))
                return (result,)
        # Any other use (attention's weights, a write in place, a sum with another branch) reads the zeros: the real
        # values are no longer needed, nor is the softmax's input they hold.
        for tensor in zeroed:
            del self._zeroed[id(tensor)]
        return None

    def _call(self, func, name: str, args, kwargs):
        base = name.rstrip("_")
        if self._zeroed and (real := self._with_real_values(func, name, args, kwargs)):
            return real[0]
        if self.factory_dtype is not None and name in _FACTORIES and kwargs.get("dtype") is None:
            made = func(*args, **kwargs)
            if isinstance(made, torch.Tensor) and made.dtype == torch.get_default_dtype():
                return made.to(self.factory_dtype)
            return made
        if name in _ATTENTIONS:
            args, kwargs = _masks_in_query_dtype(name, args, kwargs)
        if base == "bernoulli" and args and isinstance(args[0], torch.Tensor):
            p = args[1] if len(args) > 1 else kwargs.get("p", 0.5 if name.endswith("_") else None)
            kept = _kept_draw(args[0], p, in_place=name.endswith("_"))
            return kept if kwargs.get("out") is None else kwargs["out"].copy_(kept)
        if self.whole_windows and (picked := _whole_pick(func, name, args, kwargs)) is not None:
            return picked
        if self.linearise and kwargs.get("out") is not None:
            return func(*args, **kwargs)  # as in weights mode: autograd refuses out= on input-dependent tensors
        if self.linearise and (twin := self._selection_twin(func, name, args, kwargs)) is not None:
            return twin
        if self.linearise and name in _MULTIPLICATIONS:
            args = tuple(self._mask_as_number(a, args) for a in args)
        if self.linearise and name in _LINEAR_IN_EACH_OPERAND:
            if self._generic:
                args, kwargs = self._generic_zeros_filled(name, args, kwargs)
            args, kwargs = _unsigned_constants(name, args, kwargs)
        if self.linearise and name in _RECURRENCES and len(args) >= 9 and isinstance(args[3], bool):
            return _recurrence_twin(args[0], args[1], layers=args[4], bidirectional=args[7], batch_first=args[8])
        if self.linearise and name in _RECURRENT_CELLS and len(args) >= 2:
            if (twin := _recurrent_cell_twin(name, args[0], args[1])) is not None:
                return twin
        if self.linearise and name in _FOURIER_TRANSFORMS and _depends_on_input(args[0] if args else None):
            # A filter in the frequency domain may be any kernel along the transformed dims, but the copy's equal
            # weights make it a constant, whose kernel is a single tap: every frequency reads every input instead.
            return func(*args, **kwargs) + args[0].mean(dim=_fourier_dims(name, args, kwargs), keepdim=True)
        if self.linearise and name in _INVERSE_FOURIER_TRANSFORMS and _depends_on_input(args[0] if args else None):
            # And every output of the way back reads every frequency: a term added to every frequency comes back
            # as a single tap (the inverse transform of a constant is an impulse at index 0), and the round trip's
            # own paths to the other outputs are rounding noise on the copy's constants.
            spectrum = args[0].real if args[0].is_complex() else args[0]
            return func(*args, **kwargs) + spectrum.mean(dim=_fourier_dims(name, args, kwargs), keepdim=True)
        if self.linearise and name in _SHORT_TIME_FOURIER_TRANSFORMS:
            args, kwargs = _input_first(args, kwargs)  # torch.stft(input=x, ...)
            if _depends_on_input(args[0] if args else None):
                return _short_time_fourier_twin(func, name, args, kwargs)
        clamped = base in _CLAMPS and _depends_on_input(args[0] if args else kwargs.get("input", kwargs.get("self")))
        # A fake quantization is an identity of the theoretical copy, of a weight too: on the copy's constants with
        # the live scales, a weight's would round a whole channel to zero and cut what it feeds.
        clamped = clamped or name in _FAKE_QUANTIZERS
        if not self.linearise and name in _FAKE_QUANTIZERS:
            return _fake_quantized(func, args, kwargs)
        if base in _DROPOUTS or (self.linearise and (base in _ACTIVATIONS or base in _NORMALISATIONS or clamped)):
            x = args[0] if args else kwargs["input"]
            if name.endswith("_") or kwargs.get("inplace") or (base in _DROPOUTS and _returns_its_input(args, kwargs)):
                return x
            return x.clone()
        if (self.linearise or self.whole_windows) and _pools_with_indices(name, args, kwargs):
            # The indices feed an unpooling (the theoretical twin spreads each value over its whole window): real.
            values, indices = func(*args, **kwargs)
            pool = name.removesuffix("_with_indices")
            if self.linearise:
                return _whole_window_pool(pool, args, kwargs), indices
            whole = _whole_window_pool(pool, (_finite(args[0]), *args[1:]), kwargs)
            # Weights mode: the maxima connect their whole windows (any element may win), but unpooled as they are,
            # each lands where it won, and reads that element alone there.
            pooled = _real_values(values, whole)
            x = args[0] if args else kwargs["input"]
            axes = _MAX_POOLS.get(pool) or int(pool[-2])  # the indices count along the last axes, batched or not
            winners = x.flatten(-axes).gather(-1, indices.flatten(-axes)).view_as(values)
            self._pooled = {k: v for k, v in self._pooled.items() if v[0]() is not None}
            self._pooled[id(pooled)] = (weakref.ref(pooled), pooled._version, winners)  # unchanged in place till used
            return pooled, indices
        if self.whole_windows and name in _MAX_UNPOOLS and args and (entry := self._pooled.get(id(args[0]))):
            if entry[0]() is args[0] and isinstance(args[0], torch.Tensor) and args[0]._version == entry[1]:
                return func(entry[2], *args[1:], **kwargs)
        if self.linearise and name in _WEIGHED and (weight := _collapsed_weight(name, args, kwargs)) is not None:
            at = _WEIGHT_POSITION.get(name, 1)
            if len(args) > at:
                args = (*args[:at], weight, *args[at + 1 :])
            else:
                kwargs = {**kwargs, "weight": weight}
        if (self.linearise or self.whole_windows) and (name in _MAX_POOLS or name in _ADAPTIVE_MAX_POOLS):
            if self.linearise:  # return_indices=False, or not given (with indices: above)
                return _whole_window_pool(name, args, kwargs)
            if not _pools_with_indices(name, args, kwargs):  # weights mode: the real maxima, the windows' gradient
                real = func(*args, **{k: v for k, v in kwargs.items() if k != "return_indices"})
                return _real_values(real, _whole_window_pool(name, (_finite(args[0]), *args[1:]), kwargs))
        if self.linearise and name in _MAX_UNPOOLS:
            return max_unpool_twin(_MAX_UNPOOLS[name], *args, **kwargs)
        if name in _SOFTMAXES and _input_dependent_factors(args[:1] or [kwargs.get("input")]):
            if self.linearise:
                return _softmax_twin(func, name, args, kwargs)
            if "log" in name:  # no weights: log p_j of a masked entry has a gradient near 1, which the real one keeps
                return func(*args, **kwargs)
            probabilities, masked = _masked_softmax(func, name, args, kwargs)
            if masked:
                self._note_zeroed(probabilities, lambda: func(*args, **kwargs))
            return probabilities
        if self.linearise and name == "gumbel_softmax" and (soft := _soft_gumbel_logits(args, kwargs)) is not None:
            # A softmax of the logits plus noise: its twin without the noise, which no field depends on (on the
            # copy's equal values the real one cancels as a softmax does, or not, as the noise falls).
            return _softmax_twin(torch.softmax, "softmax", soft, {})
        if self.linearise and name == "scaled_dot_product_attention" and _input_dependent_factors(_qkv(args, kwargs)):
            return _attention_twin(*args, **kwargs)
        if self.linearise and name == "multi_head_attention_forward":
            _check_self_attention(func, args, kwargs)
        if self.linearise and name in _SIGNED and (twin := _sign_free_twin(name, args, kwargs)) is not None:
            return twin
        if self.linearise and name in _DIFFERENCES_INSIDE and len(args) >= 2 and _depends_on_input(args[0]):
            if _depends_on_input(args[1]) and name.endswith("_"):  # atan2_: the twin written into its target
                apart = getattr(torch, name[:-1])(*_apart(name[:-1], args[0], args[1]), *args[2:], **kwargs)
                return args[0].copy_(apart)
            if _depends_on_input(args[1]):
                return func(*_apart(name, args[0], args[1]), *args[2:], **kwargs)
        if name == "interpolate" and (resized := exact_resize(args, kwargs, unsigned=self.linearise)) is not None:
            return resized if self.exact_values else _real_values(func(*args, **kwargs), resized)
        if name == "grid_sample":
            sampled = exact_grid_sample(args, kwargs, unsigned=self.linearise)
            if sampled is None:
                sampled = func(*args, **kwargs)
            elif not self.exact_values:
                sampled = _real_values(func(*args, **kwargs), sampled)
            if not self.linearise:
                return sampled
            grid = args[1] if len(args) > 1 else kwargs["grid"]
            return _anywhere_twin(
                sampled, args[0] if args else kwargs["input"], [grid.mean(dim=-1).unsqueeze(1)],
                steered=_is_weight(grid, self._from_weights),
            )  # fmt: skip
        if self.linearise and name == "deform_conv2d" and len(args) >= 4:
            # torchvision's deformable convolution (input, weight, offset, mask, ...): the offsets move its taps
            offset_and_mask = [t.mean(dim=1, keepdim=True) for t in args[2:4] if _depends_on_input(t)]
            return _anywhere_twin(func(*args, **kwargs), args[0], offset_and_mask)
        if self.linearise and name in _FLAT_AT_ZERO and (twin := _unflattened(func, name, args, kwargs)) is not None:
            return twin
        if self.linearise and name in _MULTIPLICATIONS and len(factors := _factors(args, kwargs)) == 2:
            if _input_dependent_factors(factors) == 2:
                return _lifted_product(*factors, in_place=name.endswith("_") or name == "__imul__")
        if (
            self.linearise
            and name in _BILINEAR
            and (lifted := _lifted_bilinear(func, name, args, kwargs, self._probabilities)) is not None
        ):
            return lifted
        if self.linearise and name in _PRODUCTS and _input_dependent_factors(args) >= 2:
            return _bounded(func(*args, **kwargs), in_place=name.endswith("_") or name == "__imul__")
        return func(*args, **kwargs)

    def _selection_twin(self, func, name: str, args, kwargs):
        """The theoretical copy's twin of a call that picks some operands' values by their size, or None.

        On the copy's equal values a pick would follow ties, not the architecture, and drop the other paths: a
        ``maximum`` of two branches keeps one, an ``amax`` or a ``sort`` along a dim one element's. The twin reads
        them all: elementwise (``maximum``, ``minimum``, ``fmax``, ``fmin``, ``max``/``min`` of two tensors, a
        ``clamp`` to input-dependent bounds, ``where`` on a mask computed from the input) the mean of the
        input-dependent operands, along a dim (``max``, ``min``, ``amax``, ``amin``, ``sort``, ``topk``, ``median``,
        ``kthvalue``, ``mode``, ``quantile``) the mean over it, and a running pick (``cummax``, ``cummin``) the running
        mean, with the real indices where the call returns them.
        """
        base = name.rstrip("_")
        if _picks_elementwise(base, operands := _pick_operands(args, kwargs)):
            return _mean_of_dependent(operands)
        if base in _CLAMPS and len(args) + len(kwargs) > 1:
            bounds = [
                kwargs.get("min", args[1] if len(args) > 1 else None),
                kwargs.get("max", args[2] if len(args) > 2 else None),
            ]
            x = args[0] if args else kwargs.get("input")
            if any(_depends_on_input(b) for b in bounds):
                twin = _mean_of_dependent([x, *(b for b in bounds if isinstance(b, torch.Tensor))])
                return x.copy_(twin) if name.endswith("_") else twin  # clamp_ is read through x, not its result
            return None
        if base == "where":
            condition, operands = geometry_flow.where_operands(args, kwargs)
            if isinstance(condition, torch.Tensor) and id(condition) in self._input_masks:
                return _mean_of_dependent([condition, *operands])
            return None
        if base == "masked_fill" and len(args) >= 2 and id(args[1]) in self._input_masks:
            value = args[2] if len(args) > 2 else kwargs.get("value")
            return _written(args[0], value, in_place=name.endswith("_"))  # x.masked_fill(x < 0, 0): a ReLU
        if name in ("__getitem__", "masked_select") and len(args) >= 2 and id(args[1]) in self._input_masks:
            # x[m]: on the copy the mask picks everything or nothing; any element may be picked, so all are
            return func(args[0], torch.ones_like(args[1]))
        if name in ("__setitem__", "index_put", "index_put_") and len(args) >= 3:
            indices = args[1] if isinstance(args[1], (tuple, list)) else (args[1],)
            if len(indices) == 1 and id(indices[0]) in self._input_masks and indices[0].shape == args[0].shape:
                value = args[2]  # x[x > t] = y[x > t]: on the copy, the mask picks everything or nothing
                if isinstance(value, torch.Tensor) and value.numel() == args[0].numel() and value.dim() == 1:
                    value = value.reshape(args[0].shape)
                return _written(args[0], value, in_place=True)  # __setitem__'s result is not read
        if _picks_along_dims(base, name, args, kwargs) and args and _depends_on_input(args[0]):
            return _picks_twin(func, base, args, kwargs)
        return _reduced_by_mean(func, name, args, kwargs)


# Fourier transforms into the frequency domain, where spectral layers (FNO, GFNet, FFC) filter; by dims transformed
# by default: the last one, the last two, or all.
_FOURIER_TRANSFORMS = {
    **dict.fromkeys(("fft_fft", "fft_rfft", "fft_ihfft"), 1),
    **dict.fromkeys(("fft_fft2", "fft_rfft2", "fft_ihfft2"), 2),
    **dict.fromkeys(("fft_fftn", "fft_rfftn", "fft_ihfftn"), None),
}


_INVERSE_FOURIER_TRANSFORMS = {
    **dict.fromkeys(("fft_ifft", "fft_irfft", "fft_hfft"), 1),
    **dict.fromkeys(("fft_ifft2", "fft_irfft2", "fft_hfft2"), 2),
    **dict.fromkeys(("fft_ifftn", "fft_irfftn", "fft_hfftn"), None),
}


# Short-time Fourier transforms, each frame on its own: a filter of their spectrogram mixes the frame's samples.
_SHORT_TIME_FOURIER_TRANSFORMS = frozenset({"stft", "istft"})
# Where stft(input, n_fft, hop_length, win_length, window, ...) and istft take their window, if not by name.
_WINDOW_ARGUMENT = 4


def _input_first(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call's arguments with a keyword ``input`` moved to the front (``torch.stft(input=x, n_fft=8)``)."""
    if args or "input" not in kwargs:
        return args, kwargs
    kwargs = dict(kwargs)
    return (kwargs.pop("input"),), kwargs


def _short_time_fourier_twin(func, name: str, args, kwargs) -> torch.Tensor:
    """The theoretical copy's twin of an ``stft`` or ``istft``: every frequency of a frame reads the whole frame.

    A filter of the spectrogram (a learned gain per frequency) may be any kernel inside each frame, but the copy's
    equal weights make it a constant, whose kernel is a single tap: the round trip read its own sample alone, and
    rounding noise around it. As the twins of ``rfft`` and ``irfft`` do along the whole axis, the ``stft`` adds to
    every frequency of a frame twice that frame's sum under the window's magnitude (the frequency 0 of a
    spectrogram with that window; twice, so that no frequency's own term, at most the window's magnitude, cancels
    it where its cosine is -1), and the ``istft`` adds the mean of each frame's frequencies, brought back as the
    frame's frequency 0 alone: an output reads the frames whose windows cover it, no others. A model that reads one
    frequency's real or imaginary part alone reads the whole frame too, where its exact field skips the samples at
    which that frequency's cosine (or sine) is 0.
    """
    result = func(*args, **kwargs)
    if name == "stft":
        window = kwargs.get("window", args[_WINDOW_ARGUMENT] if len(args) > _WINDOW_ARGUMENT else None)
        if isinstance(window, torch.Tensor):
            if len(args) > _WINDOW_ARGUMENT:
                args = (*args[:_WINDOW_ARGUMENT], window.abs(), *args[_WINDOW_ARGUMENT + 1 :])
            else:
                kwargs = {**kwargs, "window": window.abs()}
        frequency_dim = -2 if result.is_complex() else -3  # (..., frequencies, frames), or real pairs after them
        return result + 2 * func(*args, **kwargs).narrow(frequency_dim, 0, 1)
    spectrum = args[0]
    if not spectrum.is_complex():  # torch's istft refuses real pairs: no twin needed
        return result
    parts = spectrum.real + spectrum.imag  # a complex gain's product reads both parts of each frequency
    frame_means = parts.mean(dim=-2, keepdim=True)
    zero_frequency_alone = torch.cat([frame_means, torch.zeros_like(parts[..., 1:, :])], dim=-2)
    zero_frequency_alone = torch.complex(zero_frequency_alone, torch.zeros_like(zero_frequency_alone))
    return result + func(zero_frequency_alone, *args[1:], **kwargs)


def _fourier_dims(name: str, args, kwargs) -> tuple[int, ...]:
    """The dims a Fourier transform runs along: ``fft(x, n, dim)``, ``fft2(x, s, dim)``, ``fftn(x, s, dim)``."""
    x = args[0]
    dim = kwargs.get("dim", args[2] if len(args) > 2 else None)
    if dim is None:
        count = {**_FOURIER_TRANSFORMS, **_INVERSE_FOURIER_TRANSFORMS}[name]
        sizes = kwargs.get("s", args[1] if len(args) > 1 else None)
        if count is None:
            count = x.dim() if sizes is None else len(sizes)
        dim = tuple(range(-count, 0))
    return tuple(d % x.dim() for d in ((dim,) if isinstance(dim, int) else dim))


# Calls that make a tensor like another, in dtype or shape: x.type_as(y) holds x's values only.
_LIKE_ANOTHER = frozenset({"type_as", "view_as", "expand_as", "reshape_as", "to"})
# Products, where a boolean mask computed from the input may gate a path (x * (y > 0)).
_MULTIPLICATIONS = frozenset({"mul", "mul_", "__mul__", "__rmul__", "__imul__", "multiply", "multiply_"})
# Elementwise picks of one operand's value by its size.
_ELEMENTWISE_PICKS = frozenset({"maximum", "minimum", "fmax", "fmin"})
# Picks along a dim: values of some elements (and, for most, their indices).
_PICKS_ALONG_A_DIM = frozenset(
    {"amax", "amin", "aminmax", "sort", "msort", "topk", "median", "nanmedian", "kthvalue", "mode", "cummax",
     "cummin", "quantile", "nanquantile"}
)  # fmt: skip


# Recurrent layers (nn.RNN, nn.LSTM, nn.GRU and their cells) as the functions their modules call. Packed sequences
# (the batch sizes after the data, the parameters fourth, not the bias flag) run as they are.
_RECURRENCES = frozenset({"lstm", "gru", "rnn_tanh", "rnn_relu"})
_RECURRENT_CELLS = frozenset({"lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell"})


def _recurrence_twin(x: torch.Tensor, hx, *, layers: int, bidirectional: bool, batch_first: bool):
    """The theoretical copy's twin of a recurrent layer: every output reads its whole past (and future, both ways).

    On the copy's constants the gates saturate and the gradient through the real recurrence fades step after step:
    an LSTM's last output read its last 185 steps of 400, in float64 too. Each step of a forward direction is the
    running mean of the inputs up to it, of a backward direction the mean from it on; past the first layer of a
    bidirectional stack, every output reads every input. The initial states, where they depend on the input, are
    read by every output.
    """
    states = hx if isinstance(hx, (list, tuple)) else (hx,)
    time = 1 if batch_first else 0
    steps = x.shape[time]
    per_step = x.mean(dim=-1, keepdim=True)
    counts = torch.arange(1, steps + 1, dtype=x.dtype, device=x.device).reshape((-1, 1, 1) if time == 0 else (1, -1, 1))
    forward = per_step.cumsum(time) / counts
    backward = per_step.flip(time).cumsum(time).flip(time) / counts.flip(time)
    whole = per_step.mean(dim=time, keepdim=True)
    initial = [s.mean(dim=(0, -1)).unsqueeze(time).unsqueeze(-1) for s in states if _depends_on_input(s)]
    if initial:  # (batch,) per state: every step reads them
        forward, backward, whole = (t + sum(initial) for t in (forward, backward, whole))
    hidden = states[0].shape[-1]
    if bidirectional and layers > 1:
        output = whole.expand(*forward.shape[:-1], 2 * hidden)
    elif bidirectional:
        output = torch.cat(
            [forward.expand(*forward.shape[:-1], hidden), backward.expand(*forward.shape[:-1], hidden)], -1
        )
    else:
        output = forward.expand(*forward.shape[:-1], hidden)
    last = whole.squeeze(-1).transpose(0, time) if batch_first else whole.squeeze(-1)  # (1, batch)
    finals = tuple(last.unsqueeze(-1).expand_as(s).clone() for s in states)
    return (output.clone(), *finals)


def _recurrent_cell_twin(name: str, x, hx):
    """One step of a recurrent cell on the theoretical copy: every output reads the input and the states.

    The input's mean plus the states' mean: the gradient to the states is 1 in all, step after step, so the first step
    of a long loop is read as the last (a mean of input and states would halve it at every step).
    """
    states = hx if isinstance(hx, (list, tuple)) else (hx,)
    parts = [x.mean(dim=-1, keepdim=True)] if isinstance(x, torch.Tensor) and _depends_on_input(x) else []
    carried = [s.mean(dim=-1, keepdim=True) for s in states if isinstance(s, torch.Tensor) and _depends_on_input(s)]
    if carried:
        parts.append(torch.stack(carried).mean(dim=0))
    if not parts:
        return None
    step = parts[0] if len(parts) == 1 else parts[0] + parts[1]
    outputs = tuple(step.expand_as(s).clone() for s in states)
    return outputs if name == "lstm_cell" else outputs[0]


def _pick_operands(args, kwargs) -> list:
    """The two operands of an elementwise pick, given by position or by keyword (``maximum(a, other=b)``)."""
    first = args[0] if args else kwargs.get("input")
    second = args[1] if len(args) > 1 else kwargs.get("other")
    return [first, second]


# Calls that reduce what lands on one position by a reduction they take by name, and where they take it.
_REDUCTIONS_BY_NAME = {
    "scatter_reduce": (4, "reduce"), "scatter_reduce_": (4, "reduce"), "index_reduce": (4, "reduce"),
    "index_reduce_": (4, "reduce"), "segment_reduce": (1, "reduce"),
}  # fmt: skip


def _reduced_by_mean(func, name: str, args, kwargs):
    """A ``scatter_reduce``, ``index_reduce`` or ``segment_reduce`` by max or min, reduced by the mean instead, or None.

    A max of what lands on one position picks by value, as ``amax`` does: the mean reads every candidate.
    """
    where = _REDUCTIONS_BY_NAME.get(name)
    if where is None:
        return None
    at, keyword = where
    reduction = args[at] if len(args) > at else kwargs.get(keyword)
    if reduction not in ("amax", "amin", "max", "min"):
        return None
    if not any(_depends_on_input(t) for t in (*args, *kwargs.values())):
        return None
    if name.startswith("scatter_reduce") and len(args) > 3 and args[2].shape != args[3].shape:
        # scatter reads src only where index reaches (a batch-1 index beside weights mode's 8 draws): mean's
        # backward wants them alike
        args = (*args[:3], args[3][tuple(slice(0, n) for n in args[2].shape)], *args[4:])
    if len(args) > at:
        return func(*args[:at], "mean", *args[at + 1 :], **kwargs)
    return func(*args, **{**kwargs, keyword: "mean"})


def _picks_elementwise(base: str, operands: list) -> bool:
    """Whether the call picks one of two operands' values elementwise (``maximum``, ``fmin``, ``max(x, y)``).

    Args:
        base: the call's name without a trailing ``_``.
        operands: its two operands, as :func:`_pick_operands` gives them.
    """
    two_tensors = isinstance(operands[1], torch.Tensor)
    return base in _ELEMENTWISE_PICKS or (base in ("max", "min") and two_tensors)


def _picks_along_dims(base: str, name: str, args, kwargs) -> bool:
    """Whether the call picks elements by value along dims: their mean is its twin (see :func:`_picks_twin`).

    ``amax``, ``max(x, dim)``, ``max(x)`` of every element, ``aminmax``, a norm of order inf, ``sort``, ``topk``...
    """
    if base in _PICKS_ALONG_A_DIM or _infinity_norm(name, args, kwargs):
        return True
    return base in ("max", "min") and _reduces_along_a_dim(args, kwargs)


def _whole_pick(func, name: str, args, kwargs):
    """Weights mode's pick by value, with its real values and a gradient to every candidate.

    A max-pool connects its whole window: the input, not a weight, decides which element wins. So do the other picks
    by value: ``amax`` and ``max`` along a dim, ``maximum`` of two input-dependent branches, ``sort``, ``topk``,
    ``median``, ``cummax``, a ``scatter_reduce`` by ``amax``... (the theoretical copy's twins, see
    :meth:`_ProbeFunctions._selection_twin`, give the gradient; entries that are not finite, a mask's -inf, add
    none).

    Args:
        func: the torch function called.
        name: its name.
        args: its positional arguments.
        kwargs: its keyword arguments.

    Returns:
        The pick's result with that gradient, or None for a call that is no pick by value of the input.
    """
    base = name.rstrip("_")
    if base != name or kwargs.get("out") is not None:  # in place, or into a tensor given: as it is
        return None
    if _picks_elementwise(base, operands := _pick_operands(args, kwargs)):
        if sum(_depends_on_input(a) for a in operands) < 2:  # maximum(x, 0): a ReLU, read on the draws
            return None
        twin = _mean_of_dependent([_finite(a) for a in operands])
        return _real_values(func(*args, **kwargs), cast(torch.Tensor, twin))
    if (reduced := _reduced_by_mean(func, name, args, kwargs)) is not None:  # scatter_reduce by amax, ...
        return _real_values(func(*args, **kwargs), reduced)
    if not (_picks_along_dims(base, name, args, kwargs) and args and _depends_on_input(args[0])):
        return None
    real = func(*args, **kwargs)
    twin = _picks_twin(func, base, (_finite(args[0]), *args[1:]), kwargs, real=real)
    if isinstance(real, torch.Tensor):
        return _real_values(real, twin)
    return type(real)((_real_values(real[0], twin[0]), *real[1:]))


def _finite(value):
    """``value`` with its entries 0 where a twin's mean of them would not be finite (a mask's -inf, or its min).

    A max over frames masked with -inf or ``finfo.min`` (padded audio) averaged them: every picked value was NaN.
    """
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return value
    kept = torch.isfinite(value.detach()) & (value.detach().abs() < torch.finfo(value.dtype).max / 2)
    return value.masked_fill(~kept, 0)  # a mask's -inf or finfo.min: a mean of them would overflow


def _whole_window_pool(pool: str, args, kwargs) -> torch.Tensor:
    """A max-pooling's twin (``max_pool2d``, ``adaptive_max_pool2d``...) whose gradient reaches its whole windows."""
    kwargs = {k: v for k, v in kwargs.items() if k != "return_indices"}
    if pool in _MAX_POOLS:
        return max_pool_twin(_MAX_POOLS[pool], *args[:6], **kwargs)
    return _ADAPTIVE_MAX_POOLS[pool](*args[:2], **kwargs)


def _real_values(real: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """``real``'s values with ``exact``'s gradient.

    The exact resize differs from PyTorch's kernel by rounding only, but a later arg-max (a max-pool with indices) can
    break a near tie the other way: the forward must stay the network's own, and only the gradient exact.
    """
    return real.detach() + (exact - exact.detach()).to(real.dtype)  # a float64 twin's zero, in real's dtype


# Autograd nodes of calls that only move, pick or repeat their input's values: the pieces of a concatenation that
# lead back through them alone to one tensor come from one branch (a padding made of border slices, chunks joined
# again, a shift of a slice).
_MOVING_NODES = frozenset(
    {
        "Alias", "AsStrided", "Clone", "Expand", "Flip", "Index", "Narrow", "Permute", "Repeat", "ReshapeAlias",
        "Select", "Slice", "Split", "SplitWithSizes", "Squeeze", "T", "ToCopy", "Transpose", "Unbind",
        "UnsafeSplit", "UnsafeView", "Unsqueeze", "View",
    }
)  # fmt: skip


# Autograd nodes of writes of one tensor into part of another: what they hold comes from both.
_WRITING_NODES = frozenset(
    {"CopySlices", "IndexCopy", "IndexPut", "MaskedScatter", "SelectScatter", "SliceScatter", "Scatter"}
)


def _sources(tensor: torch.Tensor) -> set[int]:
    """The branches ``tensor``'s values come from, by id.

    They are the first autograd nodes behind it that are not one of :data:`_MOVING_NODES`, through writes
    (:data:`_WRITING_NODES`) to every tensor written.
    """
    if tensor.grad_fn is None:
        return {id(tensor)}  # the input itself
    found: set[int] = set()
    stack = [tensor.grad_fn]
    while stack:
        node = stack.pop()
        kind = re.sub(r"Backward\d*$", "", type(node).__name__)
        following = [n for n, _ in node.next_functions if n is not None]
        if kind in _WRITING_NODES:
            stack += following
        elif kind in _MOVING_NODES and following:
            stack.append(following[0])
        else:  # a leaf's node (AccumulateGrad) stands for the leaf, as the leaf itself does above
            found.add(id(getattr(node, "variable", node)))
    return found


# Calls that write one tensor into part of another, by the position of what they write among their arguments (and
# its keyword), and of the dim they write along (None: the key or mask tells).
_PARTIAL_COPIES = {
    "__setitem__": (2, "value", None), "slice_scatter": (1, "src", 2), "select_scatter": (1, "src", 2),
    "index_copy": (3, "source", 1), "index_copy_": (3, "source", 1), "masked_scatter": (2, "source", None),
    "masked_scatter_": (2, "source", None), "copy_": (1, "src", None), "scatter": (3, "src", 1),
    "scatter_": (3, "src", 1), "index_put": (2, "values", None), "index_put_": (2, "values", None),
}  # fmt: skip
_JOINS = frozenset({"cat", "concat", "concatenate"})
# How a pick by a constant's zeros (a window, a validity mask, a blend by a fixed mask) ends its description.
ZEROS_PICK = "by a constant whose zeros lie at some positions along a spatial axis"


def _stitched(name: str, args, kwargs, spatial_dims: Callable) -> str | None:
    """Why a concatenation joins pieces of two or more branches along a spatial dim (channels first), or None.

    Rows of one branch stitched to rows of another (``cat([a[:, :, :8], b[:, :, 8:11], a[:, :, 11:]], 2)``), tiles
    processed apart, levels of a pyramid laid end to end: the fields differ from one position to another, and a
    geometry read at a few of them (the centre, the ends) need not hold in between. Pieces that lead back to one
    tensor through slices, flips and views alone come from one branch, and are a pick too unless they put it back
    in order, padded at most at its ends (:func:`_in_order`); such a padding returns :data:`BORDER_PIECES`.
    ``spatial_dims(tensor)``: the dims that hold the input's spatial axes, or None where unknown.
    """
    joined = args[0] if args else kwargs.get("tensors")
    if not isinstance(joined, (list, tuple)):
        return None
    pieces = [t for t in joined if _depends_on_input(t)]
    dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
    if not pieces or not isinstance(dim, int) or (dims := spatial_dims(pieces[0])) is None:
        return None
    if dim % pieces[0].dim() not in dims:
        return None
    branches = len(set().union(*map(_sources, pieces)))
    if branches >= 2:
        return f"{name}() that joins pieces of {branches} branches along a spatial axis"
    padding = _in_order(list(joined), dim % pieces[0].dim())
    if padding < 0:
        return f"{name}() that joins pieces of one tensor out of their order along a spatial axis"
    return BORDER_PIECES if padding else None


def _in_order(joined: list, dim: int) -> int:
    """How a concatenation along ``dim`` pads one tensor's pieces put back as they lay (-1: they are not so).

    Its core must be slices (step 1) or splits of one tensor along ``dim``, or that tensor whole, each starting where
    the one before it stopped, from the tensor's first index to its last (``cat(y.chunk(2, dim), dim)``). Pieces
    before and after it are a padding, shorter than the tensor on each side, as ``F.pad``'s reflections are:
    constants (class tokens), or pieces of the core's tensor (flipped, or a single row repeated) that lie as near
    its ends as the padding is wide (a reflection, a replication, a wrap); their fields are read index by index at
    the axis's ends. Pieces swapped (``cat([y[..., 5:6], y[..., 4:5]])``), a row flipped or shifted along another
    axis, a gap, a constant inside the core, an interior slice as a padding or a tiling move fields from one
    position to another.

    Returns:
        -1 where the pieces are not a core and its padding, else how many positions the padding reads the core's
        tensor at (0: constants alone).
    """
    ranges = [_piece_range(piece.grad_fn, piece, dim) if _depends_on_input(piece) else None for piece in joined]
    lengths = [piece.shape[dim] if isinstance(piece, torch.Tensor) and piece.dim() > dim else 0 for piece in joined]
    for first, found in enumerate(ranges):
        if found is None or not found[4] or found[1] != 0:
            continue
        source, _, stop, length, _ = found
        last = first
        while stop != length and last + 1 < len(ranges):
            following = ranges[last + 1]
            if following is None or not following[4] or following[0] != source or following[1] != stop:
                break
            last, stop = last + 1, following[2]
        if stop != length or max(sum(lengths[:first]), sum(lengths[last + 1 :])) >= length:
            continue
        width = sum(lengths) - length
        padding = [i for i, piece in enumerate(joined) if not first <= i <= last and _depends_on_input(piece)]
        near = all(
            (piece := ranges[i]) is not None and piece[0] == source
            and (piece[2] <= width + 1 or piece[1] >= length - width - 1)
            for i in padding
        )  # fmt: skip
        return sum(lengths[i] for i in padding) if near else -1
    return -1


def _piece_range(node: Any, piece: torch.Tensor, dim: int) -> tuple[tuple, int, int, int, bool] | None:
    """Where a piece of a concatenation was cut from: ``(source, start, stop, length, as_it_lay)`` along ``dim``.

    ``node`` is the piece's autograd node (its saved arguments are read by name). A slice (step 1) or a split along
    ``dim`` of a tensor (``source``: its autograd node's id and which of the node's outputs it is, as the halves of
    a split share one node; ``length``: its length along ``dim``), or that tensor whole, lies as it lay; a slice
    flipped along ``dim`` or a single row of it repeated (``expand``) holds the same positions in another order
    (``as_it_lay`` False). None for any other piece.
    """
    if node is None:
        return None
    kind, moved, extent = type(node).__name__, False, piece.shape[dim]
    if kind in ("FlipBackward0", "ExpandBackward0"):
        if kind == "FlipBackward0" and [d % piece.dim() for d in node._saved_dims] != [dim]:
            return None
        inner = node.next_functions[0][0]
        if kind == "ExpandBackward0":
            extent = 1  # a single row along dim, repeated (a replication)
        node, moved = inner, True
        kind = type(node).__name__
        if kind not in ("SliceBackward0", "SplitBackward0", "SplitWithSizesBackward0"):
            return None  # a whole tensor flipped or repeated: no padding of it
    if kind not in ("SliceBackward0", "SplitBackward0", "SplitWithSizesBackward0"):
        return (id(node), piece.output_nr), 0, extent, extent, True
    sizes = node._saved_self_sym_sizes
    if node._saved_dim % len(sizes) != dim:
        return None
    if kind == "SliceBackward0":
        if node._saved_step != 1:
            return None
        start = node._saved_start - (1 << 64) if node._saved_start >= 1 << 63 else node._saved_start
        start = min(max(start + sizes[dim] if start < 0 else start, 0), sizes[dim])
    elif moved:
        return None  # a flipped split: which piece it is, its own output number does not say
    elif kind == "SplitBackward0":
        start = piece.output_nr * node._saved_split_size
    else:
        start = sum(node._saved_split_sizes[: piece.output_nr])
    source, output = node.next_functions[0]
    return (id(source), output), start, start + extent, sizes[dim], not moved


# How a join or an index that pads a tensor with its own border pieces is noted (see _note_pick_by_position): no
# pick, a padding whose fields the ends' checks read index by index.
BORDER_PIECES = "a padding made of border pieces"


# Calls that pick positions by an index tensor (or list, or fixed mask); how each takes its dim (see _reordered).
_PICKS_BY_INDEX = frozenset({"__getitem__", "index_select", "gather", "take_along_dim"})


def _reordered(name: str, args, kwargs, spatial_dims: Callable) -> str | None:
    """Why a fixed index picks positions along a spatial dim in another order than a slice would, or None.

    ``y[..., perm]`` with two positions swapped, an ``index_select`` or ``gather`` by a fixed table: output ``i``
    reads input ``index[i]``, and a geometry read at a few indices need not hold at the others. An index that
    steps evenly forward (``torch.arange(0, n, 2)``, a mask of every other position) reads as a slice does, and is
    no pick; an index computed from the input is another matter (a selection by value).
    """
    source = args[0] if args else kwargs.get("input")
    if not isinstance(source, torch.Tensor) or (dims := spatial_dims(source)) is None:
        return None
    n = source.dim()
    if name == "__getitem__":
        along = _indexed_dims(args[1] if len(args) > 1 else None, n)
        if along is None:
            return None
        reordered: list[int] = []
        padded: list[int] = []
        for d, index in along.items():
            if d in dims and not _even_steps(index, source.shape[d], None):
                padding = _padded(index, source.shape[d])
                if padding < 0:
                    reordered.append(d)
                elif padding > 0:
                    padded.append(d)
        if len(along) > 1 and any(d in dims for d in along):
            reordered = reordered or [next(d for d in along if d in dims)]  # indices broadcast together: unsure
    else:
        at_dim, at_index = (2, 1) if name == "take_along_dim" else (1, 2)  # (input, indices, dim) there
        dim = args[at_dim] if len(args) > at_dim else kwargs.get("dim")
        index = args[at_index] if len(args) > at_index else kwargs.get("index", kwargs.get("indices"))
        if not isinstance(dim, int) or not isinstance(index, torch.Tensor) or dim % n not in dims:
            return None
        dim %= n
        even = _even_steps(index, source.shape[dim], None if name == "index_select" else dim)
        padding = _padded(index, source.shape[dim]) if name == "index_select" else -1
        reordered = [] if even or padding >= 0 else [dim]
        padded = [dim] if not even and padding > 0 else []
    if not reordered:
        return BORDER_PIECES if padded else None
    return f"{name}() that picks positions along a spatial axis by a fixed index, not in even steps"


def _indexed_dims(key, n_dims: int) -> dict[int, Any] | None:
    """The dims ``x[key]`` indexes by a tensor, a list or a mask, each with its index (a mask as its positions).

    None where nothing is indexed that way, or where an index depends on the input (a selection by value).
    """
    entries = list(key) if isinstance(key, tuple) else [key]
    if not any(isinstance(e, (torch.Tensor, list)) for e in entries):
        return None
    taken = sum(1 if not isinstance(e, torch.Tensor) or e.dtype != torch.bool else e.dim() for e in entries
                if e is not None and e is not Ellipsis)  # fmt: skip
    found: dict[int, Any] = {}
    dim = 0
    for entry in entries:
        if entry is Ellipsis:
            dim += n_dims - taken
        elif entry is None:
            continue
        elif isinstance(entry, (torch.Tensor, list)):
            index = torch.as_tensor(entry) if isinstance(entry, list) else entry
            if _depends_on_input(index):
                return None
            if index.dtype == torch.bool:
                if index.dim() != 1:
                    found.update({d: None for d in range(dim, dim + index.dim())})  # positions of several dims
                    dim += index.dim()
                    continue
                index = index.nonzero().flatten()
            found[dim] = index
            dim += 1
        else:
            dim += 1
    return found or None


def _padded(index, size: int) -> int:
    """How many entries pad a 1-D ``index`` that holds every position ``0 .. size - 1`` in order (-1: it does not).

    A padding written as an index (a symmetric or reflecting one, ``x[..., [1, 0, 0, 1, ..., n - 1, n - 1]]``): its
    entries lie as near the ends as the padding is wide, and their fields are read index by index at the axis's
    ends, as ``F.pad``'s reflections are.

    Returns:
        -1 where it is no such index, else how many entries pad (0: none).
    """
    if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.is_floating_point() or index.numel() < size:
        return -1
    index = index.remainder(size)
    width = len(index) - size
    if 2 * size < len(index):
        return -1
    order = torch.arange(size, device=index.device)
    for start in (index == 0).nonzero().flatten().tolist():
        if start + size <= len(index) and bool((index[start : start + size] == order).all()):
            padding = torch.cat([index[:start], index[start + size :]])
            near = bool(((padding <= width) | (padding >= size - width - 1)).all())
            return width if near else -1
    return -1


def _even_steps(index, size: int, dim: int | None) -> bool:
    """Whether ``index`` (along ``dim`` of a ``gather``'s table, or a 1-D index) steps forward evenly: a slice.

    A table whose first index or step differs from one row to another (a shear) steps unevenly.
    """
    if not isinstance(index, torch.Tensor) or index.dtype in (torch.bool, torch.uint8) or index.is_floating_point():
        return False
    if dim is None:
        if index.dim() != 1:
            return False
        dim = 0
    index = index.remainder(size)
    steps = index.diff(dim=dim)
    first = index.narrow(dim, 0, 1)
    if not bool((first == first.flatten()[0]).all()):
        return False
    return steps.numel() == 0 or (bool((steps == steps.flatten()[0]).all()) and int(steps.flatten()[0]) >= 1)


def _stitched_write(name: str, args, kwargs, spatial_dims: Callable) -> str | None:
    """Why a write of one tensor into part of another joins two or more branches along a spatial dim, or None.

    ``y[:, :, 8:11] = b[:, :, 8:11]`` into a copy of ``a``, ``slice_scatter``, ``index_copy``, a ``masked_scatter``
    by a fixed mask, a ``copy_`` into a slice: rows of one branch among another's, as :func:`_stitched` joins them.
    """
    copied = _PARTIAL_COPIES.get(name)
    if copied is None or not args or not isinstance(args[0], torch.Tensor):
        return None
    target, (at, keyword, dim_at) = args[0], copied
    value = args[at] if len(args) > at else kwargs.get(keyword)
    whole = target if name != "copy_" else target._base
    if whole is None or not _depends_on_input(value) or (dims := spatial_dims(whole)) is None:
        return None
    if not _writes_part_of(name, target, whole, args, kwargs, dim_at, dims):
        return None
    branches = len(_sources(whole) | _sources(value))
    return None if branches < 2 else f"{name}() that writes one branch into part of another along a spatial axis"


def _writes_part_of(name: str, target, whole, args, kwargs, dim_at, dims: tuple[int, ...]) -> bool:
    """Whether a partial copy (see :data:`_PARTIAL_COPIES`) leaves part of one of the spatial ``dims`` as it was.

    Where it cannot tell (an index of several dims, a mask), it says it may.
    """
    n = whole.dim()
    if name in ("index_put", "index_put_"):
        return True
    if dim_at is not None:
        dim = args[dim_at] if len(args) > dim_at else kwargs.get("dim", 0)
        if not isinstance(dim, int) or dim % n not in dims:
            return False
        if name.startswith("scatter"):
            return True
        if name == "select_scatter":
            return whole.shape[dim] > 1
        if name == "slice_scatter":
            start, end, step = (args[i] if len(args) > i else kwargs.get(k, d) for i, k, d in
                                ((3, "start", None), (4, "end", None), (5, "step", 1)))  # fmt: skip
            return len(range(*slice(start, end, step).indices(whole.shape[dim]))) < whole.shape[dim]
        index = args[2] if len(args) > 2 else kwargs.get("index")
        return isinstance(index, torch.Tensor) and len(set(index.tolist())) < whole.shape[dim]
    if name.startswith("masked_scatter"):
        mask = args[1] if len(args) > 1 else kwargs.get("mask")
        if not isinstance(mask, torch.Tensor) or mask.requires_grad:
            return False
        mask = mask.expand(whole.shape)
        return any(not bool((mask.any(d) == mask.all(d)).all()) for d in dims)
    if name == "copy_":  # into a view of the whole: the dims it keeps whole
        return target.dim() != n or any(target.shape[d] < whole.shape[d] for d in dims)
    with torch.no_grad():
        region = whole[args[1]]
    return region.dim() != n or any(region.shape[d] < whole.shape[d] for d in dims)


# Nodes a walk visits when nothing calls for the whole graph (see autograd_nodes).
WALK_LIMIT = 5000


def autograd_nodes(tensor: torch.Tensor, limit: int | None = None) -> Iterator[Any]:
    """Each node of ``tensor``'s autograd graph once, from its ``grad_fn`` back to the leaves' nodes.

    Iterative: a deep model's graph would overflow Python's stack. Each node walked keeps the Python wrapper the walk
    made, and a chain of wrapped nodes is freed recursively, in C: a graph tens of thousands of nodes deep (a
    recurrence stepped in Python over a long input) overflows the C stack when it is freed. ``limit``: at most this
    many nodes, nearest the output first.
    """
    seen: dict[int, Any] = {}  # the wrappers by id, alive while the walk runs: an id is not reused
    queue = collections.deque([tensor.grad_fn])
    while queue and (limit is None or len(seen) < limit):
        node = queue.popleft()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        yield node
        queue.extend(next_node for next_node, _ in node.next_functions)


def picks_on_path(picks: list[tuple[str, Any]], output: torch.Tensor) -> list[str]:
    """The selections by position (see ``position_picks``) whose result ``output``'s autograd graph reaches."""
    if not picks:
        return []
    wanted = {id(node): text for text, node in picks}
    found = [wanted[id(node)] for node in autograd_nodes(output) if id(node) in wanted]
    return list(dict.fromkeys(found))


def _picks_by_position(args, kwargs, masks) -> bool:
    """Whether a ``where`` picks between two input-dependent operands by a fixed condition, neither all one side.

    A condition made from the input or the weights (``masks``) may pick either side anywhere; a fixed one picks
    each position's operand, and a position that picks the other branch has another field.
    """
    condition, operands = geometry_flow.where_operands(args, kwargs)
    if not isinstance(condition, torch.Tensor) or id(condition) in masks or condition.requires_grad:
        return False
    if sum(_depends_on_input(operand) for operand in operands) < 2:
        return False
    return bool(condition.any()) and not bool(condition.all())


def _is_weight(tensor, from_weights) -> bool:
    """Whether ``tensor`` is a floating parameter of the copy, or was computed from them without the input.

    The copy keeps a parameter of booleans or integers as it is (a mask, a table of indices): its values are the
    architecture's, not a constant standing for any weights.
    """
    if isinstance(tensor, nn.Parameter):
        return _stands_for_weights(tensor)
    return isinstance(tensor, torch.Tensor) and id(tensor) in from_weights


def _parameter_of(value):
    """The parameter ``value`` is, or is a view of; else ``value`` itself."""
    return value._base if isinstance(value, torch.Tensor) and isinstance(value._base, nn.Parameter) else value


def _kept_as_mask(value) -> bool:
    """Whether ``value`` is a parameter of the copy (or a view of one) kept as a fixed mask (:func:`is_fixed_mask`)."""
    param = _parameter_of(value)
    return isinstance(param, nn.Parameter) and getattr(param, "_rf_fixed_mask", False)


def _stands_for_weights(value) -> bool:
    """Whether ``value`` is a floating parameter of the copy (or a view of one) other than a fixed mask.

    On the theoretical copy those are positive constants that stand for any weights; a fixed mask
    (:func:`is_fixed_mask`) keeps its real values, as a buffer does.
    """
    param = _parameter_of(value)
    return isinstance(param, nn.Parameter) and param.is_floating_point() and not _kept_as_mask(param)


def _anywhere_twin(
    sampled: torch.Tensor, x: torch.Tensor, guides: list[torch.Tensor], *, steered: bool = False
) -> torch.Tensor:
    """A sampling of ``x`` at places the forward computes from the input, as the theoretical copy reads it.

    Where a ``grid_sample``'s grid or a deformable convolution's offsets (and mask) depend on the input (a spatial
    transformer, a predicted flow, DCN), the architecture lets each output sample any input position, and read the
    ``guides``' own fields (each one value per output position, broadcast over its channels): on the copy's equal
    values neither shows (the gradient through a sampling position over a constant image is zero). Each output gets
    the mean of the whole input and of its guides beside its sample. Fixed places (a warp by constants) keep their
    sample alone; places the weights compute (``steered``: a learned affine, a grid held in a parameter) may be any
    for some weights, so each output reads the whole input.
    """
    guides = [g for g in guides if _depends_on_input(g)]
    if not guides and not steered:
        return sampled
    spatial = tuple(range(2, x.dim()))
    whole = x.mean(dim=spatial, keepdim=True) if _depends_on_input(x) else torch.zeros_like(sampled)
    return (sampled + whole.expand_as(sampled) + sum(g.expand_as(sampled) for g in guides)) / (2 + len(guides))


def _written(target, value, *, in_place: bool):
    """``target`` where a mask computed from the input writes ``value``, or None where neither depends on the input.

    The mean of both where ``value`` depends on the input, else ``target`` itself.
    """
    if not _depends_on_input(value):
        if not _depends_on_input(target):
            return None
        return target if in_place else target.clone()
    mean = _mean_of_dependent([target, value])
    return target.copy_(mean) if in_place else mean


def _mean_of_dependent(operands) -> torch.Tensor | None:
    """The mean of the input-dependent tensors of ``operands`` (the others shape it only), or None if none is."""
    tensors = [t for t in operands if isinstance(t, torch.Tensor)]
    dependent = [t for t in tensors if t.requires_grad]
    if not dependent:
        return None
    shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    return torch.stack([t.expand(shape) for t in dependent]).mean(dim=0)


def _picks_twin(func, base: str, args, kwargs, real=None):
    """A pick along a dim with the mean's values over that dim (and the real indices, where it returns them).

    ``real``: the call's result, where the caller has it already.
    """
    x = args[0]
    real = func(*args, **kwargs) if real is None else real
    if base in ("cummax", "cummin"):  # the running pick: the running mean over the elements so far
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        counts = torch.arange(1, x.shape[dim] + 1, dtype=x.dtype, device=x.device)
        shape = [1] * x.dim()
        shape[dim] = x.shape[dim]
        return type(real)((x.cumsum(dim) / counts.reshape(shape), real[1]))
    if base in _NORMS:  # of order inf: the largest magnitude
        dim = kwargs.get("dim", args[2] if len(args) > 2 else None)
        keepdim = kwargs.get("keepdim", len(args) > 3 and args[3])
        size = x.abs()
        return (size.mean() if dim is None else size.mean(dim=dim, keepdim=keepdim)).expand(real.shape)
    if base == "aminmax":  # (min, max) along dim=, or of every element
        dim = kwargs.get("dim")
        mean = x.mean() if dim is None else x.mean(dim=dim, keepdim=kwargs.get("keepdim", False))
        return type(real)((mean.expand(real[0].shape), mean.expand(real[1].shape)))
    if base == "msort":
        dim = 0
    elif base in ("amax", "amin"):
        dim = kwargs.get("dim", args[1] if len(args) > 1 else ())
    elif base in ("topk", "kthvalue"):
        dim = kwargs.get("dim", args[2] if len(args) > 2 else -1)
    elif base in ("quantile", "nanquantile"):  # (x, q, dim=None, keepdim=False): a tensor q adds a leading dim
        dim = kwargs.get("dim", args[2] if len(args) > 2 else None)
        keepdim = kwargs.get("keepdim", len(args) > 3 and args[3])
        return (x.mean() if dim is None else x.mean(dim=dim, keepdim=keepdim)).expand(real.shape)
    else:
        dim = kwargs.get(
            "dim", args[1] if len(args) > 1 else (None if base in ("median", "nanmedian", "max", "min") else -1)
        )
    values = real if isinstance(real, torch.Tensor) else real[0]
    if dim is None or dim == () or dim == []:
        mean = x.mean()
    else:
        mean = x.mean(dim=dim, keepdim=True)
    mean = mean.expand(values.shape) if mean.dim() == values.dim() or mean.dim() == 0 else mean.reshape(values.shape)
    if isinstance(real, torch.Tensor):
        return mean
    return type(real)((mean, real[1]))


# Functions that reduce a tensor along dims (or weigh it along one, or contract it along its last dim, as attention's
# weights times its values do): along a spatial dim, every output position depends on the whole axis.
_CONTRACTIONS = frozenset({"matmul", "__matmul__", "__rmatmul__", "bmm"})
_COUPLINGS = frozenset(
    {"mean", "sum", "amax", "amin", "std", "var", "std_mean", "var_mean", "logsumexp", "nansum", "nanmean", "prod",
     "max", "min", "norm", "normalize", "linalg_vector_norm", "vector_norm"}
) | _SOFTMAXES | _CONTRACTIONS | frozenset(_FOURIER_TRANSFORMS)  # fmt: skip


# Attention calls, and the dim of their key tensor whose positions the hidden softmax runs over: (..., S, E) for
# scaled_dot_product_attention, (S, N, E) or (S, E) for multi_head_attention_forward.
_KEY_DIMS: dict[str, Callable[[torch.Tensor], tuple[int, ...]]] = {
    "scaled_dot_product_attention": lambda key: (key.dim() - 2,) if key.dim() >= 2 else (),
    "multi_head_attention_forward": lambda key: (0,) if key.dim() >= 2 else (),
}


def _key_of(name: str, args, kwargs):
    """The key tensor of an attention call (its second argument)."""
    return args[1] if len(args) > 1 else kwargs.get("key")


def _unmasked(name: str, args, kwargs) -> bool:
    """Whether an attention call attends to every key: no mask, not causal."""
    if name == "scaled_dot_product_attention":
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        causal = args[5] if len(args) > 5 else kwargs.get("is_causal", False)
        return mask is None and not causal
    masks = [kwargs.get(k) for k in ("attn_mask", "key_padding_mask")] + list(args[14:15]) + list(args[16:17])
    return all(m is None for m in masks) and not kwargs.get("is_causal", False)


def _reduced_dims(name: str, args, kwargs) -> tuple[int, ...]:
    """The dims a reduction or softmax call runs along, non-negative; all of them where it reduces to one value."""
    x = args[0]
    if name in _FOURIER_TRANSFORMS:
        return tuple(sorted(_fourier_dims(name, args, kwargs)))
    if name in _CONTRACTIONS:
        other = args[1] if len(args) > 1 else None
        both = isinstance(other, torch.Tensor) and other.requires_grad and x.dim() >= 2
        return (x.dim() - 1,) if both else ()  # two input-dependent factors (attention), contracted along x's last dim
    if name == "norm":
        dim = kwargs.get("dim", args[2] if len(args) > 2 else None)
    elif name == "normalize":  # F.normalize(x, p=2.0, dim=1): x over its norm along dim
        dim = kwargs.get("dim", args[2] if len(args) > 2 else 1)
    elif name in ("linalg_vector_norm", "vector_norm"):  # (x, ord=2, dim=None)
        dim = kwargs.get("dim", args[2] if len(args) > 2 else None)
    elif name in ("max", "min"):
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        if not isinstance(dim, int) or isinstance(dim, bool):
            return ()  # max(x) of everything is no path the probe follows; max(x, y) is elementwise
    else:
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if name in _SOFTMAXES and dim is None:
        dim = 0 if x.dim() in (0, 1, 3) else 1
    if dim is None:
        return tuple(range(x.dim()))
    if isinstance(dim, torch.Tensor) or not isinstance(dim, (int, tuple, list)) or isinstance(dim, bool):
        return ()
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    if not all(isinstance(d, int) and -x.dim() <= d < x.dim() for d in dims):
        return ()
    return tuple(sorted(d % x.dim() for d in dims))


# Calls that read a tensor at positions another gives, and calls where a mask gates a tensor.
_INDEXINGS = frozenset(
    {"__getitem__", "__setitem__", "index", "gather", "index_select", "take_along_dim", "take", "index_put", "scatter",
     "scatter_add", "index_add", "index_copy", "index_fill", "masked_select", "embedding", "narrow"}
)  # fmt: skip
_MASK_USES = _MULTIPLICATIONS | {"where", "masked_fill", "masked_fill_", "div", "__truediv__", "einsum", "matmul",
                                  "__matmul__"}  # fmt: skip
_DECIDES = {
    "choice": "chooses the positions the output reads",
    "mask": "masks what the output reads",
    "python": "decides a branch of the forward in Python",
}
# Random draws of positions or choices, and random values (see _ProbeFunctions._note_random_draws).
_RANDOM_CHOICES = frozenset({"randperm", "randint", "randint_like", "multinomial"})
_RANDOM_VALUES = frozenset(
    {"rand", "rand_like", "randn", "randn_like", "normal", "uniform_", "normal_", "exponential_", "cauchy_",
     "log_normal_", "geometric_", "random_", "poisson"}
)  # fmt: skip
# Calls that turn values into 0 or 1 (or into steps): of random values, a random mask (a drop-path's).
_RANDOM_MASKINGS = frozenset(
    {"floor", "ceil", "round", "trunc", "sign", "heaviside", "lt", "le", "gt", "ge", "eq", "ne", "less", "greater",
     "__lt__", "__le__", "__gt__", "__ge__", "__eq__", "__ne__"}
)  # fmt: skip
# Calls that choose positions by values: of random values, a random choice.
_CHOICES_BY_VALUE = frozenset({"argsort", "argmax", "argmin", "sort", "topk", "max", "min", "kthvalue"})
_RANDOM_DRAWS = _RANDOM_CHOICES | _RANDOM_VALUES | {"gumbel_softmax"}
# Picks along a dim that return the positions they chose beside the values.
_INDEXED_PICKS = frozenset({"max", "min"}) | _PICKS_ALONG_A_DIM - {"amax", "amin", "msort", "quantile", "nanquantile"}


def _fractional_pool_cut(name: str, args, kwargs, linearise: bool) -> list[str]:
    """Why a fractional max-pooling cannot be probed: regions drawn at random, or a max the copy cannot read."""
    if linearise:  # its regions are not exposed: no mean-pool twin over them, and ties would pick one element
        return [f"{name}(), a max over regions theoretical mode cannot read as a mean (use mode='weights')"]
    if kwargs.get("_random_samples", args[5] if len(args) > 5 else None) is None:
        return [f"{name}(), whose pooling regions are drawn at random on every forward: the field would be one draw's "
                f"(fix them with _random_samples=)"]  # fmt: skip
    return []


def _tensors_among(values) -> list[torch.Tensor]:
    """The tensors among ``values`` and inside the lists and tuples among them (an index tuple, ``cat``'s list)."""
    found: list[torch.Tensor] = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found += _tensors_among(value)
    return found


def _from_shape_alone(name: str) -> bool:
    return name in ("new_zeros", "new_ones", "new_empty", "new_full") or name.endswith("_like")


# Calls that turn an input-dependent tensor into Python values, out of the gradient's reach.
_TO_PYTHON = frozenset({"item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__"})

# The layers that read the input's channels (dim 1 of a convolution's input) or features (a recurrence's last dim:
# the steps lie before it), the calls that move its dims, and the pointwise ones that keep them (x / 255,
# (x - mean) / std, a cast, a slice, a pad). Not a linear layer or a layer norm: on an (N, C, L) input one may mix
# or normalise the positions (a token mixer, DLinear's Linear(L, horizon)) as well as an (N, L, C) input's channels.
# Arguments compared by value in a call's trace entry (see _ProbeFunctions.trace); any other by its type's name.
_PLAIN = frozenset({bool, int, str, type(None), slice, type(Ellipsis), torch.dtype, torch.device, torch.memory_format})


def _plain_arguments(values) -> tuple:
    """The plain values among a call's arguments, nested as they are; a float as text (a NaN equals itself)."""
    plain: list = []
    for value in values:
        kind = type(value)
        if kind in _PLAIN:
            plain.append(value)
        elif kind is float:
            plain.append(repr(value))
        elif kind in (tuple, list, torch.Size):
            plain.append(_plain_arguments(value))
        elif kind is dict:
            plain.append(_plain_arguments(value.items()))
        else:
            plain.append(kind.__name__)
    return tuple(plain)


_INPUT_LAYERS = frozenset(
    {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "lstm", "gru",
     "rnn_tanh", "rnn_relu"}
)  # fmt: skip
_LAYOUT_MOVES = frozenset({"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis"})
_POINTWISE_ON_INPUT = frozenset(
    {"clone", "contiguous", "to", "float", "double", "half", "bfloat16", "type", "type_as", "add", "sub", "rsub",
     "mul", "div", "true_divide", "neg", "clamp", "clip", "nan_to_num", "log1p", "abs", "sqrt", "pow", "exp", "log"}
)  # fmt: skip
_KEEPING_DIMS = frozenset({"pad", "__getitem__", "narrow"})  # of the same rank: the channels' dim stays


def _all_equal(tensor: torch.Tensor) -> bool:
    """Whether every element of ``tensor`` is equal: a number made of a mask is, on the copy's constant input."""
    return tensor.numel() > 0 and bool((tensor == tensor.flatten()[0]).all())


def _einsum_order(equation: str) -> tuple[int, ...]:
    """The permutation a one-operand einsum that only reorders dims makes (``"nlc->ncl"``: 0, 2, 1), else ``()``."""
    source, _, target = equation.replace(" ", "").partition("->")
    if "." in equation or sorted(source) != sorted(target) or len(set(source)) != len(source):
        return ()
    return tuple(source.index(letter) for letter in target)


def _moved_dim(name: str, args, kwargs, rank: int, dim: int) -> int | None:
    """Where ``dim`` of a tensor of ``rank`` dims lies after a permute, transpose or movedim; None if unread."""
    try:
        if name in ("transpose", "swapaxes", "swapdims") and len(args) < 2:  # torch.transpose(x, dim0=1, dim1=2)
            args = (kwargs["dim0"], kwargs["dim1"])
        return geometry_flow.permutation(name, args, kwargs, rank).index(dim)
    except (TypeError, ValueError, KeyError, IndexError):
        return None


# Calls that make a tensor from nothing but numbers, at the default dtype where none is given.
_FACTORIES = frozenset(
    {"zeros", "ones", "full", "empty", "empty_strided", "rand", "randn", "normal", "linspace", "logspace", "arange",
     "range", "eye", "tensor", "as_tensor", "scalar_tensor", "hann_window", "hamming_window", "blackman_window",
     "bartlett_window", "kaiser_window"}
)  # fmt: skip
_ATTENTIONS = frozenset({"scaled_dot_product_attention", "multi_head_attention_forward"})


def _masks_in_query_dtype(name: str, args, kwargs):
    """An attention's float masks in its query's dtype: torch misreads a float32 mask beside float64 queries."""
    query = args[0] if args else kwargs.get("query")
    if not isinstance(query, torch.Tensor):
        return args, kwargs

    def cast(mask):
        if isinstance(mask, torch.Tensor) and mask.is_floating_point() and mask.dtype != query.dtype:
            return mask.to(query.dtype)
        return mask

    kwargs = {key: cast(value) if key in ("attn_mask", "key_padding_mask") else value for key, value in kwargs.items()}
    if name == "scaled_dot_product_attention" and len(args) > 3:
        args = (*args[:3], cast(args[3]), *args[4:])
    return args, kwargs


# Calls that compare input-dependent tensors into one Python bool (a branch the forward takes in Python), and those
# whose masks only check that values are numbers (see _ProbeFunctions._of_masks).
_PYTHON_COMPARISONS = frozenset({"equal", "allclose", "is_nonzero"})
_VALIDITY_CHECKS = frozenset({"isnan", "isinf", "isfinite", "isposinf", "isneginf", "isreal"})
# Comparisons whose mask, used as values, carries no gradient (see _ProbeFunctions.comparison_behind).
_COMPARISONS = frozenset(
    {"gt", "lt", "ge", "le", "eq", "ne", "greater", "less", "greater_equal", "less_equal", "not_equal",
     "__gt__", "__lt__", "__ge__", "__le__", "__eq__", "__ne__"}
)  # fmt: skip
_SELF_COMPARISONS = frozenset({"ne", "__ne__", "eq", "__eq__"})  # x != x: the NaN check of old


def _fixed_dims(name: str, args, kwargs) -> tuple[int, ...]:
    """The dims of ``args[0]`` whose length a call fixes: adaptive pooling's but ``None``'s, a resize to a size's."""
    n_dims = args[0].dim()
    if name.startswith(("adaptive_", "_adaptive_")):
        size = kwargs.get("output_size", args[1] if len(args) > 1 else None)
        n_axes = int(re.search(r"pool(\d)d", name).group(1))  # type: ignore[union-attr]  # adaptive_*_pool{n}d*
        sizes = list(size) if isinstance(size, (tuple, list)) else [size] * n_axes
        return tuple(n_dims - len(sizes) + i for i, n in enumerate(sizes) if n is not None)
    if name in ("interpolate", "upsample") and kwargs.get("size", args[1] if len(args) > 1 else None) is not None:
        return tuple(range(2, n_dims))
    return ()


# Functions whose output depends on their input but whose gradient is zero.
_ZERO_GRADIENT = frozenset({"round", "floor", "ceil", "trunc", "fix", "special_round", "sign", "heaviside"})


def _zero_gradient_call(name: str, args, kwargs) -> bool:
    """Whether the call's gradient to an input-dependent operand is zero by its arguments, not its name alone.

    A division rounded to an integer (``rounding_mode="floor"`` or ``"trunc"``), the sign operand of ``copysign``
    or the direction of ``nextafter``, the ``angle`` of a real tensor (0 or pi) and its ``sgn``.
    """
    base = name.rstrip("_")
    if base in ("div", "divide") and kwargs.get("rounding_mode", args[2] if len(args) > 2 else None) is not None:
        return True
    if base in ("copysign", "nextafter") and len(args) > 1:
        return _depends_on_input(args[1])
    real = bool(args) and isinstance(args[0], torch.Tensor) and not args[0].is_complex()
    return base in ("angle", "sgn") and real  # of a complex tensor, both have a gradient


def _reduces_along_a_dim(args, kwargs) -> bool:
    """``max(x, dim)``, ``min(x, dim)`` (values and indices) or ``max(x)`` of every element, not ``max(x, y)``."""
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    whole = len(args) == 1 and "other" not in kwargs and "dim" not in kwargs
    return whole or (isinstance(dim, int) and not isinstance(dim, bool))


# Norms whose order may be infinite: (x, ord or p, dim, keepdim) each.
_NORMS = frozenset({"norm", "linalg_norm", "linalg_vector_norm", "vector_norm"})


def _infinity_norm(name: str, args, kwargs) -> bool:
    """Whether the call is a norm of order +-inf (its largest or least magnitude: a pick, not a sum)."""
    if name not in _NORMS:
        return False
    order = kwargs.get("ord", kwargs.get("p", args[1] if len(args) > 1 else None))
    return isinstance(order, (int, float)) and math.isinf(order)


def _softmax_twin(func, name: str, args, kwargs):
    """``softmax`` (``log_softmax``, ``softmin``) along a dim, with its real values and a gradient that cannot cancel.

    The real gradient with respect to the inputs along the dim, ``p * (g - sum(p * g))``, is zero wherever the
    cotangent ``g`` is the same along the dim, as it is on the theoretical copy's equal values (attention over
    equal values, a gate over branches with equal fields): the paths through the scores would vanish. The twin gives
    every live input along the dim the mean of the cotangents instead. An input masked out (``_MASKED_GAP`` or more
    below the largest: ``-inf``, ``finfo.min``, ``-1e9``, ``-1e4`` or ``-100`` added) gets nothing, neither gradient
    nor weight (:func:`_masked_out`); and where fewer than two are live, the real output is a constant (1, or 0 for
    ``log_softmax``) and nothing gets any. A smaller gap is no mask: it comes from the copy's values, not the
    architecture, so its input stays live.
    """
    real = func(*args, **kwargs)
    x, dim, live = _live(func, name, args, kwargs)
    count = live.sum(dim, keepdim=True)
    valued = _SHARES_IN_VALUES.get()
    # Zero, with the identity as its gradient; inside shares_in_values(), the input's own value.
    step = torch.where(live, x if valued else x - x.detach(), torch.zeros_like(x))
    share = torch.where(count > 1, step.sum(dim, keepdim=True) / count.clamp(min=1), 0.0)
    if valued:  # a value at a masked input would weigh a value it never reads (a causal future)
        share = torch.where(live, share, 0.0)
    return _masked_out(real.detach(), live, name) + share.to(real.dtype)


def _soft_gumbel_logits(args, kwargs) -> tuple[torch.Tensor, int] | None:
    """``(logits / tau, dim)`` of a soft ``F.gumbel_softmax(logits, tau, hard, eps, dim)`` of input-dependent logits."""
    logits = args[0] if args else kwargs.get("logits")
    hard = kwargs.get("hard", args[2] if len(args) > 2 else False)
    if hard or not _depends_on_input(logits):
        return None
    tau = kwargs.get("tau", args[1] if len(args) > 1 else 1.0)
    return logits / tau, kwargs.get("dim", args[4] if len(args) > 4 else -1)


def _live(func, name: str, args, kwargs):
    """The softmax's input, its dim, and where along the dim it is live (see :func:`_above_every_gap`)."""
    x = args[0] if args else kwargs["input"]
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if dim is None:  # F.softmax's implicit dim
        dim = 0 if x.dim() in (0, 1, 3) else 1
    scores = -x.detach() if name == "softmin" else x.detach()  # softmin is the softmax of -x
    return x, dim, _above_every_gap(scores, dim)


def _above_every_gap(scores: torch.Tensor, dim: int) -> torch.Tensor:
    """Where ``scores`` are live along ``dim``: reached from the largest down through gaps under ``_MASKED_GAP``.

    A mask puts its inputs far below every live score at once; a graded bias (ALiBi: -0.5 per step back, 100 below
    the largest after 200 steps) leaves no such gap, and every input it reaches stays live, however far below the
    largest. Each round lowers the floor to ``_MASKED_GAP`` below the lowest live score, until no score joins (a row
    of -inf has none). A NaN score (a log or square root of a negative value on the theoretical copy's constants,
    which some weights make positive) is live: its row's other scores are read without it, and no path is cut.
    """
    not_a_number = scores.isnan()
    scores = scores.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    live = (scores > scores.amax(dim, keepdim=True) - _MASKED_GAP) | not_a_number
    while not bool(live.all()):  # nothing far below (no mask): one pass, the common case
        lowest = torch.where(live & ~not_a_number, scores, torch.full_like(scores, math.inf)).amin(dim, keepdim=True)
        joined = (scores > lowest - _MASKED_GAP) & ~live
        if not bool(joined.any()):
            break
        live |= joined
    return live


def _masked_softmax(func, name: str, args, kwargs) -> tuple[torch.Tensor, bool]:
    """The real ``softmax`` (weights mode) with no gradient to its masked inputs (:func:`_live`), and whether any.

    A mask of -100 (Swin's) leaves its keys a weight of exp(-100) = 4e-44, and a gradient as small but not zero: the
    field would take in every pixel the mask hides. The live inputs' gradients are the real ones.
    """
    x, _, live = _live(func, name, args, kwargs)
    gated = torch.where(live, x, x.detach())
    probabilities = func(gated, *args[1:], **kwargs) if args else func(**{**kwargs, "input": gated})
    # (a new tensor either way, as the real softmax's output, which a later write in place would make stale)
    return _masked_out(probabilities, live, name), not bool(live.all())  # _live waited for the GPU already


def _masked_out(probabilities: torch.Tensor, live: torch.Tensor, name: str) -> torch.Tensor:
    """A softmax's output with exactly 0 where its input is masked (not the tiny exp(-100) a -100 mask leaves).

    The output weighs the values (``attention @ v``): a weight that is not exactly 0 passes the masked values'
    gradient on, and their pixels into the field. ``log_softmax`` is left as it is (its masked outputs are large
    negative numbers, no weights).
    """
    if "log" in name:
        return probabilities
    return torch.where(live, probabilities, torch.zeros((), dtype=probabilities.dtype, device=probabilities.device))


def _attention_twin(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """``scaled_dot_product_attention`` spelled out with the softmax twin and bounded products; no dropout.

    The fused kernel's softmax would cancel the gradient of the query and key paths on equal values.
    """
    if enable_gqa:
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
        value = value.repeat_interleave(query.shape[-3] // value.shape[-3], dim=-3)
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = _bounded(query @ key.transpose(-2, -1), in_place=False) * scale
    if is_causal:
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~causal, -math.inf)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else scores + attn_mask
    return _bounded(_softmax_twin(torch.softmax, "softmax", (scores, -1), {}) @ value, in_place=False)


def _attention_score_count(name: str, args, kwargs) -> int:
    """The elements of the attention scores that a fused attention call computes: one per query, key and head."""
    query = args[0] if args else kwargs.get("query")
    key = args[1] if len(args) > 1 else kwargs.get("key")
    if not isinstance(query, torch.Tensor) or not isinstance(key, torch.Tensor) or key.dim() < 2:
        return 0
    if name == "scaled_dot_product_attention":  # (..., L, E) and (..., S, E)
        return math.prod(query.shape[:-1]) * key.shape[-2]
    heads = args[4] if len(args) > 4 else kwargs.get("num_heads", 1)  # (L, N, E) and (S, N, E), or unbatched
    return math.prod(query.shape[:-1]) * key.shape[0] * (heads if isinstance(heads, int) else 1)


def _qkv(args, kwargs) -> list:
    """The query, key and value of ``scaled_dot_product_attention``, passed by position or by name."""
    return [*args[:3], *(kwargs.get(name) for name in ("query", "key", "value")[len(args[:3]) :])]


def _check_self_attention(func, args, kwargs) -> None:
    """Refuses ``multi_head_attention_forward`` unless the real function gives the theoretical copy its exact field.

    The copy cannot reach the softmax inside it, whose gradient through the scores cancels on equal values: only the
    value path counts. That is the whole field when every input-dependent query and key is the value: each live key
    is a value, and a query is its own token's value, live where the mask keeps the diagonal (a boolean mask False
    there, a float mask at its row's largest) and no key is padded away. A learned query adds no input to the field.

    Raises:
        ProbeError: an input-dependent query or key that is not the value (cross-attention), static keys or values,
            or, for self-attention, a key padding mask or an attention mask that hides a query's own token.
    """
    bound = inspect.signature(func).bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    query, key, value = a["query"], a["key"], a["value"]
    if query.requires_grad and query is not value:
        why = "its query is not its key and value (cross-attention): the query path"
    elif key.requires_grad and key is not value:
        why = "its key is not its value: the key path"
    elif a["static_k"] is not None or a["static_v"] is not None:
        why = "it is given static keys or values: their path"
    elif query.requires_grad and a["key_padding_mask"] is not None:
        why = "it is given a key_padding_mask, which hides padded tokens from their own query: their query path"
    elif query.requires_grad and a["attn_mask"] is not None and not _keeps_the_diagonal(a["attn_mask"]):
        why = "its attn_mask hides some query's own token: that query's path"
    else:
        return
    raise ProbeError(
        f"nn.MultiheadAttention (F.multi_head_attention_forward) cannot be probed in theoretical mode when {why} "
        f"runs through its internal softmax, whose gradient cancels on the theoretical copy's equal values, and "
        f"would be missing from the field; use mode='weights', or call F.scaled_dot_product_attention, which the "
        f"theoretical copy handles"
    )


def _keeps_the_diagonal(mask: torch.Tensor) -> bool:
    diagonal = mask.diagonal(dim1=-2, dim2=-1)
    if mask.dtype == torch.bool:  # True: not allowed to attend
        return not bool(diagonal.any())
    return bool((diagonal == mask.amax(dim=-1)).all())


def _input_dependent_factors(args) -> int:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
    return sum(t.requires_grad for t in tensors)


def _bounded(product: torch.Tensor, *, in_place: bool) -> torch.Tensor:
    """``product`` divided by its largest magnitude (a positive constant: no support changes), so it is at most 1.

    With activations as identities, a product of two input-dependent tensors squares magnitudes block after block: a
    gate that multiplies a map by its own mean overflows above 1 and underflows, even in float64, below (16 such
    blocks of values near 0.9 reach 0.9 ** 65536).
    """
    if not isinstance(product, torch.Tensor) or not product.is_floating_point():
        return product
    scale = product.detach().abs().amax() if product.numel() else None
    if scale is None or not bool(scale > 0 and scale != 1):
        return product
    return product.div_(scale) if in_place else product / scale


# Elementwise calls whose gradient is negative with respect to an input-dependent operand, on the theoretical copy's
# positive values: a subtrahend, a negation, a divisor, a reciprocal. Their paths would cancel the positive ones:
# ``y - y.mean(1)`` is exactly zero on the copy's equal channels, and a 5 x 5 branch behind it vanishes from the field.
_SUBTRACTIONS = frozenset({"sub", "subtract", "__sub__", "sub_", "subtract_", "__isub__"})
_REVERSED_SUBTRACTIONS = frozenset({"__rsub__", "rsub"})  # other - self
_NEGATIONS = frozenset({"neg", "negative", "__neg__", "neg_", "negative_", "reciprocal", "reciprocal_", "rsqrt",
                        "rsqrt_"})  # fmt: skip
_DIVISIONS = frozenset({"div", "divide", "true_divide", "__truediv__", "div_", "divide_", "true_divide_",
                        "__itruediv__"})  # fmt: skip
_POWERS = frozenset({"pow", "__pow__", "pow_", "__ipow__"})
_STATISTICS = frozenset({"var", "std", "var_mean", "std_mean"})  # zero on equal values, with a zero gradient
_ADDITIONS = frozenset({"add", "__add__", "__radd__", "add_", "__iadd__"})  # with alpha=-1, a subtraction
# beta * input + alpha * (a product of two operands): with a negative alpha or beta, a subtraction
_PRODUCT_ADDITIONS = frozenset(
    {"addmm", "addmm_", "baddbmm", "baddbmm_", "addbmm", "addbmm_", "addmv", "addmv_", "addr", "addr_"}
)
_SIGNED = (
    _SUBTRACTIONS
    | _REVERSED_SUBTRACTIONS
    | _NEGATIONS
    | _DIVISIONS
    | _POWERS
    | _ADDITIONS
    | _MULTIPLICATIONS
    | _STATISTICS
    | _PRODUCT_ADDITIONS
    | {"__rtruediv__", "normalize", "cosine_similarity", "diff", "addcmul",
       "addcmul_", "addcdiv", "addcdiv_", "lerp", "lerp_"}
)  # fmt: skip


# Calls that take the difference of two operands inside (a loss, a distance, an angle, a cross product), which the
# sign-free twins cannot reach: on the copy's equal values the difference is 0, and their gradient with it
# (mse_loss(a, b) dropped b's shifted columns, atan2 of two channels of one convolution read nothing at all).
_DIFFERENCES_INSIDE = frozenset(
    {"atan2", "arctan2", "pairwise_distance", "cdist", "dist", "mse_loss", "l1_loss", "huber_loss", "smooth_l1_loss",
     "cross", "linalg_cross", "atan2_", "arctan2_"}
)  # fmt: skip


def _apart(name: str, first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two operands of a call that takes their difference inside, moved so that no path through them cancels.

    A loss or a distance of ``a`` and ``b`` reads ``a - b``: it gets ``a`` and ``-b``, whose difference is the sum of
    the copy's positive values, so both gradients are positive (as ``a - b`` becomes ``a + b``). ``atan2(y, x)``,
    whose gradients are ``x`` and ``-y`` over ``x² + y²``, gets ``y`` moved below 0 and ``x`` above. A cross product
    gets ``b`` plus uneven offsets, so that no offset lies along the copy's equal values (parallel vectors).

    Args:
        name: the call's name (one of ``_DIFFERENCES_INSIDE``).
        first: its first operand, input-dependent.
        second: its second operand, input-dependent.

    Returns:
        The two operands to call it with.
    """
    if name in ("atan2", "arctan2"):
        reach = float(torch.maximum(first.detach().abs().max(), second.detach().abs().max())) + 1.0
        return first - reach, second + reach
    if name in ("cross", "linalg_cross"):
        steps = torch.arange(second.numel(), dtype=second.dtype, device=second.device)
        return first, second + (0.5 + (steps * 0.6180339887) % 1).reshape(second.shape)
    return first, -second


def _negative(value) -> bool:
    """A negative number (Python's or NumPy's), or a constant tensor of negative numbers (``-ones``, ``tensor(-1)``)."""
    if isinstance(value, torch.Tensor):  # the copy's parameters are positive constants: not read
        constant = not _stands_for_weights(value) and not value.requires_grad and _may_be_negative(value)
        constant = constant and value.numel() > 0
        return constant and bool((value < 0).all())
    real = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    return real and value < 0


def _may_be_negative(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s type holds negative values: floating or signed integers (an int64 ``tensor([1, -1])``)."""
    return tensor.is_floating_point() or (tensor.dtype.is_signed and not tensor.is_complex())


# The operands of the product additions by name: the added input, then the two factors.
_PRODUCT_OPERANDS = {
    "addmm": ("input", "mat1", "mat2"),
    "baddbmm": ("input", "batch1", "batch2"),
    "addbmm": ("input", "batch1", "batch2"),
    "addmv": ("input", "mat", "vec"),
    "addr": ("input", "vec1", "vec2"),
}


def _product_operands(name: str, args, kwargs) -> tuple[Any, tuple[Any, Any]] | None:
    """The added input and the two factors of a product addition, given by position or by keyword; None if absent."""
    names = _PRODUCT_OPERANDS[name.rstrip("_")]
    values = [args[i] if i < len(args) else kwargs.get(n) for i, n in enumerate(names)]
    if any(not isinstance(v, torch.Tensor) for v in values):
        return None
    return values[0], (values[1], values[2])


def _depends_on_input(value) -> bool:
    return isinstance(value, torch.Tensor) and value.requires_grad


# Elementwise functions whose gradient is 0 where their input is (|x|, x ** 2): on the copy, y - 1 is exactly 0.
_FLAT_AT_ZERO = frozenset(
    {"abs", "absolute", "square", "pow", "__pow__", "float_power", "abs_", "absolute_", "square_", "pow_", "__ipow__",
     "float_power_"}
)  # fmt: skip


def _unflattened(func, name: str, args, kwargs):
    """``abs``, ``square`` or a positive power of an input-dependent value: its real values, the identity's gradient.

    The same support, and never 0 where the value is (``(y - 1) ** 2`` on the copy's ones), in place too
    (``t.pow_(2)``, ``t **= 2``, ``t.abs_()``). None for other calls.
    """
    x = args[0] if args else kwargs.get("input", kwargs.get("self"))
    if not _depends_on_input(x) or not x.is_floating_point() or kwargs.get("out") is not None:
        return None  # a complex value's magnitude is real: its gradient stays the real one
    in_place = name.endswith("_") or name == "__ipow__"
    exponent = 2 if name.startswith("square") else 1
    if name in _POWERS | {"float_power", "float_power_"}:
        exponent = args[1] if len(args) > 1 else kwargs.get("exponent")
        if not isinstance(exponent, (int, float)) or isinstance(exponent, bool) or exponent <= 0:
            return None
    if exponent > 1:
        # The magnitude's values: a power above 1 compounds through a deep stack (MetaFormer's StarReLU squares in
        # every block) past any number format, where its support is the identity's; its sign stays the power's
        # (a log or square root of a negative value is NaN, and a softmax would read no live input).
        twin = _real_values(x.detach().abs(), x)
    elif in_place:
        twin = _real_values(func(x.detach().clone(), *args[1:], **kwargs), x)
    else:
        twin = _real_values(func(*args, **kwargs), x)
    return x.copy_(twin) if in_place else twin  # written in place, read through x


def _factors(args, kwargs) -> list:
    """The two operands of a ``mul`` call, positional or named (``input``, ``other``), or fewer where not both."""
    first = args[0] if args else kwargs.get("input")
    second = args[1] if len(args) > 1 else kwargs.get("other")
    rest = len(args) + len(kwargs) - 2
    return [first, second] if first is not None and second is not None and rest == 0 else []


def _kept_draw(target: torch.Tensor, p, *, in_place: bool) -> torch.Tensor:
    """A ``bernoulli`` draw in the copy's forward: 1 wherever the draw could give 1, in both modes.

    A stochastic depth or a drop-path written without ``if self.training`` (``torch.empty(...).bernoulli_(keep)``,
    as timm's ``drop_path`` and torchvision's ``stochastic_depth`` draw their masks) drops a residual branch at
    random: the field would be one draw's, and follow the global random state. The field is every path a draw can
    open, as a dropout's is (its twin is the identity).
    """
    probability = target if p is None else p
    if isinstance(probability, torch.Tensor):
        kept = (probability > 0).to(target.dtype).expand_as(target)
    else:
        kept = torch.full_like(target, 1.0 if probability > 0 else 0.0)
    return target.copy_(kept) if in_place else kept.clone()


def _lifted_product(first: torch.Tensor, second, *, in_place: bool) -> torch.Tensor:
    """The theoretical copy's product of two input-dependent tensors: the bounded product's values, no zero factor.

    The real gradient to one factor is the other's value, which the copy's constants can make exactly 0 (``log`` of
    its ones, ``sin`` of 0) although other weights would not: that path would vanish from the field. Here each
    factor's gradient is the other's magnitude, 1 where it is 0.
    """

    def magnitude(factor: torch.Tensor) -> torch.Tensor:
        size = factor.detach().abs()
        return torch.where(size == 0, torch.ones_like(size), size)

    def parts(factor):  # a complex factor's real and imaginary parts in one: Re(z1 z2) = a1 a2 - b1 b2 reads both
        return factor.real + factor.imag if isinstance(factor, torch.Tensor) and factor.is_complex() else factor

    if first.is_complex() or (isinstance(second, torch.Tensor) and second.is_complex()):
        one, other = parts(first), parts(second)
        lifted_parts = one * magnitude(other) + magnitude(one) * other
        product = _real_values(first.detach() * second.detach(), torch.complex(lifted_parts, lifted_parts))
        return first.copy_(product) if in_place else product
    lifted = first * magnitude(second) + magnitude(first) * second
    product = _bounded(_real_values(first.detach() * second.detach(), lifted), in_place=False)
    return first.copy_(product) if in_place else product


def _lifted_bilinear(func, name: str, args, kwargs, probabilities) -> torch.Tensor | None:
    """A ``matmul`` or ``einsum`` of two input-dependent tensors where one is 0 along a whole contraction, or None.

    As for :func:`_lifted_product`: the real gradient to one operand is the other's values, and the copy's constants
    can make them exactly 0 (``b - 1`` of its ones), which would cut that operand's paths. Here the product keeps its
    real values, and each operand's gradient is the product with the other's magnitude, 1 where the other is 0 along
    the whole contraction. A zero beside live values there stays 0: attention probabilities that a mask zeroed have
    live keys in their row, and must not open the masked keys' paths. An operand whose id is in ``probabilities``
    (a softmax's output: every row has a live value) is not searched for zeros, which would cost a pass over it.
    """
    equation = args[0] if name == "einsum" and args and isinstance(args[0], str) else None
    listed = equation is not None and len(args) == 2 and isinstance(args[1], (list, tuple))
    operands = list(args[1]) if listed else list(args[1:]) if equation is not None else list(args)
    slots = [i for i, t in enumerate(operands) if _depends_on_input(t)]
    if len(slots) != 2 or not all(operands[i].is_floating_point() and operands[i].dim() > 0 for i in slots):
        return None
    contracted = _contracted_dims(name, equation, operands, slots)
    if contracted is None:
        return None
    dead = [
        torch.zeros((), dtype=torch.bool, device=operands[i].device)
        if id(operands[i]) in probabilities
        else (operands[i] == 0).all(dim=dims, keepdim=True)
        if dims
        else operands[i] == 0
        for i, dims in zip(slots, contracted)
    ]
    if not bool(dead[0].any() | dead[1].any()):
        return None

    def called(values) -> torch.Tensor:
        replaced = list(operands)
        for slot, value in zip(slots, values):
            replaced[slot] = value
        if equation is not None:
            return func(equation, replaced, **kwargs) if listed else func(equation, *replaced, **kwargs)
        return func(*replaced, **kwargs)

    first, second = (operands[i] for i in slots)
    lifted_first, lifted_second = (torch.where(d, 1.0, t.detach().abs()) for d, t in zip(dead, (first, second)))
    lifted = called([first, lifted_second]) + called([lifted_first, second])
    return _bounded(_real_values(called([first.detach(), second.detach()]), lifted), in_place=False)


def _contracted_dims(name: str, equation, operands: list, slots: list[int]) -> list[tuple[int, ...]] | None:
    """The dims each of the two operands at ``slots`` is summed along, or None where that is not read here."""
    if name != "einsum":
        left, right = (operands[i] for i in slots)
        if name == "__rmatmul__":  # self @ other reversed: other @ self
            return [(-2,) if left.dim() >= 2 else (-1,), (-1,)]
        return [(-1,), (-2,) if right.dim() >= 2 else (-1,)]
    if not isinstance(equation, str):
        return None
    inputs, arrow, output = equation.replace(" ", "").partition("->")
    if not arrow:  # an implicit output: the letters that occur once (their order does not matter here)
        letters = inputs.replace("...", "").replace(",", "")
        output = "".join(letter for letter in letters if letters.count(letter) == 1) + "..." * ("..." in inputs)
    terms = inputs.split(",")
    if len(terms) != len(operands):
        return None
    dims = []
    for slot in slots:
        term, rank = terms[slot], operands[slot].dim()
        before, ellipsis, after = term.partition("...")
        positions = list(range(len(before))) + [rank - len(after) + j for j in range(len(after))]
        summed = [p for p, letter in zip(positions, before + after) if letter not in output]
        if ellipsis and "..." not in output:  # the dims the ellipsis stands for are summed too
            summed += range(len(before), rank - len(after))
        dims.append(tuple(sorted(summed)))
    return dims


def _sign_free_twin(name: str, args, kwargs):
    """The theoretical copy's twin of a call with a negative gradient to an input-dependent operand, or None.

    ``a - b`` becomes ``a + b``; ``-x``, ``1 / x`` and ``rsqrt(x)`` become ``x``; ``a / b`` becomes the bounded
    product ``a * b``; ``x ** -p`` becomes ``x ** p``; ``var`` and ``std`` (zero on equal values, with a zero
    gradient) become the mean along the same dims. The same operands, every gradient positive: no path through them
    cancels another (weights mode keeps the real calls). A call whose negative operand does not depend on the input
    (a buffer's mean, a mask subtracted from attention scores) stays the real one: its values may matter. Where
    such a value is exactly 0 on the copy (``y - 1``), a product keeps its other factor (see
    :func:`_lifted_product`), and a power or an absolute value of it its gradient (see :func:`_unflattened`).
    """
    dependent = _depends_on_input  # of an operand
    in_place = (name.endswith("_") and not name.startswith("__")) or name.startswith("__i")
    first = args[0] if args else kwargs.get("input")
    second = args[1] if len(args) > 1 else kwargs.get("other")
    if name in _SUBTRACTIONS and dependent(second):
        alpha = abs(kwargs.get("alpha", 1))
        return first.add_(second, alpha=alpha) if in_place else torch.add(first, second, alpha=alpha)
    if name in _ADDITIONS and dependent(second) and _negative(kwargs.get("alpha", 1)):
        alpha = -kwargs["alpha"]
        return first.add_(second, alpha=alpha) if in_place else torch.add(first, second, alpha=alpha)
    if name in _MULTIPLICATIONS | _DIVISIONS and kwargs.get("rounding_mode") is None:
        # a sign flip by a negative number: -0.5 * x, x / -2
        flipped = None
        if dependent(first) and _negative(second):
            flipped = first, -second
        elif dependent(second) and _negative(first) and name in _MULTIPLICATIONS:
            if in_place:  # the negative constant is the target: it must hold the product itself
                return first.neg_().mul_(second)
            flipped = second, -first
        if flipped is not None:
            target, factor = flipped
            if name in _DIVISIONS:
                return target.div_(factor) if in_place else torch.div(target, factor)
            return target.mul_(factor) if in_place else torch.mul(target, factor)
    if name in _PRODUCT_ADDITIONS and (operands := _product_operands(name, args, kwargs)) is not None:
        # addmm(input, m1, m2, beta=-1) or alpha=-1: the same call with both scales positive where they scale a
        # dependent term (a constant term's value may matter: its scale stays)
        target, factors = operands
        beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
        flip_beta = dependent(target) and _negative(beta)
        flip_alpha = any(dependent(f) for f in factors) and _negative(alpha)
        if flip_beta or flip_alpha:
            scales = {"beta": -beta if flip_beta else beta, "alpha": -alpha if flip_alpha else alpha}
            rest = {k: v for k, v in kwargs.items() if k not in (*scales, *_PRODUCT_OPERANDS[name.rstrip("_")])}
            if in_place:
                return getattr(target, name)(*factors, **scales, **rest)
            return getattr(torch, name)(target, *factors, **scales, **rest)
    if name.rstrip("_") in ("addcmul", "addcdiv") and (dependent(args[1]) or dependent(args[2])):
        # input + value * t1 * t2 (or t1 / t2): every factor positive, a divisor's as a factor
        value = abs(kwargs.get("value", 1))
        if dependent(args[1]) and dependent(args[2]):
            product = _lifted_product(args[1], args[2], in_place=False)
        else:
            product = _bounded(args[1] * args[2], in_place=False) if name.startswith("addcdiv") else args[1] * args[2]
        return first.add_(product, alpha=value) if in_place else torch.add(first, product, alpha=value)
    if name.rstrip("_") == "lerp" and len(args) + len(kwargs) >= 3:
        # start + weight * (end - start): on the copy's equal values end - start is 0, and a weight of 1 cuts start
        end, weight = second, kwargs.get("weight", args[2] if len(args) > 2 else None)
        twin = first + end
        if dependent(weight):
            twin = twin + _bounded(weight * twin, in_place=False)
        return first.copy_(twin) if in_place else twin
    if name in _REVERSED_SUBTRACTIONS and dependent(first):
        alpha = abs(kwargs.get("alpha", 1))
        return torch.add(second, first, alpha=alpha)
    if name in _NEGATIONS and dependent(first):
        return first if in_place else first.clone()
    if name in _DIVISIONS and dependent(second) and kwargs.get("rounding_mode") is None:
        if dependent(first):
            return _lifted_product(first, second, in_place=in_place)
        return _bounded(first.mul_(second) if in_place else torch.mul(first, second), in_place=in_place)
    if name == "__rtruediv__" and dependent(first):
        return _bounded(torch.mul(second, first), in_place=False)
    if name in _STATISTICS and dependent(first) and (dims := _reduced_dims(name, args, kwargs)):
        # Zero on equal values, with a zero gradient: the mean has the same support and a positive gradient.
        keepdim = kwargs.get("keepdim", args[3] if len(args) > 3 and isinstance(args[2], bool) else False)
        mean = first.mean(dim=dims, keepdim=keepdim)
        return (mean, mean.clone()) if name.endswith("_mean") else mean
    if name in _POWERS and dependent(first) and isinstance(second, (int, float)) and second < 0:
        return first.pow_(-second) if in_place else torch.pow(first, -second)
    if name == "normalize" and dependent(first):  # x / |x|: on equal values the gradient along dim cancels
        p, dim = kwargs.get("p", args[1] if len(args) > 1 else 2.0), kwargs.get("dim", args[2] if len(args) > 2 else 1)
        return _bounded(first * first.norm(p=p, dim=dim, keepdim=True), in_place=False)
    if name == "cosine_similarity" and (dependent(first) or dependent(second)):
        dim = kwargs.get("dim", args[2] if len(args) > 2 else 1)
        return _bounded((first * second).sum(dim) * first.norm(dim=dim) * second.norm(dim=dim), in_place=False)
    if name == "diff" and dependent(first):
        return _diff_twin(first, *args[1:], **kwargs)
    return None


def _diff_twin(x: torch.Tensor, n: int = 1, dim: int = -1, prepend=None, append=None) -> torch.Tensor:
    """``torch.diff`` with sums in place of differences: each output reads the same neighbours, every path positive."""
    x = torch.cat([t for t in (prepend, x, append) if t is not None], dim=dim)
    for _ in range(n):
        length = x.shape[dim]
        x = x.narrow(dim, 1, length - 1) + x.narrow(dim, 0, length - 1)
    return x


# Calls whose second argument is a weight the theoretical copy holds at a positive constant.
_WEIGHED = frozenset(
    {"linear", "bilinear", *(f"conv{n}d" for n in (1, 2, 3)), *(f"conv_transpose{n}d" for n in (1, 2, 3))}
)
# Where a weighed call takes its weight, where not second (bilinear's comes after its two inputs).
_WEIGHT_POSITION = {"bilinear": 2}


# Calls linear in each tensor operand: a constant operand with signed values (a fixed Haar, Sobel or DCT filter held
# in a buffer) makes paths to one input cancel on the copy's equal values.
_LINEAR_IN_EACH_OPERAND = (
    _WEIGHED
    | _MULTIPLICATIONS
    | _DIVISIONS
    | _PRODUCT_ADDITIONS
    | {"matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "einsum", "tensordot", "mv", "inner", "outer", "kron",
       "linalg_multi_dot", "chain_matmul"}
)  # fmt: skip


def _unsigned_constants(name: str, args, kwargs):
    """``args`` and ``kwargs`` with each constant operand of signed values replaced by its magnitude.

    The theoretical copy's own weights are positive constants; a constant the forward holds itself (a buffer, a
    tensor it builds) is not, and a fixed Haar filter (+1 and -1 over a 2 x 2 window) summed by a later layer reads
    its window's pixels through paths that cancel exactly on the copy's equal values: a 2 x 2 field came out 1 x 1.
    Its magnitude keeps every path (and every zero: a fixed mask's shape stays). Applied only where another operand
    depends on the input, and never to the target of an in-place call (``y.mul_(x)`` must write ``y`` itself).
    """
    target = args[0] if args and geometry_flow.writes_in_place(name) else None
    # tensordot's dims, given as tensors, name dims (-1 is the last) and are no operand
    dims = kwargs.get("dims", args[2] if len(args) > 2 else None) if name == "tensordot" else None
    dims_given = [id(d) for d in (dims if isinstance(dims, (list, tuple)) else (dims,)) if d is not None]

    def signed(value) -> bool:  # a constant (no Parameter of the copy, nor a view of one: positive) with a value < 0
        if not isinstance(value, torch.Tensor) or _stands_for_weights(value) or value.requires_grad:
            return False
        if value is target or id(value) in dims_given:
            return False
        return _may_be_negative(value) and value.numel() > 0 and bool((value < 0).any())

    def unsigned(value):
        return value.abs() if signed(value) else value

    flat = [*args, *kwargs.values()]
    flat += [t for a in args if isinstance(a, (list, tuple)) for t in a]  # einsum's operands, as a list
    if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in flat) or not any(map(signed, flat)):
        return args, kwargs  # the common case: a layer's own weights, or no input-dependent operand
    args = tuple(type(a)(unsigned(t) for t in a) if isinstance(a, (list, tuple)) else unsigned(a) for a in args)
    return args, {k: unsigned(v) for k, v in kwargs.items()}


# How many draws of generic weights stand beside a weight the forward computes (see _ProbeFunctions._on_generic_weights)
_GENERIC_DRAWS = 3
# Calls whose result is zero where their operands are (see _ProbeFunctions._possible); subtractions, as sums, too.
_KEEPING_ZEROS = frozenset(
    {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "permute", "transpose", "t", "expand",
     "expand_as", "repeat", "repeat_interleave", "tile", "contiguous", "clone", "detach", "to", "float", "double",
     "half", "type_as", "view_as", "reshape_as", "__getitem__", "__setitem__", "cat", "concat", "concatenate",
     "stack", "pad", "flip", "roll", "rot90", "narrow", "select", "index_select", "gather", "chunk", "split",
     "unbind", "movedim", "where", "mul", "multiply", "__mul__", "__rmul__", "__imul__", "add", "__add__",
     "__radd__", "__iadd__", "neg", "__neg__", "abs", "masked_fill"}
)  # fmt: skip


def _is_position(tensor) -> bool:
    """Whether ``tensor`` holds positions (integers, as a pick's indices), not values or a mask."""
    return isinstance(tensor, torch.Tensor) and not tensor.is_floating_point() and tensor.dtype != torch.bool


def _each_operand(function, args: tuple) -> tuple:
    """``args`` with ``function`` applied to each, and to each item of a plain list or tuple (einsum's operands)."""
    return tuple(type(a)(map(function, a)) if type(a) in (list, tuple) else function(a) for a in args)


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _forget(entries: dict, key: int, _dead: weakref.ref) -> None:
    entries.pop(key, None)


def _fake_quantized(func, args, kwargs):
    """A fake quantization's result, computed in float32 where the copy runs in another type (as it runs in training).

    Its kernels take float32 alone: a float64 probe (``dtype=``, the retry near underflow, ``verify_rf``) failed.
    """
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.is_floating_point()]
    if not tensors or all(t.dtype == torch.float32 for t in tensors):
        return func(*args, **kwargs)

    def single(value):
        return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    result = func(*map(single, args), **{k: single(v) for k, v in kwargs.items()})
    return result.to(tensors[0].dtype)


def _collapsed_weight(name: str, args, kwargs) -> torch.Tensor | None:
    """The positive constant weight to use where a weight computed from the copy's constants is all zeros, or None.

    The copy's own weights are positive constants, but a forward may compute the weight it uses from them: weight
    standardisation (``(w - w.mean()) / w.std()``) turns equal constants into zeros, and the layer would cut every
    path. Such a layer gets ``1 / fan_in`` everywhere, as a weight of the copy does. A weight with some zeros (a
    mask that shapes the kernel, as a PixelCNN's) stays as computed. A frozen parameter of two values that the
    copy kept as a mask (:func:`is_fixed_mask`) but that is a layer's weight itself (a frozen Dirac or identity
    initialisation, which a fine-tuning schedule unfreezes later) is a weight: ``1 / fan_in`` too. The weight may
    be given by position or as ``weight=``.
    """
    at = _WEIGHT_POSITION.get(name, 1)
    weight = args[at] if len(args) > at else kwargs.get("weight")
    if isinstance(weight, torch.Tensor) and weight.dim() >= 2 and _kept_as_mask(weight):
        return torch.full_like(weight, 1.0 / math.prod(weight.shape[1:]))
    if not isinstance(weight, torch.Tensor) or _stands_for_weights(weight) or weight.requires_grad:
        return None
    if weight.numel() == 0 or weight.dim() < 2 or bool(weight.any()):
        return None
    return torch.full_like(weight, 1.0 / math.prod(weight.shape[1:]))


def _pools_with_indices(name: str, args, kwargs) -> bool:
    """A max-pool (adaptive or not) that returns the arg-max indices beside its values."""
    if name.endswith("_with_indices"):
        pool = name.removesuffix("_with_indices")
        return pool in _MAX_POOLS or pool in _ADAPTIVE_MAX_POOLS
    if name in _MAX_POOLS:
        return _returns_indices(args, kwargs, position=6)
    return name in _ADAPTIVE_MAX_POOLS and _returns_indices(args, kwargs, position=2)


def _returns_indices(args, kwargs, position: int) -> bool:
    return bool(kwargs.get("return_indices", args[position] if len(args) > position else False))


def probe_functions(
    mode: str, *, flow: bool = False, exact_values: bool = False, whole_windows: bool = False
) -> _ProbeFunctions:
    """Returns the function mode the probe's forward runs under for ``mode``; its ``cuts`` lists gradient cuts seen.

    With ``flow``, its ``flow`` carries each tensor's geometry along the forward (:class:`GeometryFlow`). With
    ``exact_values``, samplings (``grid_sample``) give their exact values, not PyTorch's kernel's (a check that reads
    values, not gradients). With ``whole_windows`` (weights mode: a field, not the magnitudes of an effective map),
    a max-pooling and every other pick by value (``amax``, ``topk``, ``sort``, ``maximum``...) keep their values but
    pass their gradient to every candidate, as the theoretical copy's twins do: no weight decides which element wins,
    some input makes each win, and a few random draws would see a few (see :func:`_whole_pick`).
    """
    carried = GeometryFlow() if flow and geometry_flow.ENABLED else None
    return _ProbeFunctions(
        linearise=mode == "theoretical", flow=carried, exact_values=exact_values, whole_windows=whole_windows
    )


def _is_torch_hook(hook) -> bool:
    module = getattr(hook, "__module__", None) or type(hook).__module__
    return module.startswith("torch.")


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def _strip_user_hooks(model: nn.Module, named: list[tuple[str, nn.Module]]) -> None:
    """Drops the user's hooks from the copy, which would see the probe's tensors (``named``: its named modules).

    Keeps torch's own (weight norm, pruning, spectral norm), which are part of how the module computes. A user's
    hook, even a bound method copied with its owner, may act on the user's world (a file, a logger, the
    ``Trainer`` its LightningModule is attached to) and fail or write there with the probe's tensors.
    """
    dropped = []
    for name, module in named:
        for attribute in _HOOK_DICTS:
            hooks = getattr(module, attribute, None)
            if hooks:
                for key in [k for k, hook in hooks.items() if not _is_torch_hook(hook)]:
                    del hooks[key]
                    if attribute.startswith("_forward") and name not in dropped:
                        dropped.append(name)
    model.__dict__[DROPPED_HOOKS] = dropped  # for the error of a forward that needed them (graph.forward_error)


# The attribute of a copy naming the modules whose forward hooks it dropped.
DROPPED_HOOKS = "_rf_callback_dropped_forward_hooks"


def _copied_hooks(hooks: dict, memo: dict[int, Any]) -> dict:
    """A module's hooks: torch's own deep-copied, the user's as they are, for :func:`_strip_user_hooks` to drop.

    A user's hook is never run on the copy, so it is not copied either: a hook object holding a lock or a writer
    made the whole copy fail, blaming the model (and, shared with the model, left a half-built copy of itself in
    the memo), and one bound to a callback copied the callback and its ``Trainer``.
    """
    if not hooks:  # most modules' (four dicts each): no generator to run
        return type(hooks)()
    return type(hooks)(
        (key, copy.deepcopy(hook, memo) if _is_torch_hook(hook) else hook) for key, hook in hooks.items()
    )


def _references_on_the_copy(clone: list[tuple[str, nn.Module]], memo: dict[int, Any], live: list[nn.Module]) -> None:
    """Makes the functions and weak references a copied module holds in attributes point at the copy.

    A deep copy shares functions and weak references as they are: a ``forward`` replaced by a closure
    (``model.forward = lambda x: model[1](model[0](x))``, ``self.head = lambda x: self.fc(x)``) or a weak reference
    to a module of the model (``self._norm = weakref.ref(norm)``) kept calling the live model's modules, with their
    trained weights and their training mode, so the copy's field followed the live model (and updated its batch
    norm statistics). Each function is rebuilt with the closure cells and global names that hold a part of the
    model holding that part's copy (the memo has it) instead, and each weak reference refers to the copy.

    ``clone`` holds the copy's named modules, ``live`` the live model's modules.

    Raises:
        ProbeError: a module of the copy is the live model's own (a class that copies itself by sharing).
    """
    live_modules = {id(module) for module in live}
    for name, module in clone:
        if id(module) in live_modules:
            raise ProbeError(
                f"the copy of the model shares its module {name!r} ({type(module).__name__}) with the live model (its "
                f"class's __reduce_ex__ or __deepcopy__ returns the same module), so the probe would run and change "
                f"the live module; let that class be deep-copied, or probe a submodule without it"
            )
        for key, value in list(module.__dict__.items()):
            if isinstance(value, types.FunctionType):
                module.__dict__[key] = _reading_the_copy(value, memo)
            elif type(value) is weakref.ref and _in_model(referent := value(), memo):
                module.__dict__[key] = weakref.ref(memo[id(referent)])


def _in_model(value: object, memo: dict[int, Any]) -> bool:
    """Whether ``value`` is a module or tensor of the copied model (the memo holds its copy)."""
    return isinstance(value, (nn.Module, torch.Tensor)) and memo.get(id(value), value) is not value


def names_read(code: types.CodeType) -> Iterator[str]:
    """The global and attribute names a function's code (and the code nested in it) may read.

    Args:
        code: the function's ``__code__``.

    Yields:
        Each name, as often as the code objects hold it.
    """
    yield from code.co_names
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            yield from names_read(constant)


def _reading_the_copy(function: types.FunctionType, memo: dict[int, Any], walk: _Walk | None = None) -> Any:
    """``function`` rebuilt to read the copy, where it reaches a part of the model.

    Its closure cells, global names and defaults that hold a part of the model hold its copy, and so do the
    functions and the lists, tuples and dicts they lead to (a helper reading a global ``model``, a list of layers).
    A function that reaches itself (a recursive helper) reaches its rebuilt self.
    """
    module = function.__module__ or ""  # None for a function made by exec() without a module name
    walk = _Walk(module) if walk is None else walk
    if id(function) in walk.seen:
        return walk.seen[id(function)]
    if module != walk.module or module.split(".")[0] in _LIBRARIES:
        return function  # a library's function (a compiled forward's wrapper, a torch function) reads no model
    cells = tuple(types.CellType() for _ in function.__closure__ or ())
    globals_ = dict(function.__globals__)
    rebuilt = types.FunctionType(function.__code__, globals_, function.__name__, None, cells)
    rebuilt.__qualname__ = function.__qualname__
    rebuilt.__dict__.update(function.__dict__)
    walk.seen[id(function)] = rebuilt  # what a call of itself, met on the way, reaches
    changed = False
    for cell, old in zip(cells, function.__closure__ or ()):
        try:
            value = old.cell_contents
        except ValueError:  # a cell not yet filled
            continue
        cell.cell_contents = copied = _on_the_copy(value, memo, walk)
        changed = changed or copied is not value
    for name in names_read(function.__code__):
        if name in globals_ and (copied := _on_the_copy(value := globals_[name], memo, walk)) is not value:
            globals_[name], changed = copied, True
    rebuilt.__defaults__ = _on_the_copy(function.__defaults__, memo, walk)
    rebuilt.__kwdefaults__ = _on_the_copy(function.__kwdefaults__, memo, walk)
    changed = changed or rebuilt.__defaults__ is not function.__defaults__
    changed = changed or rebuilt.__kwdefaults__ is not function.__kwdefaults__
    if not changed:
        walk.seen[id(function)] = function
        return function
    return rebuilt


_LIBRARIES = frozenset({"torch", "lightning", "pytorch_lightning", "functools", "timm", "torchvision", "rf_callback"})


class _Walk:
    """What :func:`_reading_the_copy` met so far, and how many items it may still look at.

    Each function and container by ``id`` (cycles end there); a helper may read a large global (data, not the
    model's parts), whose items are not looked at. Only the functions of the first one's module are walked (a
    notebook's, a script's): a library's calls reach no model of the user's, and their graphs run deep.
    """

    def __init__(self, module: str):
        self.module = module  # the functions walked are those of the module that the first one is defined in
        self.seen: dict[int, Any] = {}
        self.items_left = 4096


def _on_the_copy(value: Any, memo: dict[int, Any], walk: _Walk) -> Any:
    """What stands for ``value`` on the copy.

    A part of the model's copy, a function or container rebuilt to hold such copies, or ``value`` itself where it
    leads to no part of the model (or the walk has looked at enough items).
    """
    if _in_model(value, memo):
        return memo[id(value)]
    if isinstance(value, types.FunctionType):
        return _reading_the_copy(value, memo, walk)
    if type(value) not in (list, tuple, dict) or id(value) in walk.seen or len(value) > walk.items_left:
        return walk.seen.get(id(value), value)
    walk.items_left -= len(value)
    walk.seen[id(value)] = value  # a container that holds itself stays as it is
    if type(value) is dict:
        entries = {key: _on_the_copy(item, memo, walk) for key, item in value.items()}
        copied: Any = value if all(entries[key] is item for key, item in value.items()) else entries
    else:
        items = [_on_the_copy(item, memo, walk) for item in value]
        copied = value if all(new is old for new, old in zip(items, value)) else type(value)(items)
    walk.seen[id(value)] = copied
    return copied


def _uncompiled(model: nn.Module, live: nn.Module, copied: list[nn.Module]) -> tuple[nn.Module, bool]:
    """Makes the copy run its own forward: compiled wrappers replaced, compiled ``forward`` attributes rebound.

    A deep copy of a ``torch.compile`` wrapper keeps calling the compiled forward of the live module, and so does a
    copy of a module whose ``forward`` attribute was replaced by a compiled one (``trainer.fit`` of a
    ``torch.compile``d LightningModule): a probe of the copy would silently run the live model. ``live`` is the
    module ``model`` was copied from, to find the copy of the module a compiled forward belongs to, and ``copied``
    holds ``model``'s modules. Returns the model to run and whether its modules changed.
    """
    compiled = [
        (module, name, original)
        for module in copied
        for name, child in _children(module)
        if child is not None and (original := _compiled_original(child)) is not None
    ]
    if not compiled and not hasattr(model, "_orig_mod") and not any("forward" in m.__dict__ for m in copied):
        return model, False  # the common case: nothing compiled, no forward attribute to rebind
    counterpart = {id(m): c for m, c in zip(live.modules(), copied)}
    model = getattr(model, "_orig_mod", model)
    for module, name, original in compiled:
        setattr(module, name, original)
    for module in model.modules():
        _own_forward(module, counterpart)
    return model, True


def _children(module: nn.Module):
    """``module.named_children()``, read off its dict of modules where it has a plain one (faster, no set of seen)."""
    modules = module.__dict__.get("_modules")
    return modules.items() if isinstance(modules, dict) else module.named_children()  # TorchScript's: its own kind


def _compiled_original(module: nn.Module) -> nn.Module | None:
    """The module a ``torch.compile`` wrapper wraps (its ``_orig_mod``), or None."""
    modules = module.__dict__.get("_modules")
    original = modules.get("_orig_mod") if isinstance(modules, dict) else getattr(module, "_orig_mod", None)
    return original if isinstance(original, nn.Module) else None


def _own_forward(module: nn.Module, counterpart: dict[int, nn.Module]) -> None:
    """Rebinds a compiled instance-level ``forward`` to the copy of the module it was compiled from.

    A plain bound method stored as ``forward`` (``self.forward = self.inner.forward``) was rebound by the deep copy
    already and is left alone.
    """
    forward = module.__dict__.get("forward")
    if forward is None:
        return
    if getattr(module, "_compiler_ctx", None):  # Lightning's from_compiled: the class's forward is the original
        del module.__dict__["forward"]
        module._compiler_ctx = None  # type: ignore[assignment]  # torch types Module.__setattr__'s value as Tensor | Module
        return
    target = forward
    while not isinstance(target, types.MethodType) and hasattr(target, "_torchdynamo_orig_callable"):
        target = target._torchdynamo_orig_callable
    if target is forward:
        return
    owner = counterpart.get(id(target.__self__)) if isinstance(target, types.MethodType) else None
    if owner is not None:
        owner_forward = types.MethodType(target.__func__, owner)
        if owner is module:
            del module.__dict__["forward"]
            if type(module).forward is not target.__func__:
                module.forward = owner_forward
        else:
            module.forward = owner_forward
    else:  # compiled code that belongs to nothing in the copy: the class's forward
        del module.__dict__["forward"]


def scripted_subject(scripted: list[str]) -> str:
    """The subject of a sentence on the TorchScript parts :func:`scripted_modules` found: "the model is", "[..] are"."""
    return "the model is" if "" in scripted else f"{scripted[:3]} are"


def scripted_modules(model: nn.Module, named: list[tuple[str, nn.Module]] | None = None) -> list[str]:
    """Names of the TorchScript modules in ``model`` (``""`` for the model itself); ``named``: its named modules."""
    named = list(model.named_modules()) if named is None else named
    return [name for name, m in named if isinstance(m, torch.jit.ScriptModule)]


def integer_quantized(module: nn.Module) -> bool:
    """Whether ``module`` was converted to integer quantization (``torch.ao.quantization.convert``).

    Reference modules (``convert_to_reference_fx``) compute in floats, with a gradient: not those.
    """
    kind = type(module).__module__
    return kind.startswith(_INTEGER_QUANTIZED) and not kind.startswith("torch.ao.nn.quantized.reference")


_INTEGER_QUANTIZED = ("torch.ao.nn.quantized", "torch.nn.quantized", "torch.ao.nn.intrinsic.quantized")


def _checked_device(model: nn.Module, modules: list[nn.Module]) -> None:
    tensors = (t for m in modules for t in (*m._parameters.values(), *m._buffers.values()) if t is not None)
    for tensor in tensors:
        if isinstance(tensor, (UninitializedParameter, UninitializedBuffer)):
            lazy = [name or type(model).__name__ for name, m in model.named_modules() if isinstance(m, LazyModuleMixin)]
            raise ValueError(
                f"the model's lazy modules {lazy[:3]} have no parameters yet (they take their shapes from the first "
                f"input they see), so the probe cannot copy them; run one forward pass first (model(example_input)), "
                f"as the Trainer's first step does"
            )
        if tensor.is_meta:
            raise ValueError(
                "the model's parameters are on the meta device (shapes without values), so the probe cannot run it; "
                "materialise it first (model.to_empty(device='cpu') and load its weights) or probe the model it "
                "was built from"
            )


def _is_bias(name: str) -> bool:
    return name.split(".")[-1].endswith("bias")


def prepared_copy(
    model: nn.Module, mode: str, dtype: torch.dtype, *, zero_biases: bool = True, device: torch.device | None = None
) -> nn.Module:
    """Returns the probe's copy of ``model``, prepared for ``mode``, on ``device`` (``None``: where each tensor is).

    The copy is made outside inference mode, in eval mode, in ``dtype``, with plain (non-inference) tensors that do
    not require grad, user hooks dropped and every bias zeroed.

    ``zero_biases=False`` keeps biases and BatchNorm statistics as trained (the network as it computes, for the
    effective field). In theoretical mode every other parameter is set to a positive constant (``1 / fan_in`` for
    weights, 1 for per-channel scales) and BatchNorm statistics to mean 0 and variance 1, so no weight sign, dead
    unit or normalisation can hide a pixel.
    """
    named = list(model.named_modules())  # each walk of a large model's tree costs: one, shared by the checks
    modules = [module for _, module in named]
    _checked_device(model, modules)
    scripted = scripted_modules(model, named)
    if scripted and mode == "theoretical":
        where = scripted_subject(scripted)
        raise ValueError(
            f"{where} TorchScript (torch.jit.script or trace): its functions are compiled, so the theoretical probe "
            f"cannot treat its activations as identities and its max-pools as mean-pools, and a field measured on it "
            f"could be smaller than the architecture's; probe the Python module it was scripted from, or use "
            f"mode='weights' (what the current weights connect)"
        )
    source = getattr(model, "_orig_mod", model)
    source_modules = modules if source is model else list(source.modules())
    with torch.inference_mode(False):
        # The prepared tensors go into the deep copy's memo: the copy never holds (nor copies) the live values.
        if mode != "theoretical":
            check_gathered_fits(source, dtype, device)
        try:
            with fsdp1_parameters_whole(source):
                memo = _prepared_tensors(source_modules, mode, dtype, zero_biases, device)
                clone = module_copy(source, memo)
                if scripted:
                    _write_prepared(source, clone, memo)
        except ProbeError:
            raise
        except Exception as error:
            wrapped = [name for name, m in source.named_modules() if isinstance(m, nn.parallel.DistributedDataParallel)]
            if wrapped:  # its reducer cannot be copied (an internal assertion): the module it wraps can
                inner = f"{wrapped[0]}.module" if wrapped[0] else "model.module"
                raise CopyError(
                    f"the model cannot be deep-copied ({type(error).__name__}: {error}): it holds a "
                    f"DistributedDataParallel wrapper, whose gradient reducer cannot be copied, and the probe runs on "
                    f"a copy so the model is never changed; probe the module it wraps, {inner} (the same parameters)"
                ) from error
            raise CopyError(
                f"the model cannot be deep-copied ({type(error).__name__}: {error}), and the probe runs on a copy so "
                f"the model is never changed; make that attribute copyable (or define __deepcopy__), or probe a "
                f"submodule without it"
            ) from error
        copied = list(clone.named_modules())
        _references_on_the_copy(copied, memo, source_modules)
        clone, changed = _uncompiled(clone, source, [module for _, module in copied])
        copied = list(clone.named_modules()) if changed else copied
        _strip_user_hooks(clone, copied)
        own_eval = type(clone).eval is not nn.Module.eval or "eval" in clone.__dict__
        if not own_eval and all(_plain_mode_switch(module) for _, module in copied):
            for _, module in copied:  # what eval() does, without a __setattr__ per module
                module.__dict__["training"] = False
        else:  # a module's own eval(), train() (freezing its norms, say) or __setattr__ runs
            clone.eval()
    return clone


def _plain_mode_switch(module: nn.Module) -> bool:
    """Whether ``eval()`` only sets ``module.training``: no ``train()`` or ``__setattr__`` of its own reacts to it.

    Its class's or its own (an instance's ``train`` set to a function, as latent diffusion's ``disabled_train``), nor
    a ``training`` property of its class.
    """
    kind = type(module)
    return (
        kind.train is nn.Module.train
        and kind.__setattr__ in _SETATTR_OF_PLAIN_MODES
        and "train" not in module.__dict__
        and "training" in module.__dict__
        and not hasattr(kind, "training")
    )


# __setattr__ methods that set `training` as nn.Module's does (an RNN's watches its weights' names alone).
_SETATTR_OF_PLAIN_MODES = (nn.Module.__setattr__, nn.RNNBase.__setattr__)


def _write_prepared(source: nn.Module, clone: nn.Module, memo: dict[int, Any]) -> None:
    """Puts the prepared tensors into a copy's TorchScript parts, which clone themselves without the deep-copy memo.

    Without it a scripted or traced model kept its real biases in weights mode (a field 35 pixels wide where the
    bias-free one is 49), and its float32 weights under ``dtype=torch.float64``.
    """
    copied = {**dict(clone.named_parameters()), **dict(clone.named_buffers())}
    for name, tensor in [*source.named_parameters(), *source.named_buffers()]:
        prepared = memo.get(id(tensor))
        if prepared is not None and name in copied and copied[name] is not prepared:
            copied[name].data = prepared.data


_PERMUTES = frozenset({"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "einsum"})


def _moves_dim_one(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether the permute-like call ``name`` moves dim 1 of a tensor of 3 or more dims (True where unsure)."""
    tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if name == "einsum" or tensor is None:
        return name == "einsum"
    n = tensor.dim()
    if n < 3:
        return False
    try:
        if name == "permute":
            dims = args[1:] if len(args) > 1 else (kwargs.get("dims"),)
            order = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else tuple(dims)
            return order[1] % n != 1
        if name in ("movedim", "moveaxis"):
            source, destination = (list(args[1:3]) + [kwargs.get("source"), kwargs.get("destination")])[:2]
            ends = [source, destination] if not isinstance(source, (tuple, list)) else [*source, *destination]
            return any(d % n == 1 for d in ends)
        first, second = (list(args[1:3]) + [kwargs.get("dim0"), kwargs.get("dim1")])[:2]
        return first % n != second % n and 1 in (first % n, second % n)
    except (TypeError, IndexError, ZeroDivisionError):
        return True


# Calls that may fold, split or drop dim 1 (see _reshapes_dim_one).
_RESHAPES = frozenset(
    {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "unfold", "view_as", "reshape_as", "select",
     "__getitem__"}
)  # fmt: skip


def _reshapes_dim_one(args: tuple, result) -> bool:
    """Whether a reshape-like call (``view``, ``squeeze``, ``unfold``, an index) gives its result a new dim 1.

    ``x.unfold(-1, 8, 4).squeeze(1)`` makes a (N, 1, L) series a (N, patches, 8) token map: dim 1 now holds the
    patches, which a channels-first reading takes for channels. Only a dim 1 of one channel counts: a reshape of
    many channels (a GroupNorm's ``view(N, G, -1)``, a pixel or channel shuffle) keeps them apart from the spatial
    axes, and is undone later.
    """
    tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if tensor is None or not isinstance(result, torch.Tensor) or result.dim() < 3 or tensor.dim() < 2:
        return False
    return tensor.shape[1] == 1 and result.shape[1] != 1  # one series' channel folded away, another axis in its place


# Attribute values a copy can share with the live module: they cannot change.
_IMMUTABLE = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.memory_format)


def module_copy(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """``copy.deepcopy(module, memo)``, a few times faster on a large module tree.

    Each module is rebuilt from its ``__getstate__`` as a deep copy does, but the empty hook dicts and the sets every
    module carries are made new and immutable values are shared, instead of each going through ``__reduce_ex__``;
    every other attribute is deep-copied (with the same ``memo``, so shared references stay shared). A module whose
    class copies itself its own way (``__deepcopy__``, ``__reduce_ex__``, TorchScript) is deep-copied.
    """
    if id(module) in memo:
        return memo[id(module)]
    cls = type(module)
    if is_fsdp1_wrapper(module):  # FSDP1's wrapper holds the flat parameters: the copy keeps what it wraps
        unwrapped = memo[id(module)] = Unwrapped()
        unwrapped._fsdp_wrapped_module = module_copy(cast(nn.Module, module._fsdp_wrapped_module), memo)
        return unwrapped
    sharded = sharded_class_origin(cls)
    if sharded is not None:  # fully_shard's class refuses deep copies: the copy is of the class it was built from
        cls = sharded
    if (
        getattr(cls, "__deepcopy__", None) is not None
        or cls.__reduce_ex__ is not object.__reduce_ex__
        or cls.__reduce__ is not object.__reduce__
        or isinstance(module, torch.jit.ScriptModule)
    ):
        copied = copy.deepcopy(module, memo)
        if copied is not module or isinstance(module, torch.jit.ScriptModule):
            return copied
        # A __deepcopy__ that returns the module itself, to share it between copies: the probe's copy would run
        # the live module (its weights, its training mode) and set it to eval mode. It is copied as any other.
        try:
            return _rebuilt(module, cls, sharded, memo)
        except ProbeError:
            raise
        except Exception as error:
            raise CopyError(
                f"{cls.__name__}.__deepcopy__ returns the module itself, so that copies share it, and copying it "
                f"otherwise failed ({type(error).__name__}: {error}); the probe runs on a copy and never on the live "
                f"model: let {cls.__name__}.__deepcopy__ return a new module (sharing only what cannot be copied), or "
                f"probe a submodule without it"
            ) from error
    return _rebuilt(module, cls, sharded, memo)


def _rebuilt(module: nn.Module, cls: type[nn.Module], sharded: type | None, memo: dict[int, Any]) -> nn.Module:
    """:func:`module_copy`'s own way: the module rebuilt from its ``__getstate__``, each attribute copied."""
    original = module.__getstate__()
    if not isinstance(original, dict):  # a state of its own making: the deep copy's way
        return copy.deepcopy(module, memo)
    clone = cls.__new__(cls)
    memo[id(module)] = clone
    state = {}
    for key, value in original.items():
        if key == "_modules":
            state[key] = type(value)((name, None if m is None else module_copy(m, memo)) for name, m in value.items())
        elif sharded is not None and key.startswith("__composable_api_state_key"):
            continue  # FSDP's state (process groups, the sharded parameters) stays with the live module
        elif sharded is not None and key.endswith("hooks") and isinstance(value, dict):  # its gathering hooks too
            kept = type(value)((k, hook) for k, hook in value.items() if not is_distributed_hook(hook))
            state[key] = copy.deepcopy(kept, memo) if kept else kept
        elif key in ("_parameters", "_buffers"):
            state[key] = type(value)((name, None if t is None else copy.deepcopy(t, memo)) for name, t in value.items())
        elif key in _HOOK_DICTS and isinstance(value, dict):
            state[key] = _copied_hooks(value, memo)
        elif isinstance(value, torch.Tensor) and not value.is_leaf:
            # A weight computed from others (pruning's weight_orig * weight_mask), which no deep copy takes: its
            # hook computes it again from the copy's own tensors at each forward.
            state[key] = memo.setdefault(id(value), value.detach().clone())
        elif type(value) in _IMMUTABLE or (type(value) in (dict, OrderedDict, set) and not value):
            state[key] = value if type(value) in _IMMUTABLE else type(value)()
        elif type(value) is tuple and all(type(item) in _IMMUTABLE for item in value):
            state[key] = value  # a kernel size, a stride: nothing in it can change
        elif type(value) is set and all(type(item) is str for item in value):
            state[key] = set(value)
        else:
            if type(value) is dict and any(_computed(item) for item in value.values()):
                # A cache of tensors computed with gradient (timm's attention_bias_cache after a forward in eval
                # mode), which no deep copy takes: the copy's forward computes them again, from its own tensors.
                value = {k: item for k, item in value.items() if not _computed(item)}
            state[key] = copy.deepcopy(value, memo)
    clone.__setstate__(state)
    return clone


def _computed(value: object) -> bool:
    """Whether ``value`` is a tensor computed with gradient (it holds a graph, which no deep copy takes)."""
    return isinstance(value, torch.Tensor) and not value.is_leaf


def _prepared_tensors(modules: list[nn.Module], mode: str, dtype, zero_biases: bool, device) -> dict[int, torch.Tensor]:
    """The copy's parameters and buffers, by the ``id`` of the live tensor each replaces (a deep-copy memo).

    ``modules`` are the live model's. Each is made on ``device`` directly (where it is, for None): a copy for the CPU
    never takes GPU memory.
    """
    memo: dict[int, torch.Tensor] = {}
    masks = _pruning_masks(modules) if mode == "theoretical" else set()
    computes = _tensors_computed_from(modules)
    for module in modules:
        for name, param in module._parameters.items():
            if param is not None and id(param) not in memo:
                name = computes.get(id(param), name)  # pruning's bias_orig is a bias
                # Weights mode keeps the weights as they are but zeroes biases: a frozen mask named as one (an
                # attention's 0/-inf "attn_bias") is kept, as the theoretical copy keeps every fixed mask.
                mask = (mode == "theoretical" or (zero_biases and _is_bias(name))) and is_fixed_mask(param)
                value = _prepared_parameter(name, param, mode, dtype, zero_biases, device or param.device, mask=mask)
                memo[id(param)] = nn.Parameter(value, False)
                if mask:
                    memo[id(param)]._rf_fixed_mask = True  # type: ignore[attr-defined]  # not a weight: _is_weight
        for name, buffer in module._buffers.items():
            if buffer is not None and id(buffer) not in memo:
                if id(buffer) in masks:  # the architecture's field: a pruned weight is a weight (see _pruning_masks)
                    memo[id(buffer)] = _constant(buffer, dtype, 1.0, device or buffer.device)
                    continue
                memo[id(buffer)] = _prepared_buffer(name, buffer, mode, dtype, zero_biases, device or buffer.device)
    return memo


def _tensors_computed_from(modules: list[nn.Module]) -> dict[int, str]:
    """The name of the tensor each parameter of ``modules`` computes, by the parameter's id, where torch computes one.

    Pruning keeps ``bias_orig`` and computes ``bias`` from it (as spectral norm keeps ``weight_orig``, the old weight
    norm ``weight_g`` and ``weight_v``), and a parametrization keeps ``parametrizations.bias.original``: each stands
    for the tensor it computes. Without this a pruned bias (Lightning's ``ModelPruning`` prunes biases by default)
    was kept in weights mode, where a negative one hid a path the bias-free network has.
    """
    computes: dict[int, str] = {}
    for module in modules:
        for hook in module._forward_pre_hooks.values():
            # pruning's methods name it _tensor_name, weight and spectral norm's hooks name
            tensor = getattr(hook, "_tensor_name", None) or getattr(hook, "name", None)
            if _is_torch_hook(hook) and isinstance(tensor, str):
                for name, param in module._parameters.items():
                    if param is not None and name in (f"{tensor}_orig", f"{tensor}_g", f"{tensor}_v"):
                        computes[id(param)] = tensor
        if parametrize.is_parametrized(module):
            for tensor, parametrizations in cast(nn.ModuleDict, module.parametrizations).items():
                for param in parametrizations._parameters.values():
                    if param is not None:
                        computes[id(param)] = tensor
    return computes


def _pruning_masks(modules: list[nn.Module]) -> set[int]:
    """The ids of the masks of ``torch.nn.utils.prune`` (and Lightning's ``ModelPruning``) in ``modules``.

    Pruning keeps ``weight_orig`` and a ``weight_mask`` buffer, and a hook multiplies them before each forward. The
    theoretical copy holds every mask at one, as it holds every weight non-zero; weights mode keeps them.
    """
    from torch.nn.utils import prune

    masks = set()
    for module in modules:
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                mask = module._buffers.get(f"{hook._tensor_name}_mask")
                if mask is not None:
                    masks.add(id(mask))
    return masks


def _prepared_parameter(
    name: str, param: torch.Tensor, mode: str, dtype, zero_biases: bool, device, *, mask: bool = False
) -> torch.Tensor:
    if param.is_complex() and mode == "theoretical":
        # A spectral weight (an FNO's or a GFNet's filter, multiplied with an rfft's coefficients): as a real weight,
        # a constant, whatever its trained values (zero-initialised ones cut the whole spectral path), with equal
        # real and imaginary parts, so that neither part of what it multiplies loses its path (w * 1j x, read .real).
        fan_in = max(math.prod(param.shape[1:]), 1) if param.dim() >= 2 else 1
        return _constant(param, torch.promote_types(dtype, torch.complex64), complex(1, 1) / fan_in, device)
    if not param.is_floating_point():
        return param.detach().to(device, copy=True)
    if mask:  # a fixed mask (is_fixed_mask): the architecture's own values
        return param.detach().to(device, dtype, copy=True)
    if mode == "theoretical":  # from the shape alone: a sharded parameter is never gathered
        fan_in = max(math.prod(param.shape[1:]), 1) if param.dim() >= 2 else 1  # an empty one (no tokens): 1
        return _constant(param, dtype, 0.0 if _is_bias(name) and zero_biases else 1.0 / fan_in, device)
    if is_sharded(param):
        # All-gathered: a collective on the parameter's mesh, so every rank prepares the same copy at the same time.
        param = param.detach().full_tensor()  # type: ignore[attr-defined]  # a DTensor's
    value = param.detach().to(device, dtype, copy=True)
    if _is_bias(name) and zero_biases:
        return value.zero_()
    if value.is_floating_point() and (value.dtype != param.dtype or value.dtype == torch.float16):
        _check_representable(name, param, value)
    return value


_MASK_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_fixed_mask(param: torch.Tensor) -> bool:
    """Whether ``param`` is a frozen floating parameter that holds a mask: two values, one of them 0.

    A causal mask held as ``nn.Parameter(torch.tril(ones), requires_grad=False)`` (0 and 1), or an additive one (0
    and -inf), is a constant of the architecture, as it would be in a buffer: the theoretical copy keeps it, and
    with it the positions it hides. A frozen backbone's weights (which a fine-tuning schedule may unfreeze) are not
    two-valued and stay weights; one that is (a Dirac or identity initialisation) is a weight again where a layer
    uses it as its weight (:func:`_collapsed_weight`). A sharded parameter is never read (it would need a gather).
    """
    if param.requires_grad or param.dtype not in _MASK_DTYPES or param.numel() < 2 or is_sharded(param):
        return False  # float8 has no reductions on the CPU: such a parameter is a weight
    if param.device.type == "meta":
        return False
    low, high = torch.aminmax(param.detach())
    if bool(low != 0) and bool(high != 0):  # no zero: most frozen weights stop here, after one reduction
        return False
    value = high if bool(low == 0) else low
    if bool(value == 0):  # all zeros
        return False
    return int(torch.count_nonzero(param)) == int(torch.count_nonzero(param.detach() == value))


def _check_representable(name: str, param: torch.Tensor, value: torch.Tensor) -> None:
    """Refuses weights that the probe's narrower ``dtype`` turns to zero or to subnormal numbers.

    Subnormal float16 weights (below 6e-5) may be flushed to zero by the kernels: their paths would leave the field
    without a word (an edge tap of 1e-5 read 7..9 of 4..12).

    Raises:
        ProbeError: some non-zero weight is zero or subnormal in ``value``'s dtype.
    """
    lost = (param.detach().to(value.device) != 0) & (value.abs() < torch.finfo(value.dtype).tiny)
    if bool(lost.any()):
        kind = str(value.dtype).removeprefix("torch.")
        raise ProbeError(
            f"{int(lost.sum())} non-zero values of the parameter {name!r} are zero or subnormal in {kind} (below "
            f"{torch.finfo(value.dtype).tiny:.1e}), where the kernels may flush them to zero and cut their paths; "
            + (
                "pass dtype=torch.float64"
                if value.dtype == torch.float32
                else "pass a wider dtype, torch.float32 or torch.float64 (probe_rf's default, dtype=None, is float32 "
                "redone in float64 near underflow)"
            )
        )


# Inside shares_in_values(), a softmax twin's share of the gradient is in its values too (see verify_rf).
_SHARES_IN_VALUES = contextvars.ContextVar("rf_callback_shares_in_values", default=False)


@contextlib.contextmanager
def shares_in_values() -> Iterator[None]:
    """Makes the softmax twins' values follow their inputs, as their gradients do (:func:`_softmax_twin`).

    On the theoretical copy's equal values a softmax gives equal probabilities whatever its input: a check by
    forward passes alone (:func:`~rf_callback.core.verify.verify_rf`) would never see a path through its scores (a
    gate over branches, attention). Its twin's gradient gives every live input the mean of the cotangents; here
    its value adds the mean of the live inputs, so the same paths change the output.
    """
    token = _SHARES_IN_VALUES.set(True)
    try:
        yield
    finally:
        _SHARES_IN_VALUES.reset(token)


# Inside materialised_constants(), the theoretical copy's constants are whole tensors: for a forward that writes into
# its own weights (a clamp in place), which an expanded scalar refuses.
_MATERIALISED = contextvars.ContextVar("rf_callback_materialised_constants", default=False)


@contextlib.contextmanager
def materialised_constants(on: bool = True) -> Iterator[None]:
    """Makes the theoretical copies prepared inside it hold their constants in full (``on``), not as one element."""
    token = _MATERIALISED.set(on)
    try:
        yield
    finally:
        _MATERIALISED.reset(token)


def constants_materialised() -> bool:
    """Whether theoretical copies are prepared with their constants in full here (see materialised_constants)."""
    return _MATERIALISED.get()


def with_materialised_fallback(call):
    """Returns ``call()``, or ``call()`` again where its forward needed one of the copy's constants in full.

    The copy holds each constant in one element of memory; the second time, in full (:func:`materialised_constants`).
    A forward needs them so where it writes into one (a clamp of its own weight in place) or reads its memory as
    laid out (``torch.view_as_complex`` of a spectral filter, as Global Filter Networks store it).
    """
    try:
        return call()
    except Exception as error:  # noqa: BLE001 - only what needs a constant in full is retried; the rest is raised
        if _MATERIALISED.get() or not _needs_constants_in_full(error):
            raise
    with materialised_constants():
        return call()


# What torch says where a call needs an expanded scalar's elements in memory of their own.
_NEEDS_MEMORY = ("refers to a single memory location", "must have a last dimension with stride 1")


def _needs_constants_in_full(error: BaseException | None) -> bool:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if any(message in str(error) for message in _NEEDS_MEMORY):
            return True
        error = error.__cause__ or error.__context__
    return False


def _constant(like: torch.Tensor, dtype, value: complex, device) -> torch.Tensor:
    """A tensor shaped like ``like`` holding ``value`` everywhere, in one element of memory (an expanded scalar).

    The theoretical copy's weights are constants, so its copy of a model of several GB costs no more than the
    model's other buffers, and a field can keep it to measure its geometry later (in full inside
    :func:`materialised_constants`).
    """
    constant = torch.full((1,) * like.dim(), value, dtype=dtype, device=device).expand(like.shape)
    return constant.contiguous() if _MATERIALISED.get() else constant


def _prepared_buffer(name: str, buffer: torch.Tensor, mode: str, dtype, zero_biases: bool, device) -> torch.Tensor:
    if name == "observer_enabled":
        # Quantization-aware training's observers: the copy quantizes with the ranges observed in training, as a
        # BatchNorm in eval mode normalises with its running statistics (the probe's own inputs update nothing).
        return torch.zeros_like(buffer, device=device)
    if not buffer.is_floating_point():
        return buffer.detach().to(device, copy=True)
    if mode == "theoretical" and name in ("running_mean", "running_var"):
        return _constant(buffer, dtype, 0.0 if name == "running_mean" else 1.0, device)
    value = buffer.detach().to(device, dtype, copy=True)
    # A per-channel shift held in a buffer (torchvision's FrozenBatchNorm2d, in detection backbones) is a bias: a
    # negative one kept every ReLU after it off on every draw. A mask held as one (0 and -inf, or 0 and 1) is kept.
    shift = name.split(".")[-1] == "bias" and value.dim() == 1 and not _mask_values(value)
    return value.zero_() if (name == "running_mean" or shift) and zero_biases else value


def _mask_values(values: torch.Tensor) -> bool:
    """Whether ``values`` hold a mask: infinite entries, entries of 1e4 or more, or 0 and 1 alone."""
    if not bool(torch.isfinite(values).all()) or bool((values.abs() >= 1e4).any()):
        return True
    return bool(((values == 0) | (values == 1)).all())


_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
    "_global_forward_hooks_always_called",
    "_global_forward_hooks_with_kwargs",
)


@contextlib.contextmanager
def global_hooks_suspended() -> Iterator[None]:
    """Hides the global module hooks (``register_module_forward_hook`` and kin): they would see the probe's copy."""
    from torch.nn.modules import module as module_module

    saved = {}
    for name in _GLOBAL_HOOKS:
        hooks = getattr(module_module, name, None)
        if isinstance(hooks, dict):
            saved[name] = dict(hooks)
            hooks.clear()
    try:
        yield
    finally:
        for name, hooks in saved.items():
            getattr(module_module, name).update(hooks)


class _CheckpointRunThrough:
    """``torch.utils.checkpoint``'s reentrant checkpoint, run as a plain call."""

    @staticmethod
    def apply(function, _preserve_random_state, *args):
        return function(*args)


def _checkpoint_run_through(*_args, **_kwargs) -> Iterator[None]:
    """``torch.utils.checkpoint``'s non-reentrant checkpoint, run as a plain call: no hooks, nothing to recompute."""
    yield


@contextlib.contextmanager
def checkpoints_run_through() -> Iterator[None]:
    """Runs the functions a forward checkpoints (``torch.utils.checkpoint.checkpoint``, either kind) as plain calls.

    A checkpoint recomputes its function in the backward pass, outside the probe's function mode: the recomputed
    activations would not be the theoretical copy's (a non-reentrant checkpoint refuses them), and a reentrant one
    refuses ``torch.autograd.grad``. The probe's copy keeps its activations instead, as a plain forward does.
    """
    from torch.utils import checkpoint as checkpointing

    replacements = {
        "CheckpointFunction": _CheckpointRunThrough,
        "_checkpoint_without_reentrant_generator": _checkpoint_run_through,
    }
    saved = {name: getattr(checkpointing, name) for name in replacements if hasattr(checkpointing, name)}
    for name in saved:
        setattr(checkpointing, name, replacements[name])
    try:
        yield
    finally:
        for name, original in saved.items():
            setattr(checkpointing, name, original)


@contextlib.contextmanager
def probe_scope(device: torch.device) -> Iterator[None]:
    """Where every probe runs: gradients on, inference mode off, random states kept, tensors made on the CPU.

    The global torch (CPU and ``device``), numpy and Python random states are restored on exit. Tensors made without
    a device go to the CPU, as the probe's own code expects (it moves them where they belong), unless the default
    device is the probe's: a field read inside ``with torch.device("meta"):`` (a model built with empty weights), or
    after ``torch.set_default_device("cuda")`` on a CPU model, made its inputs elsewhere.
    """
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    default_device = torch.empty(()).device  # set_default_device's or a `with torch.device(...)` block's
    kept = default_device.type in ("cpu", device.type)
    default = contextlib.nullcontext() if kept else torch.device("cpu")
    try:
        with torch.random.fork_rng(devices=devices), torch.inference_mode(False), torch.enable_grad(), default:
            with _outside_the_users_autograd_state():
                yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@contextlib.contextmanager
def _outside_the_users_autograd_state() -> Iterator[None]:
    """The probe's passes without the caller's saved-tensor hooks and parametrization cache, both kept for after.

    Hooks that pack saved tensors lossily (activation compression) would drop small gradients from a field; a
    ``parametrize.cached()`` block keys its cache by module id, and a copy freed by one probe and the next copy
    built at the same address would read the first copy's weights (the other mode's constants).
    """
    top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    hooked = top_hooks is None or top_hooks(False) is not None
    hooks = torch.autograd.graph.saved_tensors_hooks(_unchanged, _unchanged) if hooked else contextlib.nullcontext()
    enabled, cache = parametrize._cache_enabled, parametrize._cache
    parametrize._cache_enabled, parametrize._cache = 0, {}
    try:
        with hooks:
            yield
    finally:
        parametrize._cache_enabled, parametrize._cache = enabled, cache


def _unchanged(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def model_device(model: nn.Module) -> torch.device:
    """Returns the device of the model's first parameter or buffer (CPU for a model with neither)."""
    for tensor in model.parameters():
        return tensor.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")
