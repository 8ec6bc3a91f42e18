"""Host time per call of the fused exit head and loss on the CPU, with every kernel launch stubbed.

    python -m benchmarks.host_time > benchmarks/results/cpu-host-time.txt

What eefast's Python costs around its kernels, without a GPU: the Triton interpreter is loaded
(so that ``impl="triton"`` takes CPU tensors) and ``kernel[grid](...)`` is replaced by a call that
does nothing, so a step runs everything up to the launch (checks, heuristics, allocations,
autograd) and no kernel. The steps and shapes are those of ``profile_exit_head`` and the kernel
benchmarks: an ExitBlock training step (forward, then the gradients of x and of every parameter
from fixed upstream gradients) and an inference call at B=256, C=64, 8x8, K=10 (pool, bnpool), a
large-head step (K=1000, the heads on torch's linear layers), and the loss step (E=4, B=256,
K=10: forward and backward of ``ops.eenet_loss``), and the exit head's and loss's training steps
through their custom ops (as torch.compile calls them), against which the eager
autograd.Functions are measured. The best of 15 rounds of 200 calls each.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: CPU tensors reach the kernels' launchers

import time  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import eefast  # noqa: E402
from benchmarks import profile_exit_head  # noqa: E402
from benchmarks.workloads import exit_block_training_step  # noqa: E402
from eefast import ops  # noqa: E402


def stub_launches() -> None:
    """``kernel[grid](*args, **constexprs)`` does nothing (and returns no binary)."""
    InterpretedFunction.run = lambda self, *args, **kwargs: None


def host_us(fn, calls: int = 200, rounds: int = 15) -> float:
    """The least over ``rounds`` of the microseconds per call of ``fn`` (the least disturbed round)."""
    for _ in range(50):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return min(times)


def loss_step(classes: int):
    exits, batch = 4, 256
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(exits, batch, classes, generator=g).requires_grad_()
    conf = torch.randn(exits - 1, batch, generator=g).requires_grad_()
    target = torch.randint(0, classes, (batch,), generator=g)
    costs = torch.tensor([0.1, 0.3, 0.6, 1.01])

    def step():
        loss = ops.eenet_loss(logits, conf, target, costs, 1.0, "v2", impl="triton")
        return torch.autograd.grad(loss, (logits, conf))
    return step


def custom_op_step(kind: str):
    """The exit head's training step through its custom op, as torch.compile calls it (batch
    statistics for bnpool; no running-statistics update): what ExitHeadFunction's path saves."""
    torch.manual_seed(0)
    block = eefast.ExitBlock(64, 10, kind, impl="triton").train()
    return profile_exit_head.custom_op_step(block, torch.randn(256, 64, 8, 8, requires_grad=True))


def loss_custom_op_step():
    """The loss step through its custom op (as torch.compile calls it): what EELossEager's path saves."""
    from eefast.kernels.ee_loss import ee_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 256, 10, generator=g).requires_grad_()
    conf = torch.randn(3, 256, generator=g).requires_grad_()
    target, costs = torch.randint(0, 10, (256,), generator=g), torch.tensor([0.1, 0.3, 0.6, 1.01])

    def step():
        return torch.autograd.grad(ee_loss(logits, conf, target, costs, 1.0, "v2")[0].mean(), (logits, conf))
    return step


def main() -> None:
    torch.set_num_threads(1)
    stub_launches()
    print(f"CPU host time per call, kernel launches stubbed; torch {torch.__version__}, triton {triton.__version__}, "
          f"eefast {eefast.__version__}")
    print(f"  {'step':<58} {'us/call':>9}")
    batch, channels, size = 256, 64, 8
    for kind in ("pool", "bnpool"):
        for classes in (10, 1000):
            torch.manual_seed(0)
            block = eefast.ExitBlock(channels, classes, kind, impl="triton").train()
            x = torch.randn(batch, channels, size, size, requires_grad=True)
            step = exit_block_training_step(block, x)
            print(f"  {f'exit head training step {kind} K={classes}':<58} {host_us(step):>9.1f}")
        block = eefast.ExitBlock(channels, 10, kind, impl="triton").eval()
        with torch.no_grad():
            print(f"  {f'exit head inference {kind} K=10':<58} {host_us(lambda: block(x)):>9.1f}")
    for classes in (10, 1000):
        print(f"  {f'loss step E=4 B=256 K={classes}':<58} {host_us(loss_step(classes)):>9.1f}")
    for kind in ("pool", "bnpool"):
        print(f"  {f'exit head training step {kind} K=10, custom op (compiled path)':<58} "
              f"{host_us(custom_op_step(kind)):>9.1f}")
    print(f"  {'loss step E=4 B=256 K=10, custom op (compiled path)':<58} {host_us(loss_custom_op_step()):>9.1f}")


if __name__ == "__main__":
    main()
