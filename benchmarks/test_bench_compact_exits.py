"""compact_exits: the compiled op (C++ CPU, CUDA) against plain PyTorch boolean indexing.

    pytest benchmarks/test_bench_compact_exits.py --benchmark-only --benchmark-json benchmarks/results/<device>.json
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import QUICK
from eefast import _ext, reference
from eefast.timing import synchronize

FEATURES = (16, 32, 32)  # an EENet-110 stage-1 feature map
CLASSES = 10
EXIT_FRACTION = 0.5

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]


def make_batch(batch: int, dtype: torch.dtype, device: str):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *FEATURES, generator=g).to(device, dtype)
    logits = torch.randn(batch, CLASSES, generator=g).to(device, dtype)
    confidence = torch.rand(batch, generator=g).to(device)
    index = torch.arange(batch, device=device)
    out_logits = torch.zeros(batch, CLASSES, dtype=dtype, device=device)
    out_exit = torch.full((batch,), -1, dtype=torch.int64, device=device)
    return x, logits, confidence, index, 1.0 - EXIT_FRACTION, 0, out_logits, out_exit


IMPLS = {
    "compiled": lambda *a: torch.ops.eefast.compact_exits(*a),
    "padded": lambda *a: torch.ops.eefast.compact_exits_padded(*a),
    "indexing": reference.compact_exits,
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("batch", [32] if QUICK else [32, 256, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_compact_exits(benchmark, record, device, dtype, batch, impl):
    if impl != "indexing" and not _ext.has_kernel("compact_exits", device):
        pytest.skip(f"eefast._C has no {device} kernel")
    args = make_batch(batch, dtype, device)
    fn = IMPLS[impl]
    benchmark.group = f"compact_exits {device} {str(dtype).removeprefix('torch.')} batch {batch}"
    record(device, dtype, batch=batch, features=list(FEATURES), classes=CLASSES, exit_fraction=EXIT_FRACTION, impl=impl)

    def step():
        fn(*args)
        synchronize(device)

    benchmark(step)
