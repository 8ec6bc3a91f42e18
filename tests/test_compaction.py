"""Compaction policy: deferred exits give the same predictions; the plan picks the fastest exits."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random

import pytest
import torch

from eefast import ops
from eefast.compaction import CompactionPlan, interpolate, ladder, record_deferred_exits
from tests.test_inference import MIXES, warmed_model

SIZES = (1, 4, 16, 64)


def plan_from(segment, compact, defer, reach, sizes=SIZES) -> CompactionPlan:
    """A plan whose time tables are functions of the batch size, one per exit."""
    return CompactionPlan(
        batch_sizes=sizes,
        segment_times=tuple(tuple(f(b) for b in sizes) for f in segment),
        compact_times=tuple(tuple(f(b) for b in sizes) for f in compact),
        defer_times=tuple(tuple(f(b) for b in sizes) for f in defer),
        reach=tuple(reach),
    )


def gpu_like(width: int = 64, floor: float = 1e-3):
    """A stage whose time is flat until `width` rows fill the device, then grows with the rows."""
    return lambda b: floor * max(1.0, b / width)


def cpu_like(per_row: float = 1e-4):
    return lambda b: per_row * b


def brute_force(plan: CompactionPlan, batch: int) -> float:
    return min(plan.predicted_time(batch, c) for c in itertools.product([False, True], repeat=plan.num_early_exits))


# ---- the cost model and the decision ----------------------------------------------------------


def test_interpolate():
    sizes, times = (1, 4, 16), (1.0, 2.0, 8.0)
    assert interpolate(sizes, times, 0) == 0.0
    assert interpolate(sizes, times, 0.5) == 0.5  # through 0 below the smallest size
    assert interpolate(sizes, times, 1) == 1.0
    assert interpolate(sizes, times, 2.5) == 1.5
    assert interpolate(sizes, times, 10) == 5.0
    assert interpolate(sizes, times, 32) == 16.0  # proportional beyond the largest


def test_ladder():
    assert ladder(1) == (1,)
    assert ladder(8) == (1, 2, 4, 8)
    assert ladder(100) == (1, 2, 4, 8, 16, 32, 64, 100)


def test_predicted_time_by_hand():
    plan = plan_from([cpu_like(1.0)] * 3, [lambda b: 10.0] * 2, [lambda b: 1.0] * 2, [1.0, 0.5, 0.25])
    batch = 16
    # always: segment 0 on 16 rows, compact (10), segment 1 on 8, compact (10), segment 2 on 4
    assert plan.predicted_time(batch, (True, True)) == pytest.approx(16 + 10 + 8 + 10 + 4)
    # never: every segment on 16 rows, the two exits deferred (1 each)
    assert plan.predicted_time(batch, (False, False)) == pytest.approx(16 * 3 + 2)
    # defer at exit 0, compact at exit 1: segments 0 and 1 on 16 rows
    assert plan.predicted_time(batch, (False, True)) == pytest.approx(16 + 1 + 16 + 10 + 4)
    with pytest.raises(ValueError, match="expected 2 decisions, got 3"):
        plan.predicted_time(batch, (True, True, True))


def test_cpu_like_costs_compact_everywhere():
    plan = plan_from([cpu_like()] * 4, [lambda b: 1e-5] * 3, [lambda b: 2e-6] * 3, [1.0, 0.5, 0.25, 0.1])
    for batch in (8, 64, 256):
        assert plan.decide(batch) == (True, True, True)


def test_gpu_like_costs_do_not_compact_small_batches():
    """Flat stage times below 64 rows: removing rows from a batch of 32 saves nothing."""
    plan = plan_from([gpu_like()] * 4, [lambda b: 5e-5] * 3, [lambda b: 1e-5] * 3, [1.0, 0.5, 0.25, 0.1],
                     sizes=(1, 16, 64, 256, 1024))
    assert plan.decide(32) == (False, False, False)
    assert plan.decide(1024) == (True, True, True)
    # 256 rows: exit 0 takes the batch to 128 rows (saves half a stage), exit 1 to 64 (saves more
    # than the op); the last compaction, 64 -> 26 rows on a flat curve, saves nothing
    assert plan.decide(256) == (True, True, False)


def test_decide_is_the_fastest_of_all_choices():
    rng = random.Random(0)
    for _ in range(200):
        early = rng.randint(0, 4)
        segment = [lambda b, a=rng.uniform(1e-5, 1e-3), w=rng.choice([1, 16, 128]): a * max(1.0, b / w)
                   for _ in range(early + 1)]
        compact = [lambda b, a=rng.uniform(0, 1e-3): a for _ in range(early)]
        defer = [lambda b, a=rng.uniform(0, 1e-4): a for _ in range(early)]
        reach = sorted((rng.random() for _ in range(early)), reverse=True)
        plan = plan_from(segment, compact, defer, [1.0, *reach])
        for batch in (1, 7, 64, 300):
            decisions = plan.decide(batch)
            assert plan.predicted_time(batch, decisions) == pytest.approx(brute_force(plan, batch), rel=1e-12)


def test_plan_round_trips_through_json():
    plan = plan_from([gpu_like()] * 3, [lambda b: 5e-5] * 2, [lambda b: 1e-5] * 2, [1.0, 0.4, 0.1])
    again = CompactionPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan and again.decide(32) == plan.decide(32)
    assert "compact at exits" in plan.table()


def test_plan_checks_its_tables():
    with pytest.raises(ValueError, match=r"expected segment_times of shape \[3\]\[4\]"):
        plan_from([cpu_like()] * 2, [cpu_like()] * 2, [cpu_like()] * 2, [1.0, 0.5, 0.2])
    with pytest.raises(ValueError, match="ascending batch sizes"):
        plan_from([cpu_like()] * 2, [cpu_like()], [cpu_like()], [1.0, 0.5], sizes=(4, 1))


# ---- deferred exits ---------------------------------------------------------------------------


def test_record_deferred_exits():
    logits = torch.arange(12.0).reshape(4, 3)
    confidence = torch.tensor([0.9, 0.1, float("nan"), 0.7])
    index = torch.tensor([3, 0, 2, 5])  # 5 = the scratch row of a batch of 5: left at an earlier exit
    out_logits = torch.zeros(6, 3)
    out_exit = torch.full((6,), -1)
    new_index = record_deferred_exits(logits, confidence, index, 0.5, 2, out_logits, out_exit)
    assert new_index.tolist() == [5, 0, 2, 5]  # row 0 left; NaN never exits; row 3 had left
    assert out_exit[:5].tolist() == [-1, -1, -1, 2, -1]
    assert out_logits[3].tolist() == [0.0, 1.0, 2.0]
    assert out_logits[:3].abs().sum() == 0 and out_logits[4].abs().sum() == 0


@pytest.mark.parametrize("name, kwargs, fractions", MIXES.values(), ids=MIXES.keys())
def test_every_choice_of_compacting_exits_gives_the_same_prediction(name, kwargs, fractions):
    model = warmed_model(name, **kwargs)
    x = torch.randn(24, *model.input_shape)
    x[3] = float("nan")
    model.threshold = model.thresholds_for_fractions(x, fractions)
    mask = model.predict(x, mode="mask")
    for compact_at in itertools.product([False, True], repeat=len(model.exits)):
        pred = model.predict(x, mode="compact", compact_at=compact_at)
        assert torch.equal(pred.exit, mask.exit), compact_at
        torch.testing.assert_close(pred.logits, mask.logits, rtol=0, atol=0, equal_nan=True)
        assert pred.logits.shape == (24, model.num_classes) and pred.logits.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_deferred_exits_in_half_precision(dtype):
    """Deferred exits record half-precision logits as they are; the scratch row and the
    confidence of 1 that removes riding rows are exact in every dtype."""
    model = warmed_model("eenet20", num_exits=3).to(dtype)
    x = torch.randn(24, *model.input_shape).to(dtype)
    model.threshold = model.thresholds_for_fractions(x, [0.4, 0.2, 0.2])
    mask = model.predict(x, mode="mask")
    for compact_at in itertools.product([False, True], repeat=3):
        pred = model.predict(x, compact_at=compact_at)
        assert pred.logits.dtype == dtype and torch.equal(pred.exit, mask.exit), compact_at
        torch.testing.assert_close(pred.logits, mask.logits, rtol=0, atol=0)


def test_deferred_exits_keep_the_rows_until_the_next_compaction():
    model = warmed_model("eenet20", num_exits=3)
    x = torch.randn(16, *model.input_shape)
    model.threshold = model.thresholds_for_fractions(x, [0.5, 0.25, 0.125])
    seen: list[int] = []
    handles = [stage.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0])) for stage in model.stages]
    try:
        model.predict(x, compact_at=(False, True, False))
        assert seen == [16, 16, 4, 4]  # exits 0 and 1 leave together at exit 1; exit 2 rides along
        seen.clear()
        model.predict(x, compact_at=(True, True, True))
        assert seen == [16, 8, 4, 2]
    finally:
        for handle in handles:
            handle.remove()


def test_compact_at_errors():
    model = warmed_model("eenet20")
    x = torch.randn(4, *model.input_shape)
    with pytest.raises(ValueError, match=r"expected compact_at with 2 entries \(one per early exit\), got 3"):
        model.predict(x, compact_at=[True] * 3)
    with pytest.raises(ValueError, match="compact_at applies to mode='compact', got mode='mask'"):
        model.predict(x, mode="mask", compact_at=[True, True])


# ---- measuring -----------------------------------------------------------------------------------


def test_plan_compaction_measures_and_is_used(monkeypatch):
    model = warmed_model("eenet20", num_exits=3)
    x = torch.randn(8, *model.input_shape)
    model.threshold = model.thresholds_for_fractions(x, [0.5, 0.25, 0.125])
    plan = model.plan_compaction(x, repeats=1)
    assert model.compaction_plan is plan and not model.training
    assert plan.batch_sizes == (1, 2, 4, 8) and plan.thresholds == tuple(model.threshold)
    assert plan.reach == pytest.approx((1.0, 0.5, 0.25, 0.125))
    assert all(t > 0 for row in plan.segment_times + plan.compact_times + plan.defer_times for t in row)

    calls = []
    compact = ops.compact_exits
    monkeypatch.setattr(ops, "compact_exits", lambda *a, **k: calls.append(1) or compact(*a, **k))
    never_pays = plan_from([gpu_like(1_000)] * 4, [lambda b: 1.0] * 3, [lambda b: 0.0] * 3, [1.0, 0.5, 0.25, 0.125])
    model.compaction_plan = dataclasses.replace(never_pays, thresholds=tuple(model.threshold))
    never = model.predict(x)
    assert calls == []  # compaction never pays under this plan: every exit deferred
    model.compaction_plan = None
    always = model.predict(x)
    assert len(calls) == 3
    assert torch.equal(never.exit, always.exit)
    torch.testing.assert_close(never.logits, always.logits)  # convolutions on 1-row batches round differently


def test_a_stale_plan_warns_and_compacts_everywhere(monkeypatch):
    model = warmed_model("eenet20")
    x = torch.randn(8, *model.input_shape)
    model.threshold = [0.4, 0.6]
    model.compaction_plan = dataclasses.replace(
        plan_from([gpu_like(1_000)] * 3, [lambda b: 1.0] * 2, [lambda b: 0.0] * 2, [1.0, 0.5, 0.25]),
        thresholds=(0.4, 0.6))
    calls = []
    compact = ops.compact_exits
    monkeypatch.setattr(ops, "compact_exits", lambda *a, **k: calls.append(1) or compact(*a, **k))
    model.predict(x)
    assert calls == []  # the plan holds: never compact
    model.threshold = 0.5
    with pytest.warns(UserWarning, match=r"measured with thresholds \[0.4, 0.6\], the model has \[0.5, 0.5\]"):
        model.predict(x)
    assert len(calls) == 2
    assert model.compaction_plan.mismatch("cuda:0", [0.4, 0.6]) == "was measured on cpu, the input is on cuda:0"


def test_plan_compaction_checks_its_batch():
    model = warmed_model("eenet20")
    with pytest.raises(ValueError, match="at least one sample"):
        model.plan_compaction(torch.randn(0, *model.input_shape))
    with pytest.raises(ValueError, match=r"expected input of shape \[B, 3, H, W\]"):
        model.plan_compaction(torch.randn(2, 1, 32, 32))


@pytest.mark.cuda
def test_cuda_mask_mode_never_synchronises():
    model = warmed_model("eenet20", num_exits=3).cuda()
    x = torch.randn(64, *model.input_shape, device="cuda")
    model.threshold = model.thresholds_for_fractions(x, [0.5, 0.25, 0.125])
    model.predict(x, mode="mask")  # warm up (copies the thresholds to the device once)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model.predict(x, mode="mask")
    finally:
        torch.cuda.set_sync_debug_mode(0)


def assert_host_reads_at_most_one_per_compacting_exit(model, x):
    """For every choice of compacting exits, after a warm-up call: deferred exits never synchronise
    and each compacting exit reads the survivor count once (torch.cuda.set_sync_debug_mode)."""
    import warnings

    for compact_at in itertools.product([False, True], repeat=len(model.exits)):
        model.predict(x, compact_at=compact_at)  # warm up (and capture, with CUDA graphs)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model.predict(x, compact_at=compact_at)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        assert len(syncs) <= sum(compact_at), (compact_at, [str(w.message) for w in syncs])


@pytest.mark.cuda
def test_cuda_host_reads_are_at_most_one_per_compacting_exit():
    model = warmed_model("eenet20", num_exits=3).cuda()
    x = torch.randn(64, *model.input_shape, device="cuda")
    model.threshold = model.thresholds_for_fractions(x, [0.5, 0.25, 0.125])
    assert_host_reads_at_most_one_per_compacting_exit(model, x)
