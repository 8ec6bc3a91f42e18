"""The fused Triton kernels against eager PyTorch (GPU only; skipped elsewhere).

    pytest benchmarks/test_bench_kernels.py --benchmark-only --benchmark-json benchmarks/results/<gpu>-kernels.json

Each case runs forward, backward, or both; extra_info records the median, p20 and p80 (ms), the
peak memory of one step beyond its inputs, and (with a backward) the bytes of the gradients the
step returns, which every implementation's peak includes. The exit head's backward starts from
fixed gradients of its outputs, so that the head is timed alone; the loss's from its scalar.
"""

from __future__ import annotations

import functools

import pytest
import torch

import eefast
from benchmarks.workloads import exit_block_training_step, upstream_gradients_of
from eefast import ops, reference
from eefast.graphs import capture
from eefast.timing import synchronize

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not ops.HAS_TRITON, reason="Triton unavailable"),
]
PASSES = ["forward", "backward", "both"]


def timed_step(benchmark, step, inputs, passes, grad_outputs=None):
    """Benchmarks ``passes`` of ``step(*inputs)`` (a scalar, or outputs whose gradients are
    ``grad_outputs``) and records quantiles and peak memory. The forward runs without autograd."""
    grads_of = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    if passes == "forward":
        def run():
            with torch.no_grad():
                step(*inputs)
            synchronize("cuda")
    elif passes == "backward":
        def run():
            torch.autograd.grad(outputs, grads_of, grad_outputs, retain_graph=True)
            synchronize("cuda")
        outputs = step(*inputs)
    else:
        def run():
            torch.autograd.grad(step(*inputs), grads_of, grad_outputs)
            synchronize("cuda")

    timed(benchmark, run)
    if passes != "forward":  # what any implementation must allocate: the gradients it returns
        benchmark.extra_info["gradient_bytes"] = sum(t.numel() * t.element_size() for t in grads_of)


def timed(benchmark, run):
    """Benchmarks ``run`` (which waits for the device) and records quantiles and peak memory."""
    run()  # compile / warm up
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    peak = torch.cuda.max_memory_allocated() - base
    benchmark(run)
    data = sorted(benchmark.stats.stats.data)
    quantile = lambda q: data[min(len(data) - 1, int(q * len(data)))] * 1e3  # noqa: E731
    benchmark.extra_info.update(median_ms=quantile(0.5), p20_ms=quantile(0.2), p80_ms=quantile(0.8), peak_bytes=peak)


@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("kind", ["pool", "bnpool"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_exit_head(benchmark, record, dtype, kind, impl, passes):
    benchmark.group = f"exit_head {kind} {str(dtype).removeprefix('torch.')} {passes}"
    exit_head_step(benchmark, record, dtype, kind, impl, passes, batch=256, channels=64, size=8, classes=10)


@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_exit_head_large_heads(benchmark, record, impl, passes):
    """A pool exit with 1000 classes at ResNet-18's last stage on 32x32 inputs (C=512, 4x4): heads
    over HEADS_IN_KERNEL_MAX weights, which the fused path leaves to torch's linear layers on the
    kernel's pooled features (the op without heads)."""
    benchmark.group = f"exit_head pool float32 C=512 4x4 K=1000 {passes}"
    exit_head_step(benchmark, record, torch.float32, "pool", impl, passes, batch=256, channels=512, size=4,
                   classes=1000)


def exit_head_step(benchmark, record, dtype, kind, impl, passes, batch, channels, size, classes):
    """timed_step of ops.exit_head (batch statistics for bnpool) on random inputs of this shape."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=g).cuda().to(dtype).requires_grad_()
    params = [torch.randn(*shape, generator=g).cuda().to(dtype).requires_grad_()
              for shape in [(classes, channels), (classes,), (1, channels), (1,)]]
    bn = None
    if kind == "bnpool":
        bn = reference.BatchNormArgs(torch.ones(channels, device="cuda", dtype=dtype, requires_grad=True),
                                     torch.zeros(channels, device="cuda", dtype=dtype, requires_grad=True),
                                     torch.zeros(channels, device="cuda", dtype=dtype),  # as in a model moved to
                                     torch.ones(channels, device="cuda", dtype=dtype),  # dtype (batch norm's rule)
                                     training=True)

    def head(x, *params):
        return ops.exit_head(x, kind, *params, bn, impl=impl)

    record("cuda", dtype, batch=batch, channels=channels, spatial=[size, size], classes=classes, impl=impl, passes=passes)
    timed_step(benchmark, head, [x, *params], passes, upstream_gradients_of(batch, classes, dtype, "cuda"))


@pytest.mark.parametrize("graphed", [False, True], ids=["call", "graph-replay"])
@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("kind", ["pool", "bnpool"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_exit_block_inference(benchmark, record, dtype, kind, impl, graphed):
    """An ExitBlock in eval mode without autograd, as early-exit inference runs it: one call from
    Python (host time counts), or one replay of a CUDA graph of the call (device time)."""
    batch, channels, size, classes = 256, 64, 8, 10
    torch.manual_seed(0)
    block = eefast.ExitBlock(channels, classes, kind, impl=impl).cuda().to(dtype).eval()
    x = torch.randn(batch, channels, size, size, device="cuda", dtype=dtype)
    if graphed:
        with torch.no_grad():
            graph = capture(block, x)
        call = graph.replay
    else:
        call = functools.partial(block, x)

    def run():
        with torch.no_grad():
            call()
        synchronize("cuda")

    benchmark.group = f"exit block inference {kind} {str(dtype).removeprefix('torch.')} {'graph replay' if graphed else 'call'}"
    record("cuda", dtype, batch=batch, channels=channels, spatial=[size, size], classes=classes, impl=impl,
           passes="inference", graphed=graphed)
    timed(benchmark, run)


TRAINING_STEP_MODES = {"call": "call", "call-one-thread": "call, backward on the calling thread",
                       "graph-replay": "graph replay"}


@pytest.mark.parametrize("mode", TRAINING_STEP_MODES)
@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("kind", ["pool", "bnpool"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_exit_block_training_step(benchmark, record, dtype, kind, impl, mode):
    """One training step of an ExitBlock (train mode: batch statistics, running-statistics update):
    forward, then the gradients of the input and every parameter from fixed gradients of its
    outputs. Called from Python (host time counts); the same with the backward on the calling
    thread (torch.autograd.set_multithreading_enabled(False): autograd otherwise hands a GPU
    graph's backward to its worker thread and waits); or replayed from a CUDA graph of the whole
    step (device time: what the kernels cost, against eager PyTorch's kernels)."""
    benchmark.group = f"exit block training step {kind} {str(dtype).removeprefix('torch.')} {TRAINING_STEP_MODES[mode]}"
    training_step_case(benchmark, record, dtype, kind, impl, mode, batch=256, channels=64, size=8, classes=10)


# Exits with 1000 classes (batch, C, H = W): ResNet-18's last stage on 32x32 inputs, and an
# ImageNet ResNet-50's first stage (224x224 inputs), whose map each per-sample program reads is
# 800k values.
LARGE_HEAD_EXITS = {"b256-c512-4x4": (256, 512, 4), "b64-c256-56x56": (64, 256, 56)}


@pytest.mark.parametrize("mode", ["call", "graph-replay"])
@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("kind", ["pool", "bnpool"])
@pytest.mark.parametrize("shape", LARGE_HEAD_EXITS.values(), ids=LARGE_HEAD_EXITS.keys())
def test_exit_block_training_step_large_heads(benchmark, record, shape, kind, impl, mode):
    """test_exit_block_training_step for 1000 classes (fp32): heads the kernels leave to torch's
    linear layers (the op without heads), at LARGE_HEAD_EXITS."""
    batch, channels, size = shape
    benchmark.group = (f"exit block training step {kind} float32 B={batch} C={channels} {size}x{size} K=1000 "
                       f"{TRAINING_STEP_MODES[mode]}")
    training_step_case(benchmark, record, torch.float32, kind, impl, mode, batch=batch, channels=channels,
                       size=size, classes=1000)


def training_step_case(benchmark, record, dtype, kind, impl, mode, batch, channels, size, classes):
    torch.manual_seed(0)
    block = eefast.ExitBlock(channels, classes, kind, impl=impl).cuda().to(dtype).train()
    x = torch.randn(batch, channels, size, size, device="cuda", dtype=dtype, requires_grad=True)
    step = exit_block_training_step(block, x)
    call = capture(lambda: tuple(step())).replay if mode == "graph-replay" else step

    def run():
        with torch.autograd.set_multithreading_enabled(mode != "call-one-thread"):
            call()
        synchronize("cuda")

    record("cuda", dtype, batch=batch, channels=channels, spatial=[size, size], classes=classes, impl=impl,
           passes="both", graphed=mode == "graph-replay", backward_thread="caller" if mode == "call-one-thread"
           else "autograd's device thread")
    timed(benchmark, run)


# The exits of a CIFAR ResNet's stages (C, H = W): the first two split the batch statistics.
STAGE_EXITS = {"c16-32x32": (16, 32), "c32-16x16": (32, 16)}


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("shape", STAGE_EXITS.values(), ids=STAGE_EXITS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_exit_block_training_step_at_stage_exits(benchmark, record, dtype, shape, impl, layout):
    """test_exit_block_training_step's graph replay (device time) for a bnpool exit at the other
    stages of a CIFAR ResNet, B=256, NCHW and channels_last: the shapes where the batch
    statistics are split and merged, and where the channels are the contiguous axis."""
    batch, (channels, size), classes = 256, shape, 10
    torch.manual_seed(0)
    block = eefast.ExitBlock(channels, classes, "bnpool", impl=impl).cuda().to(dtype).train()
    x = torch.randn(batch, channels, size, size, device="cuda", dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    step = exit_block_training_step(block, x.requires_grad_())
    graph = capture(lambda: tuple(step()))

    def run():
        graph.replay()
        synchronize("cuda")

    benchmark.group = f"exit block training step bnpool {str(dtype).removeprefix('torch.')} C={channels} " \
                      f"{size}x{size} {layout} graph replay"
    record("cuda", dtype, batch=batch, channels=channels, spatial=[size, size], classes=classes, impl=impl,
           passes="both", graphed=True, layout=layout)
    timed(benchmark, run)


@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("classes", [10, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ee_loss(benchmark, record, dtype, classes, impl, passes):
    exits, batch = 4, 256
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(exits, batch, classes, generator=g).cuda().to(dtype).requires_grad_()
    conf = torch.randn(exits - 1, batch, generator=g).cuda().to(dtype).requires_grad_()
    target = torch.randint(0, classes, (batch,), generator=g).cuda()
    costs = torch.tensor([0.1, 0.3, 0.6, 1.01], device="cuda")

    def step(logits, conf):
        return ops.eenet_loss(logits, conf, target, costs, 1.0, "v2", impl=impl)

    benchmark.group = f"ee_loss K={classes} {str(dtype).removeprefix('torch.')} {passes}"
    record("cuda", dtype, exits=exits, batch=batch, classes=classes, impl=impl, passes=passes)
    timed_step(benchmark, step, [logits, conf], passes)
