"""Checkpoints: written atomically, loaded with ``torch.load(weights_only=True)``, rebuildable.

A checkpoint is a dict of tensors and plain values: the format version, eefast's version, the
model's registry name and construction arguments (so ``eefast eval`` rebuilds it from the file
alone), its state, and, for training checkpoints, what ``--resume`` needs (optimizer state,
epoch, history, early-stopping state, RNG state, the run's configuration).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from eefast._version import __version__
from eefast.models import create_model

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a readable eefast checkpoint; the message says what is wrong."""


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Writes ``payload`` (plus format and eefast version) to ``path`` atomically: a temporary file
    in the same directory, flushed to disk, then renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT_VERSION, "eefast_version": __version__, **payload}
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Loads an eefast checkpoint without running any code from it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated, corrupted, or holding objects weights_only refuses
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {type(error).__name__}: {error}") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION or "model_state" not in payload:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{str(path)!r} is not an eefast checkpoint of format {FORMAT_VERSION} (found format {found!r})"
        )
    return payload


def model_from_checkpoint(payload: dict):
    """The model the checkpoint describes, with its weights and thresholds."""
    name, kwargs = payload["model_name"], dict(payload["model_kwargs"])
    if "input_shape" in kwargs:
        kwargs["input_shape"] = tuple(kwargs["input_shape"])
    model = create_model(name, **kwargs)
    try:
        apply_checkpoint(model, payload)
    except (RuntimeError, ValueError) as error:  # weights of another shape; a policy or rule that does not fit
        raise CheckpointError(f"checkpoint weights or exit rule do not fit model {name!r} {kwargs}: {error}") from error
    return model


def apply_checkpoint(model, payload: dict) -> None:
    """Loads the checkpoint's weights and its exit rule (policy, temperatures, thresholds) into
    ``model``. Checkpoints of eefast <= 0.1 carry no policy: theirs is the learned confidence."""
    model.load_state_dict(payload["model_state"])
    model.policy = payload.get("policy", "confidence")
    if payload.get("exit_temperature") is not None:
        model.set_exit_temperature(payload["exit_temperature"])
    if payload.get("threshold") is not None:
        model.threshold = payload["threshold"]
