"""Plots of a run (matplotlib, PNG): training history, exit histogram, trade-off curves and the
test images grouped by the exit that took them (Figs. 4.10-4.12)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset, Subset  # noqa: E402


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_history(history: list[dict], path: Path) -> None:
    """Training loss, validation accuracy and relative cost per epoch."""
    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    axes[0].plot(epochs, [r["train_loss"] for r in history], label="train")
    axes[0].plot(epochs, [r["val_loss"] for r in history], label="validation")
    axes[0].set(title="loss", xlabel="epoch")
    axes[0].legend()
    axes[1].plot(epochs, [r["val_accuracy"] for r in history], color="tab:green")
    axes[1].set(title="validation accuracy (%)", xlabel="epoch")
    axes[2].plot(epochs, [r["val_relative_cost"] for r in history], color="tab:red")
    axes[2].set(title="validation relative cost", xlabel="epoch", ylim=(0, None))
    _save(fig, path)


def plot_exit_histogram(counts: list[int], costs: list[float], path: Path) -> None:
    """How many samples left at each exit, labelled with the exit's cost."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    labels = [f"exit {n}\n(cost {c:.2f})" for n, c in enumerate(costs)]
    ax.bar(labels, counts, color="tab:blue")
    for i, count in enumerate(counts):
        ax.annotate(str(count), (i, count), ha="center", va="bottom")
    ax.set(title="samples leaving at each exit", ylabel="samples")
    _save(fig, path)


def plot_tradeoff(points: list[dict], path: Path, label: str, baseline: dict | None = None) -> None:
    """Accuracy against relative cost (one point per λ or threshold), the plain baseline marked."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot([p["relative_cost"] for p in points], [p["accuracy"] for p in points], "o-", label="EENet")
    for p in points:
        ax.annotate(f"{p[label]:g}", (p["relative_cost"], p["accuracy"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    if baseline is not None:
        ax.scatter([baseline["relative_cost"]], [baseline["accuracy"]], marker="*", s=150, color="tab:red",
                   label=baseline.get("model", "plain baseline"), zorder=3)
    ax.set(xlabel="relative cost", ylabel="accuracy (%)", title=f"accuracy vs cost ({label} sweep)")
    ax.legend()
    _save(fig, path)


@torch.no_grad()
def samples_by_exit(model, dataset: Dataset, device, per_exit: int = 12) -> dict[int, list[tuple[torch.Tensor, int]]]:
    """Up to ``per_exit`` (image, label) pairs that each exit took, drawn in a seeded random order
    (datasets are often sorted by class)."""
    model.eval()
    taken: dict[int, list] = {n: [] for n in range(model.num_exits)}
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    for x, y in DataLoader(Subset(dataset, order), batch_size=256):
        exits = model.predict(x.to(device)).exit.cpu()
        for image, label, n in zip(x, y.tolist(), exits.tolist()):
            if len(taken[n]) < per_exit:
                taken[n].append((image, label))
        if all(len(v) == per_exit for v in taken.values()):
            break
    return taken


def plot_exit_grid(model, dataset: Dataset, device, path: Path, per_exit: int = 12) -> None:
    """A row of test images for each exit, the samples that exit took (Figs. 4.10-4.12)."""
    taken = samples_by_exit(model, dataset, device, per_exit)
    fig, axes = plt.subplots(model.num_exits, per_exit, figsize=(per_exit * 0.9, model.num_exits * 1.0),
                             squeeze=False)
    for n, row in enumerate(axes):
        for i, ax in enumerate(row):
            ax.axis("off")
            if i < len(taken[n]):
                image = taken[n][i][0]
                image = (image - image.min()) / (image.max() - image.min() + 1e-8)
                ax.imshow(image.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if image.shape[0] == 1 else None)
        row[0].set_title(f"exit {n}", fontsize=8, loc="left")
    _save(fig, path)


def plot_pareto(curves: dict[str, list[tuple[float, float]]], points: dict[str, tuple[float, float]], path: Path,
                title: str = "accuracy vs cost") -> None:
    """Accuracy against relative cost: a line per exit policy (its budget sweep, ``(cost, accuracy)``
    points) and a marker per fixed network (the plain baseline, smaller static networks)."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for (name, curve), style in zip(curves.items(), ("o-", "s-", "^-", "v-", "x-")):
        ax.plot(*zip(*sorted(curve)), style, markersize=3, label=name)
    for (name, (cost, accuracy)), marker in zip(points.items(), ("*", "D", "P", "X", "h", "p")):
        ax.scatter([cost], [accuracy], marker=marker, s=90, zorder=3, label=name)
    ax.set(xlabel="relative cost (FLOPs / plain backbone)", ylabel="test accuracy (%)", title=title)
    ax.legend(fontsize=8)
    _save(fig, path)
