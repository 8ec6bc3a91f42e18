"""Batched early-exit inference: compact, mask and sample modes agree (Algorithm 1)."""

from __future__ import annotations

import pytest
import torch

import eefast
from eefast import EENetOutput, Prediction

MODES = ["compact", "mask", "sample"]


def warmed_model(name: str, **kwargs):
    """A model in eval mode whose batch norms hold non-trivial running statistics."""
    torch.manual_seed(0)
    model = eefast.create_model(name, **kwargs)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, *model.input_shape))
    return model.eval()


# label: (model name, create_model kwargs, fractions leaving at the early exits)
MIXES = {
    "eenet8-50/25/25": ("eenet8", {"filters": 4}, [0.5, 0.25]),
    "eenet20-50/25/15/10": ("eenet20", {"num_exits": 3}, [0.5, 0.25, 0.15]),
    "eenet18-bnpool-10/20/30/40": ("eenet18", {"exit_type": "bnpool"}, [0.1, 0.2, 0.3]),
    "eenet8-plain-all-first": ("eenet8", {"exit_type": "plain"}, [1.0, 0.0]),
    "eenet20-none-early": ("eenet20", {}, [0.0, 0.0]),
}


def run_modes(model, x):
    return {mode: model.predict(x, mode=mode) for mode in MODES}


def assert_modes_agree(preds: dict[str, Prediction]):
    """Same exits and costs; the same logits, bit for bit between compact and mask (batched
    convolutions on the CPU), to float rounding for one-sample convolutions."""
    compact = preds["compact"]
    for mode in ("mask", "sample"):
        other = preds[mode]
        assert torch.equal(compact.exit, other.exit), f"exits differ between compact and {mode}"
        assert torch.equal(compact.cost, other.cost)
    torch.testing.assert_close(compact.logits, preds["mask"].logits, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(compact.logits, preds["sample"].logits, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("name, kwargs, fractions", MIXES.values(), ids=MIXES.keys())
def test_modes_agree_on_a_known_exit_mix(name, kwargs, fractions):
    model = warmed_model(name, **kwargs)
    batch = 40
    x = torch.randn(batch, *model.input_shape)
    model.threshold = model.thresholds_for_fractions(x, fractions)
    preds = run_modes(model, x)
    assert_modes_agree(preds)
    counts = [round(f * batch) for f in fractions]
    histogram = torch.bincount(preds["compact"].exit, minlength=model.num_exits).tolist()
    assert histogram == [*counts, batch - sum(counts)]
    relative_cost = sum(n * c for n, c in zip(histogram, model.costs.tolist())) / batch
    assert preds["compact"].cost.mean().item() == pytest.approx(relative_cost, rel=1e-6)


def test_compaction_skips_the_stages_nobody_reaches():
    model = warmed_model("eenet20")
    x = torch.randn(12, *model.input_shape)
    model.threshold = model.thresholds_for_fractions(x, [0.5, 0.25])
    seen: list[int] = []
    handles = [stage.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0])) for stage in model.stages]
    model.predict(x, mode="compact")
    assert seen == [12, 6, 3]  # each stage computes only the samples still running
    seen.clear()
    model.threshold = 0.0  # every sample leaves at exit 0
    pred = model.predict(x, mode="compact")
    assert seen == [12] and (pred.exit == 0).all()
    for h in handles:
        h.remove()


@pytest.mark.parametrize("exit_type", ["pool", "plain"])
@pytest.mark.parametrize("mode", MODES)
def test_batch_of_one_and_empty_batch(mode, exit_type):
    model = warmed_model("eenet8", exit_type=exit_type)
    x = torch.randn(5, *model.input_shape)
    full = model.predict(x, mode="mask")
    for i in range(5):
        one = model.predict(x[i : i + 1], mode=mode)
        assert one.exit.item() == full.exit[i].item()
        torch.testing.assert_close(one.logits[0], full.logits[i], rtol=1e-5, atol=1e-5)
    empty = model.predict(x[:0], mode=mode)
    assert empty.logits.shape == (0, 10) and empty.exit.shape == (0,) and empty.cost.shape == (0,)


def test_nan_inputs_never_exit_early():
    model = warmed_model("eenet8")
    x = torch.randn(8, *model.input_shape)
    model.threshold = model.thresholds_for_fractions(x, [0.5, 0.25])
    clean = model.predict(x, mode="mask")
    x[[1, 4]] = float("nan")
    preds = run_modes(model, x)
    assert_modes_agree(preds)
    final = model.num_exits - 1
    for pred in preds.values():
        assert pred.exit[[1, 4]].tolist() == [final, final]
        assert torch.isnan(pred.logits[[1, 4]]).all()
        others = [0, 2, 3, 5, 6, 7]
        assert torch.equal(pred.exit[others], clean.exit[others])


def test_train_and_eval_outputs():
    model = warmed_model("eenet8")
    x = torch.randn(3, *model.input_shape)
    assert isinstance(model(x), Prediction)
    model.train()
    assert isinstance(model(x), EENetOutput)
    model.eval()
    model.inference_mode = "sample"
    assert torch.equal(model(x).exit, model.predict(x, mode="compact").exit)


def test_baseline_has_one_exit():
    model = warmed_model("resnet8")
    x = torch.randn(4, *model.input_shape)
    preds = run_modes(model, x)
    assert_modes_agree(preds)
    assert (preds["compact"].exit == 0).all()
    assert torch.allclose(preds["compact"].cost, torch.ones(4))


def test_channels_last():
    model = warmed_model("eenet20").to(memory_format=torch.channels_last)
    x = torch.randn(16, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    model.threshold = model.thresholds_for_fractions(x, [0.25, 0.25])
    assert_modes_agree(run_modes(model, x))


def test_per_exit_thresholds_and_errors():
    model = warmed_model("eenet20")
    model.threshold = [0.3, 0.8]
    assert model.threshold == [0.3, 0.8]
    with pytest.raises(ValueError, match=r"one threshold or 2 \(one per early exit\), got 3"):
        model.threshold = [0.1, 0.2, 0.3]
    with pytest.raises(ValueError, match=r"thresholds in \[0, 1\], got \[1.5, 1.5\]"):
        model.threshold = 1.5
    with pytest.raises(ValueError, match="expected mode in"):
        model.predict(torch.randn(1, 3, 32, 32), mode="fast")


def test_mask_mode_follows_threshold_changes():
    """Mask mode keeps the thresholds on the device between calls; a new setting replaces them."""
    model = warmed_model("eenet20")
    x = torch.randn(6, 3, 32, 32)
    model.threshold = 1.0
    assert (model.predict(x, mode="mask").exit == 2).all()
    model.threshold = 0.0
    assert (model.predict(x, mode="mask").exit == 0).all()
    model.threshold = [1.0, 0.0]
    assert (model.predict(x, mode="mask").exit == 1).all()


@pytest.mark.parametrize(
    "shape, message",
    [
        ((2, 1, 32, 32), r"expected input of shape \[B, 3, H, W\] \(input_shape=\(3, 32, 32\)\), got \[2, 1, 32, 32\]"),
        ((3, 32, 32), r"expected input of shape \[B, 3, H, W\].*got \[3, 32, 32\]"),
    ],
)
def test_wrong_input_names_the_expected_shape(shape, message):
    model = warmed_model("eenet20")
    for mode in MODES:
        with pytest.raises(ValueError, match=message):
            model.predict(torch.randn(*shape), mode=mode)
    model.train()
    with pytest.raises(ValueError, match=message):
        model(torch.randn(*shape))
    with pytest.raises(TypeError, match="floating-point input, got torch.int64"):
        model(torch.zeros(2, 3, 32, 32, dtype=torch.int64))


def test_plain_exits_fix_the_input_size():
    model = warmed_model("eenet8", exit_type="plain")
    with pytest.raises(ValueError, match=r"\[B, 1, 28, 28\].*got \[2, 1, 32, 32\]"):
        model.predict(torch.randn(2, 1, 32, 32))
