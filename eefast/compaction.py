"""When removing exited samples from the batch pays, and the plan of where to do it.

Compacting at an exit costs the ``compact_exits`` op (on a GPU: a few kernels and one
device-to-host read of the survivor count, which stalls the launch queue) and saves the later
stages the rows that left. On a CPU a stage's time is nearly proportional to its rows, so
compaction pays almost always; on a GPU a stage's time is flat below the batch that fills the
device, so removing a few rows of a small batch saves nothing and still pays the read.

At an exit where compaction would not pay, ``EENet.predict(mode="compact")`` *defers* it: the
rows that exit there write their outputs without a host read and ride along, masked, until the
next exit that compacts (or the end). ``CompactionPlan`` decides which exits compact, from
measurements on the device at hand (``measure_compaction``):

- each segment's time (stage s with exit head s, the last stage with the classifier) at a ladder
  of batch sizes, interpolated linearly between them;
- the ``compact_exits`` op's time and the deferred path's time at each exit, at the same sizes;
- the share of samples reaching each segment, from the model's exits on the measuring batch.

For a batch of B samples the expected rows in segment s are B times the share reaching the
exit after the last compaction before s; the plan picks the set of compacting exits with the
smallest predicted time (a shortest path over the exits, exact for this cost model).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from eefast import ops
from eefast.timing import median_time, run_segment_times


def interpolate(batch_sizes: Sequence[int], times: Sequence[float], rows: float) -> float:
    """Time at ``rows`` (may be fractional: an expectation) from times measured at ``batch_sizes``.

    Linear between measured sizes, through 0 below the smallest, proportional above the largest.
    """
    if rows <= 0:
        return 0.0
    if rows <= batch_sizes[0]:
        return times[0] * rows / batch_sizes[0]
    for (b0, t0), (b1, t1) in zip(zip(batch_sizes, times), zip(batch_sizes[1:], times[1:])):
        if rows <= b1:
            return t0 + (t1 - t0) * (rows - b0) / (b1 - b0)
    return times[-1] * rows / batch_sizes[-1]


@dataclasses.dataclass(frozen=True)
class CompactionPlan:
    """Measured costs of one model on one device, and the compaction decisions they imply.

    Attributes:
        batch_sizes: the sizes the times were measured at, ascending.
        segment_times: [N+1][sizes] seconds of segment s (stage s and exit head s; the last stage
            and the classifier).
        compact_times: [N][sizes] seconds of ``compact_exits`` at exit n (input rows, of which the
            share measured to exit there leaves).
        defer_times: [N][sizes] seconds of recording the exits at exit n without compacting.
        reach: [N+1] share of samples reaching segment s (reach[0] = 1).
        device: where it was measured; thresholds: the early exits' thresholds it was measured with.
    """

    batch_sizes: tuple[int, ...]
    segment_times: tuple[tuple[float, ...], ...]
    compact_times: tuple[tuple[float, ...], ...]
    defer_times: tuple[tuple[float, ...], ...]
    reach: tuple[float, ...]
    device: str = "cpu"
    thresholds: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        early = len(self.reach) - 1
        sizes = len(self.batch_sizes)
        if list(self.batch_sizes) != sorted(set(self.batch_sizes)) or not self.batch_sizes or self.batch_sizes[0] < 1:
            raise ValueError(f"CompactionPlan: expected distinct ascending batch sizes >= 1, got {list(self.batch_sizes)}")
        shapes = {"segment_times": (self.segment_times, early + 1), "compact_times": (self.compact_times, early),
                  "defer_times": (self.defer_times, early)}
        for name, (table, rows) in shapes.items():
            if len(table) != rows or any(len(row) != sizes for row in table):
                raise ValueError(
                    f"CompactionPlan: expected {name} of shape [{rows}][{sizes}] (exits x batch sizes), "
                    f"got {[len(row) for row in table]}"
                )

    @property
    def num_early_exits(self) -> int:
        return len(self.reach) - 1

    def mismatch(self, device: torch.device | str, thresholds: Sequence[float]) -> str | None:
        """Why the plan does not describe a model on ``device`` with ``thresholds`` (None if it does)."""
        if str(device) != self.device:
            return f"was measured on {self.device}, the input is on {device}"
        if tuple(thresholds) != tuple(self.thresholds):
            return f"was measured with thresholds {list(self.thresholds)}, the model has {list(thresholds)}"
        return None

    def _time(self, table: Sequence[Sequence[float]], n: int, rows: float) -> float:
        return interpolate(self.batch_sizes, table[n], rows)

    def _stretch(self, batch: int, last: int, until: int | None) -> float:
        """Predicted time from just after compacting at exit ``last`` (-1: the start) through the
        segments up to exit ``until`` compacting there (None: to the end, no more compaction)."""
        rows = batch * self.reach[last + 1]
        end = self.num_early_exits if until is None else until
        time = sum(self._time(self.segment_times, s, rows) for s in range(last + 1, end + 1))
        time += sum(self._time(self.defer_times, n, rows) for n in range(last + 1, end))
        if until is not None:
            time += self._time(self.compact_times, until, rows)
        return time

    def predicted_time(self, batch: int, compact_at: Sequence[bool]) -> float:
        """Seconds the model is predicted to take on ``batch`` samples with these decisions."""
        if len(compact_at) != self.num_early_exits:
            raise ValueError(f"CompactionPlan: expected {self.num_early_exits} decisions, got {len(compact_at)}")
        points = [n for n, compact in enumerate(compact_at) if compact]
        return sum(self._stretch(batch, a, b) for a, b in zip([-1, *points], [*points, None]))

    @functools.lru_cache(maxsize=64)
    def decide(self, batch: int) -> tuple[bool, ...]:
        """Which early exits compact a batch of ``batch`` samples: the fastest set by the measured costs."""
        if batch < 0:
            raise ValueError(f"CompactionPlan: expected a batch size >= 0, got {batch}")
        early = self.num_early_exits
        best = {-1: (0.0, ())}  # last compacting exit -> (time so far, exits compacted)
        for k in range(early):
            best[k] = min(
                (time + self._stretch(batch, j, k), points + (k,)) for j, (time, points) in best.items()
            )
        _, points = min((time + self._stretch(batch, j, None), points) for j, (time, points) in best.items())
        return tuple(n in points for n in range(early))

    def table(self, batch_sizes: Sequence[int] | None = None) -> str:
        """Decisions and predicted milliseconds (always compact / never / planned) per batch size."""
        early = self.num_early_exits
        lines = [f"{'batch':>6} {'compact at exits':<20} {'always ms':>10} {'never ms':>10} {'planned ms':>10}"]
        for batch in batch_sizes or self.batch_sizes:
            decisions = self.decide(batch)
            exits = ",".join(str(n) for n, c in enumerate(decisions) if c) or "-"
            always, never, planned = (1e3 * self.predicted_time(batch, d) for d in
                                      ((True,) * early, (False,) * early, decisions))
            lines.append(f"{batch:>6} {exits:<20} {always:>10.3f} {never:>10.3f} {planned:>10.3f}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CompactionPlan:
        return cls(**{field.name: _tuples(data[field.name]) for field in dataclasses.fields(cls) if field.name in data})


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def ladder(batch: int) -> tuple[int, ...]:
    """Batch sizes to measure at: powers of two below ``batch``, and ``batch``."""
    sizes = {batch}
    size = 1
    while size < batch:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


def record_deferred_exits(
    logits: Tensor,  # [M, K] this exit's class logits
    confidence: Tensor,  # [M] this exit's confidence h
    index: Tensor,  # [M] int64 batch position of each row; ``discard`` for rows that already left
    threshold: float,
    exit_index: int,
    out_logits: Tensor,  # [B+1, K] written in place; row B = discard is scratch
    out_exit: Tensor,  # [B+1] int64, written in place
) -> Tensor:
    """Exits without compacting: rows with ``confidence >= threshold`` that were still running
    write their logits and ``exit_index`` and get the index ``discard`` (they ride along until
    the next compaction removes them). No host synchronisation. Returns the new index [M]."""
    discard = out_logits.shape[0] - 1
    leaving = (confidence >= threshold) & (index != discard)  # a NaN confidence never exits
    rows = torch.where(leaving, index, discard)  # every row not leaving writes the scratch row
    out_logits.index_copy_(0, rows, logits.to(out_logits.dtype))
    out_exit.index_fill_(0, rows, exit_index)
    return torch.where(leaving, discard, index)


@torch.no_grad()
def measure_compaction(model, x: Tensor, repeats: int = 3, batch_sizes: Sequence[int] | None = None) -> CompactionPlan:
    """Measures ``model`` (an ``EENet`` in eval mode) on the batch ``x`` and returns its plan.

    The share of samples reaching each exit comes from the model's own exits on ``x`` with its
    current thresholds; segment and op times are medians of ``repeats`` runs on the first b rows
    of ``x`` for each b of ``batch_sizes`` (default: powers of two up to ``len(x)``), segments as
    ``predict`` runs them (from CUDA graphs when ``model.use_cuda_graphs()`` is on).
    """
    model.check_input(x)
    if x.shape[0] < 1:
        raise ValueError("measure_compaction: expected a batch of at least one sample, got an empty one")
    sizes = tuple(batch_sizes) if batch_sizes is not None else ladder(x.shape[0])
    if not sizes or max(sizes) > x.shape[0]:
        raise ValueError(f"measure_compaction: expected batch sizes in [1, {x.shape[0]}] (rows of x), got {list(sizes)}")
    device = x.device
    exits = model.predict(x, mode="mask").exit
    counts = torch.bincount(exits, minlength=model.num_exits).tolist()
    reach = tuple(sum(counts[n:]) / x.shape[0] for n in range(model.num_exits))

    # each segment as predict runs it (eager, or from CUDA graphs when the model uses them), per size
    per_size = [run_segment_times(model, x[:b], repeats=repeats) for b in sizes]
    segments = tuple(tuple(times[s] for times in per_size) for s in range(len(model.stages)))
    compact_times, defer_times = [], []
    h = x
    for n, (stage, exit_block) in enumerate(zip(model.stages, model.exits)):
        h = stage(h)
        logits, conf_logits = exit_block(h)
        leaving = 1.0 - reach[n + 1] / reach[n] if reach[n] > 0 else 1.0  # share of the rows here that exit
        generator = torch.Generator().manual_seed(n)
        compact, defer = [], []
        for b in sizes:
            confidence = torch.zeros(b, dtype=h.dtype)
            confidence[torch.randperm(b, generator=generator)[: round(leaving * b)]] = 1.0
            confidence, index = confidence.to(device), torch.arange(b, device=device)
            out_logits = logits.new_empty(b + 1, logits.shape[1])
            out_exit = torch.empty(b + 1, dtype=torch.int64, device=device)
            compact.append(median_time(lambda i=h[:b], l=logits[:b], c=confidence, j=index: ops.compact_exits(
                i, l, c, j, 0.5, n, out_logits, out_exit), device, repeats))
            defer.append(median_time(lambda l=logits[:b], c=conf_logits[:b], j=index: record_deferred_exits(
                l, c.sigmoid(), j, 0.5, n, out_logits, out_exit), device, repeats))
        compact_times.append(tuple(compact))
        defer_times.append(tuple(defer))
    return CompactionPlan(sizes, segments, tuple(compact_times), tuple(defer_times), reach,
                          str(device), tuple(model.threshold))
