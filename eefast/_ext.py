"""Loads the compiled extension ``eefast._C`` and says what it provides.

``import eefast`` never fails for lack of it: ``HAS_EXT`` is False, ``EXT_ERROR`` says why, and
the ops fall back to plain PyTorch, warning once. ``EEFAST_NO_EXT=1`` in the environment skips
loading it (useful to compare against the fallback, or to load a CMake build of the same ops).
"""

from __future__ import annotations

import os
import warnings

import torch

_C = None
EXT_ERROR: str | None = None

if os.environ.get("EEFAST_NO_EXT", "").strip().lower() in {"1", "true", "yes", "on"}:
    EXT_ERROR = "not loaded: EEFAST_NO_EXT is set"
else:
    try:
        from eefast import _C  # noqa: F811  (registers torch.ops.eefast.*)
    except ImportError as error:  # not built (EEFAST_NO_EXT=1 at install) or built for another torch
        EXT_ERROR = f"{type(error).__name__}: {error}"

HAS_EXT = _C is not None
_warned: set[str] = set()


def build_info() -> dict:
    """How eefast._C was built (CUDA compiled in, CUDA version and archs, torch version)."""
    if _C is None:
        return {"loaded": False, "error": EXT_ERROR}
    return {"loaded": True, **_C.build_info()}


def has_kernel(op: str, device_type: str) -> bool:
    """Whether ``torch.ops.eefast.<op>`` has a compiled kernel for ``device_type`` ('cpu', 'cuda')."""
    if _C is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"eefast::{op}", device_type.upper())


def warn_fallback_once(op: str, device_type: str) -> None:
    """Warns, once per op and device, that the plain-PyTorch fallback runs instead of eefast._C."""
    key = f"{op}:{device_type}"
    if key in _warned:
        return
    _warned.add(key)
    reason = EXT_ERROR or f"it has no {device_type} kernel (built without CUDA?)"
    warnings.warn(
        f"eefast: the compiled op eefast::{op} is unavailable on {device_type} ({reason}); "
        "using the plain-PyTorch fallback, which gives the same results more slowly. "
        "`eefast info` says what is installed.",
        RuntimeWarning,
        stacklevel=3,
    )
