"""Exit policies (learned confidence, top probability, entropy), their temperatures and the
threshold calibration: the formulas, every inference mode agreeing under each policy, and the
rule travelling with checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import eefast
from eefast import reference
from eefast.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from eefast.evaluate import (ExitOutputs, budget_table, calibrate, collect_exits, thresholds_for_budget,
                             thresholds_for_drop, thresholds_for_final_accuracy)
from eefast.policies import EXIT_POLICIES, fit_temperatures

INFERENCE_MODES = ("compact", "mask", "sample")


def _model(policy: str, seed: int = 0) -> eefast.EENet:
    torch.manual_seed(seed)
    model = eefast.create_model("eenet8", filters=2, policy=policy).eval()
    for block in model.exits:  # spread the scores so that thresholds split the batch
        block.classifier.weight.data.mul_(20)
        block.confidence.weight.data.mul_(20)
    return model


def test_scores_follow_their_formulas():
    logits, conf = torch.randn(6, 10, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    temperature = torch.tensor(2.5, dtype=torch.float64)
    p = F.softmax(logits / 2.5, dim=-1)
    torch.testing.assert_close(reference.exit_scores(logits, conf, "confidence", temperature), torch.sigmoid(conf))
    torch.testing.assert_close(reference.exit_scores(logits, conf, "max_prob", temperature), p.max(-1).values)
    entropy = -(p * p.log()).sum(-1)
    torch.testing.assert_close(reference.exit_scores(logits, conf, "entropy", temperature), 1 - entropy / math.log(10))
    # the extremes: a one-hot softmax scores 1 under both softmax rules, a uniform one 1/K and 0
    sure, unsure = torch.tensor([[1e4, 0.0, 0.0]]), torch.zeros(1, 3)
    assert reference.exit_scores(sure, torch.zeros(1), "max_prob").item() == 1.0
    assert reference.exit_scores(sure, torch.zeros(1), "entropy").item() == 1.0
    assert reference.exit_scores(unsure, torch.zeros(1), "max_prob").item() == pytest.approx(1 / 3)
    assert reference.exit_scores(unsure, torch.zeros(1), "entropy").item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("policy", EXIT_POLICIES)
def test_nan_scores_never_exit(policy):
    model = _model(policy)
    x = torch.randn(4, 1, 28, 28)
    x[1] = float("nan")
    model.threshold = 0.0  # every finite score exits at exit 0
    for mode in INFERENCE_MODES:
        pred = model.predict(x, mode=mode)
        assert pred.exit.tolist() == [0, 2, 0, 0], mode


def test_unknown_policy_names_the_choices():
    with pytest.raises(ValueError, match=r"expected an exit policy in \('confidence', 'max_prob', 'entropy'\), got 'top1'"):
        eefast.create_model("eenet8", policy="top1")
    with pytest.raises(ValueError, match="expected policy in"):
        reference.exit_scores(torch.zeros(1, 2), torch.zeros(1), "top1")
    model = eefast.create_model("eenet8")
    with pytest.raises(ValueError, match=r"expected 2 temperatures in \[0.01, 100.0\] \(in the model.s torch.float32\), got \[1.0, 0.0\]"):
        model.set_exit_temperature([1.0, 0.0])


@pytest.mark.parametrize("policy", EXIT_POLICIES)
def test_every_mode_takes_the_same_exits_under_each_policy(policy):
    model = _model(policy)
    model.set_exit_temperature([0.7, 1.9])
    x = torch.randn(64, 1, 28, 28)
    model.threshold = model.thresholds_for_fractions(x, [0.3, 0.3])
    exits = reference.first_confident_exit(model.exit_scores(model.forward_all(x)), torch.tensor(model.threshold))
    assert torch.bincount(exits, minlength=3).tolist() == [19, 19, 26]  # round(0.3 * 64) each, the rest last
    preds = {mode: model.predict(x, mode=mode) for mode in INFERENCE_MODES}
    for mode, pred in preds.items():
        assert torch.equal(pred.exit, exits), mode
        torch.testing.assert_close(pred.logits, preds["mask"].logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(pred.cost, model.costs[exits])


def test_changing_the_policy_drops_what_described_the_old_one():
    from eefast.graphs import SegmentGraphs

    model = _model("confidence")
    model.segment_graphs = SegmentGraphs(eager=True)  # the graphs' stand-in off the GPU
    x = torch.randn(32, 1, 28, 28)
    model.threshold = model.thresholds_for_fractions(x, [0.5, 0.25])
    model.plan_compaction(x, repeats=1)
    assert model.compaction_plan is not None
    before = model.predict(x)
    graphs = model.segment_graphs
    model.policy = "max_prob"
    assert model.compaction_plan is None and model.segment_graphs is not graphs
    model.threshold = model.thresholds_for_fractions(x, [0.25, 0.25])
    after = model.predict(x)
    eager = _model("max_prob")
    eager.threshold = model.threshold
    assert torch.equal(after.exit, eager.predict(x).exit) and not torch.equal(after.exit, before.exit)
    assert torch.bincount(after.exit, minlength=3).tolist() == [8, 8, 16]


def test_temperature_scaling_recovers_the_temperature_of_calibrated_logits():
    generator = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(2, 4000, 10, generator=generator)
    true_t = torch.tensor([2.0, 0.5])
    # labels drawn from softmax(z / T): the model is calibrated at T
    target = torch.multinomial(F.softmax(logits[0] / true_t[0], -1), 1, generator=generator).squeeze(1)
    both = torch.stack([logits[0], logits[0] * true_t[1] / true_t[0]])  # exit 1: the same softmax at T = 0.5
    fitted = fit_temperatures(both, target)
    torch.testing.assert_close(fitted, true_t, rtol=0.08, atol=0)
    with pytest.raises(ValueError, match=r"expected logits \[E-1, N, K\] and target \[N\]"):
        fit_temperatures(logits[0], target)


def _outputs(seed: int = 0) -> tuple[ExitOutputs, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    n = 400
    score = torch.rand(2, n, generator=generator, dtype=torch.float64)
    # early exits are right more often where they are confident; the final exit is right at 95 %
    correct = torch.stack([torch.rand(n, generator=generator) < 0.6 + 0.4 * score[0].float(),
                           torch.rand(n, generator=generator) < 0.8 + 0.2 * score[1].float(),
                           torch.rand(n, generator=generator) < 0.95])
    return ExitOutputs(correct, score), torch.tensor([0.1, 0.5, 1.0])


@pytest.mark.parametrize("max_drop", [0.0, 0.5, 2.0, 10.0])
def test_drop_calibration_is_the_cheapest_setting_within_the_drop(max_drop):
    outputs, costs = _outputs()
    final = 100.0 * outputs.correct[-1].double().mean().item()
    thresholds = thresholds_for_drop(outputs, costs, max_drop)
    accuracy, cost = outputs.simulate(thresholds, costs)
    assert accuracy >= final - max_drop - 1e-9
    # no setting of the grid (every threshold pair from a finer grid) is cheaper within the drop
    grid = torch.linspace(0, 1, 41).tolist()
    for t0 in grid:
        for t1 in grid:
            a, c = outputs.simulate([t0, t1], costs)
            if a >= final - max_drop - 1e-9:
                assert c >= cost - 0.03, (t0, t1, a, c, accuracy, cost)


def test_default_calibration_puts_each_threshold_at_the_final_exits_accuracy():
    outputs, costs = _outputs()
    final = outputs.correct[-1].double().mean().item()
    assert thresholds_for_final_accuracy(outputs) == [final, final]
    with pytest.raises(ValueError, match="only its final exit"):
        thresholds_for_final_accuracy(ExitOutputs(outputs.correct[-1:], outputs.confidence[:0]))


def test_drop_calibration_errors():
    outputs, costs = _outputs()
    with pytest.raises(ValueError, match=r"expected max_drop in \[0, 100\] accuracy points, got -1"):
        thresholds_for_drop(outputs, costs, -1)
    with pytest.raises(ValueError, match="only its final exit"):
        thresholds_for_drop(ExitOutputs(outputs.correct[-1:], outputs.confidence[:0]), costs[-1:])


def test_calibrate_and_budget_table_on_a_model():
    model = _model("max_prob")
    from torch.utils.data import TensorDataset

    generator = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(200, 1, 28, 28, generator=generator), torch.randint(0, 10, (200,), generator=generator))
    thresholds = calibrate(model, data, max_drop=1.0)
    assert model.threshold == thresholds and len(thresholds) == 2
    final = (collect_exits(model, data).logits[-1].argmax(-1) == data.tensors[1]).double().mean().item()
    assert calibrate(model, data) == [final, final]  # the default rule
    assert not torch.equal(model.exit_temperature, torch.ones(2))  # fitted
    calibrate(model, data, budget=0.3)
    assert model.predict(data.tensors[0]).cost.mean().item() <= 0.3 + 1e-6
    raw = collect_exits(model, data)
    rows = budget_table(raw, raw, model.costs, [0.3, 1.0])
    assert [(r["policy"], r["budget"]) for r in rows] == [(p, b) for p in EXIT_POLICIES for b in (0.3, 1.0)]
    for r in rows:
        assert r["relative_cost"] <= r["budget"] + 1e-6 and sum(r["exit_counts"]) == 200
        assert r["thresholds"] == thresholds_for_budget(raw.scored(r["policy"], fit_temperatures(
            raw.logits[:-1], raw.target)), model.costs, r["budget"])


def test_the_exit_rule_travels_with_the_checkpoint(tmp_path):
    model = _model("entropy")
    model.set_exit_temperature([1.5, 0.8])
    model.threshold = [0.7, 0.4]
    save_checkpoint(tmp_path / "m.pt", {"model_name": "eenet8", "model_kwargs": {"filters": 2},
                                        "model_state": model.state_dict(), "threshold": model.threshold,
                                        "policy": model.policy, "exit_temperature": model.exit_temperature.tolist()})
    loaded = model_from_checkpoint(load_checkpoint(tmp_path / "m.pt"))
    assert loaded.policy == "entropy" and loaded.threshold == [0.7, 0.4]
    assert loaded.exit_temperature.tolist() == pytest.approx([1.5, 0.8])
    x = torch.randn(16, 1, 28, 28)
    assert torch.equal(loaded.predict(x).exit, model.predict(x).exit)
    # a checkpoint of eefast <= 0.1 carries no rule: the learned confidence
    save_checkpoint(tmp_path / "old.pt", {"model_name": "eenet8", "model_kwargs": {"filters": 2},
                                          "model_state": model.state_dict(), "threshold": [0.5, 0.5]})
    assert model_from_checkpoint(load_checkpoint(tmp_path / "old.pt")).policy == "confidence"


def test_predict_in_training_mode_runs_as_in_eval_mode():
    """predict() on a model left in training mode used batch statistics, updated the running
    statistics, and the three modes disagreed."""
    model = _model("confidence")
    x = torch.randn(32, 1, 28, 28)
    model.threshold = model.thresholds_for_fractions(x, [0.25, 0.25])
    expected = model.predict(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    for mode in INFERENCE_MODES:
        pred = model.predict(x, mode=mode)
        assert torch.equal(pred.exit, expected.exit), mode
        torch.testing.assert_close(pred.logits, expected.logits, rtol=0, atol=1e-5)
    assert model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # running statistics untouched
