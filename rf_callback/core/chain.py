"""The closed form of a plain chain of PyTorch's own layers: (r, S, P) read off their arguments, without a pass.

A model that is an ``nn.Sequential`` (nested ones included) of convolutions, poolings and layers that act on each
position alone (activations, batch norms, dropout) has, along each axis, the geometry of distill.pub's closed form
(:func:`~rf_callback.core.geometry.chain_geometry`). Reading it costs nothing, where measuring it costs a dozen
passes on thin inputs, most of a small probe's time. Anything else in the chain (a module of the user's, whose
forward may do anything) leaves the measurement to :mod:`~rf_callback.core.geometry_probe`.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.pooling import _MaxPoolNd

from rf_callback.core.request import ProbeRequest

Layer = tuple[int, int, int, int]  # kernel, stride, padding, dilation along one axis

_CONVS: dict[type[nn.Module], int] = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_MAX_POOLS: dict[type[nn.Module], int] = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}
_AVG_POOLS: dict[type[nn.Module], int] = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
# Layers whose output at a position depends on the input at that position alone (batch norm: in the eval-mode
# copy, a per-channel affine map; dropout: the identity).
_POINTWISE = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
)  # fmt: skip

# Whether probes read the closed form where it applies (tests of the measured geometry turn it off).
ENABLED = True


class _NotAChain(Exception):
    pass


def chain_layers(model: nn.Module, request: ProbeRequest) -> list[list[Layer]] | None:
    """Per spatial axis, the layers of a plain chain up to the probed output, or ``None`` for any other model.

    Args:
        model: the model as probed (read now: the caller keeps the answer, never the model).
        request: the probe's request: its layer, layout, element and number of spatial axes.

    Returns:
        For each spatial axis, the ``(kernel, stride, padding, dilation)`` of every layer up to and including the
        probed one, in forward order; ``None`` where the model is not such a chain, the output is read other than
        channels first, or the closed form is turned off.
    """
    if not ENABLED or request.element is not None or request.parsed_layout != "channels_first":
        return None
    n_axes = len(request.input_shape) - 2
    layers: list[list[Layer]] = [[] for _ in range(n_axes)]
    try:
        reached = _walk(model, "", request.layer, layers)
    except _NotAChain:
        return None
    return layers if reached or request.layer is None else None


def _walk(module: nn.Module, name: str, target: str | None, layers: list[list[Layer]]) -> bool:
    """Appends ``module``'s layers; returns whether the walk reached the output named ``target``."""
    if module._forward_hooks or module._forward_pre_hooks:
        raise _NotAChain  # a hook may change what the module returns
    if type(module) is nn.Sequential:
        for child_name, child in module._modules.items():  # as forward runs them, a module listed twice included
            full = f"{name}.{child_name}" if name else child_name
            if child is None or _walk(child, full, target, layers):
                return True
    else:
        _append(module, layers)
    return name == target and target is not None


def _append(module: nn.Module, layers: list[list[Layer]]) -> None:
    kind, n_axes = type(module), len(layers)
    if isinstance(module, _POINTWISE) and kind in _POINTWISE:
        return
    if isinstance(module, _ConvNd) and _CONVS.get(kind) == n_axes and module.padding_mode == "zeros":
        kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
        padding = module.padding
        if isinstance(padding, str):  # "valid", or "same": PyTorch pads the smaller half first
            padding = tuple(0 if padding == "valid" else d * (k - 1) // 2 for k, d in zip(kernel, dilation))
    elif isinstance(module, _MaxPoolNd) and _MAX_POOLS.get(kind) == n_axes and not module.return_indices:
        kernel, stride = _per_axis(module.kernel_size, n_axes), _per_axis(module.stride or module.kernel_size, n_axes)
        padding, dilation = _per_axis(module.padding, n_axes), _per_axis(module.dilation, n_axes)
    elif _AVG_POOLS.get(kind) == n_axes:
        kernel, stride = _per_axis(module.kernel_size, n_axes), _per_axis(module.stride or module.kernel_size, n_axes)
        padding, dilation = _per_axis(module.padding, n_axes), (1,) * n_axes
    else:
        raise _NotAChain
    for axis in range(n_axes):
        layers[axis].append((kernel[axis], stride[axis], padding[axis], dilation[axis]))


def _per_axis(value, n_axes: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n_axes
