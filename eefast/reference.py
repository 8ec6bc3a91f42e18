"""The math of eefast in plain PyTorch: the specification every fast path is tested against.

Imports torch only. Readable first; each function states one definition from
``shared/EENETS.md`` (thesis equation numbers in the docstrings).
"""

from __future__ import annotations

import torch
from torch import Tensor


def compact_exits(
    x: Tensor,  # [M, ...] features of the samples still running
    logits: Tensor,  # [M, K] this exit's class logits
    confidence: Tensor,  # [M] this exit's confidence h (probability)
    index: Tensor,  # [M] int64, each row's position in the original batch
    threshold: float,
    exit_index: int,
    out_logits: Tensor,  # [B, K] written in place at index of the exiting rows
    out_exit: Tensor,  # [B] int64, written in place with exit_index
) -> tuple[Tensor, Tensor]:
    """One exit point of batched early-exit inference (Algorithm 1, batched).

    Rows with ``confidence >= threshold`` leave: their logits and ``exit_index`` are written
    into the batch outputs at their original positions. A NaN confidence never leaves.
    Returns the surviving rows ``(x[keep], index[keep])`` in their original order.
    """
    exits = confidence >= threshold  # NaN >= T is False
    out_logits[index[exits]] = logits[exits]
    out_exit[index[exits]] = exit_index
    keep = ~exits
    return x[keep], index[keep]
