"""Fused exit head: (x * scale + shift) -> ReLU -> global average pool -> both linear heads.

Top to bottom: the forward and backward kernels, their launchers, and the custom ops
``eefast::exit_head_fused`` (+ its backward) registered with fake kernels and autograd.

``exit_head_fused(x [B, C, H, W], weight [K+1, C], bias [K+1], scale [C]?, shift [C]?, relu)``
returns ``out [B, K+1]`` (the class logits and, in the last column, the confidence logit) and
``pooled [B, C]`` (float32, kept for the backward). One program per sample reads its feature
map once, channel block by channel block (NCHW or channels_last: any layout where h and w
flatten into one stride), and then applies the two heads as one [K+1, C] matrix. Batch norm
enters as a per-channel scale and shift (in training mode eefast.ops computes them from the
batch statistics with autograd, so their gradient reaches x through torch). A ``plain`` exit is
the same kernel on x viewed as [B, C*H*W, 1, 1].

Inference (no autograd, no torch.compile) skips the custom op: ``exit_head_inference_launch``
runs the same kernel on the parameters as stored, the [K+1, C] matrix's rows 0..K-1 read from
the class head and row K from the confidence head, and eval-mode batch norm folded from its
running statistics inside the kernel: one launch, nothing prepared per call or cached.

The backward writes dL/dx in x's layout and per-sample partial sums for dL/dscale and
dL/dshift; the heads' gradients are two small matrix products. Arithmetic is in float32
(float64 for float64 inputs).

Imports torch and triton only.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import FastLauncher

# ---- kernels ---------------------------------------------------------------------------------


_FORWARD_INTS = ["C", "HW", "K1", "stride_b", "stride_c", "stride_hw"]
_FORWARD_POINTERS = ["x_ptr", "weight_ptr", "bias_ptr", "conf_weight_ptr", "conf_bias_ptr", "scale_ptr",
                     "shift_ptr", "mean_ptr", "var_ptr", "out_ptr", "pooled_ptr"]


# No value-based specialisation: the binaries are launched again by key (kernels/launch.py).
@triton.jit(do_not_specialize=_FORWARD_INTS, do_not_specialize_on_alignment=_FORWARD_POINTERS)
def _exit_head_forward_kernel(
    x_ptr,  # [B, C, H*W] features, strides (stride_b, stride_c, stride_hw)
    weight_ptr,  # [K1, C] both heads (K1 = K + 1), contiguous; SPLIT_HEADS: [K, C], the class head only
    bias_ptr,  # [K1]; SPLIT_HEADS: [K]
    conf_weight_ptr,  # [1, C] (SPLIT_HEADS: the confidence head, row K of the [K1, C] matrix)
    conf_bias_ptr,  # [1] (SPLIT_HEADS)
    scale_ptr,  # [C] (HAS_AFFINE); BN_STATS: the batch norm's weight
    shift_ptr,  # [C] (HAS_AFFINE); BN_STATS: the batch norm's bias
    mean_ptr,  # [C] running mean (BN_STATS)
    var_ptr,  # [C] running variance (BN_STATS)
    out_ptr,  # [B, K1] out
    pooled_ptr,  # [B, C] out, contiguous
    C, HW, K1, stride_b, stride_c, stride_hw, eps,
    HAS_AFFINE: tl.constexpr, BN_STATS: tl.constexpr, SPLIT_HEADS: tl.constexpr, RELU: tl.constexpr,
    HW_CONTIGUOUS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_K: tl.constexpr, COMPUTE: tl.constexpr,
):
    b = tl.program_id(0)
    x_row = x_ptr + b.to(tl.int64) * stride_b
    # 1. pool the (normalised, rectified) feature map, channel block by channel block
    for c0 in range(0, C, BLOCK_C):
        channels = c0 + tl.arange(0, BLOCK_C)
        c_mask = channels < C
        if HAS_AFFINE:
            scale = tl.load(scale_ptr + channels, mask=c_mask, other=0.0).to(COMPUTE)
            shift = tl.load(shift_ptr + channels, mask=c_mask, other=0.0).to(COMPUTE)
            if BN_STATS:  # fold the running statistics: w / sqrt(var + eps), b - mean * w / sqrt(var + eps)
                mean = tl.load(mean_ptr + channels, mask=c_mask, other=0.0).to(COMPUTE)
                var = tl.load(var_ptr + channels, mask=c_mask, other=1.0).to(COMPUTE)
                scale = scale / tl.sqrt(var + eps)
                shift = shift - mean * scale
        total = tl.zeros([BLOCK_C], COMPUTE)
        for p0 in range(0, HW, BLOCK_HW):
            pixels = p0 + tl.arange(0, BLOCK_HW)
            mask = c_mask[:, None] & (pixels < HW)[None, :]
            pixel_offsets = pixels if HW_CONTIGUOUS else pixels * stride_hw
            x = tl.load(x_row + channels[:, None] * stride_c + pixel_offsets[None, :], mask=mask, other=0.0)
            z = x.to(COMPUTE)
            if HAS_AFFINE:
                z = z * scale[:, None] + shift[:, None]
            if RELU:
                z = tl.maximum(z, 0.0)
            total += tl.sum(tl.where(mask, z, 0.0), axis=1)
        tl.store(pooled_ptr + b * C + channels, total / HW, mask=c_mask)
    tl.debug_barrier()  # this program reads back the pooled row it wrote
    # 2. both heads: out[k] = sum_c pooled[c] * weight[k, c] + bias[k]
    for k0 in range(0, K1, BLOCK_K):
        rows = k0 + tl.arange(0, BLOCK_K)
        k_mask = rows < K1
        class_rows = (rows < K1 - 1) if SPLIT_HEADS else k_mask  # rows read from weight_ptr
        acc = tl.zeros([BLOCK_K], COMPUTE)
        for c0 in range(0, C, BLOCK_C):
            channels = c0 + tl.arange(0, BLOCK_C)
            c_mask = channels < C
            pooled = tl.load(pooled_ptr + b * C + channels, mask=c_mask, other=0.0)
            w = tl.load(weight_ptr + rows[:, None] * C + channels[None, :],
                        mask=class_rows[:, None] & c_mask[None, :], other=0.0).to(COMPUTE)
            if SPLIT_HEADS:  # row K1 - 1 from the confidence head
                w += tl.load(conf_weight_ptr + (rows[:, None] - (K1 - 1)) * C + channels[None, :],
                             mask=(rows == K1 - 1)[:, None] & c_mask[None, :], other=0.0).to(COMPUTE)
            acc += tl.sum(w * pooled[None, :], axis=1)
        acc += tl.load(bias_ptr + rows, mask=class_rows, other=0.0).to(COMPUTE)
        if SPLIT_HEADS:
            acc += tl.load(conf_bias_ptr + (rows - (K1 - 1)), mask=rows == K1 - 1, other=0.0).to(COMPUTE)
        tl.store(out_ptr + b * K1 + rows, acc.to(out_ptr.dtype.element_ty), mask=k_mask)


_BACKWARD_INTS = ["C", "HW", "stride_b", "stride_c", "stride_hw"]
_BACKWARD_POINTERS = ["grad_pooled_ptr", "x_ptr", "scale_ptr", "shift_ptr", "grad_x_ptr", "grad_scale_ptr",
                      "grad_shift_ptr"]


@triton.jit(do_not_specialize=_BACKWARD_INTS, do_not_specialize_on_alignment=_BACKWARD_POINTERS)
def _exit_head_backward_kernel(
    grad_pooled_ptr,  # [B, C] dL/d pooled, contiguous, float32/64
    x_ptr,  # [B, C, H*W] strides (stride_b, stride_c, stride_hw)
    scale_ptr,  # [C]
    shift_ptr,  # [C]
    grad_x_ptr,  # [B, C, H*W] out, same strides as x
    grad_scale_ptr,  # [B, C] out: per-sample partial sums of dL/dscale
    grad_shift_ptr,  # [B, C] out: per-sample partial sums of dL/dshift
    C, HW, stride_b, stride_c, stride_hw,
    HAS_AFFINE: tl.constexpr, RELU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, COMPUTE: tl.constexpr,
):
    b = tl.program_id(0)
    x_row = x_ptr + b.to(tl.int64) * stride_b
    grad_x_row = grad_x_ptr + b.to(tl.int64) * stride_b
    for c0 in range(0, C, BLOCK_C):
        channels = c0 + tl.arange(0, BLOCK_C)
        c_mask = channels < C
        grad_z = tl.load(grad_pooled_ptr + b * C + channels, mask=c_mask, other=0.0).to(COMPUTE) / HW
        if HAS_AFFINE:
            scale = tl.load(scale_ptr + channels, mask=c_mask, other=0.0).to(COMPUTE)
            shift = tl.load(shift_ptr + channels, mask=c_mask, other=0.0).to(COMPUTE)
        sum_gx = tl.zeros([BLOCK_C], COMPUTE)
        sum_g = tl.zeros([BLOCK_C], COMPUTE)
        for p0 in range(0, HW, BLOCK_HW):
            pixels = p0 + tl.arange(0, BLOCK_HW)
            mask = c_mask[:, None] & (pixels < HW)[None, :]
            offsets = channels[:, None] * stride_c + pixels[None, :] * stride_hw
            x = tl.load(x_row + offsets, mask=mask, other=0.0).to(COMPUTE)
            g = grad_z[:, None] + tl.zeros([BLOCK_C, BLOCK_HW], COMPUTE)  # dL/dz
            if RELU:
                z = x
                if HAS_AFFINE:
                    z = x * scale[:, None] + shift[:, None]
                g = tl.where(z > 0.0, g, 0.0)
            g = tl.where(mask, g, 0.0)
            grad_x = g
            if HAS_AFFINE:
                grad_x = g * scale[:, None]
                sum_gx += tl.sum(g * x, axis=1)
                sum_g += tl.sum(g, axis=1)
            tl.store(grad_x_row + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
        if HAS_AFFINE:
            tl.store(grad_scale_ptr + b * C + channels, sum_gx, mask=c_mask)
            tl.store(grad_shift_ptr + b * C + channels, sum_g, mask=c_mask)


# ---- launchers -------------------------------------------------------------------------------

_launch_forward = FastLauncher(_exit_head_forward_kernel)
_launch_backward = FastLauncher(_exit_head_backward_kernel)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _interpreted_bf16(dtype: torch.dtype) -> bool:
    """The interpreter truncates float32 -> bfloat16 casts (a GPU rounds to nearest even): there
    bfloat16 outputs are written in float32 and rounded by torch."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


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


def _check(x: Tensor, weight: Tensor, bias: Tensor, scale: Tensor | None, shift: Tensor | None,
           classes_only: bool = False) -> None:
    if x.dim() != 4:
        raise ValueError(f"exit_head_fused: expected x of shape [B, C, H, W], got {list(x.shape)}")
    channels = x.shape[1]
    if weight.dim() != 2 or weight.shape[1] != channels or bias.shape != (weight.shape[0],):
        rows = "K" if classes_only else "K+1"
        raise ValueError(
            f"exit_head_fused: expected weight [{rows}, {channels}] and bias [{rows}], got {list(weight.shape)} and "
            f"{list(bias.shape)}"
        )
    if (scale is None) != (shift is None) or (scale is not None and (scale.shape != (channels,) or shift.shape != (channels,))):
        raise ValueError(f"exit_head_fused: expected scale and shift of shape [{channels}] or neither")


def exit_head_forward_launch(x, weight, bias, scale, shift, relu):
    """(out [B, K+1], pooled [B, C]): the kernel with both heads in one matrix and batch norm (if
    any) as a per-channel scale and shift."""
    _check(x, weight, bias, scale, shift)
    return _forward(x, weight, bias, None, None, scale, shift, None, relu)


def exit_head_inference_launch(x, cls_weight, cls_bias, conf_weight, conf_bias, bn_stats, relu):
    """out [B, K+1] for inference, from the parameters as they are stored: the two heads' weights
    (rows 0..K-1 and K of the [K+1, C] matrix) and biases apart, and the batch norm's eval-mode
    state ``bn_stats = (weight, bias, running_mean, running_var, eps)`` (or None) folded in the
    kernel. One launch and no other work: nothing to fold again when the parameters change, and
    a CUDA graph of it reads the parameters themselves."""
    scale, shift = (None, None) if bn_stats is None else bn_stats[:2]
    _check(x, cls_weight, cls_bias, scale, shift, classes_only=True)
    if conf_weight.shape != (1, x.shape[1]) or conf_bias.shape != (1,):
        raise ValueError(f"exit_head_inference_launch: expected conf_weight [1, {x.shape[1]}] and conf_bias [1], "
                         f"got {list(conf_weight.shape)} and {list(conf_bias.shape)}")
    return _forward(x, cls_weight, cls_bias, conf_weight, conf_bias, scale, shift, bn_stats, relu)[0]


def _forward(x, weight, bias, conf_weight, conf_bias, scale, shift, bn_stats, relu):
    batch, channels, height, width = x.shape
    split_heads = conf_weight is not None
    heads = weight.shape[0] + split_heads  # K + 1
    x, (stride_b, stride_c, stride_hw) = _flat_strides(x)
    weight, bias = weight.contiguous(), bias.contiguous()
    compute = _compute_dtype(x.dtype)
    out_dtype = torch.float32 if _interpreted_bf16(x.dtype) else x.dtype
    out = torch.empty(batch, heads, dtype=out_dtype, device=x.device)
    pooled = torch.empty(batch, channels, dtype=compute, device=x.device)
    if batch > 0:
        block_c, block_hw, block_k = _blocks(channels, height * width, heads)
        has_affine = scale is not None
        if has_affine:
            scale, shift = scale.contiguous(), shift.contiguous()
        mean, var, eps = (x, x, 0.0) if bn_stats is None else (bn_stats[2], bn_stats[3], float(bn_stats[4]))
        if split_heads:
            conf_weight, conf_bias = conf_weight.contiguous(), conf_bias.contiguous()
        hw_contiguous = stride_hw == 1
        key = (x.dtype, weight.dtype, bias.dtype, scale.dtype if has_affine else None,
               shift.dtype if has_affine else None, mean.dtype, var.dtype,
               conf_weight.dtype if split_heads else None, conf_bias.dtype if split_heads else None,
               out_dtype, bn_stats is not None, relu, hw_contiguous, block_c, block_hw, block_k)
        _launch_forward(
            key, (batch,),
            (x, weight, bias, conf_weight if split_heads else x, conf_bias if split_heads else x,
             scale if has_affine else x, shift if has_affine else x, mean, var, out, pooled,
             channels, height * width, heads, stride_b, stride_c, stride_hw, eps),
            dict(HAS_AFFINE=has_affine, BN_STATS=bn_stats is not None, SPLIT_HEADS=split_heads, RELU=relu,
                 HW_CONTIGUOUS=hw_contiguous, BLOCK_C=block_c, BLOCK_HW=block_hw, BLOCK_K=block_k,
                 COMPUTE=_tl_dtype(compute)),
        )
    return (out if out.dtype == x.dtype else out.to(x.dtype)), pooled


def exit_head_backward_launch(grad_pooled, x, scale, shift, relu):
    batch, channels, height, width = x.shape
    x, (stride_b, stride_c, stride_hw) = _flat_strides(x)
    grad_pooled = grad_pooled.contiguous()
    grad_dtype = torch.float32 if _interpreted_bf16(x.dtype) else x.dtype
    grad_x = torch.empty_strided(x.shape, x.stride(), dtype=grad_dtype, device=x.device)
    has_affine = scale is not None
    partial_shape = (batch, channels) if has_affine else (0, 0)
    grad_scale = torch.empty(partial_shape, dtype=grad_pooled.dtype, device=x.device)
    grad_shift = torch.empty(partial_shape, dtype=grad_pooled.dtype, device=x.device)
    if batch > 0:
        block_c, block_hw, _ = _blocks(channels, height * width)
        if has_affine:
            scale, shift = scale.contiguous(), shift.contiguous()
        key = (grad_pooled.dtype, x.dtype, scale.dtype if has_affine else None, shift.dtype if has_affine else None,
               grad_dtype, relu, block_c, block_hw)
        _launch_backward(
            key, (batch,),
            (grad_pooled, x, scale if has_affine else x, shift if has_affine else x, grad_x, grad_scale, grad_shift,
             channels, height * width, stride_b, stride_c, stride_hw),
            dict(HAS_AFFINE=has_affine, RELU=relu, BLOCK_C=block_c, BLOCK_HW=block_hw,
                 COMPUTE=_tl_dtype(grad_pooled.dtype)),
        )
    return grad_x.to(x.dtype), grad_scale, grad_shift


# ---- the ops ---------------------------------------------------------------------------------


@torch.library.custom_op("eefast::exit_head_fused", mutates_args=())
def exit_head_fused(
    x: Tensor, weight: Tensor, bias: Tensor, scale: Tensor | None, shift: Tensor | None, relu: bool
) -> tuple[Tensor, Tensor]:
    """(out [B, K+1], pooled [B, C]) of relu?(x * scale + shift) pooled, then both heads."""
    return exit_head_forward_launch(x, weight, bias, scale, shift, relu)


@exit_head_fused.register_fake
def _(x, weight, bias, scale, shift, relu):
    _check(x, weight, bias, scale, shift)
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[:2], dtype=_compute_dtype(x.dtype))


@torch.library.custom_op("eefast::exit_head_fused_backward", mutates_args=())
def exit_head_fused_backward(
    grad_pooled: Tensor, x: Tensor, scale: Tensor | None, shift: Tensor | None, relu: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(dL/dx in x's layout, per-sample dL/dscale [B, C], per-sample dL/dshift [B, C]); the
    partial sums are [0, 0] without scale and shift."""
    return exit_head_backward_launch(grad_pooled, x, scale, shift, relu)


@exit_head_fused_backward.register_fake
def _(grad_pooled, x, scale, shift, relu):
    if x.stride(2) != x.shape[3] * x.stride(3) and x.shape[2] > 1:
        grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    else:
        grad_x = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    partial_shape = tuple(x.shape[:2]) if scale is not None else (0, 0)
    return grad_x, grad_pooled.new_empty(partial_shape), grad_pooled.new_empty(partial_shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias, scale, shift, relu = inputs
    ctx.relu = relu
    ctx.has_affine = scale is not None
    ctx.save_for_backward(x, weight, scale, shift, output[1])


def _backward(ctx, grad_out, grad_pooled_out):
    x, weight, scale, shift, pooled = ctx.saved_tensors
    grad_out = grad_out.to(pooled.dtype)
    grad_weight = (grad_out.t() @ pooled).to(weight.dtype)  # [K+1, C]
    grad_bias = grad_out.sum(0).to(weight.dtype)  # [K+1]
    grad_pooled = grad_out @ weight.to(pooled.dtype)  # [B, C]
    if grad_pooled_out is not None:
        grad_pooled = grad_pooled + grad_pooled_out
    grad_x, grad_scale, grad_shift = exit_head_fused_backward(grad_pooled, x, scale, shift, ctx.relu)
    if not ctx.has_affine:
        return grad_x, grad_weight, grad_bias, None, None, None
    return grad_x, grad_weight, grad_bias, grad_scale.sum(0).to(scale.dtype), grad_shift.sum(0).to(shift.dtype), None


exit_head_fused.register_autograd(_backward, setup_context=_setup_context)
