"""EENet-8 (Fig. 4.7): the thesis's tiny ResNet-like net for MNIST, and its plain ResNet-8.

A 3x3 stem with f filters, three basic blocks with f, 2f, 4f filters, all at the input's
resolution, global average pooling and a linear classifier: 8 weight layers, 2-8 filters with
the default f = 2. Its FLOPs grow block by block with the width, so that exits after the first
and the second block cost 0.08 and 0.27 of the backbone: Table 4.1's 0.08 and 0.26. Those are
EENet-8's default exits (pool type); ``num_exits`` / ``distribution`` place others.
"""

from __future__ import annotations

from torch import nn

from eefast.eenet import EENet
from eefast.models.registry import register_model
from eefast.models.resnet import BasicBlock, classifier, conv_bn, without_exits


def eenet8_backbone(num_classes: int, in_channels: int, filters: int) -> tuple[list[nn.Module], nn.Module]:
    f = filters
    blocks = [
        nn.Sequential(*conv_bn(in_channels, f, 3), nn.ReLU(inplace=True)),
        BasicBlock(f, f),
        BasicBlock(f, 2 * f),
        BasicBlock(2 * f, 4 * f),
    ]
    return blocks, classifier(4 * f, num_classes)


def _build(filters: int, num_classes: int, input_shape, **kwargs) -> EENet:
    blocks, head = eenet8_backbone(num_classes, input_shape[0], filters)
    return EENet(blocks, head, num_classes=num_classes, input_shape=input_shape, **kwargs)


@register_model(args=("filters",))
def eenet8(*, filters: int = 2, num_classes: int = 10, input_shape=(1, 28, 28), **kwargs) -> EENet:
    if not {"num_exits", "distribution", "exit_positions"} & kwargs.keys():
        kwargs["exit_positions"] = [1, 2]  # after the first and second basic blocks (Table 4.1)
    kwargs.setdefault("num_exits", len(kwargs.get("exit_positions") or [0, 0]))
    return _build(filters, num_classes, input_shape, **kwargs)


@register_model(args=("filters",))
def resnet8(*, filters: int = 2, num_classes: int = 10, input_shape=(1, 28, 28), **kwargs) -> EENet:
    return _build(filters, num_classes, input_shape, **without_exits("resnet8", kwargs))
