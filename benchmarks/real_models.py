"""ResNet-18, ResNet-50, VGG-16 and MobileNetV2 as torchvision builds them, for benchmarks without torchvision.

The re-implementations keep torchvision's layer shapes (kernels, strides, paddings, dilations, groups), block
structure, BatchNorm/ReLU/ReLU6 placement, submodule names and class names, so ``layer="layer4"`` or
``layer="features"`` names the same output, and ``rf_table`` lists the same rows. ``check_real_models.py`` compares
them with torchvision's, layer by layer. Weights are initialised as torchvision initialises them.

Use: ``build("resnet18", "own")`` or ``build("resnet18", "torchvision")``.
"""

from __future__ import annotations

import torch
from torch import nn

MODELS = ("resnet18", "resnet50", "vgg16", "mobilenet_v2")
PROBED_LAYER = {"resnet18": "layer4", "resnet50": "layer4", "vgg16": "features", "mobilenet_v2": "features"}


def available_sources() -> list[str]:
    """Returns where models can come from: ``["torchvision", "own"]`` when torchvision imports, else ``["own"]``."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return ["own"]
    return ["torchvision", "own"]


def build(name: str, source: str = "own") -> nn.Module:
    """Builds model ``name`` (one of ``MODELS``) with fresh weights, in eval mode.

    Args:
        name: ``"resnet18"``, ``"resnet50"``, ``"vgg16"`` or ``"mobilenet_v2"``.
        source: ``"torchvision"`` (``torchvision.models.<name>(weights=None)``) or ``"own"`` (this module's).
    """
    if name not in MODELS:
        raise ValueError(f"name={name!r} is not a benchmark model; use one of {MODELS}")
    if source == "torchvision":
        import torchvision.models

        return getattr(torchvision.models, name)(weights=None).eval()
    if source != "own":
        raise ValueError(f"source={source!r} is not a model source; use 'torchvision' or 'own'")
    builders = {
        "resnet18": lambda: ResNet(BasicBlock, [2, 2, 2, 2]),
        "resnet50": lambda: ResNet(Bottleneck, [3, 4, 6, 3]),
        "vgg16": VGG,
        "mobilenet_v2": MobileNetV2,
    }
    return builders[name]().eval()


def closed_form(name: str, source: str = "own") -> tuple[int, int, int]:
    """Returns ``(r, S, P)`` of the longest path from the input to model ``name``'s ``PROBED_LAYER``, per axis.

    The path is the chain of convolutions and max-pools in forward order up to that layer, shortcuts
    (``downsample``) left out: on these networks every shortcut's field lies inside the main path's, so the union
    over paths is the main path's field.
    ``r = 1 + sum (k_l - 1) d_l prod_{i<l} s_i``, ``S = prod s_l``, ``P = sum p_l prod_{i<l} s_i`` (square layers).
    """
    model = build(name, source)
    children = [child for child, _ in model.named_children()]
    upto = set(children[: children.index(PROBED_LAYER[name]) + 1])  # registration order is forward order here
    r, jump, offset = 1, 1, 0
    for module_name, module in model.named_modules():
        path = module_name.split(".")
        if path[0] not in upto or "downsample" in path or not isinstance(module, (nn.Conv2d, nn.MaxPool2d)):
            continue
        k, s, p, d = (_first(getattr(module, a)) for a in ("kernel_size", "stride", "padding", "dilation"))
        r, offset, jump = r + (k - 1) * d * jump, offset + p * jump, jump * s
    return r, jump, offset


def _first(value: int | tuple[int, ...]) -> int:
    return value if isinstance(value, int) else value[0]


# ResNet (torchvision.models.resnet: V1.5, the stride on the 3x3 convolution of a bottleneck)


def _conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, padding=dilation, groups=groups, bias=False, dilation=dilation)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm, ReLU after the first and after the residual sum."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, each with BatchNorm; ReLU between them and after the sum."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the three convolutions of ``x`` plus its shortcut, through ReLU."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """The stem (7x7/2 convolution, 3x3/2 max-pool), four stages of blocks, global average pool and ``fc``."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], num_classes: int = 1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride), nn.BatchNorm2d(planes * block.expansion)
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the class scores, ``(N, num_classes)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# VGG-16 (torchvision.models.vgg, configuration "D", no BatchNorm)

_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(nn.Module):
    """Thirteen 3x3 convolutions with ReLU and five 2x2 max-pools, a 7x7 adaptive average pool, three linears."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(cin, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )  # fmt: skip
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the class scores, ``(N, num_classes)``."""
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# MobileNetV2 (torchvision.models.mobilenetv2, width 1.0)


class Conv2dNormActivation(nn.Sequential):
    """Convolution (no bias, "same" padding), BatchNorm, ReLU6: torchvision.ops.misc's block, children 0, 1, 2."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        conv = nn.Conv2d(cin, cout, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False)
        super().__init__(conv, nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))
        self.out_channels = cout


class InvertedResidual(nn.Module):
    """1x1 expansion (unless ``expand_ratio`` is 1), 3x3 depthwise (strided), 1x1 linear projection; a residual
    sum where the stride is 1 and the channels match.
    """

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        self.stride = stride
        hidden = int(round(cin * expand_ratio))
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(cin, hidden, kernel_size=1))
        layers += [
            Conv2dNormActivation(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns ``conv(x)``, plus ``x`` where the block is residual."""
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


# expansion t, channels c, repeats n, stride s of the first repeat
_MOBILENET_V2 = [
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
]  # fmt: skip


class MobileNetV2(nn.Module):
    """A 3x3/2 stem, seventeen inverted residual blocks, a 1x1 convolution to 1280 channels (all in ``features``),
    global average pooling (functional) and ``classifier``.
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        cin = 32
        features: list[nn.Module] = [Conv2dNormActivation(3, cin, stride=2)]
        for t, c, n, s in _MOBILENET_V2:
            for i in range(n):
                features.append(InvertedResidual(cin, c, s if i == 0 else 1, expand_ratio=t))
                cin = c
        features.append(Conv2dNormActivation(cin, 1280, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(1280, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the class scores, ``(N, num_classes)``."""
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))
