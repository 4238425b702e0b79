"""Layer chains and their receptive fields derived by hand: the closed form and an exact per-axis set recurrence."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Layer:
    kind: str  # "conv", "max" or "avg"
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    ceil_mode: bool = False

    def module(self, channels: int) -> nn.Module:
        n = len(self.kernel)
        if self.kind == "conv":
            conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[n - 1]
            return conv(channels, channels, self.kernel, self.stride, self.padding, self.dilation)
        if self.kind == "max":
            pool = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)[n - 1]
            return pool(self.kernel, self.stride, self.padding, self.dilation, ceil_mode=self.ceil_mode)
        pool = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[n - 1]
        return pool(self.kernel, self.stride, self.padding, ceil_mode=self.ceil_mode)


def closed_form(layers: list[Layer], axis: int) -> tuple[int, int, int]:
    """distill.pub: r = 1 + sum (k_l - 1) d_l prod_{i<l} s_i, S = prod s_l, P = sum p_l prod_{i<l} s_i."""
    r, jump, offset = 1, 1, 0
    for layer in layers:
        r += (layer.kernel[axis] - 1) * layer.dilation[axis] * jump
        offset += layer.padding[axis] * jump
        jump *= layer.stride[axis]
    return r, jump, offset


def lengths(layers: list[Layer], input_length: int, axis: int, model: nn.Module, shape) -> list[int]:
    """Spatial lengths before each layer and after the last, read off a real forward pass."""
    out = [input_length]
    x = torch.zeros(shape)
    with torch.no_grad():
        for module in model:
            x = module(x)
            out.append(x.shape[2 + axis])
    return out


def exact_hull(layers: list[Layer], sizes: list[int], axis: int, index: int) -> tuple[int, int] | None:
    """The hull of the exact set of input indices reaching output ``index``, propagated layer by layer."""
    reach = {index}
    for layer, size in zip(reversed(layers), reversed(sizes[:-1])):
        k, s, p, d = layer.kernel[axis], layer.stride[axis], layer.padding[axis], layer.dilation[axis]
        reach = {o * s - p + j * d for o in reach for j in range(k)}
        reach = {i for i in reach if 0 <= i < size}
    return (min(reach), max(reach)) if reach else None


def build(layers: list[Layer], channels: int) -> nn.Sequential:
    return nn.Sequential(*(layer.module(channels) for layer in layers))


def span(geometry: tuple[int, int, int], index: int) -> tuple[int, int]:
    r, s, p = geometry
    return index * s - p, index * s - p + r - 1


def clip(bounds: tuple[int, int], length: int) -> tuple[int, int]:
    return max(bounds[0], 0), min(bounds[1], length - 1)


def prod(values) -> int:
    return math.prod(values)


def runnable(
    layers: list[Layer], input_spatial: tuple[int, ...]
) -> tuple[nn.Sequential, tuple[int, ...], torch.Tensor]:
    """The chain with 2 channels, its input shape and its output; hypothesis skips chains the input does not fit."""
    from hypothesis import assume

    model = build(layers, channels=2)
    shape = (1, 2, *input_spatial)
    try:
        with torch.no_grad():
            out = model(torch.zeros(shape))
    except RuntimeError:
        assume(False)
    assume(out.numel() > 0)
    return model, shape, out
