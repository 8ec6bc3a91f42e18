"""eefast.bench: the ideal times and speed-ups the benchmarks report."""

import json
from pathlib import Path

import pytest
import torch

import eefast
from eefast import bench

ROOT = Path(__file__).resolve().parent.parent


def test_ideal_time_scales_each_segment_by_the_share_reaching_it():
    # 50 / 25 / 15 / 10 % leave at exits 0..3: the stages see 100, 50, 25 and 10 % of the batch
    ideal = bench.ideal_time([4.0, 2.0, 2.0, 1.0], [0.2, 0.2, 0.2], [50, 25, 15, 10])
    assert ideal == pytest.approx(4.0 + 2.0 * 0.5 + 2.0 * 0.25 + 1.0 * 0.1 + 0.2 * (1 + 0.5 + 0.25))


def test_speedups_and_report(tmp_path):
    model = eefast.create_model("eenet20", num_exits=3)
    counts = [50, 25, 15, 10]
    result = bench.speedups(model, counts, plain_time=2.0, mode_time=1.0, stage_times=[1.0, 0.5, 0.3, 0.2],
                            head_times=[0.0, 0.0, 0.0])
    mean_flops = sum(c * f for c, f in zip(counts, model.flops)) / 100
    assert result["flop_ideal_speedup"] == pytest.approx(model.profile.total / mean_flops)
    ideal = 1.0 + 0.5 * 0.5 + 0.3 * 0.25 + 0.2 * 0.1
    assert result["time_ideal_speedup"] == pytest.approx(2.0 / ideal)
    assert result["realised_speedup"] == 2.0 and result["efficiency"] == pytest.approx(ideal)
    results = {"benchmarks": [
        {"stats": {"median": 0.5}, "extra_info": {
            "device": "cpu", "model": "eenet20", "dtype": "float32", "batch": 256, "mode": "compact", **result}},
        {"stats": {"median": 0.5}, "extra_info": {
            "device": "cuda", "model": "eenet20", "dtype": "float32", "batch": 256, "mode": "compact",
            "cuda_graphs": True, "machinery_efficiency": 0.875, **result}},
        {"stats": {"median": 0.25}, "extra_info": {
            "device": "cpu", "model": "eenet20", "dtype": "float32", "batch": 32, "policy": "planned",
            "compact_at": [True, False, True], "predicted_ms": {"planned": 240.5}}},
    ]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results))
    inference, compaction = bench.report([str(path)]).split("\n\n")
    assert "eenet20" in inference and "512.0" in inference  # 256 samples in 0.5 s
    graphed = inference.splitlines()[2]
    assert "compact graphs" in graphed and graphed.split()[-1] == "0.88"  # the machinery column
    assert compaction.splitlines()[1].split()[-4:] == ["planned", "0,2", "250.00", "240.50"]


def test_plain_forward_is_the_backbone():
    model = eefast.create_model("eenet20").eval()
    x = torch.randn(2, 3, 32, 32)
    model.threshold = 1.0
    for e in model.exits:
        e.confidence.bias.data.fill_(-100.0)
    torch.testing.assert_close(bench.plain_forward(model, x), model(x).logits)


def test_run_segment_times_run_each_segment_on_the_rows_given():
    from eefast.timing import run_segment_times

    model = eefast.create_model("eenet20", num_exits=3).eval()
    rows = []
    for stage in model.stages:
        stage.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    times = run_segment_times(model, torch.randn(20, 3, 32, 32), [20, 10, 4, 0], repeats=1)
    assert len(times) == 4 and times[3] == 0.0 and all(t > 0 for t in times[:3])
    # each timed segment runs warm-up + 1 repeat on its rows, then once on the full batch
    assert rows == [20, 20, 20, 10, 10, 20, 4, 4, 20]
    with pytest.raises(ValueError, match="expected 4 row counts"):
        run_segment_times(model, torch.randn(2, 3, 32, 32), [2, 2])


def test_kernels_table_pairs_each_group_from_the_saved_results():
    """benchmarks.kernels_table on the committed H200 file: a fused and an eager case per group,
    the speed-up and memory ratios from their medians and peaks."""
    from benchmarks import kernels_table

    path = ROOT / "benchmarks" / "results" / "h200-kernels.json"
    results = json.loads(path.read_text())
    rows = {row["group"]: row for row in kernels_table.comparisons(results)}
    assert len(rows) == len(results["benchmarks"]) // 2
    info = {(b["group"], b["extra_info"]["impl"]): b["extra_info"] for b in results["benchmarks"]}
    group = "ee_loss K=10 float32 both"
    fused, eager = info[(group, "triton")], info[(group, "reference")]
    assert rows[group]["speedup"] == pytest.approx(eager["median_ms"] / fused["median_ms"])
    assert rows[group]["memory_ratio"] == pytest.approx(fused["peak_bytes"] / eager["peak_bytes"])
    assert rows[group]["gradient_share"] == pytest.approx(fused["gradient_bytes"] / eager["peak_bytes"])
    assert rows["exit_head pool float32 forward"]["gradient_share"] is None
    assert f"| {rows[group]['speedup']:.2f}x |" in kernels_table.table(rows.values())


def test_kernels_table_names_a_group_without_its_pair():
    from benchmarks import kernels_table

    results = {"benchmarks": [{"group": "g", "extra_info": {"impl": "triton", "median_ms": 1.0, "peak_bytes": 1}}]}
    with pytest.raises(ValueError, match=r"expected a triton and a reference case in group 'g', got \['triton'\]"):
        kernels_table.comparisons(results)


@pytest.mark.parametrize("kind", ["pool", "bnpool"])
def test_profile_training_steps_run_on_the_cpu(kind):
    """The profile's training steps (GPU-only as a script) so that they cannot rot: the step through
    a head that launches nothing returns a gradient of every input's shape, on autograd's threads
    or the calling thread, as the real step does."""
    from benchmarks.profile_exit_head import autograd_floor_step, on_calling_thread
    from benchmarks.workloads import exit_block_training_step

    block = eefast.ExitBlock(8, 10, kind, impl="reference").train()
    x = torch.randn(4, 8, 3, 3, requires_grad=True)
    want = [t.shape for t in exit_block_training_step(block, x)()]
    assert want == [t.shape for t in (x, *block.parameters())]
    assert [t.shape for t in autograd_floor_step(block, x)()] == want
    assert [t.shape for t in on_calling_thread(autograd_floor_step(block, x))()] == want
