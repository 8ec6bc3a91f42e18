"""A batch's statistics per channel for the exit head's batch norm, and the running update.

For x [B, C, H, W] and each channel c over its N = B*H*W values:
    mean_c = sum(x) / N,   var_c = sum((x - mean_c)^2) / N,   unbiased_c = var_c * N / (N - 1)
    running_mean += momentum * (mean_c - running_mean),  running_var += momentum * (unbiased_c - running_var)
as nn.BatchNorm2d computes them. Each lane of a program keeps a Welford (count, mean, sum of squared
deviations) of the values it reads, less the channel's first value (so that they stay at the scale
of the spread); lanes, and then the splits of a channel's values over programs, merge as Chan et
al. merge groups: no cancellation from a sum of squares. ``store_statistics`` is the one place
that writes the statistics and updates the running ones.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..dtypes import compute_dtype, float32_pair, next_power_of_2, tl_dtype, written_dtype
from .common import CHANNELS_CONTIGUOUS, PROGRAMS, SPLIT_MIN, flat_strides, layout, tile


@triton.jit
def merge_moments(mean_a, m2_a, count_a, mean_b, m2_b, count_b):
    """Chan et al.'s merge of two groups' (mean, sum of squared deviations, count); an empty group
    merges as nothing. Also tl.reduce's combine function over Welford lanes."""
    count = count_a + count_b
    delta = mean_b - mean_a
    weight_b = tl.where(count == 0.0, 0.0, count_b / tl.where(count == 0.0, 1.0, count))
    return mean_a + delta * weight_b, m2_a + m2_b + delta * delta * count_a * weight_b, count


@triton.jit
def _welford_add(count, mean, m2, x, mask):
    """Each lane's Welford (count, mean, sum of squared deviations) after its value in x."""
    count += mask.to(count.dtype)
    delta = tl.where(mask, x - mean, 0.0)
    mean += delta / tl.maximum(count, 1.0)
    return count, mean, m2 + delta * (x - mean)


@triton.jit
def statistics_of(count, mean, m2, shift):
    """(mean, biased variance, unbiased variance) from a Welford of values less ``shift``."""
    return shift + mean, m2 / tl.maximum(count, 1.0), m2 / tl.maximum(count - 1.0, 1.0)


@triton.jit
def merge_partials(partials_ptr, channels, c_mask, C, S, BLOCK_S: tl.constexpr, COMPUTE: tl.constexpr):
    """(mean less the shift, sum of squared deviations, count), [BLOCK_C] each, of the S splits'
    partials [3, S, C]: BLOCK_S splits a step, merged as a tree (S / BLOCK_S dependent steps)."""
    mean = tl.zeros(channels.shape, COMPUTE)
    m2 = tl.zeros(channels.shape, COMPUTE)
    count = tl.zeros(channels.shape, COMPUTE)
    for s0 in range(0, S, BLOCK_S):
        splits = s0 + tl.arange(0, BLOCK_S)
        mask = (splits < S)[:, None] & c_mask[None, :]
        offsets = splits[:, None] * C + channels[None, :]
        part_count = tl.load(partials_ptr + offsets, mask=mask, other=0.0)
        part_mean = tl.load(partials_ptr + S * C + offsets, mask=mask, other=0.0)
        part_m2 = tl.load(partials_ptr + 2 * S * C + offsets, mask=mask, other=0.0)
        part_mean, part_m2, part_count = tl.reduce((part_mean, part_m2, part_count), 0, merge_moments)
        mean, m2, count = merge_moments(mean, m2, count, part_mean, part_m2, part_count)
    return mean, m2, count


@triton.jit
def store_statistics(stats_ptr, partials_ptr, running_mean_ptr, running_var_ptr, channels, c_mask, C, count, mean,
                     m2, shift, momentum_hi, momentum_lo, SPLIT: tl.constexpr, UPDATE: tl.constexpr,
                     COMPUTE: tl.constexpr):
    """With SPLIT this program's part (count, mean less the shift, m2) into partials [3, S, C] at
    split program_id(1); otherwise mean, biased and unbiased variance into stats [3, C], and with
    UPDATE the running statistics (momentum as two float32s, for float64)."""
    if SPLIT:
        split, splits = tl.program_id(1), tl.num_programs(1)
        tl.store(partials_ptr + split * C + channels, count, mask=c_mask)
        tl.store(partials_ptr + (splits + split) * C + channels, mean, mask=c_mask)
        tl.store(partials_ptr + (2 * splits + split) * C + channels, m2, mask=c_mask)
    else:
        batch_mean, batch_var, unbiased_var = statistics_of(count, mean, m2, shift)
        tl.store(stats_ptr + channels, batch_mean, mask=c_mask)
        tl.store(stats_ptr + C + channels, batch_var, mask=c_mask)
        tl.store(stats_ptr + 2 * C + channels, unbiased_var, mask=c_mask)
        if UPDATE:
            momentum = tl.cast(momentum_hi, COMPUTE) + tl.cast(momentum_lo, COMPUTE)
            old_mean = tl.load(running_mean_ptr + channels, mask=c_mask, other=0.0).to(COMPUTE)
            old_var = tl.load(running_var_ptr + channels, mask=c_mask, other=0.0).to(COMPUTE)
            tl.store(running_mean_ptr + channels, (old_mean + momentum * (batch_mean - old_mean)).to(
                running_mean_ptr.dtype.element_ty), mask=c_mask)
            tl.store(running_var_ptr + channels, (old_var + momentum * (unbiased_var - old_var)).to(
                running_var_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _batch_stats_kernel(
    x_ptr,  # [B, C, H*W] strides (stride_b, stride_c, stride_hw); not channels-contiguous
    stats_ptr,  # [3, C] out (not SPLIT)
    partials_ptr,  # [3, S, C] out (SPLIT)
    running_mean_ptr, running_var_ptr,  # [C] each, updated in place (UPDATE and not SPLIT)
    B, C, HW, stride_b, stride_c, stride_hw, rows_per_split, momentum_hi, momentum_lo,
    SPLIT: tl.constexpr, UPDATE: tl.constexpr, LAYOUT: tl.constexpr, VEC: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_HW: tl.constexpr, COMPUTE: tl.constexpr,
):
    """Program (c, s): channel c of samples [s * rows_per_split, ...) in [BLOCK_B, BLOCK_HW] tiles."""
    c, split = tl.program_id(0), tl.program_id(1)
    x_channel = x_ptr + c.to(tl.int64) * stride_c
    shift = tl.load(x_channel).to(COMPUTE)
    count = tl.zeros([BLOCK_B, BLOCK_HW], COMPUTE)
    mean = tl.zeros([BLOCK_B, BLOCK_HW], COMPUTE)
    m2 = tl.zeros([BLOCK_B, BLOCK_HW], COMPUTE)
    first = split * rows_per_split
    last = tl.minimum(first + rows_per_split, B)
    for b0 in range(first, last, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        for p0 in range(0, HW, BLOCK_HW):  # (a tile whose rows are samples: stride_b as the row stride)
            pointers, mask = tile(x_channel, rows.to(tl.int64), p0 + tl.arange(0, BLOCK_HW), rows < last, HW,
                                  stride_b, stride_hw, LAYOUT, VEC)
            x = tl.load(pointers, mask=mask, other=0.0).to(COMPUTE) - shift
            count, mean, m2 = _welford_add(count, mean, m2, x, mask)
    mean, m2, count = tl.reduce((mean, m2, count), 1, merge_moments)
    mean, m2, count = tl.reduce((mean, m2, count), 0, merge_moments)
    one = tl.arange(0, 1)  # (stores take [1] tensors)
    zero = tl.zeros([1], COMPUTE)
    store_statistics(stats_ptr, partials_ptr, running_mean_ptr, running_var_ptr, c + one, one == 0, C, count + zero,
                     mean + zero, m2 + zero, shift + zero, momentum_hi, momentum_lo, SPLIT, UPDATE, COMPUTE)


@triton.jit
def _batch_stats_channels_kernel(
    x_ptr,  # [B, C, H*W], channels contiguous (stride 1), strides (stride_b, stride_hw)
    stats_ptr, partials_ptr, running_mean_ptr, running_var_ptr,  # as _batch_stats_kernel's
    C, HW, N, stride_b, stride_hw, positions_per_split, momentum_hi, momentum_lo,
    SPLIT: tl.constexpr, UPDATE: tl.constexpr, VEC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    """Program (j, s): channels [j * BLOCK_C, ...) of the N = B*H*W positions [s * positions_per_split, ...),
    in [BLOCK_N positions, BLOCK_C channels] tiles whose rows are contiguous."""
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = channels < C
    shift = tl.load(x_ptr + channels, mask=c_mask, other=0.0).to(COMPUTE)  # x[0, c, 0]
    count = tl.zeros([BLOCK_N, BLOCK_C], COMPUTE)
    mean = tl.zeros([BLOCK_N, BLOCK_C], COMPUTE)
    m2 = tl.zeros([BLOCK_N, BLOCK_C], COMPUTE)
    first = tl.program_id(1) * positions_per_split
    last = tl.minimum(first + positions_per_split, N)
    for n0 in range(first, last, BLOCK_N):
        positions = n0 + tl.arange(0, BLOCK_N)
        rows = (positions // HW).to(tl.int64) * stride_b + (positions % HW) * stride_hw
        pointers, mask = tile(x_ptr, rows, channels, positions < last, C, 1, 1, 1, VEC)  # (rows at stride 1)
        x = tl.load(pointers, mask=mask, other=0.0).to(COMPUTE) - shift[None, :]
        count, mean, m2 = _welford_add(count, mean, m2, x, mask)
    mean, m2, count = tl.reduce((mean, m2, count), 0, merge_moments)
    store_statistics(stats_ptr, partials_ptr, running_mean_ptr, running_var_ptr, channels, c_mask, C, count, mean,
                     m2, shift, momentum_hi, momentum_lo, SPLIT, UPDATE, COMPUTE)


@triton.jit
def _batch_stats_merge_kernel(
    x_ptr,  # [B, C, H*W], for each channel's first value (the shift)
    partials_ptr,  # [3, S, C]
    stats_ptr, running_mean_ptr, running_var_ptr,  # [3, C] out, [C] updated in place (UPDATE)
    C, S, stride_c, momentum_hi, momentum_lo,
    UPDATE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, COMPUTE: tl.constexpr,
):
    """A program per block of channels merges their splits' partials."""
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = channels < C
    mean, m2, count = merge_partials(partials_ptr, channels, c_mask, C, S, BLOCK_S, COMPUTE)
    shift = tl.load(x_ptr + channels.to(tl.int64) * stride_c, mask=c_mask, other=0.0).to(COMPUTE)
    store_statistics(stats_ptr, partials_ptr, running_mean_ptr, running_var_ptr, channels, c_mask, C, count, mean,
                     m2, shift, momentum_hi, momentum_lo, False, UPDATE, COMPUTE)


def _split(units: int, block: int, values: int, parallel: int) -> tuple[int, int]:
    """(splits, units per split in whole blocks) of ``units`` rows (samples, or positions) read by
    ``parallel`` programs a split: about PROGRAMS programs in all, each over SPLIT_MIN values."""
    if parallel >= PROGRAMS or values <= SPLIT_MIN:
        return 1, units
    splits = min(-(-units // block), -(-PROGRAMS // parallel))
    per_split = -(-units // splits // block) * block
    return -(-units // per_split), per_split


def stats_blocks(batch: int, channels: int, pixels: int) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_HW, splits, samples per split) of _batch_stats_kernel: tiles of up to 2048 values."""
    block_hw = min(next_power_of_2(max(pixels, 1)), 256)
    block_b = min(next_power_of_2(batch), max(1, 2048 // block_hw))
    return block_b, block_hw, *_split(batch, block_b, batch * pixels, channels)


def stats_channels_blocks(batch: int, channels: int, pixels: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_C, splits, positions per split) of _batch_stats_channels_kernel."""
    positions = batch * pixels
    block_c = min(next_power_of_2(channels), 64)
    block_n = min(next_power_of_2(positions), 2048 // block_c)
    return block_n, block_c, *_split(positions, block_n, positions * block_c, -(-channels // block_c))


# Values in a [splits, channels] tile of partials that one merge step reads. The forward kernel
# merges the splits itself where the partials each of its programs reads (3 per split and channel)
# are at most 1 / MERGE_IN_FORWARD_SHARE of the values of x it reads (H*W a channel): a launch fewer.
MERGE_TILE = 2048
MERGE_IN_FORWARD_SHARE = 4


def merge_in_forward(splits: int, pixels: int) -> bool:
    return 3 * splits * MERGE_IN_FORWARD_SHARE <= pixels


def merge_block_s(splits: int, block_c: int) -> int:
    """BLOCK_S: splits per merge step for channel blocks of block_c."""
    return max(1, min(next_power_of_2(splits), MERGE_TILE // block_c))


def launch_statistics(x: Tensor, running_update) -> tuple[Tensor, Tensor | None, tuple[float, float]]:
    """(stats [3, C], partials [3, S, C] or None, momentum as two float32s): one statistics kernel.
    Unsplit it writes stats and applies ``running_update = (running_mean, running_var, momentum)``;
    split it writes partials, for the merge kernel or the forward kernel to finish."""
    batch, channels, height, width = x.shape
    x, (stride_b, stride_c, stride_hw) = flat_strides(x)
    compute = compute_dtype(x.dtype)
    stats = torch.empty(3, channels, dtype=compute, device=x.device)
    update = running_update is not None
    running_mean, running_var, momentum = running_update if update else (stats, stats, 0.0)
    momentum = float32_pair(float(momentum), "exit_head", "the batch norm's momentum")
    kind, vec = layout(x, (stride_b, stride_c, stride_hw))
    if kind == CHANNELS_CONTIGUOUS:
        block_n, block_c, splits, per_split = stats_channels_blocks(batch, channels, height * width)
    else:
        block_b, block_hw, splits, per_split = stats_blocks(batch, channels, height * width)
    partials = torch.empty(3, splits, channels, dtype=compute, device=x.device) if splits > 1 else stats
    common = dict(SPLIT=splits > 1, UPDATE=update, VEC=vec, COMPUTE=tl_dtype(compute))
    if kind == CHANNELS_CONTIGUOUS:
        _batch_stats_channels_kernel[(-(-channels // block_c), splits)](
            x, stats, partials, running_mean, running_var, channels, height * width, batch * height * width, stride_b,
            stride_hw, per_split, *momentum, BLOCK_N=block_n, BLOCK_C=block_c, **common)
    else:
        _batch_stats_kernel[(channels, splits)](
            x, stats, partials, running_mean, running_var, batch, channels, height * width, stride_b, stride_c,
            stride_hw, per_split, *momentum, LAYOUT=kind, BLOCK_B=block_b, BLOCK_HW=block_hw, **common)
    return stats, partials if splits > 1 else None, momentum


def launch_merge(x: Tensor, partials: Tensor, stats: Tensor, running_update, momentum: tuple[float, float]) -> None:
    """The merge kernel: stats [3, C] (and running_update) from the splits' partials. Narrow channel
    blocks (more programs), each in as few tree steps as MERGE_TILE allows."""
    channels, splits = x.shape[1], partials.shape[1]
    x, (_, stride_c, _) = flat_strides(x)
    running_mean, running_var = running_update[:2] if running_update is not None else (stats, stats)
    block_c = min(next_power_of_2(channels), 16)
    _batch_stats_merge_kernel[(-(-channels // block_c),)](
        x, partials, stats, running_mean, running_var, channels, splits, stride_c, *momentum,
        UPDATE=running_update is not None, BLOCK_S=merge_block_s(splits, block_c), BLOCK_C=block_c,
        COMPUTE=tl_dtype(stats.dtype))


def batch_stats(x: Tensor, running_update=None) -> Tensor:
    """[3, C]: mean, biased variance (what batch norm normalises with) and unbiased variance (what it
    keeps) of each channel of x [B, C, H, W], float32 (float64); with ``running_update`` the running
    statistics updated too. NaN for an empty batch, whose running statistics stay (as nn.BatchNorm2d)."""
    if x.numel() == 0:
        return torch.full((3, x.shape[1]), float("nan"), dtype=compute_dtype(x.dtype), device=x.device)
    stats, partials, momentum = launch_statistics(x, running_update)
    if partials is not None:
        launch_merge(x, partials, stats, running_update, momentum)
    return stats


def fused_running_update(running_mean: Tensor | None, running_var: Tensor | None) -> bool:
    """Whether the kernels can update these running statistics in place: both there and written as
    stored (the interpreter's bfloat16 stores are not: see written_dtype)."""
    return (running_mean is not None and running_var is not None
            and written_dtype(running_mean.dtype) == running_mean.dtype
            and written_dtype(running_var.dtype) == running_var.dtype)
