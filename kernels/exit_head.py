"""Fused exit head: batch norm -> ReLU -> global average pool -> both linear heads, forward and backward.

Top to bottom: the kernels, their launchers, the custom ops ``eefast::exit_head_fused`` (+ its
backward) registered with fake kernels and autograd, and the same autograd formula as a
``torch.autograd.Function`` for eager training.

Forward: one program per sample reads its feature map once, channel block by channel block
(NCHW or channels_last: any layout where h and w flatten into one stride), normalises it with
the batch norm's weight, bias, mean and variance (folded per channel in the kernel), rectifies,
pools, and applies the class head [K, C] and the confidence head [1, C] as one [K+1, C] matrix,
writing the class logits [B, K], the confidence logits [B] and the pooled features [B, C]
(float32, kept for the backward). A ``plain`` exit is the same kernel on x viewed as
[B, C*H*W, 1, 1]. Inference and eval mode normalise with the running statistics; training mode
with the batch's, from a statistics kernel (a program per channel, or per channel and part of
the batch, then a merge) whose results the op returns so that eefast.ops updates the running
statistics as nn.BatchNorm2d does.

Backward: one program per sample computes dL/d pooled from dL/d (logits, confidence) and the
heads, and writes dL/dx in x's layout and that sample's sums of dL/dz and dL/dz * x_hat (z the
normalised input of the ReLU); a reduce kernel (a program per block of channels) sums over the
batch dL/d heads, dL/d biases and those per-sample sums, whose totals are the gradients of the
batch norm's bias and weight. With batch statistics dL/dx needs the totals, so the per-sample
kernel runs twice: the sums, the reduce, then dL/dx. Heads over HEADS_IN_KERNEL_MAX weights get
their gradients from torch's matrix products instead (each per-sample program would read them all).

Inference (no autograd, no torch.compile) skips the custom op: ``exit_head_inference_launch``
runs the forward kernel on the parameters as stored, one launch and nothing else; eager training
runs ``ExitHeadEager``, the custom op's formula without the dispatcher's layers around each call.

Arithmetic is in float32 (float64 for float64 inputs).

Imports torch and triton only.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from .dtypes import compute_dtype, tl_dtype, written_dtype
from .launch import FastLauncher

# ---- kernels ---------------------------------------------------------------------------------


@triton.jit
def _batch_norm_fold(weight_ptr, bias_ptr, mean_ptr, var_ptr, channels, c_mask, eps, COMPUTE: tl.constexpr):
    """Batch norm per channel as z = x * scale + shift: (scale, shift, mean, rstd), each [BLOCK_C]."""
    mean = tl.load(mean_ptr + channels, mask=c_mask, other=0.0).to(COMPUTE)
    var = tl.load(var_ptr + channels, mask=c_mask, other=1.0).to(COMPUTE)
    rstd = 1.0 / tl.sqrt(var + eps)
    scale = tl.load(weight_ptr + channels, mask=c_mask, other=0.0).to(COMPUTE) * rstd
    shift = tl.load(bias_ptr + channels, mask=c_mask, other=0.0).to(COMPUTE) - mean * scale
    return scale, shift, mean, rstd


@triton.jit
def _merge_moments(count, mean, m2, n, tile_mean, tile_m2):
    """Chan et al.'s merge of (count, mean, sum of squared deviations) with another group's."""
    total = count + n
    delta = tile_mean - mean
    return total, mean + delta * (n / total), m2 + tile_m2 + delta * delta * (count * n / total)


_STATS_INTS = ["B", "C", "HW", "stride_b", "stride_c", "stride_hw", "rows_per_split"]


@triton.jit(do_not_specialize=_STATS_INTS, do_not_specialize_on_alignment=["x_ptr", "stats_ptr", "partials_ptr"])
def _batch_stats_kernel(
    x_ptr,  # [B, C, H*W] strides (stride_b, stride_c, stride_hw)
    stats_ptr,  # [3, C] out (not SPLIT): the batch's mean, biased variance and unbiased variance per channel
    partials_ptr,  # [3, S, C] out (SPLIT): count, mean less the shift, sum of squared deviations per split
    B, C, HW, stride_b, stride_c, stride_hw, rows_per_split,
    SPLIT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_HW: tl.constexpr, COMPUTE: tl.constexpr,
):
    """Program (c, s) takes channel c of samples [s * rows_per_split, (s + 1) * rows_per_split): tiles
    of [BLOCK_B samples, BLOCK_HW pixels] of the values less the channel's first value (so that sums
    stay at the scale of the spread, not of the mean), each tile's mean and sum of squared
    deviations in registers, merged across tiles as Chan et al. do (no cancellation from a sum of
    squares). One split writes the statistics; several write partials for the merge kernel."""
    c = tl.program_id(0)
    split = tl.program_id(1)
    x_channel = x_ptr + c.to(tl.int64) * stride_c
    shift = tl.load(x_channel).to(COMPUTE)
    count = tl.zeros([1], COMPUTE)
    mean = tl.zeros([1], COMPUTE)
    m2 = tl.zeros([1], COMPUTE)
    first = split * rows_per_split
    last = tl.minimum(first + rows_per_split, B)
    for b0 in range(first, last, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        for p0 in range(0, HW, BLOCK_HW):
            pixels = p0 + tl.arange(0, BLOCK_HW)
            mask = (rows < last)[:, None] & (pixels < HW)[None, :]
            x = tl.load(x_channel + rows[:, None].to(tl.int64) * stride_b + pixels[None, :] * stride_hw, mask=mask,
                        other=0.0).to(COMPUTE)
            x = tl.where(mask, x - shift, 0.0)
            n = tl.sum(tl.sum(mask.to(COMPUTE), axis=1), axis=0)
            tile_mean = tl.sum(tl.sum(x, axis=1), axis=0) / n
            deviation = tl.where(mask, x - tile_mean, 0.0)
            count, mean, m2 = _merge_moments(count, mean, m2, n, tile_mean,
                                             tl.sum(tl.sum(deviation * deviation, axis=1), axis=0))
    offsets = tl.arange(0, 1)
    if SPLIT:
        splits = tl.num_programs(1)
        tl.store(partials_ptr + split * C + c + offsets, count)
        tl.store(partials_ptr + (splits + split) * C + c + offsets, mean)
        tl.store(partials_ptr + (2 * splits + split) * C + c + offsets, m2)
    else:
        tl.store(stats_ptr + c + offsets, shift + mean)
        tl.store(stats_ptr + C + c + offsets, m2 / count)
        tl.store(stats_ptr + 2 * C + c + offsets, m2 / tl.maximum(count - 1.0, 1.0))


@triton.jit(do_not_specialize=["C", "S", "stride_c"],
            do_not_specialize_on_alignment=["x_ptr", "partials_ptr", "stats_ptr"])
def _batch_stats_merge_kernel(
    x_ptr,  # [B, C, H*W], for each channel's first value (the shift)
    partials_ptr,  # [3, S, C] from _batch_stats_kernel
    stats_ptr,  # [3, C] out: mean, biased variance, unbiased variance
    C, S, stride_c,
    BLOCK_C: tl.constexpr, COMPUTE: tl.constexpr,
):
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = channels < C
    count = tl.zeros([BLOCK_C], COMPUTE)
    mean = tl.zeros([BLOCK_C], COMPUTE)
    m2 = tl.zeros([BLOCK_C], COMPUTE)
    for split in range(0, S):
        n = tl.load(partials_ptr + split * C + channels, mask=c_mask, other=1.0)
        split_mean = tl.load(partials_ptr + (S + split) * C + channels, mask=c_mask, other=0.0)
        split_m2 = tl.load(partials_ptr + (2 * S + split) * C + channels, mask=c_mask, other=0.0)
        count, mean, m2 = _merge_moments(count, mean, m2, n, split_mean, split_m2)
    shift = tl.load(x_ptr + channels.to(tl.int64) * stride_c, mask=c_mask, other=0.0).to(COMPUTE)
    tl.store(stats_ptr + channels, shift + mean, mask=c_mask)
    tl.store(stats_ptr + C + channels, m2 / count, mask=c_mask)
    tl.store(stats_ptr + 2 * C + channels, m2 / tl.maximum(count - 1.0, 1.0), mask=c_mask)


_FORWARD_INTS = ["C", "HW", "K", "stride_b", "stride_c", "stride_hw"]
_FORWARD_POINTERS = ["x_ptr", "cls_weight_ptr", "cls_bias_ptr", "conf_weight_ptr", "conf_bias_ptr", "bn_weight_ptr",
                     "bn_bias_ptr", "mean_ptr", "var_ptr", "logits_ptr", "conf_ptr", "pooled_ptr"]


# No value-based specialisation: the binaries are launched again by key (kernels/launch.py).
@triton.jit(do_not_specialize=_FORWARD_INTS, do_not_specialize_on_alignment=_FORWARD_POINTERS)
def _exit_head_forward_kernel(
    x_ptr,  # [B, C, H*W] features, strides (stride_b, stride_c, stride_hw)
    cls_weight_ptr,  # [K, C] class head, contiguous
    cls_bias_ptr,  # [K]
    conf_weight_ptr,  # [1, C] confidence head (row K of the [K+1, C] matrix)
    conf_bias_ptr,  # [1]
    bn_weight_ptr,  # [C] (BN)
    bn_bias_ptr,  # [C] (BN)
    mean_ptr,  # [C] (BN) the running or the batch mean
    var_ptr,  # [C] (BN) the running or the batch (biased) variance
    logits_ptr,  # [B, K] out
    conf_ptr,  # [B] out
    pooled_ptr,  # [B, C] out, contiguous
    C, HW, K, stride_b, stride_c, stride_hw, eps,
    BN: tl.constexpr, RELU: tl.constexpr, HW_CONTIGUOUS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_K: tl.constexpr, COMPUTE: tl.constexpr,
):
    b = tl.program_id(0)
    x_row = x_ptr + b.to(tl.int64) * stride_b
    # 1. pool the (normalised, rectified) feature map, channel block by channel block
    for c0 in range(0, C, BLOCK_C):
        channels = c0 + tl.arange(0, BLOCK_C)
        c_mask = channels < C
        if BN:
            scale, shift, _, _ = _batch_norm_fold(bn_weight_ptr, bn_bias_ptr, mean_ptr, var_ptr, channels, c_mask,
                                                  eps, COMPUTE)
        total = tl.zeros([BLOCK_C], COMPUTE)
        for p0 in range(0, HW, BLOCK_HW):
            pixels = p0 + tl.arange(0, BLOCK_HW)
            mask = c_mask[:, None] & (pixels < HW)[None, :]
            pixel_offsets = pixels if HW_CONTIGUOUS else pixels * stride_hw
            x = tl.load(x_row + channels[:, None] * stride_c + pixel_offsets[None, :], mask=mask, other=0.0)
            z = x.to(COMPUTE)
            if BN:
                z = z * scale[:, None] + shift[:, None]
            if RELU:
                z = tl.maximum(z, 0.0)
            total += tl.sum(tl.where(mask, z, 0.0), axis=1)
        tl.store(pooled_ptr + b * C + channels, total / HW, mask=c_mask)
    tl.debug_barrier()  # this program reads back the pooled row it wrote
    # 2. both heads as one [K+1, C] matrix: rows 0..K-1 the class head, row K the confidence head
    for k0 in range(0, K + 1, BLOCK_K):
        rows = k0 + tl.arange(0, BLOCK_K)
        is_class = rows < K
        is_conf = rows == K
        acc = tl.zeros([BLOCK_K], COMPUTE)
        for c0 in range(0, C, BLOCK_C):
            channels = c0 + tl.arange(0, BLOCK_C)
            c_mask = channels < C
            pooled = tl.load(pooled_ptr + b * C + channels, mask=c_mask, other=0.0)
            w = tl.load(cls_weight_ptr + rows[:, None] * C + channels[None, :],
                        mask=is_class[:, None] & c_mask[None, :], other=0.0).to(COMPUTE)
            w += tl.load(conf_weight_ptr + (rows[:, None] - K) * C + channels[None, :],
                         mask=is_conf[:, None] & c_mask[None, :], other=0.0).to(COMPUTE)
            acc += tl.sum(w * pooled[None, :], axis=1)
        acc += tl.load(cls_bias_ptr + rows, mask=is_class, other=0.0).to(COMPUTE)
        acc += tl.load(conf_bias_ptr + (rows - K), mask=is_conf, other=0.0).to(COMPUTE)
        tl.store(logits_ptr + b * K + rows, acc.to(logits_ptr.dtype.element_ty), mask=is_class)
        tl.store(conf_ptr + b + (rows - K), acc.to(conf_ptr.dtype.element_ty), mask=is_conf)


@triton.jit
def _head_rows(grad_logits_ptr, grad_conf_ptr, samples, s_mask, rows, K, gl_stride_b, gl_stride_k, gc_stride,
               COMPUTE: tl.constexpr):
    """dL/d (logits, confidence logit) of the given samples as a [samples, rows] tile of the [B, K+1]
    matrix: rows 0..K-1 from grad_logits, row K from grad_conf."""
    is_class = rows < K
    g = tl.load(grad_logits_ptr + samples[:, None] * gl_stride_b + rows[None, :] * gl_stride_k,
                mask=s_mask[:, None] & is_class[None, :], other=0.0).to(COMPUTE)
    g += tl.load(grad_conf_ptr + samples[:, None] * gc_stride + (rows[None, :] - K),
                 mask=s_mask[:, None] & (rows == K)[None, :], other=0.0).to(COMPUTE)
    return g


_BACKWARD_INTS = ["B", "C", "HW", "K", "stride_b", "stride_c", "stride_hw", "gl_stride_b", "gl_stride_k", "gc_stride"]
_BACKWARD_POINTERS = ["grad_pooled_ptr", "grad_logits_ptr", "grad_conf_ptr", "cls_weight_ptr", "conf_weight_ptr",
                      "x_ptr", "bn_weight_ptr", "bn_bias_ptr", "mean_ptr", "var_ptr", "totals_ptr", "grad_x_ptr",
                      "partials_ptr"]


@triton.jit(do_not_specialize=_BACKWARD_INTS, do_not_specialize_on_alignment=_BACKWARD_POINTERS)
def _exit_head_backward_kernel(
    grad_pooled_ptr,  # [B, C] dL/d pooled, contiguous, float32/64 (unless HEADS_IN_KERNEL)
    grad_logits_ptr,  # [B, K] strides (gl_stride_b, gl_stride_k) (HEADS_IN_KERNEL)
    grad_conf_ptr,  # [B] stride gc_stride (HEADS_IN_KERNEL)
    cls_weight_ptr,  # [K, C] contiguous (HEADS_IN_KERNEL)
    conf_weight_ptr,  # [1, C] (HEADS_IN_KERNEL)
    x_ptr,  # [B, C, H*W] strides (stride_b, stride_c, stride_hw)
    bn_weight_ptr,  # [C] (BN)
    bn_bias_ptr,  # [C] (BN)
    mean_ptr,  # [C] (BN)
    var_ptr,  # [C] (BN)
    totals_ptr,  # [2, C] (BATCH_STATS and WRITE_GRAD_X): batch sums of dL/dz and of dL/dz * x_hat
    grad_x_ptr,  # [B, C, H*W] out (WRITE_GRAD_X), same strides as x
    partials_ptr,  # [2, B, C] out (WRITE_PARTIALS): this sample's sums of dL/dz and of dL/dz * x_hat
    B, C, HW, K, stride_b, stride_c, stride_hw, gl_stride_b, gl_stride_k, gc_stride, eps,
    BN: tl.constexpr, RELU: tl.constexpr, BATCH_STATS: tl.constexpr, HEADS_IN_KERNEL: tl.constexpr,
    WRITE_GRAD_X: tl.constexpr, WRITE_PARTIALS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_K: tl.constexpr, COMPUTE: tl.constexpr,
):
    tl.static_assert(BN or not (WRITE_PARTIALS or BATCH_STATS), "the per-sample sums are batch norm's")
    b = tl.program_id(0)
    x_row = x_ptr + b.to(tl.int64) * stride_b
    grad_x_row = grad_x_ptr + b.to(tl.int64) * stride_b
    count = tl.cast(B, COMPUTE) * tl.cast(HW, COMPUTE)  # values per channel in the batch
    for c0 in range(0, C, BLOCK_C):
        channels = c0 + tl.arange(0, BLOCK_C)
        c_mask = channels < C
        if HEADS_IN_KERNEL:  # dL/d pooled = dL/d [logits, conf] @ [K+1, C] heads
            grad_pool = tl.zeros([BLOCK_C], COMPUTE)
            for k0 in range(0, K + 1, BLOCK_K):
                rows = k0 + tl.arange(0, BLOCK_K)
                g = tl.sum(_head_rows(grad_logits_ptr, grad_conf_ptr, b + tl.arange(0, 1), tl.arange(0, 1) == 0, rows,
                                      K, gl_stride_b, gl_stride_k, gc_stride, COMPUTE), axis=0)  # [BLOCK_K]
                w = tl.load(cls_weight_ptr + rows[:, None] * C + channels[None, :],
                            mask=(rows < K)[:, None] & c_mask[None, :], other=0.0).to(COMPUTE)
                w += tl.load(conf_weight_ptr + (rows[:, None] - K) * C + channels[None, :],
                             mask=(rows == K)[:, None] & c_mask[None, :], other=0.0).to(COMPUTE)
                grad_pool += tl.sum(g[:, None] * w, axis=0)
            grad_pool = grad_pool / HW
        else:
            grad_pool = tl.load(grad_pooled_ptr + b * C + channels, mask=c_mask, other=0.0).to(COMPUTE) / HW
        if BN:
            scale, shift, mean, rstd = _batch_norm_fold(bn_weight_ptr, bn_bias_ptr, mean_ptr, var_ptr, channels,
                                                        c_mask, eps, COMPUTE)
            if BATCH_STATS and WRITE_GRAD_X:  # z = x_hat * w + b with x_hat from the batch's mean and variance
                total_g = tl.load(totals_ptr + channels, mask=c_mask, other=0.0).to(COMPUTE)
                total_g_xhat = tl.load(totals_ptr + C + channels, mask=c_mask, other=0.0).to(COMPUTE)
        sum_g = tl.zeros([BLOCK_C], COMPUTE)
        sum_g_xhat = tl.zeros([BLOCK_C], COMPUTE)
        for p0 in range(0, HW, BLOCK_HW):
            pixels = p0 + tl.arange(0, BLOCK_HW)
            mask = c_mask[:, None] & (pixels < HW)[None, :]
            offsets = channels[:, None] * stride_c + pixels[None, :] * stride_hw
            x = tl.load(x_row + offsets, mask=mask, other=0.0).to(COMPUTE)
            g = grad_pool[:, None] + tl.zeros([BLOCK_C, BLOCK_HW], COMPUTE)  # dL/dz
            if RELU:
                z = x
                if BN:
                    z = x * scale[:, None] + shift[:, None]
                g = tl.where(z > 0.0, g, 0.0)
            g = tl.where(mask, g, 0.0)
            if BN:
                x_hat = (x - mean[:, None]) * rstd[:, None]
            if WRITE_GRAD_X:
                grad_x = g
                if BN:
                    if BATCH_STATS:  # through the batch's mean and variance as well
                        grad_x = scale[:, None] * (g - (total_g[:, None] + x_hat * total_g_xhat[:, None]) / count)
                    else:
                        grad_x = g * scale[:, None]
                tl.store(grad_x_row + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
            if WRITE_PARTIALS:
                sum_g += tl.sum(g, axis=1)
                sum_g_xhat += tl.sum(tl.where(mask, g * x_hat, 0.0), axis=1)
        if WRITE_PARTIALS:
            tl.store(partials_ptr + b * C + channels, sum_g, mask=c_mask)
            tl.store(partials_ptr + B * C + b * C + channels, sum_g_xhat, mask=c_mask)


_REDUCE_INTS = ["B", "C", "K", "gl_stride_b", "gl_stride_k", "gc_stride"]
_REDUCE_POINTERS = ["grad_logits_ptr", "grad_conf_ptr", "pooled_ptr", "partials_ptr", "grad_weight_ptr",
                    "grad_bias_ptr", "totals_ptr"]


@triton.jit(do_not_specialize=_REDUCE_INTS, do_not_specialize_on_alignment=_REDUCE_POINTERS)
def _exit_head_reduce_kernel(
    grad_logits_ptr,  # [B, K] strides (gl_stride_b, gl_stride_k)
    grad_conf_ptr,  # [B] stride gc_stride
    pooled_ptr,  # [B, C] contiguous, float32/64
    partials_ptr,  # [2, B, C] (BN) per-sample sums from the backward kernel
    grad_weight_ptr,  # [K+1, C] out: dL/d heads (rows 0..K-1 the class head, row K the confidence head)
    grad_bias_ptr,  # [K+1] out
    totals_ptr,  # [2, C] out (BN): batch sums of the partials, dL/d (batch-norm bias, weight)
    B, C, K, gl_stride_b, gl_stride_k, gc_stride,
    BN: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, COMPUTE: tl.constexpr,
):
    """One program per block of channels: the sums over the batch that the heads' and the batch
    norm's gradients are (dL/d heads = dL/d out^T @ pooled, dL/d bias = column sums)."""
    pid = tl.program_id(0)
    channels = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = channels < C
    for k0 in range(0, K + 1, BLOCK_K):
        rows = k0 + tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_K, BLOCK_C], COMPUTE)
        bias = tl.zeros([BLOCK_K], COMPUTE)
        for b0 in range(0, B, BLOCK_B):
            samples = b0 + tl.arange(0, BLOCK_B)
            s_mask = samples < B
            g = _head_rows(grad_logits_ptr, grad_conf_ptr, samples, s_mask, rows, K, gl_stride_b, gl_stride_k,
                           gc_stride, COMPUTE)  # [BLOCK_B, BLOCK_K]
            pooled = tl.load(pooled_ptr + samples[:, None] * C + channels[None, :],
                             mask=s_mask[:, None] & c_mask[None, :], other=0.0)  # [BLOCK_B, BLOCK_C]
            acc += tl.sum(g[:, :, None] * pooled[:, None, :], axis=0)
            bias += tl.sum(g, axis=0)
        k_mask = rows < K + 1
        tl.store(grad_weight_ptr + rows[:, None] * C + channels[None, :], acc.to(grad_weight_ptr.dtype.element_ty),
                 mask=k_mask[:, None] & c_mask[None, :])
        tl.store(grad_bias_ptr + rows, bias.to(grad_bias_ptr.dtype.element_ty), mask=k_mask & (pid == 0))
    if BN:
        sum_g = tl.zeros([BLOCK_C], COMPUTE)
        sum_g_xhat = tl.zeros([BLOCK_C], COMPUTE)
        for b0 in range(0, B, BLOCK_B):
            samples = b0 + tl.arange(0, BLOCK_B)
            mask = (samples < B)[:, None] & c_mask[None, :]
            offsets = samples[:, None] * C + channels[None, :]
            sum_g += tl.sum(tl.load(partials_ptr + offsets, mask=mask, other=0.0), axis=0)
            sum_g_xhat += tl.sum(tl.load(partials_ptr + B * C + offsets, mask=mask, other=0.0), axis=0)
        tl.store(totals_ptr + channels, sum_g.to(totals_ptr.dtype.element_ty), mask=c_mask)
        tl.store(totals_ptr + C + channels, sum_g_xhat.to(totals_ptr.dtype.element_ty), mask=c_mask)


# ---- launchers -------------------------------------------------------------------------------

_launch_stats = FastLauncher(_batch_stats_kernel)
_launch_stats_merge = FastLauncher(_batch_stats_merge_kernel)
_launch_forward = FastLauncher(_exit_head_forward_kernel)
_launch_backward = FastLauncher(_exit_head_backward_kernel)
_launch_reduce = FastLauncher(_exit_head_reduce_kernel)

# Heads up to this many weights ((K+1) * C) have their gradients computed in the backward's own
# kernels (each program reads the whole [K+1, C] matrix); larger ones use torch's matrix products.
HEADS_IN_KERNEL_MAX = 16384


def _flat_strides(x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """x (made dense if need be) and its (batch, channel, pixel) strides with h, w flattened."""
    if x.stride(2) != x.shape[3] * x.stride(3) and x.shape[2] > 1:
        x = x.contiguous()
    return x, (x.stride(0), x.stride(1), x.stride(3))


@functools.lru_cache(maxsize=256)  # a host-time saving: computed once per shape
def _blocks(channels: int, pixels: int, heads: int = 1) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_HW, BLOCK_K)."""
    block_hw = min(triton.next_power_of_2(max(pixels, 1)), 256)
    block_c = max(1, min(triton.next_power_of_2(channels), 4096 // block_hw, 128))
    block_k = min(triton.next_power_of_2(heads), 64)
    return block_c, block_hw, block_k


# The statistics kernel splits the batch when a program per channel would leave the GPU mostly
# idle with much to read each: under STATS_PROGRAMS channels and over STATS_SPLIT_MIN values per channel.
STATS_PROGRAMS = 256
STATS_SPLIT_MIN = 16384


@functools.lru_cache(maxsize=256)
def _stats_blocks(batch: int, channels: int, pixels: int) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_HW, splits, rows per split) of the statistics kernel: tiles of up to 2048
    values, and the batch split so that about STATS_PROGRAMS programs run."""
    block_hw = min(triton.next_power_of_2(max(pixels, 1)), 256)
    block_b = min(triton.next_power_of_2(batch), max(1, 2048 // block_hw))
    if channels >= STATS_PROGRAMS or batch * pixels <= STATS_SPLIT_MIN:
        return block_b, block_hw, 1, batch
    splits = min(-(-batch // block_b), -(-STATS_PROGRAMS // channels))
    rows_per_split = -(-batch // splits // block_b) * block_b  # whole tiles
    return block_b, block_hw, -(-batch // rows_per_split), rows_per_split


@functools.lru_cache(maxsize=256)
def _reduce_blocks(channels: int, heads: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_K) of the reduce kernel (its BLOCK_B is 64): narrow channel blocks, so that
    even 64 channels make 8 programs, each with few steps over the batch."""
    return min(triton.next_power_of_2(channels), 8), min(triton.next_power_of_2(heads), 16)


def _check(x: Tensor, cls_weight: Tensor, cls_bias: Tensor, conf_weight: Tensor, conf_bias: Tensor,
           bn_tensors: tuple[Tensor | None, ...] = ()) -> None:
    if x.dim() != 4:
        raise ValueError(f"exit_head_fused: expected x of shape [B, C, H, W], got {list(x.shape)}")
    channels = x.shape[1]
    if cls_weight.dim() != 2 or cls_weight.shape[1] != channels or cls_bias.shape != (cls_weight.shape[0],):
        raise ValueError(
            f"exit_head_fused: expected cls_weight [K, {channels}] and cls_bias [K], got {list(cls_weight.shape)} "
            f"and {list(cls_bias.shape)}"
        )
    if conf_weight.shape != (1, channels) or conf_bias.shape != (1,):
        raise ValueError(f"exit_head_fused: expected conf_weight [1, {channels}] and conf_bias [1], "
                         f"got {list(conf_weight.shape)} and {list(conf_bias.shape)}")
    for tensor in bn_tensors:
        if tensor is not None and tensor.shape != (channels,):
            raise ValueError(f"exit_head_fused: expected batch-norm tensors of shape [{channels}], got {list(tensor.shape)}")


def _batch_norm_tensors(x, bn_weight, bn_bias, mean, var):
    """The four [C] tensors the kernels read (ones and zeros for a batch norm without affine
    parameters), or x four times (unread) without batch norm."""
    if mean is None:
        return x, x, x, x
    if bn_weight is None:
        bn_weight = torch.ones_like(mean)
    if bn_bias is None:
        bn_bias = torch.zeros_like(mean)
    return bn_weight, bn_bias, mean, var


def _forward(x, cls_weight, cls_bias, conf_weight, conf_bias, bn_weight, bn_bias, mean, var, eps, relu):
    """(logits [B, K], conf [B], pooled [B, C]); batch norm with (mean, var) unless mean is None."""
    batch, channels, height, width = x.shape
    classes = cls_weight.shape[0]
    x, (stride_b, stride_c, stride_hw) = _flat_strides(x)
    compute = compute_dtype(x.dtype)
    out_dtype = written_dtype(x.dtype)
    logits = torch.empty(batch, classes, dtype=out_dtype, device=x.device)
    conf = torch.empty(batch, dtype=out_dtype, device=x.device)
    pooled = torch.empty(batch, channels, dtype=compute, device=x.device)
    if batch > 0:
        block_c, block_hw, block_k = _blocks(channels, height * width, classes + 1)
        bn = mean is not None
        bn_tensors = _batch_norm_tensors(x, bn_weight, bn_bias, mean, var)
        cls_weight, cls_bias = cls_weight.contiguous(), cls_bias.contiguous()  # (no copy when they are)
        conf_weight, conf_bias = conf_weight.contiguous(), conf_bias.contiguous()
        hw_contiguous = stride_hw == 1
        bn_weight, bn_bias, mean, var = bn_tensors
        key = (x.dtype, cls_weight.dtype, cls_bias.dtype, conf_weight.dtype, conf_bias.dtype, bn_weight.dtype,
               bn_bias.dtype, mean.dtype, var.dtype, out_dtype, bn, relu, hw_contiguous, block_c, block_hw, block_k)
        _launch_forward(
            key, (batch,),
            (x, cls_weight, cls_bias, conf_weight, conf_bias, *bn_tensors, logits, conf, pooled,
             channels, height * width, classes, stride_b, stride_c, stride_hw, float(eps)),
            dict(BN=bn, RELU=relu, HW_CONTIGUOUS=hw_contiguous, BLOCK_C=block_c, BLOCK_HW=block_hw, BLOCK_K=block_k,
                 COMPUTE=tl_dtype(compute)),
        )
    if out_dtype != x.dtype:
        logits, conf = logits.to(x.dtype), conf.to(x.dtype)
    return logits, conf, pooled


def exit_head_inference_launch(x, cls_weight, cls_bias, conf_weight, conf_bias, bn_stats, relu):
    """(logits [B, K], conf [B]) for inference, from the parameters as they are stored and the
    batch norm's eval-mode state ``bn_stats = (weight, bias, running_mean, running_var, eps)`` (or
    None) folded in the kernel. One launch and no other work: nothing to fold again when the
    parameters change, and a CUDA graph of it reads the parameters themselves."""
    bn_weight, bn_bias, mean, var, eps = (None, None, None, None, 0.0) if bn_stats is None else bn_stats
    _check(x, cls_weight, cls_bias, conf_weight, conf_bias, (bn_weight, bn_bias, mean, var))
    return _forward(x, cls_weight, cls_bias, conf_weight, conf_bias, bn_weight, bn_bias, mean, var, eps, relu)[:2]


def batch_stats_launch(x: Tensor) -> Tensor:
    """[3, C]: the batch's mean, biased variance (what batch norm normalises with) and unbiased
    variance (what it keeps in running_var) per channel of x [B, C, H, W]; float32 (float64)."""
    batch, channels, height, width = x.shape
    x, (stride_b, stride_c, stride_hw) = _flat_strides(x)
    compute = compute_dtype(x.dtype)
    stats = torch.empty(3, channels, dtype=compute, device=x.device)
    if x.numel() == 0:
        stats.fill_(float("nan"))  # as torch.var_mean of no values
    else:
        block_b, block_hw, splits, rows_per_split = _stats_blocks(batch, channels, height * width)
        split = splits > 1
        partials = torch.empty(3, splits, channels, dtype=compute, device=x.device) if split else stats
        _launch_stats(
            (x.dtype, compute, split, block_b, block_hw), (channels, splits),
            (x, stats, partials, batch, channels, height * width, stride_b, stride_c, stride_hw, rows_per_split),
            dict(SPLIT=split, BLOCK_B=block_b, BLOCK_HW=block_hw, COMPUTE=tl_dtype(compute)),
        )
        if split:
            block_c = min(triton.next_power_of_2(channels), 128)
            _launch_stats_merge(
                (x.dtype, compute, block_c), (-(-channels // block_c),),
                (x, partials, stats, channels, splits, stride_c),
                dict(BLOCK_C=block_c, COMPUTE=tl_dtype(compute)),
            )
    return stats


def exit_head_forward_launch(x, cls_weight, cls_bias, conf_weight, conf_bias, bn_weight, bn_bias, running_mean,
                             running_var, eps, batch_stats, relu):
    """(logits [B, K], conf [B], pooled [B, C], batch statistics [3, C]). With ``batch_stats``
    batch norm uses the batch's mean and biased variance, returned with the unbiased variance
    (batch_stats_launch); otherwise the running statistics (if given), and the last output is [0, C]."""
    _check(x, cls_weight, cls_bias, conf_weight, conf_bias, (bn_weight, bn_bias, running_mean, running_var))
    if batch_stats:
        stats = batch_stats_launch(x)
        mean, var = stats[0], stats[1]
    else:
        mean, var = running_mean, running_var
        stats = x.new_empty(0, x.shape[1], dtype=compute_dtype(x.dtype))
    return (*_forward(x, cls_weight, cls_bias, conf_weight, conf_bias, bn_weight, bn_bias, mean, var, eps, relu),
            stats)


def exit_head_backward_launch(grad_logits, grad_conf, x, cls_weight, conf_weight, bn_weight, bn_bias, mean, var,
                              pooled, eps, batch_stats, relu):
    """(dL/dx in x's layout, dL/d heads [K+1, C], dL/d biases [K+1], dL/d batch-norm (bias, weight)
    [2, C] or [0, C] without batch norm). Small heads: the per-sample kernel (dL/dx, per-sample
    sums) and the reduce kernel (every sum over the batch), with the per-sample kernel again after
    the reduce when dL/dx needs the batch sums (batch statistics). Large heads: torch's matrix
    products for the heads, then the same per-sample launches."""
    batch, channels, height, width = x.shape
    classes = cls_weight.shape[0]
    x, (stride_b, stride_c, stride_hw) = _flat_strides(x)
    compute = pooled.dtype
    bn = mean is not None
    grad_x = torch.empty_strided(x.shape, x.stride(), dtype=written_dtype(x.dtype), device=x.device)
    partials = torch.empty((2, batch, channels) if bn else (0, 0, channels), dtype=compute, device=x.device)
    heads_in_kernel = (classes + 1) * channels <= HEADS_IN_KERNEL_MAX
    param_dtype = written_dtype(cls_weight.dtype)
    if heads_in_kernel:
        grad_pooled = pooled  # unread
        grad_weight = torch.empty(classes + 1, channels, dtype=param_dtype, device=x.device)
        grad_bias = torch.empty(classes + 1, dtype=param_dtype, device=x.device)
        totals = torch.empty((2 if bn else 0, channels), dtype=compute, device=x.device)
    else:
        grad_out = torch.cat([grad_logits, grad_conf[:, None]], dim=1).to(compute)  # [B, K+1]
        grad_pooled = grad_out @ torch.cat([cls_weight, conf_weight]).to(compute)  # [B, C]
        grad_weight = (grad_out.t() @ pooled).to(cls_weight.dtype)
        grad_bias = grad_out.sum(0).to(cls_weight.dtype)
    if batch == 0:
        grad_weight.zero_()
        grad_bias.zero_()
        totals = torch.zeros((2 if bn else 0, channels), dtype=compute, device=x.device)
    else:
        cls_weight, conf_weight = cls_weight.contiguous(), conf_weight.contiguous()
        block_c, block_hw, block_k = _blocks(channels, height * width, classes + 1)
        bn_tensors = _batch_norm_tensors(x, bn_weight, bn_bias, mean, var)
        head_strides = (grad_logits.stride(0), grad_logits.stride(1), grad_conf.stride(0))
        key = (compute, grad_logits.dtype, grad_conf.dtype, cls_weight.dtype, conf_weight.dtype, x.dtype,
               *(t.dtype for t in bn_tensors), grad_x.dtype, bn, relu, batch_stats, heads_in_kernel, block_c, block_hw,
               block_k)

        def per_sample(write_grad_x, write_partials, totals=partials):  # (totals are read only with batch statistics)
            _launch_backward(
                (*key, write_grad_x, write_partials), (batch,),
                (grad_pooled, grad_logits, grad_conf, cls_weight, conf_weight, x, *bn_tensors, totals, grad_x, partials,
                 batch, channels, height * width, classes, stride_b, stride_c, stride_hw, *head_strides, float(eps)),
                dict(BN=bn, RELU=relu, BATCH_STATS=batch_stats, HEADS_IN_KERNEL=heads_in_kernel,
                     WRITE_GRAD_X=write_grad_x, WRITE_PARTIALS=write_partials, BLOCK_C=block_c, BLOCK_HW=block_hw,
                     BLOCK_K=block_k, COMPUTE=tl_dtype(compute)),
            )

        def batch_sums():
            if not heads_in_kernel:
                return partials.sum(1)
            reduce_c, reduce_k = _reduce_blocks(channels, classes + 1)
            _launch_reduce(
                (grad_logits.dtype, grad_conf.dtype, compute, param_dtype, bn, reduce_c, reduce_k),
                (-(-channels // reduce_c),),  # cdiv (triton.cdiv takes 1.5 us of host time)
                (grad_logits, grad_conf, pooled, partials, grad_weight, grad_bias, totals,
                 batch, channels, classes, *head_strides),
                dict(BN=bn, BLOCK_B=64, BLOCK_C=reduce_c, BLOCK_K=reduce_k, COMPUTE=tl_dtype(compute)),
            )
            return totals

        if batch_stats:  # dL/dx needs the batch sums first
            per_sample(False, True)
            totals = batch_sums()
            per_sample(True, False, totals)
        else:
            per_sample(True, bn)
            totals = batch_sums()
    grad_bn = totals if bn_weight is None or totals.dtype == bn_weight.dtype else totals.to(bn_weight.dtype)
    return grad_x.to(x.dtype), grad_weight.to(cls_weight.dtype), grad_bias.to(cls_weight.dtype), grad_bn


# ---- the ops ---------------------------------------------------------------------------------


@torch.library.custom_op("eefast::exit_head_fused", mutates_args=())
def exit_head_fused(
    x: Tensor, cls_weight: Tensor, cls_bias: Tensor, conf_weight: Tensor, conf_bias: Tensor,
    bn_weight: Tensor | None, bn_bias: Tensor | None, running_mean: Tensor | None, running_var: Tensor | None,
    eps: float, batch_stats: bool, relu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(logits [B, K], conf [B], pooled [B, C], batch statistics [3, C] or [0, C]) of
    relu?(batch_norm?(x)) pooled, then both heads (see exit_head_forward_launch)."""
    return exit_head_forward_launch(x, cls_weight, cls_bias, conf_weight, conf_bias, bn_weight, bn_bias,
                                    running_mean, running_var, eps, batch_stats, relu)


@exit_head_fused.register_fake
def _(x, cls_weight, cls_bias, conf_weight, conf_bias, bn_weight, bn_bias, running_mean, running_var, eps,
      batch_stats, relu):
    _check(x, cls_weight, cls_bias, conf_weight, conf_bias, (bn_weight, bn_bias, running_mean, running_var))
    batch, channels = x.shape[:2]
    compute = compute_dtype(x.dtype)
    return (x.new_empty(batch, cls_weight.shape[0]), x.new_empty(batch), x.new_empty(batch, channels, dtype=compute),
            x.new_empty(3 if batch_stats else 0, channels, dtype=compute))


@torch.library.custom_op("eefast::exit_head_fused_backward", mutates_args=())
def exit_head_fused_backward(
    grad_logits: Tensor, grad_conf: Tensor, x: Tensor, cls_weight: Tensor, conf_weight: Tensor,
    bn_weight: Tensor | None, bn_bias: Tensor | None, mean: Tensor | None, var: Tensor | None, pooled: Tensor,
    eps: float, batch_stats: bool, relu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dL/dx in x's layout, dL/d heads [K+1, C], dL/d biases [K+1], dL/d batch-norm (bias, weight)
    [2, C], or [0, C] without batch norm)."""
    return exit_head_backward_launch(grad_logits, grad_conf, x, cls_weight, conf_weight, bn_weight, bn_bias, mean,
                                     var, pooled, eps, batch_stats, relu)


@exit_head_fused_backward.register_fake
def _(grad_logits, grad_conf, x, cls_weight, conf_weight, bn_weight, bn_bias, mean, var, pooled, eps, batch_stats,
      relu):
    grad_x = torch.empty_strided(x.shape, _flat_strides(x)[0].stride(), dtype=x.dtype, device=x.device)
    heads = cls_weight.shape[0] + 1
    channels = x.shape[1]
    bn_dtype = bn_weight.dtype if bn_weight is not None else pooled.dtype
    return (grad_x, cls_weight.new_empty(heads, channels), cls_weight.new_empty(heads),
            pooled.new_empty((2 if mean is not None else 0, channels), dtype=bn_dtype))


def _setup_context(ctx, inputs, output):
    x, cls_weight, _, conf_weight, _, bn_weight, bn_bias, running_mean, running_var, eps, batch_stats, relu = inputs
    _, _, pooled, stats = output
    mean, var = (stats[0], stats[1]) if batch_stats else (running_mean, running_var)
    ctx.eps, ctx.batch_stats, ctx.relu = eps, batch_stats, relu
    ctx.has_bn_weight, ctx.has_bn_bias = bn_weight is not None, bn_bias is not None
    ctx.save_for_backward(x, cls_weight, conf_weight, bn_weight, bn_bias, mean, var, pooled)
    ctx.mark_non_differentiable(pooled, stats)


def _backward(ctx, grad_logits, grad_conf, grad_pooled, grad_stats, backward=exit_head_fused_backward):
    x, cls_weight, conf_weight, bn_weight, bn_bias, mean, var, pooled = ctx.saved_tensors
    grad_logits = torch.zeros(pooled.shape[0], cls_weight.shape[0], dtype=x.dtype, device=x.device) \
        if grad_logits is None else grad_logits
    grad_conf = torch.zeros(pooled.shape[0], dtype=x.dtype, device=x.device) if grad_conf is None else grad_conf
    grad_x, grad_weight, grad_bias, grad_bn = backward(grad_logits, grad_conf, x, cls_weight, conf_weight, bn_weight,
                                                       bn_bias, mean, var, pooled, ctx.eps, ctx.batch_stats, ctx.relu)
    classes = cls_weight.shape[0]
    return (grad_x, grad_weight[:classes], grad_bias[:classes], grad_weight[classes:], grad_bias[classes:],
            grad_bn[1] if ctx.has_bn_weight else None, grad_bn[0] if ctx.has_bn_bias else None,
            None, None, None, None, None)


exit_head_fused.register_autograd(_backward, setup_context=_setup_context)


class ExitHeadEager(torch.autograd.Function):
    """``exit_head_fused`` for eager autograd: the same launchers, saved tensors and backward as the
    custom op, without the dispatcher's custom-op layers around each call (tens of microseconds
    of host time per step, more than the kernels run on a GPU). torch.compile and opcheck use the
    custom op."""

    @staticmethod
    def forward(ctx, *inputs):
        output = exit_head_forward_launch(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        if torch.is_grad_enabled():  # create_graph: the custom op, whose outputs say it has no double backward
            return _backward(ctx, *grads)
        return _backward(ctx, *grads, backward=exit_head_backward_launch)
