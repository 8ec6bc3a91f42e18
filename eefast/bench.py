"""End-to-end inference measurements: does early exit turn saved FLOPs into saved time?

For a model, a batch and a controlled exit mix, ``measure_inference`` times the plain network
(the same blocks without exits), the EENet in ``compact``, ``mask`` and ``sample`` modes, and
the pieces of the plain network, and derives:

- FLOP ideal speed-up: plain FLOPs over the mean FLOPs per sample (measured exit histogram,
  exact exit costs);
- time ideal: each segment between exits timed in the plain network on the full batch, times
  the fraction of samples that reach it, plus the exit heads timed the same way; its speed-up
  is plain time over that (with CUDA graphs: the plain network in one graph, and each segment
  with its exit head replayed from its graph);
- realised speed-up (plain time over the mode's time) and efficiency (realised over the time
  ideal: 1.0 means the early-exit machinery costs nothing);
- for ``compact``, the machinery efficiency: the segments timed on just the rows that reach them
  (``eefast.timing.run_segment_times``), summed, over the mode's time (the time ideal also
  charges how the device scales with rows).

``python -m eefast.bench RESULTS.json ...`` prints these as a table from pytest-benchmark JSON.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence

import torch

from eefast.eenet import EENet
from eefast.graphs import capture


@torch.no_grad()
def plain_forward(model: EENet, x: torch.Tensor) -> torch.Tensor:
    """The backbone without exits: every stage, then the final classifier."""
    for stage in model.stages:
        x = stage(x)
    return model.classifier(x)


def graphed_plain_forward(model: EENet, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """``plain_forward(model, x)`` captured in one CUDA graph: each call copies ``x`` in and replays."""
    graph = capture(lambda i: (plain_forward(model, i),), x)

    def run() -> torch.Tensor:
        graph.inputs[0].copy_(x)
        return graph.replay()[0]

    return run


def ideal_time(stage_times: Sequence[float], head_times: Sequence[float], exit_counts: Sequence[int]) -> float:
    """The EENet's time with zero overhead: each segment (and exit head) scaled by the share of
    the batch that reaches it."""
    total = sum(exit_counts)
    reaching = [sum(exit_counts[n:]) / total for n in range(len(exit_counts))]
    return sum(t * r for t, r in zip(stage_times, reaching)) + sum(t * r for t, r in zip(head_times, reaching))


def speedups(model: EENet, exit_counts: Sequence[int], plain_time: float, mode_time: float,
             stage_times: Sequence[float], head_times: Sequence[float]) -> dict:
    total = sum(exit_counts)
    mean_flops = sum(c * f for c, f in zip(exit_counts, model.flops)) / total
    ideal = ideal_time(stage_times, head_times, exit_counts)
    return {
        "flop_ideal_speedup": model.profile.total / mean_flops,
        "time_ideal_speedup": plain_time / ideal,
        "realised_speedup": plain_time / mode_time,
        "efficiency": ideal / mode_time,
    }


# ---- report --------------------------------------------------------------------------------------


def report(paths: Sequence[str]) -> str:
    """Tables of the results in pytest-benchmark JSON files: end-to-end inference (one row per
    mode, with the speed-ups) and compaction policies (one row per policy, measured and predicted)."""
    inference = [f"{'device':<28} {'model':<12} {'dtype':<8} {'batch':>5} {'mode':<13} {'ms/batch':>9} "
                 f"{'samples/s':>10} {'FLOP-ideal':>10} {'time-ideal':>10} {'realised':>8} {'effic.':>6} {'machinery':>9}"]
    compaction = [f"{'device':<28} {'model':<12} {'dtype':<8} {'batch':>5} {'policy':<8} {'compact at':<10} "
                  f"{'ms/batch':>9} {'predicted':>9}"]
    for path in paths:
        data = json.loads(open(path).read())
        for bench in data["benchmarks"]:
            info, median = bench["extra_info"], bench["stats"]["median"]
            if "batch" not in info:
                continue
            head = f"{info['device'][:28]:<28} {info['model']:<12} {info['dtype']:<8} {info['batch']:>5}"
            if "policy" in info:
                exits = ",".join(str(n) for n, c in enumerate(info["compact_at"]) if c) or "-"
                predicted = info["predicted_ms"][info["policy"]]
                compaction.append(f"{head} {info['policy']:<8} {exits:<10} {1e3 * median:>9.2f} {predicted:>9.2f}")
            elif "mode" in info:
                mode = info["mode"] + (" graphs" if info.get("cuda_graphs") else "")
                row = f"{head} {mode:<13} {1e3 * median:>9.2f} {info['batch'] / median:>10.1f}"
                if "efficiency" in info:
                    row += (f" {info['flop_ideal_speedup']:>10.2f} {info['time_ideal_speedup']:>10.2f} "
                            f"{info['realised_speedup']:>8.2f} {info['efficiency']:>6.2f}")
                    if "machinery_efficiency" in info:
                        row += f" {info['machinery_efficiency']:>9.2f}"
                inference.append(row)
    tables = [lines for lines in (inference, compaction) if len(lines) > 1]
    return "\n\n".join("\n".join(lines) for lines in tables)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m eefast.bench RESULTS.json [...]")
    print(report(sys.argv[1:]))
