"""Exits on a pretrained network: torchvision's MobileNetV3-small on the MNIST sample, 3 seeds.

    python benchmarks/backbone_table.py          # writes benchmarks/results/mnist_sample_backbone.{md,json}
    python benchmarks/backbone_table.py report   # the tables again from the JSON

Per seed: the network is "pretrained" here (no downloads): ``PRETRAIN_EPOCHS`` epochs of AdamW on
the training split (its grey channel shown as RGB), batch-norm statistics then measured over the
split, saved as a state dict; its test accuracy is the baseline (cost 1). Then, from that file,
``eefast train --backbone torchvision:mobilenet_v3_small --weights FILE`` with 3 pool exits:
``--freeze-backbone`` (the stages bit-identical, checked) and ``--schedule exits-then-joint``
(the first epoch frozen, then every part). Each EENet is reported as ``eefast train`` reports it
(the default recipe's max_prob rule, calibrated on validation), and under each exit policy at
fixed budgets (temperatures and thresholds fitted on validation, accuracy and cost on test).
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

import eefast
from eefast.checkpoint import load_checkpoint, model_from_checkpoint
from eefast.data import load_dataset
from eefast.evaluate import budget_table, collect_exits
from eefast.policies import EXIT_POLICIES
from eefast.train import TrainConfig, train

SEEDS = (0, 1, 2)
BUDGETS = (0.25, 0.5, 0.75, 1.0)
PRETRAIN_EPOCHS = 2
EPOCHS = 3
NETWORK = "mobilenet_v3_small"
RESULTS = Path(__file__).parent / "results"
RUNS = {"frozen backbone": dict(schedule="frozen-backbone"),
        "exits then joint": dict(schedule="exits-then-joint", exit_epochs=1)}


def pretrain(seed: int, path: Path) -> float:
    """Trains the network on the training split, saves its state dict; its test accuracy (%)."""
    splits = load_dataset("mnist-sample", "data", seed=seed, val_fraction=0.1, augment=False)
    torch.manual_seed(seed)
    network = torchvision.models.get_model(NETWORK, num_classes=10)
    optimizer = torch.optim.AdamW(network.parameters(), 2e-3, weight_decay=0.05)
    order = torch.Generator().manual_seed(seed)
    network.train()
    for _ in range(PRETRAIN_EPOCHS):
        for x, y in DataLoader(splits.train, batch_size=64, sampler=RandomSampler(splits.train, generator=order)):
            loss = nn.functional.cross_entropy(network(x.expand(-1, 3, -1, -1)), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for module in network.modules():  # (torchvision's momentum of 0.01 lags a short run's weights)
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # the statistics of the whole training split
    with torch.no_grad():
        for x, _ in DataLoader(splits.train, batch_size=256):
            network(x.expand(-1, 3, -1, -1))
    network.eval()
    torch.save(network.state_dict(), path)
    correct = 0
    with torch.no_grad():
        for x, y in DataLoader(splits.test, batch_size=256):
            correct += (network(x.expand(-1, 3, -1, -1)).argmax(1) == y).sum().item()
    return 100.0 * correct / len(splits.test)


def stages_of(model: eefast.EENet) -> dict:
    return {k: v for k, v in model.state_dict().items() if k.startswith("stages.")}


def run(seed: int, root: Path) -> dict:
    weights = root / f"{NETWORK}_seed{seed}.pth"
    result = {"seed": seed, "baseline_accuracy": pretrain(seed, weights)}
    start = stages_of(eefast.create_model(f"torchvision:{NETWORK}", weights=str(weights), num_classes=10,
                                          input_shape=(1, 28, 28)))
    for label, options in RUNS.items():
        out = root / f"{label.replace(' ', '_')}_seed{seed}"
        summary = train(TrainConfig(model=f"torchvision:{NETWORK}", weights=str(weights), epochs=EPOCHS, seed=seed,
                                    quiet=True, plots=False, out=str(out), **options))
        model = model_from_checkpoint(load_checkpoint(out / "best.pt"))
        frozen = stages_of(model)
        splits = load_dataset("mnist-sample", "data", seed=seed, val_fraction=0.1, augment=False)
        val, test = collect_exits(model, splits.val), collect_exits(model, splits.test)
        result[label] = {
            "accuracy": summary["test"]["accuracy"], "relative_cost": summary["test"]["relative_cost"],
            "exit_counts": summary["test"]["exit_counts"], "costs": summary["costs"],
            "final_exit_accuracy": 100.0 * (test.logits[-1].argmax(-1) == test.target).double().mean().item(),
            "stages_unchanged": all(torch.equal(frozen[k], start[k]) for k in start),
            "budgets": budget_table(val, test, model.costs, list(BUDGETS)),
        }
    return result


def mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def report(results: list[dict]) -> str:
    lines = [f"# Exits on a pretrained network: torchvision {NETWORK} on the MNIST sample",
             "",
             f"`python benchmarks/backbone_table.py` ({platform.processor() or platform.machine()}, torch "
             f"{torch.__version__}, eefast {eefast.__version__}; seeds {list(SEEDS)}; the 1,000 test images).",
             f"The network: {PRETRAIN_EPOCHS} epochs of AdamW on the training split, saved as a state dict. The "
             f"EENets: {EPOCHS} epochs from that file, 3 pool exits (`eefast train --backbone torchvision:{NETWORK} "
             "--weights FILE`), the default recipe. Mean ± standard deviation over seeds.",
             "The first row is the starting network, not a baseline of equal training: the EENets train their "
             "exits and classifier (exits-then-joint: then every part) for more epochs. The fair comparison for "
             "each EENet is its own final exit alone (fourth column): the same stages and head, at cost 1.",
             "",
             "| model | accuracy % | relative cost | its final exit alone, % | stages bit-identical |",
             "|---|---|---|---|---|",
             f"| {NETWORK} as pretrained | {mean_sd([r['baseline_accuracy'] for r in results])} | 1.000 | - | - |"]
    for label in RUNS:
        rows = [r[label] for r in results]
        lines.append(f"| EENet, {label} (max_prob, calibrated) | {mean_sd([r['accuracy'] for r in rows])} | "
                     f"{mean_sd([r['relative_cost'] for r in rows])} | "
                     f"{mean_sd([r['final_exit_accuracy'] for r in rows])} | "
                     f"{'yes' if all(r['stages_unchanged'] for r in rows) else 'no'} |")
    for label in RUNS:
        lines += ["", f"Each exit policy at fixed budgets, EENet {label} (fitted on validation, reported on test):", "",
                  "| policy | " + " | ".join(f"budget {b:g}" for b in BUDGETS) + " |",
                  "|---|" + "---|" * len(BUDGETS)]
        for policy in EXIT_POLICIES:
            cells = []
            for budget in BUDGETS:
                picked = [next(row for row in r[label]["budgets"] if row["policy"] == policy and row["budget"] == budget)
                          for r in results]
                cells.append(f"{mean_sd([p['accuracy'] for p in picked])} % at "
                             f"{statistics.mean(p['relative_cost'] for p in picked):.3f}")
            lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    if sys.argv[1:] == ["report"]:  # the tables again from the saved JSON
        saved = json.loads((RESULTS / "mnist_sample_backbone.json").read_text())
        (RESULTS / "mnist_sample_backbone.md").write_text(report(saved["results"]))
        return 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="eefast-backbone-") as root:
        results = [run(seed, Path(root)) for seed in SEEDS]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mnist_sample_backbone.json").write_text(json.dumps(
        {"network": NETWORK, "seeds": list(SEEDS), "pretrain_epochs": PRETRAIN_EPOCHS, "epochs": EPOCHS,
         "seconds": time.perf_counter() - started, "results": results}, indent=2))
    text = report(results)
    (RESULTS / "mnist_sample_backbone.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
