"""What each device-side variant of the fused exit head pays: device time per CUDA-graph replay of
an ExitBlock training step with the variant as it is and with it turned off (GPU only).

    python -m benchmarks.exit_head_variants > benchmarks/results/<gpu>-exit-head-variants.txt

The rule (issue 18): a variant stays where it pays at least 10 % of the step it serves at one of
the benchmark shapes. Each variant is turned off through the constant or function that decides
it, so the code that would remain is exactly the code that runs:
  heads in the kernels         HEADS_IN_KERNEL_MAX = 0: torch's linear layers on the pooled features
  statistics merged in forward MERGE_IN_FORWARD_SHARE huge: the merge kernel always
  work split over programs     SPLIT_MIN huge: a program per channel (statistics), per sample (the rest)
  running update in kernels    fused_running_update False: one foreach lerp after the op
  16-byte vectors              layout() returns VEC = 1
Shapes: the kernel benchmarks' (B=256, C=64, 8x8, K=10; CIFAR ResNet stage exits; K=1000 at
B=64, C=256, 56x56), fp32 and bf16, NCHW and channels_last where they were measured.
"""

from __future__ import annotations

import contextlib

import torch
import triton

import eefast
from benchmarks.profile_exit_head import replay_us
from benchmarks.workloads import exit_block_training_step
from eefast.kernels import exit_head
from eefast.kernels.exit_head import backward, common, forward, op, statistics

# label: (kind, dtype, B, C, size, K, channels_last)
STEPS = {
    "pool fp32 256x64x8x8 K=10": ("pool", torch.float32, 256, 64, 8, 10, False),
    "bnpool fp32 256x64x8x8 K=10": ("bnpool", torch.float32, 256, 64, 8, 10, False),
    "bnpool bf16 256x64x8x8 K=10": ("bnpool", torch.bfloat16, 256, 64, 8, 10, False),
    "bnpool fp32 256x16x32x32 K=10": ("bnpool", torch.float32, 256, 16, 32, 10, False),
    "bnpool fp32 256x16x32x32 K=10 channels_last": ("bnpool", torch.float32, 256, 16, 32, 10, True),
    "bnpool fp32 256x32x16x16 K=10": ("bnpool", torch.float32, 256, 32, 16, 10, False),
    "bnpool fp32 64x256x56x56 K=1000": ("bnpool", torch.float32, 64, 256, 56, 1000, False),
}


def _scalar_layout(x, strides):
    return common.layout(x, strides)[0], 1


VARIANTS = {  # name: [(module, attribute, value)] that turns the variant off
    "as is": [],
    "heads by torch's linear layers": [(op, "HEADS_IN_KERNEL_MAX", 0)],
    "merge kernel always": [(statistics, "MERGE_IN_FORWARD_SHARE", 10**12)],
    "no split work": [(common, "SPLIT_MIN", 10**15), (statistics, "SPLIT_MIN", 10**15)],
    "running update by torch": [(exit_head, "fused_running_update", lambda *args: False)],
    "no 16-byte vectors": [(module, "layout", _scalar_layout) for module in (forward, backward, statistics)],
}


@contextlib.contextmanager
def turned_off(changes):
    saved = [(module, name, getattr(module, name)) for module, name, _ in changes]
    for module, name, value in changes:
        setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def step_replay_us(kind, dtype, batch, channels, size, classes, channels_last) -> float:
    """Microseconds per graph replay of an ExitBlock training step on this shape."""
    torch.manual_seed(0)
    block = eefast.ExitBlock(channels, classes, kind, impl="triton").cuda().to(dtype).train()
    x = torch.randn(batch, channels, size, size, device="cuda", dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return replay_us(exit_block_training_step(block, x.requires_grad_()), replays=500)


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"eefast {eefast.__version__}: us per graph replay of an ExitBlock training step (ratio to 'as is')")
    print(f"  {'step':<46}" + "".join(f" {name[:14]:>15}" for name in VARIANTS))
    for label, shape in STEPS.items():
        times = {}
        for name, changes in VARIANTS.items():
            with turned_off(changes):
                times[name] = step_replay_us(*shape)
        base = times["as is"]
        print(f"  {label:<46}" + "".join(f" {us:>7.1f} ({us / base:4.2f})" for us in times.values()))


if __name__ == "__main__":
    main()
