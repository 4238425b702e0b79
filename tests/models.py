"""Small reference networks written for the tests, with their receptive fields derived by hand."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def seed_readme_convs() -> nn.Sequential:
    """The simple-receptive-field README's example: a 41 x 23 field at (4, 8) on a 60 x 90 input."""
    return nn.Sequential(
        nn.Conv2d(3, 16, (5, 3), stride=(3, 2)),
        nn.Conv2d(16, 16, (5, 3), stride=2),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.Conv2d(16, 8, 3),
    )


def vgg_style() -> nn.Sequential:
    """Two VGG stages: [conv3 p1, BN, ReLU] x 2, max-pool 2/2, then again.

    By hand, the layers' (k - 1) times their jumps 1, 1, 1, 2, 2, 2 (BatchNorm, ReLU and Dropout add nothing):
    r = 1 + 2 + 2 + 1 + 4 + 4 + 2 = 16, S = 4, P = 1 + 1 + 0 + 2 + 2 + 0 = 6.
    """

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(3, 8), *block(8, 8), nn.MaxPool2d(2), *block(8, 16), *block(16, 16), nn.MaxPool2d(2), nn.Dropout(0.5)
    )


class BasicBlock(nn.Module):
    """A ResNet basic block: two 3x3 convolutions, BatchNorm, ReLU, with a 1x1 strided shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class TinyResNet(nn.Module):
    """stem conv3/1 p1 -> maxpool 3/2 p1 -> block(s1) -> block(s2) -> global pool -> linear.

    The longest path decides the field (the shortcuts are inside it). By hand, per axis, with jumps:
    stem k3 (j1): +2; maxpool k3 (j1): +2, then j2; block1 conv k3, conv k3 (j2): +4 +4;
    block2 conv k3 s2 (j2): +4, then j4; conv k3 (j4): +8. r = 1 + 2 + 2 + 4 + 4 + 4 + 8 = 25, S = 4,
    P = 1 + 1*1 + 1*2 + 1*2 + 1*2 + 1*4 = 12.
    """

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = BasicBlock(8, 8, 1)
        self.layer2 = BasicBlock(8, 16, 2)
        self.head = nn.Linear(16, classes)
        self.dropout = nn.Dropout(0.2)

    def forward(self, x):
        x = self.layer2(self.layer1(self.pool(self.stem(x))))
        return self.head(self.dropout(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


class TinyUNet(nn.Module):
    """A one-level U-Net: down (conv3, maxpool2), up (nearest x2), concatenated with the skip, conv3.

    By hand, output x sees [x - 2, x + 2] through the skip and, through the deep path, [x - 5, x + 4] for even x
    and [x - 4, x + 5] for odd x: a field of 10 whose position alternates, so no single stride describes it.
    """

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(1, 4, 3, padding=1)
        self.mid = nn.Conv2d(4, 4, 3, padding=1)
        self.dec = nn.Conv2d(8, 2, 3, padding=1)

    def forward(self, x):
        skip = F.relu(self.enc(x))
        deep = F.relu(self.mid(F.max_pool2d(skip, 2)))
        up = F.interpolate(deep, scale_factor=2, mode="nearest")
        return self.dec(torch.cat([skip, up], dim=1))


class MeanGate(nn.Module):
    """A convolution, then a squeeze-and-excitation gate as timm writes it: the map times a function of its mean."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(channels, channels, 3, padding=1), nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        x = self.conv(x)
        return x * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))


def gated(blocks: int) -> nn.Sequential:
    """A strided stem, then ``blocks`` gated convolutions: every output sees the whole input (by the gates' means)."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), *[MeanGate(8) for _ in range(blocks)])
