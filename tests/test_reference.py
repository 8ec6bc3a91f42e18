"""eefast.reference: the log-space loss against a direct probability-space statement of
Eqs. 6-11, the exit head against torch.nn modules, and the exit rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eefast import ExitBlock, reference

VERSIONS = ["v1", "v2", "mc", "cost"]


def direct_loss(logits, conf_logits, target, costs, lam, version):
    """Eqs. 6-11 as written: mixtures of probabilities, then the log of the target's."""
    y = logits.softmax(dim=-1)  # [E, B, K]
    h = conf_logits.sigmoid()  # [E-1, B]
    mix_y, mix_c = [y[-1]], [costs[-1].expand(y.shape[1])]
    for n in range(y.shape[0] - 2, -1, -1):
        mix_y.insert(0, h[n, :, None] * y[n] + (1 - h[n, :, None]) * mix_y[0])
        mix_c.insert(0, h[n] * costs[n] + (1 - h[n]) * mix_c[0])
    ce = torch.stack([-(m.gather(1, target[:, None]).log()).mean() for m in mix_y])
    cost = torch.stack([c.mean() for c in mix_c])
    return {"v1": ce[0] + lam * cost[0], "v2": (ce + lam * cost).sum(), "mc": ce.sum(), "cost": cost.sum()}[version]


def loss_inputs(num_exits, batch, classes, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(num_exits, batch, classes, generator=g, dtype=torch.float64)).requires_grad_()
    conf_logits = (scale * torch.randn(num_exits - 1, batch, generator=g, dtype=torch.float64)).requires_grad_()
    target = torch.randint(0, classes, (batch,), generator=g)
    costs = torch.sort(torch.rand(num_exits, generator=g, dtype=torch.float64)).values + 0.05
    return logits, conf_logits, target, costs


# label: (E, B, K)
LOSS_SHAPES = {"one-exit": (1, 4, 3), "two-exits": (2, 5, 10), "four-exits": (4, 7, 6), "k1": (3, 3, 1), "k1000": (3, 2, 1000)}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("shape", LOSS_SHAPES.values(), ids=LOSS_SHAPES.keys())
@pytest.mark.parametrize("lam", [1.0, 0.35])
def test_loss_equals_direct_probability_space(shape, version, lam):
    logits, conf_logits, target, costs = loss_inputs(*shape)
    ours = reference.eenet_loss(logits, conf_logits, target, costs, lam, version)
    direct = direct_loss(logits, conf_logits, target, costs, lam, version)
    torch.testing.assert_close(ours, direct, rtol=1e-12, atol=1e-12)
    if not direct.requires_grad:  # one exit, cost only: a constant
        assert not ours.requires_grad
        return
    inputs = (logits, conf_logits) if shape[0] > 1 else (logits,)
    grads = torch.autograd.grad(ours, inputs, allow_unused=True, materialize_grads=True)
    direct_grads = torch.autograd.grad(direct, inputs, allow_unused=True, materialize_grads=True)
    for g, d in zip(grads, direct_grads):
        torch.testing.assert_close(g, d, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("version", VERSIONS)
def test_loss_stays_finite_where_the_direct_form_overflows(version):
    logits, conf_logits, target, costs = loss_inputs(3, 6, 5)
    with torch.no_grad():
        conf_logits.copy_(torch.tensor([[800.0, -800.0, 800.0, -800.0, 40.0, -40.0]] * 2))  # h = 1, 0 exactly
        logits.mul_(1e4)  # the target's probability underflows to 0 for most rows
    direct = direct_loss(logits, conf_logits, target, costs, 1.0, version)
    ours = reference.eenet_loss(logits, conf_logits, target, costs, 1.0, version)
    if version != "cost":
        assert not torch.isfinite(direct), "the case must make the direct form overflow"
    assert torch.isfinite(ours)
    for grad in torch.autograd.grad(ours, (logits, conf_logits), allow_unused=True, materialize_grads=True):
        assert torch.isfinite(grad).all()


def test_cumulative_predictions_are_the_mixtures():
    logits, conf_logits, target, costs = loss_inputs(4, 5, 7)
    log_mix, mix_cost = reference.cumulative_predictions(logits, conf_logits, costs)
    assert log_mix.shape == (4, 5, 7) and mix_cost.shape == (4, 5)
    torch.testing.assert_close(log_mix.exp().sum(-1), torch.ones(4, 5, dtype=torch.float64))
    h, y = conf_logits.sigmoid(), logits.softmax(-1)
    torch.testing.assert_close(log_mix[2].exp(), h[2, :, None] * y[2] + (1 - h[2, :, None]) * y[3])
    torch.testing.assert_close(mix_cost[-1], costs[-1].expand(5))
    ce, cost = reference.eenet_loss_parts(logits, conf_logits, target, costs)
    torch.testing.assert_close(ce, -log_mix.gather(2, target.view(1, -1, 1).expand(4, -1, 1)).squeeze(2).mean(1))
    torch.testing.assert_close(cost, mix_cost.mean(1))


def test_loss_in_half_precision_is_computed_in_float32():
    logits, conf_logits, target, costs = loss_inputs(3, 8, 10)
    want = reference.eenet_loss(logits.float(), conf_logits.float(), target, costs.float())
    for dtype in (torch.float16, torch.bfloat16):
        got = reference.eenet_loss(logits.to(dtype), conf_logits.to(dtype), target, costs)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kind", ["plain", "pool", "bnpool"])
def test_exit_head_matches_nn_modules(kind):
    torch.manual_seed(0)
    block = ExitBlock(6, 9, kind, spatial=(5, 7))
    x = torch.randn(4, 6, 5, 7)
    if kind == "bnpool":
        with torch.no_grad():
            block.bn.weight.uniform_(0.5, 1.5)
            block.bn.bias.uniform_(-0.5, 0.5)
    twin_bn = nn.BatchNorm2d(6)
    if kind == "bnpool":
        twin_bn.load_state_dict(block.bn.state_dict())
    for training in (True, False, True):
        block.train(training)
        twin_bn.train(training)
        logits, conf = block(x)
        features = x
        if kind == "bnpool":
            features = F.relu(twin_bn(x))
        features = features.flatten(1) if kind == "plain" else features.mean((2, 3))
        torch.testing.assert_close(logits, block.classifier(features))
        torch.testing.assert_close(conf, block.confidence(features).squeeze(-1))
    if kind == "bnpool":  # running statistics updated as nn.BatchNorm2d does
        torch.testing.assert_close(block.bn.running_mean, twin_bn.running_mean)
        torch.testing.assert_close(block.bn.running_var, twin_bn.running_var)
        assert int(block.bn.num_batches_tracked) == int(twin_bn.num_batches_tracked) == 2


def test_exit_block_errors_name_the_expected_shape():
    with pytest.raises(ValueError, match="spatial"):
        ExitBlock(4, 10, "plain")
    with pytest.raises(ValueError, match="expected kind in"):
        ExitBlock(4, 10, "avg")
    with pytest.raises(ValueError, match=r"expected input of shape \[B, 4, H, W\], got \[2, 3, 8, 8\]"):
        ExitBlock(4, 10)(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\[B, 4, 8, 8\], got \[2, 4, 7, 8\]"):
        ExitBlock(4, 10, "plain", spatial=(8, 8))(torch.randn(2, 4, 7, 8))


def test_first_confident_exit():
    nan = float("nan")
    confidence = torch.tensor([[0.9, 0.2, nan, 0.1, 0.5], [0.1, 0.7, 0.9, nan, 0.2]])
    exits = reference.first_confident_exit(confidence, torch.tensor([0.5, 0.6]))
    assert exits.tolist() == [0, 1, 1, 2, 0]
