"""Checkpoints: written atomically, loaded with ``torch.load(weights_only=True)``, rebuildable.

A checkpoint is a dict of tensors and plain values: the format version, eefast's version, the
model's registry name and construction arguments (so ``eefast eval`` rebuilds it from the file
alone), its state, and, for training checkpoints, what ``--resume`` needs (optimizer state,
epoch, history, early-stopping state, RNG state, the run's configuration).
"""

from __future__ import annotations

import math
import os
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from eefast._version import __version__
from eefast.models import create_model
from eefast.models.registry import check_model_args

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


def verify_archive(path: Path) -> None:
    """Checks every member of the checkpoint's zip archive against the CRC-32 stored with it
    (``torch.load`` does not, so damaged tensor bytes would load as changed weights)."""
    try:
        with zipfile.ZipFile(path) as archive:
            # torch.save stores its members uncompressed: the file's size bounds what loading allocates
            packed = [m.filename for m in archive.infolist() if m.compress_type != zipfile.ZIP_STORED]
            if packed:
                raise CheckpointError(f"checkpoint {str(path)!r}: expected the uncompressed members torch.save "
                                      f"writes, got {packed[0]!r} compressed")
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {type(error).__name__}: {error}") from error
    if damaged is not None:
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged: the bytes of {damaged!r} do not match "
                              "the checksum stored with them")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Loads an eefast checkpoint without running any code from it, after verifying its checksums
    and the types of the fields every checkpoint has (``check_payload``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    verify_archive(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # corrupted, or holding objects weights_only refuses
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {type(error).__name__}: {error}") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{str(path)!r} is not an eefast checkpoint of format {FORMAT_VERSION} (found format {found!r})"
        )
    check_payload(payload, str(path))
    return payload


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numbers(value) -> bool:
    """A number, a list of numbers or a 1-d floating tensor (thresholds, temperatures)."""
    if isinstance(value, torch.Tensor):
        return value.dim() <= 1 and value.is_floating_point()
    return _is_number(value) or (isinstance(value, (list, tuple)) and all(_is_number(v) for v in value))


# The fields of every checkpoint (required ones first), and what each must be.
MODEL_FIELDS: dict[str, tuple[bool, str, Callable[[object], bool]]] = {
    "model_name": (True, "a string", lambda v: isinstance(v, str)),
    "model_kwargs": (True, "a dict of named arguments", lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v)),
    "model_state": (True, "a dict of tensors", lambda v: isinstance(v, dict) and all(
        isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items())),
    "threshold": (False, "a number or a list of numbers", lambda v: v is None or _numbers(v)),
    "policy": (False, "a string", lambda v: v is None or isinstance(v, str)),
    "exit_temperature": (False, "a list of numbers", lambda v: v is None or _numbers(v)),
    "config": (False, "a dict (the run's settings)", lambda v: v is None or isinstance(v, dict)),
}
# What --resume reads besides (eefast.train), and what each must be.
TRAINING_FIELDS: dict[str, tuple[bool, str, Callable[[object], bool]]] = {
    "config": (True, "a dict (the run's settings)", lambda v: isinstance(v, dict)),
    "optimizer_state": (True, "a dict", lambda v: isinstance(v, dict)),
    "epoch": (True, "an integer >= -1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= -1),
    "history": (True, "a list", lambda v: isinstance(v, list)),
    "best_loss": (True, "a number", _is_number),
    "stale_epochs": (True, "an integer >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
    "rng_state": (True, "a uint8 tensor", lambda v: isinstance(v, torch.Tensor) and v.dtype == torch.uint8),
    "position": (False, "a dict", lambda v: v is None or isinstance(v, dict)),
}


def check_payload(payload: dict, where: str = "checkpoint", fields=MODEL_FIELDS) -> None:
    """Raises CheckpointError naming the first field that is missing or of the wrong kind."""
    for key, (required, expected, valid) in fields.items():
        if key not in payload:
            if required:
                raise CheckpointError(f"{where}: expected a field {key!r} ({expected}), found none")
            continue
        if not valid(payload[key]):
            raise CheckpointError(f"{where}: expected field {key!r} to be {expected}, got {type(payload[key]).__name__}")


# What a checkpoint's model may allocate: its parameters, and the largest feature map of one sample
# (the FLOP profile runs one; a training batch holds many).
MAX_PARAMETERS = 1 << 30
MAX_FEATURE_ELEMENTS = 1 << 27  # 512 MB in float32; an ImageNet ResNet's largest is 64 x 112 x 112 (0.8 M)


def check_model_size(name: str, kwargs: dict) -> None:
    """Builds the model on the meta device (no memory, no compute) and raises CheckpointError when
    its parameters or one sample's largest feature map pass the limits above."""
    with torch.device("meta"):
        model = create_model(name, **kwargs)
    parameters = sum(p.numel() for p in model.parameters())
    features = max(math.prod(shape) for shape in model.profile.boundary_shapes)
    for what, value, limit in (("parameters", parameters, MAX_PARAMETERS),
                               ("elements in one sample's largest feature map", features, MAX_FEATURE_ELEMENTS)):
        if value > limit:
            raise CheckpointError(f"checkpoint asks for model {name!r} {kwargs} with {value:,} {what}; expected at "
                                  f"most {limit:,}")


def model_from_checkpoint(payload: dict):
    """The model the checkpoint describes, with its weights and thresholds. Its construction
    arguments are checked (types, ranges, size) before anything is allocated."""
    check_payload(payload)
    name, kwargs = payload["model_name"], dict(payload["model_kwargs"])
    if "weights" in kwargs:  # a file's own state is the model: it never names files to read or fetch
        raise CheckpointError(f"checkpoint's model {name!r}: expected no 'weights' among its arguments (its "
                              f"model_state holds them), got weights={kwargs['weights']!r}")
    if isinstance(kwargs.get("input_shape"), list):
        kwargs["input_shape"] = tuple(kwargs["input_shape"])
    try:
        check_model_args(name, kwargs)
        check_model_size(name, kwargs)
        model = create_model(name, **kwargs)
    except (ValueError, TypeError) as error:  # CheckpointError is a ValueError: it passes through unchanged
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint's model {name!r} {kwargs} cannot be built: {error}") from error
    try:
        apply_checkpoint(model, payload)
    except (RuntimeError, ValueError, TypeError) as error:  # weights of another shape; a rule that does not fit
        detail = " ".join(str(error).split())  # load_state_dict's report is many lines: one, and not too long
        detail = detail if len(detail) <= 600 else detail[:600] + " ..."
        raise CheckpointError(f"checkpoint weights or exit rule do not fit model {name!r} {kwargs}: {detail}") from error
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
