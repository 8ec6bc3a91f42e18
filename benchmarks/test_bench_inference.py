"""End-to-end batched inference: plain network vs EENet in mask, compact and one-sample modes.

    pytest benchmarks/test_bench_inference.py --benchmark-only --benchmark-json benchmarks/results/cpu-inference.json
    python -m eefast.bench benchmarks/results/cpu-inference.json

A controlled exit mix (benchmarks/workloads.py): per-exit thresholds from the confidences of a
calibration batch so that 50 / 25 / 15 / 10 % of the samples leave at successive exits.
Each result's extra_info holds the exit histogram, the plain network's time and its segments'
times, and the FLOP-ideal, time-ideal and realised speed-ups and the efficiency (eefast.bench).
"""

from __future__ import annotations

import functools

import pytest
import torch

from benchmarks.conftest import QUICK
from benchmarks.workloads import MODELS, controlled_mix
from eefast import bench
from eefast.timing import median_time, run_segment_times, segment_times, synchronize

MODES = ["plain", "mask", "compact", "sample"]
CPU_BATCHES = (1, 8) if QUICK else (1, 32, 256)
GPU_BATCHES = (1, 8) if QUICK else (1, 32, 256, 1024)
REPEATS = 1 if QUICK else 3  # repeats of the plain network's and its segments' timings on the CPU

CASES = [
    pytest.param("cpu", torch.float32, batch, False, id=f"cpu-float32-{batch}") for batch in CPU_BATCHES
] + [
    pytest.param("cuda", dtype, batch, graphs, id=f"cuda-{str(dtype)[6:]}-{batch}{'-graphs' if graphs else ''}",
                 marks=pytest.mark.cuda)
    for dtype in (torch.float32, torch.bfloat16) for batch in GPU_BATCHES for graphs in (False, True)
]


def prepared(name: str, device: str, dtype: torch.dtype, batch: int):
    """The model with the controlled mix and the first ``batch`` samples of its calibration batch."""
    model, calibration = controlled_mix(name, device, dtype, batch)
    return model, calibration[:batch].contiguous()


def measure(benchmark, record, model, x, mode: str, dtype: torch.dtype, label: str, rounds: int,
            graphs: bool = False) -> None:
    """Benchmarks one mode on (model, x); extra_info gets the exit histogram, the plain network's
    time and segment times, and the speed-ups of eefast.bench. With ``graphs`` the EENet replays
    its segments from CUDA graphs, and the plain network and the segments of the time ideal are
    graphed too."""
    device = x.device
    exit_counts = torch.bincount(model.predict(x, mode="mask").exit, minlength=model.num_exits).tolist()
    repeats = REPEATS if device.type == "cpu" else 20
    try:
        if graphs:
            model.use_cuda_graphs()
            plain = bench.graphed_plain_forward(model, x)
            stage_times, head_times = run_segment_times(model, x, repeats=repeats), [0.0] * len(model.exits)
        else:
            plain = functools.partial(bench.plain_forward, model, x)
            stage_times, head_times = segment_times(model, x, repeats)
        plain_time = median_time(plain, device, repeats)
        reaching = [sum(exit_counts[n:]) for n in range(model.num_exits)]  # rows reaching each segment
        reached = run_segment_times(model, x, reaching, repeats) if mode == "compact" else None
        fn = plain if mode == "plain" else functools.partial(model.predict, x, mode=mode)

        def run():
            fn()
            synchronize(device)

        benchmark.group = f"{label} {device.type} {str(dtype)[6:]} batch {x.shape[0]}{' graphs' if graphs else ''}"
        record(device.type, dtype, model=label, batch=x.shape[0], mode=mode, cuda_graphs=graphs,
               input_shape=list(model.input_shape), exit_counts=exit_counts, thresholds=model.threshold,
               plain_time_s=plain_time, stage_times_s=stage_times, head_times_s=head_times,
               **({"reached_segment_times_s": reached} if reached else {}))
        benchmark.pedantic(run, rounds=rounds, warmup_rounds=1)
    finally:
        model.use_cuda_graphs(False)  # the model is shared between benchmarks
    if mode != "plain" and benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        benchmark.extra_info.update(bench.speedups(model, exit_counts, plain_time, median, stage_times, head_times))
        if reached:
            benchmark.extra_info["machinery_efficiency"] = sum(reached) / median


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("device, dtype, batch, graphs", CASES)
def test_inference(benchmark, record, device, dtype, batch, graphs, name, mode):
    if graphs and mode == "sample":
        pytest.skip("one sample at a time is not graphed")
    if device == "cpu" and name == "eenet50" and batch == 256 and mode == "sample":
        pytest.skip("minutes on a 2-core CPU; the 256-sample loop is measured on eenet110 and eenet20")
    if QUICK and name != "eenet20":
        pytest.skip("quick mode: eenet20 only")
    model, x = prepared(name, device, dtype, batch)
    rounds = 3 if device == "cpu" and (batch >= 256 or mode == "sample") else 5
    measure(benchmark, record, model, x, mode, dtype, name, rounds, graphs)


@functools.lru_cache(maxsize=1)
def mnist_model(out: str):
    """EENet-8 (4 filters, plain exits, v2) trained on the MNIST sample, and 256 test images."""
    from eefast.data import load_dataset
    from eefast.train import TrainConfig, Trainer

    trainer = Trainer(TrainConfig(model="eenet8", filters=4, exit_type="plain", epochs=1 if QUICK else 10, quiet=True,
                                  plots=False, out=out, device="cpu"))
    trainer.run()
    test = load_dataset("mnist-sample").test
    x = torch.stack([test[i][0] for i in range(256)])
    return trainer.model.eval(), x


@pytest.mark.parametrize("mode", MODES)
def test_inference_mnist_natural_mix(benchmark, record, tmp_path_factory, mode):
    """The exit mix a trained model chooses on real test images (threshold 0.5)."""
    model, x = mnist_model(str(tmp_path_factory.getbasetemp() / "mnist-eenet8"))
    measure(benchmark, record, model, x, mode, torch.float32, "eenet8-mnist", rounds=5)
