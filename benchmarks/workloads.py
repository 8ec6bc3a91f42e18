"""The benchmark workloads: zoo models with a controlled exit mix on random 32x32 inputs, and the
exit-head training step.

Per-exit thresholds come from the confidences of a calibration batch so that 50 / 25 / 15 / 10 %
of its samples leave at successive exits (``eefast.EENet.thresholds_for_fractions``).
"""

from __future__ import annotations

import functools

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
    model.threshold = model.thresholds_for_fractions(batch, MIX)
    return model, batch


def head_loss(logits: torch.Tensor, conf: torch.Tensor) -> torch.Tensor:
    """The scalar the exit-head benchmarks differentiate: every output takes a gradient."""
    return logits.float().square().mean() + conf.float().mean()


def exit_block_training_step(block: eefast.ExitBlock, x: torch.Tensor):
    """``step()``: one training step of the block, the gradients of head_loss for x and every parameter."""
    params = [x, *block.parameters()]

    def step():
        return torch.autograd.grad(head_loss(*block(x)), params)
    return step
