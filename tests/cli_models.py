"""Model factories for the rf-probe command's tests (named as MODULE:CALLABLE on its command line)."""

from __future__ import annotations

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
