"""The dtypes the Triton kernels compute and write in, shared by every kernel file.

Imports torch and triton only.
"""

from __future__ import annotations

import os

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
