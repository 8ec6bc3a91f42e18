"""Shared benchmark helpers: every result records the device, dtype, shapes and versions.

``EEFAST_BENCH_QUICK=1 pytest benchmarks/ --benchmark-disable`` runs every benchmark once on
small shapes, without timing anything that matters: CI runs it so the suite cannot rot.
``EEFAST_BENCH_CUDNN_BENCHMARK=1`` turns on ``torch.backends.cudnn.benchmark`` (cuDNN times its
convolution algorithms per shape and keeps the fastest); every result records the setting.
"""

from __future__ import annotations

import os
import platform

import pytest
import torch

QUICK = os.environ.get("EEFAST_BENCH_QUICK") == "1"
CUDNN_BENCHMARK = os.environ.get("EEFAST_BENCH_CUDNN_BENCHMARK") == "1"
torch.backends.cudnn.benchmark = CUDNN_BENCHMARK


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


@pytest.fixture
def record(benchmark):
    """record(device=..., dtype=..., **shapes) stores the run's context in extra_info."""
    import eefast

    def _record(device: str, dtype: torch.dtype, **shapes) -> None:
        benchmark.extra_info.update(
            device=device_name(device),
            dtype=str(dtype).removeprefix("torch."),
            torch=torch.__version__,
            eefast=eefast.__version__,
            extension=eefast.build_info(),
            cudnn_benchmark=torch.backends.cudnn.benchmark,
            **shapes,
        )

    return _record
