"""Checkpoint files: versioned, self-describing, atomic; broken or hostile files fail clearly
and run nothing."""

from __future__ import annotations

import os
import pickle
import zipfile

import pytest
import torch

import eefast
from eefast.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint


def good_payload(name: str = "eenet8", **kwargs) -> dict:
    torch.manual_seed(0)
    model = eefast.create_model(name, **kwargs)
    return {"model_name": name, "model_kwargs": kwargs, "model_state": model.state_dict(), "threshold": [0.3, 0.6]}


def test_round_trip_rebuilds_the_model_from_the_file_alone(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(path, good_payload(filters=3, exit_type="bnpool"))
    payload = load_checkpoint(path)
    assert payload["format"] == 1 and payload["eefast_version"] == eefast.__version__
    model = model_from_checkpoint(payload)
    assert model.threshold == [0.3, 0.6] and model.exit_type == "bnpool"
    x = torch.randn(2, 1, 28, 28)
    reference = eefast.create_model("eenet8", filters=3, exit_type="bnpool")
    reference.load_state_dict(payload["model_state"])
    torch.testing.assert_close(model.eval().forward_all(x).logits, reference.eval().forward_all(x).logits)


def test_truncated_file(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(path, good_payload())
    data = path.read_bytes()
    for cut in (len(data) // 2, 100, 0):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="cannot read checkpoint"):
            load_checkpoint(path)


def test_corrupted_bytes(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(path, good_payload())
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        model_from_checkpoint(load_checkpoint(path))


class RunsCode:
    """Unpickling this calls os.system: a file crafted to run code on load."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_file_crafted_to_run_code_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "model_state": {}, "payload": RunsCode()}, path)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()
    raw = tmp_path / "raw.pkl"  # a plain pickle, not a torch file
    raw.write_bytes(pickle.dumps(RunsCode()))
    with pytest.raises(CheckpointError):
        load_checkpoint(raw)
    assert not (tmp_path / "PWNED").exists()


def test_not_an_eefast_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="not an eefast checkpoint of format 1"):
        load_checkpoint(path)
    future = tmp_path / "future.pt"
    torch.save({"format": 99, "model_state": {}}, future)
    with pytest.raises(CheckpointError, match="found format 99"):
        load_checkpoint(future)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_weights_of_another_model(tmp_path):
    payload = good_payload("eenet20")
    payload["model_name"], payload["model_kwargs"] = "eenet8", {}
    path = tmp_path / "mixed.pt"
    save_checkpoint(path, payload)
    with pytest.raises(CheckpointError, match="do not fit model 'eenet8'"):
        model_from_checkpoint(load_checkpoint(path))


def test_a_crash_mid_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, good_payload())
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, good_payload(filters=4))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind
    assert zipfile.is_zipfile(path)
