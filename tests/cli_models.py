"""Model factories for the rf-probe command's tests (named as MODULE:CALLABLE on its command line)."""

from __future__ import annotations

import argparse
import sys
import threading

import torch
from torch import nn

from tests.models import TinyResNet, TinyUNet


def small_net(channels: int = 3, width: int = 4) -> nn.Sequential:
    """conv3 p1, ReLU, conv3 s2 p1, ReLU, conv3 p1.

    By hand, per axis: r = 1 + 2 + 2 + 2*2 = 9, S = 2, P = 1 + 1 + 1*2 = 4.
    """
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
    )


def small_net_1d(channels: int = 2) -> nn.Sequential:
    """conv5 p2, conv3 s2: r = 1 + 4 + 2 = 7, S = 2, P = 2 + 0 = 2."""
    return nn.Sequential(nn.Conv1d(channels, 4, 5, padding=2), nn.Conv1d(4, 4, 3, stride=2))


def resnet(classes: int = 10) -> nn.Module:
    """The tests' TinyResNet (stem, max-pool, two basic blocks, global pool, linear): 25 x 25, S 4, P 12."""
    return TinyResNet(classes)


def unet() -> nn.Module:
    """The tests' one-level TinyUNet: a field of 10 whose position alternates (no single stride)."""
    return TinyUNet()


def not_a_model() -> str:
    return "a string"


def broken_factory() -> nn.Module:
    raise RuntimeError("the factory failed on purpose")


# --- factories that fail, for the command's reliability tests -------------------------------------------------


def locked_net() -> nn.Module:
    """small_net holding a threading.Lock, which copy.deepcopy (and so the probe's private copy) refuses."""
    model = small_net()
    model.lock = threading.Lock()
    return model


def exiting_factory(code: int = 3) -> nn.Module:
    """A factory that ends the program instead of returning a model."""
    sys.exit(code)


def argparse_factory() -> nn.Module:
    """A factory that parses a command line of its own, as scripts do: argparse prints its usage and exits 2."""
    parser = argparse.ArgumentParser(prog="train.py")
    parser.add_argument("--depth", type=int, required=True)
    return small_net(width=parser.parse_args([]).depth)


def interrupted_factory() -> nn.Module:
    """A factory interrupted by the user (Ctrl-C)."""
    raise KeyboardInterrupt


class _FailingForward(nn.Module):
    def __init__(self, exit_code: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.exit_code = exit_code

    def forward(self, x):
        if self.exit_code is not None:
            sys.exit(self.exit_code)
        raise RuntimeError("the forward failed on purpose")


def failing_forward() -> nn.Module:
    """A model whose forward raises RuntimeError."""
    return _FailingForward()


def exiting_forward() -> nn.Module:
    """A model whose forward calls sys.exit(4)."""
    return _FailingForward(exit_code=4)


def dead_net() -> nn.Module:
    """small_net with its first convolution's weights zero: no input reaches the output in weights mode."""
    model = small_net()
    with torch.no_grad():
        model[0].weight.zero_()
    return model


def nan_net() -> nn.Module:
    """small_net with NaN weights: the probe's gradient in weights mode is not finite."""
    model = small_net()
    with torch.no_grad():
        model[2].weight.fill_(float("nan"))
    return model


class _KeyedMaps(nn.Module):
    """A dict of two feature maps under ``keys``: a 3 x 3 convolution's, then one of ``kernel`` (padded to keep the
    size) and ``stride``'s."""

    def __init__(self, keys: tuple[str, str], kernel: int, stride: int = 1):
        super().__init__()
        self.keys = keys
        self.fine, self.coarse = nn.Conv2d(3, 2, 3, padding=1), nn.Conv2d(3, 2, kernel, stride, padding=kernel // 2)

    def forward(self, x):
        return {self.keys[0]: self.fine(x), self.keys[1]: self.coarse(x)}


def two_maps() -> nn.Module:
    """A dict of two feature maps: 'fine' (3 x 3 field) and 'coarse' (5 x 5)."""
    return _KeyedMaps(("fine", "coarse"), 5)


def level_maps() -> nn.Module:
    """Two levels keyed by digit strings, as torchvision's FPN and IntermediateLayerGetter key theirs: '0' (3 x 3
    field) and '1' (5 x 5, stride 2)."""
    return _KeyedMaps(("0", "1"), 5, stride=2)


def padded_keys() -> nn.Module:
    """A dict keyed '01' (3 x 3 field) and '1' (9 x 9): digits that name keys, not one index."""
    return _KeyedMaps(("01", "1"), 9)


class _EmptyMap(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3)

    def forward(self, x):
        return self.conv(x)[:, :, :0]


def empty_map() -> nn.Module:
    """A map with no rows (a slice that keeps none)."""
    return _EmptyMap()


class _HeadDefinedFirst(nn.Module):
    """A CRNN's order: a 1D head defined before the 2D body that runs first."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv1d(4 * 8, 8, 3, padding=1)
        self.body = nn.Conv2d(3, 4, 3, stride=4, padding=1)

    def forward(self, x):
        y = self.body(x)
        return self.head(y.flatten(1, 2))


def head_defined_first() -> nn.Module:
    """On 3 x 32 x W inputs: a 2D body, then a 1D head over the width."""
    return _HeadDefinedFirst()


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, stride=2)

    def forward(self, x):
        return self.conv(self.conv(x))


def twice() -> nn.Module:
    """One convolution called twice: its calls have fields of their own, so the table has no row."""
    return _Twice()
