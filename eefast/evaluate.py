"""Evaluation of an EENet: accuracy against cost (Section 4.3), threshold sweeps and budgets.

- ``evaluate``: batched early-exit inference over a dataset: accuracy, relative cost, FLOPs per
  sample, the exit histogram, each exit's accuracy on the samples it took, time per sample.
- ``exit_outputs``: every exit's prediction and confidence for every sample (mask mode), from
  which ``simulate`` gives accuracy and cost under any thresholds without running the model
  again: used by threshold sweeps and by ``thresholds_for_budget``.
Under torch.distributed each rank takes every world_size-th sample and the sums are reduced.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset

from eefast import reference
from eefast.eenet import EENet


def _shard(dataset: Dataset) -> Dataset:
    """This rank's share of ``dataset`` (every world_size-th sample), or all of it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dataset
    return Subset(dataset, list(range(dist.get_rank(), len(dataset), dist.get_world_size())))


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


@dataclass
class EvalResult:
    """What the thesis reports for a model on a dataset."""

    samples: int
    accuracy: float  # percent
    relative_cost: float  # mean of c_exit over samples
    flops_per_sample: float
    exit_counts: list[int]  # samples leaving at each exit
    exit_accuracy: list[float | None]  # percent correct among the samples each exit took
    time_per_sample_us: float  # wall clock of batched inference, per sample
    thresholds: list[float]

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        exits = ", ".join(
            f"exit {n}: {count}" + (f" ({acc:.1f}%)" if acc is not None else "")
            for n, (count, acc) in enumerate(zip(self.exit_counts, self.exit_accuracy))
        )
        return (
            f"accuracy {self.accuracy:.2f}%  relative cost {self.relative_cost:.3f}  "
            f"FLOPs/sample {self.flops_per_sample:,.0f}  time/sample {self.time_per_sample_us:.1f} us\n"
            f"exit histogram: {exits}"
        )


@torch.no_grad()
def evaluate(model: EENet, dataset: Dataset, device: str | torch.device = "cpu", batch_size: int = 256,
             mode: str = "compact") -> EvalResult:
    """Batched early-exit inference over ``dataset`` with the model's current thresholds."""
    was_training = model.training
    model.eval()
    exits = model.num_exits
    counts = torch.zeros(exits, dtype=torch.float64)
    correct = torch.zeros(exits, dtype=torch.float64)
    elapsed = 0.0
    for x, y in DataLoader(_shard(dataset), batch_size=batch_size):
        x, y = x.to(device), y.to(device)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        pred = model.predict(x, mode=mode)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - start
        hits = (pred.logits.argmax(1) == y).double().cpu()
        exit_index = pred.exit.cpu()
        counts += torch.bincount(exit_index, minlength=exits).double()
        correct += torch.zeros(exits, dtype=torch.float64).index_add_(0, exit_index, hits)
    totals = _all_reduce(torch.cat([counts, correct, torch.tensor([elapsed], dtype=torch.float64)]))
    counts, correct, elapsed = totals[:exits], totals[exits : 2 * exits], totals[-1].item()
    model.train(was_training)
    samples = int(counts.sum().item())
    costs = model.costs.double().cpu()
    flops = torch.tensor(model.flops, dtype=torch.float64)
    denominator = max(samples, 1)
    return EvalResult(
        samples=samples,
        accuracy=100.0 * correct.sum().item() / denominator,
        relative_cost=(counts * costs).sum().item() / denominator,
        flops_per_sample=(counts * flops).sum().item() / denominator,
        exit_counts=[int(c) for c in counts.tolist()],
        exit_accuracy=[100.0 * h / c if c else None for h, c in zip(correct.tolist(), counts.tolist())],
        time_per_sample_us=1e6 * elapsed / denominator,
        thresholds=model.threshold,
    )


@dataclass
class ExitOutputs:
    """Every exit's verdict on every sample of a dataset."""

    correct: torch.Tensor  # [E, N] bool: exit n's prediction is right
    confidence: torch.Tensor  # [E-1, N] h_n of the early exits

    def simulate(self, thresholds: list[float], costs: torch.Tensor) -> tuple[float, float]:
        """(accuracy %, relative cost) had the model run with ``thresholds``."""
        exit_index = reference.first_confident_exit(self.confidence, torch.tensor(thresholds, dtype=torch.float64))
        samples = exit_index.numel()
        accuracy = 100.0 * self.correct[exit_index, torch.arange(samples)].double().mean().item()
        return accuracy, costs.double().cpu()[exit_index].mean().item()


@torch.no_grad()
def exit_outputs(model: EENet, dataset: Dataset, device: str | torch.device = "cpu", batch_size: int = 256) -> ExitOutputs:
    was_training = model.training
    model.eval()
    correct, confidence = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size):
        out = model.forward_all(x.to(device))
        correct.append((out.logits.argmax(-1) == y.to(device)[None]).cpu())
        confidence.append(out.conf_logits.double().sigmoid().cpu())
    model.train(was_training)
    return ExitOutputs(torch.cat(correct, dim=1), torch.cat(confidence, dim=1))


THRESHOLD_GRID = [round(0.05 * i, 2) for i in range(21)]


BUDGET_BAND = 0.025


def thresholds_for_budget(outputs: ExitOutputs, costs: torch.Tensor, budget: float) -> list[float]:
    """Per-exit thresholds that spend the relative-cost ``budget`` for the best accuracy.

    Among the settings whose cost lies in [budget - BUDGET_BAND, budget] (all settings at most
    ``budget`` if none does), the most accurate; ties go to the cheaper. Each exit's candidate
    thresholds are the 0, 5, ..., 100 % quantiles of its confidences (and 0 and 1), so every
    share of samples leaving there can be chosen; exhaustive for up to 3 early exits, one
    shared threshold from the pooled quantiles beyond that.
    """
    early = outputs.confidence.shape[0]
    if early == 0:
        raise ValueError("a budget needs early exits; this model has only its final exit")
    min_cost = costs[0].item()
    if budget < min_cost:
        raise ValueError(f"expected a budget of at least {min_cost:.3f} (the cost of exit 0), got {budget}")
    levels = torch.linspace(0, 1, 21, dtype=torch.float64)

    def grid(confidence: torch.Tensor) -> list[float]:
        finite = confidence[~confidence.isnan()]
        quantiles = torch.quantile(finite, levels).tolist() if finite.numel() else []
        return sorted({0.0, 1.0, *quantiles})

    if early <= 3:
        candidates = (list(t) for t in itertools.product(*(grid(c) for c in outputs.confidence)))
    else:
        candidates = ([t] * early for t in grid(outputs.confidence.flatten()))
    best_key, best = None, None
    for thresholds in candidates:
        accuracy, cost = outputs.simulate(thresholds, costs)
        if cost <= budget + 1e-12:
            key = (cost >= budget - BUDGET_BAND, accuracy, -cost)
            if best_key is None or key > best_key:
                best_key, best = key, thresholds
    if best is None:  # only everyone-at-exit-0 fits
        best = [0.0] * early
    return best


def threshold_sweep(outputs: ExitOutputs, costs: torch.Tensor, values: list[float]) -> list[dict]:
    """Accuracy and cost with one threshold for every exit, for each of ``values``."""
    early = outputs.confidence.shape[0]
    rows = []
    for value in values:
        accuracy, cost = outputs.simulate([value] * early, costs)
        rows.append({"threshold": value, "accuracy": accuracy, "relative_cost": cost})
    return rows
