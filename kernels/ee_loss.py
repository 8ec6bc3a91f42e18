"""Fused EENet loss: the recursive mixtures Y_n / C_n of Eqs. 6-9 in log space, forward and backward.

Top to bottom: jit helpers, the forward and backward kernels, their launchers, and the custom ops
``eefast::ee_loss_parts`` (+ its backward) registered with fake kernels and autograd.

``ee_loss_parts(logits [E, B, K], conf_logits [E-1, B], target [B], costs [E])`` returns, per exit
and sample, ``ce = -log Y_n[target]`` and ``cost = C_n`` (each [E, B]), and the log-sum-exp of
each exit's logits ([E, B], saved for the backward). Every loss version is a weighted sum of
these parts (``eefast.reference.eenet_loss``), so the autograd formula takes any gradient of
them. Each program handles BLOCK_B samples: it reads each exit's logits once (an online
log-sum-exp over K in BLOCK_K chunks) and runs the E-step recursions in registers; the backward
re-reads the logits once and writes their gradient once. Nothing of size [E, B, K] is allocated
beyond the gradient itself. Arithmetic is in float32 (float64 for float64 inputs).

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

# ---- jit helpers -------------------------------------------------------------------------------


@triton.jit
def _log_sigmoid(x):
    """log(sigmoid(x)), finite for every finite x."""
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _log_add_exp(a, b):
    m = tl.maximum(a, b)
    return m + tl.log(tl.exp(a - m) + tl.exp(b - m))


@triton.jit
def _row(tile, exits, n):
    """Row n of a [BLOCK_E, BLOCK_B] register tile."""
    return tl.sum(tl.where(exits == n, tile, 0.0), axis=0)


@triton.jit
def _row_log_sum_exp(
    logits_ptr,  # [B, K] one exit's logits (row stride stride_b, contiguous along K)
    rows, row_mask, K, stride_b,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, COMPUTE: tl.constexpr,
):
    """Online log-sum-exp over K of each row: [BLOCK_B]."""
    running_max = tl.full([BLOCK_B], float("-inf"), COMPUTE)
    running_sum = tl.zeros([BLOCK_B], COMPUTE)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (cols < K)[None, :]
        x = tl.load(logits_ptr + rows[:, None] * stride_b + cols[None, :], mask=mask, other=float("-inf"))
        x = x.to(COMPUTE)
        new_max = tl.maximum(running_max, tl.max(x, axis=1))
        new_max = tl.where(row_mask, new_max, 0.0)  # rows past B: keep the arithmetic finite
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max[:, None]), axis=1)
        running_max = new_max
    return running_max + tl.log(tl.where(row_mask, running_sum, 1.0))


@triton.jit
def _mixtures(
    logits_ptr, conf_ptr, target, costs_ptr,
    lse_tile,  # [BLOCK_E, BLOCK_B] log-sum-exp of each exit's logits
    rows, row_mask, B, stride_e, stride_b,
    E: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr, COMPUTE: tl.constexpr,
):
    """log Y_n[target] and C_n of every exit, as [BLOCK_E, BLOCK_B] tiles (Eqs. 6-9, from exit N down)."""
    exits = tl.arange(0, BLOCK_E)[:, None]
    log_mix = tl.zeros([BLOCK_E, BLOCK_B], COMPUTE)
    mix_cost = tl.zeros([BLOCK_E, BLOCK_B], COMPUTE)
    lse = _row(lse_tile, exits, E - 1)
    target_logit = tl.load(logits_ptr + (E - 1) * stride_e + rows * stride_b + target, mask=row_mask, other=0.0)
    log_y = target_logit.to(COMPUTE) - lse  # log y_N[target]
    cost = tl.load(costs_ptr + (E - 1)).to(COMPUTE) + tl.zeros([BLOCK_B], COMPUTE)
    log_mix = tl.where(exits == E - 1, log_y[None, :], log_mix)
    mix_cost = tl.where(exits == E - 1, cost[None, :], mix_cost)
    for i in tl.static_range(E - 1):
        n = E - 2 - i
        lse = _row(lse_tile, exits, n)
        target_logit = tl.load(logits_ptr + n * stride_e + rows * stride_b + target, mask=row_mask, other=0.0)
        conf = tl.load(conf_ptr + n * B + rows, mask=row_mask, other=0.0).to(COMPUTE)
        h = tl.exp(_log_sigmoid(conf))  # sigmoid without overflow
        log_y = _log_add_exp(_log_sigmoid(conf) + target_logit.to(COMPUTE) - lse, _log_sigmoid(-conf) + log_y)
        cost = h * tl.load(costs_ptr + n).to(COMPUTE) + (1.0 - h) * cost
        log_mix = tl.where(exits == n, log_y[None, :], log_mix)
        mix_cost = tl.where(exits == n, cost[None, :], mix_cost)
    return log_mix, mix_cost


# ---- kernels ---------------------------------------------------------------------------------


_INTS = ["B", "K", "stride_e", "stride_b"]


# No value-based specialisation: the binaries are launched again by key (kernels/launch.py).
@triton.jit(do_not_specialize=_INTS, do_not_specialize_on_alignment=[
    "logits_ptr", "conf_ptr", "target_ptr", "costs_ptr", "ce_ptr", "cost_ptr", "lse_ptr"])
def _ee_loss_forward_kernel(
    logits_ptr,  # [E, B, K] class logits, contiguous along K
    conf_ptr,  # [E-1, B] confidence logits, contiguous
    target_ptr,  # [B] int64
    costs_ptr,  # [E]
    ce_ptr,  # [E, B] out: -log Y_n[target]
    cost_ptr,  # [E, B] out: C_n
    lse_ptr,  # [E, B] out: log-sum-exp of logits[n, b, :]
    B, K, stride_e, stride_b,
    E: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, COMPUTE: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    target = tl.load(target_ptr + rows, mask=row_mask, other=0)
    exits = tl.arange(0, BLOCK_E)[:, None]
    lse_tile = tl.zeros([BLOCK_E, BLOCK_B], COMPUTE)
    for n in tl.static_range(E):
        lse = _row_log_sum_exp(logits_ptr + n * stride_e, rows, row_mask, K, stride_b, BLOCK_B, BLOCK_K, COMPUTE)
        lse_tile = tl.where(exits == n, lse[None, :], lse_tile)
    log_mix, mix_cost = _mixtures(
        logits_ptr, conf_ptr, target, costs_ptr, lse_tile, rows, row_mask, B, stride_e, stride_b,
        E, BLOCK_E, BLOCK_B, COMPUTE,
    )
    out_mask = (exits < E) & row_mask[None, :]
    tl.store(lse_ptr + exits * B + rows[None, :], lse_tile, mask=out_mask)
    tl.store(ce_ptr + exits * B + rows[None, :], -log_mix, mask=out_mask)
    tl.store(cost_ptr + exits * B + rows[None, :], mix_cost, mask=out_mask)


@triton.jit(do_not_specialize=_INTS, do_not_specialize_on_alignment=[
    "grad_ce_ptr", "grad_cost_ptr", "logits_ptr", "conf_ptr", "target_ptr", "costs_ptr", "lse_ptr",
    "grad_logits_ptr", "grad_conf_ptr"])
def _ee_loss_backward_kernel(
    grad_ce_ptr,  # [E, B] dL/d ce
    grad_cost_ptr,  # [E, B] dL/d cost
    logits_ptr,  # [E, B, K]
    conf_ptr,  # [E-1, B]
    target_ptr,  # [B] int64
    costs_ptr,  # [E]
    lse_ptr,  # [E, B] from the forward
    grad_logits_ptr,  # [E, B, K] out, contiguous
    grad_conf_ptr,  # [E-1, B] out
    B, K, stride_e, stride_b,
    E: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, COMPUTE: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    target = tl.load(target_ptr + rows, mask=row_mask, other=0)
    exits = tl.arange(0, BLOCK_E)[:, None]
    lse_tile = tl.load(lse_ptr + exits * B + rows[None, :], mask=(exits < E) & row_mask[None, :], other=0.0)
    log_mix, mix_cost = _mixtures(
        logits_ptr, conf_ptr, target, costs_ptr, lse_tile, rows, row_mask, B, stride_e, stride_b,
        E, BLOCK_E, BLOCK_B, COMPUTE,
    )
    # Adjoints, from exit 0 up: G_n = dL/d log Y_n and D_n = dL/d C_n, each through the later mixtures.
    adj_log_mix = -tl.load(grad_ce_ptr + rows, mask=row_mask, other=0.0).to(COMPUTE)
    adj_cost = tl.load(grad_cost_ptr + rows, mask=row_mask, other=0.0).to(COMPUTE)
    for n in tl.static_range(E):
        lse = _row(lse_tile, exits, n)
        if n < E - 1:
            target_logit = tl.load(logits_ptr + n * stride_e + rows * stride_b + target, mask=row_mask, other=0.0)
            conf = tl.load(conf_ptr + n * B + rows, mask=row_mask, other=0.0).to(COMPUTE)
            h = tl.exp(_log_sigmoid(conf))  # sigmoid without overflow
            log_here = _row(log_mix, exits, n)
            # Y_n = h y_n + (1 - h) Y_{n+1}: shares of the two terms in Y_n
            early = tl.exp(_log_sigmoid(conf) + target_logit.to(COMPUTE) - lse - log_here)
            later = tl.exp(_log_sigmoid(-conf) + _row(log_mix, exits, n + 1) - log_here)
            grad_log_y = adj_log_mix * early
            cost_next = _row(mix_cost, exits, n + 1)
            grad_conf = adj_log_mix * (early - h) + adj_cost * (tl.load(costs_ptr + n).to(COMPUTE) - cost_next) * h * (1.0 - h)
            tl.store(grad_conf_ptr + n * B + rows, grad_conf.to(grad_conf_ptr.dtype.element_ty), mask=row_mask)
            adj_log_mix = -tl.load(grad_ce_ptr + (n + 1) * B + rows, mask=row_mask, other=0.0).to(COMPUTE) + adj_log_mix * later
            adj_cost = tl.load(grad_cost_ptr + (n + 1) * B + rows, mask=row_mask, other=0.0).to(COMPUTE) + adj_cost * (1.0 - h)
        else:
            grad_log_y = adj_log_mix
        # d log y_n[target] / d logits_n[k] = [k == target] - softmax_k
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            mask = row_mask[:, None] & (cols < K)[None, :]
            x = tl.load(logits_ptr + n * stride_e + rows[:, None] * stride_b + cols[None, :], mask=mask, other=0.0)
            softmax = tl.exp(x.to(COMPUTE) - lse[:, None])
            grad = grad_log_y[:, None] * (tl.where(cols[None, :] == target[:, None], 1.0, 0.0) - softmax)
            out = grad_logits_ptr + n * B * K + rows[:, None] * K + cols[None, :]
            tl.store(out, grad.to(grad_logits_ptr.dtype.element_ty), mask=mask)


# ---- launchers -------------------------------------------------------------------------------

MAX_EXITS = 64


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=256)  # a host-time saving: computed once per shape
def _blocks(num_exits: int, classes: int) -> tuple[int, int, int]:
    block_k = min(triton.next_power_of_2(classes), 1024)
    block_b = max(1, min(16, 2048 // block_k))
    return triton.next_power_of_2(num_exits), block_b, block_k


_launch_forward = FastLauncher(_ee_loss_forward_kernel)
_launch_backward = FastLauncher(_ee_loss_backward_kernel)


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check(logits: Tensor, conf_logits: Tensor, target: Tensor, costs: Tensor) -> None:
    num_exits, batch, _ = logits.shape
    if num_exits > MAX_EXITS:
        raise ValueError(f"ee_loss_parts: expected at most {MAX_EXITS} exits, got {num_exits}")
    if conf_logits.shape != (num_exits - 1, batch) or target.shape != (batch,) or costs.shape != (num_exits,):
        raise ValueError(
            f"ee_loss_parts: expected conf_logits [{num_exits - 1}, {batch}], target [{batch}], costs [{num_exits}], "
            f"got {list(conf_logits.shape)}, {list(target.shape)}, {list(costs.shape)}"
        )


def ee_loss_parts_forward(logits: Tensor, conf_logits: Tensor, target: Tensor, costs: Tensor):
    _check(logits, conf_logits, target, costs)
    num_exits, batch, classes = logits.shape
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    conf_logits, target, costs = conf_logits.contiguous(), target.contiguous(), costs.contiguous()
    dtype = _compute_dtype(logits.dtype)
    ce, cost, lse = (torch.empty(num_exits, batch, dtype=dtype, device=logits.device) for _ in range(3))
    if batch == 0:
        return ce, cost, lse
    block_e, block_b, block_k = _blocks(num_exits, classes)
    _launch_forward(
        (logits.dtype, conf_logits.dtype, target.dtype, costs.dtype, dtype, num_exits, block_e, block_b, block_k),
        (triton.cdiv(batch, block_b),),
        (logits, conf_logits, target, costs, ce, cost, lse, batch, classes, logits.stride(0), logits.stride(1)),
        dict(E=num_exits, BLOCK_E=block_e, BLOCK_B=block_b, BLOCK_K=block_k, COMPUTE=_tl_dtype(dtype)),
    )
    return ce, cost, lse


def ee_loss_parts_backward_launch(grad_ce, grad_cost, logits, conf_logits, target, costs, lse):
    num_exits, batch, classes = logits.shape
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    grad_ce, grad_cost = grad_ce.contiguous(), grad_cost.contiguous()
    conf_logits, target, costs = conf_logits.contiguous(), target.contiguous(), costs.contiguous()
    # The interpreter truncates float32 -> bfloat16 casts (a GPU rounds to nearest even): there
    # the gradient is written in float32 and rounded by torch.
    interpreted_bf16 = logits.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    grad_dtype = torch.float32 if interpreted_bf16 else logits.dtype
    grad_logits = torch.empty(logits.shape, dtype=grad_dtype, device=logits.device)
    grad_conf = torch.empty(conf_logits.shape, dtype=torch.float32 if interpreted_bf16 else conf_logits.dtype,
                            device=conf_logits.device)
    if batch == 0:
        return grad_logits.to(logits.dtype), grad_conf.to(conf_logits.dtype)
    block_e, block_b, block_k = _blocks(num_exits, classes)
    _launch_backward(
        (grad_ce.dtype, grad_cost.dtype, logits.dtype, conf_logits.dtype, target.dtype, costs.dtype, lse.dtype,
         grad_logits.dtype, grad_conf.dtype, num_exits, block_e, block_b, block_k),
        (triton.cdiv(batch, block_b),),
        (grad_ce, grad_cost, logits, conf_logits, target, costs, lse, grad_logits, grad_conf,
         batch, classes, logits.stride(0), logits.stride(1)),
        dict(E=num_exits, BLOCK_E=block_e, BLOCK_B=block_b, BLOCK_K=block_k, COMPUTE=_tl_dtype(lse.dtype)),
    )
    return grad_logits.to(logits.dtype), grad_conf.to(conf_logits.dtype)


# ---- the ops ---------------------------------------------------------------------------------


@torch.library.custom_op("eefast::ee_loss_parts", mutates_args=())
def ee_loss_parts(logits: Tensor, conf_logits: Tensor, target: Tensor, costs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per exit and sample: (-log Y_n[target], C_n, logsumexp(logits_n)), each [E, B]."""
    return ee_loss_parts_forward(logits, conf_logits, target, costs)


@ee_loss_parts.register_fake
def _(logits, conf_logits, target, costs):
    _check(logits, conf_logits, target, costs)
    shape = logits.shape[:2]
    dtype = _compute_dtype(logits.dtype)
    return tuple(logits.new_empty(shape, dtype=dtype) for _ in range(3))


@torch.library.custom_op("eefast::ee_loss_parts_backward", mutates_args=())
def ee_loss_parts_backward(
    grad_ce: Tensor, grad_cost: Tensor, logits: Tensor, conf_logits: Tensor, target: Tensor, costs: Tensor, lse: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradients of ee_loss_parts for logits [E, B, K] and conf_logits [E-1, B]."""
    return ee_loss_parts_backward_launch(grad_ce, grad_cost, logits, conf_logits, target, costs, lse)


@ee_loss_parts_backward.register_fake
def _(grad_ce, grad_cost, logits, conf_logits, target, costs, lse):
    return torch.empty_like(logits, memory_format=torch.contiguous_format), torch.empty_like(conf_logits)


def _setup_context(ctx, inputs, output):
    logits, conf_logits, target, costs = inputs
    ctx.save_for_backward(logits, conf_logits, target, costs, output[2])


def _backward(ctx, grad_ce, grad_cost, grad_lse):
    logits, conf_logits, target, costs, lse = ctx.saved_tensors
    grad_ce = torch.zeros_like(lse) if grad_ce is None else grad_ce
    grad_cost = torch.zeros_like(lse) if grad_cost is None else grad_cost
    grad_logits, grad_conf = ee_loss_parts_backward(grad_ce, grad_cost, logits, conf_logits, target, costs, lse)
    return grad_logits, grad_conf, None, None


ee_loss_parts.register_autograd(_backward, setup_context=_setup_context)
