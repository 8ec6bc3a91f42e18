"""Running an exported EENet (``eefast.export``) with ONNX Runtime: numpy and onnxruntime only.

This file imports nothing but the standard library, numpy and onnxruntime, and ``export_onnx``
copies it next to the programs, so a serving machine needs neither torch nor eefast:

    import deploy                      # from the export directory
    model = deploy.load("export/")
    logits, exit, cost = model.predict(x)   # x: float32 [B, C, H, W]

``predict`` is ``EENet.predict``'s rule (Algorithm 1) with compaction on the host: segment n runs
on the rows still running; those whose score reaches ``thresholds[n]`` (compared in float32; a NaN
score never does) leave with exit n's logits, the rest go on to segment n+1, and whoever is left
after the last early exit leaves at the final one. ``python deploy.py DIR x.npy`` prints each
sample's prediction, exit and cost.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

FORMAT_VERSION = 1  # the manifest version this file reads
MANIFEST = "manifest.json"


class Prediction(NamedTuple):
    """Each sample's prediction from the exit it took."""

    logits: np.ndarray  # [B, K] float32
    exit: np.ndarray  # [B] int64, 0..E-1
    cost: np.ndarray  # [B] float32, the relative cost costs[exit]


class ExportedEENet:
    """The programs and manifest of an export directory, one ``onnxruntime.InferenceSession`` per
    segment (``providers``: the CPU by default; ``session_options`` go to every session).
    ``thresholds`` ([E-1] float32, the manifest's) may be replaced to trade accuracy for cost."""

    FORMAT = "onnx"  # the manifest's format this class runs

    def __init__(self, directory: str | Path, providers=None, session_options=None):
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"deploy: expected an eefast export in {str(directory)!r}, found no {MANIFEST}")
        manifest = json.loads(path.read_text())
        given = (manifest.get("format_version"), manifest.get("format", "onnx"), manifest.get("dtype"))
        if given != (FORMAT_VERSION, self.FORMAT, "float32"):
            raise ValueError(f"deploy: expected a manifest of version {FORMAT_VERSION} for float32 {self.FORMAT} "
                             f"programs, got version {given[0]!r}, format {given[1]!r} and dtype {given[2]!r} in "
                             f"{str(path)!r}" + (" (eefast.export.ExportedProgramEENet runs those)"
                                                 if given[1] == "torch.export" else ""))
        self.manifest = manifest
        self.input_shape = tuple(manifest["input_shape"])  # (C, H, W)
        self.num_classes = int(manifest["num_classes"])
        self.num_exits = int(manifest["num_exits"])  # E
        self.thresholds = np.asarray(manifest["thresholds"], dtype=np.float32).reshape(-1)  # [E-1]
        self.costs = np.asarray(manifest["costs"], dtype=np.float32)  # [E]
        segments = manifest["segments"]
        if not (len(segments) == self.costs.size == self.num_exits == self.thresholds.size + 1):
            raise ValueError(f"deploy: expected {self.num_exits} segments, costs and {self.num_exits - 1} thresholds "
                             f"in {str(path)!r}, got {len(segments)}, {self.costs.size} and {self.thresholds.size}")
        self.sessions = [self._load(directory / segment["file"], segment, providers, session_options)
                         for segment in segments]

    def _load(self, path: Path, segment: dict, providers, session_options):
        """One segment's ONNX Runtime session (on the CPU unless ``providers`` say otherwise)."""
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"] if providers is None else list(providers)
        session = ort.InferenceSession(str(path), session_options, providers=providers)
        names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
        if names != (segment["inputs"], segment["outputs"]):
            raise ValueError(f"deploy: {segment['file']}: expected inputs {segment['inputs']} and outputs "
                             f"{segment['outputs']} (the manifest), the program has {names[0]} and {names[1]}")
        return session

    def check_input(self, x) -> np.ndarray:
        """``x`` as a C-contiguous array, or ValueError / TypeError naming the expected input."""
        if not isinstance(x, np.ndarray):
            raise TypeError(f"deploy: expected a numpy array, got {type(x).__name__}")
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"deploy: expected input of shape [B, {', '.join(map(str, self.input_shape))}] "
                             f"(the manifest's input_shape), got {list(x.shape)}")
        if x.dtype != np.float32:
            raise TypeError(f"deploy: expected input of dtype float32 (the programs'), got {x.dtype}")
        return np.ascontiguousarray(x)

    def run_segment(self, n: int, h: np.ndarray) -> list[np.ndarray]:
        """Segment n on the running rows: ``[h', score [M], logits [M, K]]``, the last ``[logits]``."""
        return self.sessions[n].run(None, {"h": h})

    def predict(self, x: np.ndarray) -> Prediction:
        """Early-exit inference on ``x`` [B, C, H, W] float32 (Algorithm 1, exited rows dropped)."""
        h = self.check_input(x)
        batch, final = h.shape[0], self.num_exits - 1
        logits = np.zeros((batch, self.num_classes), dtype=np.float32)
        exit_index = np.full(batch, final, dtype=np.int64)
        index = np.arange(batch)  # original positions of the running rows
        for n in range(final):
            if index.size == 0:  # everyone has left
                break
            h, score, exit_logits = self.run_segment(n, h)
            leave = score >= self.thresholds[n]  # float32 against float32; NaN: False
            logits[index[leave]] = exit_logits[leave]
            exit_index[index[leave]] = n
            stay = ~leave
            h, index = np.ascontiguousarray(h[stay]), index[stay]
        if index.size:
            logits[index] = self.run_segment(final, h)[0]
        return Prediction(logits, exit_index, self.costs[exit_index])

    __call__ = predict


def load(directory: str | Path, providers=None) -> ExportedEENet:
    """The export in ``directory``, ready to ``predict``."""
    return ExportedEENet(directory, providers)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="deploy.py", description="Early-exit predictions of an eefast export")
    parser.add_argument("directory", help="the export directory (manifest.json, segment_*.onnx)")
    parser.add_argument("input", help="a .npy file of float32 inputs [B, C, H, W]")
    args = parser.parse_args(argv)
    prediction = load(args.directory).predict(np.load(args.input))
    print("index\tprediction\texit\tcost")
    for i, (row, e, c) in enumerate(zip(prediction.logits, prediction.exit, prediction.cost)):
        print(f"{i}\t{int(row.argmax())}\t{int(e)}\t{float(c):.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
