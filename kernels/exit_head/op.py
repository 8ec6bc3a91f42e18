"""The exit head as a PyTorch op: ``eefast::exit_head_fused`` and its backward, with fake kernels
and autograd (torch.compile, opcheck); ``ExitHeadFunction``, the same formulas for eager
autograd; ``inference``, one launch without autograd. The heads are optional throughout: without
them (heads of more than HEADS_IN_KERNEL_MAX weights) the op stops at the pooled features."""

from __future__ import annotations

import torch
from torch import Tensor

from ..dtypes import compute_dtype
from .backward import backward
from .common import flat_strides
from .forward import forward, training_forward

# Heads of up to this many weights ((K+1) * C) are applied in the kernels, where every per-sample
# program reads all of them; larger ones (K=1000, a plain exit's C*H*W features) are torch's
# linear layers on the pooled features, which read them once.
HEADS_IN_KERNEL_MAX = 16384


def heads_in_kernel(classes: int, channels: int) -> bool:
    """Whether heads of K classes on C channels are applied in the kernels."""
    return (classes + 1) * channels <= HEADS_IN_KERNEL_MAX


def _heads(cls_weight, cls_bias, conf_weight, conf_bias) -> tuple[Tensor, ...] | None:
    """The four head tensors, or None for the op without heads."""
    if cls_weight is None and cls_bias is None and conf_weight is None and conf_bias is None:
        return None
    if cls_weight is None or cls_bias is None or conf_weight is None or conf_bias is None:
        raise ValueError("exit_head_fused: expected all four head tensors (cls_weight, cls_bias, conf_weight, "
                         "conf_bias) or none, got some None")
    return cls_weight, cls_bias, conf_weight, conf_bias


def check(x: Tensor, heads, bn_tensors) -> None:
    """ValueError naming what the op expected of x [B, C, H, W], the heads and the batch norm's [C]
    tensors, and what it was given."""
    if x.dim() != 4:
        raise ValueError(f"exit_head_fused: expected x of shape [B, C, H, W], got {list(x.shape)}")
    channels = x.shape[1]
    for tensor in bn_tensors:
        if tensor is not None and tensor.shape != (channels,):
            raise ValueError(f"exit_head_fused: expected batch-norm tensors of shape [{channels}], "
                             f"got {list(tensor.shape)}")
    if heads is None:
        return
    cls_weight, cls_bias, conf_weight, conf_bias = heads
    if cls_weight.dim() != 2 or cls_weight.shape[1] != channels or cls_bias.shape != (cls_weight.shape[0],):
        raise ValueError(f"exit_head_fused: expected cls_weight [K, {channels}] and cls_bias [K], "
                         f"got {list(cls_weight.shape)} and {list(cls_bias.shape)}")
    if conf_weight.shape != (1, channels) or conf_bias.shape != (1,):
        raise ValueError(f"exit_head_fused: expected conf_weight [1, {channels}] and conf_bias [1], "
                         f"got {list(conf_weight.shape)} and {list(conf_bias.shape)}")
    if not heads_in_kernel(cls_weight.shape[0], channels):
        raise ValueError(
            f"exit_head_fused: expected heads of at most HEADS_IN_KERNEL_MAX = {HEADS_IN_KERNEL_MAX} weights "
            f"((K+1) * C), got {(cls_weight.shape[0] + 1) * channels} (K={cls_weight.shape[0]}, C={channels}); "
            "larger heads go to torch's linear layers on the pooled features (the op without heads)")


def inference(x: Tensor, heads, bn_stats, relu: bool) -> tuple[Tensor, ...]:
    """(logits [B, K], conf [B]), or (pooled [B, C],) for heads None: one launch on the parameters
    as stored, ``bn_stats = (weight, bias, running_mean, running_var, eps)`` (or None) folded in."""
    bn_weight, bn_bias, mean, var, eps = (None, None, None, None, 0.0) if bn_stats is None else bn_stats
    check(x, heads, (bn_weight, bn_bias, mean, var))
    return forward(x, heads, bn_weight, bn_bias, mean, var, eps, relu, False)[0]


def _forward(x, cls_weight, cls_bias, conf_weight, conf_bias, bn_weight, bn_bias, running_mean, running_var, eps,
             batch_stats, relu, running_update=None):
    heads = _heads(cls_weight, cls_bias, conf_weight, conf_bias)
    check(x, heads, (bn_weight, bn_bias, running_mean, running_var))
    *outputs, per_sample, stats = training_forward(x, heads, bn_weight, bn_bias, running_mean, running_var, eps,
                                                   batch_stats, relu, running_update)
    conf = outputs[1] if heads is not None else x.new_empty(0)
    return outputs[0], conf, per_sample, stats


@torch.library.custom_op("eefast::exit_head_fused", mutates_args=())
def exit_head_fused(
    x: Tensor, cls_weight: Tensor | None, cls_bias: Tensor | None, conf_weight: Tensor | None,
    conf_bias: Tensor | None, bn_weight: Tensor | None, bn_bias: Tensor | None, running_mean: Tensor | None,
    running_var: Tensor | None, eps: float, batch_stats: bool, relu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, conf, per_sample, stats) of relu?(batch_norm?(x)) pooled, then both heads: out = logits
    [B, K] and conf [B]; without the heads out = pooled [B, C] and conf [0]. per_sample [rows, B, C]
    is what the backward needs of x; stats [3, C] the batch statistics ([0, C] without)."""
    return _forward(x, cls_weight, cls_bias, conf_weight, conf_bias, bn_weight, bn_bias, running_mean, running_var,
                    eps, batch_stats, relu)


@exit_head_fused.register_fake
def _(x, cls_weight, cls_bias, conf_weight, conf_bias, bn_weight, bn_bias, running_mean, running_var, eps,
      batch_stats, relu):
    heads = _heads(cls_weight, cls_bias, conf_weight, conf_bias)
    check(x, heads, (bn_weight, bn_bias, running_mean, running_var))
    (batch, channels), compute = x.shape[:2], compute_dtype(x.dtype)
    rows = int(heads is not None) + (2 if batch_stats or running_mean is not None else 0)
    out = x.new_empty(batch, channels) if heads is None else x.new_empty(batch, cls_weight.shape[0])
    return (out, x.new_empty(0 if heads is None else batch), x.new_empty(rows, batch, channels, dtype=compute),
            x.new_empty(3 if batch_stats else 0, channels, dtype=compute))


@torch.library.custom_op("eefast::exit_head_fused_backward", mutates_args=())
def exit_head_fused_backward(
    grad_out: Tensor, grad_conf: Tensor, x: Tensor, cls_weight: Tensor | None, conf_weight: Tensor | None,
    bn_weight: Tensor | None, bn_bias: Tensor | None, mean: Tensor | None, var: Tensor | None, per_sample: Tensor,
    eps: float, batch_stats: bool, relu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dL/dx, dL/d heads [K+1, C], dL/d biases [K+1], dL/d batch-norm (bias, weight) [2 or 0, C]);
    without the heads grad_out is dL/dpooled and the heads' gradients are [0, C] and [0]."""
    grad_x, grad_weight, grad_bias, grad_bn = backward(grad_out, grad_conf, x, cls_weight, conf_weight, bn_weight,
                                                       bn_bias, mean, var, per_sample, eps, batch_stats, relu)
    if grad_weight is None:
        grad_weight, grad_bias = x.new_empty(0, x.shape[1]), x.new_empty(0)
    return grad_x, grad_weight, grad_bias, grad_bn


@exit_head_fused_backward.register_fake
def _(grad_out, grad_conf, x, cls_weight, conf_weight, bn_weight, bn_bias, mean, var, per_sample, eps, batch_stats,
      relu):
    heads = 0 if cls_weight is None else cls_weight.shape[0] + 1
    weight = x if cls_weight is None else cls_weight
    grad_x = torch.empty_strided(x.shape, flat_strides(x)[0].stride(), dtype=x.dtype, device=x.device)
    bn_dtype = per_sample.dtype if bn_weight is None else bn_weight.dtype
    return (grad_x, weight.new_empty(heads, x.shape[1]), weight.new_empty(heads),
            per_sample.new_empty((0 if mean is None else 2, x.shape[1]), dtype=bn_dtype))


def _setup_context(ctx, inputs, output):
    x, cls_weight, _, conf_weight, _, bn_weight, bn_bias, running_mean, running_var, eps, batch_stats, relu = inputs
    per_sample, stats = output[2:]
    mean, var = (stats[0], stats[1]) if batch_stats else (running_mean, running_var)
    ctx.eps, ctx.batch_stats, ctx.relu = eps, batch_stats, relu
    ctx.heads, ctx.has_bn_weight, ctx.has_bn_bias = cls_weight is not None, bn_weight is not None, bn_bias is not None
    ctx.save_for_backward(x, cls_weight, conf_weight, bn_weight, bn_bias, mean, var, per_sample)
    ctx.mark_non_differentiable(per_sample, stats)


def _backward(ctx, grad_out, grad_conf, grad_per_sample, grad_stats, launch=exit_head_fused_backward):
    x, cls_weight, conf_weight, bn_weight, bn_bias, mean, var, per_sample = ctx.saved_tensors
    batch, channels = x.shape[:2]
    if grad_out is None:
        grad_out = x.new_zeros(batch, cls_weight.shape[0] if ctx.heads else channels)
    if grad_conf is None:
        grad_conf = x.new_zeros(batch if ctx.heads else 0)
    grad_x, grad_weight, grad_bias, grad_bn = launch(grad_out, grad_conf, x, cls_weight, conf_weight, bn_weight,
                                                     bn_bias, mean, var, per_sample, ctx.eps, ctx.batch_stats,
                                                     ctx.relu)
    classes = cls_weight.shape[0] if ctx.heads else 0
    heads = (grad_weight[:classes], grad_bias[:classes], grad_weight[classes:], grad_bias[classes:]) if ctx.heads \
        else (None,) * 4
    return (grad_x, *heads, grad_bn[1] if ctx.has_bn_weight else None, grad_bn[0] if ctx.has_bn_bias else None,
            None, None, None, None, None)


exit_head_fused.register_autograd(_backward, setup_context=_setup_context)


class ExitHeadFunction(torch.autograd.Function):
    """``exit_head_fused`` for eager autograd: the same launchers and formulas without the
    dispatcher's custom-op layers (host time per training step: 419 against 725 us on the H200,
    benchmarks/results/h200-exit-head-profile.txt). ``apply(*op_args, running_update)``: with
    batch statistics and ``running_update = (running_mean, running_var, momentum)`` the kernels
    update those too, which a custom op registering autograd cannot (it may not mutate inputs)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _forward(*inputs)
        _setup_context(ctx, inputs[:-1], output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        if torch.is_grad_enabled():  # create_graph: the custom op, which says it has no double backward
            return *_backward(ctx, *grads), None
        return *_backward(ctx, *grads, launch=backward), None
