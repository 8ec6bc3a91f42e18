"""The exit head's forward: batch norm -> ReLU -> global average pool (-> both linear heads).

For x [B, C, H, W], with (mean, var) the running or the batch statistics:
    z[b, c, p] = relu?((x[b, c, p] - mean_c) * rstd_c * weight_c + bias_c),  rstd_c = 1 / sqrt(var_c + eps)
    pooled[b, c] = sum_p z[b, c, p] / HW
    logits[b] = W_cls @ pooled[b] + b_cls   [K],   conf[b] = w_conf @ pooled[b] + b_conf
the two heads applied as one [K+1, C] matrix. For the backward it also writes float32 per-sample
rows [B, C]: pooled (with the heads), and with batch norm the count of values the ReLU passes and
the sum of their x_hat = (x - mean) * rstd. One program per sample, channel block by channel
block, in any layout where h and w flatten into one stride; without the heads (larger than
HEADS_IN_KERNEL_MAX weights, which every program would read whole) it writes pooled in x's dtype
for torch's linear layers, and may split a sample's channels over programs (channel_splits).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..dtypes import compute_dtype, tl_dtype, written_dtype
from .common import batch_norm_fold, blocks, bn_tensors, channel_range, channel_splits, flat_strides, layout, tile
from .statistics import (batch_stats, launch_merge, launch_statistics, merge_block_s, merge_in_forward,
                         merge_partials, statistics_of, store_statistics)


@triton.jit
def _heads_forward(pooled_ptr, cls_weight_ptr, cls_bias_ptr, conf_weight_ptr, conf_bias_ptr, logits_ptr, conf_ptr,
                   C, K, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, COMPUTE: tl.constexpr):
    """One sample's logits [K] and confidence logit from its pooled row [C] (just written by this
    program): rows 0..K-1 of the [K+1, C] heads are the class head, row K the confidence head."""
    tl.debug_barrier()  # the pooled row is read back by other threads than wrote it
    for k0 in range(0, K + 1, BLOCK_K):
        rows = k0 + tl.arange(0, BLOCK_K)
        is_class, is_conf = rows < K, rows == K
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


@triton.jit
def _exit_head_forward_kernel(
    x_ptr,  # [B, C, H*W] strides (stride_b, stride_c, stride_hw)
    cls_weight_ptr, cls_bias_ptr,  # [K, C] contiguous, [K] (HEADS)
    conf_weight_ptr, conf_bias_ptr,  # [1, C], [1] (HEADS)
    bn_weight_ptr, bn_bias_ptr,  # [C] each (BN)
    mean_ptr, var_ptr,  # [C] each (BN, not MERGE): the statistics to normalise with
    partials_ptr,  # [3, S, C] (MERGE): the split statistics kernel's partials
    stats_ptr, running_mean_ptr, running_var_ptr,  # (MERGE, program 0) [3, C] out, [C] updated (UPDATE)
    logits_ptr,  # [B, K] out (HEADS); without the heads [B, C] out: pooled, in its dtype
    conf_ptr,  # [B] out (HEADS)
    per_sample_ptr,  # [1 or 3, B, C] out, float32/64: pooled (HEADS), then (BN_SUMS) passed count, x_hat sum
    C, HW, K, S, stride_b, stride_c, stride_hw, eps, momentum_hi, momentum_lo,
    BN: tl.constexpr, RELU: tl.constexpr, BN_SUMS: tl.constexpr, MERGE: tl.constexpr, UPDATE: tl.constexpr,
    HEADS: tl.constexpr, LAYOUT: tl.constexpr, VEC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, COMPUTE: tl.constexpr,
):
    """Program (b, j): sample b (its j-th share of channels without the heads). With MERGE each
    program merges the batch statistics from the partials itself, and program 0 stores them."""
    b = tl.program_id(0)
    x_row = x_ptr + b.to(tl.int64) * stride_b
    # (pooled's pointer is one of these, not an argument more: that one spilled 8 bytes on sm_90 in
    # the fp32 8x8 forward that merges the statistics)
    if HEADS:
        pooled_ptr, sums_ptr = per_sample_ptr, per_sample_ptr + tl.num_programs(0) * C
        c_begin, c_end = 0, C
    else:
        pooled_ptr, sums_ptr = logits_ptr, per_sample_ptr
        c_begin, c_end = channel_range(tl.program_id(1), tl.num_programs(1), C, BLOCK_C)
    for c0 in range(c_begin, c_end, BLOCK_C):
        channels = c0 + tl.arange(0, BLOCK_C)
        c_mask = channels < C
        if BN:
            if MERGE:
                merged_mean, m2, count = merge_partials(partials_ptr, channels, c_mask, C, S, BLOCK_S, COMPUTE)
                first = tl.load(x_ptr + channels.to(tl.int64) * stride_c, mask=c_mask, other=0.0).to(COMPUTE)
                mean, var, _ = statistics_of(count, merged_mean, m2, first)
                store_statistics(stats_ptr, partials_ptr, running_mean_ptr, running_var_ptr, channels,
                                 c_mask & (b == 0), C, count, merged_mean, m2, first, momentum_hi, momentum_lo, False,
                                 UPDATE, COMPUTE)
            else:
                mean = tl.load(mean_ptr + channels, mask=c_mask, other=0.0).to(COMPUTE)
                var = tl.load(var_ptr + channels, mask=c_mask, other=1.0).to(COMPUTE)
            scale, shift, rstd = batch_norm_fold(bn_weight_ptr, bn_bias_ptr, channels, c_mask, mean, var, eps, COMPUTE)
        total = tl.zeros([BLOCK_C], COMPUTE)
        passed_count = tl.zeros([BLOCK_C], COMPUTE)
        passed_x_hat = tl.zeros([BLOCK_C], COMPUTE)
        for p0 in range(0, HW, BLOCK_HW):
            pointers, mask = tile(x_row, channels, p0 + tl.arange(0, BLOCK_HW), c_mask, HW, stride_c, stride_hw,
                                  LAYOUT, VEC)
            x = tl.load(pointers, mask=mask, other=0.0).to(COMPUTE)
            z = x
            if BN:
                z = x * scale[:, None] + shift[:, None]
            passed = mask
            if RELU:
                passed = mask & (z > 0.0)
            total += tl.sum(tl.where(passed, z, 0.0), axis=1)
            if BN_SUMS:
                passed_count += tl.sum(passed.to(COMPUTE), axis=1)
                passed_x_hat += tl.sum(tl.where(passed, (x - mean[:, None]) * rstd[:, None], 0.0), axis=1)
        tl.store(pooled_ptr + b * C + channels, (total / HW).to(pooled_ptr.dtype.element_ty), mask=c_mask)
        if BN_SUMS:
            tl.store(sums_ptr + b * C + channels, passed_count, mask=c_mask)
            tl.store(sums_ptr + tl.num_programs(0) * C + b * C + channels, passed_x_hat, mask=c_mask)
    if HEADS:
        _heads_forward(pooled_ptr + b * C, cls_weight_ptr, cls_bias_ptr, conf_weight_ptr, conf_bias_ptr,
                       logits_ptr + b * K, conf_ptr + b, C, K, BLOCK_C, BLOCK_K, COMPUTE)


def forward(x, heads, bn_weight, bn_bias, mean, var, eps, relu, bn_sums, merge=None):
    """(outputs, per_sample [1 or 3, B, C], or [2 or 0, B, C] without heads). With ``heads =
    (cls_weight, cls_bias, conf_weight, conf_bias)`` outputs are (logits [B, K], conf [B]); with
    None, (pooled [B, C],) in x's dtype. Batch norm with (mean, var), or with ``merge =
    (partials, stats, running_update, momentum)`` from the statistics kernel's partials (written
    into stats, and running_update applied); none where both are None."""
    batch, channels, height, width = x.shape
    x, (stride_b, stride_c, stride_hw) = flat_strides(x)
    compute, out_dtype = compute_dtype(x.dtype), written_dtype(x.dtype)
    per_sample = torch.empty(int(heads is not None) + 2 * bn_sums, batch, channels, dtype=compute, device=x.device)
    if heads is None:
        logits = torch.empty(batch, channels, dtype=out_dtype, device=x.device)  # pooled
        conf = cls_weight = cls_bias = conf_weight = conf_bias = logits  # unread
        classes = 0
    else:
        cls_weight, cls_bias, conf_weight, conf_bias = heads
        cls_weight, cls_bias = cls_weight.contiguous(), cls_bias.contiguous()
        conf_weight, conf_bias = conf_weight.contiguous(), conf_bias.contiguous()
        classes = cls_weight.shape[0]
        logits = torch.empty(batch, classes, dtype=out_dtype, device=x.device)
        conf = torch.empty(batch, dtype=out_dtype, device=x.device)
    if batch > 0:
        kind, vec = layout(x, (stride_b, stride_c, stride_hw))
        block_c, block_hw, block_k = blocks(channels, height * width, classes + 1, kind, vec)
        bn = mean is not None or merge is not None
        partials = stats = running_mean = running_var = per_sample  # (unread without merge)
        splits, block_s, update, momentum = 0, 1, False, (0.0, 0.0)
        if merge is not None:
            partials, stats, running_update, momentum = merge
            splits, update = partials.shape[1], running_update is not None
            block_s = merge_block_s(splits, block_c)
            running_mean, running_var = running_update[:2] if update else (stats, stats)
        grid = (batch, 1 if heads is not None else channel_splits(batch, channels, height * width, block_c))
        _exit_head_forward_kernel[grid](
            x, cls_weight, cls_bias, conf_weight, conf_bias, *bn_tensors(x, bn_weight, bn_bias, mean, var, bn), partials,
            stats, running_mean, running_var, logits, conf, per_sample, channels, height * width, classes, splits,
            stride_b, stride_c, stride_hw, float(eps), *momentum, BN=bn, RELU=relu, BN_SUMS=bn_sums, MERGE=merge is not None, UPDATE=update,
            HEADS=heads is not None, LAYOUT=kind, VEC=vec, BLOCK_C=block_c, BLOCK_HW=block_hw, BLOCK_K=block_k,
            BLOCK_S=block_s, COMPUTE=tl_dtype(compute))
    outputs = (logits,) if heads is None else (logits, conf)
    if out_dtype != x.dtype:  # (the interpreter's bfloat16: see written_dtype)
        outputs = tuple(t.to(x.dtype) for t in outputs)
    return outputs, per_sample


def training_forward(x, heads, bn_weight, bn_bias, running_mean, running_var, eps, batch_stats_, relu,
                     running_update=None):
    """(*outputs, per_sample, stats [3, C], or [0, C] without batch statistics). With ``batch_stats_``
    batch norm normalises with the batch's statistics, computed here (and ``running_update``
    applied: see statistics.batch_stats); otherwise with the running ones, if given. Split
    statistics few against each sample's map are merged by the forward kernel: two launches, not three."""
    merge = None
    if not batch_stats_:
        mean, var = running_mean, running_var
        stats = x.new_empty(0, x.shape[1], dtype=compute_dtype(x.dtype))
    elif x.numel() == 0:
        stats = batch_stats(x)
        mean, var = stats[0], stats[1]
    else:
        stats, partials, momentum = launch_statistics(x, running_update)
        mean, var = stats[0], stats[1]
        if partials is not None and merge_in_forward(partials.shape[1], x.shape[2] * x.shape[3]):
            mean = var = None
            merge = (partials, stats, running_update, momentum)
        elif partials is not None:
            launch_merge(x, partials, stats, running_update, momentum)
    outputs, per_sample = forward(x, heads, bn_weight, bn_bias, mean, var, eps, relu,
                                  batch_stats_ or mean is not None, merge)
    return (*outputs, per_sample, stats)
