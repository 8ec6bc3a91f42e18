"""Exit policies: what score a sample leaves on, and the temperatures some of them use.

A policy turns an exit's outputs into a score s_n in [0, 1] per sample (higher = more
confident; the formulas are ``eefast.reference.exit_scores``); a sample leaves at the first
exit with s_n >= T_n, and a NaN score never exits:

- ``confidence``: the learned confidence h_n of the thesis (EENets);
- ``max_prob``: the top softmax probability (SDN, MSDNet);
- ``entropy``: one minus the softmax's entropy over log K (BranchyNet).

The last two divide the exit's logits by a per-exit temperature first, fitted on held-out data
by ``fit_temperatures`` (temperature scaling, Guo et al. 2017). The same policy drives every
inference mode, compaction, the CUDA graphs and threshold calibration (``EENet.policy``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from eefast.reference import EXIT_POLICIES, exit_scores

__all__ = ["EXIT_POLICIES", "TEMPERATURE_GRID", "check_policy", "exit_scores", "fit_temperatures"]

# log-spaced candidates from 0.05 to 20: a grid search cannot diverge, and NLL in T is unimodal
TEMPERATURE_GRID = torch.logspace(-1.3, 1.3, 105, dtype=torch.float64)


def check_policy(policy: str) -> str:
    if policy not in EXIT_POLICIES:
        raise ValueError(f"expected an exit policy in {EXIT_POLICIES}, got {policy!r}")
    return policy


@torch.no_grad()
def fit_temperatures(
    logits: Tensor,  # [E-1, N, K] class logits of the early exits on held-out samples
    target: Tensor,  # [N] int64
) -> Tensor:
    """Per exit, the temperature T minimising the held-out NLL of softmax(z / T): ``[E-1]`` float32.

    Searched over ``TEMPERATURE_GRID`` (then refined once between the best point's neighbours);
    an exit whose logits are not finite keeps T = 1.
    """
    if logits.dim() != 3 or target.shape != logits.shape[1:2]:
        raise ValueError(f"fit_temperatures: expected logits [E-1, N, K] and target [N], got "
                         f"{list(logits.shape)} and {list(target.shape)}")
    z = logits.double()
    temperatures = []
    for exit_logits in z:
        if exit_logits.numel() == 0 or not bool(torch.isfinite(exit_logits).all()):
            temperatures.append(1.0)
            continue

        def nll(grid: Tensor) -> Tensor:  # [T] mean NLL at each temperature, one [N, K] at a time
            return torch.stack([-(exit_logits / t).log_softmax(-1).gather(1, target.view(-1, 1)).mean() for t in grid])

        grid = TEMPERATURE_GRID
        best = int(nll(grid).argmin())
        fine = torch.linspace(grid[max(best - 1, 0)].item(), grid[min(best + 1, grid.numel() - 1)].item(), 33,
                              dtype=torch.float64)
        temperatures.append(fine[int(nll(fine).argmin())].item())
    return torch.tensor(temperatures, dtype=torch.float32)
