"""Test setup shared by every test module.

Without a GPU, TRITON_INTERPRET=1 is set here, before any kernel module is imported, so Triton
kernels run on CPU tensors. Tests marked ``cuda`` skip without a GPU (../conftest.py). In CI (CI set in the environment) a
missing compiled extension is a failure, not a skip.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

IN_CI = bool(os.environ.get("CI"))


def require(condition: bool, reason: str) -> None:
    """Skips when ``condition`` is false, except in CI, where it fails."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture
def extension():
    """The compiled extension eefast._C (CI requires it)."""
    from eefast import _ext

    require(_ext.HAS_EXT, f"eefast._C is not built ({_ext.EXT_ERROR})")
    return _ext._C
