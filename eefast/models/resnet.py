"""ResNet backbones as lists of blocks, and the EENet / plain models built on them.

- ``eenet20/32/44/56/110`` and ``resnet20/...``: ResNet 6n+2 for 32x32 inputs (He et al. 2016,
  Section 4.2): a 3x3 stem with 16 filters, three stages of n basic blocks with 16/32/64
  filters (strides 1, 2, 2), global average pooling and a linear classifier.
- ``eenet18/34/50/101/152`` and ``resnet18/...``: the ImageNet ResNets as they are ("naive" in
  the thesis): a 7x7 stride-2 stem with max pooling, four stages of basic (18, 34) or bottleneck
  (50, 101, 152) blocks with 64/128/256/512 filters. They take 32x32 (default, as the thesis)
  and 224x224 inputs (``input_shape=(3, 224, 224)``).
Each block is one candidate exit position; the ``resnet*`` baselines have no exits.
"""

from __future__ import annotations

from torch import Tensor, nn

from eefast.eenet import EENet
from eefast.models.registry import register_model


def conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
    ]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut (a 1x1 projection where the shape changes)."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1):
        super().__init__()
        out_channels = planes * self.expansion
        self.residual = nn.Sequential(
            *conv_bn(in_channels, planes, 3, stride), nn.ReLU(inplace=True), *conv_bn(planes, out_channels, 3)
        )
        self.shortcut = (
            nn.Sequential(*conv_bn(in_channels, out_channels, 1, stride))
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.residual(x) + self.shortcut(x))


class Bottleneck(BasicBlock):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4, and a shortcut."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1):
        nn.Module.__init__(self)
        out_channels = planes * self.expansion
        self.residual = nn.Sequential(
            *conv_bn(in_channels, planes, 1), nn.ReLU(inplace=True),
            *conv_bn(planes, planes, 3, stride), nn.ReLU(inplace=True),
            *conv_bn(planes, out_channels, 1),
        )
        self.shortcut = (
            nn.Sequential(*conv_bn(in_channels, out_channels, 1, stride))
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )
        self.relu = nn.ReLU(inplace=True)


def classifier(in_features: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(in_features, num_classes))


def stage(block: type[BasicBlock], in_channels: int, planes: int, count: int, stride: int) -> list[nn.Module]:
    blocks = [block(in_channels, planes, stride)]
    blocks += [block(planes * block.expansion, planes) for _ in range(count - 1)]
    return blocks


def cifar_resnet(depth: int, num_classes: int, in_channels: int, width: float = 1.0) -> tuple[list[nn.Module], nn.Module]:
    """ResNet 6n+2: (blocks, classifier). ``width`` scales the 16/32/64 filters (rounded; FLOPs
    scale about as its square): the smaller static networks a budget is compared with."""
    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"expected a ResNet depth of the form 6n+2 (8, 20, 32, ...), got {depth}")
    if not 0 < width <= 16:
        raise ValueError(f"expected a width multiplier in (0, 16], got {width}")
    n = (depth - 2) // 6
    a, b, c = (max(1, round(f * width)) for f in (16, 32, 64))
    blocks: list[nn.Module] = [nn.Sequential(*conv_bn(in_channels, a, 3), nn.ReLU(inplace=True))]
    blocks += stage(BasicBlock, a, a, n, 1) + stage(BasicBlock, a, b, n, 2) + stage(BasicBlock, b, c, n, 2)
    return blocks, classifier(c, num_classes)


IMAGENET_LAYOUTS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


def imagenet_resnet(depth: int, num_classes: int, in_channels: int) -> tuple[list[nn.Module], nn.Module]:
    """ResNet-18/34/50/101/152 as in the ResNet paper: (blocks, classifier)."""
    if depth not in IMAGENET_LAYOUTS:
        raise ValueError(f"expected an ImageNet ResNet depth in {sorted(IMAGENET_LAYOUTS)}, got {depth}")
    block, counts = IMAGENET_LAYOUTS[depth]
    stem = nn.Sequential(*conv_bn(in_channels, 64, 7, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
    blocks: list[nn.Module] = [stem]
    channels = 64
    for planes, count, stride in zip((64, 128, 256, 512), counts, (1, 2, 2, 2)):
        blocks += stage(block, channels, planes, count, stride)
        channels = planes * block.expansion
    return blocks, classifier(channels, num_classes)


def build(backbone, depth: int, *, num_classes: int = 10, input_shape=(3, 32, 32), **kwargs) -> EENet:
    width = {"width": kwargs.pop("width")} if "width" in kwargs else {}  # the 6n+2 ResNets only
    blocks, head = backbone(depth, num_classes, input_shape[0], **width)
    return EENet(blocks, head, num_classes=num_classes, input_shape=input_shape, **kwargs)


# EENets: 2 quadratic exits on the 6n+2 ResNets (EENet-20, EENet-110 of Figs. 4.1, 4.6 and
# Tables 4.4-4.8), 3 on the ImageNet ResNets (Figs. 4.2-4.5).
CIFAR_DEFAULTS = dict(num_exits=2, distribution="quadratic")
IMAGENET_DEFAULTS = dict(num_exits=3, distribution="quadratic")


def _cifar(depth: int, kwargs: dict) -> EENet:
    return build(cifar_resnet, depth, **{**CIFAR_DEFAULTS, **kwargs})


def _imagenet(depth: int, kwargs: dict) -> EENet:
    return build(imagenet_resnet, depth, **{**IMAGENET_DEFAULTS, **kwargs})


def _plain(backbone, depth: int, kwargs: dict) -> EENet:
    return build(backbone, depth, **without_exits(f"resnet{depth}", kwargs))


def without_exits(name: str, kwargs: dict) -> dict:
    """A plain network's arguments: early exits asked for are an error, not dropped."""
    asked = {k: v for k, v in kwargs.items() if k in ("num_exits", "exit_positions", "distribution") and v}
    if asked:
        raise ValueError(f"create_model: {name} is a plain network without early exits; expected no {sorted(asked)}, "
                         f"got {asked} (its EENet is eenet{name.removeprefix('resnet')})")
    return {**kwargs, "num_exits": 0}


@register_model(args=("width",))
def eenet20(**kwargs) -> EENet:
    return _cifar(20, kwargs)


@register_model(args=("width",))
def eenet32(**kwargs) -> EENet:
    return _cifar(32, kwargs)


@register_model(args=("width",))
def eenet44(**kwargs) -> EENet:
    return _cifar(44, kwargs)


@register_model(args=("width",))
def eenet56(**kwargs) -> EENet:
    return _cifar(56, kwargs)


@register_model(args=("width",))
def eenet110(**kwargs) -> EENet:
    return _cifar(110, kwargs)


@register_model
def eenet18(**kwargs) -> EENet:
    return _imagenet(18, kwargs)


@register_model
def eenet34(**kwargs) -> EENet:
    return _imagenet(34, kwargs)


@register_model
def eenet50(**kwargs) -> EENet:
    return _imagenet(50, kwargs)


@register_model
def eenet101(**kwargs) -> EENet:
    return _imagenet(101, kwargs)


@register_model
def eenet152(**kwargs) -> EENet:
    return _imagenet(152, kwargs)


@register_model(args=("width",))
def resnet20(**kwargs) -> EENet:
    return _plain(cifar_resnet, 20, kwargs)


@register_model(args=("width",))
def resnet32(**kwargs) -> EENet:
    return _plain(cifar_resnet, 32, kwargs)


@register_model(args=("width",))
def resnet44(**kwargs) -> EENet:
    return _plain(cifar_resnet, 44, kwargs)


@register_model(args=("width",))
def resnet56(**kwargs) -> EENet:
    return _plain(cifar_resnet, 56, kwargs)


@register_model(args=("width",))
def resnet110(**kwargs) -> EENet:
    return _plain(cifar_resnet, 110, kwargs)


@register_model
def resnet18(**kwargs) -> EENet:
    return _plain(imagenet_resnet, 18, kwargs)


@register_model
def resnet34(**kwargs) -> EENet:
    return _plain(imagenet_resnet, 34, kwargs)


@register_model
def resnet50(**kwargs) -> EENet:
    return _plain(imagenet_resnet, 50, kwargs)


@register_model
def resnet101(**kwargs) -> EENet:
    return _plain(imagenet_resnet, 101, kwargs)


@register_model
def resnet152(**kwargs) -> EENet:
    return _plain(imagenet_resnet, 152, kwargs)
