"""Cutting a classification network into the blocks an EENet places its exits between.

``cut_backbone(model)`` returns the network's blocks in order (its natural block boundaries: every
residual or inverted-residual block, every VGG pooling stage) and its classifier (the final
exit: pooling, flattening and the last layers, exactly as the network's own forward applies
them), sharing the network's modules and weights. Families are recognised by the attributes their
forward uses, or by torchvision's class (isinstance), so subclasses and variants cut the same way:

- torchvision ResNet / ResNeXt / Wide ResNet (``conv1 … layer4 fc``), RegNet (``stem trunk_output fc``),
  ShuffleNetV2 (``conv1 maxpool stage2..4 conv5 fc``), MobileNet V2 / V3, EfficientNet / V2,
  ConvNeXt, VGG, DenseNet (``features`` + ``classifier``), MNASNet (``layers`` + ``classifier``);
- timm CNNs (anything with timm's ``feature_info``, ``forward_features`` and ``forward_head``): the
  modules ``forward_features`` calls, cut at the stages of ``feature_info`` (and after each block
  of a stage that is an nn.Sequential), and ``forward_head`` as the classifier; the cut is run
  once against the network's own forward and refused where they differ;
- any ``nn.Sequential``: each child a block, the last child the classifier.

Anything else is a ValueError naming what was expected. Imports torch (and torchvision where
installed) only: EENet.from_backbone reads it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
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
    """The blocks of stages that are plain Sequentials of blocks; anything else (a block, or a
    Sequential subclass such as torchvision's Conv2dNormActivation) stays whole."""
    return [block for stage in stages for block in (stage if type(stage) is nn.Sequential else [stage])]


def _torchvision_classes() -> dict:
    """torchvision's model classes by family (empty without torchvision)."""
    try:
        from torchvision import models
    except ImportError:
        return {}
    return {"mnasnet": models.MNASNet, "vgg": models.VGG, "densenet": models.DenseNet, "convnext": models.ConvNeXt,
            "mobilenet": (models.MobileNetV2, models.MobileNetV3, models.EfficientNet)}


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


class _TimmHead(nn.Module):
    """A timm model's ``forward_head`` over the modules it calls (registered here, so they move
    and train with the EENet); the model itself is held unregistered."""

    def __init__(self, model: nn.Module, modules: list[nn.Module]):
        super().__init__()
        self.head_modules = nn.ModuleList(modules)
        object.__setattr__(self, "_model", model)

    def forward(self, x):
        return self._model.forward_head(x)


def _called_children(model: nn.Module, run) -> list[str]:
    """Names of the model's children that ``run()`` calls, in call order (each once)."""
    called, hooks = [], []
    for name, child in model.named_children():
        hooks.append(child.register_forward_pre_hook(lambda module, args, _name=name: called.append(_name)))
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return list(dict.fromkeys(called))


def _timm_backbone(model: nn.Module) -> Backbone:
    """Blocks at timm's feature_info stages: every module forward_features calls, in order, up to and
    including each stage's feature module (a child named ``a`` or one of a child's children
    ``a.b``, every one of which is then a stage), a stage that is an nn.Sequential cut after each
    of its blocks; forward_head is the classifier. Checked against the model's forward."""
    input_size = tuple(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))
    device = next(model.parameters()).device
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0)).to(device)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            features = None

            def run_features():
                nonlocal features
                features = model.forward_features(x)
            feature_children = _called_children(model, run_features)
            head_children = _called_children(model, lambda: model.forward_head(features))
            want = model(x)
            points = [info["module"] for info in model.feature_info]
            children = dict(model.named_children())
            modules = []  # (qualified name, module) in call order, a parent of feature modules expanded
            for name in feature_children:
                if any(point.startswith(name + ".") for point in points):
                    modules += [(f"{name}.{sub}", m) for sub, m in children[name].named_children()]
                else:
                    modules.append((name, children[name]))
            units = []  # (module, whether a block ends after it): a stage that is a Sequential, block by block
            for name, module in modules:
                stage = name in points or "." in name  # a feature module, or a stage of an expanded child
                if stage and isinstance(module, nn.Sequential) and len(module) > 1:
                    units += [(block, True) for block in module]
                else:
                    units.append((module, stage))
            blocks, current = [], []
            for module, boundary in units:
                current.append(module)
                if boundary:
                    blocks.append(nn.Sequential(*current))
                    current = []
            if current:  # what forward_features runs after the last stage (a final conv, a norm)
                blocks[-1:] = [nn.Sequential(*(blocks[-1] if blocks else []), *current)]
            head = _TimmHead(model, [children[name] for name in head_children])
            try:
                got = head(nn.Sequential(*blocks)(x))
            except RuntimeError:  # (modules that do not chain: branches, skips across children)
                got = None
    finally:
        model.train(training)
    same = got is not None and got.shape == want.shape and (  # (a model on the meta device has shapes alone)
        device.type == "meta" or torch.allclose(got, want, rtol=1e-4, atol=1e-5))
    if len(blocks) < 2 or not same:
        raise ValueError(f"cut_backbone: {type(model).__name__}'s stages (feature_info {points}) do not reproduce its "
                         "forward as a sequence of modules; expected a timm CNN whose forward_features calls its "
                         "modules in order")
    return Backbone(blocks, head, getattr(model, "num_classes", None) or _last_linear(head))


def cut_backbone(model: nn.Module) -> Backbone:
    """(blocks, classifier, num_classes) of a torchvision or timm classification network or an nn.Sequential."""
    name = type(model).__name__
    if type(model) is nn.Sequential and len(model) >= 2:
        return _backbone(list(model)[:-1], model[-1])
    if _has(model, "feature_info", "forward_features", "forward_head"):  # timm (before torchvision: same names)
        return _timm_backbone(model)
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
    classes = _torchvision_classes()
    if classes and isinstance(model, classes["mnasnet"]):  # a stem of 8 layers, 6 stacks of blocks, a last conv
        layers = list(model.layers)
        return _backbone([nn.Sequential(*layers[:8]), *_stages(*layers[8:14]), nn.Sequential(*layers[14:])], _Mean(),
                         model.classifier)
    if classes and isinstance(model, classes["vgg"]):
        return _backbone(_vgg_blocks(model.features), model.avgpool, nn.Flatten(1), model.classifier)
    if classes and isinstance(model, classes["densenet"]):  # its forward: features, ReLU, pooling, classifier
        children = list(model.features.children())
        stem_end = next(i for i, m in enumerate(children) if type(m).__name__ == "_DenseBlock")
        blocks = [nn.Sequential(*children[:stem_end]), *children[stem_end:-2],
                  nn.Sequential(*children[-2:])]  # the last dense block and the final batch norm (the features')
        return _backbone(blocks, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1), model.classifier)
    if classes and isinstance(model, classes["convnext"]):  # a stem, then blocks and downsampling layers in turn
        blocks = [block for i, stage in enumerate(model.features) for block in (stage if i % 2 else [stage])]
        return _backbone(blocks, model.avgpool, model.classifier)
    if classes and isinstance(model, classes["mobilenet"]):  # the stem, each stage's blocks, the last conv
        pool = getattr(model, "avgpool", None)
        pool = nn.AdaptiveAvgPool2d(1) if pool is None else pool  # (MobileNet V2 pools in its forward)
        return _backbone(_stages(*model.features), pool, nn.Flatten(1), model.classifier)
    raise ValueError(
        f"cut_backbone: expected a torchvision classification network (ResNet / ResNeXt / Wide ResNet, RegNet, "
        f"ShuffleNetV2, MNASNet, MobileNet V2 / V3, EfficientNet / V2, ConvNeXt, VGG, DenseNet), a timm CNN "
        f"(feature_info, forward_features, forward_head) or an nn.Sequential "
        f"of at least two modules (blocks, then the classifier), got {name}")
