"""The fused Triton exit head (eefast.kernels.exit_head) against eefast.reference.

Without a GPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) on CPU tensors.
"""

from __future__ import annotations

import pytest
import torch

import eefast
from eefast import ops, reference

pytestmark = pytest.mark.skipif(not ops.HAS_TRITON, reason=f"Triton unavailable: {ops.TRITON_ERROR}")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# label: (B, C, H, W, K)
SHAPES = {
    "minimal": (1, 1, 1, 1, 1),
    "non-pow2": (3, 37, 5, 7, 10),
    "b1": (1, 16, 8, 8, 10),
    "k1000": (2, 64, 4, 4, 1000),
    "hw-chunks": (2, 3, 17, 17, 4),  # more pixels than one BLOCK_HW
    "c-chunks": (2, 300, 2, 3, 5),  # more channels than one BLOCK_C
    "k-blocks": (3, 5, 3, 2, 100),  # heads' gradients in the kernels over several BLOCK_K
}
KINDS = ["pool", "bnpool", "plain"]
# (rtol, atol) of the kernel against the reference computed in the same dtype
TOLERANCES = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-4, 1e-5)}


def make(shape, kind, dtype, layout="nchw", training=False, seed=0):
    batch, channels, height, width, classes = shape
    g = torch.Generator().manual_seed(seed)

    def randn(*size, scale=1.0):
        return (scale * torch.randn(*size, generator=g, dtype=torch.float64)).to(DEVICE, dtype)

    x = randn(batch, channels, height, width)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    features = channels * height * width if kind == "plain" else channels
    params = dict(
        x=x,
        cls_weight=randn(classes, features, scale=features**-0.5),
        cls_bias=randn(classes),
        conf_weight=randn(1, features, scale=features**-0.5),
        conf_bias=randn(1),
    )
    for tensor in params.values():
        tensor.requires_grad_()
    bn = None
    if kind == "bnpool":
        weight = (randn(channels, scale=0.2) + 1).requires_grad_()
        bias = randn(channels, scale=0.2).requires_grad_()
        stats_dtype = dtype  # as in a model moved to dtype (CPU batch norm wants one dtype)
        running_mean = torch.randn(channels, generator=g, dtype=torch.float64).to(DEVICE, stats_dtype)
        running_var = torch.rand(channels, generator=g, dtype=torch.float64).to(DEVICE, stats_dtype) + 0.5
        bn = reference.BatchNormArgs(weight, bias, running_mean, running_var, training, 0.1, 1e-5)
    return params, bn


def clone_bn(bn):
    return None if bn is None else bn._replace(running_mean=bn.running_mean.clone(), running_var=bn.running_var.clone())


class _Recorded:
    """A kernel whose launches append (name, grid, constexprs) to a list, then run."""

    def __init__(self, kernel, name, launches):
        self.kernel, self.name, self.launches = kernel, name, launches

    def __getitem__(self, grid):
        def launch(*args, **constexprs):
            self.launches.append((self.name, tuple(grid), constexprs))
            return self.kernel[grid](*args, **constexprs)
        return launch


def record_launches(monkeypatch) -> list[tuple[str, tuple, dict]]:
    """Every exit-head kernel launch from here on, as (name, grid, constexprs); names without the
    leading underscore and the _kernel suffix ("exit_head_forward", "batch_stats_merge", ...)."""
    from eefast.kernels.exit_head import backward, forward, statistics

    launches = []
    for module in (forward, backward, statistics):
        for name, value in list(vars(module).items()):
            if name.startswith("_") and name.endswith("_kernel"):
                monkeypatch.setattr(module, name, _Recorded(value, name[1:-len("_kernel")], launches))
    return launches


def lower_heads_in_kernel_max(monkeypatch):
    """Heads of any size go to torch's linear layers (the op without heads)."""
    from eefast.kernels.exit_head import op

    monkeypatch.setattr(op, "HEADS_IN_KERNEL_MAX", 0)


def run(impl, params, bn, kind):
    """Outputs, and gradients of a fixed function of them, for every input that takes one."""
    logits, conf = ops.exit_head(params["x"], kind, params["cls_weight"], params["cls_bias"],
                                 params["conf_weight"], params["conf_bias"], bn, impl=impl)
    inputs = list(params.values()) + ([bn.weight, bn.bias] if bn is not None else [])
    g = torch.Generator().manual_seed(7)
    upstream_logits = torch.randn(logits.shape, generator=g).to(DEVICE, logits.dtype)
    upstream_conf = torch.randn(conf.shape, generator=g).to(DEVICE, conf.dtype)
    grads = torch.autograd.grad((logits, conf), inputs, (upstream_logits, upstream_conf))
    return [logits, conf], list(grads)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_reference(shape, dtype, kind, training):
    if training and kind != "bnpool":
        pytest.skip("only bnpool differs between training and eval")
    if training and shape[0] * shape[2] * shape[3] == 1:
        pytest.skip("batch statistics need more than one value per channel")
    rtol, atol = TOLERANCES[dtype]
    params, bn = make(shape, kind, dtype, training=training)
    bn_reference = clone_bn(bn)
    outputs, grads = run("triton", params, bn, kind)
    ref_outputs, ref_grads = run("reference", params, bn_reference, kind)
    for got, want in zip(outputs + grads, ref_outputs + ref_grads):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    if bn is not None:  # running statistics updated as nn.BatchNorm2d does
        torch.testing.assert_close(bn.running_mean, bn_reference.running_mean)
        torch.testing.assert_close(bn.running_var, bn_reference.running_var)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_channels_last(kind, training):
    params, bn = make(SHAPES["non-pow2"], kind, torch.float32, layout="channels_last", training=training)
    outputs, grads = run("triton", params, bn, kind)
    ref_outputs, ref_grads = run("reference", params, clone_bn(bn), kind)
    for got, want in zip(outputs + grads, ref_outputs + ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if kind != "plain":  # the input's gradient keeps the input's layout
        assert grads[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kind", [*KINDS, "bnpool-train"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads", ["in-kernel", "by-linear-layers"])
def test_half_precision_error_at_most_twice_the_reference(dtype, kind, heads, monkeypatch):
    """Against a float64 reference on the same (rounded) inputs, the kernel's error is at most
    twice that of the reference run in the same dtype; with the heads in the kernels and, for heads
    too large for them (HEADS_IN_KERNEL_MAX lowered to 0 here), by torch's linear layers."""
    if heads == "by-linear-layers":
        lower_heads_in_kernel_max(monkeypatch)
    kind, training = kind.removesuffix("-train"), kind.endswith("-train")
    params, bn = make(SHAPES["non-pow2"], kind, dtype, training=training)
    exact_params = {k: v.detach().double().requires_grad_() for k, v in params.items()}
    exact_bn = None if bn is None else bn._replace(
        weight=bn.weight.detach().double().requires_grad_(), bias=bn.bias.detach().double().requires_grad_(),
        running_mean=bn.running_mean.double(), running_var=bn.running_var.double(),
    )
    exact = run("reference", exact_params, exact_bn, kind)
    kernel = run("triton", params, clone_bn(bn), kind)
    same_dtype = run("reference", params, clone_bn(bn), kind)
    for got, ref, want in zip(kernel[0] + kernel[1], same_dtype[0] + same_dtype[1], exact[0] + exact[1]):
        assert got.dtype == ref.dtype
        kernel_error = (got.double() - want).abs().max().item()
        reference_error = (ref.double() - want).abs().max().item()
        assert kernel_error <= 2 * reference_error + 1e-6, (kernel_error, reference_error)


def head_op_args(mode, dtype=torch.float64, seed=0):
    """Arguments of eefast::exit_head_fused on a small input: no batch norm ('pool'), batch norm
    with running statistics ('bn-running') or with the batch's ('bn-batch')."""
    g = torch.Generator().manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=g, dtype=dtype).to(DEVICE).requires_grad_()

    x, cls_weight, cls_bias, conf_weight, conf_bias = randn(3, 4, 3, 2), randn(5, 4), randn(5), randn(1, 4), randn(1)
    bn = (None, None, None, None, 0.0)
    if mode != "pool":
        running = (torch.randn(4, generator=g, dtype=dtype).to(DEVICE), torch.rand(4, generator=g, dtype=dtype).to(DEVICE) + 0.5)
        bn = (randn(4), randn(4), *((None, None) if mode == "bn-batch" else running), 1e-5)
    return (x, cls_weight, cls_bias, conf_weight, conf_bias, *bn, mode == "bn-batch", mode != "pool")


HEAD_MODES = ["pool", "bn-running", "bn-batch"]


@pytest.mark.parametrize("heads", ["heads", "pooled"])
@pytest.mark.parametrize("path", ["custom-op", "eager"])
@pytest.mark.parametrize("mode", HEAD_MODES)
def test_gradcheck_float64(mode, path, heads):
    """Every gradient of the fused head (the batch norm's through the batch statistics included),
    through the custom op and through the eager autograd.Function; with the heads, and without
    them (heads too large for the kernels: dL/dx and the batch norm's gradients from dL/d pooled)."""
    from eefast.kernels.exit_head import ExitHeadFunction, exit_head_fused

    op = exit_head_fused if path == "custom-op" else lambda *args: ExitHeadFunction.apply(*args, None)
    args = head_op_args(mode) if heads == "heads" else pool_op_args(head_op_args(mode))
    assert gradcheck_of(op, args, outputs=2 if heads == "heads" else 1)


def pool_op_args(head_args):
    """exit_head_fused's arguments without the four head tensors."""
    return (head_args[0], None, None, None, None, *head_args[5:])


def gradcheck_of(op, args, outputs):
    """torch.autograd.gradcheck of op's first ``outputs`` outputs in every input that requires grad."""
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]

    def head(*inputs):
        full = list(args)
        for i, tensor in zip(tensors, inputs):
            full[i] = tensor
        return op(*full)[:outputs]

    return torch.autograd.gradcheck(head, [args[i] for i in tensors], eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("heads", ["heads", "pooled"])
@pytest.mark.parametrize("mode", HEAD_MODES)
def test_opcheck(mode, heads):
    from eefast.kernels.exit_head import exit_head_fused

    args = head_op_args(mode, torch.float32)
    if heads == "pooled":
        args = pool_op_args(args)
    torch.library.opcheck(torch.ops.eefast.exit_head_fused, args)
    out, conf, per_sample, stats = exit_head_fused(*args)
    x, cls_weight, _, conf_weight, _, bn_weight, bn_bias, running_mean, running_var, eps, batch_stats, relu = args
    mean, var = (stats[0], stats[1]) if batch_stats else (running_mean, running_var)
    detached = [None if t is None else t.detach() for t in (x, cls_weight, conf_weight, bn_weight, bn_bias, mean, var)]
    torch.library.opcheck(torch.ops.eefast.exit_head_fused_backward,
                          (torch.randn_like(out), torch.randn_like(conf), *detached, per_sample.detach(), eps,
                           batch_stats, relu))


def test_head_op_refuses_heads_too_large_for_the_kernels():
    """exit_head_fused applies heads of at most HEADS_IN_KERNEL_MAX weights (each per-sample program
    reads them whole); larger ones are the op's pooled features and torch's linear layers."""
    from eefast.kernels import exit_head as kernel

    x, _, _, _, _, *rest = head_op_args("pool", torch.float32)
    classes = kernel.HEADS_IN_KERNEL_MAX // x.shape[1]  # (K+1) * C one row past the limit
    heads = (torch.randn(classes, x.shape[1]), torch.randn(classes), torch.randn(1, x.shape[1]), torch.randn(1))
    with pytest.raises(ValueError, match=rf"at most HEADS_IN_KERNEL_MAX = 16384 weights .*got {(classes + 1) * 4} "
                                         rf"\(K={classes}, C=4\)"):
        kernel.exit_head_fused(x, *(t.to(DEVICE) for t in heads), *rest)


def fused_eenet8(seed=0, exit_type="pool"):
    torch.manual_seed(seed)
    model = eefast.create_model("eenet8", filters=4, exit_type=exit_type).to(DEVICE)
    for exit_block in model.exits:
        exit_block.impl = "triton"
    return model


@pytest.mark.parametrize("exit_type", ["pool", "bnpool"])
def test_training_eenet8_gives_the_reference_losses(exit_type):
    """A few Adam steps with the fused head and loss and with the reference, from the same start."""
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 1, 28, 28, generator=g).to(DEVICE), torch.randint(0, 10, (8,), generator=g).to(DEVICE))
               for _ in range(4)]
    losses = {}
    for impl in ("triton", "reference"):
        model = fused_eenet8(exit_type=exit_type).train()
        for exit_block in model.exits:
            exit_block.impl = impl
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        criterion = eefast.EENetLoss(impl=impl)
        losses[impl] = []
        for x, y in batches:
            optimizer.zero_grad()
            loss = criterion(model(x), y, model.costs)
            loss.backward()
            optimizer.step()
            losses[impl].append(loss.item())
    assert losses["triton"] == pytest.approx(losses["reference"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("heads", ["in-kernel", "by-linear-layers"])
def test_model_with_fused_ops_compiles_fullgraph(heads, monkeypatch):
    """The model's fused ops trace with fullgraph (the custom ops, and for heads too large for the
    kernels the op without heads, and torch's linear layers: HEADS_IN_KERNEL_MAX lowered to 0 here)."""
    if heads == "by-linear-layers":
        lower_heads_in_kernel_max(monkeypatch)
    model = fused_eenet8(exit_type="bnpool").train()
    criterion = eefast.EENetLoss(impl="triton")
    x, y = torch.randn(4, 1, 28, 28, device=DEVICE), torch.randint(0, 10, (4,), device=DEVICE)

    def loss_of(x, y):
        return criterion(model.forward_all(x), y, model.costs)

    model.eval()  # compare in eval mode (no running-statistics updates between the two calls)
    want = loss_of(x, y)
    compiled = torch.compile(loss_of, fullgraph=True)
    torch.testing.assert_close(compiled(x, y), want)
    model.train()
    loss = compiled(x, y)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


# ---- inference: one launch on the parameters as stored ---------------------------------------------


def inference_outputs(impl, params, bn, kind):
    with torch.no_grad():
        return ops.exit_head(params["x"], kind, params["cls_weight"], params["cls_bias"],
                             params["conf_weight"], params["conf_bias"], bn, impl=impl)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_inference_matches_reference(shape, dtype, kind, layout):
    """Without autograd the kernel reads the two heads apart and folds eval-mode batch norm itself."""
    rtol, atol = TOLERANCES[dtype]
    params, bn = make(shape, kind, dtype, layout=layout)
    for got, want in zip(inference_outputs("triton", params, bn, kind), inference_outputs("reference", params, bn, kind)):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_inference_half_precision_error_at_most_twice_the_reference(dtype, kind):
    params, bn = make(SHAPES["non-pow2"], kind, dtype)
    exact_params = {k: v.detach().double() for k, v in params.items()}
    exact_bn = None if bn is None else bn._replace(**{f: getattr(bn, f).detach().double() for f in bn._fields[:4]})
    exact = inference_outputs("reference", exact_params, exact_bn, kind)
    kernel = inference_outputs("triton", params, bn, kind)
    same_dtype = inference_outputs("reference", params, bn, kind)
    for got, ref, want in zip(kernel, same_dtype, exact):
        assert got.dtype == ref.dtype
        assert (got.double() - want).abs().max() <= 2 * (ref.double() - want).abs().max() + 1e-6


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
def test_batch_norm_given_to_a_pool_exit_is_ignored_as_by_the_reference(grad):
    params, _ = make(SHAPES["non-pow2"], "pool", torch.float32)
    _, bn = make(SHAPES["non-pow2"], "bnpool", torch.float32)
    with torch.set_grad_enabled(grad):
        got = ops.exit_head(params["x"], "pool", params["cls_weight"], params["cls_bias"], params["conf_weight"],
                            params["conf_bias"], bn, impl="triton")
        want = ops.exit_head(params["x"], "pool", params["cls_weight"], params["cls_bias"], params["conf_weight"],
                             params["conf_bias"], None, impl="reference")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def exit_block(kind, dtype=torch.float32, seed=0):
    """An ExitBlock on the fused kernel with random batch-norm statistics, in eval mode."""
    torch.manual_seed(seed)
    block = eefast.ExitBlock(5, 3, kind, spatial=(2, 3) if kind == "plain" else None, impl="triton")
    if block.bn is not None:
        block.bn.running_mean.normal_()
        block.bn.running_var.uniform_(0.5, 1.5)
        block.bn.weight.data.normal_(1.0, 0.2)
    return block.to(DEVICE, dtype).eval()


def reference_outputs(block, x):
    impl, block.impl = block.impl, "reference"
    try:
        with torch.no_grad():
            return block(x)
    finally:
        block.impl = impl


@pytest.mark.parametrize("kind", KINDS)
def test_inference_follows_parameter_changes(kind):
    """Nothing is folded ahead: in-place updates, an optimizer step, running statistics updated by a
    training forward and a dtype move all show in the next inference call."""
    block = exit_block(kind)
    x = torch.randn(3, 5, 2, 3, device=DEVICE)

    def check():
        with torch.no_grad():
            got = block(x)
        for g, want in zip(got, reference_outputs(block, x)):
            torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-6)

    check()
    with torch.no_grad():
        block.classifier.weight.mul_(2)
    check()
    block.confidence.bias.grad = torch.ones_like(block.confidence.bias)
    torch.optim.SGD(block.parameters(), lr=0.5).step()
    check()
    if block.bn is not None:
        block.train()(x)
        block.eval()
        check()
    block.double()
    x = x.double()
    check()


@pytest.mark.parametrize("kind, training", [("pool", False), ("bnpool", True), ("plain", False)],
                         ids=["pool", "bnpool-train", "plain"])
@pytest.mark.parametrize("shape", [SHAPES["non-pow2"], SHAPES["k1000"]], ids=["small-heads", "k1000"])
def test_large_heads_go_to_torch_linear_layers(shape, kind, training, monkeypatch):
    """Heads over HEADS_IN_KERNEL_MAX weights (K=1000 at C=64: 64064) are not read by every
    per-sample program (B times the matrix): the kernels stop at the pooled features
    and torch's linear layers apply the heads (autograd differentiates them). A
    plain exit has nothing left to fuse then and launches nothing. The outputs and gradients
    match the reference either way."""
    from eefast.kernels import exit_head as kernel

    launches = record_launches(monkeypatch)
    params, bn = make(shape, kind, torch.float64, training=training)
    outputs, grads = run("triton", params, bn, kind)
    ref_outputs, ref_grads = run("reference", params, clone_bn(bn), kind)
    batch, channels, height, width, classes = shape
    features = channels * height * width if kind == "plain" else channels
    in_kernel = (classes + 1) * features <= kernel.HEADS_IN_KERNEL_MAX
    expected = [] if kind == "plain" and not in_kernel else [("exit_head_forward", in_kernel),
                                                             ("exit_head_backward", in_kernel)]
    assert [(name, constexprs["HEADS"]) for name, _, constexprs in launches
            if name in ("exit_head_forward", "exit_head_backward")] == expected
    for got, want in zip(outputs + grads, ref_outputs + ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("classes", [10, 1000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_training_step_matches_the_reference(dtype, classes):
    """Mixed precision as a training loop runs it (torch.autocast): a bnpool exit's fused head on
    half-precision features with float32 parameters, heads in the kernels (K=10) and by torch's
    linear layers (K=1000), gives the reference's outputs and float32 gradients."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 5, 5, generator=g).to(DEVICE)
    results = {}
    for impl in ("triton", "reference"):
        torch.manual_seed(0)
        block = eefast.ExitBlock(8, classes, "bnpool", impl=impl).to(DEVICE).train()
        with torch.autocast(DEVICE, dtype=dtype):
            features = x.to(dtype).requires_grad_()  # as a convolution under autocast returns them
            logits, conf = block(features)
            loss = logits.float().logsumexp(1).mean() + conf.float().sigmoid().mean()
        loss.backward()
        results[impl] = (logits, conf, features.grad, *(p.grad for p in block.parameters()))
    for got, want in zip(*results.values()):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


# (B, C, H, W, K, channel splits): 3 blocks of 128 channels; 2 of 16, with the batch statistics
# split in 2 and merged by the forward kernel
CHANNEL_SPLIT_SHAPES = {"c-chunks": (*SHAPES["c-chunks"], 3), "merged-in-forward": (9, 32, 16, 16, 5, 2)}


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("heads", ["in-kernel", "by-linear-layers"])
@pytest.mark.parametrize("kind, training, shape", [
    ("pool", False, CHANNEL_SPLIT_SHAPES["c-chunks"]), ("bnpool", False, CHANNEL_SPLIT_SHAPES["c-chunks"]),
    ("bnpool", True, CHANNEL_SPLIT_SHAPES["c-chunks"]), ("bnpool", True, CHANNEL_SPLIT_SHAPES["merged-in-forward"]),
], ids=["pool", "bnpool-eval", "bnpool-train", "bnpool-train-merged-in-forward"])
def test_channels_split_over_programs_when_the_batch_is_small(kind, training, shape, heads, layout, monkeypatch):
    """Where a program per sample would leave the GPU mostly idle with much to read each
    (channel_splits; its threshold lowered here so a small input splits), the backward's
    per-sample programs, and the forward's without heads in the kernel, share each sample's
    channels along the grid's second axis; the sums over the batch then run as the reduce kernel
    of their own. Outputs, every gradient and the running statistics match the reference. (The
    forward's split once overwrote the statistics' split count, which only the forward's merge
    reads.)"""
    from eefast.kernels.exit_head import common, statistics

    for module in (common, statistics):  # (also splits the statistics: both paths at once)
        monkeypatch.setattr(module, "SPLIT_MIN", 16)
    if heads == "by-linear-layers":
        lower_heads_in_kernel_max(monkeypatch)
    if shape == CHANNEL_SPLIT_SHAPES["merged-in-forward"] and layout == "channels_last":
        pytest.skip("channels_last splits the statistics over positions: the merge kernel merges them")
    launches = record_launches(monkeypatch)
    *shape, splits = shape
    params, bn = make(shape, kind, torch.float64, layout=layout, training=training)
    bn_reference = clone_bn(bn)
    outputs, grads = run("triton", params, bn, kind)
    ref_outputs, ref_grads = run("reference", params, bn_reference, kind)
    grids = {}
    for name, grid, _ in launches:
        grids.setdefault(name.removeprefix("exit_head_"), grid)
    batch = shape[0]
    assert grids["backward"] == (batch, splits)
    assert grids["forward"] == ((batch, splits) if heads == "by-linear-layers" else (batch, 1))
    assert ("reduce" in grids) == (heads == "in-kernel" or kind == "bnpool")
    if shape == list(CHANNEL_SPLIT_SHAPES["merged-in-forward"][:5]):
        assert grids["batch_stats"] == (shape[1], 2) and "batch_stats_merge" not in grids
    for got, want in zip(outputs + grads, ref_outputs + ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    if bn is not None:
        torch.testing.assert_close(bn.running_mean, bn_reference.running_mean)
        torch.testing.assert_close(bn.running_var, bn_reference.running_var)


@pytest.mark.parametrize("kind, training, launches", [("pool", True, ["backward"]), ("bnpool", False, ["backward"]),
                                                      ("bnpool", True, ["reduce", "backward"])],
                         ids=["pool", "bnpool-eval", "bnpool-train"])
def test_backward_is_one_launch_unless_batch_statistics(kind, training, launches, monkeypatch):
    """The backward's reduce programs (the sums over the batch) run in the per-sample kernel's
    launch, except with batch statistics, whose dL/dx needs their sums first; the gradients match
    the reference either way (test_matches_reference covers every shape). The launch count is
    the device-time structure the H200 results measured."""
    recorded = record_launches(monkeypatch)
    params, bn = make(SHAPES["k-blocks"], kind, torch.float64, training=training)
    outputs, grads = run("triton", params, bn, kind)
    seen = [name.removeprefix("exit_head_") for name, _, _ in recorded]
    assert seen[seen.index("forward") + 1:] == launches
    ref_outputs, ref_grads = run("reference", params, clone_bn(bn), kind)
    for got, want in zip(outputs + grads, ref_outputs + ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("heads", ["heads", "pooled"])
def test_each_mode_takes_its_path(heads, monkeypatch):
    """Without autograd: the inference launch alone (no autograd.Function, no custom op); with
    autograd (eval-mode or batch statistics): the eager autograd.Function, whose statistics kernel
    also updates the running statistics (no lerp after the op); the custom op only under
    torch.compile (test_model_with_fused_ops_compiles_fullgraph). The same for the pooled features
    alone (heads too large for the kernels; HEADS_IN_KERNEL_MAX lowered to 0). The inference path
    and the autograd.Function are the host-time savings benchmarks/results/h200-exit-head-profile.txt
    measured."""
    from eefast.kernels import exit_head as kernel_module

    if heads == "pooled":
        lower_heads_in_kernel_max(monkeypatch)
    calls = []
    for name in ["inference", "exit_head_fused"]:
        original = getattr(kernel_module, name)
        monkeypatch.setattr(kernel_module, name, lambda *args, _f=original, _n=name: calls.append(_n) or _f(*args))
    function_apply = kernel_module.ExitHeadFunction.apply
    monkeypatch.setattr(kernel_module.ExitHeadFunction, "apply",
                        staticmethod(lambda *args: calls.append("function") or function_apply(*args)))
    block = exit_block("bnpool")
    x = torch.randn(3, 5, 4, 4, device=DEVICE)
    with torch.no_grad():
        block(x)
    assert calls == ["inference"]
    block(x)[0].sum().backward()
    assert calls[1:] == ["function"] and block.classifier.weight.grad is not None
    block.train()
    lerps = []
    monkeypatch.setattr(ops, "_update_running_stats", lambda *args: lerps.append(args))
    with torch.no_grad():
        block(x)  # batch statistics: computed, and the running ones updated, by the op's kernels
    assert calls[2:] == ["function"] and not lerps


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(3, 2, 5, 7), (40, 3, 17, 17), (1, 4, 1, 1), (70, 2, 16, 16)],
                         ids=["small", "many-tiles", "one-value", "batch-split"])
def test_batch_statistics(shape, layout):
    """The statistics kernel against float64 var_mean, on data whose mean is 10^6 times its spread:
    shifted by the channel's first value and merged per tile, the variance stays accurate where a
    sum of squares (or, on the GPU, unshifted tile means) would not. 'batch-split' splits the batch
    over 9 programs per channel (the last with 6 samples), and in channels_last (a kernel of its
    own, tiles of [positions, channels]) the 17920 positions over 18 programs, then merges the
    partials."""
    from eefast.kernels.exit_head.statistics import batch_stats, stats_blocks, stats_channels_blocks

    if shape[0] == 70:
        assert stats_blocks(70, 2, 256)[2:] == (9, 8)
        assert stats_channels_blocks(70, 2, 256)[2:] == (18, 1024)

    g = torch.Generator().manual_seed(0)
    x = (1e4 + 1e-2 * torch.randn(*shape, generator=g, dtype=torch.float64)).to(DEVICE, torch.float32)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    stats = batch_stats(x)
    var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    count = x.numel() // x.shape[1]
    unbiased = var * count / max(count - 1, 1)
    torch.testing.assert_close(stats.double(), torch.stack([mean, var, unbiased]), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("merged_by", ["forward", "merge-kernel"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_split_batch_statistics_merged_by_the_forward_or_the_merge_kernel(layout, merged_by, monkeypatch):
    """A bnpool training step where the statistics kernel splits its work (B=70, C=2, 16x16: 9
    splits in NCHW, 18 in channels_last). The forward kernel merges the partials itself, with no
    merge launch, where they are few against each sample's map; otherwise the merge kernel does
    (forced here by MERGE_IN_FORWARD_SHARE). Either way outputs, gradients (the backward reads the
    statistics the forward's program 0 wrote), the returned statistics and the running statistics
    match the reference."""
    from eefast.kernels.exit_head import exit_head_fused, statistics

    if merged_by == "merge-kernel":
        monkeypatch.setattr(statistics, "MERGE_IN_FORWARD_SHARE", 10**6)
    launches = record_launches(monkeypatch)
    shape = (70, 2, 16, 16, 3)
    params, bn = make(shape, "bnpool", torch.float64, layout=layout, training=True)
    bn_reference = clone_bn(bn)
    outputs, grads = run("triton", params, bn, "bnpool")
    ref_outputs, ref_grads = run("reference", params, bn_reference, "bnpool")
    merges = [name for name, _, _ in launches if name == "batch_stats_merge"]
    assert len(merges) == (merged_by == "merge-kernel")
    for got, want in zip(outputs + grads, ref_outputs + ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bn.running_mean, bn_reference.running_mean, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(bn.running_var, bn_reference.running_var, rtol=1e-13, atol=1e-15)
    heads = [params[name].detach() for name in ("cls_weight", "cls_bias", "conf_weight", "conf_bias")]
    stats = exit_head_fused(params["x"].detach(), *heads, None, None, None, None, 1e-5, True, True)[3]
    var, mean = torch.var_mean(params["x"].detach(), dim=(0, 2, 3), unbiased=False)
    count = 70 * 16 * 16
    torch.testing.assert_close(stats, torch.stack([mean, var, var * count / (count - 1)]), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("batch, channels, pixels", [(256, 64, 64), (256, 512, 64), (8, 16, 16), (1024, 3, 1024),
                                                     (70, 2, 256), (2, 1, 1)])
def test_statistics_programs_read_at_most_the_split_threshold(batch, channels, pixels):
    """Both statistics kernels split their work until each program reads at most SPLIT_MIN values
    (or one tile), unless about PROGRAMS programs already run (at least half: a split takes whole
    tiles, which can round the count down); the splits cover every sample or position once. (The
    channels_last kernel once ran one program for 64 channels.)"""
    from eefast.kernels.exit_head import statistics

    enough = statistics.PROGRAMS // 2
    block_b, block_hw, splits, rows = statistics.stats_blocks(batch, channels, pixels)
    assert (splits - 1) * rows < batch <= splits * rows and rows % block_b == 0 or splits == 1
    assert channels * splits >= enough or rows * pixels <= max(statistics.SPLIT_MIN, block_b * pixels)
    block_n, block_c, splits, positions = statistics.stats_channels_blocks(batch, channels, pixels)
    programs = -(-channels // block_c) * splits
    assert (splits - 1) * positions < batch * pixels <= splits * positions
    assert programs >= enough or positions * block_c <= max(statistics.SPLIT_MIN, block_n * block_c)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(3, 2, 5, 7), (70, 2, 16, 16)], ids=["whole", "batch-split"])
def test_statistics_kernels_update_the_running_statistics(shape, dtype, layout):
    """With running_update the statistics kernel (or, with the batch split, the merge kernel)
    updates the running statistics in place as nn.BatchNorm2d does, the momentum to float64
    precision (it travels as two float32s)."""
    from eefast.kernels.exit_head import batch_stats

    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    running_mean = torch.randn(shape[1], generator=g, dtype=torch.float64).to(DEVICE, dtype)
    running_var = torch.rand(shape[1], generator=g, dtype=torch.float64).to(DEVICE, dtype) + 0.5
    momentum = 0.1 + 1e-12
    var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=True)
    want_mean = running_mean.double() + momentum * (mean - running_mean.double())
    want_var = running_var.double() + momentum * (var - running_var.double())
    stats = batch_stats(x, (running_mean, running_var, momentum))
    torch.testing.assert_close(stats[2].double(), var, **({} if dtype == torch.float32 else dict(rtol=1e-12, atol=0)))
    tolerance = dict(rtol=1.3e-6, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(running_mean.double(), want_mean, **tolerance)
    torch.testing.assert_close(running_var.double(), want_var, **tolerance)


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
def test_strided_head_parameters(grad):
    """Heads given as strided views (a transposed weight, every other bias) read as the reference reads them."""
    params, _ = make(SHAPES["non-pow2"], "pool", torch.float32)
    g = torch.Generator().manual_seed(3)
    cls_weight = torch.randn(37, 10, generator=g).to(DEVICE).t()  # [10, 37], strides (1, 10)
    cls_bias = torch.randn(20, generator=g).to(DEVICE)[::2]
    conf_weight = torch.randn(37, 1, generator=g).to(DEVICE).t()
    conf_bias = torch.randn(3, generator=g).to(DEVICE)[1:2]
    with torch.set_grad_enabled(grad):
        x = params["x"].detach().requires_grad_(grad)
        got = ops.exit_head(x, "pool", cls_weight, cls_bias, conf_weight, conf_bias, impl="triton")
        want = ops.exit_head(x, "pool", cls_weight, cls_bias, conf_weight, conf_bias, impl="reference")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_batch_statistics_of_one_value_raise_and_of_none_leave_the_running_statistics(impl):
    """Training-mode batch norm on one value per channel raises (as F.batch_norm does); on an empty
    batch it leaves the running statistics as they were (the fused path once lerped uninitialised
    memory into them)."""
    params, bn = make((1, 37, 1, 1, 10), "bnpool", torch.float32, training=True)
    heads = [params[k] for k in ("cls_weight", "cls_bias", "conf_weight", "conf_bias")]
    with pytest.raises(ValueError, match=r"more than 1 value per channel"):
        ops.exit_head(params["x"], "bnpool", *heads, bn, impl=impl)
    before = bn.running_mean.clone(), bn.running_var.clone()
    logits, conf = ops.exit_head(torch.randn(0, 37, 2, 2, device=DEVICE), "bnpool", *heads, bn, impl=impl)
    assert logits.shape == (0, 10) and conf.shape == (0,)
    torch.testing.assert_close((bn.running_mean, bn.running_var), before, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["pool", "bnpool"])
def test_expanded_upstream_gradients(kind):
    """logits.sum() hands the backward stride-0 gradients; the kernels read them with their strides."""
    params, bn = make(SHAPES["non-pow2"], kind, torch.float32, training=True)
    grads = {}
    for impl in ("triton", "reference"):
        logits, conf = ops.exit_head(params["x"], kind, params["cls_weight"], params["cls_bias"],
                                     params["conf_weight"], params["conf_bias"], clone_bn(bn), impl=impl)
        grads[impl] = torch.autograd.grad(logits.sum() + 3 * conf.sum(), list(params.values()))
    for got, want in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_double_backward_raises():
    """The fused backward is not differentiable: asking for a second derivative says so."""
    params, _ = make(SHAPES["non-pow2"], "pool", torch.float32)
    logits, _ = ops.exit_head(params["x"], "pool", params["cls_weight"], params["cls_bias"], params["conf_weight"],
                              params["conf_bias"], impl="triton")
    (grad_x,) = torch.autograd.grad(logits.square().sum(), [params["x"]], create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula was registered"):
        grad_x.sum().backward()


def _strided_views():
    """label: (x, expected (LAYOUT, VEC)) over the layouts the kernels meet."""
    from eefast.kernels.exit_head import CHANNELS_CONTIGUOUS, PIXELS_CONTIGUOUS, STRIDED

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, dtype=dtype, device=DEVICE)

    return {
        "nchw-8x8-fp32": (randn(3, 64, 8, 8), (PIXELS_CONTIGUOUS, 4)),
        "nchw-8x8-bf16": (randn(3, 64, 8, 8, dtype=torch.bfloat16), (PIXELS_CONTIGUOUS, 8)),
        "nchw-8x8-fp64": (randn(3, 64, 8, 8, dtype=torch.float64), (PIXELS_CONTIGUOUS, 2)),
        "nchw-7x7": (randn(3, 64, 7, 7), (PIXELS_CONTIGUOUS, 1)),
        "nchw-14x14-bf16": (randn(3, 8, 14, 14, dtype=torch.bfloat16), (PIXELS_CONTIGUOUS, 1)),  # 196 % 8
        "nchw-offset-base": (randn(3 * 64 * 64 + 1)[1:].view(3, 64, 8, 8), (PIXELS_CONTIGUOUS, 1)),
        "nchw-channel-slice": (randn(3, 66, 8, 8)[:, 1:65], (PIXELS_CONTIGUOUS, 4)),  # base 64 floats in: aligned
        "channels-last": (randn(3, 64, 8, 8).contiguous(memory_format=torch.channels_last), (CHANNELS_CONTIGUOUS, 4)),
        "channels-last-c3": (randn(3, 3, 8, 8).contiguous(memory_format=torch.channels_last), (CHANNELS_CONTIGUOUS, 1)),
        "plain-flattened": (randn(3, 5 * 4 * 4, 1, 1), (CHANNELS_CONTIGUOUS, 4)),
        "pixel-strided": (randn(3, 16, 8, 16)[..., ::2], (STRIDED, 1)),
    }


@pytest.mark.parametrize("label", list(_strided_views()))
def test_vector_width_promise(label):
    """The launchers promise the kernels 16-byte groups along the contiguous axis (tl.multiple_of,
    max_contiguous, max_constancy: the interpreter ignores them, a GPU would read wrong values if
    they were false). The promise, checked on the addresses: every group of VEC elements starts
    16-byte aligned and lies wholly inside the map."""
    from eefast.kernels.exit_head import CHANNELS_CONTIGUOUS, PIXELS_CONTIGUOUS, flat_strides
    from eefast.kernels.exit_head import layout as layout_of

    x, expected = _strided_views()[label]
    x, strides = flat_strides(x)
    layout, vec = layout_of(x, strides)
    assert (layout, vec) == expected
    batch, channels, height, width = x.shape
    stride_b, stride_c, stride_hw = strides
    b, c, p = torch.meshgrid(torch.arange(batch), torch.arange(channels), torch.arange(height * width), indexing="ij")
    addresses = x.data_ptr() + (b * stride_b + c * stride_c + p * stride_hw) * x.element_size()
    if layout == PIXELS_CONTIGUOUS:
        assert stride_hw == 1
        starts, length = addresses[:, :, ::vec], height * width
    elif layout == CHANNELS_CONTIGUOUS:
        assert stride_c == 1
        starts, length = addresses[:, ::vec, :], channels
    if vec > 1:
        assert length % vec == 0
        assert bool((starts % 16 == 0).all())


@pytest.mark.parametrize("variant", ["heads by torch's linear layers", "merge kernel always", "no split work",
                                     "running update by torch", "no 16-byte vectors"])
def test_each_variant_turned_off_still_matches_the_reference(variant, monkeypatch):
    """benchmarks/exit_head_variants.py times the exit head with each device-side variant turned off
    (the measurement that decides which stay): the code it times then still gives the reference's
    outputs, gradients and running statistics. B=17, C=2, 16x16 splits the statistics 3 ways."""
    from benchmarks.exit_head_variants import VARIANTS, turned_off

    launches = record_launches(monkeypatch)
    with turned_off(VARIANTS[variant]):
        params, bn = make((17, 2, 16, 16, 3), "bnpool", torch.float64, training=True)
        bn_reference = clone_bn(bn)
        outputs, grads = run("triton", params, bn, "bnpool")
    took_effect = {  # what each variant turned off changes in the launches
        "heads by torch's linear layers": lambda: all(not c["HEADS"] for n, _, c in launches if "HEADS" in c),
        "merge kernel always": lambda: any(n == "batch_stats_merge" for n, _, _ in launches),
        "no split work": lambda: all(grid[1:] in ((), (1,)) for n, grid, _ in launches),
        "running update by torch": lambda: all(not c.get("UPDATE") for _, _, c in launches),
        "no 16-byte vectors": lambda: all(c.get("VEC", 1) == 1 for _, _, c in launches),
    }[variant]
    assert launches and took_effect(), launches
    ref_outputs, ref_grads = run("reference", params, bn_reference, "bnpool")
    for got, want in zip(outputs + grads + [bn.running_mean, bn.running_var],
                         ref_outputs + ref_grads + [bn_reference.running_mean, bn_reference.running_var]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
