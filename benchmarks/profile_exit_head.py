"""Where an exit head's time goes on a GPU: host time per call of each layer of the fused path,
against eager PyTorch, and device time per CUDA-graph replay.

    python -m benchmarks.profile_exit_head > benchmarks/results/<gpu>-exit-head-profile.txt

Inference, layers outermost first: ``ExitBlock`` in eval mode, ``ops.exit_head`` (without
autograd: one launch on the parameters as stored), the bare inference launcher, and for
comparison the custom op ``eefast::exit_head_fused`` that torch.compile uses. Training: one
step of an ``ExitBlock`` in train mode (forward, then the gradients of every parameter and of the
input from fixed gradients of its outputs), through the eager autograd.Function, and through the
custom op as torch.compile would call it, against eager PyTorch and against autograd's own
cost (the same step through a head that launches nothing: the floor of any implementation's
host time per call), and the same steps with the backward on the calling thread ("one thread":
torch.autograd.set_multithreading_enabled(False), where autograd would otherwise hand it to its
worker thread for the GPU); then the device time of each kernel of the step (torch.profiler),
fused and eager. B=256, C=64, 8x8, K=10.
"""

from __future__ import annotations

import time

import torch
import triton

import eefast
from benchmarks.workloads import exit_block_training_step, upstream_gradients
from eefast import ops
from eefast.graphs import capture


def host_us(fn, calls: int = 2000) -> tuple[float, float]:
    """(host microseconds per call without waiting, microseconds per call waiting after each)."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls // 4):
        fn()
        torch.cuda.synchronize()
    return host, (time.perf_counter() - start) / (calls // 4) * 1e6


def replay_us(fn, replays: int = 2000) -> float:
    """Microseconds per replay of a CUDA graph of ``fn`` (NaN, with the reason, if it cannot be captured)."""
    try:
        graph = capture(lambda: tuple(fn()))
    except RuntimeError as error:
        print(f"  (no CUDA graph: {str(error).splitlines()[0][:100]})")
        return float("nan")
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / replays * 1e6


def custom_op_step(block: eefast.ExitBlock, x: torch.Tensor):
    """The same step through the custom op (as torch.compile calls it), without running-statistics updates."""
    from eefast.kernels import exit_head as kernel

    heads = (block.classifier.weight, block.classifier.bias, block.confidence.weight, block.confidence.bias)
    bn = block.bn
    bn_args = (None, None, None, None, 0.0) if bn is None else (bn.weight, bn.bias, None, None, bn.eps)
    params = [x, *block.parameters()]
    grad_outputs = upstream_gradients(block, x)

    def step():
        logits, conf, _, _ = kernel.exit_head_fused(x, *heads, *bn_args, bn is not None, bn is not None)
        return torch.autograd.grad((logits, conf), params, grad_outputs)
    return step


class _NoKernels(torch.autograd.Function):
    """An exit head that launches nothing: its forward allocates the outputs and its backward the
    gradients. A training step through it is autograd's own host time for the head's inputs and
    outputs (on a GPU, backward runs on autograd's device thread), which no kernel can remove."""

    @staticmethod
    def forward(ctx, classes, x, *params):
        ctx.save_for_backward(x, *params)
        return x.new_empty(x.shape[0], classes), x.new_empty(x.shape[0])

    @staticmethod
    def backward(ctx, grad_logits, grad_conf):
        return None, *(torch.empty_like(t) for t in ctx.saved_tensors)


def autograd_floor_step(block: eefast.ExitBlock, x: torch.Tensor):
    """exit_block_training_step's autograd work without the head (_NoKernels)."""
    params = [x, *block.parameters()]
    grad_outputs = upstream_gradients(block, x)

    def step():
        return torch.autograd.grad(_NoKernels.apply(block.classifier.out_features, *params), params, grad_outputs)
    return step


def on_calling_thread(step):
    """``step`` with its backward on the calling thread (torch.autograd.set_multithreading_enabled(False)):
    by default autograd hands a GPU graph's backward to a worker thread per device and waits for it."""
    def step_here():
        with torch.autograd.set_multithreading_enabled(False):
            return step()
    return step_here


def report(name: str, fn) -> None:
    host, synced = host_us(fn)
    print(f"  {name:<44} {host:>12.1f} {synced:>10.1f} {replay_us(fn):>12.1f}")


def kernel_us(fn, steps: int = 200) -> list[tuple[str, float]]:
    """(kernel name, device microseconds per step) of every GPU kernel ``fn`` launches, from
    torch.profiler, longest first."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    kernels = [(event.key, event.self_device_time_total / steps) for event in prof.key_averages()
               if event.self_device_time_total > 0]
    return sorted(kernels, key=lambda kernel: -kernel[1])


def report_kernels(name: str, fn) -> None:
    kernels = kernel_us(fn)
    print(f"  {name}: {sum(us for _, us in kernels):.1f} us of kernels per step")
    for kernel, us in kernels:
        print(f"    {us:>8.2f}  {kernel[:90]}")


def main() -> None:
    from eefast.kernels import exit_head as kernel

    batch, channels, size, classes = 256, 64, 8, 10
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"eefast {eefast.__version__}")
    header = f"  {'layer':<44} {'host us/call':>12} {'with sync':>10} {'graph replay':>12}"
    for kind in ("pool", "bnpool"):
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            fused = eefast.ExitBlock(channels, classes, kind, impl="triton").cuda().to(dtype).eval()
            eager = eefast.ExitBlock(channels, classes, kind, impl="reference").cuda().to(dtype).eval()
            eager.load_state_dict(fused.state_dict())
            x = torch.randn(batch, channels, size, size, device="cuda", dtype=dtype)
            heads = (fused.classifier.weight, fused.classifier.bias, fused.confidence.weight, fused.confidence.bias)
            bn = None if fused.bn is None else eefast.reference.BatchNormArgs(
                fused.bn.weight, fused.bn.bias, fused.bn.running_mean, fused.bn.running_var, False, 0.1, fused.bn.eps)
            bn_stats = None if bn is None else (*bn[:4], bn.eps)
            bn_op_args = (None, None, None, None, 0.0) if bn is None else (*bn[:4], bn.eps)
            relu = kind == "bnpool"
            layers = {
                "ExitBlock, fused (inference path)": lambda: fused(x),
                "ops.exit_head, fused": lambda: ops.exit_head(x, kind, *heads, bn, impl="triton"),
                "launcher exit_head.inference": lambda: kernel.inference(x, heads, bn_stats, relu),
                "custom op exit_head_fused": lambda: kernel.exit_head_fused(x, *heads, *bn_op_args, False, relu),
                "ExitBlock, eager PyTorch": lambda: eager(x),
            }
            print(f"\nexit head inference {kind} {str(dtype)[6:]} B={batch} C={channels} {size}x{size} K={classes}")
            print(header)
            with torch.no_grad():
                for name, fn in layers.items():
                    report(name, fn)
            print(f"exit head training step {kind} {str(dtype)[6:]} (forward + backward, batch statistics)")
            print(header)
            x_grad = x.clone().requires_grad_()
            fused.train(), eager.train()
            steps = {
                "ExitBlock, fused (ExitHeadFunction)": exit_block_training_step(fused, x_grad),
                "custom op exit_head_fused (as compiled)": custom_op_step(fused, x_grad),
                "ExitBlock, eager PyTorch": exit_block_training_step(eager, x_grad),
                "autograd alone (a head launching nothing)": autograd_floor_step(fused, x_grad),
            }
            for name, step in steps.items():
                report(name, step)
            for name in ("ExitBlock, fused (ExitHeadFunction)", "ExitBlock, eager PyTorch",
                         "autograd alone (a head launching nothing)"):
                report(f"{name.split(' (')[0]}, one thread", on_calling_thread(steps[name]))
            print("device time of each kernel of the training step")
            report_kernels("fused", exit_block_training_step(fused, x_grad))
            report_kernels("eager PyTorch", exit_block_training_step(eager, x_grad))

if __name__ == "__main__":
    main()
