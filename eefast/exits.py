"""ExitBlock: an early-exit block (Fig. 3.1) with a classifier and a confidence head."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from eefast import ops, reference


class ExitBlock(nn.Module):
    """An early exit: ``plain``, ``pool`` (default) or ``bnpool``, then two independent linear heads.

    ``forward(x [B, C, H, W]) -> (logits [B, K], conf_logits [B])``; softmax(logits) is the exit's
    prediction y_n and sigmoid(conf_logits) its confidence h_n. A ``plain`` exit flattens the
    feature map, so it needs its spatial size ``spatial=(H, W)``. ``impl`` picks the implementation
    of the head (None: Triton for CUDA tensors, eefast.reference otherwise; see eefast.ops).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        kind: str = "pool",
        spatial: tuple[int, ...] | None = None,
        impl: str | None = None,
    ):
        super().__init__()
        if kind not in reference.EXIT_KINDS:
            raise ValueError(f"ExitBlock: expected kind in {reference.EXIT_KINDS}, got {kind!r}")
        if in_channels < 1 or num_classes < 1:
            raise ValueError(
                f"ExitBlock: expected in_channels >= 1 and num_classes >= 1, got {in_channels} and {num_classes}"
            )
        if kind == "plain" and not spatial:
            raise ValueError("ExitBlock: a 'plain' exit flattens the feature map: give spatial=(H, W), got None")
        self.kind = kind
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.spatial = tuple(spatial) if spatial else None
        self.impl = impl
        features = in_channels * math.prod(self.spatial) if kind == "plain" else in_channels
        self.bn = nn.BatchNorm2d(in_channels) if kind == "bnpool" else None
        self.classifier = nn.Linear(features, num_classes)  # W1: C -> K
        self.confidence = nn.Linear(features, 1)  # w2: C -> 1
        self._folded_cache: tuple | None = None  # (key, folded parameters) for inference with the fused kernel

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() != 4 or x.shape[1] != self.in_channels or (self.spatial and tuple(x.shape[2:]) != self.spatial):
            expected = f"[B, {self.in_channels}, {', '.join(map(str, self.spatial)) if self.spatial else 'H, W'}]"
            raise ValueError(f"ExitBlock: expected input of shape {expected}, got {list(x.shape)}")
        bn = None
        if self.bn is not None:
            bn = reference.BatchNormArgs(
                self.bn.weight, self.bn.bias, self.bn.running_mean, self.bn.running_var,
                self.bn.training or self.bn.running_mean is None, self._bn_momentum(), self.bn.eps,
            )
        heads = (self.classifier.weight, self.classifier.bias, self.confidence.weight, self.confidence.bias)
        if ops.choose_impl(self.impl, x) == "reference":
            return ops.exit_head(x, self.kind, *heads, bn, impl="reference")
        if (torch.is_grad_enabled() or (bn is not None and bn.training) or torch.compiler.is_compiling()
                or (x.is_cuda and torch.cuda.is_current_stream_capturing())):
            # autograd and torch.compile follow the folding; a CUDA graph folds on every replay, so
            # it reads the parameters themselves (and sees in-place updates)
            return ops.exit_head(x, self.kind, *heads, bn, impl="triton")
        return ops.fused_exit_head(x, self.kind, *self._folded(x, heads, bn))

    def _folded(self, x: Tensor, heads: tuple[Tensor, ...], bn: reference.BatchNormArgs | None) -> tuple:
        """``ops.fold_exit_head``'s parameters, folded again only when a parameter or running
        statistic changed (in place: its version moves; or was replaced: its storage moves)."""
        sources = [*heads, *(bn[:4] if bn is not None else ())]
        key = (bn.eps if bn is not None else None,
               *((t.data_ptr(), t._version, t.dtype) for t in sources if t is not None))
        if self._folded_cache is None or self._folded_cache[0] != key:
            self._folded_cache = (key, ops.fold_exit_head(x, self.kind, *heads, bn))
        return self._folded_cache[1]

    def _bn_momentum(self) -> float:
        """nn.BatchNorm2d's momentum rule (momentum=None is a cumulative average)."""
        bn = self.bn
        if not (bn.training and bn.track_running_stats) or bn.num_batches_tracked is None:
            return 0.0 if bn.momentum is None else bn.momentum
        bn.num_batches_tracked.add_(1)
        return 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum

    def extra_repr(self) -> str:
        spatial = f", spatial={self.spatial}" if self.spatial else ""
        return f"{self.in_channels} -> {self.num_classes}, kind={self.kind!r}{spatial}"
