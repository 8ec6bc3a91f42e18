"""The package: imports anywhere, says what it has, and the CMake build of the same ops loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

import eefast
from eefast import _ext
from tests.conftest import require

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env}, timeout=300
    )


def test_build_info(extension):
    info = eefast.build_info()
    assert info["loaded"] is True
    assert info["torch_version"] == torch.__version__.split("+")[0]
    if info["cuda"]:
        assert info["cuda_version"] and info["cuda_archs"]


def test_import_without_extension_falls_back_and_warns_once():
    code = """
import warnings, torch, eefast
assert not eefast.HAS_EXT and "EEFAST_NO_EXT" in eefast._ext.EXT_ERROR
x, logits, h, idx = torch.randn(6, 4), torch.randn(6, 3), torch.tensor([0.9, 0.1, 0.5, 0.2, 0.7, 0.3]), torch.arange(6)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
        out_logits, out_exit = torch.zeros(6, 3), torch.full((6,), -1)
        kept, kept_idx = eefast.compact_exits(x, logits, h, idx, 0.5, 0, out_logits, out_exit)
messages = [str(w.message) for w in caught if "fallback" in str(w.message)]
assert len(messages) == 1, messages
assert kept_idx.tolist() == [1, 3, 5] and out_exit.tolist() == [0, -1, 0, -1, 0, -1]
print("ok")
"""
    result = run_python(code, EEFAST_NO_EXT="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_info_command():
    result = subprocess.run(
        [sys.executable, "-m", "eefast", "info", "--json"], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["eefast"] == eefast.__version__
    assert report["self_check"].startswith("ok")
    assert report["extension"]["loaded"] == _ext.HAS_EXT
    assert set(report["compiled_kernels"]) == {"compact_exits", "compact_exits_padded"}
    if report["triton"]["installed"] and os.environ.get("TRITON_INTERPRET") == "1":
        assert report["triton"]["mode"].startswith("interpreter")

    text = subprocess.run([sys.executable, "-m", "eefast", "info"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert text.returncode == 0, text.stderr
    for heading in ("extension", "triton", "device", "self-check"):
        assert heading in text.stdout


def test_cmake_library_loads_and_matches_reference():
    """CI builds CMakeLists.txt into build/cmake; the library registers the same ops."""
    library = Path(os.environ.get("EEFAST_CMAKE_LIB", ROOT / "build" / "cmake" / "libeefast_ops.so"))
    require(library.exists(), f"the CMake build is missing ({library}); see .ci/run")
    code = f"""
import torch
torch.ops.load_library({str(library)!r})
from eefast import reference, _ext
assert not _ext.HAS_EXT  # eefast._C not loaded: the ops below come from the CMake library
dump = torch._C._dispatch_dump("eefast::compact_exits")
assert "CPU: registered" in dump, dump
g = torch.Generator().manual_seed(0)
x, logits, h = torch.randn(9, 2, 3, 3, generator=g), torch.randn(9, 5, generator=g), torch.rand(9, generator=g)
idx = torch.randperm(12, generator=g)[:9]
results = []
for fn in (torch.ops.eefast.compact_exits, reference.compact_exits):
    out_logits, out_exit = torch.zeros(12, 5), torch.full((12,), -1)
    results.append((*fn(x, logits, h, idx, 0.5, 3, out_logits, out_exit), out_logits, out_exit))
assert all(torch.equal(a, b) for a, b in zip(*results))
print("CUDA" if "CUDA: registered" in dump else "CPU")
"""
    result = run_python(code, EEFAST_NO_EXT="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in {"CPU", "CUDA"}


def test_readme_python_examples_run(tmp_path, monkeypatch):
    """Every Python example of the README runs as written (in an empty directory)."""
    readme = (ROOT / "README.md").read_text()
    blocks = [textwrap.dedent(part.split("```", 1)[0]) for part in readme.split("```python\n")[1:]]
    assert len(blocks) == 5
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "deploy", raising=False)
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, "README.md", "exec"), namespace)
        if "export_onnx" in block:  # ONNX Runtime's exits are predict's, its logits within 1e-4
            served, want = namespace["served_prediction"], namespace["torch_prediction"]
            assert np.array_equal(served.exit, want.exit.numpy()) and len(set(served.exit.tolist())) > 1
            np.testing.assert_allclose(served.logits, want.logits.numpy(), rtol=0, atol=1e-4)
            sys.modules.pop("deploy")
        elif "EENetStream" in block:
            want = namespace["model"].predict(namespace["images"]).exit
            assert torch.equal(torch.cat([p.exit for p in namespace["predictions"]]), want)
        elif "compact_exits" in block:
            kept = namespace["confidence"] < 0.5
            assert torch.equal(namespace["index"], torch.arange(8)[kept])
            assert torch.equal(namespace["out_exit"] == 0, ~kept)
        elif "from_backbone" in block:  # the network's own blocks and classifier, its weights shared
            model, backbone = namespace["model"], namespace["backbone"]
            assert model.classifier[-1] is backbone.classifier and len(model.exits) == 2
            assert namespace["prediction"].exit.shape == (4,) and len(namespace["small"].exits) == 1
            assert len(namespace["timm_model"].exits) == 2
        else:
            assert torch.equal(namespace["pred"].exit, namespace["same"].exit)
            assert namespace["model"].exit_positions == [1, 4]


def test_readme_pretrained_backbone_commands_run(tmp_path):
    """The README's frozen-backbone and export commands run as written, from weights saved where
    they say (``mobilenet.pth``, here random: what is tested is the job, not the accuracy)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("**Training on a pretrained backbone.**", 1)[1]
    commands = section.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert [c.split()[:2] for c in commands] == [["eefast", "train"], ["eefast", "export"]]
    torch.manual_seed(0)
    import torchvision

    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), tmp_path / "mobilenet.pth")
    for command in commands:
        result = subprocess.run([sys.executable, "-m", "eefast", *command.split()[1:], *(
            ["--quiet", "--no-plots"] if command.split()[1] == "train" else [])], capture_output=True, text=True,
            cwd=tmp_path, timeout=900)
        assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "runs/mobilenet/onnx/manifest.json").read_text())
    assert len(manifest["segments"]) == 4 and (tmp_path / "runs/mobilenet/onnx/deploy.py").is_file()


def setup_py(*args: str, **env: str) -> subprocess.CompletedProcess:
    """setup.py with the given knobs alone (CI exports EEFAST_FORCE_CUDA=1 for its own build)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("EEFAST_")}
    return subprocess.run(
        [sys.executable, "setup.py", *args], capture_output=True, text=True, cwd=ROOT, env={**base, **env}, timeout=300
    )


def test_build_knobs_print_the_configuration():
    no_ext = setup_py("--name", EEFAST_NO_EXT="1")
    assert no_ext.returncode == 0 and "pure-Python install" in no_ext.stderr

    cpu_only = setup_py("--name", EEFAST_NO_CUDA="1")
    assert cpu_only.returncode == 0 and "extension: CPU only" in cpu_only.stderr
    assert f"torch {torch.__version__}" in cpu_only.stderr

    forced = setup_py("--name", EEFAST_NO_CUDA="1", EEFAST_FORCE_CUDA="1")
    assert forced.returncode != 0
    assert "EEFAST_FORCE_CUDA=1 but the CUDA extension cannot be built" in forced.stderr


def test_default_cuda_archs_without_a_gpu():
    require(torch.version.cuda is not None, "needs a CUDA build of torch")
    result = setup_py("--name", TORCH_CUDA_ARCH_LIST="")
    assert result.returncode == 0, result.stderr
    if "extension: CUDA + CPU" in result.stderr and not torch.cuda.is_available():
        assert "archs 8.0;9.0+PTX" in result.stderr


def test_cpu_kernels_are_built_with_openmp(extension):
    """at::parallel_for is an OpenMP pragma compiled into our own code: without -fopenmp the CPU
    op runs on one thread (it did, 1.7x slower than boolean indexing at batch 1024)."""
    result = subprocess.run(["ldd", extension.__file__], capture_output=True, text=True)
    assert "libgomp" in result.stdout, result.stdout
