"""The fused kernels against eager PyTorch, from benchmarks/test_bench_kernels.py's JSON: one row
per benchmark group with the median of each implementation, the speed-up, and the peak memory
of the fused step over the eager one (with the share of the eager peak that the returned
gradients alone take, which no implementation can go below).

    python -m benchmarks.kernels_table benchmarks/results/<gpu>-kernels.json
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable


def comparisons(results: dict) -> list[dict]:
    """Per benchmark group, in file order: ``{"group", "fused_ms", "eager_ms", "speedup",
    "memory_ratio", "gradient_share"}`` (the last two None where not recorded)."""
    groups: dict[str, dict[str, dict]] = {}
    for bench in results["benchmarks"]:
        info = bench["extra_info"]
        groups.setdefault(bench["group"], {})[info["impl"]] = info
    rows = []
    for group, impls in groups.items():
        if set(impls) != {"triton", "reference"}:
            raise ValueError(f"kernels_table: expected a triton and a reference case in group {group!r}, "
                             f"got {sorted(impls)}")
        fused, eager = impls["triton"], impls["reference"]
        eager_peak = eager.get("peak_bytes") or 0
        rows.append({
            "group": group,
            "fused_ms": fused["median_ms"],
            "eager_ms": eager["median_ms"],
            "speedup": eager["median_ms"] / fused["median_ms"],
            "memory_ratio": fused["peak_bytes"] / eager_peak if eager_peak else None,
            "gradient_share": fused["gradient_bytes"] / eager_peak if eager_peak and "gradient_bytes" in fused else None,
        })
    return rows


def table(rows: Iterable[dict], device: str = "") -> str:
    """The rows as a Markdown table."""
    def ratio(value):
        return "" if value is None else f"{value:.2f}"

    lines = [f"{device} | fused ms | eager ms | speed-up | peak memory, fused / eager | gradients / eager peak",
             "|".join(["---"] * 6)]
    for row in rows:
        lines.append(f"{row['group']} | {row['fused_ms']:.4f} | {row['eager_ms']:.4f} | {row['speedup']:.2f}x | "
                     f"{ratio(row['memory_ratio'])} | {ratio(row['gradient_share'])}")
    return "\n".join(lines)


def main(paths: list[str]) -> None:
    for path in paths:
        with open(path) as file:
            results = json.load(file)
        device = results["benchmarks"][0]["extra_info"].get("device", "") if results["benchmarks"] else ""
        print(f"{path}\n\n{table(comparisons(results), device)}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
