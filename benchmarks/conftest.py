"""Shared benchmark helpers: every result records the device, dtype, shapes and versions."""

from __future__ import annotations

import platform

import pytest
import torch


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


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
            **shapes,
        )

    return _record
