"""EENet.from_backbone over every torchvision family and a set of timm CNNs (eefast.backbones), random weights.

For one small model of each family: the cut reproduces the network (its FLOPs, counted by
FlopCounterMode, and its logits), exits go in by every placement rule, a training step reaches
every parameter, and compact / mask / sample inference agree on exits, costs and logits.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import eefast
from eefast.flops import count_flops
from eefast.placement import DISTRIBUTIONS

torchvision = pytest.importorskip("torchvision")
models = torchvision.models

# family: a small member, built with random weights (input 3 x 64 x 64, 5 classes)
FAMILIES = {
    "resnet": lambda: models.resnet18(num_classes=5),
    "resnext": lambda: models.ResNet(models.resnet.Bottleneck, [1, 1, 1, 1], num_classes=5, groups=4,
                                     width_per_group=4),
    "wide_resnet": lambda: models.ResNet(models.resnet.Bottleneck, [1, 1, 1, 1], num_classes=5, width_per_group=128),
    "mobilenet_v2": lambda: models.mobilenet_v2(num_classes=5, width_mult=0.25),
    "mobilenet_v3": lambda: models.mobilenet_v3_small(num_classes=5),
    "efficientnet": lambda: models.efficientnet_b0(num_classes=5),
    "efficientnet_v2": lambda: models.efficientnet_v2_s(num_classes=5),
    "regnet": lambda: models.regnet_y_400mf(num_classes=5),
    "convnext": lambda: models.ConvNeXt([models.convnext.CNBlockConfig(16, 32, 1), models.convnext.CNBlockConfig(32, 64, 1),
                                         models.convnext.CNBlockConfig(64, None, 1)], num_classes=5),
    "vgg": lambda: models.vgg11_bn(num_classes=5),
    "mnasnet": lambda: models.mnasnet0_5(num_classes=5),
    "shufflenet_v2": lambda: models.shufflenet_v2_x0_5(num_classes=5),
    "densenet": lambda: models.DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, num_classes=5),
    "sequential": lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                                        nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                                        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))),
}


def _timm(name: str):
    def build():
        timm = pytest.importorskip("timm")
        return timm.create_model(name, pretrained=False, num_classes=5)
    return build


# timm CNNs, cut through timm's own feature_info (one block per stage) and forward_head
FAMILIES.update({f"timm-{name}": _timm(name) for name in (
    "resnet18", "efficientnet_b0", "mobilenetv3_small_100", "convnext_atto", "mnasnet_small", "rexnet_100")})
INPUT = (3, 64, 64)
# timm networks whose stages are not Sequentials, cut at their 4-5 stages alone
STAGE_CUT = {"timm-convnext_atto"}


def backbone_of(family: str) -> nn.Module:
    torch.manual_seed(0)
    model = FAMILIES[family]()
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        model(torch.randn(4, *INPUT))
    return model.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_cuts_into_an_eenet(family):
    backbone = backbone_of(family)
    x = torch.randn(6, *INPUT)
    want = backbone(x)
    exits = 1 if family in STAGE_CUT else 2  # (a few stages: every distribution places one exit)
    for distribution in DISTRIBUTIONS:
        model = eefast.EENet.from_backbone(backbone, num_exits=exits, distribution=distribution, input_shape=INPUT)
        assert model.num_classes == 5 and len(model.exits) == exits
    # natural boundaries: no block is a lone norm or activation, a conv cut from its norm (an
    # nn.Sequential's children are its blocks, whatever they are)
    lone = (nn.BatchNorm2d, nn.LayerNorm, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU)
    if family != "sequential":
        assert not any(isinstance(block, lone) for stage in model.stages for block in stage), model.stages
    # the classifier holds no batch norm: a frozen backbone (--freeze-backbone) keeps every statistic
    if not family.startswith("timm-"):  # (timm's: what its forward_head runs)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.classifier.modules())
    # the cut is the network: its FLOPs (the exits' heads aside) and its logits
    assert model.profile.total == count_flops(backbone, INPUT)
    assert model.flops[-1] == model.profile.total + sum(model.head_flops)
    model.eval()
    torch.testing.assert_close(model.forward_all(x).logits[-1], want, rtol=1e-5, atol=1e-5)
    # a training step reaches every parameter, the shared backbone's too
    model.train()
    loss = eefast.EENetLoss()(model(x), torch.randint(0, 5, (6,)), model.costs)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    # inference: the three modes agree on a mix that leaves at more than one exit (random exits'
    # scores may tie, where ReLUs zero a map: thresholds_for_fractions then warns)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.threshold = model.thresholds_for_fractions(x, [1 / (exits + 1)] * exits)
    preds = {mode: model.predict(x, mode=mode) for mode in ("compact", "mask", "sample")}
    assert len(set(preds["compact"].exit.tolist())) >= 2
    for mode in ("mask", "sample"):
        assert torch.equal(preds["compact"].exit, preds[mode].exit)
        assert torch.equal(preds["compact"].cost, preds[mode].cost)
        torch.testing.assert_close(preds["compact"].logits, preds[mode].logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("network", ["linear", "squeezenet", "googlenet"])
def test_a_network_it_cannot_cut_names_what_it_expected(network):
    """Networks of no family it knows (SqueezeNet has features + classifier, but a conv classifier
    and another forward) are refused, not cut wrongly."""
    model = {"linear": lambda: nn.Linear(3, 3), "squeezenet": lambda: models.squeezenet1_1(num_classes=5),
             "googlenet": lambda: models.googlenet(num_classes=5, aux_logits=False, init_weights=False)}[network]()
    with pytest.raises(ValueError, match=rf"expected a torchvision classification network .* got {type(model).__name__}"):
        eefast.EENet.from_backbone(model)


def test_a_subclass_cuts_as_its_family():
    class MyDenseNet(models.DenseNet):
        pass

    torch.manual_seed(0)
    backbone = MyDenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=5).eval()
    model = eefast.EENet.from_backbone(backbone, num_exits=1, input_shape=INPUT).eval()
    x = torch.randn(2, *INPUT)
    torch.testing.assert_close(model.forward_all(x).logits[-1], backbone(x), rtol=1e-5, atol=1e-5)


def test_a_timm_network_whose_stages_do_not_chain_is_refused():
    """HRNet's forward_features runs its stages as parallel branches: as a sequence of modules the
    cut would compute something else, and it says so instead."""
    timm = pytest.importorskip("timm")
    with pytest.raises(ValueError, match=r"HighResolutionNet's stages .* do not reproduce its forward"):
        eefast.EENet.from_backbone(timm.create_model("hrnet_w18_small", pretrained=False, num_classes=5))
