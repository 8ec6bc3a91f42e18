"""Wall-clock timing of PyTorch work on the CPU or a GPU (used by compaction planning and benchmarks)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device | str) -> None:
    """Waits for the device's queued work (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], device: torch.device | str, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs, after ``warmup`` runs."""
    if repeats < 1:
        raise ValueError(f"median_time: expected repeats >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def segment_times(model, x: torch.Tensor, repeats: int = 5) -> tuple[list[float], list[float]]:
    """Time of each stage of an ``EENet`` (the last one with the classifier) and of each exit
    head, on the batch ``x``: medians of ``repeats`` runs."""
    device = x.device
    stage_times, head_times = [], []
    h = x
    for n, stage in enumerate(model.stages):
        last = n == len(model.stages) - 1
        run = (lambda s=stage, i=h: model.classifier(s(i))) if last else (lambda s=stage, i=h: s(i))
        stage_times.append(median_time(run, device, repeats))
        if not last:
            h = stage(h)
            head_times.append(median_time(lambda e=model.exits[n], i=h: e(i), device, repeats))
    return stage_times, head_times


@torch.no_grad()
def run_segment_times(model, x: torch.Tensor, rows=None, repeats: int = 5) -> list[float]:
    """Time of each segment of an ``EENet`` as ``predict`` runs it (``model.run_segment``: eager,
    or replayed from its CUDA graphs), segment n on the first ``rows[n]`` rows of its input
    (default: the whole batch ``x``); 0.0 for a segment given no rows. Medians of ``repeats`` runs."""
    rows = [x.shape[0]] * model.num_exits if rows is None else list(rows)
    if len(rows) != model.num_exits:
        raise ValueError(f"run_segment_times: expected {model.num_exits} row counts (one per segment), got {len(rows)}")
    times, h = [], x
    for n, count in enumerate(rows):
        part = h[:count].clone()
        times.append(median_time(lambda n=n, i=part: model.run_segment(n, i), x.device, repeats) if count else 0.0)
        if n < model.num_exits - 1:
            h = model.run_segment(n, h)[0].clone()
    return times
