"""When compaction pays: ``compact`` mode compacting at every exit, at none, and where the plan says.

    pytest benchmarks/test_bench_compaction.py --benchmark-only --benchmark-json benchmarks/results/cpu-compaction.json
    python -m eefast.bench benchmarks/results/cpu-compaction.json

The plan (``EENet.plan_compaction``) is measured once per model on the calibration batch (the
50/25/15/10 mix of benchmarks/workloads.py) and then decides for each batch size. Each result's
extra_info holds the decisions, the plan's predicted time for this policy and for the others, and
the plan's tables, so a run shows both when compaction pays and how well the cost model predicts it.
"""

from __future__ import annotations

import functools

import pytest
import torch

from benchmarks.conftest import QUICK
from benchmarks.workloads import controlled_mix
from eefast.compaction import measure_compaction
from eefast.timing import synchronize

POLICIES = ["always", "never", "planned"]
CPU_CASES = [("eenet20", 8)] if QUICK else [("eenet20", b) for b in (1, 8, 32, 256)] + [("eenet110", 256)]
GPU_CASES = [("eenet20", 8)] if QUICK else [(m, b) for m in ("eenet20", "eenet110") for b in (1, 8, 32, 256, 1024)]

CASES = [
    pytest.param("cpu", torch.float32, name, batch, id=f"cpu-float32-{name}-{batch}") for name, batch in CPU_CASES
] + [
    pytest.param("cuda", dtype, name, batch, id=f"cuda-{str(dtype)[6:]}-{name}-{batch}", marks=pytest.mark.cuda)
    for dtype in (torch.float32, torch.bfloat16) for name, batch in GPU_CASES
]


@functools.lru_cache(maxsize=4)
def planned_model(name: str, device: str, dtype: torch.dtype):
    """The benchmark model, its batch (as many samples as the largest case) and a plan measured on it
    (not set on the model, which the inference benchmarks share)."""
    largest = max(batch for model, batch in (GPU_CASES if device == "cuda" else CPU_CASES) if model == name)
    model, calibration = controlled_mix(name, device, dtype, largest)
    return model, calibration, measure_compaction(model, calibration, repeats=1 if QUICK else 3)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("device, dtype, name, batch", CASES)
def test_compaction_policy(benchmark, record, device, dtype, name, batch, policy):
    model, calibration, plan = planned_model(name, device, dtype)
    x = calibration[:batch].contiguous()
    assert x.shape[0] == batch, f"expected a batch of {batch}, the calibration batch has {calibration.shape[0]}"
    early = len(model.exits)
    choices = {"always": (True,) * early, "never": (False,) * early, "planned": plan.decide(batch)}
    compact_at = choices[policy]

    def run():
        model.predict(x, mode="compact", compact_at=compact_at)
        synchronize(device)

    benchmark.group = f"compaction {name} {device} {str(dtype)[6:]} batch {batch}"
    record(device, dtype, model=name, batch=batch, policy=policy, compact_at=list(compact_at),
           predicted_ms={k: 1e3 * plan.predicted_time(batch, c) for k, c in choices.items()},
           exit_counts=torch.bincount(model.predict(x, mode="mask").exit, minlength=model.num_exits).tolist(),
           plan=plan.to_dict())
    benchmark.pedantic(run, rounds=3 if device == "cpu" and batch >= 256 else 10, warmup_rounds=1)
