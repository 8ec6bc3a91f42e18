"""End-to-end batched inference: plain network vs EENet in mask, compact and one-sample modes.

    pytest benchmarks/test_bench_inference.py --benchmark-only --benchmark-json benchmarks/results/cpu-inference.json
    python -m eefast.bench benchmarks/results/cpu-inference.json

A controlled exit mix: per-exit thresholds from the confidences of a calibration batch so that
50 / 25 / 15 / 10 % of the samples leave at successive exits (eefast.EENet.thresholds_for_fractions).
Each result's extra_info holds the exit histogram, the plain network's time and its segments'
times, and the FLOP-ideal, time-ideal and realised speed-ups and the efficiency (eefast.bench).
"""

from __future__ import annotations

import functools

import pytest
import torch

import eefast
from eefast import bench

MIX = [0.5, 0.25, 0.15]  # the final exit takes the remaining 10 %
MODELS = {"eenet110": {"num_exits": 3}, "eenet20": {"num_exits": 3}, "eenet50": {"num_exits": 3}}
MODES = ["plain", "mask", "compact", "sample"]
CALIBRATION = 256

CASES = [
    pytest.param("cpu", torch.float32, batch, id=f"cpu-float32-{batch}") for batch in (1, 32, 256)
] + [
    pytest.param("cuda", dtype, batch, id=f"cuda-{str(dtype)[6:]}-{batch}", marks=pytest.mark.cuda)
    for dtype in (torch.float32, torch.bfloat16) for batch in (1, 32, 256, 1024)
]


@functools.lru_cache(maxsize=4)
def prepared(name: str, device: str, dtype: torch.dtype, batch: int):
    """A model with warmed batch-norm statistics, a batch, thresholds for MIX, and the plain
    network's time and segment times on that batch."""
    torch.manual_seed(0)
    model = eefast.create_model(name, **MODELS[name]).to(device)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(16, *model.input_shape, device=device))
    model = model.to(dtype).eval()
    generator = torch.Generator().manual_seed(1)
    calibration = torch.randn(max(CALIBRATION, batch), *model.input_shape, generator=generator).to(device, dtype)
    model.threshold = model.thresholds_for_fractions(calibration, MIX)
    x = calibration[:batch].contiguous()
    exit_counts = torch.bincount(model.predict(x, mode="mask").exit, minlength=model.num_exits).tolist()
    device_ = torch.device(device)
    repeats = 3 if device == "cpu" else 20
    plain_time = bench.median_time(lambda: bench.plain_forward(model, x), device_, repeats)
    stage_times, head_times = bench.segment_times(model, x, repeats)
    return model, x, exit_counts, plain_time, stage_times, head_times


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("device, dtype, batch", CASES)
def test_inference(benchmark, record, device, dtype, batch, name, mode):
    if device == "cpu" and name == "eenet50" and batch == 256 and mode == "sample":
        pytest.skip("minutes on a 2-core CPU; the 256-sample loop is measured on eenet110 and eenet20")
    model, x, exit_counts, plain_time, stage_times, head_times = prepared(name, device, dtype, batch)
    if mode == "plain":
        fn = functools.partial(bench.plain_forward, model, x)
    else:
        fn = functools.partial(model.predict, x, mode=mode)

    def run():
        fn()
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{name} {device} {str(dtype)[6:]} batch {batch}"
    record(device, dtype, model=name, batch=batch, mode=mode, input_shape=list(model.input_shape),
           exit_counts=exit_counts, thresholds=model.threshold, plain_time_s=plain_time,
           stage_times_s=stage_times, head_times_s=head_times)
    rounds = 3 if device == "cpu" and (batch >= 256 or mode == "sample") else 5
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1)
    if mode != "plain":
        benchmark.extra_info.update(bench.speedups(model, exit_counts, plain_time, benchmark.stats.stats.median,
                                                   stage_times, head_times))


@functools.lru_cache(maxsize=1)
def mnist_model(out: str):
    """EENet-8 (4 filters, plain exits, v2) trained on the MNIST sample, and 256 test images."""
    from eefast.data import load_dataset
    from eefast.train import TrainConfig, Trainer

    trainer = Trainer(TrainConfig(model="eenet8", filters=4, exit_type="plain", epochs=10, quiet=True, plots=False,
                                  out=out, device="cpu"))
    trainer.run()
    x = torch.stack([load_dataset("mnist-sample").test[i][0] for i in range(256)])
    return trainer.model.eval(), x


@pytest.mark.parametrize("mode", MODES)
def test_inference_mnist_natural_mix(benchmark, record, tmp_path_factory, mode):
    """The exit mix a trained model chooses on real test images (threshold 0.5)."""
    model, x = mnist_model(str(tmp_path_factory.getbasetemp() / "mnist-eenet8"))
    exit_counts = torch.bincount(model.predict(x, mode="mask").exit, minlength=model.num_exits).tolist()
    device = torch.device("cpu")
    plain_time = bench.median_time(lambda: bench.plain_forward(model, x), device, 5)
    stage_times, head_times = bench.segment_times(model, x, 5)
    fn = functools.partial(bench.plain_forward, model, x) if mode == "plain" else functools.partial(
        model.predict, x, mode=mode)
    benchmark.group = "eenet8 mnist-sample natural mix cpu float32 batch 256"
    record("cpu", torch.float32, model="eenet8-mnist", batch=256, mode=mode, input_shape=[1, 28, 28],
           exit_counts=exit_counts, thresholds=model.threshold, plain_time_s=plain_time,
           stage_times_s=stage_times, head_times_s=head_times)
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
    if mode != "plain":
        benchmark.extra_info.update(bench.speedups(model, exit_counts, plain_time, benchmark.stats.stats.median,
                                                   stage_times, head_times))
