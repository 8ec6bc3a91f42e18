"""EENet-8 (Fig. 4.7): the thesis's tiny ResNet-like net for MNIST, and its plain ResNet-8.

A 3x3 stem with f filters, three basic blocks with f, 2f, 4f filters (strides 1, 2, 2), global
average pooling and a linear classifier: 8 weight layers, 2-8 filters with the default f = 2.
EENet-8 has two pool exits placed quadratically, as in Table 4.1.
"""

from __future__ import annotations

from torch import nn

from eefast.eenet import EENet
from eefast.models.registry import register_model
from eefast.models.resnet import BasicBlock, classifier, conv_bn


def eenet8_backbone(num_classes: int, in_channels: int, filters: int) -> tuple[list[nn.Module], nn.Module]:
    f = filters
    blocks = [
        nn.Sequential(*conv_bn(in_channels, f, 3), nn.ReLU(inplace=True)),
        BasicBlock(f, f),
        BasicBlock(f, 2 * f, stride=2),
        BasicBlock(2 * f, 4 * f, stride=2),
    ]
    return blocks, classifier(4 * f, num_classes)


def _build(filters: int, num_classes: int, input_shape, **kwargs) -> EENet:
    blocks, head = eenet8_backbone(num_classes, input_shape[0], filters)
    return EENet(blocks, head, num_classes=num_classes, input_shape=input_shape, **kwargs)


@register_model
def eenet8(*, filters: int = 2, num_classes: int = 10, input_shape=(1, 28, 28), **kwargs) -> EENet:
    kwargs = {"num_exits": 2, "distribution": "quadratic", **kwargs}
    return _build(filters, num_classes, input_shape, **kwargs)


@register_model
def resnet8(*, filters: int = 2, num_classes: int = 10, input_shape=(1, 28, 28), **kwargs) -> EENet:
    return _build(filters, num_classes, input_shape, **{**kwargs, "num_exits": 0})
