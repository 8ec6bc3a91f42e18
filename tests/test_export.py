"""Export for deployment: each segment's ONNX program computes what ``EENet.segment`` does, and
``eefast.deploy`` over them gives ``EENet.predict``'s exits, logits and costs, without torch."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import eefast
from eefast.checkpoint import save_checkpoint
from eefast.export import export_checkpoint, export_onnx

torchvision = pytest.importorskip("torchvision")
for _package in ("onnx", "onnxscript", "onnxruntime"):
    pytest.importorskip(_package)
from eefast import deploy  # noqa: E402  (after the onnxruntime skip)

BATCH = 20
FRACTIONS = {1: [0.5], 2: [0.3, 0.3]}  # per number of early exits: every exit gets some of the batch


def _settle_batch_norm(model: eefast.EENet, steps: int = 3) -> None:
    """Moves the running statistics away from (0, 1) with a few training-mode forwards."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(1.5 * torch.randn(8, *model.input_shape) + 0.3)
    model.eval()


def _sequential() -> eefast.EENet:
    """An nn.Sequential backbone (each child a block, the last the classifier) with plain exits,
    which flatten a fixed-size feature map."""
    def block(cin, cout, act, **kw):
        return torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False, **kw),
                                   torch.nn.BatchNorm2d(cout), act())
    backbone = torch.nn.Sequential(
        block(3, 8, torch.nn.ReLU), block(8, 8, torch.nn.Hardswish, groups=4), torch.nn.MaxPool2d(2),
        block(8, 16, torch.nn.SiLU), block(16, 16, torch.nn.ReLU6),
        torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10)))
    return eefast.EENet.from_backbone(backbone, num_exits=1, exit_type="plain", input_shape=(3, 16, 16))


# name: (build, policy, exit temperatures, through a checkpoint file)
CASES = {
    "eenet8-confidence": (lambda: eefast.create_model("eenet8", filters=3, exit_type="bnpool"), "confidence", None, False),
    "eenet8-max_prob": (lambda: eefast.create_model("eenet8", filters=3, num_exits=1), "max_prob", [0.5], False),
    "eenet8-entropy": (lambda: eefast.create_model("eenet8", filters=3, exit_type="bnpool"), "entropy", [0.7, 1.5], True),
    "resnet8": (lambda: eefast.create_model("resnet8", filters=2), "confidence", None, False),  # no early exits
    "sequential-plain": (_sequential, "entropy", [1.2], False),
    "resnet18": (lambda: eefast.EENet.from_backbone(torchvision.models.resnet18(num_classes=10), num_exits=1,
                                                    input_shape=(3, 32, 32)), "confidence", None, False),
    "mobilenet_v3_small": (lambda: eefast.EENet.from_backbone(torchvision.models.mobilenet_v3_small(num_classes=10),
                                                              num_exits=2, input_shape=(3, 64, 64)),
                           "max_prob", [0.8, 1.3], False),
}
# Exporting takes 1-2 s a segment (torch.export, then the translation): the default run keeps to
# 13 segments, under a minute on two shared cores; MobileNetV3's three take ~20 s.
SLOW_CASES = {"mobilenet_v3_small"}


def _checkpoint_payload(model: eefast.EENet) -> dict:
    return {"model_name": "eenet8", "model_kwargs": {"filters": 3, "exit_type": "bnpool"},
            "model_state": model.state_dict(), "threshold": model.threshold, "policy": model.policy,
            "exit_temperature": model.exit_temperature.tolist()}


def _export_case(name: str, root: Path):
    """(model in eval mode, inputs x [BATCH, C, H, W], export directory, ExportedEENet)."""
    build, policy, temperatures, via_checkpoint = CASES[name]
    torch.manual_seed(0)
    model = build()
    model.policy = policy
    if temperatures:
        model.set_exit_temperature(temperatures)
    _settle_batch_norm(model)
    x = torch.randn(BATCH, *model.input_shape)
    if model.exits:
        model.threshold = model.thresholds_for_fractions(x, FRACTIONS[len(model.exits)])
    out = root / name
    if via_checkpoint:  # into an earlier export with more segments: it is replaced, stale programs removed
        out.mkdir()
        for stale in ("segment_0.onnx", "segment_3.onnx", "manifest.json", "deploy.py"):
            (out / stale).write_text("an earlier export")
        save_checkpoint(root / f"{name}.pt", _checkpoint_payload(model))
        assert export_checkpoint(root / f"{name}.pt", out, format="onnx") == out
        assert sorted(p.name for p in out.iterdir()) == ["deploy.py", "manifest.json", *(
            f"segment_{n}.onnx" for n in range(model.num_exits))]
    else:
        model.train()  # exporting leaves the caller's model as it was: its mode and its statistics
        before = {k: v.clone() for k, v in model.state_dict().items()}
        assert export_onnx(model, out) == out
        assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        model.eval()
    return model, x, out, deploy.ExportedEENet(out)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """``exports(name)``: the case's export, made on first use."""
    root, made = tmp_path_factory.mktemp("exports"), {}

    def get(name: str):
        if name not in made:
            made[name] = _export_case(name, root)
        return made[name]

    return get


@pytest.fixture(scope="module", params=[pytest.param(name, marks=[pytest.mark.slow] if name in SLOW_CASES else [])
                                        for name in CASES])
def case(request, exports):
    return exports(request.param)


def _assert_same_prediction(got: deploy.Prediction, want: eefast.Prediction) -> None:
    assert got.logits.dtype == np.float32 and got.exit.dtype == np.int64
    np.testing.assert_array_equal(got.exit, want.exit.numpy())
    np.testing.assert_allclose(got.logits, want.logits.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_array_equal(got.cost, want.cost.numpy())


def test_predict_matches_eenet_predict(case):
    model, x, out, exported = case
    want = model.predict(x)
    assert np.bincount(want.exit.numpy(), minlength=model.num_exits).min() > 0  # every exit takes some rows
    _assert_same_prediction(exported.predict(x.numpy()), want)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["policy"] == model.policy and manifest["thresholds"] == model.threshold
    assert manifest["costs"] == model.costs.tolist() and manifest["input_shape"] == list(model.input_shape)
    assert manifest["num_classes"] == model.num_classes and manifest["exit_positions"] == model.exit_positions
    assert manifest["eefast_version"] == eefast.__version__ and manifest["dtype"] == "float32"
    assert [s["file"] for s in manifest["segments"]] == [f"segment_{n}.onnx" for n in range(model.num_exits)]


def test_torch_export_programs_give_predicts_exits(case, tmp_path):
    """The second format: torch.export programs (.pt2) with the same manifest, run by the same loop."""
    from eefast.export import ExportedProgramEENet, export_programs

    model, x, out, _ = case
    programs = ExportedProgramEENet(export_programs(model, tmp_path / "pt2"))
    assert programs.manifest["format"] == "torch.export" and not (tmp_path / "pt2" / "deploy.py").exists()
    for rows in (x, x[:1], x[:0]):
        _assert_same_prediction(programs.predict(rows.numpy()), model.predict(rows))
    with pytest.raises(ValueError, match="format 'torch.export'.*eefast.export.ExportedProgramEENet runs those"):
        deploy.ExportedEENet(tmp_path / "pt2")


def test_each_segment_matches_eenet_segment(case):
    model, x, _, exported = case
    h = x
    with torch.no_grad():
        for n in range(model.num_exits):
            want = model.segment(n, h)
            got = exported.run_segment(n, h.numpy())
            assert len(got) == len(want) == (3 if n < len(model.exits) else 1)
            for g, w in zip(got, want):
                np.testing.assert_allclose(g, w.numpy(), rtol=0, atol=1e-4)
            h = want[0]


def test_batches_of_zero_and_one_rows(case):
    model, x, _, exported = case
    for rows in (x[:1], x[BATCH - 1 :]):
        _assert_same_prediction(exported.predict(rows.numpy()), model.predict(rows))
    empty = exported.predict(x[:0].numpy())
    assert empty.logits.shape == (0, model.num_classes) and empty.exit.shape == empty.cost.shape == (0,)
    assert (empty.logits.dtype, empty.exit.dtype, empty.cost.dtype) == (np.float32, np.int64, np.float32)
    _assert_same_prediction(empty, model.predict(x[:0]))
    for n in range(model.num_exits):  # and ONNX Runtime runs each program on 0 rows
        h = np.zeros((0, *exported.manifest["segments"][n]["input_shape"][1:]), np.float32)
        assert all(out.shape[0] == 0 for out in exported.run_segment(n, h))


def test_nan_scores_never_exit(case):
    model, x, _, exported = case
    rows = x[:4].clone()
    rows[1] = float("nan")
    got, want = exported.predict(rows.numpy()), model.predict(rows)
    np.testing.assert_array_equal(got.exit, want.exit.numpy())
    assert got.exit[1] == model.num_exits - 1


def test_deploy_imports_only_numpy_onnxruntime_and_the_standard_library():
    tree = ast.parse(Path(deploy.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "deploy.py is copied out of the package: no relative imports"
            imported.add(node.module.split(".")[0])
    assert imported - set(sys.stdlib_module_names) == {"numpy", "onnxruntime"}


TORCH_FREE = """
import sys
sys.modules["torch"] = sys.modules["eefast"] = None  # importing either now fails
sys.path.insert(0, sys.argv[1])
import numpy as np
import deploy
model = deploy.load(sys.argv[1])
prediction = model.predict(np.load(sys.argv[2]))
np.savez(sys.argv[3], **prediction._asdict())
deploy.main([sys.argv[1], sys.argv[2]])
assert sys.modules["torch"] is None and sys.modules["eefast"] is None
"""


def test_an_export_runs_without_torch_from_a_copy_of_its_directory(exports, tmp_path):
    model, x, out, _ = exports("eenet8-entropy")  # the export of a checkpoint file
    copied = shutil.copytree(out, tmp_path / "served")
    np.save(tmp_path / "x.npy", x.numpy())
    result = subprocess.run([sys.executable, "-c", TORCH_FREE, str(copied), str(tmp_path / "x.npy"),
                             str(tmp_path / "out.npz")], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    with np.load(tmp_path / "out.npz") as saved:
        _assert_same_prediction(deploy.Prediction(saved["logits"], saved["exit"], saved["cost"]), model.predict(x))
    lines = result.stdout.splitlines()
    assert lines[0].split("\t") == ["index", "prediction", "exit", "cost"] and len(lines) == BATCH + 1
    want = model.predict(x)
    assert [int(line.split("\t")[2]) for line in lines[1:]] == want.exit.tolist()


def test_deploy_input_errors(exports):
    model, x, out, exported = exports("resnet8")
    shape = ", ".join(map(str, model.input_shape))
    with pytest.raises(ValueError, match=rf"expected input of shape \[B, {shape}\].*got \[2, 1, 14, 14\]"):
        exported.predict(np.zeros((2, 1, 14, 14), np.float32))
    with pytest.raises(ValueError, match=r"got \[1, 28, 28\]"):
        exported.predict(np.zeros(model.input_shape, np.float32))
    with pytest.raises(TypeError, match="expected input of dtype float32.*got float64"):
        exported.predict(x.double().numpy())
    with pytest.raises(TypeError, match="expected a numpy array, got Tensor"):
        exported.predict(x)
    with pytest.raises(FileNotFoundError, match="found no manifest.json"):
        deploy.load(out.parent)


def test_export_errors(exports, tmp_path):
    model, _, out, _ = exports("resnet8")
    with pytest.raises(ValueError, match=r"expected a format in \('onnx', 'torch.export'\), got 'tflite'"):
        export_checkpoint(tmp_path / "model.pt", tmp_path / "out", format="tflite")
    (tmp_path / "file").write_text("")
    for export in (lambda: export_onnx(model, tmp_path / "file"),
                   lambda: export_checkpoint(tmp_path / "model.pt", tmp_path / "file")):
        with pytest.raises(ValueError, match="expected a directory to write the export to, .* is a file"):
            export()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"to be empty or to hold an earlier export .*found \['notes.txt'\]"):
        export_onnx(model, tmp_path / "data")
    with pytest.raises(ValueError, match="expected an integer example_batch >= 2, got 1"):
        export_onnx(model, tmp_path / "out", example_batch=1)
    with pytest.raises(TypeError, match="expected an eefast.EENet, got Linear"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "out")
    with pytest.raises(ValueError, match="does not exist"):  # eefast.checkpoint's CheckpointError
        export_checkpoint(tmp_path / "missing.pt", tmp_path / "out")
