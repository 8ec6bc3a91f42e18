"""The ``eefast`` command line (also ``python -m eefast``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
from pathlib import Path

import torch

from eefast import _ext, ops, reference
from eefast._version import __version__
from eefast.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from eefast.data import DATASETS, load_dataset
from eefast.evaluate import (THRESHOLD_GRID, budget_table, calibrate, collect_exits, evaluate,
                             exit_outputs, threshold_sweep)
from eefast.models import create_model
from eefast.models.external import is_external
from eefast.placement import DISTRIBUTIONS
from eefast.policies import EXIT_POLICIES
from eefast.train import (LR_SCHEDULES, OPTIMIZERS, RECIPES, SCHEDULES, TrainConfig, check_config, check_output_dir,
                          resolve_device, train)


def triton_status() -> dict:
    """Triton's version and where its kernels can run here (GPU, interpreter, or nowhere)."""
    try:
        import triton
    except ImportError as error:
        return {"installed": False, "mode": f"not installed ({error})"}
    if os.environ.get("TRITON_INTERPRET") == "1":
        mode = "interpreter (TRITON_INTERPRET=1, CPU tensors)"
    elif torch.cuda.is_available():
        mode = "GPU"
    else:
        mode = "no GPU here (TRITON_INTERPRET=1 runs the kernels on the CPU)"
    kernels = "exit_head, ee_loss" if ops.HAS_TRITON else f"unavailable ({ops.TRITON_ERROR})"
    return {"installed": True, "version": triton.__version__, "mode": mode, "kernels": kernels,
            "default_impl": ops.DEFAULT_IMPL}


def device_status() -> dict:
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return {"type": "cuda", "names": names}
    return {"type": "cpu", "names": [platform.processor() or platform.machine()]}


def self_check(device: str) -> str:
    """Runs compact_exits on a small batch and compares it with eefast.reference."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(13, 3, 5, 5, generator=generator).to(device)
    logits = torch.randn(13, 7, generator=generator).to(device)
    confidence = torch.rand(13, generator=generator).to(device)
    index = torch.arange(13, device=device)

    def run(fn):
        out_logits = torch.zeros(13, 7, device=device)
        out_exit = torch.full((13,), -1, dtype=torch.int64, device=device)
        kept = fn(x, logits, confidence, index, 0.5, 1, out_logits, out_exit)
        return (*kept, out_logits, out_exit)

    same = all(torch.equal(a, b) for a, b in zip(run(ops.compact_exits), run(reference.compact_exits)))
    return "ok (matches eefast.reference)" if same else "FAILED: differs from eefast.reference"


def info(args: argparse.Namespace) -> int:
    build = _ext.build_info()
    kernels = {op: sorted(ops._COMPILED_DEVICES[op]) for op in ops._COMPILED_DEVICES}
    device = device_status()
    report = {
        "eefast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "extension": build,
        "compiled_kernels": kernels,
        "triton": triton_status(),
        "device": device,
        "self_check": self_check(device["type"]),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0 if report["self_check"].startswith("ok") else 1

    if build["loaded"]:
        cuda = f"CUDA {build['cuda_version']} compiled in (archs {build['cuda_archs']})" if build["cuda"] else "CPU only"
        extension = f"eefast._C loaded: {cuda}; built against torch {build['torch_version']}"
    else:
        extension = f"not loaded, using the PyTorch fallback ({build['error']})"
    triton = report["triton"]
    lines = [
        f"eefast      {__version__} (python {report['python']}, torch {torch.__version__}, CUDA build: {torch.version.cuda})",
        f"extension   {extension}",
        *(f"  {op:<20} kernels: {', '.join(devs) or 'none (fallback)'}" for op, devs in kernels.items()),
        f"triton      {triton.get('version', '-')}: {triton['mode']}",
        *([f"  fused kernels        {triton['kernels']} (impl {triton['default_impl']}: Triton on CUDA tensors)"]
          if triton["installed"] else []),
        f"device      {device['type']}: {', '.join(device['names'])}",
        f"self-check  compact_exits on {device['type']}: {report['self_check']}",
    ]
    print("\n".join(lines))
    return 0 if report["self_check"].startswith("ok") else 1


def _add_model_args(parser: argparse.ArgumentParser, model_default: str | None = "eenet8",
                    required: bool = False) -> None:
    parser.add_argument("--model", default=model_default, required=required,
                        help="registered model name (see eefast.list_models()), or torchvision:NAME / timm:NAME"
                             + ("" if required else " (default: eenet8)"))
    parser.add_argument("--exits", type=int, help="number of early exits (default: the model's)")
    parser.add_argument("--distribution", choices=sorted(DISTRIBUTIONS), help="exit placement")
    parser.add_argument("--exit-type", choices=list(reference.EXIT_KINDS), help="exit block type")
    parser.add_argument("--filters", type=int, help="starting filters of eenet8 / resnet8")


def _train_config(args: argparse.Namespace, **overrides) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k.replace("-", "_"): v for k, v in vars(args).items() if k.replace("-", "_") in fields}
    if args.backbone is not None:
        if args.model is not None:
            raise ValueError(f"expected --model or --backbone, got both (--model {args.model} --backbone {args.backbone})")
        if not is_external(args.backbone):
            raise ValueError(f"--backbone: expected torchvision:NAME or timm:NAME, got {args.backbone!r}")
        values["model"] = args.backbone
    values["model"] = values.get("model") or "eenet8"
    if args.freeze_backbone:
        if args.schedule not in (None, "frozen-backbone"):
            raise ValueError(f"--freeze-backbone trains the exits on a frozen backbone; expected no other --schedule, "
                             f"got --schedule {args.schedule}")
        values["schedule"] = "frozen-backbone"
    values.update(overrides)
    if isinstance(values.get("threshold"), list):
        values["threshold"] = _parse_thresholds(values["threshold"])
    return TrainConfig(**values)


def _add_train_args(parser: argparse.ArgumentParser) -> None:
    _add_model_args(parser, model_default=None)
    parser.add_argument("--backbone", help="a torchvision or timm network instead of --model: torchvision:NAME or "
                        "timm:NAME (e.g. torchvision:mobilenet_v3_small), cut at its blocks")
    parser.add_argument("--weights", help="--backbone's weights: a local state dict or checkpoint file, or the "
                        "library's named weights (torchvision: DEFAULT, IMAGENET1K_V1 ...; timm: pretrained or a tag), "
                        "which need internet; the last linear layer may be of another number of classes")
    parser.add_argument("--freeze-backbone", action="store_true",
                        help="train the exits and the final classifier alone: the backbone's weights and batch-norm "
                             "statistics stay bit-identical (--schedule frozen-backbone)")
    parser.add_argument("--dataset", default="mnist-sample", choices=list(DATASETS))
    parser.add_argument("--data-root", default="data", help="where torchvision / folder datasets live")
    parser.add_argument("--download", action="store_true", help="download torchvision datasets (needs internet)")
    parser.add_argument("--recipe", default="eefast", choices=list(RECIPES),
                        help="eefast (default): each exit's own cross-entropy, confidence heads trained by the "
                             "thesis's terms alone, max_prob with calibrated thresholds; thesis: the thesis's loss, T = 0.5")
    parser.add_argument("--loss", default="v2", choices=list(reference.LOSS_VERSIONS))
    parser.add_argument("--lam", type=float, default=1.0, help="accuracy/cost trade-off lambda")
    parser.add_argument("--exit-weight", type=float, help="weight of each exit's own cross-entropy (recipe's)")
    parser.add_argument("--distill", type=float, help="weight of the final exit's distillation (recipe's)")
    parser.add_argument("--distill-temperature", type=float, default=3.0)
    parser.add_argument("--confidence-only", action=argparse.BooleanOptionalAction, default=None,
                        help="the thesis's terms train only the confidence heads (recipe's)")
    parser.add_argument("--optimizer", default="adamw", choices=list(OPTIMIZERS))
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--lr-schedule", default="cosine", choices=list(LR_SCHEDULES),
                        help="learning rate over each phase of the schedule")
    parser.add_argument("--schedule", choices=list(SCHEDULES),
                        help="joint (every part from the start), backbone-first (the backbone alone, then the exits "
                             "alone on the frozen backbone for the last --exit-epochs), backbone-then-joint (then every "
                             "part together), frozen-backbone (the exits and the final classifier on the frozen "
                             "stages: --freeze-backbone) or exits-then-joint (so for the first --exit-epochs, then "
                             "every part together); the recipe's")
    parser.add_argument("--exit-epochs", type=int, help="two-phase schedules: epochs of the exits' phase (a sixth of "
                        "--epochs)")
    parser.add_argument("--exit-lr", type=float, help="learning rate of phases that train the exits on a frozen "
                        "backbone (10 x --lr)")
    parser.add_argument("--no-augment", dest="augment", action="store_false",
                        help="no training-set augmentation (random shifts / crops)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--patience", type=int, default=20, help="early stopping: epochs without improvement")
    parser.add_argument("--min-delta", type=float, default=0.001, help="early stopping: least improvement")
    parser.add_argument("--policy", choices=list(EXIT_POLICIES),
                        help="exit rule: confidence (EENets), max_prob (SDN), entropy (BranchyNet); recipe's")
    parser.add_argument("--threshold", type=float, nargs="+",
                        help="fixed thresholds, one or one per early exit (default: the recipe's)")
    parser.add_argument("--budget", type=float, help="calibrate the thresholds for this relative cost")
    parser.add_argument("--max-drop", type=float,
                        help="calibrate the cheapest thresholds within this many accuracy points of the final exit on "
                             "validation (default: every threshold at the final exit's validation accuracy)")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")


def train_command(args: argparse.Namespace) -> int:
    train(_train_config(args))
    return 0


def _parse_thresholds(values: list[float] | None) -> float | list[float] | None:
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def eval_command(args: argparse.Namespace) -> int:
    payload = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(payload)
    device = resolve_device(args.device)
    model.to(device)
    splits = _checkpoint_splits(payload, args.dataset, args.data_root, where=str(args.checkpoint))
    policy_changed = args.policy is not None and args.policy != model.policy
    if args.policy is not None:
        model.policy = args.policy
    if args.threshold:
        model.threshold = _parse_thresholds(args.threshold)
    elif not model.exits and (args.budget is not None or args.max_drop is not None):
        raise ValueError(f"--budget / --max-drop calibrate early exits; {payload['model_name']} has only its final exit")
    elif model.exits and (args.budget is not None or args.max_drop is not None or policy_changed):
        # another rule's thresholds do not carry over: fitted again on the validation split
        calibrate(model, splits.val, device, budget=args.budget, max_drop=args.max_drop)
    result = evaluate(model, splits.test, device, batch_size=args.batch_size, mode=args.mode)
    report = {"checkpoint": str(args.checkpoint), "model": payload["model_name"], "budget": args.budget,
              "policy": model.policy, **result.to_dict()}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{payload['model_name']} from {args.checkpoint} on the {splits.name} test split "
              f"({result.samples} samples), policy {model.policy}, thresholds "
              f"{[round(t, 4) for t in result.thresholds]}")
        print(result.summary())
    return 0


def profile_command(args: argparse.Namespace) -> int:
    kwargs = {k: v for k, v in (("num_exits", args.exits), ("distribution", args.distribution),
                                ("exit_type", args.exit_type), ("filters", args.filters),
                                ("num_classes", args.num_classes)) if v is not None}
    if args.input_shape:
        kwargs["input_shape"] = tuple(args.input_shape)
    model = create_model(args.model, **kwargs)
    total = model.profile.total
    rows = []
    for n in range(model.num_exits):
        head = model.head_flops[n] if n < len(model.exits) else model.profile.classifier_flops
        where = f"after block {model.exit_positions[n]}" if n < len(model.exits) else "final"
        rows.append({"exit": n, "position": where, "flops": model.flops[n], "relative_cost": model.costs[n].item(),
                     "head_flops": head, "head_cost_percent": 100.0 * head / total})
    params = sum(p.numel() for p in model.parameters())
    exit_params = sum(p.numel() for p in model.exits.parameters())
    report = {"model": args.model, "input_shape": list(model.input_shape), "backbone_flops": total,
              "parameters": params, "exit_parameters": exit_params, "exits": rows}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.model}: input {list(model.input_shape)}, backbone {total:,} FLOPs, {params:,} parameters "
          f"({exit_params:,} in early-exit blocks)")
    print(f"{'exit':>4}  {'position':<15} {'FLOPs':>15} {'rel. cost':>9} {'head FLOPs':>11} {'head %':>7}")
    for r in rows:
        print(f"{r['exit']:>4}  {r['position']:<15} {r['flops']:>15,} {r['relative_cost']:>9.4f} "
              f"{r['head_flops']:>11,} {r['head_cost_percent']:>6.2f}%")
    return 0


def sweep_command(args: argparse.Namespace) -> int:
    from eefast import plots

    out = Path(args.out)
    check_output_dir(out)
    if args.kind == "budget":
        return budget_command(args, out)
    if args.kind == "lam":
        if len({f"{lam:g}" for lam in args.lams}) != len(args.lams):
            raise ValueError(f"--lams: expected distinct values (each trains into lam_<value>), got {args.lams}")
        configs = [_train_config(args, lam=lam, out=str(out / f"lam_{lam:g}")) for lam in args.lams]
        baseline_config = _train_config(args, model=args.baseline, exits=None, distribution=None, exit_type=None,
                                        out=str(out / "baseline")) if args.baseline else None
        for config in [*configs, *([baseline_config] if baseline_config else [])]:  # every run's, before one trains
            check_config(config)
        points = []
        for lam, config in zip(args.lams, configs):
            summary = train(config)
            points.append({"lam": lam, **{k: summary["test"][k] for k in ("accuracy", "relative_cost", "exit_counts")}})
        baseline = None
        if args.baseline:
            summary = train(baseline_config)
            baseline = {"model": args.baseline, **{k: summary["test"][k] for k in ("accuracy", "relative_cost")}}
        label = "lam"
    else:
        payload = load_checkpoint(args.checkpoint)
        model = model_from_checkpoint(payload)
        splits = _checkpoint_splits(payload, where=str(args.checkpoint))
        if args.policy is not None and args.policy != model.policy:
            model.policy = args.policy
            calibrate(model, splits.val)  # the policy's temperatures
        outputs = exit_outputs(model, splits.test)
        bad = [t for t in args.thresholds if not 0 <= t <= 1]
        if bad:
            raise ValueError(f"--thresholds: expected thresholds in [0, 1], got {bad}")
        points = threshold_sweep(outputs, model.costs, args.thresholds)
        final_accuracy = 100.0 * outputs.correct[-1].double().mean().item()
        baseline = {"model": "final exit only", "accuracy": final_accuracy, "relative_cost": 1.0}
        label = "threshold"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"sweep_{label}.json").write_text(json.dumps({"points": points, "baseline": baseline}, indent=2))
    with open(out / f"sweep_{label}.csv", "w") as file:
        file.write(f"{label},accuracy,relative_cost\n")
        for p in points:
            file.write(f"{p[label]},{p['accuracy']:.4f},{p['relative_cost']:.4f}\n")
    plots.plot_tradeoff(points, out / f"sweep_{label}.png", label, baseline)
    print(f"{label:>9}  {'accuracy':>8}  {'rel. cost':>9}")
    for p in points:
        print(f"{p[label]:>9g}  {p['accuracy']:>8.2f}  {p['relative_cost']:>9.3f}")
    if baseline:
        print(f"baseline ({baseline['model']}): accuracy {baseline['accuracy']:.2f}, cost {baseline['relative_cost']:.3f}")
    print(f"wrote {out}/sweep_{label}.{{json,csv,png}}")
    return 0


def predict_command(args: argparse.Namespace) -> int:
    from eefast.predict import check_output_file
    from eefast.train import setup_distributed

    out = Path(args.out)
    check_output_file(out)
    for option, value in (("--batch-size", args.batch_size), ("--request-size", args.request_size)):
        if value < 1:
            raise ValueError(f"{option}: expected an integer >= 1, got {value}")
    payload = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(payload)
    distributed = setup_distributed(args.device)
    try:
        return _predict(args, out, payload, model, distributed)
    finally:
        if distributed.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _predict(args: argparse.Namespace, out: Path, payload: dict, model, distributed) -> int:
    from eefast.predict import predict_dataset, write_csv

    model.to(resolve_device(args.device, distributed.local_rank))
    splits = _checkpoint_splits(payload, args.dataset, args.data_root, where=str(args.checkpoint))
    dataset = {"test": splits.test, "val": splits.val, "train": splits.train}[args.split]  # train: not augmented
    rows, summary = predict_dataset(model, dataset, batch_size=args.batch_size, request_size=args.request_size,
                                    progress=distributed.is_main and sys.stderr.isatty())
    if not distributed.is_main:
        return 0
    write_csv(rows, out)
    summary = {"checkpoint": str(args.checkpoint), "split": args.split, "out": str(out), **summary}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        accuracy = "" if summary["accuracy"] is None else f", accuracy {summary['accuracy']:.2f} %"
        print(f"{payload['model_name']} on the {splits.name} {args.split} split: {summary['samples']} samples in "
              f"{summary['seconds']:.2f} s ({summary['samples_per_second']:.0f}/s){accuracy}, relative cost "
              f"{summary['relative_cost']:.3f}, exits {summary['exit_counts']}")
        print(f"wrote {out}")
    return 0


def export_command(args: argparse.Namespace) -> int:
    from eefast.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, format=args.format)
    segments = len(json.loads((out / "manifest.json").read_text())["segments"])
    if args.format == "onnx":
        print(f"wrote {out}: {segments} ONNX programs, manifest.json and deploy.py (run them with numpy and "
              f"onnxruntime alone: deploy.ExportedEENet({str(out)!r}).predict(x))")
    else:
        print(f"wrote {out}: {segments} torch.export programs and manifest.json "
              f"(eefast.export.ExportedProgramEENet({str(out)!r}).predict(x) runs them)")
    return 0


def _checkpoint_splits(payload: dict, dataset: str | None = None, data_root: str | None = None, where: str = "checkpoint"):
    """The splits of the dataset a checkpoint was trained on (its validation split too), or of
    ``dataset`` / ``data_root`` where given; the checkpoint's settings are checked first."""
    config = payload.get("config") or {}
    settings = {"dataset": (dataset or config.get("dataset", "mnist-sample"), str),
                "data_root": (data_root or config.get("data_root", "data"), str),
                "seed": (config.get("seed", 0), int), "val_fraction": (config.get("val_fraction", 0.1), float)}
    for name, (value, kind) in settings.items():
        valid = isinstance(value, kind) and not isinstance(value, bool) if kind is not float else (
            isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1)
        if not valid or (name == "seed" and value < 0):
            expected = {"str": "a string", "int": "an integer >= 0", "float": "a number in (0, 1)"}[kind.__name__]
            raise CheckpointError(f"{where} config: expected {name} {expected}, got {value!r}")
    return load_dataset(settings["dataset"][0], settings["data_root"][0], seed=settings["seed"][0],
                        val_fraction=settings["val_fraction"][0], augment=False)


def budget_command(args: argparse.Namespace, out: Path) -> int:
    """Each exit policy at each budget on one trained EENet (fitted on validation, reported on
    test), beside fixed networks evaluated on the same test split; a table and the Pareto plot."""
    from eefast import plots

    payload = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(payload)
    if not model.exits:
        raise ValueError(f"sweep budget: expected an EENet with early exits, {args.checkpoint} has none")
    splits = _checkpoint_splits(payload, where=str(args.checkpoint))
    val, test = collect_exits(model, splits.val), collect_exits(model, splits.test)
    rows = budget_table(val, test, model.costs, args.budgets)
    low = model.costs[0].item() + 0.01
    curve_budgets = [low + (1.0 - low) * i / 24 for i in range(25)]
    curves = {}
    for row in budget_table(val, test, model.costs, curve_budgets):
        curves.setdefault(f"EENet, {row['policy']}", []).append((row["relative_cost"], row["accuracy"]))
    reference_flops = model.profile.total
    fixed = []
    for path in args.baseline or []:
        other = model_from_checkpoint(load_checkpoint(path))
        result = evaluate(other, splits.test)
        fixed.append({"checkpoint": path, "model": load_checkpoint(path)["model_name"], "accuracy": result.accuracy,
                      "relative_cost": result.flops_per_sample / reference_flops})
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep_budget.json").write_text(json.dumps({"checkpoint": args.checkpoint, "rows": rows, "fixed": fixed,
                                                        "curves": curves}, indent=2))
    with open(out / "sweep_budget.csv", "w") as file:
        file.write("policy,budget,accuracy,relative_cost\n")
        for r in rows:
            file.write(f"{r['policy']},{r['budget']},{r['accuracy']:.4f},{r['relative_cost']:.4f}\n")
    points = {f"{f['model']} ({Path(f['checkpoint']).parent.name})": (f["relative_cost"], f["accuracy"]) for f in fixed}
    plots.plot_pareto(curves, points, out / "sweep_budget.png", title=f"{payload['model_name']}: policies at budgets")
    print(f"{'policy':<11} " + " ".join(f"{f'budget {b:g}':>22}" for b in args.budgets))
    for policy in EXIT_POLICIES:
        cells = [next(r for r in rows if r["policy"] == policy and r["budget"] == b) for b in args.budgets]
        print(f"{policy:<11} " + " ".join(f"{c['accuracy']:>8.2f} % at {c['relative_cost']:.3f}".rjust(22) for c in cells))
    for f in fixed:
        print(f"{f['model']} ({f['checkpoint']}): {f['accuracy']:.2f} % at {f['relative_cost']:.3f}")
    print(f"wrote {out}/sweep_budget.{{json,csv,png}}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eefast", description="Early-exit CNNs (EENets) for PyTorch, made fast.")
    parser.add_argument("--version", action="version", version=f"eefast {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info_parser = commands.add_parser("info", help="what is available: extension (CPU/CUDA), Triton, device")
    info_parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info_parser.set_defaults(run=info)

    train_parser = commands.add_parser("train", help="train an EENet (or a plain baseline) and report on the test split")
    _add_train_args(train_parser)
    train_parser.add_argument("--out", default="runs/eefast", help="run directory (history, checkpoints, plots)")
    train_parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    train_parser.set_defaults(run=train_command)

    eval_parser = commands.add_parser("eval", help="evaluate a checkpoint on its dataset's test split")
    eval_parser.add_argument("--checkpoint", required=True)
    eval_parser.add_argument("--dataset", help="default: the checkpoint's")
    eval_parser.add_argument("--data-root", help="default: the checkpoint's")
    eval_parser.add_argument("--threshold", type=float, nargs="+", help="one threshold, or one per early exit")
    eval_parser.add_argument("--budget", type=float, help="pick thresholds on the validation split for this relative cost")
    eval_parser.add_argument("--policy", choices=list(EXIT_POLICIES),
                             help="exit rule (default: the checkpoint's); another one is calibrated on validation")
    eval_parser.add_argument("--max-drop", type=float,
                             help="calibrate: the cheapest thresholds within this many accuracy points of the final "
                                  "exit on validation (default where calibrating: the final exit's accuracy)")
    eval_parser.add_argument("--mode", default="compact", choices=["compact", "mask", "sample"])
    eval_parser.add_argument("--batch-size", type=int, default=256)
    eval_parser.add_argument("--device", default="auto")
    eval_parser.add_argument("--json", action="store_true")
    eval_parser.set_defaults(run=eval_command)

    predict_parser = commands.add_parser(
        "predict", help="a checkpoint over a dataset split through the stream runner; one CSV row per sample")
    predict_parser.add_argument("--checkpoint", required=True)
    predict_parser.add_argument("--dataset", help="default: the checkpoint's")
    predict_parser.add_argument("--data-root", help="default: the checkpoint's")
    predict_parser.add_argument("--split", default="test", choices=["test", "val", "train"])
    predict_parser.add_argument("--out", default="predictions.csv", help="CSV: index, prediction, exit, cost, "
                                "confidence (top softmax probability), label")
    predict_parser.add_argument("--batch-size", type=int, default=64, help="rows each segment runs on")
    predict_parser.add_argument("--request-size", type=int, default=1, help="samples per request (a caller's batch)")
    predict_parser.add_argument("--device", default="auto")
    predict_parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    predict_parser.set_defaults(run=predict_command)

    export_parser = commands.add_parser(
        "export", help="a checkpoint as one ONNX program per segment, a manifest and the deploy runtime")
    export_parser.add_argument("--checkpoint", required=True)
    export_parser.add_argument("--format", default="onnx", choices=["onnx", "torch.export"],
                               help="onnx (for ONNX Runtime, with deploy.py) or torch.export (.pt2, for AOTInductor)")
    export_parser.add_argument("--out", required=True, help="directory for the segment programs and manifest.json")
    export_parser.set_defaults(run=export_command)

    profile_parser = commands.add_parser("profile", help="per-exit FLOPs, costs and parameters of a model")
    _add_model_args(profile_parser, model_default=None, required=True)
    profile_parser.add_argument("--num-classes", type=int)
    profile_parser.add_argument("--input-shape", type=int, nargs=3, metavar=("C", "H", "W"))
    profile_parser.add_argument("--json", action="store_true")
    profile_parser.set_defaults(run=profile_command)

    sweep_parser = commands.add_parser("sweep", help="accuracy vs cost: a lambda, threshold or budget sweep")
    sweep_kinds = sweep_parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    lam_parser = sweep_kinds.add_parser("lam", help="train one model per lambda (Table 4.2)")
    _add_train_args(lam_parser)
    lam_parser.add_argument("--lams", type=float, nargs="+", default=[0.5, 0.75, 1.0, 1.25, 1.5])
    lam_parser.add_argument("--baseline", help="also train this plain model for the plot, e.g. resnet8")
    lam_parser.add_argument("--out", default="runs/sweep")
    threshold_parser = sweep_kinds.add_parser("threshold", help="one trained model under a range of thresholds")
    threshold_parser.add_argument("--checkpoint", required=True)
    threshold_parser.add_argument("--thresholds", type=float, nargs="+", default=THRESHOLD_GRID)
    threshold_parser.add_argument("--policy", choices=list(EXIT_POLICIES), help="default: the checkpoint's")
    threshold_parser.add_argument("--out", default="runs/sweep")
    budget_parser = sweep_kinds.add_parser(
        "budget", help="every exit policy at fixed budgets on one model, beside fixed networks; Pareto plot")
    budget_parser.add_argument("--checkpoint", required=True, help="a trained EENet")
    budget_parser.add_argument("--baseline", nargs="+", help="checkpoints of fixed networks (plain, smaller static)")
    budget_parser.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    budget_parser.add_argument("--out", default="runs/sweep")
    sweep_parser.set_defaults(run=sweep_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        ops.check_default_impl()
        return args.run(args)
    except (ValueError, TypeError, OSError, ArithmeticError) as error:  # say what, not where
        print(f"eefast {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
