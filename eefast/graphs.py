"""CUDA graphs for batched early-exit inference.

On a GPU a small batch is bound by the host: every convolution, batch norm and exit head costs
a few microseconds of Python and a kernel launch whatever the number of rows, so removing
exited rows from the batch saves device time the host cannot use. A CUDA graph replays a
whole segment (a stage and its exit head) with one launch.

``SegmentGraphs`` captures each segment of an ``EENet`` once per *bucket* of batch sizes and
replays it: the running rows are copied into the bucket's static input, rows past them are
padding (inference is per-sample, so they never touch the real rows), and the outputs are the
first rows of the static outputs. Buckets are powers of two and 1.5 times powers of two
(1, 2, 3, 4, 6, 8, 12, 16, ...): padding is under a third of a bucket. Graphs are captured on first
use of a (segment, bucket, input shape, dtype, layout).

The graphs share one memory pool. That is safe because every replay's outputs are read (copied
out by ``compact_exits``, or into the next segment's static input, or into the result) before
another graph is replayed: a later graph may reuse an earlier one's scratch memory, never
memory whose contents are still to be read.

Imports torch and eefast.ops only.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from eefast.ops import compacted_memory_format

__all__ = ["bucket_size", "capture", "CapturedGraph", "SegmentGraphs"]


def bucket_size(rows: int) -> int:
    """The smallest of 1, 2, 3, 4, 6, 8, 12, 16, ... (powers of two and 1.5x powers of two) >= rows."""
    if rows < 1:
        raise ValueError(f"bucket_size: expected rows >= 1, got {rows}")
    power = 1 << (rows - 1).bit_length()  # smallest power of two >= rows
    three_quarters = 3 * power // 4  # 1.5x the power of two below it
    return three_quarters if power >= 4 and rows <= three_quarters else power


_CAPTURE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _capture_stream() -> torch.cuda.Stream:
    """One side stream per device for warming up and capturing every graph."""
    device = torch.cuda.current_device()
    if device not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[device] = torch.cuda.Stream(device)
    return _CAPTURE_STREAMS[device]


class CapturedGraph:
    """``fn`` captured in a CUDA graph on static inputs: ``replay()`` reruns it and leaves the
    results in ``outputs``.

    ``eager=True`` makes the stand-in used off the GPU: ``replay()`` calls ``fn`` and copies its
    results into the same static outputs, so the bucketing around graphs runs (and is tested)
    on the CPU.
    """

    def __init__(self, fn: Callable[..., tuple[Tensor, ...]], inputs: Sequence[Tensor], pool=None,
                 warmup: int = 3, eager: bool = False):
        self.fn = fn
        self.inputs = tuple(inputs)
        self.graph = None
        if eager:
            self.outputs = tuple(t.clone() for t in fn(*self.inputs))
            return
        # Warm up on the stream that will capture: lazy initialisation (cuBLAS and cuDNN handles and
        # workspaces are per stream), cuDNN's and Triton's first-use work all happen before capture.
        stream = _capture_stream()
        stream.wait_stream(torch.cuda.current_stream())
        gc.collect()  # cyclic garbage holding a CUDA graph must not be destroyed during the capture
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, stream=stream):
            self.outputs = tuple(fn(*self.inputs))

    def replay(self) -> tuple[Tensor, ...]:
        if self.graph is None:
            for static, value in zip(self.outputs, self.fn(*self.inputs)):
                static.copy_(value)
        else:
            self.graph.replay()
        return self.outputs


def capture(fn: Callable[..., tuple[Tensor, ...]], *inputs: Tensor, pool=None) -> CapturedGraph:
    """``fn(*inputs)`` captured in a CUDA graph (its own static copies of ``inputs``)."""
    return CapturedGraph(fn, [t.clone() for t in inputs], pool)


class SegmentGraphs:
    """Each segment of an EENet in CUDA graphs, per batch-size bucket (see the module docstring).

    ``run(model, n, h)`` is ``model.segment(n, h)`` on the running rows ``h [M, ...]`` (stage n
    and exit n, or the last stage and the final classifier), replayed from the graph of h's
    bucket. The results are views of the graph's static outputs, valid until that graph is
    replayed again.

    The graphs hold the model's parameters by address: moving or casting the model (``.to``,
    ``.half()``) drops them (``EENet`` does so), and so must replacing a parameter tensor.
    Changing parameter values in place (an optimizer step, ``load_state_dict``) is fine. The
    graphs reach the model only through a weak reference: no reference cycle keeps them alive
    for the garbage collector to destroy at some later moment (a graph destroyed during another
    capture invalidates that capture).
    """

    def __init__(self, eager: bool = False):
        self.eager = eager
        self.pool = None  # the graphs' shared memory pool, made at the first capture
        self.graphs: dict[tuple, CapturedGraph] = {}

    def __getstate__(self) -> dict:  # copies and pickles of the model capture their own graphs
        return {"eager": self.eager, "pool": None, "graphs": {}}

    def run(self, model, n: int, h: Tensor) -> tuple[Tensor, ...]:
        rows = h.shape[0]
        bucket = bucket_size(rows)
        layout = compacted_memory_format(h)  # the layout compact_exits keeps: channels_last stays so
        key = (n, bucket, tuple(h.shape[1:]), h.dtype, layout, h.device)
        graph = self.graphs.get(key)
        if graph is None:
            static = torch.zeros((bucket, *h.shape[1:]), dtype=h.dtype, device=h.device).contiguous(memory_format=layout)
            static[:rows].copy_(h)
            if self.pool is None and not self.eager:
                self.pool = torch.cuda.graph_pool_handle()
            model_ref = weakref.ref(model)
            segment = lambda h, n=n: model_ref().segment(n, h)  # noqa: E731
            with contextlib.nullcontext() if self.eager else torch.cuda.device(h.device):  # capture on h's GPU
                graph = self.graphs[key] = CapturedGraph(segment, [static], self.pool, eager=self.eager)
        else:
            graph.inputs[0][:rows].copy_(h)
        return tuple(t[:rows] for t in graph.replay())

    def __len__(self) -> int:
        return len(self.graphs)
