"""Streaming inference: the stream runner against per-request ``compact`` and the plain network.

    pytest benchmarks/test_bench_stream.py --benchmark-only --benchmark-json benchmarks/results/cpu-stream.json
    python -m benchmarks.stream_table benchmarks/results/cpu-stream.json

A caller sends SAMPLES samples in requests of REQUEST_SIZES samples each. ``stream``: every request
through one ``EENetStream`` (segments run on ``segment_batch`` rows); ``compact``: ``model.predict``
on each request (so compact at request size B is compact at fixed batch B); ``plain``: the backbone
without exits on each request. Workloads: EENet-110 with the controlled 50/25/15/10 mix
(benchmarks/workloads.py), and EENet-8 trained on the MNIST sample with the mix its calibrated
thresholds choose on test images. Each result records the exit histogram of the samples timed,
computed in the dtype and on the device timed, and, for the stream, its efficiency against the
time ideal at its segment batch size (each segment's time per row at that batch, times the rows
reaching it).
"""

from __future__ import annotations

import functools

import pytest
import torch

from benchmarks.conftest import QUICK
from benchmarks.test_bench_inference import mnist_model
from benchmarks.workloads import check_mix, controlled_mix
from eefast import bench
from eefast.stream import EENetStream
from eefast.timing import segment_times

SAMPLES = 32 if QUICK else 512
REQUEST_SIZES = (1, 8) if QUICK else (1, 8, 64, 256)
COMPACT_BATCHES = (1, 8) if QUICK else (1, 8, 32, 64, 128, 256)  # compact at fixed batches: the best of them
SEGMENT_BATCHES = (8,) if QUICK else (32, 64, 128)
ROUNDS = 1 if QUICK else 3


@functools.lru_cache(maxsize=2)
def workload(name: str, tmp: str):
    """(model, samples [SAMPLES, ...], exit histogram of those samples under the model's thresholds)."""
    if name == "eenet110":
        model, x = controlled_mix("eenet110", "cpu", torch.float32, SAMPLES)
        x = x[:SAMPLES]
        check_mix(model, x)  # on the samples timed
        counts = torch.bincount(model.predict(x, mode="mask").exit, minlength=model.num_exits).tolist()
    else:
        model, x = mnist_model(tmp)
        x = x.repeat(-(-SAMPLES // x.shape[0]), 1, 1, 1)[:SAMPLES]
        counts = torch.bincount(model.predict(x, mode="mask").exit, minlength=model.num_exits).tolist()
    return model, x, counts


def time_ideal(model, counts: list[int], batch: int, x: torch.Tensor) -> float:
    """Seconds for all samples if every segment ran only the rows reaching it, at ``batch`` rows' time per row."""
    stages, heads = segment_times(model, x[:batch].contiguous(), repeats=ROUNDS)
    reach = [sum(counts[n:]) for n in range(model.num_exits)]
    per_row = [(s + h) / batch for s, h in zip(stages, [*heads, 0.0])]
    return sum(r * t for r, t in zip(reach, per_row))


CASES = (
    [pytest.param("stream", r, b, id=f"stream-request{r}-segment{b}") for r in REQUEST_SIZES for b in SEGMENT_BATCHES]
    + [pytest.param("compact", r, None, id=f"compact-request{r}") for r in sorted({*REQUEST_SIZES, *COMPACT_BATCHES})]
    + [pytest.param("plain", r, None, id=f"plain-request{r}") for r in REQUEST_SIZES]
)


@pytest.mark.parametrize("kind, request_size, segment_batch", CASES)
@pytest.mark.parametrize("name", ["eenet110", "eenet8-mnist"])
def test_stream(benchmark, record, tmp_path_factory, name, kind, request_size, segment_batch):
    if QUICK and name == "eenet110":
        pytest.skip("quick mode: the MNIST model only")
    model, x, counts = workload(name, str(tmp_path_factory.getbasetemp() / "mnist-eenet8"))
    requests = list(x.split(request_size))
    if kind == "stream":
        def run():
            stream = EENetStream(model, batch_size=segment_batch, max_delay=None)
            for _ in stream.map(requests):
                pass
    elif kind == "compact":
        def run():
            for r in requests:
                model.predict(r)
    else:
        def run():
            with torch.no_grad():
                for r in requests:
                    bench.plain_forward(model, r)
    benchmark.group = f"{name} requests of {request_size}"
    record("cpu", torch.float32, model=name, kind=kind, samples=SAMPLES, request_size=request_size,
           segment_batch=segment_batch, exit_counts=counts, thresholds=model.threshold,
           input_shape=list(model.input_shape))
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        seconds = benchmark.stats.stats.median
        benchmark.extra_info["samples_per_second"] = SAMPLES / seconds
        if kind == "stream":
            ideal = time_ideal(model, counts, segment_batch, x)
            benchmark.extra_info.update(time_ideal_s=ideal, efficiency=ideal / seconds)
