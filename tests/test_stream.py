"""The stream runner gives every sample the exit, logits and cost of ``predict``, whatever the
request sizes, and its submit API returns every result, in order, through load and shutdown."""

from __future__ import annotations

import concurrent.futures
import csv
import json
import random
import threading

import pytest
import torch
from hypothesis import given, settings, strategies as st

import eefast
from eefast import cli
from eefast.stream import EENetStream


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = eefast.create_model("eenet8", exit_positions=[0, 1, 2], num_exits=3, filters=2).eval()
    pool = torch.randn(256, 1, 28, 28)
    model.threshold = model.thresholds_for_fractions(pool, [0.4, 0.25, 0.15])
    return model


POOL = torch.Generator().manual_seed(1)
INPUTS = torch.randn(300, 1, 28, 28, generator=POOL)
INPUTS[17] = float("nan")  # a NaN sample never exits early


def assert_same(got: eefast.Prediction, want: eefast.Prediction) -> None:
    """Same exits and costs; logits equal but for the last bit where one side ran a segment on a single
    row (oneDNN convolves one row with another kernel than several: 2.4e-7 at most here)."""
    assert torch.equal(got.exit, want.exit)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert torch.equal(got.cost, want.cost)


@settings(max_examples=10, deadline=None)
@given(sizes=st.lists(st.integers(0, 25), min_size=1, max_size=12), batch_size=st.integers(1, 24),  # <= 300: INPUTS
       policy=st.sampled_from(["confidence", "max_prob", "entropy"]))
def test_map_equals_predict_for_any_request_sizes(model, sizes, batch_size, policy):
    model.policy = policy
    x = INPUTS[: sum(sizes)]
    requests = list(torch.split(x, sizes))
    stream = EENetStream(model, batch_size=batch_size)
    results = list(stream.map(requests))
    assert [r.exit.shape[0] for r in results] == sizes  # one result per request, in input order
    assert_same(eefast.Prediction(*(torch.cat(parts) for parts in zip(*results))), model.predict(x))
    model.policy = "confidence"


def test_segments_run_full_batches_until_the_end(model):
    stream = EENetStream(model, batch_size=16)
    results = list(stream.map(INPUTS[:256].split(1)))  # one sample per request
    assert len(results) == 256
    full = [rows // 16 for rows in stream.segment_rows]
    partial = [runs - f for runs, f in zip(stream.segment_runs, full)]
    assert all(p <= 1 for p in partial)  # at most one partial batch per segment: the final flush
    assert stream.segment_rows[0] == 256


def test_map_takes_dataloader_batches_and_bounds_what_it_buffers(model):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(INPUTS[:64], torch.zeros(64)), batch_size=4)
    stream = EENetStream(model, batch_size=32, max_buffered=8)
    got = list(stream.map(loader))
    assert_same(eefast.Prediction(*(torch.cat(p) for p in zip(*got))), model.predict(INPUTS[:64]))


def test_submit_under_concurrent_load_returns_every_result_in_order(model):
    want = model.predict(INPUTS)
    errors: list[BaseException] = []

    def client(seed: int, stream: EENetStream, count: int) -> None:
        rng = random.Random(seed)
        try:
            futures = []
            for _ in range(count):
                start = rng.randrange(0, 290)
                size = rng.randint(1, 10)
                futures.append((start, size, stream.submit(INPUTS[start : start + size])))
            for start, size, future in futures:
                got = future.result(timeout=120)
                assert_same(got, eefast.Prediction(*(t[start : start + size] for t in want)))
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    with EENetStream(model, batch_size=32, max_delay=0.002, max_pending=96) as stream:  # submit blocks past 96
        threads = [threading.Thread(target=client, args=(seed, stream, 40)) for seed in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[0]


@pytest.mark.slow
def test_ten_thousand_requests_from_eight_threads(model):
    """8 clients, 10,000 requests of 1-16 samples in all: every result, in order, none lost or repeated."""
    want = model.predict(INPUTS)
    results: dict[int, list] = {}

    def client(seed: int, stream: EENetStream) -> None:
        rng = random.Random(seed)
        mine = results.setdefault(seed, [])
        for _ in range(1250):
            start, size = rng.randrange(0, 284), rng.randint(1, 16)
            mine.append((start, size, stream.submit(INPUTS[start : start + size])))

    with EENetStream(model, batch_size=64, max_delay=0.002) as stream:
        threads = [threading.Thread(target=client, args=(seed, stream)) for seed in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sum(len(v) for v in results.values()) == 10_000
    for mine in results.values():
        for start, size, future in mine:
            assert_same(future.result(timeout=0), eefast.Prediction(*(t[start : start + size] for t in want)))


@pytest.mark.parametrize("cancel", [False, True], ids=["complete", "cancel"])
def test_shutdown_mid_load_completes_or_cancels_every_request(model, cancel):
    stream = EENetStream(model, batch_size=64, max_delay=None)  # nothing runs until a batch fills or close()
    futures = [stream.submit(INPUTS[i : i + 3]) for i in range(0, 60, 3)]
    stream.close(cancel=cancel)
    with pytest.raises(RuntimeError, match="the stream is closed"):
        stream.submit(INPUTS[:1])
    assert all(f.done() for f in futures)  # none left pending
    if cancel:  # 60 rows never filled a batch of 64: every request was still in flight
        for f in futures:
            with pytest.raises(concurrent.futures.CancelledError):
                f.result()
    else:
        want = model.predict(INPUTS[:60])
        for i, f in enumerate(futures):
            assert_same(f.result(), eefast.Prediction(*(t[3 * i : 3 * i + 3] for t in want)))


def test_backpressure_without_max_delay_runs_partial_batches_instead_of_waiting_forever(model):
    with EENetStream(model, batch_size=64, max_delay=None, max_pending=4) as stream:
        futures = [stream.submit(INPUTS[i : i + 1]) for i in range(12)]  # the 5th waits for the first 4
        assert all(f.result(timeout=60).exit.shape == (1,) for f in futures[:8])
    want = model.predict(INPUTS[:12])
    for i, f in enumerate(futures):
        assert_same(f.result(), eefast.Prediction(*(t[i : i + 1] for t in want)))


def test_a_request_cancelled_by_its_caller_leaves_the_others_alone(model):
    with EENetStream(model, batch_size=64, max_delay=None) as stream:
        first, second, third = (stream.submit(INPUTS[i : i + 2]) for i in (0, 2, 4))
        second.cancel()  # pending or running: either way the others complete
    assert first.result().exit.shape == (2,) and third.result().exit.shape == (2,)


def test_callbacks_may_submit_and_inputs_are_copied(model):
    x = INPUTS[:3].clone()
    with EENetStream(model, batch_size=4, max_delay=0.001, max_pending=1) as stream:
        chained: list = []
        submitted = threading.Event()

        def resubmit(_):
            chained.append(stream.submit(INPUTS[3:5]))  # on the worker, past max_pending: must not wait on itself
            submitted.set()

        first = stream.submit(x)
        first.add_done_callback(resubmit)
        x.fill_(float("nan"))  # the caller reuses its buffer: the stream computed on a copy
        assert submitted.wait(timeout=60)
    assert_same(first.result(), eefast.Prediction(*(t[:3] for t in model.predict(INPUTS[:3]))))
    assert chained and chained[0].result(timeout=60).exit.shape == (2,)


def test_map_and_submit_do_not_share_a_stream(model):
    stream = EENetStream(model, batch_size=8)
    results = stream.map([INPUTS[:2]])
    with pytest.raises(RuntimeError, match="this stream runs map"):
        stream.submit(INPUTS[:1])
    list(results)
    stream.submit(INPUTS[:1]).result(timeout=60)
    with pytest.raises(RuntimeError, match="serves submit"):
        stream.map([INPUTS[:1]])
    stream.close()
    with pytest.raises(TypeError, match="expected a tensor \\[b, C, H, W\\], got list"):
        EENetStream(model).submit([1, 2])


def test_a_bad_request_fails_alone(model):
    with EENetStream(model, batch_size=8, max_delay=0.001) as stream:
        good = stream.submit(INPUTS[:5])
        bad = stream.submit(torch.randn(2, 3, 28, 28))
        empty = stream.submit(INPUTS[:0])
        also_good = stream.submit(INPUTS[5:9])
    with pytest.raises(ValueError, match=r"expected input of shape \[B, 1, H, W\]"):
        bad.result()
    assert empty.result().exit.shape == (0,)
    want = model.predict(INPUTS[:9])
    assert_same(good.result(), eefast.Prediction(*(t[:5] for t in want)))
    assert_same(also_good.result(), eefast.Prediction(*(t[5:9] for t in want)))


def test_stream_arguments_are_checked(model):
    with pytest.raises(ValueError, match="expected batch_size an integer >= 1, got 0"):
        EENetStream(model, batch_size=0)
    with pytest.raises(ValueError, match="expected max_delay a finite number of seconds >= 0 or None, got -1"):
        EENetStream(model, max_delay=-1)
    with pytest.raises(ValueError, match="expected max_pending an integer >= 1 or None, got 0"):
        EENetStream(model, max_pending=0)
    with pytest.raises(TypeError, match="expected an eefast.EENet, got Linear"):
        EENetStream(torch.nn.Linear(2, 2))


def test_predict_command_writes_a_row_per_sample_matching_eval(tmp_path, capsys):
    from eefast.checkpoint import save_checkpoint
    from eefast.data import load_dataset
    from eefast.evaluate import evaluate

    torch.manual_seed(0)
    model = eefast.create_model("eenet8", filters=2, policy="max_prob", threshold=0.3)
    save_checkpoint(tmp_path / "model.pt", {"model_name": "eenet8", "model_kwargs": {"filters": 2},
                                            "model_state": model.state_dict(), "policy": "max_prob", "threshold": 0.3})
    out = tmp_path / "predictions.csv"
    out = tmp_path / "new" / "predictions.csv"  # a folder predict makes
    assert cli.main(["predict", "--checkpoint", str(tmp_path / "model.pt"), "--out", str(out), "--split", "val",
                     "--batch-size", "32", "--request-size", "5", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = list(csv.DictReader(out.open()))
    assert [r["index"] for r in rows] == [str(i) for i in range(400)]
    want = evaluate(model.eval(), load_dataset("mnist-sample", augment=False).val)
    assert summary["exit_counts"] == want.exit_counts and summary["samples"] == 400
    assert summary["accuracy"] == pytest.approx(want.accuracy) and summary["relative_cost"] == pytest.approx(
        want.relative_cost)
    assert cli.main(["predict", "--checkpoint", str(tmp_path / "model.pt"), "--out", str(tmp_path)]) == 2
    assert "expected a file path, found a directory" in capsys.readouterr().err
