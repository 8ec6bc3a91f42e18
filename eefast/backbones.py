"""Cutting a classification network into the blocks an EENet places its exits between.

``cut_backbone(model)`` returns the network's blocks in order (its natural block boundaries: every
residual or inverted-residual block, every VGG pooling stage) and its classifier (the final
exit: pooling, flattening and the last layers, exactly as the network's own forward applies
them), sharing the network's modules and weights. Families are recognised by their structure
(the attributes their forward uses), so subclasses and variants cut the same way:

- torchvision ResNet / ResNeXt / Wide ResNet (``conv1 … layer4 fc``), RegNet (``stem trunk_output fc``),
  ShuffleNetV2 (``conv1 maxpool stage2..4 conv5 fc``), MobileNet V2 / V3, EfficientNet / V2,
  ConvNeXt, VGG, DenseNet (``features`` + ``classifier``), MNASNet (``layers`` + ``classifier``);
- any ``nn.Sequential``: each child a block, the last child the classifier.

Anything else is a ValueError naming what was expected. Imports torch only (EENet.from_backbone reads it).
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn


class Backbone(NamedTuple):
    blocks: list[nn.Module]
    classifier: nn.Module
    num_classes: int | None  # the classifier's outputs, where its last layer says


class _Mean(nn.Module):
    """x.mean([2, 3]): the global pooling ShuffleNetV2 and MNASNet apply in their forward."""

    def forward(self, x):
        return x.mean([2, 3])


def _last_linear(module: nn.Module) -> int | None:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def _backbone(blocks, *head: nn.Module) -> Backbone:
    classifier = nn.Sequential(*head)
    return Backbone(list(blocks), classifier, _last_linear(classifier))


def _stages(*stages: nn.Module) -> list[nn.Module]:
    """The blocks of stages that are Sequentials of blocks (a stage that is one block stays whole)."""
    return [block for stage in stages for block in (stage if isinstance(stage, nn.Sequential) else [stage])]


def _vgg_blocks(features: nn.Sequential) -> list[nn.Module]:
    """VGG's features cut after every max pooling: one block per stage."""
    blocks, current = [], []
    for layer in features:
        current.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            blocks.append(nn.Sequential(*current))
            current = []
    return blocks + ([nn.Sequential(*current)] if current else [])


def _has(model: nn.Module, *names: str) -> bool:
    return all(hasattr(model, name) for name in names)


def cut_backbone(model: nn.Module) -> Backbone:
    """(blocks, classifier, num_classes) of a torchvision classification network or an nn.Sequential."""
    name = type(model).__name__
    if _has(model, "conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"):
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)  # ResNet, ResNeXt, Wide ResNet
        return _backbone([stem, *_stages(model.layer1, model.layer2, model.layer3, model.layer4)],
                         model.avgpool, nn.Flatten(1), model.fc)
    if _has(model, "stem", "trunk_output", "avgpool", "fc"):  # RegNet
        return _backbone([model.stem, *(block for stage in model.trunk_output for block in stage)],
                         model.avgpool, nn.Flatten(1), model.fc)
    if _has(model, "conv1", "maxpool", "stage2", "stage3", "stage4", "conv5", "fc"):  # ShuffleNetV2
        return _backbone([nn.Sequential(model.conv1, model.maxpool), *_stages(model.stage2, model.stage3, model.stage4),
                          model.conv5], _Mean(), model.fc)
    if _has(model, "layers", "classifier") and name == "MNASNet":
        return _backbone(list(model.layers), _Mean(), model.classifier)
    if _has(model, "features", "classifier") and isinstance(model.features, nn.Sequential):
        features = model.features
        if name == "VGG":
            return _backbone(_vgg_blocks(features), model.avgpool, nn.Flatten(1), model.classifier)
        if name == "DenseNet":  # its forward: features, ReLU, pooling, classifier
            children = list(features.children())
            stem_end = next(i for i, m in enumerate(children) if type(m).__name__ == "_DenseBlock")
            blocks = [nn.Sequential(*children[:stem_end]), *children[stem_end:-1]]
            return _backbone(blocks, children[-1], nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1), model.classifier)
        pool = getattr(model, "avgpool", None)
        pool = nn.AdaptiveAvgPool2d(1) if pool is None else pool  # (MobileNet V2 pools in its forward)
        if name == "ConvNeXt":  # stages alternate a downsampling layer and a Sequential of blocks
            return _backbone(_stages(*features), pool, model.classifier)
        # MobileNet V2 / V3, EfficientNet / V2: the stem, the blocks of each stage, the last conv
        return _backbone(_stages(*features), pool, nn.Flatten(1), model.classifier)
    if isinstance(model, nn.Sequential) and len(model) >= 2:
        return _backbone(list(model)[:-1], model[-1])
    raise ValueError(
        f"cut_backbone: expected a torchvision classification network (ResNet / ResNeXt / Wide ResNet, RegNet, "
        f"ShuffleNetV2, MNASNet, MobileNet V2 / V3, EfficientNet / V2, ConvNeXt, VGG, DenseNet) or an nn.Sequential "
        f"of at least two modules (blocks, then the classifier), got {name}")
