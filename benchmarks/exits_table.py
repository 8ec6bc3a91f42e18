"""Exits that learn: the training recipes and exit policies measured on the MNIST sample.

    python benchmarks/exits_table.py train     # the runs; start it twice to use two cores
    python benchmarks/exits_table.py report    # tables, JSON and the Pareto plots

Trains, for EENet-8 (4 filters) and EENet-20 (1x28x28), over seeds 0-2: the plain ResNet
baseline, the EENet with eefast's default recipe and with the thesis's (``--recipe thesis``),
``--loss mc`` / ``--loss cost``, the recipe's ablations, and smaller static ResNet-20s (width
0.5 / 0.7 / 0.875: about 25 / 50 / 75 % of its FLOPs). Every run is ``eefast.train.train`` with
the command line's defaults (AdamW, cosine schedule, random shifts) unless its row says
otherwise. The report reads each run's ``summary.json`` (the test report of ``eefast train``:
batched ``compact`` inference with the calibrated exit rule) and, for the EENets of the default
recipe, every exit's outputs on the validation and test splits (``eefast.evaluate.collect_exits``)
to put each policy at fixed budgets: temperatures and thresholds fitted on validation, accuracy
and cost reported on test. Writes ``benchmarks/results/mnist_sample_exits.{md,json}`` and ``mnist_sample_exits_eenet{8,20}.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import eefast
from eefast.checkpoint import load_checkpoint, model_from_checkpoint
from eefast.data import load_dataset
from eefast.evaluate import budget_table, collect_exits, fit_temperatures, thresholds_for_final_accuracy
from eefast.policies import EXIT_POLICIES
from eefast.train import RECIPES, TrainConfig, train, training_phases

SEEDS = (0, 1, 2)
BUDGETS = (0.25, 0.5, 0.75, 1.0)
EPOCHS = {"8": 30, "20": 20}  # what the 2-core CPU allows in a session for 3 seeds
FILTERS = 4  # EENet-8's starting filters (the thesis's 2-8)

# label -> (family, train options); "seeds": 1 marks the rows run once (slow, secondary)
RUNS = {  # in order of importance: a job cut short has the first rows; "seeds": 1 marks rows run once
    "ResNet-20": ("20", dict(model="resnet20")),
    "EENet-20, eefast recipe": ("20", dict(model="eenet20")),
    "ResNet-8": ("8", dict(model="resnet8")),
    "EENet-8, eefast recipe": ("8", dict(model="eenet8")),
    "EENet-8, thesis recipe (L_v2, T=0.5)": ("8", dict(model="eenet8", recipe="thesis", seeds=1)),
    "EENet-8, thesis recipe, L_MC, 10 epochs": ("8", dict(model="eenet8", recipe="thesis", loss="mc", epochs=10,
                                                          seeds=1)),
    "EENet-8, thesis recipe, L_Cost, 10 epochs": ("8", dict(model="eenet8", recipe="thesis", loss="cost", epochs=10,
                                                            seeds=1)),
    "EENet-20, thesis recipe (L_v2, T=0.5)": ("20", dict(model="eenet20", recipe="thesis", seeds=1)),
    "ResNet-20 width 0.7": ("20", dict(model="resnet20", extra={"width": 0.7}, seeds=1)),
    # the ablation: each row changes one thing of the recipe
    "EENet-8, eefast recipe + distillation": ("8", dict(model="eenet8", distill=1.0, seeds=1)),
    "EENet-20, eefast recipe + distillation": ("20", dict(model="eenet20", distill=1.0, seeds=1)),
    "EENet-20, eefast recipe + distillation, backbone first (frozen)": ("20", dict(
        model="eenet20", distill=1.0, schedule="backbone-first", seeds=1)),
    "EENet-20, eefast recipe + distillation, backbone then joint": ("20", dict(
        model="eenet20", distill=1.0, schedule="backbone-then-joint", seeds=1)),
    "EENet-8, eefast recipe + distillation, backbone first (frozen)": ("8", dict(
        model="eenet8", distill=1.0, schedule="backbone-first", seeds=1)),
    "EENet-8, thesis loss, calibrated": ("8", dict(model="eenet8", exit_weight=0.0, confidence_only=False, seeds=1)),
    "ResNet-20 width 0.5": ("20", dict(model="resnet20", extra={"width": 0.5}, seeds=1)),
    "ResNet-20 width 0.875": ("20", dict(model="resnet20", extra={"width": 0.875}, seeds=1)),
}
THESIS_ROWS = [  # Tables 4.1 and 4.2 of the thesis (full MNIST, 10,000 test images, EENet-8)
    ("ResNet-8 (thesis, Table 4.1)", "- / - / 10000", 97.38, 1.00),
    ("EENet-8 L_v2, lambda 1 (thesis, Table 4.1)", "47 / 2247 / 7706", 96.55, 0.82),
    ("EENet-8 L_v2, lambda 0.95 (thesis, Table 4.2)", "-", 97.48, 0.74),
    ("EENet-8 L_MC (thesis, Table 4.1)", "0 / 0 / 10000", 97.42, 1.00),
    ("EENet-8 L_Cost (thesis, Table 4.1)", "10000 / 0 / 0", 10.32, 0.08),
]


def run_dir(root: Path, label: str, seed: int) -> Path:
    slug = "".join(c if c.isalnum() else "_" for c in label).strip("_")
    return root / f"{slug}_seed{seed}"


def all_runs() -> list[tuple[str, int]]:
    """Every (label, seed): the rows of three seeds first, seed 0 before 1 and 2, then the rest,
    so that a job cut short has the headline rows."""
    repeated = [label for label, (_, options) in RUNS.items() if options.get("seeds", len(SEEDS)) > 1]
    order = [(label, seed) for seed in SEEDS for label in repeated]
    order += [(label, 0) for label in RUNS if label not in repeated]
    return order


def config_for(label: str, seed: int, root: Path) -> TrainConfig:
    family, options = RUNS[label]
    options = {k: v for k, v in options.items() if k != "seeds"}
    if family == "8":
        options["filters"] = FILTERS
    else:
        options.setdefault("extra", {})["input_shape"] = [1, 28, 28]
    options.setdefault("epochs", EPOCHS[family])
    config = TrainConfig(seed=seed, out=str(run_dir(root, label, seed)), quiet=True, plots=False, exit_epochs=5,
                         **options)
    phases = training_phases(config)
    if len(phases) > 1 and phases[0].kind == "backbone" and options["model"].startswith("eenet"):
        config.epochs += config.exit_epochs  # the backbone trains as long as the plain baseline
    return config


def train_command(args) -> None:
    """Trains the runs not yet done; several of these jobs can share the list (each claims a run
    by creating its directory's lock first). A run stopped by a signal keeps its lock: remove
    ``RUN.lock`` and it goes on from its ``last.pt``."""
    for label, seed in all_runs():
        out = run_dir(args.runs, label, seed)
        out.parent.mkdir(parents=True, exist_ok=True)
        if (out / "summary.json").exists():
            continue
        try:
            (out.parent / f"{out.name}.lock").mkdir()
        except FileExistsError:  # done, or another job has it
            continue
        start = time.time()
        config = config_for(label, seed, args.runs)
        config.resume = (out / "last.pt").exists()  # a job stopped mid-run goes on where it stopped
        summary = train(config)
        print(f"{label} seed {seed}: {summary['test']['accuracy']:.2f}% cost {summary['test']['relative_cost']:.3f} "
              f"exits {summary['test']['exit_counts']} ({time.time() - start:.0f} s)", flush=True)


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f} (1 seed)"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def mean_std3(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def policy_rows(root: Path, label: str, seeds: list[int]) -> dict:
    """Per seed: each policy calibrated as the recipe does (every threshold at the final exit's
    validation accuracy, after temperature scaling), and at each budget, reported on test; from
    every exit's outputs (mask mode)."""
    per_seed = []
    for seed in seeds:
        payload = load_checkpoint(run_dir(root, label, seed) / "best.pt")
        model = model_from_checkpoint(payload)
        config = payload["config"]
        splits = load_dataset(config["dataset"], seed=config["seed"], val_fraction=config["val_fraction"],
                              augment=False)
        val, test = collect_exits(model, splits.val), collect_exits(model, splits.test)
        costs = model.costs
        temperature = fit_temperatures(val.logits[:-1], val.target)
        calibrated = {}
        for policy in EXIT_POLICIES:
            on_val, on_test = val.scored(policy, temperature), test.scored(policy, temperature)
            thresholds = thresholds_for_final_accuracy(on_val)
            accuracy, cost = on_test.simulate(thresholds, costs)
            calibrated[policy] = {"accuracy": accuracy, "relative_cost": cost, "thresholds": thresholds,
                                  "exit_counts": on_test.exit_counts(thresholds)}
        fine = [round(b, 3) for b in torch.linspace(costs[0].item() + 0.01, 1.0, 25).tolist()]
        per_seed.append({
            "seed": seed, "final_exit_accuracy": 100.0 * test.scored("confidence", temperature).correct[-1].double().mean().item(),
            "temperature": temperature.tolist(), "calibrated": calibrated,
            "budgets": budget_table(val, test, costs, list(BUDGETS)),
            "curve": budget_table(val, test, costs, fine),
        })
    return {"label": label, "seeds": per_seed}


def report_command(args) -> None:
    root = args.runs
    summaries: dict[str, list[dict]] = {}
    for label, seed in all_runs():
        path = run_dir(root, label, seed) / "summary.json"
        if path.exists():
            summaries.setdefault(label, []).append({"seed": seed, **json.loads(path.read_text())})
    missing = [f"{label} seed {seed}" for label, seed in all_runs() if not (run_dir(root, label, seed) / "summary.json").exists()]
    policies = {label: policy_rows(root, label, [s["seed"] for s in summaries[label]])
                for label in ("EENet-8, eefast recipe", "EENet-20, eefast recipe") if label in summaries}

    lines = ["# Exits that learn: recipes and exit policies on the MNIST sample", ""]
    lines += [
        f"`python benchmarks/exits_table.py train && python benchmarks/exits_table.py report`, on "
        f"{platform.machine()} CPU ({torch.get_num_threads()} threads at report time), torch {torch.__version__}, "
        f"eefast {eefast.__version__}. Every row ran on this CPU (no GPU was lent to the session that made it). "
        "Data: `mnist-sample`, 3,600 train / 400 validation / 1,000 test images, 1x28x28. Every run is "
        "`eefast train` with its defaults (AdamW lr 2e-3, weight decay 0.05, cosine schedule, batch 64, "
        f"random shifts of up to 2 pixels; the checkpoint with the best validation loss), for "
        f"{EPOCHS['8']} epochs (EENet-8 family) and {EPOCHS['20']} (EENet-20 family), "
        "unless the row says otherwise; EENet-8 has 4 starting filters. Accuracy and relative cost are on the test "
        "split, mean ± standard deviation over seeds 0, 1, 2 (the seed sets the initialisation, the data order "
        "and the validation split; the test split is fixed). Relative cost is FLOPs per sample over the plain "
        "backbone's, exit heads included (for the smaller static ResNet-20s, over the full ResNet-20's).",
        "",
        "The **eefast recipe** (`--recipe eefast`, the default): single-stage (joint) training in which each "
        "exit's classifier learns from its own cross-entropy (weight 1) and the thesis's L_v2 terms (lambda 1) "
        "see the class logits detached, so they train the confidence heads alone; the exit rule is "
        f"`{RECIPES['eefast']['policy']}` with per-exit temperatures fitted on the validation split and every "
        "threshold at the final exit's validation accuracy. The ablation rows change one thing each: "
        "distillation of the final exit into the early ones (weight 1, T = 3), the backbone trained first "
        "(then the exits alone on it, frozen, for the last 5 epochs at 10x the learning rate, or every part "
        "together for the last 5), the thesis's loss alone for the classifiers. "
        "The **thesis recipe** (`--recipe thesis`): the thesis's loss as written and the learned confidence at "
        "T = 0.5, with the same optimiser, schedule and data.",
        "",
    ]
    if missing:
        lines += [f"Not run (the job was cut short): {', '.join(missing)}.", ""]

    lines += ["## Tables 4.1 / 4.2 redone", "",
              "| model | seeds | samples leaving at exit 0 / 1 / last (mean) | accuracy (%) | relative cost |",
              "|---|---|---|---|---|"]
    for label, rows in summaries.items():
        counts = [r["test"]["exit_counts"] for r in rows]
        mean_counts = " / ".join(f"{statistics.mean(c):.0f}" for c in zip(*counts))
        if len(counts[0]) == 1:
            mean_counts = f"- / - / {mean_counts}"
        costs = [r["test"]["relative_cost"] for r in rows]
        if label.startswith("ResNet-20 width") and "ResNet-20" in summaries:  # against the full ResNet-20's FLOPs
            costs = [r["flops"][-1] / summaries["ResNet-20"][0]["flops"][-1] for r in rows]
        lines.append(f"| {label} | {len(rows)} | {mean_counts} | {mean_std([r['test']['accuracy'] for r in rows])} | "
                     f"{mean_std3(costs)} |")
    for label, counts, accuracy, cost in THESIS_ROWS:
        lines.append(f"| {label} | - | {counts} | {accuracy:.2f} | {cost:.2f} |")

    for label, table in policies.items():
        seeds = table["seeds"]
        family = "8" if "EENet-8" in label else "20"
        baseline = summaries.get(f"ResNet-{family}", [])
        lines += ["", f"## {label}: the three exit policies on the same trained networks", "",
                  f"Final exit alone: {mean_std([s['final_exit_accuracy'] for s in seeds])} %. "
                  f"Plain ResNet-{family}: {mean_std([r['test']['accuracy'] for r in baseline]) if baseline else '-'} %.",
                  "",
                  "Calibrated as the recipe calibrates (thresholds fitted on validation, reported on test):", "",
                  "| policy | accuracy (%) | relative cost | samples leaving at each exit (mean) |", "|---|---|---|---|"]
        for policy in EXIT_POLICIES:
            rows = [s["calibrated"][policy] for s in seeds]
            counts = " / ".join(f"{statistics.mean(c):.0f}" for c in zip(*(r["exit_counts"] for r in rows)))
            lines.append(f"| {policy} | {mean_std([r['accuracy'] for r in rows])} | "
                         f"{mean_std3([r['relative_cost'] for r in rows])} | {counts} |")
        lines += ["", "At fixed budgets (relative cost, of the plain backbone's FLOPs): thresholds for the most accurate "
                  "setting within the budget on validation, reported on test:", "",
                  "| policy | " + " | ".join(f"{int(100 * b)} %" for b in BUDGETS) + " |",
                  "|---|" + "---|" * len(BUDGETS)]
        for policy in EXIT_POLICIES:
            cells = []
            for budget in BUDGETS:
                picked = [next(r for r in s["budgets"] if r["policy"] == policy and r["budget"] == budget) for s in seeds]
                cells.append(f"{mean_std([p['accuracy'] for p in picked])} at {mean_std3([p['relative_cost'] for p in picked])}")
            lines.append(f"| {policy} | " + " | ".join(cells) + " |")
        if family == "20":
            for static in ("ResNet-20 width 0.5", "ResNet-20 width 0.7", "ResNet-20 width 0.875"):
                if static in summaries:
                    rows = summaries[static]
                    flops = rows[0]["flops"][-1] / baseline[0]["flops"][-1] if baseline else float("nan")
                    lines.append(f"| static {static} | {mean_std([r['test']['accuracy'] for r in rows])} at "
                                 f"{flops:.3f} | | | |")
        winner = {}
        for budget in BUDGETS[:-1]:
            means = {p: statistics.mean(next(r for r in s["budgets"] if r["policy"] == p and r["budget"] == budget)
                                        ["accuracy"] for s in seeds) for p in EXIT_POLICIES}
            winner[budget] = max(means, key=means.get)
        lines += ["", "Most accurate policy (mean over seeds) at each budget: "
                  + ", ".join(f"{int(100 * b)} %: {p}" for b, p in winner.items()) + "."]
        table["winner"] = {str(k): v for k, v in winner.items()}

    if len(policies) > 1:  # the default policy: the most accurate at half the FLOPs, over both networks
        at_half = {p: statistics.mean(statistics.mean(next(r for r in s["budgets"] if r["policy"] == p and r["budget"] == 0.5)
                                                      ["accuracy"] for s in table["seeds"]) for table in policies.values())
                   for p in EXIT_POLICIES}
        lines += ["", "## The default policy", "",
                  "Accuracy at 50 % of the FLOPs, the mean of the two networks' seed means: "
                  + ", ".join(f"{p} {a:.2f} %" for p, a in at_half.items())
                  + f". Most accurate: {max(at_half, key=at_half.get)}; the recipe's default: "
                  f"{RECIPES['eefast']['policy']}."]

    out = Path(args.table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"summaries": summaries, "policies": policies}, indent=2))
    plot(summaries, policies, out.with_suffix(".png"))
    print("\n".join(lines))


def plot(summaries: dict, policies: dict, path: Path) -> None:
    """The Pareto plot of each EENet family: each policy's budget curve (mean over seeds), the
    plain baseline and the smaller static networks; one PNG per family (``path`` stem + family)."""
    from eefast.plots import plot_pareto

    for label, table in policies.items():
        seeds = table["seeds"]
        budgets = sorted({r["budget"] for r in seeds[0]["curve"]})
        curves = {}
        for policy in EXIT_POLICIES:
            picked = [[next(r for r in s["curve"] if r["policy"] == policy and r["budget"] == b) for s in seeds]
                      for b in budgets]
            curves[f"EENet, {policy}"] = [(statistics.mean(p["relative_cost"] for p in rows),
                                           statistics.mean(p["accuracy"] for p in rows)) for rows in picked]
        family = "8" if "EENet-8" in label else "20"
        points = {}
        baseline = summaries.get(f"ResNet-{family}", [])
        if baseline:
            points[f"plain ResNet-{family}"] = (1.0, statistics.mean(r["test"]["accuracy"] for r in baseline))
            for name, rows in summaries.items():
                if name.startswith(f"ResNet-{family} width"):
                    points[f"static {name}"] = (rows[0]["flops"][-1] / baseline[0]["flops"][-1],
                                                statistics.mean(r["test"]["accuracy"] for r in rows))
        plot_pareto(curves, points, path.with_name(f"{path.stem}_eenet{family}.png"),
                    title=f"{label} on mnist-sample (test, mean of {len(seeds)} seeds)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["train", "report"])
    parser.add_argument("--runs", type=Path, default=Path("runs/exits-table"))
    parser.add_argument("--table", default="benchmarks/results/mnist_sample_exits.md")
    args = parser.parse_args()
    (train_command if args.command == "train" else report_command)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
