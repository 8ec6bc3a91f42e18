"""CUDA graphs for inference (eefast.graphs): buckets, padding, and predictions equal to eager.

Off the GPU the graphs' eager stand-in (``SegmentGraphs(eager=True)``: replays rerun the
segment into the same static outputs) checks the bucketing and padding around the graphs; the
``cuda`` tests capture real graphs.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

from eefast.graphs import SegmentGraphs, bucket_size
from tests.test_compaction import assert_host_reads_at_most_one_per_compacting_exit
from tests.test_inference import MIXES, warmed_model


def test_bucket_sizes_pad_under_a_third_of_a_bucket():
    ladder = sorted({bucket_size(rows) for rows in range(1, 5000)})
    assert ladder[:12] == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    assert all(b == 2 ** round(math.log2(b)) or b == 3 * 2 ** round(math.log2(b / 3)) for b in ladder)
    for rows in range(1, 5000):
        bucket = bucket_size(rows)
        assert rows <= bucket and bucket - rows < bucket / 3
    assert bucket_size(1000) == 1024 and bucket_size(512) == 512 and bucket_size(513) == 768
    with pytest.raises(ValueError, match="expected rows >= 1, got 0"):
        bucket_size(0)


def with_stand_in_graphs(model):
    model.segment_graphs = SegmentGraphs(eager=True)
    return model


@pytest.mark.parametrize("mix", MIXES.values(), ids=MIXES.keys())
def test_graphed_predictions_equal_eager_ones(mix):
    """Every mode and compaction choice: the same exits and logits, with batches that pad."""
    name, kwargs, fractions = mix
    model = warmed_model(name, **kwargs)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(13, *model.input_shape, generator=g)  # bucket 16 for the first segment
    model.threshold = model.thresholds_for_fractions(x, fractions)
    choices = [None, *itertools.product([False, True], repeat=len(model.exits))]
    want = {c: model.predict(x, compact_at=c) for c in choices}
    want_mask = model.predict(x, mode="mask")
    graphed = with_stand_in_graphs(model)
    for _ in range(2):  # captures, then replays
        for c in choices:
            got = graphed.predict(x, compact_at=c)
            torch.testing.assert_close(got.exit, want[c].exit, rtol=0, atol=0)
            torch.testing.assert_close(got.logits, want[c].logits, rtol=0, atol=0)
        got = graphed.predict(x, mode="mask")
        torch.testing.assert_close(got.exit, want_mask.exit, rtol=0, atol=0)
        torch.testing.assert_close(got.logits, want_mask.logits, rtol=0, atol=0)


def test_graphs_are_captured_once_per_segment_and_bucket():
    model = with_stand_in_graphs(warmed_model("eenet20", num_exits=3))
    x = torch.randn(16, *model.input_shape)
    model.threshold = model.thresholds_for_fractions(x, [0.5, 0.25, 0.125])  # 16 -> 8 -> 4 -> 2 rows
    model.predict(x)
    buckets = sorted((key[0], key[1]) for key in model.segment_graphs.graphs)
    assert buckets == [(0, 16), (1, 8), (2, 4), (3, 2)]
    model.predict(x)
    model.predict(x[:15])  # the same buckets (16, 8, 4 or 6, ...)
    assert len(model.segment_graphs) <= 6
    model.predict(x, mode="mask")  # every segment on 16 rows
    assert {(0, 16), (1, 16), (2, 16), (3, 16)} <= {(key[0], key[1]) for key in model.segment_graphs.graphs}


def test_padding_rows_do_not_change_the_real_rows():
    """Rows past the running ones hold whatever an earlier batch left: NaN here."""
    model = warmed_model("eenet20", num_exits=3)
    x = torch.randn(12, *model.input_shape)
    model.threshold = [1.0, 1.0, 1.0]  # nobody leaves early: every segment runs 11 rows in bucket 12
    want = model.predict(x[:11])
    with_stand_in_graphs(model).predict(torch.full_like(x, float("nan")))  # NaN rows in every static input
    got = model.predict(x[:11])
    assert torch.equal(got.exit, want.exit) and torch.equal(got.logits, want.logits)


def test_moving_or_copying_the_model_drops_the_graphs():
    model = with_stand_in_graphs(warmed_model("eenet8", filters=4))
    x = torch.randn(4, *model.input_shape)
    model.predict(x)
    assert len(model.segment_graphs) > 0
    model.double()
    assert model.segment_graphs is not None and len(model.segment_graphs) == 0
    model.predict(x.double())
    copied = copy.deepcopy(model)
    assert copied.segment_graphs is not model.segment_graphs and len(copied.segment_graphs) == 0
    assert torch.equal(copied.predict(x.double()).logits, model.predict(x.double()).logits)


def test_a_saved_model_with_graphs_loads_with_none_captured(tmp_path):
    model = with_stand_in_graphs(warmed_model("eenet8", filters=4))
    x = torch.randn(4, *model.input_shape)
    want = model.predict(x)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert len(loaded.segment_graphs) == 0
    assert torch.equal(loaded.predict(x).logits, want.logits)


def test_training_mode_and_empty_batches_run_eagerly():
    model = with_stand_in_graphs(warmed_model("eenet8", filters=4))
    assert model.predict(torch.randn(0, *model.input_shape)).logits.shape == (0, 10)
    x = torch.randn(4, *model.input_shape)
    expected = model.predict(x)
    model.train()  # predict runs as in eval mode, graphs and all; the model stays in training mode
    pred = model.predict(x)
    assert model.training and torch.equal(pred.exit, expected.exit) and torch.equal(pred.logits, expected.logits)
    captured = len(model.segment_graphs)
    model(x)  # the training forward runs eagerly: no graph captured
    assert len(model.segment_graphs) == captured


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_use_cuda_graphs_without_a_gpu_says_so():
    model = warmed_model("eenet8", filters=4)
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        model.use_cuda_graphs()
    assert model.use_cuda_graphs(False).segment_graphs is None


# ---- on a GPU: real graphs ---------------------------------------------------------------------


def cuda_model(name="eenet20", dtype=torch.float32, batch=100, **kwargs):
    model = warmed_model(name, **kwargs).cuda().to(dtype)
    x = torch.randn(batch, *model.input_shape, device="cuda", dtype=dtype)
    model.threshold = model.thresholds_for_fractions(x, [0.5, 0.25, 0.15][: len(model.exits)])
    return model, x


@pytest.fixture
def no_tf32():
    """Full float32 arithmetic: batch sizes (buckets) may pick other cuDNN algorithms, which under
    TF32 differ by 1e-3; in float32 by far less than the gaps between the thresholds' confidences."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def assert_same_predictions(got, want, dtype):
    """float32: the same exits, logits within 1e-4. bfloat16 rounds confidences coarsely, so a row
    whose confidence sits one rounding step from a threshold may leave elsewhere: at most 3 in 100."""
    same = got.exit == want.exit
    if dtype == torch.float32:
        assert same.all(), (got.exit[~same], want.exit[~same])
    else:
        assert same.float().mean() >= 0.97, (got.exit[~same], want.exit[~same])
    tolerance = {torch.float32: 1e-4, torch.bfloat16: 6e-2}[dtype]
    torch.testing.assert_close(got.logits[same], want.logits[same], rtol=tolerance, atol=tolerance)


@pytest.mark.cuda
@pytest.mark.parametrize("exit_type", ["pool", "bnpool"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_graphs_give_the_eager_predictions(dtype, exit_type, no_tf32):
    model, x = cuda_model(dtype=dtype, num_exits=3, exit_type=exit_type)
    choices = [None, (False, True, False), (True, False, True)]
    want = {c: model.predict(x, compact_at=c) for c in choices}
    want["mask"] = model.predict(x, mode="mask")
    model.use_cuda_graphs()
    for _ in range(2):  # captures, then replays
        for c in choices:
            assert_same_predictions(model.predict(x, compact_at=c), want[c], dtype)
        assert_same_predictions(model.predict(x, mode="mask"), want["mask"], dtype)
    assert len(model.segment_graphs) > 0 and all(g.graph is not None for g in model.segment_graphs.graphs.values())


@pytest.mark.cuda
def test_cuda_graphs_see_in_place_parameter_updates(no_tf32):
    model, x = cuda_model(num_exits=3, exit_type="bnpool")
    model.use_cuda_graphs()
    model.predict(x)
    with torch.no_grad():
        for exit_block in model.exits:
            exit_block.classifier.weight.mul_(2)
            exit_block.bn.running_var.mul_(4)
        next(model.stages[0].parameters()).mul_(1.5)  # the first convolution
    got = model.predict(x)
    model.use_cuda_graphs(False)
    assert_same_predictions(got, model.predict(x), torch.float32)


@pytest.mark.cuda
def test_cuda_graphs_host_reads_are_at_most_one_per_compacting_exit():
    model, x = cuda_model(num_exits=3)
    model.use_cuda_graphs()
    assert_host_reads_at_most_one_per_compacting_exit(model, x)


def test_graphs_do_not_keep_the_model_alive():
    """No reference cycle: a dropped model frees its graphs at once, not whenever the garbage
    collector runs (which could be during another capture)."""
    import gc
    import weakref

    model = with_stand_in_graphs(warmed_model("eenet8", filters=4))
    model.predict(torch.randn(4, *model.input_shape))
    graphs = weakref.ref(model.segment_graphs)
    gc.disable()
    try:
        del model
        assert graphs() is None
    finally:
        gc.enable()


def test_compaction_planning_measures_the_graphed_segments():
    """With graphs on, the plan times the segments as predict runs them: from the graphs."""
    model = with_stand_in_graphs(warmed_model("eenet20", num_exits=3))
    x = torch.randn(8, *model.input_shape)
    model.plan_compaction(x, repeats=1)
    assert {key[1] for key in model.segment_graphs.graphs} == {1, 2, 4, 8}  # the plan's batch-size ladder
