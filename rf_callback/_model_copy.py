"""The probe's private copy of a model: deep-copied, bias-free, eval mode, and optionally linearised."""

from __future__ import annotations

import contextlib
import copy
import math
import random
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

MODES = ("theoretical", "weights")

_ACTIVATIONS = frozenset(
    {
        "relu", "relu6", "leaky_relu", "gelu", "silu", "sigmoid", "tanh", "elu", "selu", "celu", "hardswish",
        "hardsigmoid", "hardtanh", "mish", "softplus", "prelu", "softsign", "rrelu", "threshold", "logsigmoid",
        "tanhshrink", "hardshrink", "softshrink",
    }
)  # fmt: skip
_DROPOUTS = frozenset({"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"})
_NORMALISATIONS = frozenset(
    {"batch_norm", "instance_norm", "group_norm", "layer_norm", "local_response_norm", "rms_norm"}
)
_MAX_POOLS = {"max_pool1d": 1, "max_pool2d": 2, "max_pool3d": 3}
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
    y = y[(..., *(slice(0, o) for o in out))]
    return y.squeeze(0) if unbatched else y


class _ProbeFunctions(TorchFunctionMode):
    """Replaces torch functions while the probe's copy runs.

    Functional calls in a user's ``forward`` (``F.relu``, ``torch.sigmoid``, ``F.max_pool2d``) are treated like
    their module twins.

    Both modes: dropout is the identity (a ``forward`` calling ``F.dropout(x)`` with its default ``training=True``
    would otherwise zero pixels at random and draw from the global random generator).
    Theoretical mode also: activations and normalisations are the identity, max-pooling is its mean-pool twin.
    """

    def __init__(self, linearise: bool):
        super().__init__()
        self.linearise = linearise

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        base = name.rstrip("_")
        if base in _DROPOUTS or (self.linearise and (base in _ACTIVATIONS or base in _NORMALISATIONS)):
            x = args[0] if args else kwargs["input"]
            return x if name.endswith("_") or kwargs.get("inplace") else x.clone()
        # With return_indices the indices feed an unpooling layer, so the real max-pool must stay.
        if self.linearise and name in _MAX_POOLS and not _returns_indices(args, kwargs, position=6):
            kwargs = {k: v for k, v in kwargs.items() if k != "return_indices"}
            return max_pool_twin(_MAX_POOLS[name], *args[:6], **kwargs)
        if self.linearise and name in _ADAPTIVE_MAX_POOLS and not _returns_indices(args, kwargs, position=2):
            kwargs = {k: v for k, v in kwargs.items() if k != "return_indices"}
            return _ADAPTIVE_MAX_POOLS[name](*args[:2], **kwargs)
        return func(*args, **kwargs)


def _returns_indices(args, kwargs, position: int) -> bool:
    return bool(kwargs.get("return_indices", args[position] if len(args) > position else False))


def probe_functions(mode: str) -> TorchFunctionMode:
    """Returns the function mode the probe's forward runs under for ``mode``."""
    return _ProbeFunctions(linearise=mode == "theoretical")


def _is_torch_hook(hook) -> bool:
    module = getattr(hook, "__module__", None) or type(hook).__module__
    return module.startswith("torch.")


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def _strip_user_hooks(model: nn.Module) -> None:
    """Drops the user's hooks from the copy, which would see the probe's tensors.

    Keeps torch's own (weight norm, pruning, spectral norm), which are part of how the module computes.
    """
    for module in model.modules():
        for attribute in _HOOK_DICTS:
            hooks = getattr(module, attribute, None)
            if hooks:
                for key in [k for k, hook in hooks.items() if not _is_torch_hook(hook)]:
                    del hooks[key]


def _uncompiled(model: nn.Module) -> nn.Module:
    """Replaces every ``torch.compile`` wrapper in the tree by the module it wraps.

    A deep copy of a compiled module keeps calling the compiled forward of the live module, so a probe of the copy
    would silently measure the live weights.
    """
    model = getattr(model, "_orig_mod", model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if hasattr(child, "_orig_mod") and isinstance(child._orig_mod, nn.Module):
                setattr(module, name, child._orig_mod)
    return model


def _is_bias(name: str) -> bool:
    return name.split(".")[-1].endswith("bias")


def prepared_copy(model: nn.Module, mode: str, dtype: torch.dtype, *, zero_biases: bool = True) -> nn.Module:
    """Returns the probe's copy of ``model``, prepared for ``mode``.

    The copy is made outside inference mode, in eval mode, in ``dtype``, with plain (non-inference) tensors that do
    not require grad, user hooks dropped and every bias zeroed.

    ``zero_biases=False`` keeps biases and BatchNorm statistics as trained (the network as it computes, for the
    effective field). In theoretical mode every other parameter is set to a positive constant (``1 / fan_in`` for
    weights, 1 for per-channel scales) and BatchNorm statistics to mean 0 and variance 1, so no weight sign, dead
    unit or normalisation can hide a pixel.
    """
    with torch.inference_mode(False):
        clone = _uncompiled(copy.deepcopy(getattr(model, "_orig_mod", model)))
        _strip_user_hooks(clone)
        clone.eval()
        for module in clone.modules():
            for name, param in list(module._parameters.items()):
                if param is not None:
                    value = _prepared_parameter(name, param, mode, dtype, zero_biases)
                    module._parameters[name] = nn.Parameter(value, False)
            for name, buffer in list(module._buffers.items()):
                if buffer is not None:
                    module._buffers[name] = _prepared_buffer(name, buffer, mode, dtype, zero_biases)
    return clone


def _prepared_parameter(name: str, param: torch.Tensor, mode: str, dtype, zero_biases: bool) -> torch.Tensor:
    value = param.detach().clone()
    if not value.is_floating_point():
        return value
    value = value.to(dtype)
    if _is_bias(name) and zero_biases:
        value.zero_()
    elif mode == "theoretical":
        fan_in = value[0].numel() if value.dim() >= 2 else 1
        value.fill_(1.0 / fan_in)
    return value


def _prepared_buffer(name: str, buffer: torch.Tensor, mode: str, dtype, zero_biases: bool) -> torch.Tensor:
    value = buffer.detach().clone()
    if not value.is_floating_point():
        return value
    value = value.to(dtype)
    if name == "running_mean" and zero_biases:
        value.zero_()
    elif name == "running_var" and mode == "theoretical":
        value.fill_(1.0)
    return value


@contextlib.contextmanager
def preserved_random_state(device: torch.device) -> Iterator[None]:
    """Restores the global torch (CPU and ``device``), numpy and Python random states on exit."""
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def model_device(model: nn.Module) -> torch.device:
    """Returns the device of the model's first parameter or buffer (CPU for a model with neither)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")
