"""Bad input at the public entry points raises a clear error naming what was expected and what
was given; numerical edge cases behave as documented."""

from __future__ import annotations

import pytest
import torch

import eefast
from eefast import cli


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return eefast.create_model("eenet20").eval()


def loss_args(exits=3, batch=4, classes=10):
    return (torch.randn(exits, batch, classes), torch.randn(exits - 1, batch), torch.randint(0, classes, (batch,)),
            torch.tensor([0.1, 0.4, 1.0])[:exits])


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda a: (a[0][:, :, :, None], *a[1:]), ValueError, r"logits of shape \[E, B, K\]"),
        (lambda a: (a[0], a[1][:1], *a[2:]), ValueError, r"conf_logits of shape \[2, 4\].*got \[1, 4\]"),
        (lambda a: (*a[:2], a[2][:3], a[3]), ValueError, r"target of shape \[4\], got \[3\]"),
        (lambda a: (*a[:3], a[3][:2]), ValueError, r"costs of shape \[3\] \(one per exit\), got \[2\]"),
        (lambda a: (*a[:2], a[2] + 10, a[3]), ValueError, r"target values in \[0, 10\), got min 1\d, max 1\d"),
        (lambda a: (*a[:2], a[2].int(), a[3]), TypeError, "int64 class indices as target, got torch.int32"),
        (lambda a: (a[0].long(), *a[1:]), TypeError, "floating-point logits and conf_logits"),
        (lambda a: (*a[:3], torch.tensor([0.4, 0.1, 1.0])), ValueError, "costs increasing from exit to exit"),
        (lambda a: (*a[:3], a[3].to("meta")), ValueError, "every tensor on cpu.*costs on meta"),
    ],
    ids=["logits-rank", "conf-shape", "target-shape", "costs-shape", "target-range", "target-dtype", "logits-dtype",
         "costs-order", "device-mix"],
)
def test_loss_rejects_bad_input(change, error, message):
    with pytest.raises(error, match=message):
        eefast.eenet_loss(*change(loss_args()))


def test_loss_options():
    for lam in (-1.0, float("nan"), "a", None):
        with pytest.raises(ValueError, match=f"eenet_loss: expected a number lam >= 0 \\(inf allowed\\), got {lam!r}"):
            eefast.eenet_loss(*loss_args(), lam=lam)
    with pytest.raises(ValueError, match=r"expected version in \('v1', 'v2', 'mc', 'cost'\), got 'v3'"):
        eefast.eenet_loss(*loss_args(), version="v3")
    with pytest.raises(ValueError, match="expected a finite lam >= 0, got nan"):
        eefast.EENetLoss(lam=float("nan"))


def test_model_rejects_bad_input(model):
    with pytest.raises(ValueError, match=r"expected input on meta|expected the input on cpu .*got it on meta"):
        model(torch.randn(2, 3, 32, 32, device="meta"))
    with pytest.raises(ValueError, match=r"expected distribution in \['fine', 'golden_ratio', 'linear'"):
        eefast.create_model("eenet20", distribution="even")
    with pytest.raises(ValueError, match=r"expected kind in \('plain', 'pool', 'bnpool'\), got 'max'"):
        eefast.create_model("eenet20", exit_type="max")
    with pytest.raises(ValueError, match=r"thresholds in \[0, 1\], got \[-0.1, -0.1\]"):
        model.threshold = -0.1
    with pytest.raises(ValueError, match=r"thresholds in \[0, 1\], got \[nan, nan\]"):
        model.threshold = float("nan")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast(model, dtype):
    x = torch.randn(6, 3, 32, 32)
    model.threshold = 0.5
    with torch.autocast("cpu", dtype=dtype):
        preds = {mode: model.predict(x, mode=mode) for mode in ("compact", "mask", "sample")}
        assert torch.equal(preds["compact"].exit, preds["mask"].exit)
        assert torch.equal(preds["compact"].exit, preds["sample"].exit)
        model.train()
        try:
            out = model(x)
            loss = eefast.EENetLoss()(out, torch.randint(0, 10, (6,)), model.costs)
        finally:
            model.eval()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()


def test_all_zero_features_and_k1():
    model = eefast.create_model("eenet8", num_classes=1).eval()
    pred = model(torch.zeros(3, 1, 28, 28))
    assert pred.logits.shape == (3, 1) and torch.isfinite(pred.logits).all()
    model.train()
    out = model(torch.zeros(3, 1, 28, 28))
    loss = eefast.EENetLoss()(out, torch.zeros(3, dtype=torch.int64), model.costs)
    assert torch.isfinite(loss)


def test_mask_mode_compiles_fullgraph(model):
    x = torch.randn(5, 3, 32, 32)
    model.threshold = [0.4, 0.6]
    compiled = torch.compile(lambda x: model.predict(x, mode="mask"), fullgraph=True)
    got, want = compiled(x), model.predict(x, mode="mask")
    assert torch.equal(got.exit, want.exit)
    torch.testing.assert_close(got.logits, want.logits)


def test_cli_errors_are_one_line(capsys, tmp_path):
    assert cli.main(["train", "--model", "eenet7", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eefast train: error: create_model: unknown model 'eenet7'; expected one of [")
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["train", "--dataset", "cifar10", "--data-root", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "not found under" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--loss", "v3"])  # argparse names the choices


def test_inf_inputs_behave_like_nan_or_saturate_consistently(model):
    x = torch.randn(6, 3, 32, 32)
    x[1] = float("inf")
    x[2, 0, 0, 0] = float("-inf")
    model.threshold = 0.5
    preds = {mode: model.predict(x, mode=mode) for mode in ("compact", "mask", "sample")}
    for mode in ("mask", "sample"):
        assert torch.equal(preds["compact"].exit, preds[mode].exit)
    clean = model.predict(x[[0, 3, 4, 5]], mode="compact")
    assert torch.equal(preds["compact"].exit[[0, 3, 4, 5]], clean.exit)  # other samples unaffected
