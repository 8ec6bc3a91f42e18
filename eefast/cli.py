"""The ``eefast`` command line (also ``python -m eefast``)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch

from eefast import _ext, ops, reference
from eefast._version import __version__


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eefast", description="Early-exit CNNs (EENets) for PyTorch, made fast.")
    parser.add_argument("--version", action="version", version=f"eefast {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info_parser = commands.add_parser("info", help="what is available: extension (CPU/CUDA), Triton, device")
    info_parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info_parser.set_defaults(run=info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
