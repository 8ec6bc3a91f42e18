"""The standing adversarial suite: inputs a careless user or an attacker would give, at the model
API, the checkpoint files, the datasets, resume and the command line. Each case asserts the clear
error (naming what was expected and what was given) or the correct result, and that nothing was
written or lost. The compaction op's cases (aliased and out-of-range arguments) are in
test_compact_exits.py; the loss's and the model's input checks in test_validation.py."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

import eefast
from eefast import cli
from eefast.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from eefast.data import DatasetError, load_dataset
from eefast.train import TrainConfig, Trainer, check_resume_config, train

ROOT = Path(__file__).resolve().parent.parent


def payload_of(name: str = "eenet8", **kwargs) -> dict:
    torch.manual_seed(0)
    model = eefast.create_model(name, **kwargs)
    return {"model_name": name, "model_kwargs": kwargs, "model_state": model.state_dict(), "threshold": [0.3, 0.6]}


# ---- checkpoints --------------------------------------------------------------------------------


def test_damaged_tensor_bytes_fail_their_checksum(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(path, payload_of(filters=4))
    with zipfile.ZipFile(path) as archive:  # the largest tensor's bytes, found through the archive's directory
        member = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    header = member.header_offset  # local file header: 30 bytes, then the name and the extra field
    start = header + 30 + int.from_bytes(data[header + 26 : header + 28], "little") + int.from_bytes(
        data[header + 28 : header + 30], "little")
    data[start + member.file_size // 2] ^= 0x40  # one bit of one weight
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"damaged: the bytes of '.*{member.filename.split('/', 1)[1]}' do not "
                                              "match the checksum"):
        load_checkpoint(path)


@pytest.mark.parametrize("kwargs, message", [
    ({"filters": 10**9}, r"expected filters an integer in \[1, 1024\], got 1000000000"),
    ({"num_classes": 10**12}, r"expected num_classes an integer in \[1, 100000\]"),
    ({"input_shape": [1, 10**6, 10**6]}, r"expected input_shape \[C, H, W\] .* 1 <= H, W <= 4096"),
    ({"num_exits": 10**6}, r"expected num_exits an integer in \[0, 64\]"),
    ({"filters": "8"}, r"expected filters an integer"),
    ({"filters": True}, r"expected filters an integer"),
    ({"input_shape": [1, 28.5, 28]}, r"expected input_shape \[C, H, W\] of integers"),
    ({"filters": 1024, "input_shape": [64, 4096, 4096]}, r"with 68,719,476,736 elements in one sample's largest "
                                                         r"feature map; expected at most 134,217,728"),
    ({"filters": 8, "input_shape": [3, 4096, 4096]}, r"largest feature map; expected at most 134,217,728"),
    ({"layers": 10**9}, r"unexpected argument 'layers' for 'eenet8'; expected some of \["),
], ids=["filters", "classes", "input-side", "exits", "filters-str", "filters-bool", "input-float", "features",
        "features-many", "unknown-arg"])
def test_construction_arguments_are_bounded_before_anything_is_built(tmp_path, kwargs, message):
    payload = payload_of()
    payload["model_kwargs"] = kwargs
    save_checkpoint(tmp_path / "big.pt", payload)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=message):
        model_from_checkpoint(load_checkpoint(tmp_path / "big.pt"))
    assert time.perf_counter() - start < 10  # refused from the numbers (and the meta device), not by allocating


def test_the_parameter_limit_is_checked_on_the_meta_device(tmp_path, monkeypatch):
    from eefast import checkpoint

    monkeypatch.setattr(checkpoint, "MAX_PARAMETERS", 10_000)  # no registered model within the argument limits
    save_checkpoint(tmp_path / "wide.pt", payload_of(filters=32))  # reaches 2**30 parameters
    with pytest.raises(CheckpointError, match=r"with [\d,]+ parameters; expected at most 10,000"):
        model_from_checkpoint(load_checkpoint(tmp_path / "wide.pt"))


@pytest.mark.parametrize("change, message", [
    (lambda p: p.pop("model_name"), r"expected a field 'model_name' \(a string\), found none"),
    (lambda p: p.pop("model_kwargs"), r"expected a field 'model_kwargs'"),
    (lambda p: p.update(model_name=["eenet8"]), r"expected field 'model_name' to be a string, got list"),
    (lambda p: p.update(model_kwargs=[1, 2]), r"expected field 'model_kwargs' to be a dict of named arguments"),
    (lambda p: p["model_state"].update(extra=3), r"expected field 'model_state' to be a dict of tensors"),
    (lambda p: p.update(threshold="high"), r"expected field 'threshold' to be a number or a list of numbers, got str"),
    (lambda p: p.update(policy=3), r"expected field 'policy' to be a string, got int"),
    (lambda p: p.update(exit_temperature={"a": 1}), r"expected field 'exit_temperature' to be a list of numbers"),
    (lambda p: p.update(model_name="eenet7"), r"unknown model 'eenet7'"),
    (lambda p: p.update(policy="top1"), r"exit rule do not fit .*expected an exit policy in"),
    (lambda p: p.update(exit_temperature=[1.0]), r"expected 2 temperatures in \[0.01, 100.0\].*got \[1.0\]"),
    (lambda p: p.update(threshold=[0.3, 7.0]), r"expected thresholds in \[0, 1\]"),
    (lambda p: p.pop("model_state"), r"expected a field 'model_state' \(a dict of tensors\), found none"),
    (lambda p: p.update(config=[1, 2]), r"expected field 'config' to be a dict \(the run's settings\), got list"),
    (lambda p: p["model_state"].pop("classifier.2.weight"), r"do not fit model 'eenet8' \{\}: Error\(s\) in loading"),
], ids=["no-name", "no-kwargs", "name-type", "kwargs-type", "state-type", "threshold-type", "policy-type",
        "temperature-type", "unknown-model", "unknown-policy", "temperature-count", "threshold-range", "no-state",
        "config-type", "missing-weight"])
def test_every_malformed_structure_is_a_checkpoint_error(tmp_path, change, message):
    payload = payload_of()
    change(payload)
    save_checkpoint(tmp_path / "bad.pt", payload)
    with pytest.raises(CheckpointError, match=message):
        model_from_checkpoint(load_checkpoint(tmp_path / "bad.pt"))


def test_a_compressed_member_is_refused_before_it_is_inflated(tmp_path):
    path = tmp_path / "bomb.pt"
    save_checkpoint(path, payload_of())
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{archive.namelist()[0].split('/')[0]}/zeros", b"\0" * (1 << 20))
    with pytest.raises(CheckpointError, match=r"expected the uncompressed members torch.save writes, got '.*zeros' "
                                              "compressed"):
        load_checkpoint(path)


@pytest.mark.parametrize("command", ["eval", "sweep-threshold", "predict"])
@pytest.mark.parametrize("field, value, message", [
    ("seed", "abc", r"expected seed an integer >= 0, got 'abc'"),
    ("val_fraction", "x", r"expected val_fraction a number in \(0, 1\), got 'x'"),
    ("data_root", 5, r"expected data_root a string, got 5"),
])
def test_commands_on_a_checkpoint_with_bad_settings_say_which(capsys, tmp_path, command, field, value, message):
    payload = payload_of()
    payload["config"] = {"dataset": "mnist-sample", field: value}
    save_checkpoint(tmp_path / "c.pt", payload)
    args = {"eval": ["eval"], "sweep-threshold": ["sweep", "threshold", "--out", str(tmp_path / "o")],
            "predict": ["predict", "--out", str(tmp_path / "p.csv")]}[command]
    assert cli.main([*args, "--checkpoint", str(tmp_path / "c.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and __import__("re").search(rf"c.pt config: {message}", err), err
    assert not (tmp_path / "o").exists() and not (tmp_path / "p.csv").exists()


def test_weights_that_do_not_fit_are_a_one_line_cli_error(capsys, tmp_path):
    payload = payload_of()
    payload["model_kwargs"] = {"filters": 4}
    save_checkpoint(tmp_path / "c.pt", payload)
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "c.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "size mismatch for" in err


# ---- resume -------------------------------------------------------------------------------------

RUN = dict(model="eenet8", filters=2, epochs=1, batch_size=256, quiet=True, plots=False, device="cpu")


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """A finished one-epoch run: its directory and its settings."""
    out = tmp_path_factory.mktemp("one-epoch")
    config = TrainConfig(**RUN, out=str(out))
    train(config)
    return out, config


@pytest.mark.parametrize("change, named", [
    ({"lr": 1e-3}, "lr=0.002"),
    ({"seed": 1}, "seed=0"),
    ({"batch_size": 64}, "batch_size=256"),
    ({"optimizer": "sgd"}, "optimizer='adamw'"),
    ({"filters": 4}, "filters=2"),
    ({"model": "eenet20", "filters": None}, "model='eenet8'"),
    ({"recipe": "thesis"}, "recipe='eefast'"),
    ({"epochs": 5}, "epochs=1"),  # the cosine schedule is a function of --epochs
], ids=["lr", "seed", "batch-size", "optimizer", "architecture", "model", "recipe", "epochs-under-cosine"])
def test_resume_refuses_settings_the_run_was_not_trained_with(one_epoch, change, named):
    out, config = one_epoch
    before = (out / "last.pt").read_bytes()
    resumed = dataclasses.replace(config, **change, resume=True)
    with pytest.raises(ValueError, match=rf"--resume: .*last.pt was trained with .*{named}.*expected the same"):
        Trainer(resumed)
    assert (out / "last.pt").read_bytes() == before


def test_resume_accepts_what_does_not_change_the_weights():
    stored = dataclasses.asdict(TrainConfig(lr_schedule="constant"))
    check_resume_config(stored, {**stored, "quiet": True, "device": "cpu", "patience": 3, "epochs": 60}, "last.pt")
    # a run of eefast 0.1 (its config without today's fields) resumes with the settings it trained with
    fields_of_0_1 = ("model dataset data_root download exits distribution exit_type filters loss lam optimizer lr "
                     "batch_size epochs patience min_delta threshold val_fraction seed device out resume quiet plots "
                     "extra").split()
    old = {k: stored[k] for k in fields_of_0_1}
    old.update(optimizer="adam", lr=1e-3, batch_size=32, threshold=0.5)
    legacy = TrainConfig(recipe="thesis", optimizer="adam", lr=1e-3, weight_decay=0.0, lr_schedule="constant",
                         augment=False, batch_size=32, threshold=0.5)
    check_resume_config(old, dataclasses.asdict(legacy), "last.pt")
    with pytest.raises(ValueError, match=r"trained with recipe='thesis', .*optimizer='adam'"):
        check_resume_config(old, dataclasses.asdict(TrainConfig()), "last.pt")


def test_a_new_run_into_a_directory_holding_a_run_is_refused(one_epoch, capsys):
    out, _ = one_epoch
    before = (out / "last.pt").read_bytes()
    assert cli.main([*TRAIN, "--out", str(out)]) == 2
    assert "holds a training run already (last.pt); expected a new directory, or --resume" in capsys.readouterr().err
    assert (out / "last.pt").read_bytes() == before


def test_sweeps_check_every_value_before_running(one_epoch, capsys, tmp_path):
    out, _ = one_epoch
    assert cli.main(["sweep", "threshold", "--checkpoint", str(out / "best.pt"), "--thresholds", "0.5", "nan",
                     "--out", str(tmp_path / "t")]) == 2
    assert "--thresholds: expected thresholds in [0, 1], got [nan]" in capsys.readouterr().err
    assert cli.main(["sweep", "lam", "--model", "eenet8", "--filters", "2", "--epochs", "1", "--lams", "1", "-1",
                     "--quiet", "--no-plots", "--out", str(tmp_path / "l")]) == 2
    assert "--lam: expected a finite number >= 0, got -1.0" in capsys.readouterr().err
    assert not (tmp_path / "t").exists() and not (tmp_path / "l").exists()  # nothing trained, nothing written


def test_resume_compares_what_the_recipe_resolves_and_the_number_of_processes(one_epoch, tmp_path):
    stored = dataclasses.asdict(TrainConfig())
    check_resume_config(stored, {**stored, "schedule": "joint", "policy": "max_prob"}, "last.pt")  # the recipe's
    out, config = one_epoch
    payload = load_checkpoint(out / "last.pt")
    payload["world_size"] = 2
    save_checkpoint(tmp_path / "last.pt", payload)
    with pytest.raises(ValueError, match=r"was trained with 2 process\(es\); expected the same number"):
        Trainer(dataclasses.replace(config, out=str(tmp_path), resume=True))


def test_resume_of_a_checkpoint_missing_its_training_state(one_epoch, tmp_path):
    out, config = one_epoch
    payload = load_checkpoint(out / "last.pt")
    del payload["optimizer_state"]
    save_checkpoint(tmp_path / "last.pt", payload)
    with pytest.raises(CheckpointError, match=r"expected a field 'optimizer_state' \(a dict\), found none"):
        Trainer(dataclasses.replace(config, out=str(tmp_path), resume=True))


def _rank(**change):
    return {"sums": [1.0, 0.5, 0.1], "samples": 64, "rng_state": torch.get_rng_state(), **change}


@pytest.mark.parametrize("change, message", [
    (lambda p: p.update(epoch=10**9), r"expected epoch in \[-1, 1\)"),
    (lambda p: p.update(history=[]), r"expected history 1 epoch records"),
    (lambda p: p.update(history=["epoch 1"]), r"expected history 1 epoch records"),
    (lambda p: p.update(best_loss=float("nan")), r"expected best_loss a number"),
    (lambda p: p.update(rng_state=torch.zeros(5, dtype=torch.uint8)), r"expected rng_state a uint8 tensor of shape"),
    (lambda p: p.update(position={"epoch": 3, "step": 1, "ranks": [_rank()]}), r"expected position.epoch 1"),
    (lambda p: p.update(position={"epoch": 1, "step": -1, "ranks": [_rank()]}), r"expected position.step an integer"),
    (lambda p: p.update(position={"epoch": 1, "step": 10**6, "ranks": [_rank()]}), r"expected position.step"),
    (lambda p: p.update(position={"epoch": 1, "step": 1, "ranks": [_rank(sums=[1.0])]}),
     r"expected position.ranks\[0\].sums 3 finite numbers"),
    (lambda p: p.update(position={"epoch": 1, "step": 1, "ranks": [_rank(samples=-4)]}),
     r"expected position.ranks\[0\].samples an integer >= 0"),
    (lambda p: p.update(position={"epoch": 1, "step": 1, "ranks": "all"}), r"expected position.ranks\[0\] a dict"),
    (lambda p: p["optimizer_state"]["state"][0].update(exp_avg=torch.zeros(3)),
     r"expected optimizer state 'exp_avg' of its parameter's shape"),
    (lambda p: p["optimizer_state"]["state"][0]["exp_avg_sq"].fill_(float("nan")),
     r"expected optimizer state 'exp_avg_sq' finite"),
    (lambda p: p["optimizer_state"]["param_groups"][0].update(weight_decay=3.0),
     r"expected optimizer_state param_groups\[0\].weight_decay 0.05"),
], ids=["epoch", "history-short", "history-type", "best-loss-nan", "rng-shape", "position-epoch", "step-negative",
        "step-huge", "sums", "samples", "ranks-type", "optimizer-shape", "optimizer-nan", "optimizer-decay"])
def test_resume_refuses_a_training_state_it_could_not_continue(one_epoch, tmp_path, change, message):
    out, config = one_epoch
    payload = load_checkpoint(out / "last.pt")
    change(payload)
    save_checkpoint(tmp_path / "last.pt", payload)
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(CheckpointError, match=message):
        Trainer(dataclasses.replace(config, out=str(tmp_path), resume=True))
    assert (tmp_path / "last.pt").read_bytes() == before


# ---- datasets -----------------------------------------------------------------------------------


def image_tree(root: Path, splits: dict[str, list[str]], per_class: int = 5) -> None:
    from PIL import Image

    for split, classes in splits.items():
        for label in classes:
            (root / split / label).mkdir(parents=True)
            for i in range(per_class):
                shade = 40 * ["ant", "bee", "cat"].index(label)
                Image.new("RGB", (8, 8), color=(shade, i, 0)).save(root / split / label / f"{i}.png")


def test_folder_test_split_missing_a_class_keeps_the_training_labels(tmp_path):
    image_tree(tmp_path, {"train": ["ant", "bee", "cat"], "test": ["bee", "cat"]})
    splits = load_dataset("folder", data_root=tmp_path, val_fraction=0.2)
    assert splits.class_names == ["ant", "bee", "cat"] and splits.num_classes == 3
    labels = sorted({int(y) for _, y in splits.test})
    assert labels == [1, 2]  # bee and cat, as in train (not 0 and 1)
    shade = {int(y): round(float(x[0, 0, 0]) * 0.5 * 255 + 0.5 * 255) for x, y in splits.test}
    assert shade == {1: 40, 2: 80}


def test_folder_test_split_with_a_class_the_model_never_saw(tmp_path):
    image_tree(tmp_path, {"train": ["ant", "bee"], "test": ["ant", "cat"]})
    with pytest.raises(DatasetError, match=r"has classes \['cat'\] that the train split does not; expected classes "
                                           r"among \['ant', 'bee'\]"):
        load_dataset("folder", data_root=tmp_path)


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("damage", ["truncated", "not-an-image"])
def test_folder_broken_image_fails_before_training_naming_the_file(tmp_path, split, damage):
    image_tree(tmp_path, {"train": ["ant", "bee"], "test": ["ant", "bee"]})
    victim = tmp_path / split / "bee" / "3.png"
    victim.write_bytes(victim.read_bytes()[:40] if damage == "truncated" else b"hello, not a picture")
    with pytest.raises(DatasetError, match=rf"cannot read image {victim}"):
        load_dataset("folder", data_root=tmp_path)


def test_folder_symlink_loop_is_refused(tmp_path):
    image_tree(tmp_path, {"train": ["ant", "bee"], "test": ["ant", "bee"]})
    os.symlink("..", tmp_path / "train" / "ant" / "loop")
    with pytest.raises(DatasetError, match=r"is reached twice, as .* \(a symlink loop or a linked copy\)"):
        load_dataset("folder", data_root=tmp_path)


def test_folder_truncated_jpeg_and_decompression_bomb_fail_when_the_dataset_loads(tmp_path):
    from PIL import Image

    image_tree(tmp_path, {"train": ["ant", "bee"], "test": ["ant", "bee"]})
    jpeg = tmp_path / "test" / "ant" / "cut.jpg"
    Image.new("RGB", (64, 64), (9, 9, 9)).save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])  # PIL's verify() passes it
    with pytest.raises(DatasetError, match=rf"cannot read image {jpeg}"):
        load_dataset("folder", data_root=tmp_path)
    jpeg.unlink()
    bomb = tmp_path / "train" / "bee" / "bomb.png"
    Image.new("1", (12_000, 12_000)).save(bomb)  # 144 M pixels in a few kB
    with pytest.raises(DatasetError, match=rf"cannot read image {bomb}: DecompressionBomb"):
        load_dataset("folder", data_root=tmp_path)


# ---- model API ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["compact", "mask", "sample"])
def test_input_of_another_dtype_is_a_type_error(mode):
    model = eefast.create_model("eenet8").eval()
    with pytest.raises(TypeError, match=r"expected input of dtype torch.float32 \(the model's.*got torch.float64"):
        model.predict(torch.randn(2, 1, 28, 28, dtype=torch.float64), mode=mode)
    with pytest.raises(TypeError, match="expected input of dtype torch.float32"):
        model.train().forward_all(torch.randn(2, 1, 28, 28, dtype=torch.float16))


def test_thresholds_for_fractions_hits_the_mix_between_adjacent_floats_and_says_when_it_cannot():
    torch.manual_seed(0)
    model = eefast.create_model("eenet8").eval()
    x = torch.randn(8, 1, 28, 28)
    base = torch.rand(2, 8) * 0.5 + 0.25
    base[0, 4] = torch.nextafter(base[0, 3], torch.tensor(1.0))  # adjacent float32 scores
    model.exit_scores = lambda output: base  # the scores the thresholds are fitted to
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for leave in range(9):
            t = model.thresholds_for_fractions(x, [leave / 8, 0.0])[0]
            assert int((base[0] >= t).sum()) == leave  # the comparison inference makes, in float32
    base[0] = 0.5  # every score ties: a threshold lets all out or none
    with pytest.warns(UserWarning, match=r"exit 0: 4 of 8 samples asked to leave, 8 do \(their scores tie"):
        model.thresholds_for_fractions(x, [0.5, 0.0])


@pytest.mark.parametrize("value, error, message", [
    ("11", TypeError, r"expected a threshold \(a number\) or one per early exit, got '11'"),
    (None, TypeError, r"expected a threshold \(a number\) or one per early exit, got None"),
    (float("nan"), ValueError, r"expected thresholds in \[0, 1\], got \[nan, nan\]"),
    ([0.2], ValueError, r"expected one threshold or 2 \(one per early exit\), got 1"),
])
def test_threshold_values(value, error, message):
    model = eefast.create_model("eenet8")
    with pytest.raises(error, match=message):
        model.threshold = value
    for accepted in (torch.tensor(0.25), __import__("numpy").float32(0.25), [0.25, 0.25]):
        model.threshold = accepted
        assert model.threshold == [0.25, 0.25]


def test_threshold_arrays_and_nan_scores():
    model = eefast.create_model("eenet8")
    for accepted in (torch.tensor([0.25, 0.25]), __import__("numpy").array([0.25, 0.25]), [torch.tensor(0.25)] * 2):
        model.threshold = accepted
        assert model.threshold == [0.25, 0.25]
    from eefast.eenet import _threshold_letting_out

    assert _threshold_letting_out(torch.tensor([0.2, 0.3, float("nan")]), 2) == pytest.approx(0.1)  # not below 0


def test_temperatures_are_checked_in_the_models_dtype():
    model = eefast.create_model("eenet8", policy="max_prob").half()
    for values in ([1e-8, 1e-8], [1e5, 1e5], [float("nan"), 1.0]):
        with pytest.raises(ValueError, match=r"expected 2 temperatures in \[0.01, 100.0\] \(in the model's "
                                             r"torch.float16\)"):
            model.set_exit_temperature(values)


def test_more_model_api_refusals():
    model = eefast.create_model("eenet8").eval()
    x = torch.randn(4, 1, 28, 28)
    with pytest.raises(ValueError, match=r"expected 2 fractions >= 0 summing to at most 1, got \[nan, 0.1\]"):
        model.thresholds_for_fractions(x, [float("nan"), 0.1])
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="got torch.float64"):
        model.predict(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.predict(x)  # float32 under autocast: fine
    block = model.exits[0]
    with pytest.raises(ValueError, match=r"exit_head: expected cls_bias of shape \[10\], got \[5\]"):
        eefast.ops.exit_head(torch.randn(2, 2, 28, 28), "pool", block.classifier.weight, torch.zeros(5),
                             block.confidence.weight, block.confidence.bias)
    assert eefast.ops.choose_impl("triton", torch.empty(2, device="meta")) == "reference"


def test_triton_impl_on_cpu_tensors_without_the_interpreter_says_how():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = "import torch, eefast\ntry:\n    eefast.ops.choose_impl('triton', torch.zeros(1))\nexcept ValueError as e:\n    print(e)"
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert "impl='triton' runs on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1" in result.stdout, result.stderr


# ---- command line -------------------------------------------------------------------------------

TRAIN = ["train", "--model", "eenet8", "--filters", "2", "--epochs", "1", "--quiet", "--no-plots"]


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], r"--epochs: expected an integer >= 1, got 0"),
    (["--batch-size", "0"], r"--batch-size: expected an integer >= 1, got 0"),
    (["--filters", "0"], r"--filters: expected an integer >= 1, got 0"),
    (["--lr", "-1"], r"--lr: expected a finite number > 0, got -1.0"),
    (["--lr", "nan"], r"--lr: expected a finite number > 0, got nan"),
    (["--budget", "nan"], r"--budget: expected a relative cost in \(0, 1\], got nan"),
    (["--budget", "1.5"], r"--budget: expected a relative cost in \(0, 1\], got 1.5"),
    (["--max-drop", "-2"], r"--max-drop: expected accuracy points in \[0, 100\], got -2.0"),
    (["--threshold", "0.5", "2"], r"--threshold: expected thresholds in \[0, 1\], got \[0.5, 2.0\]"),
    (["--val-fraction", "1"], r"--val-fraction: expected a number in \(0, 1\), got 1.0"),
    (["--patience", "0"], r"--patience: expected an integer >= 1, got 0"),
    (["--device", "gpu"], r"--device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["--device", "meta"], r"--device: expected auto, cpu, cuda or cuda:N, got 'meta'"),
    (["--device", "cuda:7"], r"--device cuda:7: (no CUDA device is visible here|expected a CUDA device index)"),
    (["--exits", "-1"], r"--exits: expected an integer >= 0, got -1"),
    (["--model", "resnet8", "--exits", "2"], r"resnet8 is a plain network without early exits; expected no "
                                             r"\['num_exits'\], got \{'num_exits': 2\}"),
    (["--dataset", "cifar10", "--data-root", "/nonexistent"], r"'cifar10' not found under /nonexistent"),
], ids=["epochs-0", "batch-0", "filters-0", "lr-negative", "lr-nan", "budget-nan", "budget-above-1", "max-drop",
        "threshold", "val-fraction", "patience-0", "device-name", "device-meta", "device-index", "exits",
        "plain-with-exits", "missing-dataset"])
def test_cli_values_are_checked_before_a_run_starts(capsys, tmp_path, args, message):
    out = tmp_path / "run"
    assert cli.main([*TRAIN, "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("eefast train: error: ")
    assert __import__("re").search(message, err), err
    assert not out.exists()  # nothing was written


def test_cli_output_path_is_checked_before_training(capsys, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    assert cli.main([*TRAIN, "--out", str(a_file)]) == 2
    assert f"--out {a_file}: expected a directory, found a file" in capsys.readouterr().err
    assert cli.main([*TRAIN, "--out", str(a_file / "run")]) == 2
    assert f"--out {a_file / 'run'}: cannot write there ({a_file} is a file)" in capsys.readouterr().err
    assert a_file.read_text() == "keep me"


def test_output_dirs_relative_current_and_lookalike_paths(tmp_path, monkeypatch):
    from eefast.train import check_output_dir

    monkeypatch.chdir(tmp_path)
    for path in (".", "runs/x", "sysroot/out", "processed"):  # none is under /proc or /sys
        check_output_dir(Path(path))
    assert not (tmp_path / "runs").exists()  # checked, not created
    with pytest.raises(ValueError, match="is not a writable directory"):
        check_output_dir(Path("/proc/eefast-run"))


def test_cli_profile_rejects_a_bad_input_shape(capsys):
    assert cli.main(["profile", "--model", "eenet8", "--input-shape", "0", "28", "28"]) == 2
    assert r"expected input_shape [C, H, W] of integers with 1 <= C <= 64" in capsys.readouterr().err


def test_unknown_eefast_impl_is_a_one_line_error():
    env = {**os.environ, "EEFAST_IMPL": "cuda-magic"}
    result = subprocess.run([sys.executable, "-m", "eefast", "profile", "--model", "eenet8"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("eefast profile: error: EEFAST_IMPL: expected one of ('auto', 'triton', "
                                     "'reference'), got 'cuda-magic'")


def test_nan_loss_before_any_checkpoint_says_none_was_written(tmp_path, monkeypatch):
    monkeypatch.setattr(eefast.EENetLoss, "terms", lambda self, output, target, costs: (
        output.logits.sum() * float("nan"), torch.zeros(()), torch.zeros(())))
    with pytest.raises(FloatingPointError, match="epoch 1, step 1; nothing of this step was applied, and no "
                                                 "checkpoint was written yet"):
        train(TrainConfig(**RUN, out=str(tmp_path)))
    assert not (tmp_path / "last.pt").exists()
