"""Fused EENet loss: the recursive mixtures Y_n / C_n of Eqs. 6-9 in log space, forward and backward.

Top to bottom: jit helpers, the forward and backward kernels, their launchers, and the custom ops
``eefast::ee_loss`` and ``eefast::ee_loss_parts`` (+ their backwards) registered with fake
kernels and autograd.

``ee_loss(logits [E, B, K], conf_logits [E-1, B], target [B], costs [E], lam, version)`` returns
each sample's loss ([B]; its mean is the training loss) and the log-sum-exp of each exit's logits
([E, B], saved for the backward). ``ee_loss_parts`` returns instead, per exit and sample,
``ce = -log Y_n[target]`` and ``cost = C_n`` (each [E, B]) with the log-sum-exp: every loss
version is a weighted sum of these parts (``eefast.reference.combine_loss_parts``). The two ops
share their kernels: the per-sample loss is the parts summed in registers, and its backward reads
one [B] gradient for every exit, so a training step runs the two kernels, a mean and its backward.

Each program handles BLOCK_B samples: it reads each exit's logits once (an online log-sum-exp
over K in BLOCK_K chunks) and runs the E-step recursions in registers; the backward re-reads the
logits once and writes their gradient once. Nothing of size [E, B, K] is allocated beyond the
gradient itself. Arithmetic is in float32 (float64 for float64 inputs).

Imports torch and triton only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .dtypes import compute_dtype, float32_pair, next_power_of_2, tl_dtype, written_dtype

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


# Which exits' parts a loss version counts and whether lam weights its cost part
# (eefast.reference.combine_loss_parts): v1 exit 0's CE + lam * cost, v2 every exit's, mc every
# CE, cost every cost (unweighted).
NONE, FIRST, ALL = 0, 1, 2
VERSION_MODES = {"v1": (FIRST, FIRST, True), "v2": (ALL, ALL, True), "mc": (ALL, NONE, False),
                 "cost": (NONE, ALL, False)}


def _version_modes(version: str | None, lam: float | None) -> tuple[int, int, float]:
    """(CE_MODE, COST_MODE, the cost part's weight); no version: the parts, every exit unweighted."""
    if version is None:
        return ALL, ALL, 1.0
    ce_mode, cost_mode, weighted = VERSION_MODES[version]
    return ce_mode, cost_mode, lam if weighted else 1.0


@triton.jit
def _counted(exits, E: tl.constexpr, MODE: tl.constexpr):
    """Whether a [BLOCK_E, 1] tile's exits are counted under MODE (NONE, FIRST, ALL)."""
    if MODE == 2:
        return exits < E
    elif MODE == 1:
        return exits == 0
    else:
        return exits < 0


@triton.jit
def _part_grad(grad_ptr, n: tl.constexpr, stride_e, stride_b, rows, row_mask,
               MODE: tl.constexpr, BLOCK_B: tl.constexpr, COMPUTE: tl.constexpr):
    """The incoming gradient of exit n's part ([BLOCK_B]); zero for an exit that MODE does not count."""
    if MODE == 2 or (MODE == 1 and n == 0):
        return tl.load(grad_ptr + n * stride_e + rows * stride_b, mask=row_mask, other=0.0).to(COMPUTE)
    else:
        return tl.zeros([BLOCK_B], COMPUTE)


# ---- kernels ---------------------------------------------------------------------------------


@triton.jit
def _ee_loss_forward_kernel(
    logits_ptr,  # [E, B, K] class logits, contiguous along K
    conf_ptr,  # [E-1, B] confidence logits, contiguous
    target_ptr,  # [B] int64
    costs_ptr,  # [E]
    ce_ptr,  # [E, B] out: -log Y_n[target]
    cost_ptr,  # [E, B] out: C_n
    lse_ptr,  # [E, B] out: log-sum-exp of logits[n, b, :]
    loss_ptr,  # [B] out (REDUCE): sum of the counted CEs + cost weight * sum of the counted costs
    B, K, stride_e, stride_b, cost_weight_hi, cost_weight_lo,
    E: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, COMPUTE: tl.constexpr,
    REDUCE: tl.constexpr, CE_MODE: tl.constexpr, COST_MODE: tl.constexpr,
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
    if REDUCE:
        ce_sum = tl.sum(tl.where(_counted(exits, E, CE_MODE), -log_mix, 0.0), axis=0)
        cost_sum = tl.sum(tl.where(_counted(exits, E, COST_MODE), mix_cost, 0.0), axis=0)
        cost_weight = tl.cast(cost_weight_hi, COMPUTE) + tl.cast(cost_weight_lo, COMPUTE)
        tl.store(loss_ptr + rows, ce_sum + cost_weight * cost_sum, mask=row_mask)
    else:
        tl.store(ce_ptr + exits * B + rows[None, :], -log_mix, mask=out_mask)
        tl.store(cost_ptr + exits * B + rows[None, :], mix_cost, mask=out_mask)


@triton.jit
def _ee_loss_backward_kernel(
    grad_ce_ptr,  # [E, B] dL/d ce, strides (gce_stride_e, gce_stride_b); REDUCE: dL/d loss [B] (stride_e 0)
    grad_cost_ptr,  # [E, B] dL/d cost, strides (gcost_stride_e, gcost_stride_b); REDUCE: dL/d loss [B]
    logits_ptr,  # [E, B, K]
    conf_ptr,  # [E-1, B]
    target_ptr,  # [B] int64
    costs_ptr,  # [E]
    lse_ptr,  # [E, B] from the forward
    grad_logits_ptr,  # [E, B, K] out, contiguous
    grad_conf_ptr,  # [E-1, B] out
    B, K, stride_e, stride_b, gce_stride_e, gce_stride_b, gcost_stride_e, gcost_stride_b, cost_weight_hi, cost_weight_lo,
    E: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, COMPUTE: tl.constexpr,
    CE_MODE: tl.constexpr, COST_MODE: tl.constexpr,
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
    cost_weight = tl.cast(cost_weight_hi, COMPUTE) + tl.cast(cost_weight_lo, COMPUTE)
    adj_log_mix = -_part_grad(grad_ce_ptr, 0, gce_stride_e, gce_stride_b, rows, row_mask, CE_MODE, BLOCK_B, COMPUTE)
    adj_cost = cost_weight * _part_grad(grad_cost_ptr, 0, gcost_stride_e, gcost_stride_b, rows, row_mask, COST_MODE,
                                BLOCK_B, COMPUTE)
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
            adj_log_mix = adj_log_mix * later - _part_grad(
                grad_ce_ptr, n + 1, gce_stride_e, gce_stride_b, rows, row_mask, CE_MODE, BLOCK_B, COMPUTE)
            adj_cost = adj_cost * (1.0 - h) + cost_weight * _part_grad(
                grad_cost_ptr, n + 1, gcost_stride_e, gcost_stride_b, rows, row_mask, COST_MODE, BLOCK_B, COMPUTE)
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


def _blocks(num_exits: int, classes: int) -> tuple[int, int, int]:
    block_k = min(next_power_of_2(classes), 1024)
    block_b = max(1, min(16, 2048 // block_k))
    return next_power_of_2(num_exits), block_b, block_k


def _check(logits: Tensor, conf_logits: Tensor, target: Tensor, costs: Tensor) -> None:
    num_exits, batch, _ = logits.shape
    if num_exits > MAX_EXITS:
        raise ValueError(f"ee_loss: expected at most {MAX_EXITS} exits, got {num_exits}")
    if conf_logits.shape != (num_exits - 1, batch) or target.shape != (batch,) or costs.shape != (num_exits,):
        raise ValueError(
            f"ee_loss: expected conf_logits [{num_exits - 1}, {batch}], target [{batch}], costs [{num_exits}], "
            f"got {list(conf_logits.shape)}, {list(target.shape)}, {list(costs.shape)}"
        )


def ee_loss_forward_launch(logits: Tensor, conf_logits: Tensor, target: Tensor, costs: Tensor,
                           lam: float | None = None, version: str | None = None):
    """The forward kernel. With a ``version`` (and ``lam``): ``(loss [B], lse [E, B])``, the per-sample
    loss; without: ``(ce [E, B], cost [E, B], lse [E, B])``, the parts of every exit."""
    _check(logits, conf_logits, target, costs)
    num_exits, batch, classes = logits.shape
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    conf_logits, target, costs = conf_logits.contiguous(), target.contiguous(), costs.contiguous()
    dtype = compute_dtype(logits.dtype)
    reduce = version is not None
    lse = torch.empty(num_exits, batch, dtype=dtype, device=logits.device)
    parts = (torch.empty(batch, dtype=dtype, device=logits.device),) if reduce else tuple(
        torch.empty(num_exits, batch, dtype=dtype, device=logits.device) for _ in range(2))
    if batch > 0:
        ce_mode, cost_mode, cost_weight = _version_modes(version, lam)
        block_e, block_b, block_k = _blocks(num_exits, classes)
        ce, cost, loss = (lse, lse, parts[0]) if reduce else (*parts, lse)  # unused pointers: any tensor
        _ee_loss_forward_kernel[(-(-batch // block_b),)](
            logits, conf_logits, target, costs, ce, cost, lse, loss, batch, classes, logits.stride(0),
            logits.stride(1), *float32_pair(cost_weight, "ee_loss", "lam"), E=num_exits, BLOCK_E=block_e,
            BLOCK_B=block_b, BLOCK_K=block_k, COMPUTE=tl_dtype(dtype), REDUCE=reduce, CE_MODE=ce_mode,
            COST_MODE=cost_mode)
    return (*parts, lse)


def ee_loss_backward_launch(grad_ce, grad_cost, logits, conf_logits, target, costs, lse,
                            lam: float | None = None, version: str | None = None):
    """(grad_logits [E, B, K], grad_conf [E-1, B]). Without a ``version``, ``grad_ce`` and
    ``grad_cost`` are the [E, B] gradients of the parts; with one, both are the [B] gradient of
    the per-sample loss (read with any stride, an expanded one included)."""
    num_exits, batch, classes = logits.shape
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    conf_logits, target, costs = conf_logits.contiguous(), target.contiguous(), costs.contiguous()
    ce_mode, cost_mode, cost_weight = _version_modes(version, lam)
    if version is None:
        ce_strides, cost_strides = grad_ce.stride(), grad_cost.stride()
    else:
        ce_strides = cost_strides = (0, grad_ce.stride(0))  # every exit reads the per-sample gradient
    grad_logits = torch.empty(logits.shape, dtype=written_dtype(logits.dtype), device=logits.device)
    grad_conf = torch.empty(conf_logits.shape, dtype=written_dtype(conf_logits.dtype), device=conf_logits.device)
    if batch > 0:
        block_e, block_b, block_k = _blocks(num_exits, classes)
        _ee_loss_backward_kernel[(-(-batch // block_b),)](
            grad_ce, grad_cost, logits, conf_logits, target, costs, lse, grad_logits, grad_conf, batch, classes,
            logits.stride(0), logits.stride(1), *ce_strides, *cost_strides,
            *float32_pair(cost_weight, "ee_loss", "lam"), E=num_exits, BLOCK_E=block_e, BLOCK_B=block_b,
            BLOCK_K=block_k, COMPUTE=tl_dtype(lse.dtype), CE_MODE=ce_mode, COST_MODE=cost_mode)
    return grad_logits.to(logits.dtype), grad_conf.to(conf_logits.dtype)


# ---- the ops ---------------------------------------------------------------------------------


def _check_version(version: str) -> None:
    if version not in VERSION_MODES:
        raise ValueError(f"ee_loss: expected version in {tuple(VERSION_MODES)}, got {version!r}")


@torch.library.custom_op("eefast::ee_loss", mutates_args=())
def ee_loss(logits: Tensor, conf_logits: Tensor, target: Tensor, costs: Tensor, lam: float, version: str
            ) -> tuple[Tensor, Tensor]:
    """(loss [B], lse [E, B]): each sample's loss of ``version`` with trade-off ``lam`` (its batch
    mean is eefast.reference.eenet_loss), and the log-sum-exp of each exit's logits (for the backward)."""
    _check_version(version)
    return ee_loss_forward_launch(logits, conf_logits, target, costs, lam, version)


@ee_loss.register_fake
def _(logits, conf_logits, target, costs, lam, version):
    _check(logits, conf_logits, target, costs)
    _check_version(version)
    dtype = compute_dtype(logits.dtype)
    return logits.new_empty(logits.shape[1:2], dtype=dtype), logits.new_empty(logits.shape[:2], dtype=dtype)


@torch.library.custom_op("eefast::ee_loss_backward", mutates_args=())
def ee_loss_backward(grad_loss: Tensor, logits: Tensor, conf_logits: Tensor, target: Tensor, costs: Tensor,
                     lse: Tensor, lam: float, version: str) -> tuple[Tensor, Tensor]:
    """Gradients of ee_loss's per-sample loss for logits [E, B, K] and conf_logits [E-1, B]."""
    _check_version(version)
    return ee_loss_backward_launch(grad_loss, grad_loss, logits, conf_logits, target, costs, lse, lam, version)


@ee_loss_backward.register_fake
def _(grad_loss, logits, conf_logits, target, costs, lse, lam, version):
    return torch.empty_like(logits, memory_format=torch.contiguous_format), torch.empty_like(conf_logits)


def _setup_loss_context(ctx, inputs, output):
    logits, conf_logits, target, costs, ctx.lam, ctx.version = inputs
    ctx.save_for_backward(logits, conf_logits, target, costs, output[1])


def _loss_backward(ctx, grad_loss, grad_lse, backward=ee_loss_backward):
    logits, conf_logits, target, costs, lse = ctx.saved_tensors
    if grad_loss is None:
        grad_loss = lse.new_zeros(lse.shape[1:])
    grad_logits, grad_conf = backward(grad_loss, logits, conf_logits, target, costs, lse, ctx.lam, ctx.version)
    return grad_logits, grad_conf, None, None, None, None


ee_loss.register_autograd(_loss_backward, setup_context=_setup_loss_context)


class EELossEager(torch.autograd.Function):
    """``ee_loss`` for eager autograd: the same launchers, saved tensors and backward as the custom
    op, without the dispatcher's custom-op layers around each call (about 30 us of host time per
    training step on a CPU core, more than the two kernels run on a GPU). torch.compile and
    opcheck use the custom op."""

    @staticmethod
    def forward(ctx, logits, conf_logits, target, costs, lam, version):
        _check_version(version)
        output = ee_loss_forward_launch(logits, conf_logits, target, costs, lam, version)
        _setup_loss_context(ctx, (logits, conf_logits, target, costs, lam, version), output)
        ctx.mark_non_differentiable(output[1])
        return output

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        if torch.is_grad_enabled():  # create_graph: the custom op, whose outputs say it has no double backward
            return _loss_backward(ctx, grad_loss, grad_lse)

        def launch(grad_loss, *args):
            return ee_loss_backward_launch(grad_loss, grad_loss, *args)
        return _loss_backward(ctx, grad_loss, grad_lse, backward=launch)


@torch.library.custom_op("eefast::ee_loss_parts", mutates_args=())
def ee_loss_parts(logits: Tensor, conf_logits: Tensor, target: Tensor, costs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per exit and sample: (-log Y_n[target], C_n, logsumexp(logits_n)), each [E, B]."""
    return ee_loss_forward_launch(logits, conf_logits, target, costs)


@ee_loss_parts.register_fake
def _(logits, conf_logits, target, costs):
    _check(logits, conf_logits, target, costs)
    shape = logits.shape[:2]
    dtype = compute_dtype(logits.dtype)
    return tuple(logits.new_empty(shape, dtype=dtype) for _ in range(3))


@torch.library.custom_op("eefast::ee_loss_parts_backward", mutates_args=())
def ee_loss_parts_backward(
    grad_ce: Tensor, grad_cost: Tensor, logits: Tensor, conf_logits: Tensor, target: Tensor, costs: Tensor, lse: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradients of ee_loss_parts for logits [E, B, K] and conf_logits [E-1, B]."""
    return ee_loss_backward_launch(grad_ce, grad_cost, logits, conf_logits, target, costs, lse)


@ee_loss_parts_backward.register_fake
def _(grad_ce, grad_cost, logits, conf_logits, target, costs, lse):
    return torch.empty_like(logits, memory_format=torch.contiguous_format), torch.empty_like(conf_logits)


def _setup_parts_context(ctx, inputs, output):
    logits, conf_logits, target, costs = inputs
    ctx.save_for_backward(logits, conf_logits, target, costs, output[2])


def _parts_backward(ctx, grad_ce, grad_cost, grad_lse):
    logits, conf_logits, target, costs, lse = ctx.saved_tensors
    grad_ce = torch.zeros_like(lse) if grad_ce is None else grad_ce
    grad_cost = torch.zeros_like(lse) if grad_cost is None else grad_cost
    grad_logits, grad_conf = ee_loss_parts_backward(grad_ce, grad_cost, logits, conf_logits, target, costs, lse)
    return grad_logits, grad_conf, None, None


ee_loss_parts.register_autograd(_parts_backward, setup_context=_setup_parts_context)
