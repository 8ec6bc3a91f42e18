"""How the exit-head kernels read a feature map: its layout, 16-byte vector width and tiles, and
how a sample's channels are shared among programs. Used by statistics, forward and backward."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..dtypes import next_power_of_2

# How one sample's [C, H*W] feature map lies in memory: the LAYOUT of every kernel that reads x
STRIDED, PIXELS_CONTIGUOUS, CHANNELS_CONTIGUOUS = 0, 1, 2


@triton.jit
def tile(row_ptr, channels, pixels, c_mask, HW, stride_c, stride_hw, LAYOUT: tl.constexpr, VEC: tl.constexpr):
    """(pointers, mask) of the [channels, pixels] tile of the map at row_ptr, the contiguous axis's
    stride written as 1 for the compiler. VEC > 1 promises 16-byte aligned groups of VEC elements
    along it, each wholly in or out of the map (``layout`` checks this), for 16-byte loads. The
    hints must be set on values made here: on a function's arguments they are lost."""
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
def batch_norm_fold(weight_ptr, bias_ptr, channels, c_mask, mean, var, eps, COMPUTE: tl.constexpr):
    """Batch norm per channel as z = x * scale + shift: (scale, shift, rstd), [BLOCK_C] each."""
    rstd = 1.0 / tl.sqrt(var + eps)
    scale = tl.load(weight_ptr + channels, mask=c_mask, other=0.0).to(COMPUTE) * rstd
    shift = tl.load(bias_ptr + channels, mask=c_mask, other=0.0).to(COMPUTE) - mean * scale
    return scale, shift, rstd


@triton.jit
def channel_range(split, splits, C, BLOCK_C: tl.constexpr):
    """[begin, end) of the channels of program ``split`` of ``splits`` sharing a sample: whole
    blocks, as ``channel_splits`` counts them."""
    per_program = tl.cdiv(tl.cdiv(C, splits), BLOCK_C) * BLOCK_C
    begin = split * per_program
    return begin, tl.minimum(begin + per_program, C)


def flat_strides(x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """x (made dense if h and w do not flatten into one stride) and its (batch, channel, pixel) strides."""
    if x.stride(2) != x.shape[3] * x.stride(3) and x.shape[2] > 1:
        x = x.contiguous()
    return x, (x.stride(0), x.stride(1), x.stride(3))


def layout(x: Tensor, strides: tuple[int, int, int]) -> tuple[int, int]:
    """(LAYOUT, VEC) of the kernels reading x [B, C, H, W] with these flattened strides (and writing
    dL/dx, allocated with the same strides). VEC is the elements in 16 bytes where the base, the
    other strides and the contiguous axis's length are multiples of it, 1 elsewhere."""
    stride_b, stride_c, stride_hw = strides
    channels, pixels = x.shape[1], x.shape[2] * x.shape[3]
    vec = 16 // x.element_size()
    if stride_hw == 1 and pixels > 1:
        kind, aligned = PIXELS_CONTIGUOUS, pixels % vec == 0 and stride_c % vec == 0
    elif stride_c == 1:
        kind, aligned = CHANNELS_CONTIGUOUS, channels % vec == 0 and (pixels == 1 or stride_hw % vec == 0)
    else:
        kind, aligned = STRIDED, False
    aligned = aligned and stride_b % vec == 0 and x.data_ptr() % 16 == 0 and vec > 1
    return kind, vec if aligned else 1


# Values per tile of the kernels reading x: with 16-byte loads 32 values a thread (4 warps) fit in
# few registers; without, fewer (a thread then holds values of many channels), as the register
# counts of the sm_90 binaries asked.
TILE_VECTORIZED = 4096
TILE_SCALAR = 1024


def blocks(channels: int, pixels: int, heads: int, kind: int, vec: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_HW, BLOCK_K): tiles long along the contiguous axis."""
    tile_size = TILE_VECTORIZED if vec > 1 else TILE_SCALAR
    if kind == CHANNELS_CONTIGUOUS:
        block_c = min(next_power_of_2(channels), 128)
        block_hw = max(1, min(next_power_of_2(max(pixels, 1)), tile_size // block_c))
    else:
        block_hw = min(next_power_of_2(max(pixels, 1)), 256)
        block_c = max(1, min(next_power_of_2(channels), tile_size // block_hw, 128))
    return block_c, block_hw, min(next_power_of_2(heads), 64)


# Work is split where a program per channel (statistics) or per sample (forward without heads,
# backward) would leave the GPU mostly idle with much to read each: under PROGRAMS programs and
# over SPLIT_MIN values a program. (B=256, C=64, 8x8: 256 statistics programs of 2 tile loads,
# not 64 of 8; a ResNet-50's first exit at B=64, C=256, 56x56: 4 programs a sample, not one of
# 800k values.)
PROGRAMS = 256
SPLIT_MIN = 4096


def channel_splits(batch: int, channels: int, pixels: int, block_c: int) -> int:
    """Programs per sample (the grid's second axis; channel_range gives each its channels)."""
    channel_blocks = -(-channels // block_c)
    if batch >= PROGRAMS or channel_blocks == 1:
        return 1
    splits = max(1, min(channel_blocks, -(-PROGRAMS // max(batch, 1)), channels * pixels // SPLIT_MIN))
    per_program = -(-channel_blocks // splits) * block_c  # whole blocks, as channel_range
    return -(-channels // per_program)



def bn_tensors(x: Tensor, weight, bias, mean, var, bn: bool) -> tuple[Tensor, ...]:
    """The four [C] tensors the kernels read for batch norm: ones and zeros for absent affine
    parameters, and x (unread) for statistics the forward kernel merges itself (mean None) or
    without batch norm."""
    if not bn:
        return (x,) * 4
    dtype = (torch.float64 if x.dtype == torch.float64 else torch.float32) if mean is None else mean.dtype
    weight = torch.ones(x.shape[1], dtype=dtype, device=x.device) if weight is None else weight
    bias = torch.zeros(x.shape[1], dtype=dtype, device=x.device) if bias is None else bias
    return (weight, bias, x, x) if mean is None else (weight, bias, mean, var)
