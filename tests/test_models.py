"""The model zoo, FLOP profiles and exit placement."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import eefast
from eefast import EENet, EENetLoss, FlopProfile, count_flops, place_exits
from eefast.placement import DISTRIBUTIONS, exit_costs


@pytest.mark.parametrize("name", eefast.list_models())
def test_every_model_trains(name):
    """Train-mode forward gives E exits of the right shapes, no NaN, and every parameter a gradient."""
    torch.manual_seed(0)
    model = eefast.create_model(name)
    model.train()
    x = torch.randn(2, *model.input_shape)
    target = torch.tensor([1, 3])
    out = model(x)
    E = model.num_exits
    assert out.logits.shape == (E, 2, model.num_classes)
    assert out.conf_logits.shape == (E - 1, 2)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.conf_logits).all()
    loss = EENetLoss()(out, target, model.costs)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a finite gradient: {no_grad}"
    assert name.startswith("resnet") == (E == 1)


def test_zoo_has_the_thesis_models():
    names = set(eefast.list_models())
    for depth in (8, 20, 32, 44, 56, 110, 18, 34, 50, 101, 152):
        assert {f"eenet{depth}", f"resnet{depth}"} <= names


@pytest.mark.parametrize(
    "name, blocks, params",
    [("resnet20", 10, 0.27e6), ("resnet110", 55, 1.7e6), ("resnet18", 9, 11.2e6), ("resnet50", 17, 23.5e6)],
)
def test_backbones_match_the_resnet_paper(name, blocks, params):
    """Block counts and parameter counts of the ResNet papers (CIFAR: 0.27M, 1.7M; ImageNet 18/50 with 10 classes)."""
    model = eefast.create_model(name)
    assert len(model.profile.block_flops) == blocks
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - params) / params < 0.05, count


def test_imagenet_models_take_224():
    model = eefast.create_model("eenet18", input_shape=(3, 224, 224), num_classes=1000).eval()
    pred = model(torch.randn(1, 3, 224, 224))
    assert pred.logits.shape == (1, 1000) and pred.exit.shape == (1,)
    assert model.profile.total == count_flops(nn.Sequential(*model.stages, model.classifier), (3, 224, 224))


def test_from_torchvision_backbone():
    torchvision = pytest.importorskip("torchvision")
    backbone = torchvision.models.resnet18(num_classes=7)
    model = EENet.from_backbone(backbone, num_exits=3, distribution="linear", input_shape=(3, 64, 64))
    assert model.num_classes == 7 and len(model.exits) == 3
    assert model.stages[0][0][0] is backbone.conv1  # weights shared
    backbone.eval()
    model.eval()
    x = torch.randn(3, 3, 64, 64)
    model.threshold = 1.0  # nobody exits early: the backbone's own answer
    model.exits[0].confidence.bias.data.fill_(-100.0)
    for e in model.exits:
        e.confidence.bias.data.fill_(-100.0)
    pred = model(x)
    assert pred.exit.tolist() == [3, 3, 3]
    torch.testing.assert_close(pred.logits, backbone(x))
    with pytest.raises(ValueError, match="expected a torchvision classification network"):
        EENet.from_backbone(nn.Linear(3, 3))


def test_create_model_errors():
    with pytest.raises(ValueError, match=r"unknown model 'eenet7'; expected one of \['eenet101'"):
        eefast.create_model("eenet7")
    with pytest.raises(ValueError, match="6n\\+2"):
        eefast.models.resnet.cifar_resnet(21, 10, 3)


# ---- FLOP profile and placement ----------------------------------------------------------


def ten_blocks() -> FlopProfile:
    """Ten blocks of 10 FLOPs: the boundary after block b sits at (b + 1) / 10 of 100 FLOPs."""
    return FlopProfile(block_flops=(10,) * 10, boundary_shapes=((4, 8, 8),) * 10, classifier_flops=0)


@pytest.mark.parametrize(
    "distribution, positions",
    [
        ("pareto", [1, 3, 4]),  # t = 0.2, 0.36, 0.488
        ("fine", [0, 1, 2]),  # t = 0.05, 0.0975, 0.1426: each the next free boundary
        ("golden_ratio", [2, 3, 6]),  # t = 0.236, 0.382, 0.618
        ("linear", [2, 4, 7]),  # t = 0.25, 0.5, 0.75
        ("quadratic", [0, 2, 5]),  # t = 0.0625, 0.25, 0.5625
    ],
)
def test_exits_land_at_the_first_boundary_past_each_fraction(distribution, positions):
    assert set(DISTRIBUTIONS) == {"pareto", "fine", "golden_ratio", "linear", "quadratic"}
    assert place_exits(ten_blocks(), 3, distribution) == positions


def test_placement_errors():
    three_blocks = FlopProfile((10, 10, 10), ((4, 8, 8),) * 3, 0)
    with pytest.raises(ValueError, match="cannot place 3 exits.*2 candidate boundaries"):
        place_exits(three_blocks, 3, "linear")
    with pytest.raises(ValueError, match="expected distribution in"):
        place_exits(three_blocks, 1, "uniform")
    with pytest.raises(ValueError, match="cannot place"):
        eefast.create_model("eenet8", num_exits=4)  # 4 blocks: 3 candidate boundaries


def test_exact_exit_costs():
    """c_n = (backbone up to exit n + heads 0..n) / backbone; the final pays every early head."""
    costs = exit_costs(ten_blocks(), [1, 3], [2, 3])
    assert costs == [(20 + 2) / 100, (40 + 5) / 100, (100 + 5) / 100]


@pytest.mark.parametrize("name", [n for n in eefast.list_models() if n.startswith("eenet")])
def test_model_costs(name):
    model = eefast.create_model(name)
    costs = model.costs.tolist()
    assert all(a < b for a, b in zip(costs, costs[1:])), costs
    assert costs[-1] > 1.0 and costs[0] > 0.0
    backbone = nn.Sequential(*model.stages, model.classifier)
    assert model.profile.total == count_flops(backbone, model.input_shape)
    heads = [count_flops(e, model.profile.boundary_shapes[p]) for e, p in zip(model.exits, model.exit_positions)]
    assert model.flops[-1] == model.profile.total + sum(heads)
    torch.testing.assert_close(model.costs, torch.tensor(model.flops) / model.profile.total)


def test_eenet8_is_the_thesis_net():
    model = eefast.create_model("eenet8")
    assert model.input_shape == (1, 28, 28) and len(model.exits) == 2
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(widths) == 7 and sorted(set(widths)) == [2, 4, 8]  # 7 convolutions + 1 linear = 8 layers
