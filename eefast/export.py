"""Export for deployment: one ONNX program per segment of an EENet, and a manifest to run them by.

Early-exit inference is a loop on the host: after each exit the rows that left are dropped and
the rest go on, so one static graph cannot hold it. ``export_onnx`` writes each segment (stage n
and exit n: ``EENet.segment``) as its own program, ``segment_0.onnx`` … ``segment_N.onnx``, with a
dynamic batch dimension and the spatial size fixed at ``model.input_shape``; ``manifest.json``
beside them holds what the loop needs (thresholds, costs, names, shapes), and ``deploy.py``, the
loop itself over ONNX Runtime (``eefast.deploy``, numpy and onnxruntime only), is copied next to
them, so a serving machine installs two packages and runs ``import deploy; deploy.load(DIR)``.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from eefast._version import __version__
from eefast.checkpoint import load_checkpoint, model_from_checkpoint
from eefast.deploy import ExportedEENet
from eefast.eenet import EENet

__all__ = ["EXPORT_FORMATS", "FORMAT_VERSION", "ExportedProgramEENet", "export_checkpoint", "export_onnx",
           "export_programs"]

FORMAT_VERSION = 1  # of the manifest; eefast.deploy reads this version
EXPORT_FORMATS = ("onnx", "torch.export")
SUFFIXES = {"onnx": ".onnx", "torch.export": ".pt2"}
MANIFEST = "manifest.json"
EARLY_OUTPUTS = ("h_next", "score", "logits")  # segments 0..N-1; the last one: ("logits",)


class _Segment(nn.Module):
    """``model.segment(n, h)`` as a module for the exporter."""

    def __init__(self, model: EENet, n: int):
        super().__init__()
        self.model, self.n = model, n

    def forward(self, h: Tensor) -> tuple[Tensor, ...]:
        return self.model.segment(self.n, h)


def _is_export_file(path: Path) -> bool:
    """A file an export writes (so overwriting it loses nothing else)."""
    return path.name in (MANIFEST, "deploy.py") or (path.name.startswith("segment_") and path.suffix in (".onnx", ".pt2"))


def _prepare_dir(out_dir: str | Path) -> Path:
    """``out_dir``, created if missing; an existing one must be empty or hold an earlier export only."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"export: expected a directory to write the export to, {str(out)!r} is a file")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if not (p.is_file() and _is_export_file(p)))
        if others:
            raise ValueError(f"export: expected {str(out)!r} to be empty or to hold an earlier export "
                             f"(manifest.json, segment_*.onnx, deploy.py), found {others[:5]}")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _cpu_float32_copy(model: EENet) -> EENet:
    """A CPU float32 copy in eval mode, on the reference exit heads; the caller's model is untouched."""
    skip = {id(model.segment_graphs): None, id(model.compaction_plan): None}  # CUDA graphs do not copy
    model = copy.deepcopy(model, memo=skip).to("cpu", torch.float32).eval()
    model.segment_graphs = model.compaction_plan = None
    for exit_block in model.exits:
        exit_block.impl = "reference"  # what ONNX can express (the Triton kernels are for CUDA tensors)
    return model


def _onnx_writer(opset: int | None):
    """Writes a segment as an ONNX program (the dynamo exporter) and checks it; returns its opsets."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter's translation library)
    except ImportError as error:
        raise ImportError(f"export_onnx: needs the onnx and onnxscript packages (pip install onnx onnxscript), "
                          f"got: {error}") from error

    def write(segment: nn.Module, h: Tensor, path: Path, outputs: list[str]) -> set[int]:
        # The dynamo exporter (torch.export) is the default and handles every policy; the TorchScript
        # one (dynamo=False) has no aten::special_entr (the entropy policy), so there is no fallback.
        torch.onnx.export(
            segment, (h,), path, input_names=["h"], output_names=outputs, opset_version=opset,
            dynamo=True, external_data=False, verbose=False,
            dynamic_shapes={"h": {0: torch.export.Dim.DYNAMIC}},  # the batch; C, H, W stay as traced
        )
        program = onnx.load(path)
        onnx.checker.check_model(program)
        names = ([i.name for i in program.graph.input], [o.name for o in program.graph.output])
        if names != (["h"], outputs):
            raise RuntimeError(f"export_onnx: {path.name}: expected inputs ['h'] and outputs {outputs}, "
                               f"the exporter wrote {names[0]} and {names[1]}")
        versions = {o.version for o in program.opset_import if o.domain in ("", "ai.onnx")}
        if opset is not None and versions != {opset}:  # the exporter keeps its own when converting down fails
            raise ValueError(f"export_onnx: expected opset {opset}, the exporter wrote {sorted(versions)} (it could "
                             f"not convert down to {opset}: ask for {min(versions)} or more, or None)")
        return versions

    return write, {"onnx_version": onnx.__version__}


def _program_writer(segment: nn.Module, h: Tensor, path: Path, outputs: list[str]) -> set[int]:
    """Writes a segment as a torch.export program (``torch.export.save``), its batch dynamic."""
    program = torch.export.export(segment, (h,), dynamic_shapes={"h": {0: torch.export.Dim.DYNAMIC}})
    torch.export.save(program, path)
    return set()


def export_onnx(model: EENet, out_dir: str | Path, *, opset: int | None = None, example_batch: int = 2) -> Path:
    """Writes ``segment_{n}.onnx`` for each segment of ``model``, ``manifest.json`` and ``deploy.py``
    to ``out_dir`` (created if missing); returns the directory. ``opset``: the exporter's default
    when None. ``example_batch`` (>= 2: the exporter specialises sizes 0 and 1) is the traced
    batch size; the programs take any."""
    write, versions = _onnx_writer(opset)
    return _export(model, out_dir, "onnx", write, versions, example_batch)


def export_programs(model: EENet, out_dir: str | Path, *, example_batch: int = 2) -> Path:
    """Writes each segment as a ``torch.export`` program, ``segment_{n}.pt2`` (for AOTInductor, or
    ``ExportedProgramEENet`` to run them), with the same manifest as ``export_onnx``."""
    return _export(model, out_dir, "torch.export", _program_writer, {}, example_batch)


def _export(model: EENet, out_dir: str | Path, format: str, write, versions: dict, example_batch: int) -> Path:
    """The segments of a CPU float32 copy of ``model``, each written by ``write``, then the manifest."""
    if not isinstance(model, EENet):
        raise TypeError(f"export: expected an eefast.EENet, got {type(model).__name__}")
    if isinstance(example_batch, bool) or not isinstance(example_batch, int) or example_batch < 2:
        raise ValueError(f"export: expected an integer example_batch >= 2, got {example_batch!r}")
    out = _prepare_dir(out_dir)
    (out / MANIFEST).unlink(missing_ok=True)  # an earlier export's: written again once the programs are
    model = _cpu_float32_copy(model)
    early = len(model.exits)
    h = torch.randn(example_batch, *model.input_shape, generator=torch.Generator().manual_seed(0))  # [b, C, H, W]
    segments, opsets = [], set()
    for n in range(early + 1):
        outputs = list(EARLY_OUTPUTS if n < early else ("logits",))
        path = out / f"segment_{n}{SUFFIXES[format]}"
        opsets |= write(_Segment(model, n).eval(), h, path, outputs)
        segments.append({"file": path.name, "inputs": ["h"], "outputs": outputs,
                         "input_shape": [None, *h.shape[1:]]})  # None: the dynamic batch
        if n < early:
            with torch.no_grad():
                h = model.segment(n, h)[0]
    written = {s["file"] for s in segments}
    for stale in [*out.glob("segment_*.onnx"), *out.glob("segment_*.pt2")]:  # an earlier export's other segments
        if stale.name not in written:
            stale.unlink()
    manifest = {
        "format_version": FORMAT_VERSION,
        "format": format,
        "eefast_version": __version__,
        "torch_version": torch.__version__,
        **versions,
        **({"opset": max(opsets)} if opsets else {}),
        "dtype": "float32",
        "input_shape": list(model.input_shape),  # [C, H, W]
        "num_classes": model.num_classes,
        "num_exits": model.num_exits,  # E: the early exits and the final one
        "exit_type": model.exit_type,
        "exit_positions": list(model.exit_positions),
        "policy": model.policy,
        "exit_temperature": model.exit_temperature.tolist(),  # already inside the programs' scores
        "thresholds": model.threshold,  # [E-1]: a row leaves at exit n when score >= thresholds[n]
        "costs": model.costs.tolist(),  # [E] relative cost of leaving at each exit
        "flops": [int(f) for f in model.flops],  # [E] FLOPs paid to leave at each exit
        "segments": segments,
    }
    if format == "onnx":
        shutil.copyfile(Path(__file__).with_name("deploy.py"), out / "deploy.py")
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # last: an export with a manifest is whole
    return out


class ExportedProgramEENet(ExportedEENet):
    """An export of ``export_programs``: ``deploy.ExportedEENet``'s loop over the torch.export programs."""

    FORMAT = "torch.export"

    def _load(self, path: Path, segment: dict, providers, session_options):
        return torch.export.load(path).module()

    def run_segment(self, n: int, h: np.ndarray) -> list[np.ndarray]:
        with torch.no_grad():
            return [t.numpy() for t in self.sessions[n](torch.from_numpy(h))]


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, format: str = "onnx") -> Path:
    """Exports the model of an eefast checkpoint file (weights, thresholds, exit rule) to ``out_dir``."""
    if format not in EXPORT_FORMATS:
        raise ValueError(f"export: expected a format in {EXPORT_FORMATS}, got {format!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():  # before loading anything
        raise ValueError(f"export: expected a directory to write the export to, {str(out)!r} is a file")
    model = model_from_checkpoint(load_checkpoint(checkpoint))
    return export_onnx(model, out) if format == "onnx" else export_programs(model, out)
