"""Fused exit head: batch norm -> ReLU -> global average pool -> both linear heads, forward and backward.

Top to bottom: the kernels, their launchers, the custom ops ``eefast::exit_head_fused`` and
``eefast::exit_pool_fused`` (+ their backwards) registered with fake kernels and autograd, and the
same autograd formulas as ``torch.autograd.Function``s for eager training.

Forward: one program per sample reads its feature map once, channel block by channel block
(NCHW or channels_last: any layout where h and w flatten into one stride), normalises it with
the batch norm's weight, bias, mean and variance (folded per channel in the kernel), rectifies,
pools, and applies the class head [K, C] and the confidence head [1, C] as one [K+1, C] matrix,
writing the class logits [B, K], the confidence logits [B] and, for the backward, float32
per-sample rows [1 or 3, B, C]: the pooled features and, with batch norm, each channel's count of
values the ReLU passes and the sum of their x_hat. Heads over HEADS_IN_KERNEL_MAX weights, which
every program would read whole, are not the kernels' (``exit_pool_fused``): the forward writes the
pooled features [B, C] in x's dtype (and the per-sample sums without the pooled row), and torch's
linear layers apply the heads (eefast.ops), autograd their gradients; then, where a program per
sample would leave the GPU mostly idle with much to read each (a small batch of large maps), the
sample's channels are split over several programs (_channel_splits). A ``plain`` exit is the
same kernel on x viewed as [B, C*H*W, 1, 1]. Inference and eval mode normalise with the running
statistics; training mode with the batch's, from a statistics kernel (a program per channel, or
per channel and part of the batch; in channels_last per block of channels and part of the
positions), whose results the op returns. Split statistics are merged by the forward kernel
itself where the parts are few against the map each of its programs reads, and by a merge kernel
otherwise. The running statistics are updated as nn.BatchNorm2d does: by the statistics kernels
themselves in eager mode, by eefast.ops after the op under torch.compile.

Backward, one launch, or two with batch statistics. Within a sample and channel dL/dz (z the
normalised input of the ReLU) is dL/d pooled / HW wherever the ReLU passes, so every sum over
the batch follows from dL/d (logits, confidence), the heads and the forward's per-sample rows,
without reading x: reduce programs (one per block of channels) write dL/d heads, dL/d biases and
the batch norm's dL/d bias and weight (the batch sums of dL/dz and of dL/dz * x_hat), and one
program per sample writes dL/dx. With batch statistics dL/dx needs those sums, so the reduce
programs run first as a kernel of their own; otherwise they run in the same launch, unless the
per-sample programs split their sample's channels (by _channel_splits, heads or not). Without the
heads (exit_pool_fused) dL/d pooled is the backward's input.

Inference (no autograd, no torch.compile) skips the custom ops: ``exit_head_inference_launch``
(``exit_pool_inference_launch``) runs the forward kernel on the parameters as stored, one launch
and nothing else; eager training runs ``ExitHeadEager`` (``ExitPoolEager``), the custom op's
formula without the dispatcher's layers around each call.

Arithmetic is in float32 (float64 for float64 inputs).

Imports torch and triton only.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from .dtypes import compute_dtype, float32_pair, tl_dtype, written_dtype
from .launch import FastLauncher

# ---- kernels ---------------------------------------------------------------------------------


@triton.jit
def _load_statistics(mean_ptr, var_ptr, channels, c_mask, COMPUTE: tl.constexpr):
    """The batch norm's (mean, variance) of the channels, [BLOCK_C] each, as stored."""
    mean = tl.load(mean_ptr + channels, mask=c_mask, other=0.0).to(COMPUTE)
    var = tl.load(var_ptr + channels, mask=c_mask, other=1.0).to(COMPUTE)
    return mean, var


@triton.jit
def _batch_norm_fold(weight_ptr, bias_ptr, channels, c_mask, mean, var, eps, COMPUTE: tl.constexpr):
    """Batch norm per channel as z = x * scale + shift: (scale, shift, rstd), each [BLOCK_C]."""
    rstd = 1.0 / tl.sqrt(var + eps)
    scale = tl.load(weight_ptr + channels, mask=c_mask, other=0.0).to(COMPUTE) * rstd
    shift = tl.load(bias_ptr + channels, mask=c_mask, other=0.0).to(COMPUTE) - mean * scale
    return scale, shift, rstd


# How one sample's [C, H*W] feature map lies in memory (the LAYOUT of the kernels that read x)
STRIDED, PIXELS_CONTIGUOUS, CHANNELS_CONTIGUOUS = 0, 1, 2


@triton.jit
def _tile(row_ptr, channels, pixels, c_mask, HW, stride_c, stride_hw, LAYOUT: tl.constexpr, VEC: tl.constexpr):
    """(pointers, mask) of the [channels, pixels] tile of one sample's feature map at row_ptr, with
    the contiguous axis's stride written as 1 so that the compiler sees it. VEC > 1 promises that
    along that axis the elements come in 16-byte aligned groups of VEC, each wholly in or out of
    the map, so that the compiler issues 16-byte loads and stores: the strides and the base are
    not specialised on (kernels/launch.py), so it cannot know this by itself, and the launchers
    check it (_layout). The hints are set here, on values made here: on a function's arguments
    they would be lost."""
    mask = c_mask[:, None] & (pixels < HW)[None, :]
    if LAYOUT == 1:
        pointers = row_ptr + (channels[:, None] * stride_c + pixels[None, :])
        if VEC > 1:
            pointers = tl.max_contiguous(tl.multiple_of(pointers, [1, 16]), [1, VEC])
            mask = tl.max_constancy(mask, [1, VEC])
    elif LAYOUT == 2:
        pointers = row_ptr + (channels[:, None] + pixels[None, :] * stride_hw)
        if VEC > 1:
            pointers = tl.max_contiguous(tl.multiple_of(pointers, [16, 1]), [VEC, 1])
            mask = tl.max_constancy(mask, [VEC, 1])
    else:
        pointers = row_ptr + (channels[:, None] * stride_c + pixels[None, :] * stride_hw)
    return pointers, mask


@triton.jit
def _merge_moments(mean_a, m2_a, count_a, mean_b, m2_b, count_b):
    """Chan et al.'s merge of two groups' (mean, sum of squared deviations, count); empty groups
    (count 0) merge as nothing. Also the combine function of tl.reduce over Welford lanes."""
    count = count_a + count_b
    delta = mean_b - mean_a
    weight_b = tl.where(count == 0.0, 0.0, count_b / tl.where(count == 0.0, 1.0, count))
    return mean_a + delta * weight_b, m2_a + m2_b + delta * delta * count_a * weight_b, count


@triton.jit
def _update_running(running_mean_ptr, running_var_ptr, channels, c_mask, mean, unbiased_var, momentum_hi, momentum_lo,
                    COMPUTE: tl.constexpr):
    """nn.BatchNorm2d's update of the running statistics from the batch's, in place:
    running += momentum * (batch - running) (the momentum as two float32s, for float64)."""
    momentum = tl.cast(momentum_hi, COMPUTE) + tl.cast(momentum_lo, COMPUTE)
    running_mean = tl.load(running_mean_ptr + channels, mask=c_mask, other=0.0)
    running_var = tl.load(running_var_ptr + channels, mask=c_mask, other=0.0)
    new_mean = running_mean.to(COMPUTE) + momentum * (mean - running_mean.to(COMPUTE))
    new_var = running_var.to(COMPUTE) + momentum * (unbiased_var - running_var.to(COMPUTE))
    tl.store(running_mean_ptr + channels, new_mean.to(running_mean_ptr.dtype.element_ty), mask=c_mask)
    tl.store(running_var_ptr + channels, new_var.to(running_var_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _welford_add(count, mean, m2, x, mask):
    """Each lane's Welford (count, mean, sum of squared deviations) after its value in x; masked
    lanes keep theirs."""
    count += mask.to(count.dtype)
    delta = tl.where(mask, x - mean, 0.0)
    mean += delta / tl.maximum(count, 1.0)
    return count, mean, m2 + delta * (x - mean)


@triton.jit
def _statistics_of(count, mean, m2, shift):
    """(mean, biased variance, unbiased variance) from a Welford (count, mean less the shift, sum of
    squared deviations); count is 0 only for channels past C."""
    return shift + mean, m2 / tl.maximum(count, 1.0), m2 / tl.maximum(count - 1.0, 1.0)


@triton.jit
def _merge_partials(partials_ptr, channels, c_mask, C, S, BLOCK_S: tl.constexpr, COMPUTE: tl.constexpr):
    """(mean less the shift, sum of squared deviations, count) of the channels, [BLOCK_C] each, from
    the S splits' partials [3, S, C]: a tile of [BLOCK_S splits, channels] at a time, merged as a
    tree (tl.reduce), so that S splits take S / BLOCK_S dependent steps, not S."""
    mean = tl.zeros(channels.shape, COMPUTE)
    m2 = tl.zeros(channels.shape, COMPUTE)
    count = tl.zeros(channels.shape, COMPUTE)
    for s0 in range(0, S, BLOCK_S):
        splits = s0 + tl.arange(0, BLOCK_S)
        mask = (splits < S)[:, None] & c_mask[None, :]
        offsets = splits[:, None] * C + channels[None, :]
        part_count = tl.load(partials_ptr + offsets, mask=mask, other=0.0)  # (empty groups merge as nothing)
        part_mean = tl.load(partials_ptr + S * C + offsets, mask=mask, other=0.0)
        part_m2 = tl.load(partials_ptr + 2 * S * C + offsets, mask=mask, other=0.0)
        part_mean, part_m2, part_count = tl.reduce((part_mean, part_m2, part_count), 0, _merge_moments)
        mean, m2, count = _merge_moments(mean, m2, count, part_mean, part_m2, part_count)
    return mean, m2, count


@triton.jit
def _store_statistics(stats_ptr, partials_ptr, running_mean_ptr, running_var_ptr, channels, c_mask, C, count, mean,
                      m2, shift, momentum_hi, momentum_lo, SPLIT: tl.constexpr, UPDATE: tl.constexpr,
                      COMPUTE: tl.constexpr):
    """A statistics program's result for its channels: with SPLIT its part's (count, mean less the
    shift, sum of squared deviations) into partials [3, S, C] at split program_id(1); otherwise
    the channels' mean, biased and unbiased variance into stats [3, C], and with UPDATE the running
    statistics."""
    if SPLIT:
        split = tl.program_id(1)
        splits = tl.num_programs(1)
        tl.store(partials_ptr + split * C + channels, count, mask=c_mask)
        tl.store(partials_ptr + (splits + split) * C + channels, mean, mask=c_mask)
        tl.store(partials_ptr + (2 * splits + split) * C + channels, m2, mask=c_mask)
    else:
        batch_mean, batch_var, unbiased_var = _statistics_of(count, mean, m2, shift)
        tl.store(stats_ptr + channels, batch_mean, mask=c_mask)
        tl.store(stats_ptr + C + channels, batch_var, mask=c_mask)
        tl.store(stats_ptr + 2 * C + channels, unbiased_var, mask=c_mask)
        if UPDATE:
            _update_running(running_mean_ptr, running_var_ptr, channels, c_mask, batch_mean, unbiased_var,
                            momentum_hi, momentum_lo, COMPUTE)


_STATS_INTS = ["B", "C", "HW", "stride_b", "stride_c", "stride_hw", "rows_per_split"]


_STATS_POINTERS = ["x_ptr", "stats_ptr", "partials_ptr", "running_mean_ptr", "running_var_ptr"]


@triton.jit(do_not_specialize=_STATS_INTS, do_not_specialize_on_alignment=_STATS_POINTERS)
def _batch_stats_kernel(
    x_ptr,  # [B, C, H*W] strides (stride_b, stride_c, stride_hw)
    stats_ptr,  # [3, C] out (not SPLIT): the batch's mean, biased variance and unbiased variance per channel
    partials_ptr,  # [3, S, C] out (SPLIT): count, mean less the shift, sum of squared deviations per split
    running_mean_ptr,  # [C] updated in place (UPDATE and not SPLIT)
    running_var_ptr,  # [C] updated in place (UPDATE and not SPLIT)
    B, C, HW, stride_b, stride_c, stride_hw, rows_per_split, momentum_hi, momentum_lo,
    SPLIT: tl.constexpr, UPDATE: tl.constexpr, LAYOUT: tl.constexpr, VEC: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_HW: tl.constexpr, COMPUTE: tl.constexpr,
):
    """Program (c, s) takes channel c of samples [s * rows_per_split, (s + 1) * rows_per_split) in
    tiles of [BLOCK_B samples, BLOCK_HW pixels]. Each lane of the tile keeps a Welford (mean, sum of
    squared deviations, count) of the values it reads, less the channel's first value (so that
    they stay at the scale of the spread, not of the mean): the loop is elementwise, with no
    reduction inside it, and the lanes are merged once at the end as Chan et al. merge groups (no
    cancellation from a sum of squares). One split writes the statistics; several write partials
    for the merge kernel."""
    tl.static_assert(LAYOUT != 2, "a tile's rows are samples, never the contiguous axis")
    c = tl.program_id(0)
    split = tl.program_id(1)
    x_channel = x_ptr + c.to(tl.int64) * stride_c
    shift = tl.load(x_channel).to(COMPUTE)
    count = tl.zeros([BLOCK_B, BLOCK_HW], COMPUTE)
    mean = tl.zeros([BLOCK_B, BLOCK_HW], COMPUTE)
    m2 = tl.zeros([BLOCK_B, BLOCK_HW], COMPUTE)
    first = split * rows_per_split
    last = tl.minimum(first + rows_per_split, B)
    for b0 in range(first, last, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        for p0 in range(0, HW, BLOCK_HW):
            pixels = p0 + tl.arange(0, BLOCK_HW)
            # (the tile's rows are samples: the same offsets with stride_b as the row stride)
            pointers, mask = _tile(x_channel, rows.to(tl.int64), pixels, rows < last, HW, stride_b, stride_hw, LAYOUT,
                                   VEC)
            x = tl.load(pointers, mask=mask, other=0.0).to(COMPUTE) - shift
            count, mean, m2 = _welford_add(count, mean, m2, x, mask)
    mean, m2, count = tl.reduce((mean, m2, count), 1, _merge_moments)
    mean, m2, count = tl.reduce((mean, m2, count), 0, _merge_moments)
    one = tl.arange(0, 1)  # (the stores take [1] tensors)
    zero = tl.zeros([1], COMPUTE)
    _store_statistics(stats_ptr, partials_ptr, running_mean_ptr, running_var_ptr, c + one, one == 0, C, count + zero,
                      mean + zero, m2 + zero, shift + zero, momentum_hi, momentum_lo, SPLIT, UPDATE, COMPUTE)


_STATS_CHANNELS_INTS = ["C", "HW", "N", "stride_b", "stride_hw", "positions_per_split"]


@triton.jit(do_not_specialize=_STATS_CHANNELS_INTS, do_not_specialize_on_alignment=_STATS_POINTERS)
def _batch_stats_channels_kernel(
    x_ptr,  # [B, C, H*W] with channels contiguous (stride 1), batch and pixel strides (stride_b, stride_hw)
    stats_ptr,  # [3, C] out (not SPLIT): as _batch_stats_kernel's
    partials_ptr,  # [3, S, C] out (SPLIT): as _batch_stats_kernel's
    running_mean_ptr,  # [C] updated in place (UPDATE and not SPLIT)
    running_var_ptr,  # [C] updated in place (UPDATE and not SPLIT)
    C, HW, N, stride_b, stride_hw, positions_per_split, momentum_hi, momentum_lo,
    SPLIT: tl.constexpr, UPDATE: tl.constexpr, VEC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    """_batch_stats_kernel for a channels-contiguous map (channels_last): program (j, s) takes
    channels [j * BLOCK_C, (j + 1) * BLOCK_C) of the positions (sample, pixel) numbered
    [s * positions_per_split, ...), in tiles of [BLOCK_N positions, BLOCK_C channels] whose rows are
    contiguous in memory. Welford per lane as there, shifted by each channel's first value."""
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = channels < C
    split = tl.program_id(1)
    shift = tl.load(x_ptr + channels, mask=c_mask, other=0.0).to(COMPUTE)  # x[0, c, 0]
    count = tl.zeros([BLOCK_N, BLOCK_C], COMPUTE)
    mean = tl.zeros([BLOCK_N, BLOCK_C], COMPUTE)
    m2 = tl.zeros([BLOCK_N, BLOCK_C], COMPUTE)
    first = split * positions_per_split
    last = tl.minimum(first + positions_per_split, N)
    for n0 in range(first, last, BLOCK_N):
        positions = n0 + tl.arange(0, BLOCK_N)
        rows = (positions // HW).to(tl.int64) * stride_b + (positions % HW) * stride_hw  # [BLOCK_N] offsets
        # (a [rows, channels] tile with the channels as _tile's contiguous axis, LAYOUT 1: row stride 1 on
        # these offsets)
        pointers, mask = _tile(x_ptr, rows, channels, positions < last, C, 1, 1, 1, VEC)
        x = tl.load(pointers, mask=mask, other=0.0).to(COMPUTE) - shift[None, :]
        count, mean, m2 = _welford_add(count, mean, m2, x, mask)
    mean, m2, count = tl.reduce((mean, m2, count), 0, _merge_moments)  # [BLOCK_C] each
    _store_statistics(stats_ptr, partials_ptr, running_mean_ptr, running_var_ptr, channels, c_mask, C, count, mean,
                      m2, shift, momentum_hi, momentum_lo, SPLIT, UPDATE, COMPUTE)


@triton.jit(do_not_specialize=["C", "S", "stride_c"],
            do_not_specialize_on_alignment=["x_ptr", "partials_ptr", "stats_ptr", "running_mean_ptr",
                                            "running_var_ptr"])
def _batch_stats_merge_kernel(
    x_ptr,  # [B, C, H*W], for each channel's first value (the shift)
    partials_ptr,  # [3, S, C] from the statistics kernels
    stats_ptr,  # [3, C] out: mean, biased variance, unbiased variance
    running_mean_ptr,  # [C] updated in place (UPDATE)
    running_var_ptr,  # [C] updated in place (UPDATE)
    C, S, stride_c, momentum_hi, momentum_lo,
    UPDATE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, COMPUTE: tl.constexpr,
):
    """One program per block of channels merges their partials (where the forward kernel would
    read too many of them to merge them itself: _merge_in_forward)."""
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = channels < C
    mean, m2, count = _merge_partials(partials_ptr, channels, c_mask, C, S, BLOCK_S, COMPUTE)
    shift = tl.load(x_ptr + channels.to(tl.int64) * stride_c, mask=c_mask, other=0.0).to(COMPUTE)
    _store_statistics(stats_ptr, partials_ptr, running_mean_ptr, running_var_ptr, channels, c_mask, C, count, mean,
                      m2, shift, momentum_hi, momentum_lo, False, UPDATE, COMPUTE)


@triton.jit
def _channel_range(split, splits, C, BLOCK_C: tl.constexpr):
    """[begin, end) of the channels of one of ``splits`` programs sharing a sample: whole channel
    blocks, as _channel_splits counts them."""
    per_program = tl.cdiv(tl.cdiv(C, splits), BLOCK_C) * BLOCK_C
    begin = split * per_program
    return begin, tl.minimum(begin + per_program, C)


@triton.jit
def _heads_forward(pooled_ptr, cls_weight_ptr, cls_bias_ptr, conf_weight_ptr, conf_bias_ptr, logits_ptr, conf_ptr,
                   C, K, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, COMPUTE: tl.constexpr):
    """One sample's class logits [K] and confidence logit from its pooled features [C] (which this
    program has just written) and both heads as one [K+1, C] matrix: rows 0..K-1 the class head,
    row K the confidence head."""
    tl.debug_barrier()  # the pooled row is read back by other threads than wrote it
    for k0 in range(0, K + 1, BLOCK_K):
        rows = k0 + tl.arange(0, BLOCK_K)
        is_class = rows < K
        is_conf = rows == K
        acc = tl.zeros([BLOCK_K], COMPUTE)
        for c0 in range(0, C, BLOCK_C):
            channels = c0 + tl.arange(0, BLOCK_C)
            c_mask = channels < C
            pooled = tl.load(pooled_ptr + channels, mask=c_mask, other=0.0)
            w = tl.load(cls_weight_ptr + rows[:, None] * C + channels[None, :],
                        mask=is_class[:, None] & c_mask[None, :], other=0.0).to(COMPUTE)
            w += tl.load(conf_weight_ptr + (rows[:, None] - K) * C + channels[None, :],
                         mask=is_conf[:, None] & c_mask[None, :], other=0.0).to(COMPUTE)
            acc += tl.sum(w * pooled[None, :], axis=1)
        acc += tl.load(cls_bias_ptr + rows, mask=is_class, other=0.0).to(COMPUTE)
        acc += tl.load(conf_bias_ptr + (rows - K), mask=is_conf, other=0.0).to(COMPUTE)
        tl.store(logits_ptr + rows, acc.to(logits_ptr.dtype.element_ty), mask=is_class)
        tl.store(conf_ptr + (rows - K), acc.to(conf_ptr.dtype.element_ty), mask=is_conf)


_FORWARD_INTS = ["C", "HW", "K", "S", "stride_b", "stride_c", "stride_hw"]
_FORWARD_POINTERS = ["x_ptr", "cls_weight_ptr", "cls_bias_ptr", "conf_weight_ptr", "conf_bias_ptr", "bn_weight_ptr",
                     "bn_bias_ptr", "mean_ptr", "var_ptr", "partials_ptr", "stats_ptr", "running_mean_ptr",
                     "running_var_ptr", "logits_ptr", "conf_ptr", "per_sample_ptr"]


# No value-based specialisation: the binaries are launched again by key (kernels/launch.py).
@triton.jit(do_not_specialize=_FORWARD_INTS, do_not_specialize_on_alignment=_FORWARD_POINTERS)
def _exit_head_forward_kernel(
    x_ptr,  # [B, C, H*W] features, strides (stride_b, stride_c, stride_hw)
    cls_weight_ptr,  # [K, C] class head, contiguous (HEADS_IN_KERNEL)
    cls_bias_ptr,  # [K] (HEADS_IN_KERNEL)
    conf_weight_ptr,  # [1, C] confidence head, row K of the [K+1, C] matrix (HEADS_IN_KERNEL)
    conf_bias_ptr,  # [1] (HEADS_IN_KERNEL)
    bn_weight_ptr,  # [C] (BN)
    bn_bias_ptr,  # [C] (BN)
    mean_ptr,  # [C] (BN, not MERGE) the running or the batch mean
    var_ptr,  # [C] (BN, not MERGE) the running or the batch (biased) variance
    partials_ptr,  # [3, S, C] (MERGE) the statistics kernel's partials of the batch statistics
    stats_ptr,  # [3, C] out (MERGE, program 0): the batch's mean, biased and unbiased variance
    running_mean_ptr,  # [C] updated in place (MERGE and UPDATE, program 0)
    running_var_ptr,  # [C] updated in place (MERGE and UPDATE, program 0)
    logits_ptr,  # [B, K] out (HEADS_IN_KERNEL); without the heads [B, C] out, contiguous: the pooled features
    #              in its dtype (exit_pool_fused)
    conf_ptr,  # [B] out (HEADS_IN_KERNEL)
    per_sample_ptr,  # [1 or 3, B, C] out, contiguous, float32/64: pooled, which the heads read back; (BN_SUMS) passed
    #                  count, x_hat sum. Without the heads [2 or 0, B, C]: the sums alone
    C, HW, K, S, stride_b, stride_c, stride_hw, eps, momentum_hi, momentum_lo,
    BN: tl.constexpr, RELU: tl.constexpr, BN_SUMS: tl.constexpr, MERGE: tl.constexpr, UPDATE: tl.constexpr,
    HEADS_IN_KERNEL: tl.constexpr, LAYOUT: tl.constexpr, VEC: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, COMPUTE: tl.constexpr,
):
    """One program per sample: the pooled features, then (HEADS_IN_KERNEL) both heads on them; heads
    too large to read once per sample are left to torch's linear layers on the pooled features
    (eefast.ops.exit_head), and each program then pools a share of its sample's channels, along
    the grid's second axis (_channel_splits). With BN_SUMS it also writes, per channel, what the batch norm's
    gradients need of x: how many values the ReLU passes and the sum of their x_hat. With MERGE
    each program merges the batch statistics from the split statistics kernel's partials itself
    (a launch fewer than the merge kernel), and program 0 writes them (and with UPDATE updates the
    running statistics) as the merge kernel would."""
    tl.static_assert(BN or not BN_SUMS, "the per-sample sums are batch norm's")
    tl.static_assert(BN or not MERGE, "the statistics are batch norm's")
    b = tl.program_id(0)
    x_row = x_ptr + b.to(tl.int64) * stride_b
    # (the pooled features' pointer is one of these, not one more argument: that one spills 8 bytes on
    # sm_90 in the fp32 8x8 forward that merges the statistics)
    if HEADS_IN_KERNEL:
        pooled_ptr = per_sample_ptr
        sums_ptr = per_sample_ptr + tl.num_programs(0) * C
        c_begin = 0
        c_end = C
    else:  # the sample's channels may be split over the grid's second axis (_channel_splits)
        pooled_ptr = logits_ptr
        sums_ptr = per_sample_ptr
        c_begin, c_end = _channel_range(tl.program_id(1), tl.num_programs(1), C, BLOCK_C)
    # 1. pool the (normalised, rectified) feature map, channel block by channel block
    for c0 in range(c_begin, c_end, BLOCK_C):
        channels = c0 + tl.arange(0, BLOCK_C)
        c_mask = channels < C
        if BN:
            if MERGE:
                merged_mean, m2, count = _merge_partials(partials_ptr, channels, c_mask, C, S, BLOCK_S, COMPUTE)
                first = tl.load(x_ptr + channels.to(tl.int64) * stride_c, mask=c_mask, other=0.0).to(COMPUTE)
                mean, var, _ = _statistics_of(count, merged_mean, m2, first)
                _store_statistics(stats_ptr, partials_ptr, running_mean_ptr, running_var_ptr, channels,
                                  c_mask & (b == 0), C, count, merged_mean, m2, first, momentum_hi, momentum_lo, False,
                                  UPDATE, COMPUTE)
            else:
                mean, var = _load_statistics(mean_ptr, var_ptr, channels, c_mask, COMPUTE)
            scale, shift, rstd = _batch_norm_fold(bn_weight_ptr, bn_bias_ptr, channels, c_mask, mean, var, eps, COMPUTE)
        total = tl.zeros([BLOCK_C], COMPUTE)
        passed_count = tl.zeros([BLOCK_C], COMPUTE)
        passed_x_hat = tl.zeros([BLOCK_C], COMPUTE)
        for p0 in range(0, HW, BLOCK_HW):
            pixels = p0 + tl.arange(0, BLOCK_HW)
            pointers, mask = _tile(x_row, channels, pixels, c_mask, HW, stride_c, stride_hw, LAYOUT, VEC)
            x = tl.load(pointers, mask=mask, other=0.0)
            z = x.to(COMPUTE)
            if BN:
                z = z * scale[:, None] + shift[:, None]
            passed = mask
            if RELU:
                passed = mask & (z > 0.0)
            total += tl.sum(tl.where(passed, z, 0.0), axis=1)
            if BN_SUMS:
                passed_count += tl.sum(passed.to(COMPUTE), axis=1)
                x_hat = (x.to(COMPUTE) - mean[:, None]) * rstd[:, None]
                passed_x_hat += tl.sum(tl.where(passed, x_hat, 0.0), axis=1)
        tl.store(pooled_ptr + b * C + channels, (total / HW).to(pooled_ptr.dtype.element_ty), mask=c_mask)
        if BN_SUMS:
            rows = tl.num_programs(0) * C
            tl.store(sums_ptr + b * C + channels, passed_count, mask=c_mask)
            tl.store(sums_ptr + rows + b * C + channels, passed_x_hat, mask=c_mask)
    if HEADS_IN_KERNEL:
        _heads_forward(pooled_ptr + b * C, cls_weight_ptr, cls_bias_ptr, conf_weight_ptr, conf_bias_ptr,
                       logits_ptr + b * K, conf_ptr + b, C, K, BLOCK_C, BLOCK_K, COMPUTE)


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


@triton.jit
def _grad_pooled(grad_logits_ptr, grad_conf_ptr, cls_weight_ptr, conf_weight_ptr, samples, s_mask, channels, c_mask,
                 C, K, gl_stride_b, gl_stride_k, gc_stride, BLOCK_K: tl.constexpr, COMPUTE: tl.constexpr):
    """dL/d pooled of the given samples and channels, [samples, channels]: dL/d [logits, conf] @ the
    [K+1, C] heads."""
    grad = tl.zeros([samples.shape[0], channels.shape[0]], COMPUTE)
    for k0 in range(0, K + 1, BLOCK_K):
        rows = k0 + tl.arange(0, BLOCK_K)
        g = _head_rows(grad_logits_ptr, grad_conf_ptr, samples, s_mask, rows, K, gl_stride_b, gl_stride_k,
                       gc_stride, COMPUTE)  # [samples, BLOCK_K]
        w = tl.load(cls_weight_ptr + rows[:, None] * C + channels[None, :],
                    mask=(rows < K)[:, None] & c_mask[None, :], other=0.0).to(COMPUTE)
        w += tl.load(conf_weight_ptr + (rows[:, None] - K) * C + channels[None, :],
                     mask=(rows == K)[:, None] & c_mask[None, :], other=0.0).to(COMPUTE)  # [BLOCK_K, channels]
        grad += tl.sum(g[:, :, None] * w[None, :, :], axis=1)
    return grad


@triton.jit
def _grad_x_program(b, B, grad_pooled_ptr, grad_logits_ptr, grad_conf_ptr, cls_weight_ptr, conf_weight_ptr, x_ptr,
                    bn_weight_ptr, bn_bias_ptr, mean_ptr, var_ptr, totals_ptr, grad_x_ptr, C, HW, K, stride_b,
                    stride_c, stride_hw, gl_stride_b, gl_stride_k, gc_stride, eps,
                    BN: tl.constexpr, RELU: tl.constexpr, BATCH_STATS: tl.constexpr, HEADS_IN_KERNEL: tl.constexpr,
                    LAYOUT: tl.constexpr, VEC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
                    BLOCK_K: tl.constexpr, COMPUTE: tl.constexpr, SPLIT: tl.constexpr):
    """Sample b's dL/dx (with x's strides, so VEC holds for it as for x), or with SPLIT its share of
    the channels where the grid's second axis splits them (_channel_splits)."""
    x_row = x_ptr + b.to(tl.int64) * stride_b
    grad_x_row = grad_x_ptr + b.to(tl.int64) * stride_b
    count = tl.cast(B, COMPUTE) * tl.cast(HW, COMPUTE)  # values per channel in the batch
    sample = b + tl.arange(0, 1)
    if SPLIT:
        c_begin, c_end = _channel_range(tl.program_id(1), tl.num_programs(1), C, BLOCK_C)
    else:
        c_begin = 0
        c_end = C
    for c0 in range(c_begin, c_end, BLOCK_C):
        channels = c0 + tl.arange(0, BLOCK_C)
        c_mask = channels < C
        if HEADS_IN_KERNEL:
            grad_pool = tl.sum(_grad_pooled(grad_logits_ptr, grad_conf_ptr, cls_weight_ptr, conf_weight_ptr, sample,
                                            sample >= 0, channels, c_mask, C, K, gl_stride_b, gl_stride_k, gc_stride,
                                            BLOCK_K, COMPUTE), axis=0) / HW
        else:
            grad_pool = tl.load(grad_pooled_ptr + b * C + channels, mask=c_mask, other=0.0).to(COMPUTE) / HW
        if BN:
            mean, var = _load_statistics(mean_ptr, var_ptr, channels, c_mask, COMPUTE)
            scale, shift, rstd = _batch_norm_fold(bn_weight_ptr, bn_bias_ptr, channels, c_mask, mean, var, eps, COMPUTE)
            if BATCH_STATS:  # z = x_hat * w + b with x_hat from the batch's mean and variance
                total_g = tl.load(totals_ptr + channels, mask=c_mask, other=0.0).to(COMPUTE)
                total_g_xhat = tl.load(totals_ptr + C + channels, mask=c_mask, other=0.0).to(COMPUTE)
        for p0 in range(0, HW, BLOCK_HW):
            pixels = p0 + tl.arange(0, BLOCK_HW)
            grad_x_pointers, mask = _tile(grad_x_row, channels, pixels, c_mask, HW, stride_c, stride_hw, LAYOUT, VEC)
            g = grad_pool[:, None] + tl.zeros([BLOCK_C, BLOCK_HW], COMPUTE)  # dL/dz
            if RELU or BATCH_STATS:  # (pool without batch norm reads no x)
                x_pointers, _ = _tile(x_row, channels, pixels, c_mask, HW, stride_c, stride_hw, LAYOUT, VEC)
                x = tl.load(x_pointers, mask=mask, other=0.0).to(COMPUTE)
            if RELU:
                z = x
                if BN:
                    z = x * scale[:, None] + shift[:, None]
                g = tl.where(z > 0.0, g, 0.0)
            grad_x = g
            if BN:
                if BATCH_STATS:  # through the batch's mean and variance as well
                    x_hat = (x - mean[:, None]) * rstd[:, None]
                    grad_x = scale[:, None] * (g - (total_g[:, None] + x_hat * total_g_xhat[:, None]) / count)
                else:
                    grad_x = g * scale[:, None]
            tl.store(grad_x_pointers, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reduce_program(pid, grad_pooled_ptr, grad_logits_ptr, grad_conf_ptr, cls_weight_ptr, conf_weight_ptr,
                    per_sample_ptr, grad_weight_ptr, grad_bias_ptr, totals_ptr, B, C, HW, K, gl_stride_b, gl_stride_k,
                    gc_stride, BN: tl.constexpr, HEADS_IN_KERNEL: tl.constexpr, BLOCK_B: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, COMPUTE: tl.constexpr):
    """Channel block pid's sums over the batch: dL/d heads = dL/d out^T @ pooled and dL/d biases
    (column sums; block 0 writes them), and with BN the batch norm's, which within a sample and
    channel are dL/d pooled / HW times the forward's passed count and x_hat sum: no pass over x."""
    channels = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = channels < C
    if HEADS_IN_KERNEL:
        for k0 in range(0, K + 1, BLOCK_K):
            rows = k0 + tl.arange(0, BLOCK_K)
            acc = tl.zeros([BLOCK_K, BLOCK_C], COMPUTE)
            bias = tl.zeros([BLOCK_K], COMPUTE)
            for b0 in range(0, B, BLOCK_B):
                samples = b0 + tl.arange(0, BLOCK_B)
                s_mask = samples < B
                g = _head_rows(grad_logits_ptr, grad_conf_ptr, samples, s_mask, rows, K, gl_stride_b, gl_stride_k,
                               gc_stride, COMPUTE)  # [BLOCK_B, BLOCK_K]
                pooled = tl.load(per_sample_ptr + samples[:, None] * C + channels[None, :],
                                 mask=s_mask[:, None] & c_mask[None, :], other=0.0)  # [BLOCK_B, BLOCK_C]
                acc += tl.sum(g[:, :, None] * pooled[:, None, :], axis=0)
                bias += tl.sum(g, axis=0)
            k_mask = rows < K + 1
            tl.store(grad_weight_ptr + rows[:, None] * C + channels[None, :], acc.to(grad_weight_ptr.dtype.element_ty),
                     mask=k_mask[:, None] & c_mask[None, :])
            tl.store(grad_bias_ptr + rows, bias.to(grad_bias_ptr.dtype.element_ty), mask=k_mask & (pid == 0))
    if BN:
        if HEADS_IN_KERNEL:  # (rows 1 and 2 of per_sample; without the heads it holds the sums alone)
            sums_ptr = per_sample_ptr + B * C
        else:
            sums_ptr = per_sample_ptr
        sum_g = tl.zeros([BLOCK_C], COMPUTE)
        sum_g_xhat = tl.zeros([BLOCK_C], COMPUTE)
        for b0 in range(0, B, BLOCK_B):
            samples = b0 + tl.arange(0, BLOCK_B)
            s_mask = samples < B
            mask = s_mask[:, None] & c_mask[None, :]
            offsets = samples[:, None] * C + channels[None, :]
            if HEADS_IN_KERNEL:
                grad_pool = _grad_pooled(grad_logits_ptr, grad_conf_ptr, cls_weight_ptr, conf_weight_ptr, samples,
                                         s_mask, channels, c_mask, C, K, gl_stride_b, gl_stride_k, gc_stride, BLOCK_K,
                                         COMPUTE)  # [BLOCK_B, BLOCK_C]
            else:
                grad_pool = tl.load(grad_pooled_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
            passed_count = tl.load(sums_ptr + offsets, mask=mask, other=0.0)
            passed_x_hat = tl.load(sums_ptr + B * C + offsets, mask=mask, other=0.0)
            sum_g += tl.sum(grad_pool * passed_count, axis=0)
            sum_g_xhat += tl.sum(grad_pool * passed_x_hat, axis=0)
        tl.store(totals_ptr + channels, (sum_g / HW).to(totals_ptr.dtype.element_ty), mask=c_mask)
        tl.store(totals_ptr + C + channels, (sum_g_xhat / HW).to(totals_ptr.dtype.element_ty), mask=c_mask)


_REDUCE_INTS = ["B", "C", "HW", "K", "gl_stride_b", "gl_stride_k", "gc_stride"]
_REDUCE_POINTERS = ["grad_pooled_ptr", "grad_logits_ptr", "grad_conf_ptr", "cls_weight_ptr", "conf_weight_ptr",
                    "per_sample_ptr", "grad_weight_ptr", "grad_bias_ptr", "totals_ptr"]


@triton.jit(do_not_specialize=_REDUCE_INTS, do_not_specialize_on_alignment=_REDUCE_POINTERS)
def _exit_head_reduce_kernel(
    grad_pooled_ptr,  # [B, C] dL/d pooled, contiguous, float32/64 (unless HEADS_IN_KERNEL)
    grad_logits_ptr,  # [B, K] strides (gl_stride_b, gl_stride_k)
    grad_conf_ptr,  # [B] stride gc_stride
    cls_weight_ptr,  # [K, C] contiguous (HEADS_IN_KERNEL)
    conf_weight_ptr,  # [1, C] (HEADS_IN_KERNEL)
    per_sample_ptr,  # [1 or 3, B, C] contiguous, float32/64, from the forward: pooled; (BN) passed count, x_hat sum.
    #                  Without the heads [2 or 0, B, C]: the sums alone
    grad_weight_ptr,  # [K+1, C] out (HEADS_IN_KERNEL): dL/d heads (rows 0..K-1 the class head, row K the confidence)
    grad_bias_ptr,  # [K+1] out (HEADS_IN_KERNEL)
    totals_ptr,  # [2, C] out (BN): batch sums of dL/dz and of dL/dz * x_hat, = dL/d (batch-norm bias, weight)
    B, C, HW, K, gl_stride_b, gl_stride_k, gc_stride,
    BN: tl.constexpr, HEADS_IN_KERNEL: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, COMPUTE: tl.constexpr,
):
    """One program per block of channels: the sums over the batch that the gradients of the heads
    and of the batch norm are (_reduce_program), before the per-sample kernel, which with batch
    statistics needs them."""
    tl.static_assert(BN or HEADS_IN_KERNEL, "nothing to reduce")
    _reduce_program(tl.program_id(0), grad_pooled_ptr, grad_logits_ptr, grad_conf_ptr, cls_weight_ptr, conf_weight_ptr,
                    per_sample_ptr, grad_weight_ptr, grad_bias_ptr, totals_ptr, B, C, HW, K, gl_stride_b,
                    gl_stride_k, gc_stride, BN, HEADS_IN_KERNEL, BLOCK_B, BLOCK_C, BLOCK_K, COMPUTE)


_BACKWARD_INTS = ["B", "C", "HW", "K", "stride_b", "stride_c", "stride_hw", "gl_stride_b", "gl_stride_k", "gc_stride"]
_BACKWARD_POINTERS = ["grad_pooled_ptr", "grad_logits_ptr", "grad_conf_ptr", "cls_weight_ptr", "conf_weight_ptr",
                      "x_ptr", "bn_weight_ptr", "bn_bias_ptr", "mean_ptr", "var_ptr", "per_sample_ptr",
                      "grad_weight_ptr", "grad_bias_ptr", "totals_ptr", "grad_x_ptr"]


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
    per_sample_ptr,  # [1 or 3, B, C] from the forward (REDUCE), or [2 or 0, B, C] without the heads
    grad_weight_ptr,  # [K+1, C] out (REDUCE and HEADS_IN_KERNEL)
    grad_bias_ptr,  # [K+1] out (REDUCE and HEADS_IN_KERNEL)
    totals_ptr,  # [2, C]: batch sums of dL/dz and of dL/dz * x_hat; read (BATCH_STATS, from the reduce kernel) or
    #              written (REDUCE and BN)
    grad_x_ptr,  # [B, C, H*W] out, same strides as x
    B, C, HW, K, stride_b, stride_c, stride_hw, gl_stride_b, gl_stride_k, gc_stride, eps,
    BN: tl.constexpr, RELU: tl.constexpr, BATCH_STATS: tl.constexpr, HEADS_IN_KERNEL: tl.constexpr,
    LAYOUT: tl.constexpr, VEC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_K: tl.constexpr,
    REDUCE: tl.constexpr, REDUCE_B: tl.constexpr, REDUCE_C: tl.constexpr, REDUCE_K: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    """Programs 0..B-1 write one sample's dL/dx each (or, along the grid's second axis, a share of
    its channels: _channel_splits). With REDUCE the programs past them do the reduce kernel's work
    (a channel block of REDUCE_C each, _reduce_program): where dL/dx does not wait for those sums
    (no batch statistics) and the channels are not split, the whole backward is one launch."""
    tl.static_assert(BN or not BATCH_STATS, "batch statistics are batch norm's")
    tl.static_assert(not (REDUCE and BATCH_STATS), "with batch statistics dL/dx needs the reduce kernel's sums first")
    b = tl.program_id(0)
    # (_grad_x_program called in two places, not once under `if (b < B) | (not REDUCE)`: that form, and
    # the reduce branch first, spill 8 bytes on sm_90 in the fp32 7x7 pool backward; this one does not.
    # With REDUCE the channels are never split (the launcher's fused_reduce), and the split's loop
    # bounds there spill the same 8 bytes)
    if REDUCE:
        if b < B:
            _grad_x_program(b, B, grad_pooled_ptr, grad_logits_ptr, grad_conf_ptr, cls_weight_ptr, conf_weight_ptr,
                            x_ptr, bn_weight_ptr, bn_bias_ptr, mean_ptr, var_ptr, totals_ptr, grad_x_ptr, C, HW, K,
                            stride_b, stride_c, stride_hw, gl_stride_b, gl_stride_k, gc_stride, eps, BN, RELU,
                            BATCH_STATS, HEADS_IN_KERNEL, LAYOUT, VEC, BLOCK_C, BLOCK_HW, BLOCK_K, COMPUTE, False)
        else:
            _reduce_program(b - B, grad_pooled_ptr, grad_logits_ptr, grad_conf_ptr, cls_weight_ptr, conf_weight_ptr,
                            per_sample_ptr, grad_weight_ptr, grad_bias_ptr, totals_ptr, B, C, HW, K, gl_stride_b,
                            gl_stride_k, gc_stride, BN, HEADS_IN_KERNEL, REDUCE_B, REDUCE_C, REDUCE_K, COMPUTE)
    else:
        _grad_x_program(b, B, grad_pooled_ptr, grad_logits_ptr, grad_conf_ptr, cls_weight_ptr, conf_weight_ptr, x_ptr,
                        bn_weight_ptr, bn_bias_ptr, mean_ptr, var_ptr, totals_ptr, grad_x_ptr, C, HW, K, stride_b,
                        stride_c, stride_hw, gl_stride_b, gl_stride_k, gc_stride, eps, BN, RELU, BATCH_STATS,
                        HEADS_IN_KERNEL, LAYOUT, VEC, BLOCK_C, BLOCK_HW, BLOCK_K, COMPUTE, True)


# ---- launchers -------------------------------------------------------------------------------

_launch_stats = FastLauncher(_batch_stats_kernel)
_launch_stats_channels = FastLauncher(_batch_stats_channels_kernel)
_launch_stats_merge = FastLauncher(_batch_stats_merge_kernel)
_launch_forward = FastLauncher(_exit_head_forward_kernel)
_launch_backward = FastLauncher(_exit_head_backward_kernel)
_launch_reduce = FastLauncher(_exit_head_reduce_kernel)

# Heads up to this many weights ((K+1) * C) are applied, and their gradients computed, by the
# kernels, where each per-sample program reads the whole [K+1, C] matrix; larger ones (K=1000, or a
# plain exit's C*H*W features) use torch's matrix products, which read it once.
HEADS_IN_KERNEL_MAX = 16384


def _flat_strides(x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """x (made dense if need be) and its (batch, channel, pixel) strides with h, w flattened."""
    if x.stride(2) != x.shape[3] * x.stride(3) and x.shape[2] > 1:
        x = x.contiguous()
    return x, (x.stride(0), x.stride(1), x.stride(3))


@functools.lru_cache(maxsize=1024)
def _layout_of(channels: int, pixels: int, strides: tuple[int, int, int], element_size: int) -> tuple[int, int]:
    """(LAYOUT, VEC) for a map with these (batch, channel, pixel) strides, if its base is 16-byte
    aligned: VEC is the number of elements in 16 bytes where the contiguous axis's length and the
    other strides are multiples of it (so that every group starts aligned and lies wholly in or out
    of the map), 1 elsewhere. (Tiles span at least VEC along the contiguous axis then: _blocks.)"""
    stride_b, stride_c, stride_hw = strides
    vec = 16 // element_size
    if stride_hw == 1 and pixels > 1:
        layout, aligned = PIXELS_CONTIGUOUS, pixels % vec == 0 and stride_c % vec == 0
    elif stride_c == 1:
        layout, aligned = CHANNELS_CONTIGUOUS, channels % vec == 0 and (pixels == 1 or stride_hw % vec == 0)
    else:
        layout, aligned = STRIDED, False
    return layout, vec if aligned and stride_b % vec == 0 and vec > 1 else 1


def _layout(x: Tensor, strides: tuple[int, int, int]) -> tuple[int, int]:
    """(LAYOUT, VEC) of the kernels that read x [B, C, H, W] with these flattened strides (and
    write dL/dx with the same strides, freshly allocated, so as aligned as can be)."""
    layout, vec = _layout_of(x.shape[1], x.shape[2] * x.shape[3], strides, x.element_size())
    return layout, vec if x.data_ptr() % 16 == 0 else 1


# Values per tile of the kernels that read x: 16-byte loads keep 32 values a thread (4 warps) in
# few registers; without them a tile holds fewer (a thread then holds values of many channels,
# each with its own batch-norm constants), as the register counts of the sm_90 binaries ask.
TILE_VECTORIZED = 4096
TILE_SCALAR = 1024


@functools.lru_cache(maxsize=256)  # a host-time saving: computed once per shape
def _blocks(channels: int, pixels: int, heads: int, layout: int, vec: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_HW, BLOCK_K): tiles long along the contiguous axis."""
    tile = TILE_VECTORIZED if vec > 1 else TILE_SCALAR
    if layout == CHANNELS_CONTIGUOUS:
        block_c = min(triton.next_power_of_2(channels), 128)
        block_hw = max(1, min(triton.next_power_of_2(max(pixels, 1)), tile // block_c))
    else:
        block_hw = min(triton.next_power_of_2(max(pixels, 1)), 256)
        block_c = max(1, min(triton.next_power_of_2(channels), tile // block_hw, 128))
    block_k = min(triton.next_power_of_2(heads), 64)
    return block_c, block_hw, block_k


# The statistics kernel splits the batch when a program per channel would leave the GPU mostly
# idle with much to read each: under STATS_PROGRAMS channels and over STATS_SPLIT_MIN values per
# channel (two tiles: at B=256, C=64, 8x8, 256 programs of 2 dependent tile loads each, not 64 of 8;
# the forward kernel merges those 4 partials itself, so the split costs no launch).
STATS_PROGRAMS = 256
STATS_SPLIT_MIN = 4096


# The backward's per-sample programs, and the forward's without the heads in the kernel
# (exit_pool_fused: with them a program needs its sample's whole pooled row), split their sample's
# channels, in whole blocks, when a program per sample would leave the GPU mostly idle with much
# to read each, by the statistics kernel's rule: under STATS_PROGRAMS programs and over
# STATS_SPLIT_MIN values a program (a ResNet-50's first exit at B=64, C=256, 56x56: 4 programs a
# sample, not one of 800k values; at B=256 no split).
@functools.lru_cache(maxsize=256)
def _channel_splits(batch: int, channels: int, pixels: int, block_c: int) -> int:
    """Programs per sample (the grid's second axis; _channel_range gives each its channels)."""
    blocks = -(-channels // block_c)
    if batch >= STATS_PROGRAMS or blocks == 1:
        return 1
    splits = max(1, min(blocks, -(-STATS_PROGRAMS // max(batch, 1)), channels * pixels // STATS_SPLIT_MIN))
    per_program = -(-blocks // splits) * block_c  # whole blocks, as _channel_range
    return -(-channels // per_program)


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
def _stats_channels_blocks(batch: int, channels: int, pixels: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_C, splits, positions per split) of the channels_last statistics kernel:
    tiles of 2048 values; a program per block of channels, split over the positions (as
    _stats_blocks splits the batch) under STATS_PROGRAMS programs and over STATS_SPLIT_MIN values
    a program."""
    positions = batch * pixels
    block_c = min(triton.next_power_of_2(channels), 64)
    block_n = min(triton.next_power_of_2(positions), 2048 // block_c)
    channel_programs = -(-channels // block_c)
    if channel_programs >= STATS_PROGRAMS or positions * block_c <= STATS_SPLIT_MIN:
        return block_n, block_c, 1, positions
    splits = min(-(-positions // block_n), -(-STATS_PROGRAMS // channel_programs))
    per_split = -(-positions // splits // block_n) * block_n  # whole tiles
    return block_n, block_c, -(-positions // per_split), per_split


# Values in a [splits, channels] tile of partials that one merge step reads.
MERGE_TILE = 2048
# The forward kernel merges the split statistics itself where the partials each of its programs
# reads (3 per split and channel) are at most 1 / MERGE_IN_FORWARD_SHARE of the values of x it
# reads (H*W per channel); past that the merge kernel, a launch more, reads them once.
MERGE_IN_FORWARD_SHARE = 4


def _merge_in_forward(splits: int, pixels: int) -> bool:
    """Whether the forward kernel merges the statistics of ``splits`` splits itself (see MERGE_IN_FORWARD_SHARE)."""
    return 3 * splits * MERGE_IN_FORWARD_SHARE <= pixels


@functools.lru_cache(maxsize=256)
def _merge_block_s(splits: int, block_c: int) -> int:
    """BLOCK_S: splits per merge step for channel blocks of block_c (tiles of up to MERGE_TILE)."""
    return max(1, min(triton.next_power_of_2(splits), MERGE_TILE // block_c))


@functools.lru_cache(maxsize=256)
def _merge_blocks(splits: int, channels: int) -> tuple[int, int]:
    """(BLOCK_S, BLOCK_C) of the merge kernel: narrow channel blocks (more programs), each merging
    its splits in as few tree steps as MERGE_TILE allows (256 splits of 64 channels: 4 programs of
    2 steps; the kernel once took one split per step, 256 dependent steps)."""
    block_c = min(triton.next_power_of_2(channels), 16)
    return _merge_block_s(splits, block_c), block_c


# Values in the reduce kernel's [BLOCK_B, BLOCK_K, BLOCK_C] products (4096: 158 registers on sm_90
# at the benchmark's blocks, against 168 for the 8192 of [64, 16, 8] before).
REDUCE_PRODUCT = 4096


@functools.lru_cache(maxsize=256)
def _reduce_blocks(batch: int, channels: int, heads: int) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_C, BLOCK_K) of the reduce kernel: long batch blocks (few serial steps, each
    latency-bound) and narrow channel blocks (many programs): at B=256, C=64, K=10 32 programs
    of 2 steps, where [64 samples, 8 channels] blocks made 8 programs of 4."""
    block_b = min(triton.next_power_of_2(max(batch, 1)), 128)
    block_k = min(triton.next_power_of_2(heads), 16)
    block_c = max(1, min(triton.next_power_of_2(channels), REDUCE_PRODUCT // (block_b * block_k), 64))
    return block_b, block_c, block_k


def _check(x: Tensor, heads: tuple[Tensor, Tensor, Tensor, Tensor] | None,
           bn_tensors: tuple[Tensor | None, ...] = (), op: str = "exit_head_fused") -> None:
    """Raises ValueError naming what ``op`` expected of x [B, C, H, W], the heads (None for the
    exit_pool ops) and the batch norm's [C] tensors, and what it was given."""
    if x.dim() != 4:
        raise ValueError(f"{op}: expected x of shape [B, C, H, W], got {list(x.shape)}")
    channels = x.shape[1]
    for tensor in bn_tensors:
        if tensor is not None and tensor.shape != (channels,):
            raise ValueError(f"{op}: expected batch-norm tensors of shape [{channels}], got {list(tensor.shape)}")
    if heads is None:
        return
    cls_weight, cls_bias, conf_weight, conf_bias = heads
    if cls_weight.dim() != 2 or cls_weight.shape[1] != channels or cls_bias.shape != (cls_weight.shape[0],):
        raise ValueError(
            f"{op}: expected cls_weight [K, {channels}] and cls_bias [K], got {list(cls_weight.shape)} "
            f"and {list(cls_bias.shape)}"
        )
    if conf_weight.shape != (1, channels) or conf_bias.shape != (1,):
        raise ValueError(f"{op}: expected conf_weight [1, {channels}] and conf_bias [1], "
                         f"got {list(conf_weight.shape)} and {list(conf_bias.shape)}")
    if not heads_in_kernel(cls_weight.shape[0], channels):
        raise ValueError(
            f"{op}: expected heads of at most HEADS_IN_KERNEL_MAX = {HEADS_IN_KERNEL_MAX} weights ((K+1) * C), got "
            f"{(cls_weight.shape[0] + 1) * channels} (K={cls_weight.shape[0]}, C={channels}); larger heads go to "
            f"torch's linear layers on exit_pool_fused's pooled features, as eefast.ops.exit_head does"
        )


def heads_in_kernel(classes: int, channels: int) -> bool:
    """Whether heads of K classes on C channels are applied (and differentiated) in the kernels:
    at most HEADS_IN_KERNEL_MAX weights (read module-wide, so tests can lower it)."""
    return (classes + 1) * channels <= HEADS_IN_KERNEL_MAX


def _batch_norm_tensors(x, bn, bn_weight, bn_bias, mean, var):
    """The four [C] tensors the kernels read with batch norm: the affine parameters (ones and
    zeros for a batch norm without them) and the statistics (x, unread, where the forward merges
    them itself: mean None); x four times (unread) without batch norm."""
    if not bn:
        return x, x, x, x
    dtype = compute_dtype(x.dtype) if mean is None else mean.dtype
    if bn_weight is None:
        bn_weight = torch.ones(x.shape[1], dtype=dtype, device=x.device)
    if bn_bias is None:
        bn_bias = torch.zeros(x.shape[1], dtype=dtype, device=x.device)
    return (bn_weight, bn_bias, x, x) if mean is None else (bn_weight, bn_bias, mean, var)


def _per_sample_rows(heads_in_kernel: bool, bn_sums: bool) -> int:
    """Rows of per_sample: the pooled features (with the heads in the kernel: they read them back,
    and so do the backward's head gradients), then the batch norm's two per-sample sums."""
    return int(heads_in_kernel) + (2 if bn_sums else 0)


def _forward(x, heads, bn_weight, bn_bias, mean, var, eps, relu, bn_sums, merge=None):
    """(outputs, per_sample). With heads = (cls_weight, cls_bias, conf_weight, conf_bias) the
    kernel applies them: outputs are (logits [B, K], conf [B]), and per_sample [1 or 3, B, C]
    holds in row 0 the pooled features in the compute dtype, which the backward's head gradients
    read; with heads None (the exit_pool ops) outputs are (pooled [B, C],) in x's dtype, and
    per_sample [2 or 0, B, C] lacks that row. Batch norm with (mean, var) unless mean is None. With
    ``bn_sums`` (batch norm only) per_sample's last two rows are, per sample and channel, the count
    of values the ReLU passes and the sum of their x_hat, which the backward's batch-norm sums are
    made of. With ``merge =
    (partials, stats, running_update, momentum)`` the kernel merges the batch statistics from the
    partials (mean and var are then unread), writes them into stats and applies running_update,
    its momentum as two float32s (see _launch_statistics)."""
    batch, channels, height, width = x.shape
    x, (stride_b, stride_c, stride_hw) = _flat_strides(x)
    compute = compute_dtype(x.dtype)
    out_dtype = written_dtype(x.dtype)
    per_sample = torch.empty(_per_sample_rows(heads is not None, bn_sums), batch, channels, dtype=compute,
                             device=x.device)
    if heads is None:
        logits = torch.empty(batch, channels, dtype=out_dtype, device=x.device)  # the pooled features
        conf = cls_weight = cls_bias = conf_weight = conf_bias = logits  # unwritten, unread
        classes = 0
    else:
        cls_weight, cls_bias, conf_weight, conf_bias = heads
        cls_weight, cls_bias = cls_weight.contiguous(), cls_bias.contiguous()  # (no copy when they are)
        conf_weight, conf_bias = conf_weight.contiguous(), conf_bias.contiguous()
        classes = cls_weight.shape[0]
        logits = torch.empty(batch, classes, dtype=out_dtype, device=x.device)
        conf = torch.empty(batch, dtype=out_dtype, device=x.device)
    if batch > 0:
        layout, vec = _layout(x, (stride_b, stride_c, stride_hw))
        block_c, block_hw, block_k = _blocks(channels, height * width, classes + 1, layout, vec)
        bn = mean is not None or merge is not None
        bn_tensors = _batch_norm_tensors(x, bn, bn_weight, bn_bias, mean, var)
        if merge is None:
            partials = stats = running_mean = running_var = per_sample  # unread
            splits, block_s, update, momentum = 0, 1, False, (0.0, 0.0)
        else:
            partials, stats, running_update, momentum = merge
            splits = partials.shape[1]
            block_s = _merge_block_s(splits, block_c)
            update = running_update is not None
            running_mean, running_var = running_update[:2] if update else (stats, stats)
        key = (x.dtype, cls_weight.dtype, cls_bias.dtype, conf_weight.dtype, conf_bias.dtype,
               *(t.dtype for t in bn_tensors), running_mean.dtype, running_var.dtype, out_dtype, bn, relu, bn_sums,
               merge is not None, update, heads is not None, layout, vec, block_c, block_hw, block_k, block_s)
        channel_splits = 1 if heads is not None else _channel_splits(batch, channels, height * width, block_c)
        _launch_forward(
            key, (batch, channel_splits),
            (x, cls_weight, cls_bias, conf_weight, conf_bias, *bn_tensors, partials, stats, running_mean, running_var,
             logits, conf, per_sample, channels, height * width, classes, splits, stride_b, stride_c, stride_hw,
             float(eps), *momentum),
            dict(BN=bn, RELU=relu, BN_SUMS=bn_sums, MERGE=merge is not None, UPDATE=update,
                 HEADS_IN_KERNEL=heads is not None, LAYOUT=layout, VEC=vec, BLOCK_C=block_c, BLOCK_HW=block_hw,
                 BLOCK_K=block_k, BLOCK_S=block_s, COMPUTE=tl_dtype(compute)),
        )
    outputs = (logits,) if heads is None else (logits, conf)
    if out_dtype != x.dtype:  # (the interpreter's bfloat16: see written_dtype)
        outputs = tuple(t.to(x.dtype) for t in outputs)
    return outputs, per_sample


def exit_head_inference_launch(x, cls_weight, cls_bias, conf_weight, conf_bias, bn_stats, relu):
    """(logits [B, K], conf [B]) for inference, from the parameters as they are stored and the
    batch norm's eval-mode state ``bn_stats = (weight, bias, running_mean, running_var, eps)`` (or
    None) folded in the kernel. One launch and no other work: nothing to fold again when the
    parameters change, and a CUDA graph of it reads the parameters themselves."""
    return _inference_launch(x, (cls_weight, cls_bias, conf_weight, conf_bias), bn_stats, relu, "exit_head_fused")


def exit_pool_inference_launch(x, bn_stats, relu):
    """(pooled [B, C],) for inference, as exit_head_inference_launch without the heads."""
    return _inference_launch(x, None, bn_stats, relu, "exit_pool_fused")


def _inference_launch(x, heads, bn_stats, relu, op):
    bn_weight, bn_bias, mean, var, eps = (None, None, None, None, 0.0) if bn_stats is None else bn_stats
    _check(x, heads, (bn_weight, bn_bias, mean, var), op)
    return _forward(x, heads, bn_weight, bn_bias, mean, var, eps, relu, False)[0]


def _launch_statistics(x: Tensor, running_update: tuple[Tensor, Tensor, float] | None
                       ) -> tuple[Tensor, Tensor | None, tuple[float, float]]:
    """(stats [3, C], partials [3, S, C] or None, the momentum as two float32s) of x [B, C, H, W]:
    one statistics kernel. Unsplit, it writes stats (see batch_stats_launch) and applies
    running_update; split, it writes partials only, for the merge kernel or the forward kernel to
    finish."""
    batch, channels, height, width = x.shape
    x, (stride_b, stride_c, stride_hw) = _flat_strides(x)
    compute = compute_dtype(x.dtype)
    stats = torch.empty(3, channels, dtype=compute, device=x.device)
    update = running_update is not None
    running_mean, running_var, momentum = running_update if update else (stats, stats, 0.0)
    momentum = float32_pair(float(momentum), "exit_head", "the batch norm's momentum")
    layout, vec = _layout(x, (stride_b, stride_c, stride_hw))
    dtypes = (x.dtype, compute, running_mean.dtype, running_var.dtype)
    if layout == CHANNELS_CONTIGUOUS:  # tiles of [positions, channels], channels contiguous
        block_n, block_c, splits, per_split = _stats_channels_blocks(batch, channels, height * width)
        split = splits > 1
        partials = torch.empty(3, splits, channels, dtype=compute, device=x.device) if split else stats
        _launch_stats_channels(
            (*dtypes, split, update, vec, block_n, block_c), (-(-channels // block_c), splits),
            (x, stats, partials, running_mean, running_var, channels, height * width, batch * height * width,
             stride_b, stride_hw, per_split, *momentum),
            dict(SPLIT=split, UPDATE=update, VEC=vec, BLOCK_N=block_n, BLOCK_C=block_c, COMPUTE=tl_dtype(compute)),
        )
    else:  # tiles of [samples, pixels] of one channel
        block_b, block_hw, splits, rows_per_split = _stats_blocks(batch, channels, height * width)
        split = splits > 1
        partials = torch.empty(3, splits, channels, dtype=compute, device=x.device) if split else stats
        _launch_stats(
            (*dtypes, split, update, layout, vec, block_b, block_hw), (channels, splits),
            (x, stats, partials, running_mean, running_var, batch, channels, height * width, stride_b, stride_c,
             stride_hw, rows_per_split, *momentum),
            dict(SPLIT=split, UPDATE=update, LAYOUT=layout, VEC=vec, BLOCK_B=block_b, BLOCK_HW=block_hw,
                 COMPUTE=tl_dtype(compute)),
        )
    return stats, partials if split else None, momentum


def _launch_merge(x: Tensor, partials: Tensor, stats: Tensor, running_update: tuple[Tensor, Tensor, float] | None,
                  momentum: tuple[float, float]) -> None:
    """The merge kernel: stats [3, C] (and running_update) from the split statistics' partials."""
    channels, splits = x.shape[1], partials.shape[1]
    x, (_, stride_c, _) = _flat_strides(x)  # (the x the statistics kernel read)
    update = running_update is not None
    running_mean, running_var = running_update[:2] if update else (stats, stats)
    block_s, block_c = _merge_blocks(splits, channels)
    _launch_stats_merge(
        (x.dtype, stats.dtype, running_mean.dtype, running_var.dtype, update, block_s, block_c),
        (-(-channels // block_c),),
        (x, partials, stats, running_mean, running_var, channels, splits, stride_c, *momentum),
        dict(UPDATE=update, BLOCK_S=block_s, BLOCK_C=block_c, COMPUTE=tl_dtype(stats.dtype)),
    )


def batch_stats_launch(x: Tensor, running_update: tuple[Tensor, Tensor, float] | None = None) -> Tensor:
    """[3, C]: the batch's mean, biased variance (what batch norm normalises with) and unbiased
    variance (what it keeps in running_var) per channel of x [B, C, H, W]; float32 (float64).
    With ``running_update = (running_mean, running_var, momentum)`` the kernels also update those
    in place as nn.BatchNorm2d does (fused_running_update says when they can). The statistics
    kernel, then the merge kernel if the work was split. (The training forward leaves the merge to
    the forward kernel where that is cheap: exit_head_forward_launch.)"""
    if x.numel() == 0:  # as torch.var_mean of no values (and nn.BatchNorm2d leaves the running ones)
        return torch.full((3, x.shape[1]), float("nan"), dtype=compute_dtype(x.dtype), device=x.device)
    stats, partials, momentum = _launch_statistics(x, running_update)
    if partials is not None:
        _launch_merge(x, partials, stats, running_update, momentum)
    return stats


def fused_running_update(running_mean: Tensor | None, running_var: Tensor | None) -> bool:
    """Whether the statistics kernels can update these running statistics in place: both there and
    written as they are stored (the interpreter's bfloat16 stores are not: see written_dtype)."""
    return (running_mean is not None and running_var is not None
            and written_dtype(running_mean.dtype) == running_mean.dtype
            and written_dtype(running_var.dtype) == running_var.dtype)


def exit_head_forward_launch(x, cls_weight, cls_bias, conf_weight, conf_bias, bn_weight, bn_bias, running_mean,
                             running_var, eps, batch_stats, relu, running_update=None):
    """(logits [B, K], conf [B], per_sample [1 or 3, B, C] (see _forward; 3 with batch norm),
    batch statistics [3, C]). With ``batch_stats`` batch norm uses the batch's mean and biased
    variance, returned with the unbiased variance (as batch_stats_launch's); otherwise the running
    statistics (if given), and the last output is [0, C]. ``running_update`` (batch statistics
    only): see batch_stats_launch. Where the statistics kernel splits its work and the partials
    are few against each sample's map (_merge_in_forward), the forward kernel merges them itself:
    two launches, not three."""
    return _forward_launch(x, (cls_weight, cls_bias, conf_weight, conf_bias), bn_weight, bn_bias, running_mean,
                           running_var, eps, batch_stats, relu, running_update, "exit_head_fused")


def exit_pool_forward_launch(x, bn_weight, bn_bias, running_mean, running_var, eps, batch_stats, relu,
                             running_update=None):
    """(pooled [B, C] in x's dtype, per_sample [2 or 0, B, C] (see _forward), batch statistics):
    exit_head_forward_launch without the heads, which the caller applies to pooled."""
    return _forward_launch(x, None, bn_weight, bn_bias, running_mean, running_var, eps, batch_stats, relu,
                           running_update, "exit_pool_fused")


def _forward_launch(x, heads, bn_weight, bn_bias, running_mean, running_var, eps, batch_stats, relu, running_update,
                    op):
    _check(x, heads, (bn_weight, bn_bias, running_mean, running_var), op)
    merge = None
    if not batch_stats:
        mean, var = running_mean, running_var
        stats = x.new_empty(0, x.shape[1], dtype=compute_dtype(x.dtype))
    elif x.numel() == 0:
        stats = batch_stats_launch(x)
        mean, var = stats[0], stats[1]
    else:
        stats, partials, momentum = _launch_statistics(x, running_update)
        if partials is not None and _merge_in_forward(partials.shape[1], x.shape[2] * x.shape[3]):
            mean = var = None  # the forward kernel merges them (into stats)
            merge = (partials, stats, running_update, momentum)
        else:
            if partials is not None:
                _launch_merge(x, partials, stats, running_update, momentum)
            mean, var = stats[0], stats[1]
    outputs, per_sample = _forward(x, heads, bn_weight, bn_bias, mean, var, eps, relu, batch_stats or mean is not None,
                                   merge)
    return (*outputs, per_sample, stats)


def exit_head_backward_launch(grad_logits, grad_conf, x, cls_weight, conf_weight, bn_weight, bn_bias, mean, var,
                              per_sample, eps, batch_stats, relu):
    """(dL/dx in x's layout, dL/d heads [K+1, C], dL/d biases [K+1], dL/d batch-norm (bias, weight)
    [2, C] or [0, C] without batch norm), from the forward's per_sample [1 or 3, B, C]: see
    _backward_launch."""
    classes, channels = cls_weight.shape[0], x.shape[1]
    param_dtype = written_dtype(cls_weight.dtype)
    grad_weight = torch.empty(classes + 1, channels, dtype=param_dtype, device=x.device)
    grad_bias = torch.empty(classes + 1, dtype=param_dtype, device=x.device)
    heads = (grad_logits, grad_conf, cls_weight.contiguous(), conf_weight.contiguous(), grad_weight, grad_bias)
    grad_x, grad_bn = _backward_launch(heads, per_sample, x, bn_weight, bn_bias, mean, var, per_sample, eps,
                                       batch_stats, relu)
    if grad_weight.dtype != cls_weight.dtype:  # (the interpreter's bfloat16; a same-dtype .to costs ~1 us)
        grad_weight, grad_bias = grad_weight.to(cls_weight.dtype), grad_bias.to(cls_weight.dtype)
    return grad_x, grad_weight, grad_bias, grad_bn


def exit_pool_backward_launch(grad_pooled, x, bn_weight, bn_bias, mean, var, per_sample, eps, batch_stats, relu):
    """(dL/dx in x's layout, dL/d batch-norm (bias, weight) [2 or 0, C]) from dL/d pooled [B, C]
    and the forward's per_sample: see _backward_launch."""
    return _backward_launch(None, grad_pooled.contiguous(), x, bn_weight, bn_bias, mean, var, per_sample, eps,
                            batch_stats, relu)


def _backward_launch(heads, grad_pooled, x, bn_weight, bn_bias, mean, var, per_sample, eps, batch_stats, relu):
    """(dL/dx, dL/d batch-norm (bias, weight) [2 or 0, C]), and with ``heads = (grad_logits,
    grad_conf, cls_weight, conf_weight, grad_weight [K+1, C], grad_bias [K+1])`` dL/d heads and
    biases written into the last two, dL/d pooled following from the first two in the kernels;
    without (heads None) dL/d pooled is ``grad_pooled`` [B, C], contiguous. With batch statistics
    two launches: the reduce kernel (every sum over the batch), then the per-sample kernel (dL/dx,
    which needs those sums); otherwise one, the per-sample kernel with the reduce kernel's
    programs appended (none at all for a pool exit without heads)."""
    batch, channels, height, width = x.shape
    x, (stride_b, stride_c, stride_hw) = _flat_strides(x)
    compute = per_sample.dtype
    bn = mean is not None
    grad_x = torch.empty_strided(x.shape, x.stride(), dtype=written_dtype(x.dtype), device=x.device)
    totals = torch.empty((2 if bn else 0, channels), dtype=compute, device=x.device)
    in_kernel = heads is not None
    if in_kernel:
        grad_logits, grad_conf, cls_weight, conf_weight, grad_weight, grad_bias = heads
        classes = cls_weight.shape[0]
        head_strides = (grad_logits.stride(0), grad_logits.stride(1), grad_conf.stride(0))
    else:  # (unread, unwritten)
        grad_logits = grad_conf = cls_weight = conf_weight = grad_weight = grad_bias = grad_pooled
        classes, head_strides = 0, (0, 0, 0)
    if batch == 0:
        if in_kernel:
            grad_weight.zero_()
            grad_bias.zero_()
        totals.zero_()
    else:
        reduce = in_kernel or bn  # (sums over the batch to make)
        reduce_b, reduce_c, reduce_k = _reduce_blocks(batch, channels, classes + 1) if reduce else (1, 1, 1)
        reduce_programs = -(-channels // reduce_c)  # cdiv (triton.cdiv takes 1.5 us of host time)
        layout, vec = _layout(x, (stride_b, stride_c, stride_hw))
        block_c, block_hw, block_k = _blocks(channels, height * width, classes + 1, layout, vec)
        channel_splits = _channel_splits(batch, channels, height * width, block_c)
        fused_reduce = reduce and not batch_stats and channel_splits == 1  # the sums by programs of the same launch
        if reduce and not fused_reduce:  # (dL/dx needs the sums, or the channels are split): the reduce kernel
            _launch_reduce(
                (grad_pooled.dtype, grad_logits.dtype, grad_conf.dtype, cls_weight.dtype, conf_weight.dtype, compute,
                 grad_weight.dtype, grad_bias.dtype, bn, in_kernel, reduce_b, reduce_c, reduce_k),
                (reduce_programs,),
                (grad_pooled, grad_logits, grad_conf, cls_weight, conf_weight, per_sample, grad_weight, grad_bias,
                 totals, batch, channels, height * width, classes, *head_strides),
                dict(BN=bn, HEADS_IN_KERNEL=in_kernel, BLOCK_B=reduce_b, BLOCK_C=reduce_c, BLOCK_K=reduce_k,
                     COMPUTE=tl_dtype(compute)),
            )
        bn_tensors = _batch_norm_tensors(x, bn, bn_weight, bn_bias, mean, var)
        _launch_backward(
            (grad_pooled.dtype, compute, grad_logits.dtype, grad_conf.dtype, cls_weight.dtype, conf_weight.dtype,
             x.dtype, *(t.dtype for t in bn_tensors), grad_weight.dtype, grad_bias.dtype, grad_x.dtype, bn, relu,
             batch_stats, in_kernel, layout, vec, block_c, block_hw, block_k, fused_reduce, reduce_b, reduce_c,
             reduce_k),
            (batch + reduce_programs if fused_reduce else batch, channel_splits),
            (grad_pooled, grad_logits, grad_conf, cls_weight, conf_weight, x, *bn_tensors, per_sample, grad_weight,
             grad_bias, totals, grad_x, batch, channels, height * width, classes, stride_b, stride_c, stride_hw,
             *head_strides, float(eps)),
            dict(BN=bn, RELU=relu, BATCH_STATS=batch_stats, HEADS_IN_KERNEL=in_kernel, LAYOUT=layout, VEC=vec,
                 BLOCK_C=block_c, BLOCK_HW=block_hw, BLOCK_K=block_k, REDUCE=fused_reduce, REDUCE_B=reduce_b,
                 REDUCE_C=reduce_c, REDUCE_K=reduce_k, COMPUTE=tl_dtype(compute)),
        )
    grad_bn = totals if bn_weight is None or totals.dtype == bn_weight.dtype else totals.to(bn_weight.dtype)
    if grad_x.dtype != x.dtype:  # (the interpreter's bfloat16: see written_dtype; a same-dtype .to costs ~1 us)
        grad_x = grad_x.to(x.dtype)
    return grad_x, grad_bn


# ---- the ops ---------------------------------------------------------------------------------
# eefast::exit_head_fused applies heads of up to HEADS_IN_KERNEL_MAX weights in the kernels;
# eefast::exit_pool_fused stops at the pooled features, for larger heads, which torch's linear
# layers apply (eefast.ops.exit_head): each per-sample program would read them all.


@torch.library.custom_op("eefast::exit_head_fused", mutates_args=())
def exit_head_fused(
    x: Tensor, cls_weight: Tensor, cls_bias: Tensor, conf_weight: Tensor, conf_bias: Tensor,
    bn_weight: Tensor | None, bn_bias: Tensor | None, running_mean: Tensor | None, running_var: Tensor | None,
    eps: float, batch_stats: bool, relu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(logits [B, K], conf [B], per_sample [1 or 3, B, C], batch statistics [3, C] or [0, C]) of
    relu?(batch_norm?(x)) pooled, then both heads. per_sample[0] is the pooled features; with
    batch norm, per_sample[1:] is what its gradients need of x (see exit_head_forward_launch)."""
    return exit_head_forward_launch(x, cls_weight, cls_bias, conf_weight, conf_bias, bn_weight, bn_bias,
                                    running_mean, running_var, eps, batch_stats, relu)


@exit_head_fused.register_fake
def _(x, cls_weight, cls_bias, conf_weight, conf_bias, bn_weight, bn_bias, running_mean, running_var, eps,
      batch_stats, relu):
    _check(x, (cls_weight, cls_bias, conf_weight, conf_bias), (bn_weight, bn_bias, running_mean, running_var))
    batch = x.shape[0]
    return (x.new_empty(batch, cls_weight.shape[0]), x.new_empty(batch),
            *_fake_per_sample_and_stats(x, True, batch_stats or running_mean is not None, batch_stats))


def _fake_per_sample_and_stats(x, heads, bn, batch_stats):
    batch, channels = x.shape[:2]
    compute = compute_dtype(x.dtype)
    return (x.new_empty(_per_sample_rows(heads, bn), batch, channels, dtype=compute),
            x.new_empty(3 if batch_stats else 0, channels, dtype=compute))


@torch.library.custom_op("eefast::exit_head_fused_backward", mutates_args=())
def exit_head_fused_backward(
    grad_logits: Tensor, grad_conf: Tensor, x: Tensor, cls_weight: Tensor, conf_weight: Tensor,
    bn_weight: Tensor | None, bn_bias: Tensor | None, mean: Tensor | None, var: Tensor | None, per_sample: Tensor,
    eps: float, batch_stats: bool, relu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dL/dx in x's layout, dL/d heads [K+1, C], dL/d biases [K+1], dL/d batch-norm (bias, weight)
    [2, C], or [0, C] without batch norm), given the forward's per_sample."""
    return exit_head_backward_launch(grad_logits, grad_conf, x, cls_weight, conf_weight, bn_weight, bn_bias, mean,
                                     var, per_sample, eps, batch_stats, relu)


@exit_head_fused_backward.register_fake
def _(grad_logits, grad_conf, x, cls_weight, conf_weight, bn_weight, bn_bias, mean, var, per_sample, eps, batch_stats,
      relu):
    heads = cls_weight.shape[0] + 1
    grad_x, grad_bn = _fake_grad_x_and_bn(x, bn_weight, mean, per_sample)
    return grad_x, cls_weight.new_empty(heads, x.shape[1]), cls_weight.new_empty(heads), grad_bn


def _fake_grad_x_and_bn(x, bn_weight, mean, per_sample):
    grad_x = torch.empty_strided(x.shape, _flat_strides(x)[0].stride(), dtype=x.dtype, device=x.device)
    bn_dtype = bn_weight.dtype if bn_weight is not None else per_sample.dtype
    return grad_x, per_sample.new_empty((2 if mean is not None else 0, x.shape[1]), dtype=bn_dtype)


@torch.library.custom_op("eefast::exit_pool_fused", mutates_args=())
def exit_pool_fused(
    x: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None, running_mean: Tensor | None,
    running_var: Tensor | None, eps: float, batch_stats: bool, relu: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(pooled [B, C] in x's dtype, per_sample [2 or 0, B, C], batch statistics [3, C] or [0, C])
    of relu?(batch_norm?(x)) pooled: exit_head_fused without the heads. With batch norm
    per_sample is what its gradients need of x (see exit_head_forward_launch)."""
    return exit_pool_forward_launch(x, bn_weight, bn_bias, running_mean, running_var, eps, batch_stats, relu)


@exit_pool_fused.register_fake
def _(x, bn_weight, bn_bias, running_mean, running_var, eps, batch_stats, relu):
    _check(x, None, (bn_weight, bn_bias, running_mean, running_var), "exit_pool_fused")
    return (x.new_empty(x.shape[:2]),
            *_fake_per_sample_and_stats(x, False, batch_stats or running_mean is not None, batch_stats))


@torch.library.custom_op("eefast::exit_pool_fused_backward", mutates_args=())
def exit_pool_fused_backward(
    grad_pooled: Tensor, x: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None, mean: Tensor | None,
    var: Tensor | None, per_sample: Tensor, eps: float, batch_stats: bool, relu: bool,
) -> tuple[Tensor, Tensor]:
    """(dL/dx in x's layout, dL/d batch-norm (bias, weight) [2, C], or [0, C] without batch norm),
    given dL/d pooled [B, C] and the forward's per_sample."""
    return exit_pool_backward_launch(grad_pooled, x, bn_weight, bn_bias, mean, var, per_sample, eps, batch_stats,
                                     relu)


@exit_pool_fused_backward.register_fake
def _(grad_pooled, x, bn_weight, bn_bias, mean, var, per_sample, eps, batch_stats, relu):
    return _fake_grad_x_and_bn(x, bn_weight, mean, per_sample)


def _save_for_backward(ctx, x, heads, bn_inputs, per_sample, stats):
    """Saves x, the heads' weights (heads = (cls_weight, conf_weight), or () for exit_pool_fused),
    the batch norm's weight and bias, the statistics it normalised with, and per_sample."""
    bn_weight, bn_bias, running_mean, running_var, eps, batch_stats, relu = bn_inputs
    mean, var = (stats[0], stats[1]) if batch_stats else (running_mean, running_var)
    ctx.eps, ctx.batch_stats, ctx.relu = eps, batch_stats, relu
    ctx.has_bn_weight, ctx.has_bn_bias = bn_weight is not None, bn_bias is not None
    ctx.save_for_backward(x, *heads, bn_weight, bn_bias, mean, var, per_sample)
    ctx.mark_non_differentiable(per_sample, stats)


def _bn_gradients(ctx, grad_bn):
    """dL/d (batch-norm weight, bias) as the op's inputs are: None where the input was."""
    return grad_bn[1] if ctx.has_bn_weight else None, grad_bn[0] if ctx.has_bn_bias else None


def _setup_context(ctx, inputs, output):
    x, cls_weight, _, conf_weight, _, *bn_inputs = inputs
    _save_for_backward(ctx, x, (cls_weight, conf_weight), bn_inputs, *output[2:])


def _backward(ctx, grad_logits, grad_conf, grad_per_sample, grad_stats, backward=exit_head_fused_backward):
    x, cls_weight, conf_weight, bn_weight, bn_bias, mean, var, per_sample = ctx.saved_tensors
    batch = x.shape[0]
    grad_logits = torch.zeros(batch, cls_weight.shape[0], dtype=x.dtype, device=x.device) \
        if grad_logits is None else grad_logits
    grad_conf = torch.zeros(batch, dtype=x.dtype, device=x.device) if grad_conf is None else grad_conf
    grad_x, grad_weight, grad_bias, grad_bn = backward(grad_logits, grad_conf, x, cls_weight, conf_weight, bn_weight,
                                                       bn_bias, mean, var, per_sample, ctx.eps, ctx.batch_stats,
                                                       ctx.relu)
    classes = cls_weight.shape[0]
    return (grad_x, grad_weight[:classes], grad_bias[:classes], grad_weight[classes:], grad_bias[classes:],
            *_bn_gradients(ctx, grad_bn), None, None, None, None, None)


exit_head_fused.register_autograd(_backward, setup_context=_setup_context)


def _pool_setup_context(ctx, inputs, output):
    x, *bn_inputs = inputs
    _save_for_backward(ctx, x, (), bn_inputs, *output[1:])


def _pool_backward(ctx, grad_pooled, grad_per_sample, grad_stats, backward=exit_pool_fused_backward):
    x, bn_weight, bn_bias, mean, var, per_sample = ctx.saved_tensors
    if grad_pooled is None:
        grad_pooled = torch.zeros(x.shape[:2], dtype=x.dtype, device=x.device)
    grad_x, grad_bn = backward(grad_pooled, x, bn_weight, bn_bias, mean, var, per_sample, ctx.eps, ctx.batch_stats,
                               ctx.relu)
    return grad_x, *_bn_gradients(ctx, grad_bn), None, None, None, None, None


exit_pool_fused.register_autograd(_pool_backward, setup_context=_pool_setup_context)


class ExitHeadEager(torch.autograd.Function):
    """``exit_head_fused`` for eager autograd: the same launchers, saved tensors and backward as the
    custom op, without the dispatcher's custom-op layers around each call (tens of microseconds
    of host time per step, more than the kernels run on a GPU). torch.compile and opcheck use the
    custom op. ``apply(*op_args, running_update)``: with batch statistics and ``running_update =
    (running_mean, running_var, momentum)``, the statistics kernels also update those (one launch
    fewer than the update after the op, which a custom op must leave outside: it cannot mutate
    its inputs and register autograd)."""

    @staticmethod
    def forward(ctx, *inputs):
        *op_inputs, running_update = inputs
        output = exit_head_forward_launch(*op_inputs, running_update)
        _setup_context(ctx, op_inputs, output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        if torch.is_grad_enabled():  # create_graph: the custom op, whose outputs say it has no double backward
            return *_backward(ctx, *grads), None
        return *_backward(ctx, *grads, backward=exit_head_backward_launch), None


class ExitPoolEager(torch.autograd.Function):
    """``exit_pool_fused`` for eager autograd, as ExitHeadEager is exit_head_fused's."""

    @staticmethod
    def forward(ctx, *inputs):
        *op_inputs, running_update = inputs
        output = exit_pool_forward_launch(*op_inputs, running_update)
        _pool_setup_context(ctx, op_inputs, output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        if torch.is_grad_enabled():  # create_graph: as ExitHeadEager's
            return *_pool_backward(ctx, *grads), None
        return *_pool_backward(ctx, *grads, backward=exit_pool_backward_launch), None
