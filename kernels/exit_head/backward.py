"""The exit head's backward (the VJP of forward.py), from dL/d (logits, conf) or dL/d pooled.

With G[b] = [dL/dlogits[b], dL/dconf[b]] [K+1] and W the [K+1, C] heads:
    dL/dpooled[b] = W^T G[b],   dL/dW = sum_b G[b] pooled[b]^T,   dL/d biases = sum_b G[b]
    dL/dz[b, c, p] = dL/dpooled[b, c] / HW  where the ReLU passes (z > 0), else 0
    batch norm:  dL/dbias_c = sum_{b,p} dL/dz = sum_b dL/dpooled[b, c] / HW * passed_count[b, c]
                 dL/dweight_c = sum_{b,p} dL/dz * x_hat = sum_b dL/dpooled[b, c] / HW * passed_x_hat[b, c]
    running statistics:  dL/dx = dL/dz * scale_c
    batch statistics:    dL/dx = scale_c * (dL/dz - (dL/dbias_c + x_hat * dL/dweight_c) / (B * HW))
Every sum over the batch follows from G, W and the forward's per-sample rows, without reading x:
reduce programs (a block of channels each) make them, and per-sample programs write dL/dx. With
batch statistics dL/dx needs those sums, so the reduce programs run first as a kernel of their
own; otherwise they are appended to the per-sample launch, unless a sample's channels are split
over programs (channel_splits). Without the heads dL/dpooled is the input.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dtypes import next_power_of_2, tl_dtype, written_dtype
from .common import batch_norm_fold, blocks, bn_tensors, channel_range, channel_splits, flat_strides, layout, tile


@triton.jit
def _head_rows(grad_logits_ptr, grad_conf_ptr, samples, s_mask, rows, K, gl_stride_b, gl_stride_k, gc_stride,
               COMPUTE: tl.constexpr):
    """G of the given samples as a [samples, rows] tile: rows 0..K-1 from grad_logits, K from grad_conf."""
    g = tl.load(grad_logits_ptr + samples[:, None] * gl_stride_b + rows[None, :] * gl_stride_k,
                mask=s_mask[:, None] & (rows < K)[None, :], other=0.0).to(COMPUTE)
    g += tl.load(grad_conf_ptr + samples[:, None] * gc_stride + (rows[None, :] - K),
                 mask=s_mask[:, None] & (rows == K)[None, :], other=0.0).to(COMPUTE)
    return g


@triton.jit
def _grad_pooled(grad_logits_ptr, grad_conf_ptr, cls_weight_ptr, conf_weight_ptr, samples, s_mask, channels, c_mask,
                 C, K, gl_stride_b, gl_stride_k, gc_stride, BLOCK_K: tl.constexpr, COMPUTE: tl.constexpr):
    """dL/dpooled = G @ W of the given samples and channels, [samples, channels]."""
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
                    BN: tl.constexpr, RELU: tl.constexpr, BATCH_STATS: tl.constexpr, HEADS: tl.constexpr,
                    LAYOUT: tl.constexpr, VEC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
                    BLOCK_K: tl.constexpr, COMPUTE: tl.constexpr, SPLIT: tl.constexpr):
    """Sample b's dL/dx (x's strides), or with SPLIT its share of the channels (channel_range)."""
    x_row = x_ptr + b.to(tl.int64) * stride_b
    grad_x_row = grad_x_ptr + b.to(tl.int64) * stride_b
    count = tl.cast(B, COMPUTE) * tl.cast(HW, COMPUTE)
    sample = b + tl.arange(0, 1)
    if SPLIT:
        c_begin, c_end = channel_range(tl.program_id(1), tl.num_programs(1), C, BLOCK_C)
    else:
        c_begin, c_end = 0, C
    for c0 in range(c_begin, c_end, BLOCK_C):
        channels = c0 + tl.arange(0, BLOCK_C)
        c_mask = channels < C
        if HEADS:
            grad_pool = tl.sum(_grad_pooled(grad_logits_ptr, grad_conf_ptr, cls_weight_ptr, conf_weight_ptr, sample,
                                            sample >= 0, channels, c_mask, C, K, gl_stride_b, gl_stride_k, gc_stride,
                                            BLOCK_K, COMPUTE), axis=0) / HW
        else:
            grad_pool = tl.load(grad_pooled_ptr + b * C + channels, mask=c_mask, other=0.0).to(COMPUTE) / HW
        if BN:
            mean = tl.load(mean_ptr + channels, mask=c_mask, other=0.0).to(COMPUTE)
            var = tl.load(var_ptr + channels, mask=c_mask, other=1.0).to(COMPUTE)
            scale, shift, rstd = batch_norm_fold(bn_weight_ptr, bn_bias_ptr, channels, c_mask, mean, var, eps, COMPUTE)
            if BATCH_STATS:
                total_g = tl.load(totals_ptr + channels, mask=c_mask, other=0.0).to(COMPUTE)
                total_g_xhat = tl.load(totals_ptr + C + channels, mask=c_mask, other=0.0).to(COMPUTE)
        for p0 in range(0, HW, BLOCK_HW):
            pixels = p0 + tl.arange(0, BLOCK_HW)
            grad_x_pointers, mask = tile(grad_x_row, channels, pixels, c_mask, HW, stride_c, stride_hw, LAYOUT, VEC)
            g = grad_pool[:, None] + tl.zeros([BLOCK_C, BLOCK_HW], COMPUTE)  # dL/dz
            if RELU or BATCH_STATS:  # (a pool exit reads no x)
                x_pointers, _ = tile(x_row, channels, pixels, c_mask, HW, stride_c, stride_hw, LAYOUT, VEC)
                x = tl.load(x_pointers, mask=mask, other=0.0).to(COMPUTE)
            if RELU:
                z = x
                if BN:
                    z = x * scale[:, None] + shift[:, None]
                g = tl.where(z > 0.0, g, 0.0)
            grad_x = g
            if BN:
                if BATCH_STATS:
                    x_hat = (x - mean[:, None]) * rstd[:, None]
                    grad_x = scale[:, None] * (g - (total_g[:, None] + x_hat * total_g_xhat[:, None]) / count)
                else:
                    grad_x = g * scale[:, None]
            tl.store(grad_x_pointers, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reduce_program(pid, grad_pooled_ptr, grad_logits_ptr, grad_conf_ptr, cls_weight_ptr, conf_weight_ptr,
                    per_sample_ptr, grad_weight_ptr, grad_bias_ptr, totals_ptr, B, C, HW, K, gl_stride_b, gl_stride_k,
                    gc_stride, BN: tl.constexpr, HEADS: tl.constexpr, BLOCK_B: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, COMPUTE: tl.constexpr):
    """Channel block pid's sums over the batch: dL/dW and (block 0) dL/d biases; with BN dL/d
    (batch-norm bias, weight) into totals [2, C]."""
    channels = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = channels < C
    if HEADS:
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
        sums_ptr = per_sample_ptr
        if HEADS:  # (past the pooled row)
            sums_ptr = per_sample_ptr + B * C
        sum_g = tl.zeros([BLOCK_C], COMPUTE)
        sum_g_xhat = tl.zeros([BLOCK_C], COMPUTE)
        for b0 in range(0, B, BLOCK_B):
            samples = b0 + tl.arange(0, BLOCK_B)
            s_mask = samples < B
            mask = s_mask[:, None] & c_mask[None, :]
            offsets = samples[:, None] * C + channels[None, :]
            if HEADS:
                grad_pool = _grad_pooled(grad_logits_ptr, grad_conf_ptr, cls_weight_ptr, conf_weight_ptr, samples,
                                         s_mask, channels, c_mask, C, K, gl_stride_b, gl_stride_k, gc_stride, BLOCK_K,
                                         COMPUTE)
            else:
                grad_pool = tl.load(grad_pooled_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
            sum_g += tl.sum(grad_pool * tl.load(sums_ptr + offsets, mask=mask, other=0.0), axis=0)
            sum_g_xhat += tl.sum(grad_pool * tl.load(sums_ptr + B * C + offsets, mask=mask, other=0.0), axis=0)
        tl.store(totals_ptr + channels, (sum_g / HW).to(totals_ptr.dtype.element_ty), mask=c_mask)
        tl.store(totals_ptr + C + channels, (sum_g_xhat / HW).to(totals_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _exit_head_reduce_kernel(
    grad_pooled_ptr,  # [B, C] contiguous (not HEADS)
    grad_logits_ptr, grad_conf_ptr,  # [B, K] strides (gl_stride_b, gl_stride_k), [B] stride gc_stride (HEADS)
    cls_weight_ptr, conf_weight_ptr,  # [K, C] contiguous, [1, C] (HEADS)
    per_sample_ptr,  # the forward's [1 or 3, B, C] (or [2 or 0, B, C] without heads)
    grad_weight_ptr, grad_bias_ptr,  # [K+1, C], [K+1] out (HEADS)
    totals_ptr,  # [2, C] out (BN): dL/d (batch-norm bias, weight)
    B, C, HW, K, gl_stride_b, gl_stride_k, gc_stride,
    BN: tl.constexpr, HEADS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    """A program per block of channels: _reduce_program, before the per-sample kernel."""
    _reduce_program(tl.program_id(0), grad_pooled_ptr, grad_logits_ptr, grad_conf_ptr, cls_weight_ptr, conf_weight_ptr,
                    per_sample_ptr, grad_weight_ptr, grad_bias_ptr, totals_ptr, B, C, HW, K, gl_stride_b,
                    gl_stride_k, gc_stride, BN, HEADS, BLOCK_B, BLOCK_C, BLOCK_K, COMPUTE)


@triton.jit
def _exit_head_backward_kernel(
    grad_pooled_ptr, grad_logits_ptr, grad_conf_ptr, cls_weight_ptr, conf_weight_ptr,  # as the reduce kernel's
    x_ptr,  # [B, C, H*W] strides (stride_b, stride_c, stride_hw)
    bn_weight_ptr, bn_bias_ptr, mean_ptr, var_ptr,  # [C] each (BN)
    per_sample_ptr, grad_weight_ptr, grad_bias_ptr,  # as the reduce kernel's (REDUCE)
    totals_ptr,  # [2, C]: read (BATCH_STATS, from the reduce kernel) or written (REDUCE and BN)
    grad_x_ptr,  # [B, C, H*W] out, x's strides
    B, C, HW, K, stride_b, stride_c, stride_hw, gl_stride_b, gl_stride_k, gc_stride, eps,
    BN: tl.constexpr, RELU: tl.constexpr, BATCH_STATS: tl.constexpr, HEADS: tl.constexpr,
    LAYOUT: tl.constexpr, VEC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_K: tl.constexpr,
    REDUCE: tl.constexpr, REDUCE_B: tl.constexpr, REDUCE_C: tl.constexpr, REDUCE_K: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    """Programs 0..B-1: a sample's dL/dx each (or a share of its channels, on the grid's second
    axis); with REDUCE, the programs past them do the reduce kernel's work."""
    tl.static_assert(not (REDUCE and BATCH_STATS), "with batch statistics dL/dx needs the reduce kernel's sums first")
    b = tl.program_id(0)
    # (_grad_x_program called in two places, not once under `if (b < B) | (not REDUCE)`: that form
    # spilled 8 bytes on sm_90 in the fp32 7x7 pool backward; with REDUCE the channels are never split)
    if REDUCE:
        if b < B:
            _grad_x_program(b, B, grad_pooled_ptr, grad_logits_ptr, grad_conf_ptr, cls_weight_ptr, conf_weight_ptr,
                            x_ptr, bn_weight_ptr, bn_bias_ptr, mean_ptr, var_ptr, totals_ptr, grad_x_ptr, C, HW, K,
                            stride_b, stride_c, stride_hw, gl_stride_b, gl_stride_k, gc_stride, eps, BN, RELU,
                            BATCH_STATS, HEADS, LAYOUT, VEC, BLOCK_C, BLOCK_HW, BLOCK_K, COMPUTE, False)
        else:
            _reduce_program(b - B, grad_pooled_ptr, grad_logits_ptr, grad_conf_ptr, cls_weight_ptr, conf_weight_ptr,
                            per_sample_ptr, grad_weight_ptr, grad_bias_ptr, totals_ptr, B, C, HW, K, gl_stride_b,
                            gl_stride_k, gc_stride, BN, HEADS, REDUCE_B, REDUCE_C, REDUCE_K, COMPUTE)
    else:
        _grad_x_program(b, B, grad_pooled_ptr, grad_logits_ptr, grad_conf_ptr, cls_weight_ptr, conf_weight_ptr, x_ptr,
                        bn_weight_ptr, bn_bias_ptr, mean_ptr, var_ptr, totals_ptr, grad_x_ptr, C, HW, K, stride_b,
                        stride_c, stride_hw, gl_stride_b, gl_stride_k, gc_stride, eps, BN, RELU, BATCH_STATS,
                        HEADS, LAYOUT, VEC, BLOCK_C, BLOCK_HW, BLOCK_K, COMPUTE, True)


# Values in the reduce programs' [BLOCK_B, BLOCK_K, BLOCK_C] products (158 registers on sm_90 at the
# benchmark's blocks, against 168 for 8192).
REDUCE_PRODUCT = 4096


def reduce_blocks(batch: int, channels: int, heads: int) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_C, BLOCK_K) of the reduce programs: long batch blocks (few latency-bound
    steps) and narrow channel blocks (many programs)."""
    block_b = min(next_power_of_2(max(batch, 1)), 128)
    block_k = min(next_power_of_2(heads), 16)
    return block_b, max(1, min(next_power_of_2(channels), REDUCE_PRODUCT // (block_b * block_k), 64)), block_k


def backward(grad_out, grad_conf, x, cls_weight, conf_weight, bn_weight, bn_bias, mean, var, per_sample, eps,
             batch_stats, relu):
    """(dL/dx, dL/dW [K+1, C], dL/d biases [K+1], dL/d batch-norm (bias, weight) [2 or 0, C]) from
    G = (grad_out [B, K], grad_conf [B]) with the heads (cls_weight, conf_weight), or from dL/dpooled
    = grad_out [B, C] without them (cls_weight None; dL/dW and the biases' are then None)."""
    batch, channels, height, width = x.shape
    x, (stride_b, stride_c, stride_hw) = flat_strides(x)
    compute, bn, heads = per_sample.dtype, mean is not None, cls_weight is not None
    grad_x = torch.empty_strided(x.shape, x.stride(), dtype=written_dtype(x.dtype), device=x.device)
    totals = torch.empty((2 if bn else 0, channels), dtype=compute, device=x.device)
    grad_weight = grad_bias = None
    if heads:
        classes = cls_weight.shape[0]
        cls_weight, conf_weight = cls_weight.contiguous(), conf_weight.contiguous()
        grad_weight = torch.empty(classes + 1, channels, dtype=written_dtype(cls_weight.dtype), device=x.device)
        grad_bias = torch.empty(classes + 1, dtype=grad_weight.dtype, device=x.device)
        head_args = (grad_out, grad_out, grad_conf, cls_weight, conf_weight)
        head_strides = (grad_out.stride(0), grad_out.stride(1), grad_conf.stride(0))
        out_args = (per_sample, grad_weight, grad_bias)
    else:
        grad_out = grad_out.contiguous()
        classes, head_args, head_strides = 0, (grad_out,) * 5, (0, 0, 0)
        out_args = (per_sample, grad_out, grad_out)  # (unwritten)
    if batch == 0:
        for tensor in (grad_weight, grad_bias, totals):
            if tensor is not None:
                tensor.zero_()
    else:
        reduce = heads or bn
        reduce_b, reduce_c, reduce_k = reduce_blocks(batch, channels, classes + 1) if reduce else (1, 1, 1)
        reduce_programs = -(-channels // reduce_c)
        kind, vec = layout(x, (stride_b, stride_c, stride_hw))
        block_c, block_hw, block_k = blocks(channels, height * width, classes + 1, kind, vec)
        splits = channel_splits(batch, channels, height * width, block_c)
        fused_reduce = reduce and not batch_stats and splits == 1
        sizes = (batch, channels, height * width, classes)
        if reduce and not fused_reduce:
            _exit_head_reduce_kernel[(reduce_programs,)](
                *head_args, *out_args, totals, *sizes, *head_strides, BN=bn, HEADS=heads, BLOCK_B=reduce_b,
                BLOCK_C=reduce_c, BLOCK_K=reduce_k, COMPUTE=tl_dtype(compute))
        _exit_head_backward_kernel[(batch + reduce_programs if fused_reduce else batch, splits)](
            *head_args, x, *bn_tensors(x, bn_weight, bn_bias, mean, var, bn), *out_args, totals, grad_x, *sizes,
            stride_b, stride_c, stride_hw, *head_strides, float(eps), BN=bn, RELU=relu, BATCH_STATS=batch_stats, HEADS=heads, LAYOUT=kind,
            VEC=vec, BLOCK_C=block_c, BLOCK_HW=block_hw, BLOCK_K=block_k, REDUCE=fused_reduce, REDUCE_B=reduce_b,
            REDUCE_C=reduce_c, REDUCE_K=reduce_k, COMPUTE=tl_dtype(compute))
    grad_bn = totals if bn_weight is None or totals.dtype == bn_weight.dtype else totals.to(bn_weight.dtype)
    if grad_weight is not None and grad_weight.dtype != cls_weight.dtype:  # (the interpreter's bfloat16)
        grad_weight, grad_bias = grad_weight.to(cls_weight.dtype), grad_bias.to(cls_weight.dtype)
    return grad_x.to(x.dtype), grad_weight, grad_bias, grad_bn
