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
import hashlib
import json
import math
import os
import signal
import sys
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from eefast.checkpoint import load_checkpoint, save_checkpoint
from eefast.data import load_dataset
from eefast.eenet import EENet, EENetLoss
from eefast.evaluate import EvalResult, evaluate
from eefast.models import create_model


@dataclass
class TrainConfig:
    model: str = "eenet8"
    dataset: str = "mnist-sample"
    data_root: str = "data"
    download: bool = False
    exits: int | None = None  # None: the model's default
    distribution: str | None = None
    exit_type: str | None = None
    filters: int | None = None  # eenet8 / resnet8 only
    loss: str = "v2"
    lam: float = 1.0
    optimizer: str = "adam"
    lr: float = 1e-3
    batch_size: int = 32
    epochs: int = 20
    patience: int = 20
    min_delta: float = 0.001
    threshold: float = 0.5
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"
    out: str = "runs/eefast"
    resume: bool = False
    quiet: bool = False
    plots: bool = True
    extra: dict = field(default_factory=dict)  # more create_model arguments


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    if device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is visible here; use --device cpu")
    return torch.device(device)


def setup_distributed(device: str) -> Distributed:
    """Joins the torchrun process group when WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = resolve_device(device, local_rank).type == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank)


def model_kwargs(config: TrainConfig, num_classes: int, input_shape) -> dict:
    """create_model arguments of the run (stored in checkpoints so the model can be rebuilt)."""
    kwargs = {"num_classes": num_classes, "input_shape": list(input_shape), **config.extra}
    for key, value in (("num_exits", config.exits), ("distribution", config.distribution),
                       ("exit_type", config.exit_type), ("filters", config.filters)):
        if value is not None:
            kwargs[key] = value
    return kwargs


def build_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    raise ValueError(f"unknown optimizer {name!r}; expected 'adam' or 'sgd'")


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
    dist_info = setup_distributed(config.device)
    device = resolve_device(config.device, dist_info.local_rank)
    out = Path(config.out)
    show = dist_info.is_main and not config.quiet
    bars = show and sys.stderr.isatty()

    splits = load_dataset(config.dataset, config.data_root, config.download, config.seed, config.val_fraction)
    kwargs = model_kwargs(config, splits.num_classes, splits.input_shape)
    torch.manual_seed(config.seed)
    model = create_model(config.model, **{**kwargs, "input_shape": tuple(kwargs["input_shape"])}).to(device)
    model.threshold = config.threshold
    criterion = EENetLoss(lam=config.lam, version=config.loss)
    optimizer = build_optimizer(config.optimizer, model.parameters(), config.lr)

    start_epoch, history = 0, []
    best_loss, stale_epochs = math.inf, 0
    position = None  # where an interrupted epoch stopped: {"epoch", "step", "sums", "samples"}
    if config.resume:
        checkpoint = load_checkpoint(out / "last.pt", map_location=device)
        model.load_state_dict(checkpoint["model_state"])
        optimizer.load_state_dict(checkpoint["optimizer_state"])
        start_epoch = checkpoint["epoch"] + 1
        history = list(checkpoint["history"])
        best_loss, stale_epochs = checkpoint["best_loss"], checkpoint["stale_epochs"]
        position = checkpoint.get("position")
        if position is None:
            torch.set_rng_state(checkpoint["rng_state"])
        resume_rng = checkpoint["rng_state"]
        if show:
            where = f"epoch {position['epoch'] + 1}, step {position['step']}" if position else f"epoch {start_epoch}"
            print(f"resuming {out / 'last.pt'} after {where}")

    train_model = model
    if dist_info.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist_info.local_rank] if device.type == "cuda" else None
        )

    if show:
        costs = ", ".join(f"{c:.3f}" for c in model.costs.tolist())
        print(f"{config.model} on {config.dataset} ({len(splits.train)} train / {len(splits.val)} val / "
              f"{len(splits.test)} test), exits after blocks {model.exit_positions}, costs [{costs}], "
              f"loss {config.loss} lam {config.lam}, device {device}"
              + (f", {dist_info.world_size} processes" if dist_info.world_size > 1 else ""))

    payload = {"model_name": config.model, "model_kwargs": kwargs, "config": asdict(config)}
    with Interruption() as interruption:
        history = _epochs(config, splits, model, train_model, criterion, optimizer, device, dist_info, out, show, bars,
                          payload, history, start_epoch, best_loss, stale_epochs, position,
                          resume_rng if config.resume else None, interruption)

    summary = finish(model, splits, out, device, dist_info, show, config, history)
    if dist_info.world_size > 1:
        dist.barrier()
    return summary


def _epochs(config, splits, model, train_model, criterion, optimizer, device, dist_info, out, show, bars, payload,
            history, start_epoch, best_loss, stale_epochs, position, resume_rng, interruption) -> list[dict]:
    """The epoch loop; returns the history. Writes best.pt / last.pt / history each epoch."""
    for epoch in range(start_epoch, config.epochs):
        if stale_epochs >= config.patience:
            break
        model.train()
        if dist_info.world_size > 1:
            sampler = DistributedSampler(splits.train, dist_info.world_size, dist_info.rank, seed=config.seed)
            sampler.set_epoch(epoch)
        else:  # the data order of each epoch depends on (seed, epoch) alone, so a resumed run repeats it
            sampler = RandomSampler(splits.train, generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
        loader = DataLoader(splits.train, batch_size=config.batch_size, sampler=sampler)
        sums = torch.zeros(3, dtype=torch.float64)  # loss, ce, cost (sample-weighted)
        samples, skip = 0, 0
        if position is not None and position["epoch"] == epoch:  # an interrupted epoch: go on where it stopped
            sums, samples, skip = torch.tensor(position["sums"], dtype=torch.float64), position["samples"], position["step"]
        position = None
        for step, (x, y) in enumerate(_progress(loader, bars, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False)):
            if step < skip:
                continue
            if step == skip and skip and resume_rng is not None:
                torch.set_rng_state(resume_rng)  # the RNG as it was when the run stopped here
            x, y = x.to(device), y.to(device)
            output = train_model(x)
            loss = criterion(output, y, model.costs)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(
                    f"the training loss is not finite at epoch {epoch + 1}, step {step + 1}; nothing of this "
                    f"step was applied, and the last good checkpoint is {out / 'last.pt'}"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                ce, cost = criterion.parts(output, y, model.costs)
            sums += torch.tensor([loss.item(), ce.item(), cost.item()], dtype=torch.float64) * x.shape[0]
            samples += x.shape[0]
            if interruption.signum is not None:
                _save_interrupted(out, payload, model, optimizer, history, best_loss, stale_epochs, epoch, step + 1,
                                  sums, samples, dist_info, show, interruption.signum)
        means = _reduce_mean(sums / max(samples, 1), dist_info)
        val_loss = validation_loss(model, criterion, splits.val, device, config.batch_size)
        val = evaluate(model, splits.val, device)
        improved = val_loss < best_loss - config.min_delta
        best_loss, stale_epochs = (val_loss, 0) if improved else (best_loss, stale_epochs + 1)
        row = {
            "epoch": epoch + 1, "train_loss": means[0].item(), "train_ce": means[1].item(),
            "train_cost": means[2].item(), "val_loss": val_loss, "val_accuracy": val.accuracy,
            "val_relative_cost": val.relative_cost, "exit_counts": val.exit_counts,
        }
        history.append(row)
        if dist_info.is_main:
            state = {
                **payload, "model_state": model.state_dict(), "threshold": model.threshold, "epoch": epoch,
                "history": history, "best_loss": best_loss, "stale_epochs": stale_epochs,
            }
            if improved:
                save_checkpoint(out / "best.pt", state)
            save_checkpoint(out / "last.pt", {**state, "optimizer_state": optimizer.state_dict(),
                                              "rng_state": torch.get_rng_state()})
            _write_history(out, history)
        if show:
            print(f"epoch {epoch + 1:3d}  loss {row['train_loss']:.4f} (ce {row['train_ce']:.4f}, cost "
                  f"{row['train_cost']:.4f})  val loss {val_loss:.4f}  val acc {val.accuracy:.2f}%  "
                  f"rel cost {val.relative_cost:.3f}  exits {val.exit_counts}" + ("  *" if improved else ""))
        if interruption.signum is not None:  # a signal during validation: the epoch is saved, stop here
            raise TrainingInterrupted(128 + interruption.signum)
    return history


def _save_interrupted(out, payload, model, optimizer, history, best_loss, stale_epochs, epoch, step, sums, samples,
                      dist_info, show, signum) -> None:
    """Writes a mid-epoch last.pt that --resume continues exactly, then exits with 128 + signum.
    Under torch.distributed the ranks may stand at different steps: nothing is written, and a
    resumed run restarts from the last finished epoch."""
    if dist_info.world_size == 1:
        save_checkpoint(out / "last.pt", {
            **payload, "model_state": model.state_dict(), "threshold": model.threshold, "epoch": epoch - 1,
            "history": history, "best_loss": best_loss, "stale_epochs": stale_epochs,
            "optimizer_state": optimizer.state_dict(), "rng_state": torch.get_rng_state(),
            "position": {"epoch": epoch, "step": step, "sums": sums.tolist(), "samples": samples},
        })
    if dist_info.is_main:
        name = signal.Signals(signum).name
        print(f"{name}: stopped in epoch {epoch + 1} after step {step}; "
              + (f"resume with --resume (checkpoint {out / 'last.pt'})" if dist_info.world_size == 1 else
                 "--resume restarts from the last finished epoch"), file=sys.stderr)
    raise TrainingInterrupted(128 + signum)


def finish(model: EENet, splits, out: Path, device, dist_info: Distributed, show: bool, config: TrainConfig,
           history: list[dict]) -> dict:
    """The test report of the best checkpoint, written to summary.json, with plots."""
    if dist_info.world_size > 1:
        dist.barrier()  # rank 0 has written its last checkpoint
    best = out / "best.pt"
    if best.exists():
        model.load_state_dict(load_checkpoint(best, map_location=device)["model_state"])
    test: EvalResult = evaluate(model, splits.test, device)
    digests = [weights_digest(model)]
    if dist_info.world_size > 1:
        digests = [None] * dist_info.world_size
        dist.all_gather_object(digests, weights_digest(model))
    summary = {
        "model": config.model, "dataset": config.dataset, "loss": config.loss, "lam": config.lam,
        "epochs_run": len(history), "exit_positions": model.exit_positions, "costs": model.costs.tolist(),
        "flops": model.flops, "test": test.to_dict(), "weights_sha256": digests[0],
        "ranks_identical": len(set(digests)) == 1, "world_size": dist_info.world_size,
    }
    if dist_info.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        if config.plots and history:
            from eefast import plots

            plots.plot_history(history, out / "history.png")
            plots.plot_exit_histogram(test.exit_counts, model.costs.tolist(), out / "exits.png")
            plots.plot_exit_grid(model, splits.test, device, out / "exit_grid.png")
    if show:
        print(f"test ({test.samples} samples): {test.summary()}")
        print(f"wrote {out}/")
    return summary
