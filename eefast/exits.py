"""ExitBlock: an early-exit block (Fig. 3.1) with a classifier and a confidence head."""

from __future__ import annotations

import math

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

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() != 4 or x.shape[1] != self.in_channels or (self.spatial and tuple(x.shape[2:]) != self.spatial):
            expected = f"[B, {self.in_channels}, {', '.join(map(str, self.spatial)) if self.spatial else 'H, W'}]"
            raise ValueError(f"ExitBlock: expected input of shape {expected}, got {list(x.shape)}")
        return ops.exit_head(x, self.kind, *self._heads(), self._bn_args(), impl=self.impl)

    def _heads(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        # the parameter dicts directly: nn.Module.__getattr__ costs ~0.5 us a lookup, host time
        # that a GPU's exit head (a few us) would wait for
        classifier, confidence = self._modules["classifier"]._parameters, self._modules["confidence"]._parameters
        return classifier["weight"], classifier["bias"], confidence["weight"], confidence["bias"]

    def _bn_args(self) -> reference.BatchNormArgs | None:
        bn = self._modules.get("bn")  # None (a plain attribute) unless bnpool
        if bn is None:
            return None
        params, buffers = bn._parameters, bn._buffers  # the dicts directly, as in _heads
        running_mean = buffers["running_mean"]
        return reference.BatchNormArgs(
            params["weight"], params["bias"], running_mean, buffers["running_var"],
            bn.training or running_mean is None, self._bn_momentum(bn, buffers["num_batches_tracked"]), bn.eps,
        )

    @staticmethod
    def _bn_momentum(bn: nn.BatchNorm2d, num_batches_tracked: Tensor | None) -> float:
        """nn.BatchNorm2d's momentum rule (momentum=None is a cumulative average)."""
        if not (bn.training and bn.track_running_stats) or num_batches_tracked is None:
            return 0.0 if bn.momentum is None else bn.momentum
        num_batches_tracked.add_(1)
        return 1.0 / float(num_batches_tracked) if bn.momentum is None else bn.momentum

    def extra_repr(self) -> str:
        spatial = f", spatial={self.spatial}" if self.spatial else ""
        return f"{self.in_channels} -> {self.num_classes}, kind={self.kind!r}{spatial}"
