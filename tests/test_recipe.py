"""The training recipe's pieces: the loss terms on top of the thesis's, where their gradients go,
the learning-rate schedule, the augmentation and the recipes' settings."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import eefast
from eefast import reference
from eefast.data import RandomShift
from eefast.train import RECIPES, Phase, TrainConfig, build_loss, learning_rate, recipe_value, training_phases


def _outputs(seed: int = 0, exits: int = 3, batch: int = 16, classes: int = 10):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(exits, batch, classes, generator=generator, dtype=torch.float64, requires_grad=True)
    conf = torch.randn(exits - 1, batch, generator=generator, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, classes, (batch,), generator=generator)
    costs = torch.tensor([0.1, 0.4, 1.0][-exits:], dtype=torch.float64)
    return eefast.EENetOutput(logits, conf), target, costs


def test_the_default_loss_is_the_thesis_loss():
    out, target, costs = _outputs()
    for version in reference.LOSS_VERSIONS:
        expected = reference.eenet_loss(out.logits, out.conf_logits, target, costs, 0.7, version)
        loss = eefast.EENetLoss(0.7, version, impl="reference")
        torch.testing.assert_close(loss(out, target, costs), expected)
        torch.testing.assert_close(loss.terms(out, target, costs)[0], expected)


def test_exit_cross_entropy_and_distillation_formulas():
    out, target, _ = _outputs()
    per_exit = torch.stack([F.cross_entropy(z, target) for z in out.logits])
    torch.testing.assert_close(reference.exit_cross_entropy(out.logits, target), per_exit)
    t = 2.0
    teacher = F.softmax(out.logits[-1] / t, -1)
    kd = torch.stack([t * t * F.kl_div(F.log_softmax(z / t, -1), teacher, reduction="batchmean") for z in out.logits[:-1]])
    torch.testing.assert_close(reference.distillation_loss(out.logits, t), kd)


def test_recipe_loss_adds_its_terms():
    out, target, costs = _outputs()
    loss = eefast.EENetLoss(1.0, "v2", impl="reference", exit_weight=0.5, distill=2.0, distill_temperature=3.0)
    expected = (reference.eenet_loss(out.logits, out.conf_logits, target, costs, 1.0, "v2")
                + 0.5 * reference.exit_cross_entropy(out.logits, target).sum()
                + 2.0 * reference.distillation_loss(out.logits, 3.0).sum())
    torch.testing.assert_close(loss(out, target, costs), expected)


def test_confidence_only_keeps_the_thesis_terms_off_the_classifiers():
    out, target, costs = _outputs()
    eefast.EENetLoss(1.0, "v2", impl="reference", exit_weight=1.0, confidence_only=True)(out, target, costs).backward()
    own = out.logits.detach().requires_grad_()
    reference.exit_cross_entropy(own, target).sum().backward()
    torch.testing.assert_close(out.logits.grad, own.grad)  # the classifiers learn from their own terms alone
    assert out.conf_logits.grad.abs().sum() > 0  # the confidence heads learn from the thesis's
    out, target, costs = _outputs()
    eefast.EENetLoss(1.0, "v2", impl="reference")(out, target, costs).backward()
    assert out.logits.grad.abs().sum() > 0  # the thesis's loss as written reaches the classifiers


def test_distillation_treats_the_final_exit_as_a_fixed_teacher():
    out, _, _ = _outputs()
    reference.distillation_loss(out.logits, 3.0).sum().backward()
    assert not out.logits.grad[-1].any() and out.logits.grad[:-1].abs().sum() > 0


@pytest.mark.parametrize("name, value", [("exit_weight", -1.0), ("distill", float("nan")),
                                         ("distill_temperature", 0.0), ("lam", float("inf"))])
def test_loss_settings_are_checked(name, value):
    with pytest.raises(ValueError, match=f"expected a finite {name}"):
        eefast.EENetLoss(**{name: value})


def test_recipes_and_overrides():
    assert recipe_value(TrainConfig(), "policy") == RECIPES["eefast"]["policy"]
    assert recipe_value(TrainConfig(recipe="thesis"), "threshold") == 0.5
    assert recipe_value(TrainConfig(recipe="thesis", policy="entropy"), "policy") == "entropy"
    thesis = build_loss(TrainConfig(recipe="thesis"))
    assert (thesis.exit_weight, thesis.distill, thesis.confidence_only) == (0.0, 0.0, False)
    default = build_loss(TrainConfig())
    assert (default.exit_weight, default.distill, default.confidence_only) == (1.0, 0.0, True)
    assert build_loss(TrainConfig(distill=0.5)).distill == 0.5
    with pytest.raises(ValueError, match="no loss term would train the classifiers"):
        build_loss(TrainConfig(exit_weight=0.0))
    # backbone-then-joint: its second phase trains every part at --lr; backbone-first's exits at --exit-lr
    joint_after = TrainConfig(lr=0.01, epochs=4, exit_epochs=1, schedule="backbone-then-joint")
    assert training_phases(joint_after) == [Phase("backbone", 0, 3), Phase("joint", 3, 4)]
    assert learning_rate(joint_after, 3, 0, 10, training_phases(joint_after)) == 0.01
    with pytest.raises(ValueError, match=r"unknown recipe 'sdn'; expected one of \['thesis', 'eefast'\]"):
        build_loss(TrainConfig(recipe="sdn"))


def test_cosine_schedule_from_lr_to_zero():
    config = TrainConfig(lr=0.01, epochs=4)
    rates = [learning_rate(config, epoch, step, 10) for epoch in range(4) for step in range(10)]
    assert rates[0] == 0.01 and rates[-1] < 0.01 * 1e-2 and all(a >= b for a, b in zip(rates, rates[1:]))
    assert rates[20] == pytest.approx(0.005)  # half-way
    assert learning_rate(TrainConfig(lr=0.01, lr_schedule="constant"), 3, 9, 10) == 0.01
    assert math.isclose(learning_rate(config, 2, 0, 10), 0.5 * 0.01 * (1 + math.cos(math.pi * 0.5)))


def test_random_shift_moves_the_image_and_keeps_the_label():
    image = torch.full((1, 6, 6), -1.0)
    image[0, 2, 3] = 5.0
    data = RandomShift([(image, 7)], max_shift=2, fill=-1.0)
    torch.manual_seed(0)
    seen = set()
    for _ in range(300):
        shifted, label = data[0]
        assert label == 7 and shifted.shape == (1, 6, 6)
        assert (shifted == 5.0).sum() == 1 and (shifted == -1.0).sum() == 35
        seen.add(tuple(torch.nonzero(shifted == 5.0)[0].tolist()))
    assert len(seen) == 25  # every shift of up to 2 pixels each way
    torch.manual_seed(0)
    first = [data[0][0] for _ in range(5)]
    torch.manual_seed(0)
    assert all(torch.equal(a, data[0][0]) for a in first)  # the seed fixes the shifts


def test_backbone_first_trains_the_backbone_then_the_exits_alone(tmp_path):
    from eefast.train import Interruption, Trainer

    config = TrainConfig(model="eenet8", filters=2, epochs=2, exit_epochs=1, schedule="backbone-first", batch_size=256,
                         quiet=True, plots=False, out=str(tmp_path))
    trainer = Trainer(config)
    model = trainer.model
    assert trainer.phases == [Phase("backbone", 0, 1), Phase("exits", 1, 2)]
    exits_before = {k: v.clone() for k, v in model.exits.state_dict().items()}
    with Interruption() as interruption:
        trainer._train_epoch(0, interruption)  # the backbone phase: the exits do not move
        assert all(torch.equal(v, exits_before[k]) for k, v in model.exits.state_dict().items())
        backbone = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("exits.")}
        trainer._train_epoch(1, interruption)  # the exits' phase: the backbone, BN statistics included, stays
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in backbone.items())
    assert all(not torch.equal(model.exits.state_dict()[k], v) for k, v in exits_before.items())
    # the learning rate restarts its cosine in each phase
    phases = trainer.phases
    assert learning_rate(config, 1, 0, 10, phases) == 10 * config.lr  # the exits' phase: --exit-lr
    config.exit_lr = 0.5
    assert learning_rate(config, 1, 0, 10, phases) == 0.5
    assert learning_rate(config, 0, 5, 10, phases) == pytest.approx(config.lr / 2)
    with pytest.raises(ValueError, match=r"expected 0 < --exit-epochs < --epochs \(2\), got 2"):
        Trainer(TrainConfig(model="eenet8", epochs=2, exit_epochs=2, out=str(tmp_path)))


def test_backbone_phase_is_judged_on_its_own_objective(tmp_path):
    """The backbone phase's validation loss was the whole recipe's, which untrained exits keep from
    improving: early stopping ended runs before their exits' phase."""
    from eefast.train import FinalExitLoss, Trainer

    trainer = Trainer(TrainConfig(model="eenet8", filters=2, epochs=3, exit_epochs=1, schedule="backbone-then-joint",
                                  batch_size=256, quiet=True, plots=False, out=str(tmp_path)))
    trainer.run()
    assert isinstance(trainer._criterion(0), FinalExitLoss) and trainer._criterion(2) is trainer.criterion
    history = json.loads((tmp_path / "history.json").read_text())
    # the final exit's cross-entropy (about log 10 at first), not the recipe's sum over exits
    assert history[0]["val_loss"] < 2.5 < history[2]["val_loss"]
    out = eefast.EENetOutput(torch.randn(3, 5, 10), torch.randn(2, 5))
    target = torch.arange(5)
    torch.testing.assert_close(FinalExitLoss()(out, target, torch.ones(3)), F.cross_entropy(out.logits[-1], target))
