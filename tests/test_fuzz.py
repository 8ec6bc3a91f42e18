"""Property-based tests (hypothesis): compact_exits, eenet_loss and the inference modes over
random shapes, dtypes, thresholds and confidence patterns, each against eefast.reference.

EEFAST_FUZZ_SCALE multiplies the number of examples (CI's quick mode runs it at 1: about
3,000 cases in all)."""

from __future__ import annotations

import functools
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eefast
from eefast import ops, reference
from tests.test_reference import direct_loss

SCALE = float(os.environ.get("EEFAST_FUZZ_SCALE", "1"))
FUZZ = functools.partial(settings, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@st.composite
def compaction_cases(draw):
    rows = draw(st.integers(0, 24))
    trailing = tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=3)))
    classes = draw(st.integers(1, 12))
    batch = rows + draw(st.integers(0, 8))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, *trailing, generator=g).to(dtype)
    if len(trailing) == 3 and draw(st.booleans()):
        x = x.contiguous(memory_format=torch.channels_last)
    pattern = draw(st.sampled_from(["uniform", "saturated", "nan", "ties"]))
    confidence = torch.rand(rows, generator=g)
    if pattern == "saturated":
        confidence = (confidence > 0.5).float()
    elif pattern == "nan":
        confidence[torch.rand(rows, generator=g) < 0.3] = float("nan")
    threshold = draw(st.one_of(st.sampled_from([0.0, 1.0, 0.5]), st.floats(0, 1)))
    if pattern == "ties" and rows:
        confidence[::2] = threshold  # exactly at the threshold: these exit
    logits = torch.randn(rows, classes, generator=g).to(dtype)
    index = torch.randperm(batch, generator=g)[:rows]
    return x, logits, confidence.to(draw(st.sampled_from(DTYPES))), index, threshold, batch


def run(op, case, exit_index=3):
    x, logits, confidence, index, threshold, batch = case
    out_logits = torch.zeros(batch, logits.shape[1], dtype=logits.dtype)
    out_exit = torch.full((batch,), -1, dtype=torch.int64)
    return (*op(x, logits, confidence, index, threshold, exit_index, out_logits, out_exit), out_logits, out_exit)


@FUZZ(max_examples=int(1500 * SCALE))
@given(compaction_cases())
def test_compact_exits_matches_reference(case):
    want = run(reference.compact_exits, case)
    fallback = run(lambda *a: ops._compact_exits_fallback(*a, padded=False), case)
    got = run(torch.ops.eefast.compact_exits, case) if eefast.HAS_EXT else fallback
    for g, f, w in zip(got, fallback, want):
        assert torch.equal(g, w) and torch.equal(f, w)
    assert got[0].stride() == fallback[0].stride() or got[0].numel() <= 1


@st.composite
def loss_cases(draw):
    exits, batch, classes = draw(st.integers(1, 5)), draw(st.integers(1, 8)), draw(st.integers(1, 12))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([1.0, 10.0, 1e4]))
    logits = scale * torch.randn(exits, batch, classes, generator=g, dtype=torch.float64)
    conf = draw(st.sampled_from([1.0, 50.0, 1000.0])) * torch.randn(exits - 1, batch, generator=g, dtype=torch.float64)
    costs = torch.sort(torch.rand(exits, generator=g, dtype=torch.float64)).values + 0.01
    target = torch.randint(0, classes, (batch,), generator=g)
    return logits, conf, target, costs, draw(st.floats(0, 3)), draw(st.sampled_from(reference.LOSS_VERSIONS))


@FUZZ(max_examples=int(1000 * SCALE))
@given(loss_cases())
def test_eenet_loss_is_finite_and_equals_the_direct_form(case):
    logits, conf, target, costs, lam, version = case
    logits.requires_grad_()
    conf.requires_grad_()
    loss = ops.eenet_loss(logits, conf, target, costs, lam, version)
    assert torch.isfinite(loss)
    if loss.requires_grad:
        inputs = [logits, conf] if conf.numel() else [logits]
        for grad in torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True):
            assert torch.isfinite(grad).all()
    # Where the direct form is well conditioned, the two agree; beyond (1 - sigmoid(30) keeps 3
    # digits, softmax underflows) only ours stays exact, and finite.
    if (conf.abs().max() if conf.numel() else 0) <= 20 and logits.abs().max() <= 100:
        direct = direct_loss(logits, conf, target, costs, lam, version)
        torch.testing.assert_close(loss, direct, rtol=1e-9, atol=1e-9)


@functools.lru_cache(maxsize=1)
def fuzz_model():
    torch.manual_seed(0)
    model = eefast.create_model("eenet8", filters=2)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 1, 28, 28))
    return model.eval()


@functools.lru_cache(maxsize=1)
def stand_in_graphs():
    from eefast.graphs import SegmentGraphs

    return SegmentGraphs(eager=True)  # shared by every example


@FUZZ(max_examples=int(300 * SCALE))
@given(
    batch=st.integers(0, 6),
    thresholds=st.lists(st.floats(0, 1), min_size=2, max_size=2),
    nan_rows=st.sets(st.integers(0, 5), max_size=3),
    compact_at=st.lists(st.booleans(), min_size=2, max_size=2),
    graphs=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_inference_modes_agree(batch, thresholds, nan_rows, compact_at, graphs, seed):
    """compact mode (with or without the graphs' stand-in, whose padding rows keep whatever earlier
    examples left, NaN included) against mask mode run eagerly."""
    model = fuzz_model()
    model.threshold = thresholds
    x = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    for row in nan_rows:
        if row < batch:
            x[row] = float("nan")
    model.segment_graphs = None
    mask = model.predict(x, mode="mask")
    model.segment_graphs = stand_in_graphs() if graphs else None
    compact = model.predict(x, mode="compact", compact_at=compact_at)
    model.segment_graphs = None
    assert torch.equal(compact.exit, mask.exit)
    torch.testing.assert_close(compact.logits, mask.logits, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(compact.cost, mask.cost)
    for row in nan_rows:
        if row < batch:
            assert compact.exit[row].item() == model.num_exits - 1  # a NaN confidence never exits
