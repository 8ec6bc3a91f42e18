"""Interrupted and failing training runs lose nothing: signals, kills, NaN losses."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from eefast import EENetLoss
from eefast.checkpoint import load_checkpoint
from eefast.train import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["train", "--model", "eenet8", "--filters", "2", "--batch-size", "64", "--quiet", "--no-plots", "--epochs", "3"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def start(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "eefast", *ARGS, "--out", str(out), *extra], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)


def epochs_done(out: Path) -> int:
    try:
        return len(json.loads((out / "history.json").read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def wait_for_epochs(process: subprocess.Popen, out: Path, epochs: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None and epochs_done(out) < epochs:
        time.sleep(0.02)


def assert_same_final_weights(a: Path, b: Path) -> None:
    want, got = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert got["epoch"] == want["epoch"]
    for name, tensor in want["model_state"].items():
        assert torch.equal(tensor, got["model_state"][name]), name
    assert got["history"] == want["history"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    result = subprocess.run([sys.executable, "-m", "eefast", *ARGS, "--out", str(out)], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_a_checkpoint_that_resumes_exactly(straight_run, tmp_path, signum):
    process = start(tmp_path)
    wait_for_epochs(process, tmp_path, 1)
    time.sleep(0.3)  # into epoch 2
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signum, stderr
    stopped = load_checkpoint(tmp_path / "last.pt")
    if "position" in stopped:  # stopped mid-epoch (else between epochs, at an epoch's end)
        assert stopped["position"]["step"] > 0 and "resume with --resume" in stderr
    resumed = subprocess.run([sys.executable, "-m", "eefast", *ARGS, "--out", str(tmp_path), "--resume"], cwd=ROOT,
                             env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_final_weights(straight_run, tmp_path)


def test_random_kills_then_resume_give_the_uninterrupted_weights(straight_run, tmp_path):
    """SIGKILL at random moments, three times, resuming after each: no checkpoint is ever lost
    or torn, and the run ends with the weights of the uninterrupted one."""
    rng = random.Random(0)
    resume: tuple[str, ...] = ()
    for _ in range(3):
        process = start(tmp_path, *resume)
        wait_for_epochs(process, tmp_path, epochs_done(tmp_path) + 1)
        time.sleep(rng.uniform(0.0, 0.8))
        process.kill()
        process.wait()
        if (tmp_path / "last.pt").exists():
            load_checkpoint(tmp_path / "last.pt")  # whole and readable
            resume = ("--resume",)
    finished = subprocess.run([sys.executable, "-m", "eefast", *ARGS, "--out", str(tmp_path), *resume], cwd=ROOT,
                              env=ENV, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    assert_same_final_weights(straight_run, tmp_path)


def test_nan_loss_names_epoch_and_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_terms = EENetLoss.terms  # what the training step calls
    calls = {"n": 0}
    steps_per_epoch = -(-3600 // 64)  # 57 batches of the 3,600 training images

    def poisoned(self, output, target, costs):
        loss, ce, cost = real_terms(self, output, target, costs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == steps_per_epoch + 5 else loss), ce, cost

    monkeypatch.setattr(EENetLoss, "terms", poisoned)
    config = TrainConfig(model="eenet8", filters=2, batch_size=64, epochs=3, recipe="thesis", quiet=True, plots=False,
                         out=str(tmp_path))
    with pytest.raises(FloatingPointError, match="not finite at epoch 2, step 5;.*last good checkpoint"):
        train(config)
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["epoch"] == 0 and all(torch.isfinite(t).all() for t in last["model_state"].values()
                                      if t.is_floating_point())


def torchrun(out: Path, *extra: str) -> subprocess.Popen:
    """A 2-process CPU torchrun job (on a free port) in its own process group, so a test can signal all of it."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "eefast", *DDP_ARGS, "--out", str(out), *extra]
    return subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


DDP_ARGS = ["train", "--model", "eenet8", "--filters", "2", "--batch-size", "16", "--quiet", "--no-plots",
            "--epochs", "2", "--device", "cpu"]


def test_torchrun_job_stopped_mid_epoch_resumes_exactly(tmp_path):
    """SIGTERM to every process of a 2-process job (as a scheduler or Ctrl-C sends): the ranks agree
    on the step to stop after, rank 0 writes both ranks' state mid-epoch, and --resume with two
    processes ends with the weights and history of the uninterrupted job."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    job = torchrun(straight)
    _, stderr = job.communicate(timeout=600)
    assert job.returncode == 0, stderr[-3000:]

    job = torchrun(stopped)
    wait_for_epochs(job, stopped, 1)
    time.sleep(0.3)  # into epoch 2 (about 110 steps of 16 samples per rank)
    os.killpg(job.pid, signal.SIGTERM)
    _, stderr = job.communicate(timeout=300)
    assert job.returncode != 0
    position = load_checkpoint(stopped / "last.pt")["position"]
    assert position["epoch"] == 1 and position["step"] > 0 and len(position["ranks"]) == 2, stderr[-3000:]
    assert "SIGTERM: stopped in epoch 2 after step" in stderr

    job = torchrun(stopped, "--resume")
    _, stderr = job.communicate(timeout=600)
    assert job.returncode == 0, stderr[-3000:]
    assert_same_final_weights(straight, stopped)


def test_mid_epoch_checkpoint_resumes_only_with_the_same_number_of_processes(tmp_path):
    process = start(tmp_path)
    wait_for_epochs(process, tmp_path, 1)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=300)
    checkpoint = load_checkpoint(tmp_path / "last.pt")
    if "position" not in checkpoint:
        pytest.skip("the signal landed between epochs")
    checkpoint["position"]["ranks"] *= 2  # as if written by a 2-process job
    torch.save(checkpoint, tmp_path / "last.pt")
    result = subprocess.run([sys.executable, "-m", "eefast", *ARGS, "--out", str(tmp_path), "--resume"], cwd=ROOT,
                            env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    assert "was trained with 2 process(es); expected the same number to resume it exactly (the data order and the batch depend on it), got 1" in result.stderr
