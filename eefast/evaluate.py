"""Evaluation of an EENet: accuracy against cost (Section 4.3), threshold sweeps and budgets.

- ``evaluate``: batched early-exit inference over a dataset: accuracy, relative cost, FLOPs per
  sample, the exit histogram, each exit's accuracy on the samples it took, time per sample.
- ``collect_exits``: every exit's logits and confidence logits for every sample; ``exit_outputs``
  scores them under a policy, and ``simulate`` gives accuracy and cost under any thresholds
  without running the model again: used by threshold sweeps, ``thresholds_for_budget`` /
  ``thresholds_for_drop`` and ``calibrate`` (temperatures and thresholds from validation data),
  and ``budget_table`` (each policy at fixed budgets, fitted on one split, reported on another).
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
from eefast.policies import EXIT_POLICIES, fit_temperatures


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
    confidence: torch.Tensor  # [E-1, N] the early exits' scores under a policy (h_n for ``confidence``)

    def exits(self, thresholds: list[float]) -> torch.Tensor:
        """The exit each sample takes under ``thresholds``, ``[N]`` int64."""
        return reference.first_confident_exit(self.confidence, torch.tensor(thresholds, dtype=torch.float64))

    def exit_counts(self, thresholds: list[float]) -> list[int]:
        """How many samples leave at each exit under ``thresholds``."""
        return torch.bincount(self.exits(thresholds), minlength=self.correct.shape[0]).tolist()

    def simulate(self, thresholds: list[float], costs: torch.Tensor) -> tuple[float, float]:
        """(accuracy %, relative cost) had the model run with ``thresholds``."""
        exit_index = self.exits(thresholds)
        samples = exit_index.numel()
        accuracy = 100.0 * self.correct[exit_index, torch.arange(samples)].double().mean().item()
        return accuracy, costs.double().cpu()[exit_index].mean().item()


@dataclass
class ExitLogits:
    """Every exit's raw outputs on every sample of a dataset (on the CPU)."""

    logits: torch.Tensor  # [E, N, K]
    conf_logits: torch.Tensor  # [E-1, N]
    target: torch.Tensor  # [N] int64

    def scored(self, policy: str, temperature: torch.Tensor) -> ExitOutputs:
        """The verdicts under ``policy`` with per-exit ``temperature [E-1]``."""
        scores = reference.exit_scores(self.logits[:-1], self.conf_logits, policy, temperature.cpu().view(-1, 1))
        return ExitOutputs(self.logits.argmax(-1) == self.target, scores.double())


@torch.no_grad()
def collect_exits(model: EENet, dataset: Dataset, device: str | torch.device = "cpu",
                  batch_size: int = 256) -> ExitLogits:
    was_training = model.training
    model.eval()
    logits, conf_logits, targets = [], [], []
    for x, y in DataLoader(dataset, batch_size=batch_size):
        out = model.forward_all(x.to(device))
        logits.append(out.logits.float().cpu())
        conf_logits.append(out.conf_logits.float().cpu())
        targets.append(y)
    model.train(was_training)
    return ExitLogits(torch.cat(logits, dim=1), torch.cat(conf_logits, dim=1), torch.cat(targets))


def exit_outputs(model: EENet, dataset: Dataset, device: str | torch.device = "cpu", batch_size: int = 256,
                 policy: str | None = None) -> ExitOutputs:
    """Every exit's verdict under ``policy`` (default: the model's) and the model's temperatures."""
    return collect_exits(model, dataset, device, batch_size).scored(policy or model.policy, model.exit_temperature)


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
    if outputs.confidence.shape[0] == 0:
        raise ValueError("a budget needs early exits; this model has only its final exit")
    min_cost = costs[0].item()
    if not budget >= min_cost:
        raise ValueError(f"expected a budget of at least {min_cost:.3f} (the cost of exit 0), got {budget}")
    best_key, best = None, None
    for thresholds in _candidate_thresholds(outputs):
        accuracy, cost = outputs.simulate(thresholds, costs)
        if cost <= budget + 1e-12:
            key = (cost >= budget - BUDGET_BAND, accuracy, -cost)
            if best_key is None or key > best_key:
                best_key, best = key, thresholds
    if best is None:  # only everyone-at-exit-0 fits
        best = [0.0] * outputs.confidence.shape[0]
    return best


def _candidate_thresholds(outputs: ExitOutputs):
    """Each exit's candidate thresholds are the 0, 5, ..., 100 % quantiles of its scores (and 0
    and 1), so every share of samples leaving there can be chosen; every combination for up to
    3 early exits, one shared threshold from the pooled quantiles beyond that."""
    early = outputs.confidence.shape[0]
    levels = torch.linspace(0, 1, 21, dtype=torch.float64)

    def grid(confidence: torch.Tensor) -> list[float]:
        finite = confidence[~confidence.isnan()]
        quantiles = torch.quantile(finite, levels).tolist() if finite.numel() else []
        return sorted({0.0, 1.0, *quantiles})

    if early <= 3:
        return (list(t) for t in itertools.product(*(grid(c) for c in outputs.confidence)))
    return ([t] * early for t in grid(outputs.confidence.flatten()))


DEFAULT_MAX_DROP = 0.25


def thresholds_for_drop(outputs: ExitOutputs, costs: torch.Tensor, max_drop: float = DEFAULT_MAX_DROP) -> list[float]:
    """The cheapest per-exit thresholds whose accuracy is at most ``max_drop`` points below the
    final exit's alone (ties go to the more accurate); candidates as ``thresholds_for_budget``."""
    if outputs.confidence.shape[0] == 0:
        raise ValueError("calibrating thresholds needs early exits; this model has only its final exit")
    if not 0 <= max_drop <= 100:
        raise ValueError(f"expected max_drop in [0, 100] accuracy points, got {max_drop}")
    floor = 100.0 * outputs.correct[-1].double().mean().item() - max_drop
    best_key, best = None, [1.0] * outputs.confidence.shape[0]
    for thresholds in _candidate_thresholds(outputs):
        accuracy, cost = outputs.simulate(thresholds, costs)
        if accuracy >= floor - 1e-9:
            key = (-cost, accuracy)
            if best_key is None or key > best_key:
                best_key, best = key, thresholds
    return best


def thresholds_for_final_accuracy(outputs: ExitOutputs) -> list[float]:
    """Every exit's threshold at the final exit's accuracy on these samples (as a fraction): a
    sample leaves early once its score (a temperature-scaled probability under ``max_prob``)
    says it is at least as likely right as the final exit is on average. One statistic of all the samples, where ``thresholds_for_drop`` reads a
    difference of a few of them."""
    if outputs.confidence.shape[0] == 0:
        raise ValueError("calibrating thresholds needs early exits; this model has only its final exit")
    accuracy = outputs.correct[-1].double().mean().item()
    return [accuracy] * outputs.confidence.shape[0]


def calibrate(model: EENet, dataset: Dataset, device: str | torch.device = "cpu", budget: float | None = None,
              max_drop: float | None = None) -> list[float]:
    """Fits the model's exit rule on held-out ``dataset`` (the validation split): per-exit
    temperatures (``eefast.policies.fit_temperatures``), then thresholds: for the relative-cost
    ``budget``; or the cheapest within ``max_drop`` points of the final exit; or, with neither
    (the default), every threshold at the final exit's accuracy (``thresholds_for_final_accuracy``).
    Sets and returns the thresholds."""
    raw = collect_exits(model, dataset, device)
    model.set_exit_temperature(fit_temperatures(raw.logits[:-1], raw.target))
    outputs = raw.scored(model.policy, model.exit_temperature)
    if budget is not None:
        model.threshold = thresholds_for_budget(outputs, model.costs, budget)
    elif max_drop is not None:
        model.threshold = thresholds_for_drop(outputs, model.costs, max_drop)
    else:
        model.threshold = thresholds_for_final_accuracy(outputs)
    return model.threshold


def budget_table(fit: ExitLogits, report: ExitLogits, costs: torch.Tensor, budgets: list[float],
                 policies: tuple[str, ...] = EXIT_POLICIES) -> list[dict]:
    """Each policy at each relative-cost budget, the way the field reports early exits: the
    temperatures and thresholds fitted on ``fit`` (validation), accuracy and cost on ``report``
    (test). One row per (policy, budget)."""
    temperature = fit_temperatures(fit.logits[:-1], fit.target)
    rows = []
    for policy in policies:
        on_fit, on_report = fit.scored(policy, temperature), report.scored(policy, temperature)
        for budget in budgets:
            thresholds = thresholds_for_budget(on_fit, costs, budget)
            accuracy, cost = on_report.simulate(thresholds, costs)
            rows.append({"policy": policy, "budget": budget, "thresholds": thresholds, "accuracy": accuracy,
                         "relative_cost": cost, "exit_counts": on_report.exit_counts(thresholds)})
    return rows


def threshold_sweep(outputs: ExitOutputs, costs: torch.Tensor, values: list[float]) -> list[dict]:
    """Accuracy and cost with one threshold for every exit, for each of ``values``."""
    early = outputs.confidence.shape[0]
    rows = []
    for value in values:
        accuracy, cost = outputs.simulate([value] * early, costs)
        rows.append({"threshold": value, "accuracy": accuracy, "relative_cost": cost})
    return rows
