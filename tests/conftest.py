"""Test setup shared by every test module.

Without a GPU, TRITON_INTERPRET=1 is set here, before any kernel module is imported, so Triton
kernels run on CPU tensors. Tests marked ``cuda`` skip without a GPU (../conftest.py). In CI (CI set in the environment) a
missing compiled extension is a failure, not a skip.

torch.compile's caches do not notice a changed custom op (its fake kernel, the outputs it saves
for the backward): a cache from before the change fails in ways that have nothing to do with the
code. So each test run compiles into a cache of its own, unless TORCHINDUCTOR_CACHE_DIR is set.
"""

import os
import tempfile
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="eefast-inductor-"))

IN_CI = bool(os.environ.get("CI"))

# The measured long cases (tests/slow_tests.txt says the rule): marked slow, so that the README's
# pytest takes minutes; `pytest -m slow` (and .ci/run) runs them.
SLOW = {line.strip() for line in (Path(__file__).parent / "slow_tests.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid in SLOW:
            item.add_marker(pytest.mark.slow)


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
