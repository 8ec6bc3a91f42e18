"""FLOP counts from torch.utils.flop_counter: of a module, and block by block along a backbone.

FlopCounterMode counts the matrix work (convolutions, linear layers, matmuls) at 2 FLOPs per
multiply-add; elementwise work (batch norm, ReLU, pooling) counts zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def _probe_input(module: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    """One zero input of ``input_shape`` ([C, H, W], no batch) on the module's device and dtype."""
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return torch.zeros(1, *input_shape, device=device, dtype=dtype)


class _EvalMode:
    """Puts modules in eval mode for the duration (batch norm then reads its running statistics)."""

    def __init__(self, *modules: nn.Module):
        self.modules = modules

    def __enter__(self):
        self.was_training = [m.training for m in self.modules]
        for m in self.modules:
            m.eval()

    def __exit__(self, *exc):
        for m, training in zip(self.modules, self.was_training):
            m.train(training)


def _counted(module: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        y = module(x)
    return counter.get_total_flops(), y


def count_flops(module: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one forward of ``module`` on one input of ``input_shape`` ([C, H, W]), eval mode, batch 1."""
    with _EvalMode(module):
        return _counted(module, _probe_input(module, input_shape))[0]


@dataclass(frozen=True)
class FlopProfile:
    """FLOPs of a backbone block by block, and the feature shape at each block boundary."""

    block_flops: tuple[int, ...]  # FLOPs of each block
    boundary_shapes: tuple[tuple[int, ...], ...]  # [C, H, W] output of each block (no batch)
    classifier_flops: int  # the final classifier on the last block's output

    @property
    def total(self) -> int:
        """FLOPs of the whole backbone without exits: every block and the classifier."""
        return sum(self.block_flops) + self.classifier_flops

    def cumulative(self, block: int) -> int:
        """FLOPs from the input to the output of ``block`` (inclusive)."""
        return sum(self.block_flops[: block + 1])


def flop_profile(blocks: Sequence[nn.Module], classifier: nn.Module, input_shape: Sequence[int]) -> FlopProfile:
    """Runs one input through ``blocks`` then ``classifier``, counting each one's FLOPs."""
    modules = [*blocks, classifier]
    with _EvalMode(*modules):
        x = _probe_input(nn.ModuleList(modules), input_shape)
        block_flops, shapes = [], []
        for block in blocks:
            flops, x = _counted(block, x)
            block_flops.append(flops)
            shapes.append(tuple(x.shape[1:]))
        classifier_flops, _ = _counted(classifier, x)
    return FlopProfile(tuple(block_flops), tuple(shapes), classifier_flops)
