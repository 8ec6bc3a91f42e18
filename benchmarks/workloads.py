"""The benchmark workloads: zoo models with a controlled exit mix on random 32x32 inputs, and the
exit head's training step.

Per-exit thresholds come from the confidences of a calibration batch so that 50 / 25 / 15 / 10 %
of its samples leave at successive exits (``eefast.EENet.thresholds_for_fractions``).
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

import eefast
from benchmarks.conftest import QUICK

MIX = [0.5, 0.25, 0.15]  # the final exit takes the remaining 10 %
MODELS = {"eenet110": {"num_exits": 3}, "eenet20": {"num_exits": 3}, "eenet50": {"num_exits": 3}}
CALIBRATION = 16 if QUICK else 256  # samples the thresholds are set on (at least)


def controlled_mix(name: str, device: str, dtype: torch.dtype, rows: int = CALIBRATION):
    """``(model, batch)``: the model with warmed batch-norm statistics in eval mode, and a batch of
    ``max(rows, CALIBRATION)`` samples on which its thresholds give the MIX. Cached: callers share
    the model and must not change it."""
    return _controlled_mix(name, device, dtype, max(rows, CALIBRATION))


@functools.lru_cache(maxsize=4)
def _controlled_mix(name: str, device: str, dtype: torch.dtype, rows: int):
    torch.manual_seed(0)
    model = eefast.create_model(name, **MODELS[name]).to(device)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(16, *model.input_shape, device=device))
    model = model.to(dtype).eval()
    generator = torch.Generator().manual_seed(1)
    batch = torch.randn(rows, *model.input_shape, generator=generator).to(device, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ties: verified below, on what is timed
        model.threshold = model.thresholds_for_fractions(batch, MIX)
    check_mix(model, batch)
    return model, batch


def check_mix(model, batch: torch.Tensor, tolerance: float = 0.02) -> None:
    """Skips unless the model's thresholds give MIX on ``batch`` (each share within ``tolerance``, or one
    sample where the batch is small),
    computed in the batch's dtype and on its device: what the benchmark times. In bfloat16 scores can
    tie or saturate at 1.0, and no threshold then gives the mix."""
    counts = torch.bincount(model.predict(batch, mode="mask").exit, minlength=model.num_exits).tolist()
    shares = [c / batch.shape[0] for c in counts[:-1]]
    tolerance = max(tolerance, 1 / batch.shape[0])
    if not all(abs(s - m) <= tolerance for s, m in zip(shares, MIX)):
        pytest.skip(f"the exit mix {MIX} does not hold in {batch.dtype} on {batch.device}: exits {counts} of "
                    f"{batch.shape[0]} samples (scores tie or saturate)")


def upstream_gradients(block: eefast.ExitBlock, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed dL/d (logits [B, K], confidence logits [B]) for an exit block on x: what the head's
    backward receives, so that the exit-head benchmarks time the head and nothing after it."""
    return upstream_gradients_of(x.shape[0], block.classifier.out_features, x.dtype, x.device)


def upstream_gradients_of(batch: int, classes: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return (torch.randn(batch, classes, generator=generator).to(device, dtype),
            torch.randn(batch, generator=generator).to(device, dtype))


def exit_block_training_step(block: eefast.ExitBlock, x: torch.Tensor):
    """``step()``: one training step of the block alone: the forward, then the gradients of x and of
    every parameter for fixed upstream gradients of its outputs (upstream_gradients)."""
    params = [x, *block.parameters()]
    grad_outputs = upstream_gradients(block, x)

    def step():
        return torch.autograd.grad(block(x), params, grad_outputs)
    return step
