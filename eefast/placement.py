"""Where early exits go (Section 3.5, Fig. 3.2) and what leaving at each one costs."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from eefast.flops import FlopProfile

# Fraction t_i of the backbone's FLOPs at which exit i (0-based, of N) is placed.
DISTRIBUTIONS: dict[str, Callable[[int, int], float]] = {
    "pareto": lambda i, n: 1 - 0.8 ** (i + 1),
    "fine": lambda i, n: 1 - 0.95 ** (i + 1),
    "golden_ratio": lambda i, n: 0.618 ** (n - i),
    "linear": lambda i, n: (i + 1) / (n + 1),
    "quadratic": lambda i, n: ((i + 1) / (n + 1)) ** 2,
}


def exit_fractions(num_exits: int, distribution: str) -> list[float]:
    """t_0 .. t_{N-1} of ``distribution``."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"expected distribution in {sorted(DISTRIBUTIONS)}, got {distribution!r}")
    return [DISTRIBUTIONS[distribution](i, num_exits) for i in range(num_exits)]


def place_exits(profile: FlopProfile, num_exits: int, distribution: str = "pareto") -> list[int]:
    """The block after which each exit sits: the first boundary whose cumulative FLOPs reach t_i
    of the total, every exit at a distinct boundary. The boundary after the last block is the
    final exit's, so it is no candidate."""
    if num_exits < 0:
        raise ValueError(f"expected num_exits >= 0, got {num_exits}")
    candidates = len(profile.block_flops) - 1
    positions: list[int] = []
    for i, fraction in enumerate(exit_fractions(num_exits, distribution)):
        start = positions[-1] + 1 if positions else 0
        for boundary in range(start, candidates):
            if profile.cumulative(boundary) >= fraction * profile.total:
                positions.append(boundary)
                break
        else:
            raise ValueError(
                f"cannot place {num_exits} exits with distribution {distribution!r}: exit {i} needs a boundary at "
                f"or past {fraction:.3f} of the FLOPs, after block {start} or later, but the backbone has "
                f"{candidates} candidate boundaries (the last at "
                f"{profile.cumulative(candidates - 1) / profile.total if candidates else 0:.3f}); use fewer exits "
                "or another distribution"
            )
    return positions


def exit_flops(profile: FlopProfile, positions: Sequence[int], head_flops: Sequence[int]) -> list[int]:
    """FLOPs a sample pays to leave at each exit: the backbone up to the exit and every head it passed
    through (heads 0..n); the final exit pays the whole backbone and every early head."""
    if len(positions) != len(head_flops):
        raise ValueError(f"expected one head FLOP count per exit ({len(positions)}), got {len(head_flops)}")
    paid = [profile.cumulative(p) + sum(head_flops[: n + 1]) for n, p in enumerate(positions)]
    return [*paid, profile.total + sum(head_flops)]


def exit_costs(profile: FlopProfile, positions: Sequence[int], head_flops: Sequence[int]) -> list[float]:
    """c_n: exit_flops over the FLOPs of the backbone without exits."""
    return [flops / profile.total for flops in exit_flops(profile, positions, head_flops)]
