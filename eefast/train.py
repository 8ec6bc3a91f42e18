"""Training an EENet (single-stage, Section 3.4) with early stopping, checkpoints and resume.

``train(TrainConfig(...))`` runs the whole job: data, model, the EENet loss, an epoch loop that
writes ``history.csv`` / ``history.json`` and the ``best.pt`` / ``last.pt`` checkpoints each
epoch, then the test report (``summary.json``) and plots. ``resume=True`` continues from
``last.pt`` exactly: the weights, optimizer, RNG and data order are those an uninterrupted run
would have. Under ``torchrun`` it runs DistributedDataParallel (NCCL on GPUs, gloo on CPUs);
rank 0 alone writes files, and metrics are reduced across ranks.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import json
import math
import os
import signal
import sys
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Subset

from eefast import reference
from eefast.checkpoint import (TRAINING_FIELDS, CheckpointError, apply_checkpoint, check_payload, load_checkpoint,
                               save_checkpoint)
from eefast.data import load_dataset
from eefast.eenet import EENet, EENetLoss
from eefast.evaluate import EvalResult, calibrate, evaluate
from eefast.models import create_model
from eefast.models.external import is_external
from eefast.models.registry import check_model_args


@dataclass
class TrainConfig:
    model: str = "eenet8"  # a registered name, or torchvision:NAME / timm:NAME (eefast.models.external)
    weights: str | None = None  # torchvision / timm networks: a state dict file, or the library's named weights
    dataset: str = "mnist-sample"
    data_root: str = "data"
    download: bool = False
    exits: int | None = None  # None: the model's default
    distribution: str | None = None
    exit_type: str | None = None
    filters: int | None = None  # eenet8 / resnet8 only
    recipe: str = "eefast"  # RECIPES: the loss's extra terms, the exit policy and its calibration
    loss: str = "v2"
    lam: float = 1.0
    exit_weight: float | None = None  # None: the recipe's
    distill: float | None = None
    distill_temperature: float = 3.0
    confidence_only: bool | None = None
    optimizer: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 0.05
    lr_schedule: str = "cosine"  # or "constant"; per phase of the schedule
    schedule: str | None = None  # SCHEDULES; None: the recipe's
    exit_epochs: int | None = None  # two-phase schedules: the epochs of the exits' phase (None: epochs / 6)
    exit_lr: float | None = None  # the learning rate of phases that train the exits on a frozen backbone (10 x lr)
    augment: bool = True
    batch_size: int = 64
    epochs: int = 30
    patience: int = 20
    min_delta: float = 0.001
    policy: str | None = None  # None: the recipe's
    threshold: float | list[float] | None = None  # None: the recipe's (calibrated thresholds, or 0.5)
    budget: float | None = None  # calibrate the thresholds for this relative cost instead
    max_drop: float | None = None  # calibrate the cheapest thresholds within this many points instead
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"
    out: str = "runs/eefast"
    resume: bool = False
    quiet: bool = False
    plots: bool = True
    extra: dict = field(default_factory=dict)  # more create_model arguments


# What --resume may change: where and how the run reports, and when it stops early. Everything
# else decides the weights of the epochs still to run, or the exit rule calibrated after each
# epoch (policy, thresholds, budget), and must be what the checkpoint was trained with.
RESUME_MAY_CHANGE = frozenset({"resume", "quiet", "plots", "device", "out", "data_root", "download", "patience",
                               "min_delta"})


def recorded_config(stored: dict) -> dict:
    """The run's configuration as a checkpoint records it; fields that eefast 0.1 did not record take
    the values it trained with (the thesis's loss, a constant learning rate, no augmentation)."""
    legacy = {"recipe": "thesis", "exit_weight": None, "distill": None, "distill_temperature": 3.0,
              "confidence_only": None, "weight_decay": 1e-4 if stored.get("optimizer") == "sgd" else 0.0,
              "lr_schedule": "constant", "schedule": None, "exit_epochs": None, "exit_lr": None, "augment": False,
              "policy": None, "budget": None, "max_drop": None}
    return {**legacy, **stored}


def check_resume_config(stored: dict, given: dict, where: str) -> None:
    """Raises ValueError naming every setting of ``given`` that differs from the checkpoint's run.
    ``epochs`` may change only where the learning rate does not depend on it (constant, joint)."""
    stored, given = recorded_config(stored), dict(given)
    for config in (stored, given):  # a recipe's setting given explicitly is the same setting
        if config.get("recipe") in RECIPES:
            config.update({k: v for k, v in RECIPES[config["recipe"]].items() if config.get(k) is None})
    may_change = set(RESUME_MAY_CHANGE)
    if stored.get("lr_schedule") == "constant" and stored.get("schedule") in (None, "joint") \
            and given.get("schedule") in (None, "joint"):
        may_change.add("epochs")
    differ = [key for key in given if key not in may_change and stored.get(key) != given[key]]
    if differ:
        trained = ", ".join(f"{key}={stored.get(key)!r}" for key in differ)
        asked = ", ".join(f"{key}={given[key]!r}" for key in differ)
        raise ValueError(f"--resume: {where} was trained with {trained}; expected the same to resume it, got "
                         f"{asked} (start a new run with another --out to change them)")


def check_resume_state(checkpoint: dict, optimizer: torch.optim.Optimizer, where: str, config: TrainConfig,
                       steps: int, world_size: int) -> None:
    """Raises CheckpointError naming the first piece of a training checkpoint's state that --resume
    could not continue from exactly: the epoch and its history, the early-stopping state, the RNG
    states, where a stopped epoch stopped, and the optimizer's state (already loaded)."""
    def fail(field: str, expected: str, got) -> None:
        raise CheckpointError(f"{where}: expected {field} {expected}, got {got!r}")

    def is_rng(value) -> bool:
        return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.shape == rng_shape

    rng_shape = torch.get_rng_state().shape
    epoch, history = checkpoint["epoch"], checkpoint["history"]
    if not -1 <= epoch < config.epochs:
        fail("epoch", f"in [-1, {config.epochs}) (the last finished one, under --epochs {config.epochs})", epoch)
    if len(history) != epoch + 1 or not all(isinstance(row, dict) and isinstance(row.get("exit_counts"), list)
                                            for row in history):
        fail("history", f"{epoch + 1} epoch records (dicts with exit_counts)",
             f"{len(history)} records of types {sorted({type(row).__name__ for row in history})}")
    if math.isnan(checkpoint["best_loss"]):
        fail("best_loss", "a number (inf before the first epoch)", checkpoint["best_loss"])
    if not is_rng(checkpoint["rng_state"]):
        fail("rng_state", f"a uint8 tensor of shape {list(rng_shape)} (torch.get_rng_state())",
             getattr(checkpoint["rng_state"], "shape", checkpoint["rng_state"]))
    trained_on = checkpoint.get("world_size")  # not recorded before eefast 0.2 at epoch boundaries
    position = checkpoint.get("position")
    if position is not None:
        trained_on = len(position["ranks"]) if isinstance(position.get("ranks"), list) else 1
    if trained_on is not None and trained_on != world_size:
        raise ValueError(f"--resume: {where} was trained with {trained_on} process(es); expected the same number to "
                         f"resume it exactly (the data order and the batch depend on it), got {world_size}")
    if position is not None:
        if position.get("epoch") != epoch + 1:
            fail("position.epoch", f"{epoch + 1} (the epoch after the last finished one)", position.get("epoch"))
        step = position.get("step")
        if not (isinstance(step, int) and not isinstance(step, bool) and 0 <= step <= steps):
            fail("position.step", f"an integer in [0, {steps}] (the epoch's batches)", step)
        ranks = position.get("ranks") or [{"sums": position.get("sums"), "samples": position.get("samples"),
                                          "rng_state": checkpoint["rng_state"]}]
        for i, rank in enumerate(ranks if isinstance(ranks, list) else [None]):
            if not isinstance(rank, dict):
                fail(f"position.ranks[{i}]", "a dict", rank)
            sums, samples = rank.get("sums"), rank.get("samples")
            if not (isinstance(sums, list) and len(sums) == 3 and all(
                    isinstance(v, (int, float)) and math.isfinite(v) for v in sums)):
                fail(f"position.ranks[{i}].sums", "3 finite numbers (the epoch's loss sums so far)", sums)
            if not (isinstance(samples, int) and not isinstance(samples, bool) and samples >= 0):
                fail(f"position.ranks[{i}].samples", "an integer >= 0", samples)
            if not is_rng(rank.get("rng_state")):
                fail(f"position.ranks[{i}].rng_state", f"a uint8 tensor of shape {list(rng_shape)}",
                     getattr(rank.get("rng_state"), "shape", rank.get("rng_state")))
    for g, group in enumerate(optimizer.param_groups):
        if group.get("weight_decay") != config.weight_decay:
            fail(f"optimizer_state param_groups[{g}].weight_decay", f"{config.weight_decay} (--weight-decay)",
                 group.get("weight_decay"))
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if not isinstance(value, torch.Tensor):
                    continue
                if value.dim() and value.shape != p.shape:
                    fail(f"optimizer state {key!r}", f"of its parameter's shape {list(p.shape)}", list(value.shape))
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    fail(f"optimizer state {key!r}", "finite", "a tensor with NaN or inf")


class FinalExitLoss:
    """The final exit's cross-entropy alone, with ``EENetLoss``'s call and ``terms``."""

    def __call__(self, output, target: torch.Tensor, costs: torch.Tensor) -> torch.Tensor:
        return reference.exit_cross_entropy(output.logits[-1:], target)[0]

    def terms(self, output, target: torch.Tensor, costs: torch.Tensor):
        loss = self(output, target, costs)
        return loss, loss.detach(), costs[-1]


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # the Trainer created the process group, and destroys it when done

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _finite(value, low: float, high: float = math.inf, *, open_low: bool = False) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and (value > low if open_low else value >= low) and value <= high)


def check_config(config: TrainConfig) -> None:
    """Raises ValueError naming the option, what it expects and what it got, before a run starts
    (before any data is loaded, model built or file written)."""
    whole = lambda v, low: isinstance(v, int) and not isinstance(v, bool) and v >= low  # noqa: E731
    checks = [
        ("--epochs", config.epochs, whole(config.epochs, 1), "an integer >= 1"),
        ("--batch-size", config.batch_size, whole(config.batch_size, 1), "an integer >= 1"),
        ("--patience", config.patience, whole(config.patience, 1), "an integer >= 1"),
        ("--seed", config.seed, whole(config.seed, 0), "an integer >= 0"),
        ("--lr", config.lr, _finite(config.lr, 0, open_low=True), "a finite number > 0"),
        ("--weight-decay", config.weight_decay, _finite(config.weight_decay, 0), "a finite number >= 0"),
        ("--lam", config.lam, _finite(config.lam, 0), "a finite number >= 0"),
        ("--min-delta", config.min_delta, _finite(config.min_delta, 0), "a finite number >= 0"),
        ("--val-fraction", config.val_fraction, _finite(config.val_fraction, 0, 1, open_low=True)
         and config.val_fraction < 1, "a number in (0, 1)"),
        ("--distill-temperature", config.distill_temperature, _finite(config.distill_temperature, 0, open_low=True),
         "a finite number > 0"),
        ("--budget", config.budget, config.budget is None or _finite(config.budget, 0, 1, open_low=True),
         "a relative cost in (0, 1]"),
        ("--max-drop", config.max_drop, config.max_drop is None or _finite(config.max_drop, 0, 100),
         "accuracy points in [0, 100]"),
        ("--exit-lr", config.exit_lr, config.exit_lr is None or _finite(config.exit_lr, 0, open_low=True),
         "a finite number > 0"),
        ("--exit-weight", config.exit_weight, config.exit_weight is None or _finite(config.exit_weight, 0),
         "a finite number >= 0"),
        ("--distill", config.distill, config.distill is None or _finite(config.distill, 0), "a finite number >= 0"),
        ("--exits", config.exits, config.exits is None or whole(config.exits, 0), "an integer >= 0"),
        ("--filters", config.filters, config.filters is None or whole(config.filters, 1), "an integer >= 1"),
        ("--threshold", config.threshold, config.threshold is None or all(
            _finite(t, 0, 1) for t in (config.threshold if isinstance(config.threshold, list) else [config.threshold])),
         "thresholds in [0, 1]"),
        ("--optimizer", config.optimizer, config.optimizer in OPTIMIZERS, f"one of {OPTIMIZERS}"),
        ("--lr-schedule", config.lr_schedule, config.lr_schedule in LR_SCHEDULES, f"one of {LR_SCHEDULES}"),
        ("--recipe", config.recipe, config.recipe in RECIPES, f"one of {list(RECIPES)}"),
        ("--schedule", config.schedule, config.schedule is None or config.schedule in SCHEDULES,
         f"one of {list(SCHEDULES)}"),
        ("--weights", config.weights, config.weights is None or (isinstance(config.weights, str) and config.weights),
         "a file or a named weight"),
    ]
    for option, value, valid, expected in checks:
        if not valid:
            raise ValueError(f"{option}: expected {expected}, got {value!r}")
    if config.threshold is not None and (config.budget is not None or config.max_drop is not None):
        raise ValueError(f"expected fixed thresholds or a calibration, got --threshold {config.threshold} "
                         f"with --budget {config.budget} / --max-drop {config.max_drop}")
    if config.exit_epochs is not None and not (whole(config.exit_epochs, 1) and config.exit_epochs < config.epochs):
        raise ValueError(f"--exit-epochs: expected 0 < --exit-epochs < --epochs ({config.epochs}), "
                         f"got {config.exit_epochs!r}")
    extra = {"num_exits": config.exits, "distribution": config.distribution, "exit_type": config.exit_type,
             "filters": config.filters, **config.extra}
    check_model_args(config.model, {k: v for k, v in extra.items() if v is not None})
    if "weights" in config.extra:
        raise ValueError(f"expected --weights (TrainConfig.weights), not weights in the model's extra arguments (they "
                         f"are stored in checkpoints), got extra weights={config.extra['weights']!r}")
    if config.weights is not None and not is_external(config.model):
        raise ValueError(f"--weights: expected a torchvision:NAME or timm:NAME network (--backbone), got --model "
                         f"{config.model} (its checkpoints carry its weights: eefast eval / --resume read them)")
    parse_device(config.device)
    out = Path(config.out)
    check_output_dir(out)
    if (out / "last.pt").exists() and not config.resume:
        raise ValueError(f"--out {out} holds a training run already (last.pt); expected a new directory, or --resume "
                         "to continue that run")


def parse_device(device: str) -> torch.device | None:
    """``--device``: None for auto, else a CPU or CUDA device this machine has."""
    if device == "auto":
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as error:
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, got {device!r}") from error
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, got {device!r}")
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {device}: no CUDA device is visible here; use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"--device {device}: expected a CUDA device index below {count} (the devices here)")
    return parsed


def check_output_dir(out: Path) -> None:
    """Raises ValueError unless ``out`` is a directory this process can write files in, or one it can
    create (its nearest existing parent is a writable directory). Creates nothing."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: expected a directory, found a file")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out {out}: cannot write there ({existing} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK) or existing.resolve().parts[1:2] in (("proc",), ("sys",)):
        raise ValueError(f"--out {out}: cannot write there ({existing} is not a writable directory)")


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    parsed = parse_device(device)
    if parsed is None:
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return parsed


def setup_distributed(device: str) -> Distributed:
    """Joins the torchrun process group when WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = resolve_device(device, local_rank).type == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank, owns_group)


def model_kwargs(config: TrainConfig, num_classes: int, input_shape) -> dict:
    """create_model arguments of the run (stored in checkpoints so the model can be rebuilt)."""
    kwargs = {"num_classes": num_classes, "input_shape": list(input_shape), **config.extra}
    for key, value in (("num_exits", config.exits), ("distribution", config.distribution),
                       ("exit_type", config.exit_type), ("filters", config.filters)):
        if value is not None:
            kwargs[key] = value
    return kwargs


OPTIMIZERS = ("adamw", "adam", "sgd")
LR_SCHEDULES = ("cosine", "constant")
# What each kind of training phase trains; the rest is frozen (no gradients, and batch norm keeps
# its statistics: the frozen parts run in eval mode).
# joint: every part, on the EENet loss (the thesis's single-stage training).
# backbone: the backbone and its classifier alone, on the final exit's cross-entropy (the plain network's training).
# exits: the early exits alone, on the frozen backbone and classifier (SDN trains its internal classifiers so).
# heads: the early exits and the final classifier, on the frozen stages (a pretrained feature extractor).
PHASE_KINDS = ("joint", "backbone", "exits", "heads")
# The phases of each schedule, in order. A two-phase schedule gives its exits' phase (exits or heads)
# ``exit_epochs`` (a sixth of the run by default): the last ones after the backbone's phase, the
# first ones before exits-then-joint's joint phase. frozen-backbone (--freeze-backbone) trains the
# exits and the final classifier on a backbone that stays bit-identical.
SCHEDULES = {
    "joint": ("joint",),
    "backbone-first": ("backbone", "exits"),
    "backbone-then-joint": ("backbone", "joint"),
    "frozen-backbone": ("heads",),
    "exits-then-joint": ("heads", "joint"),
}


PHASE_NAMES = {"joint": "joint training", "backbone": "the backbone alone", "exits": "the exits alone",
               "heads": "the exits and classifier on the frozen stages"}


class Phase(NamedTuple):
    kind: str  # PHASE_KINDS
    start: int  # its first epoch
    end: int  # the epoch after its last


def build_optimizer(name: str, params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")


def training_phases(config: TrainConfig, has_exits: bool = True) -> list[Phase]:
    """The run's phases under its schedule. A model without early exits, and a run of one epoch
    without ``exit_epochs``, cannot split a backbone's phase from an exits' one: they train jointly
    (the frozen-backbone schedules still freeze the stages)."""
    kinds = SCHEDULES[recipe_value(config, "schedule")]
    epochs = config.epochs
    if kinds[0] == "backbone" and not has_exits:
        kinds = ("joint",)
    if len(kinds) == 1:
        return [Phase(kinds[0], 0, epochs)]
    if config.exit_epochs is None and epochs < 2:
        return [Phase("joint", 0, epochs)]
    exit_epochs = max(1, round(epochs / 6)) if config.exit_epochs is None else config.exit_epochs
    split = exit_epochs if kinds[0] == "heads" else epochs - exit_epochs
    return [Phase(kinds[0], 0, split), Phase(kinds[1], split, epochs)]


def phase_at(phases: list[Phase], epoch: int) -> Phase:
    return next(p for p in phases if p.start <= epoch < p.end)


def learning_rate(config: TrainConfig, epoch: int, step: int, steps_per_epoch: int,
                  phases: list[Phase] | None = None) -> float:
    """The learning rate of a step: constant, or cosine-annealed from ``lr`` to 0 over each phase.
    A function of the step alone, so a resumed run needs no scheduler state."""
    phase = phase_at(phases or [Phase("joint", 0, config.epochs)], epoch)
    lr = config.lr
    if phase.kind in ("exits", "heads"):
        # the exits alone are linear heads on small pooled features of a frozen backbone: at the
        # backbone's rate they barely move in a few epochs (EENet-8's exits, 3 epochs, validation:
        # 14 % / 18 % at 2e-3, 22 % / 52 % at 2e-2; benchmarks/results/mnist_sample_exits.md)
        lr = 10 * config.lr if config.exit_lr is None else config.exit_lr
    if config.lr_schedule == "constant":
        return lr
    progress = ((epoch - phase.start) * steps_per_epoch + step) / max((phase.end - phase.start) * steps_per_epoch, 1)
    return 0.5 * lr * (1.0 + math.cos(math.pi * progress))


# The recipes. ``thesis``: the thesis's loss as written, exit on the learned confidence at
# T = 0.5. ``eefast`` (default): single-stage training in which each exit's classifier also
# learns from its own cross-entropy and the thesis's terms train the confidence heads only; exit
# on the temperature-scaled top probability, thresholds calibrated on the validation split.
# Chosen by the ablation in benchmarks/results/mnist_sample_exits.md (benchmarks/exits_table.py):
# distillation and backbone-first training, measured there, are options (--distill, --schedule).
RECIPES = {
    "thesis": dict(exit_weight=0.0, distill=0.0, confidence_only=False, policy="confidence", threshold=0.5,
                   schedule="joint"),
    "eefast": dict(exit_weight=1.0, distill=0.0, confidence_only=True, policy="max_prob", threshold=None,
                   schedule="joint"),
}


def recipe_value(config: TrainConfig, name: str):
    """A recipe setting: the config's own where given, else the recipe's."""
    if config.recipe not in RECIPES:
        raise ValueError(f"unknown recipe {config.recipe!r}; expected one of {list(RECIPES)}")
    value = getattr(config, name)
    return RECIPES[config.recipe][name] if value is None else value


def build_loss(config: TrainConfig) -> EENetLoss:
    return EENetLoss(lam=config.lam, version=config.loss, exit_weight=recipe_value(config, "exit_weight"),
                     distill=recipe_value(config, "distill"), distill_temperature=config.distill_temperature,
                     confidence_only=recipe_value(config, "confidence_only"))


def weights_digest(model: torch.nn.Module) -> str:
    """A hash of every parameter and buffer: equal digests, equal weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _reduce_mean(values: torch.Tensor, dist_info: Distributed) -> torch.Tensor:
    if dist_info.world_size > 1:
        dist.all_reduce(values)
        values /= dist_info.world_size
    return values


class Interruption:
    """Turns SIGINT / SIGTERM into a flag that the training loop checks after each step, so it can
    save a resumable checkpoint and exit (non-zero) instead of dying mid-write."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> Interruption:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class TrainingInterrupted(SystemExit):
    """Raised after an interruption checkpoint was written; exits with 128 + the signal number."""


def _progress(iterable, enabled: bool, **kwargs):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)


def _write_history(out: Path, history: list[dict]) -> None:
    (out / "history.json").write_text(json.dumps(history, indent=2))
    columns = [k for k in history[0] if not isinstance(history[0][k], list)] + ["exit_counts"]
    with open(out / "history.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        for row in history:
            writer.writerow([" ".join(map(str, row[c])) if c == "exit_counts" else row[c] for c in columns])


@torch.no_grad()
def validation_loss(model: EENet, criterion: EENetLoss, dataset, device, batch_size: int) -> float:
    """The training objective on the validation split (eval mode), averaged over batches' samples."""
    model.eval()
    total, count = 0.0, 0
    for x, y in DataLoader(dataset, batch_size=max(batch_size, 256)):
        x, y = x.to(device), y.to(device)
        total += criterion(model.forward_all(x), y, model.costs).item() * x.shape[0]
        count += x.shape[0]
    return total / max(count, 1)


def train(config: TrainConfig) -> dict:
    """Runs the training job; returns the summary (also written to ``out/summary.json``)."""
    return Trainer(config).run()


class Trainer:
    """One training run: its data, model, optimizer and the state that checkpoints carry."""

    def __init__(self, config: TrainConfig):
        check_config(config)
        self.config = config
        self.dist = setup_distributed(config.device)
        self.device = resolve_device(config.device, self.dist.local_rank)
        self.out = Path(config.out)
        self.show = self.dist.is_main and not config.quiet
        self.bars = self.show and sys.stderr.isatty()

        self.splits = load_dataset(config.dataset, config.data_root, config.download, config.seed,
                                   config.val_fraction, augment=config.augment)
        kwargs = model_kwargs(config, self.splits.num_classes, self.splits.input_shape)
        torch.manual_seed(config.seed)
        weights = {"weights": config.weights} if config.weights is not None and not config.resume else {}
        self.model = create_model(config.model, **{**kwargs, "input_shape": tuple(kwargs["input_shape"])}, **weights)
        self.model.to(self.device)
        self.model.policy = recipe_value(config, "policy")
        self.fixed_threshold = recipe_value(config, "threshold")  # None: calibrated after each epoch
        if config.budget is not None or config.max_drop is not None:
            self.fixed_threshold = None
        if self.fixed_threshold is not None:
            self.model.threshold = self.fixed_threshold
        self.criterion = build_loss(config)
        self.phases = training_phases(config, has_exits=len(self.model.exits) > 0)
        self.optimizer = build_optimizer(config.optimizer, self.model.parameters(), config.lr, config.weight_decay)
        self.payload = {"model_name": config.model, "model_kwargs": kwargs, "config": asdict(config)}

        self.start_epoch, self.history = 0, []
        self.best_loss, self.stale_epochs = math.inf, 0
        self.position = None  # where an interrupted epoch stopped: {"epoch", "step", "sums", "samples"}
        self.resume_rng = None  # the RNG state to restore where that epoch stopped
        if config.resume:
            self._resume()

        self.train_model = self.model
        if self.dist.world_size > 1:
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.dist.local_rank] if self.device.type == "cuda" else None,
                # phases that freeze a part leave its parameters without gradients
                find_unused_parameters=any(phase.kind != "joint" for phase in self.phases),
            )

    def _resume(self) -> None:
        path = self.out / "last.pt"
        checkpoint = load_checkpoint(path, map_location=self.device)
        check_payload(checkpoint, str(path), TRAINING_FIELDS)
        check_resume_config(checkpoint["config"], asdict(self.config), str(path))
        try:
            apply_checkpoint(self.model, checkpoint)
            self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        except (RuntimeError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{path}: its weights or optimizer state do not fit the run's model: "
                                  f"{type(error).__name__}: {error}") from error
        position = checkpoint.get("position")
        stopped_in = position.get("epoch") if isinstance(position, dict) else None
        steps = self._loader(stopped_in if isinstance(stopped_in, int) and 0 <= stopped_in < self.config.epochs else 0)[1]
        check_resume_state(checkpoint, self.optimizer, str(path), self.config, steps, self.dist.world_size)
        self.model.policy = recipe_value(self.config, "policy")
        if self.fixed_threshold is not None:
            self.model.threshold = self.fixed_threshold
        self.start_epoch = checkpoint["epoch"] + 1
        self.history = list(checkpoint["history"])
        self.best_loss, self.stale_epochs = checkpoint["best_loss"], checkpoint["stale_epochs"]
        if position is None:
            torch.set_rng_state(checkpoint["rng_state"].cpu())  # map_location may have moved it
        else:  # stopped mid-epoch: each rank goes on with its own loss sums and RNG state
            ranks = position.get("ranks") or [  # checkpoints of eefast <= 0.1 hold one process's state
                {"sums": position["sums"], "samples": position["samples"], "rng_state": checkpoint["rng_state"]}]
            mine = ranks[self.dist.rank]
            self.position = {"epoch": position["epoch"], "step": position["step"], "sums": mine["sums"],
                             "samples": mine["samples"]}
            self.resume_rng = mine["rng_state"].cpu()
        if self.show:
            p = self.position
            where = f"epoch {p['epoch'] + 1}, step {p['step']}" if p else f"epoch {self.start_epoch}"
            print(f"resuming {self.out / 'last.pt'} after {where}")

    def run(self) -> dict:
        try:
            return self._run()
        finally:
            if self.dist.owns_group:
                # Tear the group down while Python is alive: left to interpreter shutdown (DDP holds
                # it), a gloo worker thread may take the GIL there and abort the process.
                self.train_model = self.model
                gc.collect()
                dist.destroy_process_group()

    def _run(self) -> dict:
        config, model = self.config, self.model
        if self.show:
            costs = ", ".join(f"{c:.3f}" for c in model.costs.tolist())
            print(f"{config.model} on {config.dataset} ({len(self.splits.train)} train / {len(self.splits.val)} val / "
                  f"{len(self.splits.test)} test), exits after blocks {model.exit_positions}, costs [{costs}], "
                  f"recipe {config.recipe} (loss {config.loss} lam {config.lam}, "
                  + ", then ".join(f"{PHASE_NAMES[p.kind]} for epochs {p.start + 1}-{p.end}" for p in self.phases)
                  + f", exit policy {model.policy}), device {self.device}"
                  + (f", {self.dist.world_size} processes" if self.dist.world_size > 1 else ""))
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)  # checked before anything was loaded (check_output_dir)
        with Interruption() as interruption:
            for epoch in range(self.start_epoch, config.epochs):
                if self.stale_epochs >= config.patience:
                    break
                means = self._train_epoch(epoch, interruption)
                self._end_epoch(epoch, means)
                signum = self._stop_signal(interruption)
                if signum is not None:  # a signal during validation: the epoch is saved, stop
                    raise TrainingInterrupted(128 + signum)
        summary = self.finish()
        if self.dist.world_size > 1:
            dist.barrier()
        return summary

    def _loader(self, epoch: int, skip: int = 0) -> tuple[DataLoader, int]:
        """The epoch's batches from batch ``skip`` on, and the number of batches in the whole epoch.
        Skipped batches are not loaded: loading draws the augmentation's random shifts."""
        config, dist_info = self.config, self.dist
        if dist_info.world_size > 1:
            sampler = DistributedSampler(self.splits.train, dist_info.world_size, dist_info.rank, seed=config.seed)
            sampler.set_epoch(epoch)
        else:  # the data order of each epoch depends on (seed, epoch) alone, so a resumed run repeats it
            generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
            sampler = RandomSampler(self.splits.train, generator=generator)
        steps = math.ceil(len(sampler) / config.batch_size)
        if skip:
            order = list(sampler)[skip * config.batch_size :]
            return DataLoader(Subset(self.splits.train, order), batch_size=config.batch_size), steps
        return DataLoader(self.splits.train, batch_size=config.batch_size, sampler=sampler), steps

    def _train_epoch(self, epoch: int, interruption: Interruption) -> torch.Tensor:
        """One pass over the training split; returns the mean (loss, ce, cost) over its samples."""
        model, criterion, optimizer = self.model, self._criterion(epoch), self.optimizer
        model.train()
        kind = phase_at(self.phases, epoch).kind
        frozen = {"joint": (), "backbone": (model.exits,), "exits": (*model.stages, model.classifier),
                  "heads": tuple(model.stages)}[kind]
        model.requires_grad_(True)
        for part in frozen:  # no gradients (none for weight decay to act on); batch norm keeps its statistics
            part.requires_grad_(False)
            if kind != "backbone":  # (the exits' statistics are trained again after the backbone's phase)
                part.eval()
        sums = torch.zeros(3, dtype=torch.float64)  # loss, ce, cost (sample-weighted)
        samples, skip = 0, 0
        if self.position is not None and self.position["epoch"] == epoch:  # go on where the run stopped
            p = self.position
            sums, samples, skip = torch.tensor(p["sums"], dtype=torch.float64), p["samples"], p["step"]
        self.position = None
        loader, steps = self._loader(epoch, skip)
        data = iter(loader)  # draws the loader's base seed from the global RNG, as the stopped run's did
        if skip and self.resume_rng is not None:
            torch.set_rng_state(self.resume_rng)  # the RNG as it was when the run stopped here
        batches = _progress(data, self.bars, desc=f"epoch {epoch + 1}/{self.config.epochs}", leave=False,
                            initial=skip, total=steps)
        for step, (x, y) in enumerate(batches, start=skip):
            x, y = x.to(self.device), y.to(self.device)
            output = self.train_model(x)
            loss, ce, cost = criterion.terms(output, y, model.costs)
            values = torch.stack([loss.detach(), ce.detach(), cost.detach()]).double().cpu()  # one read per step
            if not math.isfinite(values[0].item()):
                raise FloatingPointError(
                    f"the training loss is not finite at epoch {epoch + 1}, step {step + 1}; nothing of this "
                    f"step was applied, and " + (f"the last good checkpoint is {self.out / 'last.pt'}"
                                                 if (self.out / "last.pt").is_file() else "no checkpoint was written yet")
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(self.config, epoch, step, steps, self.phases)
            optimizer.step()
            sums += values * x.shape[0]
            samples += x.shape[0]
            signum = self._stop_signal(interruption)
            if signum is not None:
                self._save_interrupted(epoch, step + 1, sums, samples, signum)
        return _reduce_mean(sums / max(samples, 1), self.dist)

    def _criterion(self, epoch: int):
        """The objective of the epoch's phase: a backbone's phase trains the backbone and its
        classifier on the final exit's cross-entropy, as the plain network trains."""
        if phase_at(self.phases, epoch).kind == "backbone":
            return FinalExitLoss()
        return self.criterion

    def _stop_signal(self, interruption: Interruption) -> int | None:
        """The signal to stop on, checked after every step and epoch. Under torch.distributed the
        ranks agree on it (an all-reduce of the flag), so every rank stops after the same step."""
        signum = interruption.signum or 0
        if self.dist.world_size > 1:
            flag = torch.tensor([signum], device=self.device if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        return signum or None

    def _state(self, epoch: int) -> dict:
        return {**self.payload, "model_state": self.model.state_dict(), "threshold": self.model.threshold,
                "policy": self.model.policy, "exit_temperature": self.model.exit_temperature.tolist(),
                "epoch": epoch, "history": self.history, "best_loss": self.best_loss,
                "stale_epochs": self.stale_epochs}

    def _resumable(self, epoch: int) -> dict:
        return {**self._state(epoch), "optimizer_state": self.optimizer.state_dict(),
                "rng_state": torch.get_rng_state(), "world_size": self.dist.world_size}

    def _end_epoch(self, epoch: int, means: torch.Tensor) -> None:
        """Validation, early-stopping state, history and checkpoints of a finished epoch."""
        model, splits = self.model, self.splits
        val_loss = validation_loss(model, self._criterion(epoch), splits.val, self.device, self.config.batch_size)
        if self.fixed_threshold is None and model.exits:  # the thresholds this epoch's weights call for
            calibrate(model, splits.val, self.device, budget=self.config.budget, max_drop=self.config.max_drop)
        val = evaluate(model, splits.val, self.device)
        if epoch > 0 and any(phase.start == epoch for phase in self.phases):  # a phase: its own objective from here on
            self.best_loss, self.stale_epochs = math.inf, 0
        improved = val_loss < self.best_loss - self.config.min_delta
        self.best_loss, self.stale_epochs = (val_loss, 0) if improved else (self.best_loss, self.stale_epochs + 1)
        row = {
            "epoch": epoch + 1, "train_loss": means[0].item(), "train_ce": means[1].item(),
            "train_cost": means[2].item(), "val_loss": val_loss, "val_accuracy": val.accuracy,
            "val_relative_cost": val.relative_cost, "exit_counts": val.exit_counts,
        }
        self.history.append(row)
        if self.dist.is_main:
            if improved:
                save_checkpoint(self.out / "best.pt", self._state(epoch))
            save_checkpoint(self.out / "last.pt", self._resumable(epoch))
            _write_history(self.out, self.history)
        if self.show:
            print(f"epoch {epoch + 1:3d}  loss {row['train_loss']:.4f} (ce {row['train_ce']:.4f}, cost "
                  f"{row['train_cost']:.4f})  val loss {val_loss:.4f}  val acc {val.accuracy:.2f}%  "
                  f"rel cost {val.relative_cost:.3f}  exits {val.exit_counts}" + ("  *" if improved else ""))

    def _save_interrupted(self, epoch: int, step: int, sums: torch.Tensor, samples: int, signum: int) -> None:
        """Writes a mid-epoch last.pt that --resume continues exactly, then exits with 128 + signum.
        Under torch.distributed every rank stopped after the same step (``_stop_signal``); rank 0
        writes each rank's loss sums and RNG state, and the others wait until it has."""
        mine = {"sums": sums.tolist(), "samples": samples, "rng_state": torch.get_rng_state()}
        ranks = [mine]
        if self.dist.world_size > 1:
            ranks = [None] * self.dist.world_size
            dist.all_gather_object(ranks, mine)
        if self.dist.is_main:
            position = {"epoch": epoch, "step": step, "ranks": ranks}
            save_checkpoint(self.out / "last.pt", {**self._resumable(epoch - 1), "position": position})
            print(f"{signal.Signals(signum).name}: stopped in epoch {epoch + 1} after step {step}; resume with "
                  f"--resume (checkpoint {self.out / 'last.pt'})", file=sys.stderr)
        if self.dist.world_size > 1:
            dist.barrier()  # a rank that exits first could have the launcher kill rank 0 mid-write
        raise TrainingInterrupted(128 + signum)

    def finish(self) -> dict:
        """The test report of the best checkpoint, written to summary.json, with plots."""
        model, config, dist_info, out = self.model, self.config, self.dist, self.out
        if dist_info.world_size > 1:
            dist.barrier()  # rank 0 has written its last checkpoint
        best = out / "best.pt"
        if best.exists() and math.isfinite(self.best_loss):  # this run's (a best.pt of no improved epoch is not)
            payload = load_checkpoint(best, map_location=self.device)
            apply_checkpoint(model, payload)
            if self.fixed_threshold is None and model.exits:
                # the rule as this run calibrates it (the epoch's calibration, done again, on every
                # rank alike: a resumed run of an older version reports by today's rule)
                calibrate(model, self.splits.val, self.device, budget=config.budget, max_drop=config.max_drop)
                if dist_info.is_main:
                    save_checkpoint(best, {**payload, "threshold": model.threshold, "policy": model.policy,
                                           "exit_temperature": model.exit_temperature.tolist()})
        test: EvalResult = evaluate(model, self.splits.test, self.device)
        digests = [weights_digest(model)]
        if dist_info.world_size > 1:
            digests = [None] * dist_info.world_size
            dist.all_gather_object(digests, weights_digest(model))
        summary = {
            "model": config.model, "dataset": config.dataset, "recipe": config.recipe, "loss": config.loss,
            "lam": config.lam, "policy": model.policy, "thresholds": model.threshold,
            "epochs_run": len(self.history), "exit_positions": model.exit_positions, "costs": model.costs.tolist(),
            "flops": model.flops, "test": test.to_dict(), "weights_sha256": digests[0],
            "ranks_identical": len(set(digests)) == 1, "world_size": dist_info.world_size,
        }
        if dist_info.is_main:
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
            if config.plots and self.history:
                from eefast import plots

                plots.plot_history(self.history, out / "history.png")
                plots.plot_exit_histogram(test.exit_counts, model.costs.tolist(), out / "exits.png")
                plots.plot_exit_grid(model, self.splits.test, self.device, out / "exit_grid.png")
        if self.show:
            print(f"test ({test.samples} samples): {test.summary()}")
            print(f"wrote {out}/")
        return summary
