"""``eefast predict``: a trained EENet over a dataset split through the stream runner, one CSV row per
sample (index, prediction, exit, cost, confidence, label) and a summary (throughput, exit histogram,
relative cost, accuracy where labels exist). Under torchrun each rank streams every world_size-th
sample and rank 0 writes the merged file."""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset

from eefast.eenet import EENet
from eefast.stream import EENetStream
from eefast.train import check_output_dir

COLUMNS = ("index", "prediction", "exit", "cost", "confidence", "label")


def predict_dataset(model: EENet, dataset: Dataset, *, batch_size: int = 64, request_size: int = 1,
                    progress: bool = False) -> tuple[list[dict], dict]:
    """Streams ``dataset`` through ``model`` in requests of ``request_size`` samples: (rows, summary).
    ``confidence`` is the top softmax probability of the logits a sample left with."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    indices = list(range(rank, len(dataset), world))
    loader = DataLoader(Subset(dataset, indices), batch_size=request_size)
    labels: list[int] = []

    def requests():
        for x, y in loader:
            labels.extend(int(v) for v in y)
            yield x

    stream = EENetStream(model, batch_size=batch_size, max_delay=None)
    rows: list[dict] = []
    start = time.perf_counter()
    results = stream.map(requests())
    if progress:
        from tqdm.auto import tqdm

        results = tqdm(results, total=len(loader), desc="predict", unit="request")
    for prediction in results:
        probability = prediction.logits.float().softmax(dim=1).amax(dim=1)
        for p, e, c, q in zip(prediction.logits.argmax(dim=1).tolist(), prediction.exit.tolist(),
                              prediction.cost.tolist(), probability.tolist()):
            rows.append({"prediction": p, "exit": e, "cost": c, "confidence": q})
    seconds = time.perf_counter() - start
    for row, index, label in zip(rows, indices, labels):
        row["index"], row["label"] = index, label
    if world > 1:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(rows, gathered, dst=0)
        times = [None] * world if rank == 0 else None
        dist.gather_object(seconds, times, dst=0)
        if rank == 0:
            rows = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
            seconds = max(times)
    return rows, summarize(rows, model.num_exits, seconds)


def summarize(rows: list[dict], num_exits: int, seconds: float) -> dict:
    counts = [0] * num_exits
    for row in rows:
        counts[row["exit"]] += 1
    samples = len(rows)
    labelled = [r for r in rows if r["label"] >= 0]
    return {
        "samples": samples,
        "seconds": seconds,
        "samples_per_second": samples / seconds if seconds > 0 else math.inf,
        "exit_counts": counts,
        "relative_cost": sum(r["cost"] for r in rows) / samples if samples else 0.0,
        "accuracy": 100.0 * sum(r["prediction"] == r["label"] for r in labelled) / len(labelled) if labelled else None,
    }


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "cost": f"{row['cost']:.6f}", "confidence": f"{row['confidence']:.6f}"})


def check_output_file(path: Path) -> None:
    """Raises ValueError unless ``path`` can be written as a file (its folder exists or can be made)."""
    if path.is_dir():
        raise ValueError(f"--out {path}: expected a file path, found a directory")
    check_output_dir(path.parent)
