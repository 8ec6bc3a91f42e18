"""The fused Triton loss (eefast.kernels.ee_loss) against eefast.reference.

Without a GPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) on CPU tensors.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import eefast
from eefast import ops, reference

pytestmark = pytest.mark.skipif(not ops.HAS_TRITON, reason=f"Triton unavailable: {ops.TRITON_ERROR}")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VERSIONS = ["v1", "v2", "mc", "cost"]

# label: (E, B, K)
SHAPES = {
    "minimal": (1, 1, 1),
    "two-exits": (2, 5, 10),
    "non-pow2": (3, 13, 37),
    "b1": (4, 1, 10),
    "k1000": (3, 6, 1000),
    "k-chunks": (2, 3, 2500),  # more classes than one BLOCK_K
    "eleven-exits": (11, 7, 10),
}
# (rtol, atol) of the kernel against the reference computed in the same dtype
TOLERANCES = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-6)}


def make(shape, dtype, seed=0, scale=3.0):
    num_exits, batch, classes = shape
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(num_exits, batch, classes, generator=g, dtype=torch.float64)).to(DEVICE, dtype)
    conf = (scale * torch.randn(num_exits - 1, batch, generator=g, dtype=torch.float64)).to(DEVICE, dtype)
    target = torch.randint(0, classes, (batch,), generator=g).to(DEVICE)
    costs = (torch.sort(torch.rand(num_exits, generator=g)).values + 0.05).to(DEVICE)
    return logits.requires_grad_(), conf.requires_grad_(), target, costs


def loss_and_grads(impl, logits, conf, target, costs, lam, version):
    loss = ops.eenet_loss(logits, conf, target, costs, lam, version, impl=impl)
    if not loss.requires_grad:
        return loss, []
    inputs = [logits, conf] if conf.numel() else [logits]
    return loss, list(torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True))


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_reference(shape, dtype, version):
    rtol, atol = TOLERANCES[dtype]
    inputs = make(shape, dtype)
    loss, grads = loss_and_grads("triton", *inputs, 0.7, version)
    ref_loss, ref_grads = loss_and_grads("reference", *inputs, 0.7, version)
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
    if not ref_grads:  # one exit, cost only: a constant, whose gradient the kernel gives as zeros
        assert all((g == 0).all() for g in grads)
        return
    assert len(grads) == len(ref_grads)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [SHAPES["non-pow2"], SHAPES["k1000"]], ids=["non-pow2", "k1000"])
def test_half_precision_error_at_most_twice_the_reference(shape, dtype):
    """Against a float64 reference on the same (rounded) inputs, the kernel's error is at most
    twice that of the reference run in the same dtype."""
    inputs = make(shape, dtype)
    exact_inputs = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs[:2]] + list(inputs[2:])
    exact_loss, exact_grads = loss_and_grads("reference", *exact_inputs, 1.0, "v2")
    for impl_loss, impl_grads, name in [
        (*loss_and_grads("triton", *inputs, 1.0, "v2"), "triton"),
    ]:
        ref_loss, ref_grads = loss_and_grads("reference", *inputs, 1.0, "v2")
        kernel_error = (impl_loss.double() - exact_loss).abs().item()
        reference_error = (ref_loss.double() - exact_loss).abs().item()
        # the loss comes out in float32 from both: allow a few float32 roundings of its value
        float32_slack = 8 * torch.finfo(torch.float32).eps * abs(exact_loss.item())
        assert kernel_error <= 2 * reference_error + float32_slack, (name, kernel_error, reference_error)
        for got, ref, exact in zip(impl_grads, ref_grads, exact_grads):
            assert got.dtype == dtype
            kernel_error = (got.double() - exact).abs().max().item()
            reference_error = (ref.double() - exact).abs().max().item()
            assert kernel_error <= 2 * reference_error + 1e-6, (name, kernel_error, reference_error)


def test_gradcheck_float64():
    from eefast.kernels.ee_loss import ee_loss_parts

    logits, conf, target, costs = make((3, 4, 5), torch.float64)

    def parts(logits, conf):
        ce, cost, _ = ee_loss_parts(logits, conf, target, costs.double())
        return ce, cost

    assert torch.autograd.gradcheck(parts, (logits, conf), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", ["custom-op", "eager"])
def test_per_sample_loss_gradcheck_float64(path, version):
    """The per-sample loss ee_loss (what eenet_loss runs) through the custom op and through the
    eager autograd.Function: gradcheck in float64, with a lam that float32 cannot hold."""
    from eefast.kernels.ee_loss import EELossEager, ee_loss

    logits, conf, target, costs = make((3, 4, 5), torch.float64)
    op = ee_loss if path == "custom-op" else EELossEager.apply
    lam = 0.1 + 1e-12

    def per_sample(logits, conf):
        return op(logits, conf, target, costs.double(), lam, version)[0]

    assert torch.autograd.gradcheck(per_sample, (logits, conf), eps=1e-6, atol=1e-7)
    ce, cost = ops.eenet_loss_parts(logits, conf, target, costs.double(), impl="reference")
    want = reference.combine_loss_parts(ce, cost, lam, version)
    torch.testing.assert_close(per_sample(logits, conf).mean(), want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("version", VERSIONS)
def test_finite_where_probabilities_and_confidences_are_0_or_1(version):
    logits, conf, target, costs = make((3, 6, 5), torch.float32)
    with torch.no_grad():
        conf.copy_(torch.tensor([[800.0, -800.0, 800.0, -800.0, 90.0, -90.0]] * 2))
        logits.mul_(1e4)
    loss, grads = loss_and_grads("triton", logits, conf, target, costs, 1.0, version)
    ref_loss, _ = loss_and_grads("reference", logits, conf, target, costs, 1.0, version)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-3)


def test_empty_batch():
    from eefast.kernels.ee_loss import ee_loss_parts

    ce, cost, lse = ee_loss_parts(torch.randn(3, 0, 4, device=DEVICE), torch.randn(2, 0, device=DEVICE),
                                  torch.zeros(0, dtype=torch.int64, device=DEVICE), torch.ones(3, device=DEVICE))
    assert ce.shape == cost.shape == lse.shape == (3, 0)


@pytest.mark.parametrize("op_name", ["ee_loss", "ee_loss_backward", "ee_loss_parts", "ee_loss_parts_backward"])
def test_opcheck(op_name):
    logits, conf, target, costs = make((3, 5, 7), torch.float32)
    if op_name == "ee_loss":
        args = (logits, conf, target, costs, 0.5, "v1")
    elif op_name == "ee_loss_backward":
        lse = logits.detach().logsumexp(-1)
        args = (torch.randn(5, device=DEVICE), logits.detach(), conf.detach(), target, costs, lse, 0.5, "v2")
    elif op_name == "ee_loss_parts":
        args = (logits, conf, target, costs)
    else:
        lse = logits.detach().logsumexp(-1)
        args = (torch.randn(3, 5, device=DEVICE), torch.randn(3, 5, device=DEVICE), logits.detach(), conf.detach(),
                target, costs, lse)
    torch.library.opcheck(getattr(torch.ops.eefast, op_name), args)


def warmed_eenet8(seed=0):
    torch.manual_seed(seed)
    return eefast.create_model("eenet8", filters=4).to(DEVICE)


def test_compiles_with_fullgraph():
    model = warmed_eenet8().train()
    criterion = eefast.EENetLoss(impl="triton")
    x, y = torch.randn(4, 1, 28, 28, device=DEVICE), torch.randint(0, 10, (4,), device=DEVICE)

    def loss_of(x, y):
        return criterion(model(x), y, model.costs)

    compiled = torch.compile(loss_of, fullgraph=True)
    want = loss_of(x, y)
    got = compiled(x, y)
    torch.testing.assert_close(got, want)
    got.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_impl_choice():
    logits, conf, target, costs = make((2, 3, 4), torch.float32)
    assert ops.choose_impl(None, logits) == ("triton" if logits.is_cuda else ops.DEFAULT_IMPL.replace("auto", "reference"))
    assert ops.choose_impl("reference", logits) == "reference"
    with pytest.raises(ValueError, match=r"expected impl in \('auto', 'triton', 'reference'\), got 'cuda'"):
        ops.eenet_loss(logits, conf, target, costs, impl="cuda")
    # an unknown EEFAST_IMPL: the import works, choosing an implementation names the choices
    script = ("import eefast, torch\ntry:\n    eefast.ops.choose_impl(None, torch.zeros(1))\n"
              "except ValueError as error:\n    print(error)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "EEFAST_IMPL": "fast"}, timeout=300)
    assert result.returncode == 0 and "EEFAST_IMPL: expected one of" in result.stdout, result.stderr


def test_eager_autograd_skips_the_custom_op(monkeypatch):
    """Eager training runs the loss through EELossEager (no custom-op dispatch); the custom op is
    what torch.compile traces (test_compiles_with_fullgraph)."""
    from eefast.kernels import ee_loss as kernel_module

    calls = []
    for name in ["ee_loss", "ee_loss_forward_launch"]:
        original = getattr(kernel_module, name)
        monkeypatch.setattr(kernel_module, name, lambda *args, _f=original, _n=name: calls.append(_n) or _f(*args))
    logits, conf, target, costs = make((3, 4, 5), torch.float32)
    ops.eenet_loss(logits, conf, target, costs, impl="triton").backward()
    assert calls == ["ee_loss_forward_launch"] and logits.grad is not None and conf.grad is not None


def test_double_backward_raises():
    """The fused loss's backward is not differentiable: asking for a second derivative says so
    (with create_graph the eager path runs the custom backward op, which autograd knows has no
    formula), rather than leaving the second-order terms out."""
    logits, conf, target, costs = make((3, 4, 5), torch.float32)
    loss = ops.eenet_loss(logits, conf, target, costs, impl="triton")
    grad_logits, _ = torch.autograd.grad(loss, [logits, conf], create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula was registered"):
        (grad_logits * logits).sum().backward()


@pytest.mark.parametrize("lam", [0.0, 1e-30, 1e30, float("inf")])
def test_extreme_lam(lam):
    """lam reaches the kernels as two float32s: zero, tiny, huge and infinite weights give the
    reference's loss; beyond float32's range (finite) is refused, naming the limit."""
    logits, conf, target, costs = make((3, 4, 5), torch.float64)
    with pytest.raises(ValueError, match=r"expected lam within float32's range .* got 1e\+39"):
        ops.eenet_loss(logits, conf, target, costs.double(), 1e39, "v2", impl="triton")
    got = ops.eenet_loss(logits, conf, target, costs.double(), lam, "v2", impl="triton")
    want = ops.eenet_loss(logits, conf, target, costs.double(), lam, "v2", impl="reference")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
