"""The user's job end to end: datasets, `eefast train / eval / profile / sweep`, checkpoints,
resume after a kill, and 2-process DistributedDataParallel on the CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from eefast import cli
from eefast.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from eefast.data import DatasetMissing, load_dataset
from eefast.evaluate import evaluate

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "eenet8", "--filters", "2", "--batch-size", "64", "--quiet", "--no-plots"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eefast", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


# ---- data --------------------------------------------------------------------------------------


def test_mnist_sample_splits():
    splits = load_dataset("mnist-sample", seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (3600, 400, 1000)
    assert splits.input_shape == (1, 28, 28) and splits.num_classes == 10
    test_labels = np.array([int(y) for _, y in splits.test])
    assert np.bincount(test_labels).tolist() == [100] * 10  # stratified
    val_labels = np.array([int(y) for _, y in splits.val])
    assert np.bincount(val_labels).tolist() == [40] * 10
    other = load_dataset("mnist-sample", seed=1)
    assert torch.equal(splits.test.tensors[0], other.test.tensors[0])  # the test split never moves
    assert splits.val.indices != other.val.indices  # the validation split follows the seed
    x, _ = splits.train[0]
    assert x.shape == (1, 28, 28) and -1 < x.mean() < 1


def test_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'; expected one of \['mnist-sample'"):
        load_dataset("imagenet")
    with pytest.raises(DatasetMissing, match=rf"'cifar10' not found under {tmp_path}.*--download"):
        load_dataset("cifar10", data_root=tmp_path)
    with pytest.raises(DatasetMissing, match="expects .*/train/<class>/<image>"):
        load_dataset("folder", data_root=tmp_path)


def test_folder_dataset(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for label in ("cat", "dog"):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(10):
                Image.new("RGB", (40, 30), color=(i * 20, 0, 0)).save(tmp_path / split / label / f"{i}.png")
    splits = load_dataset("folder", data_root=tmp_path, val_fraction=0.2)
    assert splits.class_names == ["cat", "dog"] and splits.input_shape == (3, 32, 32)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (16, 4, 20)
    assert splits.train[0][0].shape == (3, 32, 32)


# ---- train, eval, profile, sweep ------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = run_cli("train", *TINY, "--epochs", "3", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def test_train_writes_history_checkpoints_and_report(trained_run):
    history = json.loads((trained_run / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert {"train_loss", "train_ce", "train_cost", "val_accuracy", "val_relative_cost", "exit_counts"} <= set(history[0])
    assert (trained_run / "history.csv").read_text().splitlines()[0].startswith("epoch,train_loss")
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["test"]["samples"] == 1000 and sum(summary["test"]["exit_counts"]) == 1000
    last = load_checkpoint(trained_run / "last.pt")
    assert last["epoch"] == 2 and last["model_name"] == "eenet8" and "optimizer_state" in last
    assert model_from_checkpoint(load_checkpoint(trained_run / "best.pt")).num_exits == 3


def test_eval_reproduces_the_training_report(trained_run):
    summary = json.loads((trained_run / "summary.json").read_text())
    result = run_cli("eval", "--checkpoint", str(trained_run / "best.pt"), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("accuracy", "relative_cost", "exit_counts", "exit_accuracy", "flops_per_sample"):
        assert report[key] == summary["test"][key], key


def test_eval_with_thresholds_and_budget(trained_run):
    checkpoint = str(trained_run / "best.pt")
    assert cli.main(["eval", "--checkpoint", checkpoint, "--threshold", "0.0", "--json"]) == 0
    everyone_first = run_cli("eval", "--checkpoint", checkpoint, "--threshold", "0", "0", "--json")
    assert json.loads(everyone_first.stdout)["exit_counts"] == [1000, 0, 0]
    for budget in (0.3, 0.6):
        result = run_cli("eval", "--checkpoint", checkpoint, "--budget", str(budget), "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert abs(report["relative_cost"] - budget) <= 0.05, (budget, report["relative_cost"], report["thresholds"])
    too_small = run_cli("eval", "--checkpoint", checkpoint, "--budget", "0.01")
    assert too_small.returncode != 0 and "expected a budget of at least" in too_small.stderr


def test_profile(capsys):
    assert cli.main(["profile", "--model", "eenet110", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [e["exit"] for e in report["exits"]] == [0, 1, 2]
    assert report["exits"][-1]["relative_cost"] > 1.0 and report["parameters"] > 1.7e6
    assert cli.main(["profile", "--model", "eenet8"]) == 0
    assert "after block 1" in capsys.readouterr().out


def test_threshold_sweep(trained_run, tmp_path):
    assert cli.main(["sweep", "threshold", "--checkpoint", str(trained_run / "best.pt"), "--out", str(tmp_path),
                     "--thresholds", "0", "0.5", "1"]) == 0
    sweep = json.loads((tmp_path / "sweep_threshold.json").read_text())
    assert [p["threshold"] for p in sweep["points"]] == [0, 0.5, 1]
    assert sweep["points"][0]["relative_cost"] == pytest.approx(0.0744, abs=1e-3)  # everyone at exit 0
    assert (tmp_path / "sweep_threshold.png").stat().st_size > 0


def test_default_recipe_calibrates_its_exit_rule(trained_run):
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["recipe"] == "eefast" and summary["policy"] == "max_prob"
    best = load_checkpoint(trained_run / "best.pt")
    assert best["threshold"] == summary["thresholds"] != [0.5, 0.5]  # fitted on the validation split
    assert best["exit_temperature"] != [1.0, 1.0]


def test_eval_under_another_policy_and_the_budget_sweep(trained_run, tmp_path):
    checkpoint = str(trained_run / "best.pt")
    result = run_cli("eval", "--checkpoint", checkpoint, "--policy", "entropy", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["policy"] == "entropy"
    # the default rule puts the thresholds at the final exit's validation accuracy, whatever the policy;
    # the exits taken are the entropy rule's
    model = model_from_checkpoint(load_checkpoint(checkpoint))
    model.policy, model.threshold = "entropy", report["thresholds"]
    assert report["exit_counts"] == evaluate(model, load_dataset("mnist-sample", seed=0).test).exit_counts
    assert cli.main(["sweep", "budget", "--checkpoint", checkpoint, "--baseline", checkpoint, "--budgets", "0.3", "1",
                     "--out", str(tmp_path)]) == 0
    sweep = json.loads((tmp_path / "sweep_budget.json").read_text())
    assert [(r["policy"], r["budget"]) for r in sweep["rows"]] == [
        (p, b) for p in ("confidence", "max_prob", "entropy") for b in (0.3, 1.0)]
    assert all(r["relative_cost"] <= r["budget"] + 0.05 for r in sweep["rows"])  # fitted on validation, cost on test
    assert len(sweep["fixed"]) == 1 and (tmp_path / "sweep_budget.png").stat().st_size > 0


def test_plots_are_written(tmp_path):
    result = run_cli("train", *[a for a in TINY if a != "--no-plots"], "--epochs", "1", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    for name in ("history.png", "exits.png", "exit_grid.png"):
        assert (tmp_path / name).stat().st_size > 1000, name


def test_lam_sweep(tmp_path):
    assert cli.main(["sweep", "lam", *TINY, "--epochs", "1", "--lams", "0.5", "2", "--baseline", "resnet8",
                     "--out", str(tmp_path)]) == 0
    sweep = json.loads((tmp_path / "sweep_lam.json").read_text())
    assert [p["lam"] for p in sweep["points"]] == [0.5, 2.0]
    assert sweep["baseline"]["model"] == "resnet8" and sweep["baseline"]["relative_cost"] == pytest.approx(1.0)


# ---- resume and distributed ---------------------------------------------------------------------


def test_killed_and_resumed_run_ends_with_the_same_weights(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = ["train", *TINY, "--epochs", "3", "--no-plots"]
    assert run_cli(*args, "--out", str(straight)).returncode == 0

    process = subprocess.Popen([sys.executable, "-m", "eefast", *args, "--out", str(killed)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        history = killed / "history.json"
        if history.exists() and len(json.loads(history.read_text() or "[]")) >= 1:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # somewhere in epoch 2
    process.wait()
    assert load_checkpoint(killed / "last.pt")["epoch"] < 2, "the run finished before it could be killed"
    resumed = run_cli(*args, "--out", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr

    want, got = load_checkpoint(straight / "last.pt"), load_checkpoint(killed / "last.pt")
    assert got["epoch"] == want["epoch"] == 2
    for name, tensor in want["model_state"].items():
        assert torch.equal(tensor, got["model_state"][name]), name
    assert got["history"] == want["history"]


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    result = run_cli("train", *TINY, "--epochs", "1", "--out", str(tmp_path / "nothing"), "--resume")
    assert result.returncode != 0 and "does not exist" in result.stderr
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "missing.pt")


def test_torchrun_two_processes_on_cpu(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "eefast", "train", *TINY, "--epochs", "1", "--device", "cpu", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_identical"] is True
    assert summary["test"]["samples"] == 1000  # evaluation shards reduced across ranks


TEARDOWN_SCRIPT = """
import sys
import torch.distributed as dist
from eefast.train import TrainConfig, train
train(TrainConfig(model="eenet8", filters=2, batch_size=64, epochs=1, quiet=True, plots=False, device="cpu",
                  out=sys.argv[1]))
assert not dist.is_initialized(), "train() left its process group to interpreter shutdown"
"""


def test_torchrun_training_tears_down_its_process_group(tmp_path):
    """Left to interpreter shutdown, a gloo worker thread still holding the last collective's tensors
    takes the GIL there and aborts a finished job ("terminate called without an active exception",
    about one run in twenty here); train() finishes and tears down its group itself."""
    script = tmp_path / "job.py"
    script.write_text(TEARDOWN_SCRIPT)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
         str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_exit_grid_draws_from_every_class():
    """The MNIST sample's test split is sorted by class: the grid must not show only zeros."""
    import eefast
    from eefast.plots import samples_by_exit

    model = eefast.create_model("eenet8")
    model.threshold = 0.0  # everyone leaves at exit 0
    taken = samples_by_exit(model, load_dataset("mnist-sample").test, "cpu", per_exit=12)
    assert len(taken[0]) == 12 and taken[1] == [] and taken[2] == []
    assert len({label for _, label in taken[0]}) >= 5
