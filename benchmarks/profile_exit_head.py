"""Where an exit head's time goes on a GPU: host time per call of each layer of the fused path,
against eager PyTorch, and device time per CUDA-graph replay.

    python -m benchmarks.profile_exit_head > benchmarks/results/<gpu>-exit-head-profile.txt

Layers, outermost first: ``ExitBlock`` in inference, ``ops.exit_head`` (without autograd: one
launch on the parameters as stored), the bare inference launcher, and for comparison the custom
op ``eefast::exit_head_fused`` that autograd and torch.compile use (on parameters folded ahead).
B=256, C=64, 8x8, K=10.
"""

from __future__ import annotations

import time

import torch
import triton

import eefast
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
    graph = capture(lambda: tuple(fn()))
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / replays * 1e6


@torch.no_grad()
def main() -> None:
    from eefast.kernels import exit_head as kernel

    batch, channels, size, classes = 256, 64, 8, 10
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, eefast {eefast.__version__}")
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
            weight, bias = torch.cat(heads[0::2]), torch.cat(heads[1::2])
            scale, shift = (None, None) if bn is None else ops._batch_norm_affine(x, bn)
            relu = kind == "bnpool"
            layers = {
                "ExitBlock, fused (inference path)": lambda: fused(x),
                "ops.exit_head, fused": lambda: ops.exit_head(x, kind, *heads, bn, impl="triton"),
                "launcher exit_head_inference_launch": lambda: (kernel.exit_head_inference_launch(
                    x, *heads, bn_stats, relu),),
                "custom op exit_head_fused (pre-folded)": lambda: kernel.exit_head_fused(
                    x, weight, bias, scale, shift, relu),
                "ExitBlock, eager PyTorch": lambda: eager(x),
            }
            print(f"\nexit head {kind} {str(dtype)[6:]} B={batch} C={channels} {size}x{size} K={classes}")
            print(f"  {'layer':<40} {'host us/call':>12} {'with sync':>10} {'graph replay':>12}")
            for name, fn in layers.items():
                host, synced = host_us(fn)
                print(f"  {name:<40} {host:>12.1f} {synced:>10.1f} {replay_us(fn):>12.1f}")
    launches = kernel._launch_forward.launches
    print(f"\ntriton {triton.__version__}: {launches} launches went straight to the compiled binary (kernels/launch.py)")


if __name__ == "__main__":
    main()
