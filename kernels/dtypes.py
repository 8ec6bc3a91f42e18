"""The dtypes the Triton kernels compute and write in, and other host helpers shared by every kernel file.

Imports torch and triton only.
"""

from __future__ import annotations

import math
import os
import struct

import torch
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # read when Triton is: at import


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic for inputs of ``dtype``: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_dtype(dtype: torch.dtype):
    """The Triton type of a compute dtype."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def written_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel writes an output of ``dtype`` in. The interpreter truncates float32 ->
    bfloat16 casts (a GPU rounds to nearest even): there bfloat16 outputs are written in float32
    and rounded by torch."""
    return torch.float32 if INTERPRETED and dtype == torch.bfloat16 else dtype


def float32_pair(value: float, op: str, name: str) -> tuple[float, float]:
    """``value`` as hi + lo, two float32s: Triton passes Python floats as float32, and float64
    arithmetic needs more than float32's 24 bits. A finite value beyond float32's range is refused,
    naming the op and the argument."""
    try:
        hi = struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # older Pythons refuse to round past float32's range; newer give inf
        hi = math.inf
    if math.isfinite(value) and not math.isfinite(hi):
        raise ValueError(f"{op}: expected {name} within float32's range (|{name}| <= 3.4e38) for the Triton kernels, "
                         f"got {value}")
    return hi, (value - hi if math.isfinite(hi) else 0.0)


def next_power_of_2(n: int) -> int:
    """The least power of 2 >= n (1 for n <= 1). triton.next_power_of_2 is a constexpr function in
    Triton 3.8 that costs about 9 us of host time a call: 80 us of a pool exit's 250 us training
    step, launches stubbed (benchmarks/host_time.py)."""
    return 1 << max(n - 1, 0).bit_length()
