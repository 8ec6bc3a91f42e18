"""Streaming early-exit inference: the survivors of many requests re-batched in front of each segment.

``EENet.predict`` shrinks a batch as its samples leave, so the later segments run on few rows, and
a caller with one image at a time runs every segment at batch 1. ``EENetStream`` keeps one queue of
rows in front of each segment (E3, SOSP'24): a segment runs when its queue holds ``batch_size`` rows,
on exactly that many, whatever the requests' sizes and the exit mix; rows that exit write their
request's result, the rest join the next segment's queue. Partial batches run only on a flush (the
end of ``map``, ``flush()``, ``close()``) or when the oldest waiting request has waited ``max_delay``.

Two ways in:

- ``for prediction in stream.map(batches)``: offline, on the calling thread, one ``Prediction`` per
  input batch, in input order.
- ``future = stream.submit(x)``: online, from any thread; a background worker runs the segments and
  resolves each ``concurrent.futures.Future`` with the request's ``Prediction``. ``close()`` completes
  every request in flight (``close(cancel=True)`` cancels them instead); none is dropped silently.

Each sample's exit, logits and cost are those of ``model.predict`` on it: each row of a segment is
computed on its own in eval mode. Batch composition can change the convolution algorithm, so
logits agree to float tolerance, not always bit for bit: on the CPU, oneDNN convolves a single row
with another kernel than several (a last-bit difference, 2.4e-7 at most in the tests); on a GPU,
cuDNN picks algorithms by batch size. Exits differ only where a score lies within that of its
threshold.

Memory: between steps each queue holds fewer than ``batch_size`` rows, plus the newest requests' rows
in the first queue; ``map`` holds the results of at most ``max_buffered`` samples that finished after
an unfinished earlier one (past it, partial batches run until the oldest request finishes);
``submit`` blocks while ``max_pending`` submitted samples are unresolved.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from eefast import ops
from eefast.eenet import EENet, Prediction

__all__ = ["EENetStream"]


@dataclass
class _Request:
    """One request's rows in flight: its results fill in as its rows leave."""

    logits: Tensor  # [b, K] on the model's device
    exit: Tensor  # [b] int64
    remaining: int  # rows not yet finished
    admitted: float  # time.monotonic() at admission
    future: concurrent.futures.Future | None = None

    @property
    def done(self) -> bool:
        return self.remaining == 0


@dataclass
class _Queue:
    """Rows waiting in front of one segment, in arrival order: feature chunks and their owners."""

    chunks: collections.deque = field(default_factory=collections.deque)  # (h [r, ...], request ids [r], rows [r])
    rows: int = 0

    def push(self, h: Tensor, owners: Tensor, rows: Tensor) -> None:
        if h.shape[0]:
            self.chunks.append((h, owners, rows))
            self.rows += h.shape[0]

    def pop(self, count: int) -> tuple[Tensor, Tensor, Tensor]:
        """The first ``count`` rows, as one batch."""
        parts = []
        taken = 0
        while taken < count:
            h, owners, rows = self.chunks.popleft()
            need = count - taken
            if h.shape[0] > need:  # split the chunk: the rest stays at the front
                self.chunks.appendleft((h[need:], owners[need:], rows[need:]))
                h, owners, rows = h[:need], owners[:need], rows[:need]
            parts.append((h, owners, rows))
            taken += h.shape[0]
        self.rows -= count
        if len(parts) == 1:
            return parts[0]
        return tuple(torch.cat(p) for p in zip(*parts))


def _resolve(future: concurrent.futures.Future | None, result: Prediction) -> None:
    """Sets a request's result unless its caller cancelled it first."""
    if future is not None and not future.done():
        try:
            future.set_result(result)
        except concurrent.futures.InvalidStateError:  # cancelled in between
            pass


def _fail(future: concurrent.futures.Future | None, error: BaseException) -> None:
    if future is not None and not future.done():
        try:
            future.set_exception(error)
        except concurrent.futures.InvalidStateError:
            pass


class EENetStream:
    """Early-exit inference over a stream of requests, every segment run on full batches.

    ``batch_size``: the rows each segment runs on (on a GPU with CUDA graphs, a bucket size of
    ``eefast.graphs`` avoids padding). ``max_delay``: seconds the oldest request of a partial batch
    may wait before partial batches run (``submit`` only; ``None``: until ``flush`` / ``close``).
    The model is put in eval mode; its exit policy and thresholds are read at every step.
    """

    def __init__(self, model: EENet, batch_size: int = 64, max_delay: float | None = 0.005,
                 max_buffered: int | None = None, max_pending: int | None = None):
        if not isinstance(model, EENet):
            raise TypeError(f"EENetStream: expected an eefast.EENet, got {type(model).__name__}")
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"EENetStream: expected batch_size an integer >= 1, got {batch_size!r}")
        if max_delay is not None and not (max_delay >= 0 and max_delay < float("inf")):
            raise ValueError(f"EENetStream: expected max_delay a finite number of seconds >= 0 or None, got {max_delay!r}")
        for name, value in (("max_buffered", max_buffered), ("max_pending", max_pending)):
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise ValueError(f"EENetStream: expected {name} an integer >= 1 or None, got {value!r}")
        self.model = model.eval()
        self.batch_size = batch_size
        self.max_delay = max_delay
        self.max_buffered = 16 * batch_size if max_buffered is None else max_buffered
        self.max_pending = 64 * batch_size if max_pending is None else max_pending
        self.queues = [_Queue() for _ in range(model.num_exits)]
        self.requests: dict[int, _Request] = {}  # in flight, by id
        self._next_id = 0
        self.segment_runs = [0] * model.num_exits  # batches each segment ran (full or partial)
        self.segment_rows = [0] * model.num_exits  # rows each segment ran
        # submit(): the worker thread, its inbox, and whether close() was called
        self._inbox: collections.deque = collections.deque()
        self._wake = threading.Condition()
        self._worker: threading.Thread | None = None
        self._closing = False
        self._cancel = False
        self._unresolved = 0  # samples submitted whose futures are not done
        self._mapping = False  # a map() is running

    # ---- the engine (one thread at a time) --------------------------------------------------

    def _admit(self, x: Tensor, future: concurrent.futures.Future | None = None) -> _Request:
        """Checks ``x`` [b, C, H, W] as ``predict`` does and queues its rows in front of segment 0."""
        model = self.model
        if not isinstance(x, Tensor):
            raise TypeError(f"EENetStream: expected a request as a tensor [b, C, H, W], got {type(x).__name__}")
        x = x.to(model.costs.device)
        model.check_input(x)
        rows = x.shape[0]
        request = _Request(x.new_empty(rows, model.num_classes), torch.full((rows,), -1, dtype=torch.int64,
                           device=x.device), rows, time.monotonic(), future)
        ident = self._next_id
        self._next_id += 1
        if rows == 0:
            _resolve(future, self._prediction(request))
            return request
        self.requests[ident] = request
        self.queues[0].push(x, torch.full((rows,), ident, dtype=torch.int64), torch.arange(rows))
        return request

    def _run(self, n: int, count: int) -> None:
        """Segment ``n`` on the first ``count`` rows of its queue: the rows that exit finish their
        requests' results; the rest join queue n + 1."""
        model = self.model
        h, owners, rows = self.queues[n].pop(count)
        self.segment_runs[n] += 1
        self.segment_rows[n] += count
        if n == len(model.exits):  # the final exit: every row finishes
            (logits,) = model.run_segment(n, h)
            self._finish(logits, owners, rows, n)
            return
        h, score, logits = model.run_segment(n, h)
        # the compaction op, as predict runs it: exiting rows write their logits and exit number
        # into the batch's outputs at their position; the survivors come back compacted, in order
        out_logits = logits.new_empty(count, model.num_classes)
        out_exit = torch.full((count,), -1, dtype=torch.int64, device=h.device)
        position = torch.arange(count, device=h.device)
        h, kept = ops.compact_exits(h, logits, score, position, model.threshold[n], n, out_logits, out_exit)
        kept = kept.cpu()  # the survivors' positions: the rows not among them left here
        leaving = torch.ones(count, dtype=torch.bool)
        leaving[kept] = False
        if bool(leaving.any()):
            where = leaving.nonzero().squeeze(1)
            self._finish(out_logits[where.to(h.device)], owners[where], rows[where], n)
        self.queues[n + 1].push(h, owners[kept], rows[kept])

    def _finish(self, logits: Tensor, owners: Tensor, rows: Tensor, n: int) -> None:
        """Writes finished rows (``logits`` [r, K], their request ids and rows) into their requests."""
        starts = torch.ones(owners.shape[0], dtype=torch.bool)
        starts[1:] = owners[1:] != owners[:-1]  # a request's rows travel together: runs of one owner
        bounds = [*starts.nonzero().squeeze(1).tolist(), owners.shape[0]]
        device = logits.device
        for a, b in zip(bounds, bounds[1:]):
            ident = int(owners[a])
            request = self.requests[ident]
            at = rows[a:b].to(device)
            request.logits.index_copy_(0, at, logits[a:b])
            request.exit.index_fill_(0, at, n)
            request.remaining -= b - a
            if request.done:
                del self.requests[ident]
                _resolve(request.future, self._prediction(request))

    def _prediction(self, request: _Request) -> Prediction:
        return Prediction(request.logits, request.exit, self.model.costs[request.exit])

    def _pump(self, flush: bool = False) -> None:
        """Runs every full batch (deepest segment first); with ``flush``, then partial batches
        (shallowest first, so that their survivors can fill deeper queues) until no row waits."""
        if self.model.training:
            self.model.eval()
        with torch.no_grad():
            while True:
                full = [n for n, q in enumerate(self.queues) if q.rows >= self.batch_size]
                if full:
                    self._run(full[-1], self.batch_size)
                    continue
                waiting = [n for n, q in enumerate(self.queues) if q.rows]
                if flush and waiting:
                    self._run(waiting[0], self.queues[waiting[0]].rows)
                    continue
                return

    # ---- offline: map ----------------------------------------------------------------------

    def map(self, batches: Iterable) -> Iterator[Prediction]:
        """One ``Prediction`` per input batch [b, C, H, W] (or ``(x, y, ...)`` tuple, as a DataLoader
        yields), in input order, on the calling thread; partial batches run at the end. A stream
        serves either ``map`` (one at a time) or ``submit``."""
        with self._wake:
            if self._closing or self._worker is not None or self._mapping:
                raise RuntimeError("EENetStream.map: this stream is closed, serves submit() or runs another map; "
                                   "expected a stream of its own")
            self._mapping = True
        return self._map(batches)

    def _map(self, batches: Iterable) -> Iterator[Prediction]:
        try:
            yield from self._map_all(batches)
        finally:
            with self._wake:
                self._mapping = False

    def _map_all(self, batches: Iterable) -> Iterator[Prediction]:
        pending: collections.deque[_Request] = collections.deque()
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            pending.append(self._admit(x))
            self._pump()
            if not pending[0].done and sum(r.logits.shape[0] for r in pending if r.done) > self.max_buffered:
                self._pump(flush=True)  # the oldest request's rows run in partial batches
            while pending and pending[0].done:
                yield self._prediction(pending.popleft())
        self._pump(flush=True)
        while pending:
            yield self._prediction(pending.popleft())

    def flush(self) -> None:
        """Runs partial batches until no row waits (``map``'s caller thread; ``submit``: the worker does)."""
        if self._worker is not None:
            with self._wake:
                self._inbox.append("flush")
                self._wake.notify_all()
            return
        self._pump(flush=True)

    # ---- online: submit ----------------------------------------------------------------------

    def submit(self, x: Tensor) -> concurrent.futures.Future:
        """Queues ``x`` [b, C, H, W] (a copy: the caller may reuse its tensor); the future resolves to
        its ``Prediction`` (or the error its input raised). Thread-safe; starts the worker on first use.
        Blocks while ``max_pending`` submitted samples are unresolved (asking the worker to run partial
        batches meanwhile, so a wait always ends); a request larger than that waits until none is."""
        if not isinstance(x, Tensor):
            raise TypeError(f"EENetStream.submit: expected a tensor [b, C, H, W], got {type(x).__name__}")
        rows = x.shape[0] if x.dim() > 0 else 1
        x = x.detach().clone()
        future: concurrent.futures.Future = concurrent.futures.Future()
        on_worker = threading.current_thread() is self._worker  # from a done-callback: never wait on itself
        with self._wake:
            if self._mapping:
                raise RuntimeError("EENetStream.submit: this stream runs map(); expected a stream of its own")
            while (self._unresolved and self._unresolved + rows > self.max_pending and not self._closing
                   and not on_worker):
                if "flush" not in self._inbox:
                    self._inbox.append("flush")
                    self._wake.notify_all()
                self._wake.wait()
            if self._closing:
                raise RuntimeError("EENetStream.submit: the stream is closed")
            if self._worker is None:
                self._worker = threading.Thread(target=self._serve, name="eefast-stream", daemon=True)
                self._worker.start()
            self._unresolved += rows
            self._inbox.append((x, future))
            self._wake.notify_all()
        future.add_done_callback(lambda _, rows=rows: self._resolved(rows))
        return future

    def _resolved(self, rows: int) -> None:
        with self._wake:
            self._unresolved -= rows
            self._wake.notify_all()

    def _oldest_wait(self) -> float | None:
        """Seconds until the oldest request in flight has waited ``max_delay`` (None: nothing waits)."""
        if not self.requests or self.max_delay is None:
            return None
        oldest = min(r.admitted for r in self.requests.values())
        return max(0.0, oldest + self.max_delay - time.monotonic())

    def _serve(self) -> None:
        try:
            self._serve_until_closed()
        except BaseException as error:  # noqa: BLE001 - a bug here must not leave futures hanging
            with self._wake:
                self._closing = True
                items = list(self._inbox)
                self._inbox.clear()
            for item in items:
                if item != "flush":
                    _fail(item[1], error)
            for request in self.requests.values():
                _fail(request.future, error)
            self._drop_all()
            raise

    def _serve_until_closed(self) -> None:
        while True:
            with self._wake:
                while not self._inbox and not self._closing:
                    wait = self._oldest_wait()
                    if wait == 0.0:
                        break
                    self._wake.wait(timeout=wait)
                items = list(self._inbox)
                self._inbox.clear()
                closing, cancel = self._closing, self._cancel
            flush = False
            for item in items:
                if item == "flush":
                    flush = True
                    continue
                x, future = item
                if cancel:
                    future.cancel()
                    continue
                if not future.set_running_or_notify_cancel():  # the caller cancelled it while it waited
                    continue
                try:
                    self._admit(x, future)
                except Exception as error:  # a bad input fails its own request, not the stream
                    _fail(future, error)
            try:
                if cancel:
                    self._cancel_all()
                else:
                    self._pump(flush=flush or closing or self._oldest_wait() == 0.0)
            except Exception as error:  # a failing segment fails every request in flight
                for request in self.requests.values():
                    _fail(request.future, error)
                self._drop_all()
            if closing:
                return

    def _drop_all(self) -> None:
        self.requests.clear()
        self.queues = [_Queue() for _ in self.queues]

    def _cancel_all(self) -> None:
        cancelled = concurrent.futures.CancelledError("EENetStream.close(cancel=True): cancelled in flight")
        for request in self.requests.values():  # running futures cannot be cancel()ed: they end with the error
            _fail(request.future, cancelled)
        self._drop_all()

    def close(self, cancel: bool = False) -> None:
        """Stops accepting requests; completes every request in flight (``cancel=True``: cancels
        them; their futures raise ``CancelledError``) and waits for the worker."""
        with self._wake:
            self._closing = True
            self._cancel = cancel
            self._wake.notify_all()
        if self._worker is not None:
            if threading.current_thread() is not self._worker:  # from a done-callback the worker ends by itself
                self._worker.join()
        elif cancel:
            self._drop_all()
        else:
            self._pump(flush=True)

    def __enter__(self) -> EENetStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close(cancel=exc[0] is not None)
