"""Fused exit head: batch norm -> ReLU -> global average pool -> both linear heads, forward and backward.

Start with ``forward.py`` (the formula and the per-sample kernel), then ``backward.py`` (its VJP)
and ``statistics.py`` (the batch's statistics and the running update); ``common.py`` holds how
the kernels read a map, and ``op.py`` the PyTorch op (custom op, eager autograd, inference).
Arithmetic is in float32 (float64 for float64 inputs). Imports torch and triton only.
"""

from .common import CHANNELS_CONTIGUOUS, PIXELS_CONTIGUOUS, STRIDED, flat_strides, layout
from .op import HEADS_IN_KERNEL_MAX, ExitHeadFunction, exit_head_fused, exit_head_fused_backward, heads_in_kernel
from .op import inference
from .statistics import batch_stats, fused_running_update

__all__ = ["CHANNELS_CONTIGUOUS", "PIXELS_CONTIGUOUS", "STRIDED", "flat_strides", "layout", "HEADS_IN_KERNEL_MAX",
           "ExitHeadFunction", "exit_head_fused", "exit_head_fused_backward", "heads_in_kernel", "inference",
           "batch_stats", "fused_running_update"]
