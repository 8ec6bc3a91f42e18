"""compact_exits: the compiled op (C++ CPU, CUDA) and the fallback against eefast.reference."""

from __future__ import annotations

import pytest
import torch

from eefast import ops, reference
from tests.conftest import require

# label: (rows M, trailing feature shape, classes K, batch B)
SHAPES = {
    "minimal": (1, (1,), 1, 1),
    "nchw-odd": (13, (3, 5, 7), 10, 20),
    "flat-129": (37, (129,), 3, 37),
    "ncdhw": (6, (2, 3, 3, 5), 4, 11),
    "k1000": (5, (4, 2, 2), 1000, 9),
    "empty": (0, (3, 4, 4), 10, 4),
}
PATTERNS = ["random", "all-exit", "none-exit", "nan"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
THRESHOLD = 0.5


def make_inputs(shape, pattern, dtype, device="cpu", seed=0, layout="contiguous"):
    rows, features, classes, batch = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, *features, generator=g).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    elif layout == "strided":  # a non-contiguous view: every other feature of a wider tensor
        x = torch.randn(rows, features[0] * 2, *features[1:], generator=g).to(dtype)[:, ::2]
    logits = torch.randn(rows, classes, generator=g).to(dtype)
    confidence = torch.rand(rows, generator=g)
    if pattern == "all-exit":
        confidence = 0.5 + confidence / 2
    elif pattern == "none-exit":
        confidence = confidence * 0.49
    elif pattern == "nan":
        confidence[::2] = float("nan")
        confidence[1::4] = 1.0
    index = torch.randperm(batch, generator=g)[:rows]
    tensors = (x, logits, confidence.to(dtype), index)
    return tuple(t.to(device) for t in tensors), batch, classes


def out_buffers(batch, classes, dtype, device):
    return (
        torch.zeros(batch, classes, dtype=dtype, device=device),
        torch.full((batch,), -1, dtype=torch.int64, device=device),
    )


def expected(inputs, threshold, exit_index, batch, classes):
    """eefast.reference on copies, with the documented layout of the compacted rows."""
    x, logits, confidence, index = inputs
    out_logits, out_exit = out_buffers(batch, classes, logits.dtype, x.device)
    x_kept, index_kept = reference.compact_exits(
        x, logits, confidence, index, threshold, exit_index, out_logits, out_exit
    )
    return x_kept.contiguous(memory_format=ops.compacted_memory_format(x)), index_kept, out_logits, out_exit


def compiled_op(*args):
    return torch.ops.eefast.compact_exits(*args)


def fallback_op(*args):
    return ops._compact_exits_fallback(*args, padded=False)


IMPLS = {"compiled": compiled_op, "fallback": fallback_op}


@pytest.fixture(params=list(IMPLS))
def impl(request):
    if request.param == "compiled":
        request.getfixturevalue("extension")
    return IMPLS[request.param]


def run(impl, inputs, batch, classes, threshold=THRESHOLD, exit_index=2):
    x, logits, confidence, index = inputs
    out_logits, out_exit = out_buffers(batch, classes, logits.dtype, x.device)
    x_kept, index_kept = impl(x, logits, confidence, index, threshold, exit_index, out_logits, out_exit)
    return x_kept, index_kept, out_logits, out_exit


def assert_same(got, want):
    names = ["x_kept", "index_kept", "out_logits", "out_exit"]
    for name, g, w in zip(names, got, want):
        assert g.shape == w.shape, f"{name}: shape {list(g.shape)} != {list(w.shape)}"
        assert g.dtype == w.dtype, f"{name}: dtype {g.dtype} != {w.dtype}"
        assert torch.equal(g, w), f"{name} differs"
    if got[0].numel() > 1:
        assert got[0].stride() == want[0].stride(), f"x_kept strides {got[0].stride()} != {want[0].stride()}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_reference(impl, shape, pattern, dtype):
    inputs, batch, classes = make_inputs(shape, pattern, dtype)
    assert_same(run(impl, inputs, batch, classes), expected(inputs, THRESHOLD, 2, batch, classes))


@pytest.mark.parametrize(
    "shape, layout",
    [
        (SHAPES["nchw-odd"], "channels_last"),
        ((9, (1, 1, 1), 3, 9), "channels_last"),
        (SHAPES["ncdhw"], "channels_last_3d"),
        (SHAPES["nchw-odd"], "strided"),
    ],
    ids=["channels_last", "channels_last-1x1", "channels_last_3d", "strided"],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layouts(impl, shape, layout, dtype):
    inputs, batch, classes = make_inputs(shape, "random", dtype, layout=layout)
    got = run(impl, inputs, batch, classes)
    assert_same(got, expected(inputs, THRESHOLD, 2, batch, classes))
    if layout.startswith("channels_last") and got[0].shape[0] > 1 and shape[1][1:] != (1, 1):
        fmt = torch.channels_last if layout == "channels_last" else torch.channels_last_3d
        assert got[0].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_threshold_compared_like_pytorch(impl, dtype):
    """Confidences at and around a threshold that the dtype cannot represent exactly."""
    threshold = 0.1
    t = torch.tensor(threshold, dtype=dtype)
    step = torch.finfo(dtype).eps * 0.1
    confidence = torch.stack([t - step, t, t + step, t.nextafter(torch.tensor(0.0, dtype=dtype))]).to(dtype)
    rows = confidence.shape[0]
    inputs = (torch.randn(rows, 3), torch.randn(rows, 2).to(dtype), confidence, torch.arange(rows))
    assert_same(
        run(impl, inputs, rows, 2, threshold=threshold), expected(inputs, threshold, 2, rows, 2)
    )


def test_nan_never_exits(impl):
    inputs, batch, classes = make_inputs(SHAPES["nchw-odd"], "random", torch.float32)
    x, logits, confidence, index = inputs
    confidence = torch.full_like(confidence, float("nan"))
    x_kept, index_kept, _, out_exit = run(impl, (x, logits, confidence, index), batch, classes, threshold=0.0)
    assert torch.equal(x_kept, x) and torch.equal(index_kept, index)
    assert (out_exit == -1).all()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_padded_matches_compact(extension, layout):
    for pattern in PATTERNS:
        inputs, batch, classes = make_inputs(SHAPES["nchw-odd"], pattern, torch.float32, layout=layout)
        x_kept, index_kept, out_logits, out_exit = expected(inputs, THRESHOLD, 1, batch, classes)
        for padded_op in (torch.ops.eefast.compact_exits_padded, lambda *a: ops._compact_exits_fallback(*a, padded=True)):
            got_logits, got_exit = out_buffers(batch, classes, torch.float32, "cpu")
            x_pad, index_pad, count = padded_op(*inputs, THRESHOLD, 1, got_logits, got_exit)
            survivors = x_kept.shape[0]
            assert count.dtype == torch.int64 and count.dim() == 0 and int(count) == survivors
            assert x_pad.shape == inputs[0].shape and index_pad.shape == inputs[3].shape
            assert x_pad.stride() == torch.empty_like(x_pad, memory_format=ops.compacted_memory_format(inputs[0])).stride()
            assert torch.equal(x_pad[:survivors], x_kept) and torch.equal(index_pad[:survivors], index_kept)
            assert (x_pad[survivors:] == 0).all() and (index_pad[survivors:] == -1).all()
            assert torch.equal(got_logits, out_logits) and torch.equal(got_exit, out_exit)


def test_public_op_dispatches_and_matches():
    inputs, batch, classes = make_inputs(SHAPES["nchw-odd"], "random", torch.float32)
    x, logits, confidence, index = inputs
    out_logits, out_exit = out_buffers(batch, classes, torch.float32, "cpu")
    got = ops.compact_exits(x, logits, confidence, index, THRESHOLD, 2, out_logits, out_exit)
    assert_same((*got, out_logits, out_exit), expected(inputs, THRESHOLD, 2, batch, classes))


@pytest.mark.parametrize("op", ["compact_exits", "compact_exits_padded"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(extension, op, layout):
    for pattern in ["random", "all-exit", "none-exit"]:
        inputs, batch, classes = make_inputs(SHAPES["nchw-odd"], pattern, torch.float32, layout=layout)
        args = (*inputs, THRESHOLD, 1, *out_buffers(batch, classes, torch.float32, "cpu"))
        torch.library.opcheck(getattr(torch.ops.eefast, op), args)


# Bad input: (label, how to break the arguments, exception type, words the message must hold)
BAD_INPUTS = [
    ("x-0d", lambda a: a.update(x=torch.tensor(1.0)), ValueError, ["x of shape [M, ...]", "0-d"]),
    ("logits-rows", lambda a: a.update(logits=a["logits"][:-1]), ValueError, ["logits of shape [M, K] with M = 13", "[12, 10]"]),
    ("logits-1d", lambda a: a.update(logits=a["logits"][:, 0]), ValueError, ["logits of shape [M, K]", "[13]"]),
    ("confidence-shape", lambda a: a.update(confidence=a["confidence"][:, None]), ValueError, ["confidence of shape [13]", "[13, 1]"]),
    ("index-shape", lambda a: a.update(index=a["index"][:5]), ValueError, ["index of shape [13]", "[5]"]),
    ("out-logits-classes", lambda a: a.update(out_logits=torch.zeros(20, 9)), ValueError, ["out_logits of shape [B, 10]", "[20, 9]"]),
    ("out-exit-batch", lambda a: a.update(out_exit=torch.zeros(19, dtype=torch.int64)), ValueError, ["out_exit of shape [20]", "[19]"]),
    ("exit-index", lambda a: a.update(exit_index=-1), ValueError, ["exit_index >= 0", "-1"]),
    ("logits-int", lambda a: a.update(logits=a["logits"].long(), out_logits=a["out_logits"].long()), TypeError, ["floating-point logits", "torch.int64"]),
    ("confidence-int", lambda a: a.update(confidence=(a["confidence"] > 0.5).long()), TypeError, ["floating-point confidence", "torch.int64"]),
    ("index-int32", lambda a: a.update(index=a["index"].int()), TypeError, ["int64 index", "torch.int32"]),
    ("out-logits-dtype", lambda a: a.update(out_logits=a["out_logits"].double()), TypeError, ["out_logits of dtype torch.float32", "torch.float64"]),
    ("out-exit-dtype", lambda a: a.update(out_exit=a["out_exit"].int()), TypeError, ["int64 out_exit", "torch.int32"]),
    ("device-mix", lambda a: a.update(index=a["index"].to("meta")), ValueError, ["on cpu", "index on meta"]),
    ("out-logits-strided", lambda a: a.update(out_logits=torch.zeros(10, 20).t()), ValueError, ["contiguous out_logits", "strides"]),
    ("index-range", lambda a: a.update(index=a["index"] + 100, confidence=torch.ones(13)), ValueError, ["index values in [0, 20)"]),
    ("index-negative", lambda a: a.update(index=a["index"] - 100, confidence=torch.ones(13)), ValueError, ["index values in [0, 20)"]),
]


@pytest.mark.parametrize("label, breaks, error, words", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_names_expected_and_given(impl, label, breaks, error, words):
    inputs, batch, classes = make_inputs(SHAPES["nchw-odd"], "random", torch.float32)
    args = dict(zip(["x", "logits", "confidence", "index"], inputs))
    args.update(threshold=THRESHOLD, exit_index=1)
    args.update(zip(["out_logits", "out_exit"], out_buffers(batch, classes, torch.float32, "cpu")))
    breaks(args)
    before = (args["out_logits"].clone(), args["out_exit"].clone())
    with pytest.raises(error) as raised:
        impl(*args.values())
    message = str(raised.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert torch.equal(args["out_logits"], before[0]) and torch.equal(args["out_exit"], before[1]), "wrote before failing"


def test_dispatcher_has_cuda_kernel(extension):
    """The CUDA kernels compile and register without a GPU (CI builds with the CUDA toolkit)."""
    from eefast import _ext

    info = _ext.build_info()
    require(info["cuda"], "eefast._C was built without CUDA")
    for op in ("compact_exits", "compact_exits_padded"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"eefast::{op}", "CUDA")
        assert "CUDA: registered at" in torch._C._dispatch_dump(f"eefast::{op}")


# ---- aliased arguments, indices of surviving rows, inputs requiring grad -------------------
# Every op (compiled and fallback, unpadded and padded) refuses these before writing anything.

def compiled_padded_op(*args):
    return torch.ops.eefast.compact_exits_padded(*args)


def fallback_padded_op(*args):
    return ops._compact_exits_fallback(*args, padded=True)


ALL_OPS = {"compiled": compiled_op, "compiled-padded": compiled_padded_op,
           "fallback": fallback_op, "fallback-padded": fallback_padded_op}


@pytest.fixture(params=list(ALL_OPS))
def any_op(request):
    if request.param.startswith("compiled"):
        request.getfixturevalue("extension")
    return ALL_OPS[request.param]


def small_args():
    """Four rows and a batch of four (so an output can be an input); rows 0 and 2 exit."""
    g = torch.Generator().manual_seed(0)
    return dict(
        x=torch.randn(4, 3, generator=g), logits=torch.randn(4, 3, generator=g),
        confidence=torch.tensor([0.9, 0.1, 0.7, 0.2]), index=torch.tensor([2, 0, 3, 1]),
        threshold=THRESHOLD, exit_index=1, out_logits=torch.zeros(4, 3), out_exit=torch.full((4,), -1),
    )


def x_under_out_logits(a):  # x is rows 0-3 of a buffer, out_logits rows 1-4
    buffer = torch.randn(5, 3)
    a.update(x=buffer[:4], out_logits=buffer[1:])


def confidence_in_out_logits(a):  # confidence is the first four floats of out_logits
    a["out_logits"].view(-1)[:4] = a["confidence"]
    a.update(confidence=a["out_logits"].view(-1)[:4])


def out_exit_in_out_logits(a):  # one 48-byte buffer: out_logits all of it, out_exit bytes 16-48
    buffer = torch.zeros(12)
    a.update(out_logits=buffer.view(4, 3), out_exit=buffer.view(torch.int64)[2:])


def surviving_index(row, value):  # rows 1 and 3 stay in the batch
    return lambda a: a["index"].__setitem__(row, value)


def requiring_grad(name):
    return lambda a: a[name].requires_grad_()


# (label, how to break the arguments, exception type, words the message must hold)
REFUSED = [
    ("out_logits-is-logits", lambda a: a.update(out_logits=a["logits"]), ValueError, ["out_logits and logits", "separate memory"]),
    ("out_logits-overlaps-x", x_under_out_logits, ValueError, ["out_logits and x", "separate memory"]),
    ("out_logits-overlaps-confidence", confidence_in_out_logits, ValueError, ["out_logits and confidence", "separate memory"]),
    ("out_exit-is-index", lambda a: a.update(out_exit=a["index"]), ValueError, ["out_exit and index", "separate memory"]),
    ("out_exit-overlaps-out_logits", out_exit_in_out_logits, ValueError, ["out_logits and out_exit", "separate memory"]),
    ("out_logits-expanded", lambda a: a.update(out_logits=torch.zeros(1, 3).expand(4, 3)), ValueError, ["out_logits", "internal overlap", "[4, 3]", "[0, 1]"]),
    ("out_exit-expanded", lambda a: a.update(out_exit=torch.full((1,), -1).expand(4)), ValueError, ["out_exit", "internal overlap", "[4]", "[0]"]),
    ("surviving-index-too-large", surviving_index(1, 4), ValueError, ["index values in [0, 4)", "got 4 at row 1"]),
    ("surviving-index-negative", surviving_index(3, -1), ValueError, ["index values in [0, 4)", "got -1 at row 3"]),
    ("x-requires-grad", requiring_grad("x"), RuntimeError, ["inference op", "got x requiring grad", "torch.no_grad()"]),
    ("logits-requires-grad", requiring_grad("logits"), RuntimeError, ["inference op", "got logits requiring grad", "torch.no_grad()"]),
    ("out_logits-requires-grad", requiring_grad("out_logits"), RuntimeError, ["inference op", "got out_logits requiring grad"]),
]


@pytest.mark.parametrize("label, breaks, error, words", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_before_writing(any_op, label, breaks, error, words):
    args = small_args()
    breaks(args)
    before = {name: t.detach().clone() for name, t in args.items() if isinstance(t, torch.Tensor)}
    with pytest.raises(error) as raised:
        any_op(*args.values())
    message = str(raised.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    for name, was in before.items():
        assert torch.equal(args[name].detach(), was), f"{name} was written before failing"


def test_disjoint_views_of_one_buffer(any_op):
    """Inputs and outputs may share a storage where their memory does not overlap."""
    args = small_args()
    want = (*fallback_op(*args.values()), args["out_logits"].clone(), args["out_exit"].clone())
    buffer = torch.zeros(8, 3)
    buffer[:4] = args["x"]
    fresh = small_args()
    fresh.update(x=buffer[:4], out_logits=buffer[4:])
    got = any_op(*fresh.values())
    assert torch.equal(got[0][: want[0].shape[0]], want[0])
    assert torch.equal(fresh["out_logits"], want[2]) and torch.equal(fresh["out_exit"], want[3])


def test_requires_grad_without_grad_mode(any_op):
    """Under torch.no_grad() (as EENet.predict runs it), inputs requiring grad are fine: no gradient
    is asked for. A confidence requiring grad is fine anyway (only compared, it has no gradient)."""
    args = small_args()
    for name in ("x", "logits", "out_logits"):
        args[name].requires_grad_()
    with torch.no_grad():
        outputs = any_op(*args.values())
    assert not any(t.requires_grad for t in outputs)
    args = small_args()
    args["confidence"].requires_grad_()
    outputs = any_op(*args.values())
    assert not any(t.requires_grad for t in outputs)


@pytest.mark.cuda
@pytest.mark.parametrize("op", ["compact_exits", "compact_exits_padded"])
def test_cuda_refuses_aliased_outputs(extension, op):
    """The overlap checks run on the host, before any launch."""
    args = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in small_args().items()}
    for alias in ({"out_logits": args["logits"]}, {"out_exit": args["index"]}):
        broken = {**args, **alias}
        with pytest.raises(ValueError, match="separate memory"):
            getattr(torch.ops.eefast, op)(*broken.values())


# ---- GPU ---------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_cuda_matches_reference(extension, shape, pattern, dtype):
    inputs, batch, classes = make_inputs(shape, pattern, dtype, device="cuda")
    assert_same(run(compiled_op, inputs, batch, classes), expected(inputs, THRESHOLD, 2, batch, classes))


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_cuda_layouts(extension, layout):
    inputs, batch, classes = make_inputs(SHAPES["nchw-odd"], "random", torch.float16, device="cuda", layout=layout)
    assert_same(run(compiled_op, inputs, batch, classes), expected(inputs, THRESHOLD, 2, batch, classes))


@pytest.mark.cuda
def test_cuda_large_batch_vectorised_rows(extension):
    """Many rows (more than one grid of blocks) and rows of 16-byte multiples and odd sizes."""
    for features in [(64, 8, 8), (3, 7, 7), (1,)]:
        inputs, batch, classes = make_inputs((70_000, features, 10, 70_000), "random", torch.float32, device="cuda")
        assert_same(run(compiled_op, inputs, batch, classes), expected(inputs, THRESHOLD, 2, batch, classes))


@pytest.mark.cuda
def test_cuda_synchronisations(extension):
    """compact_exits reads the survivor count once; compact_exits_padded never synchronises."""
    inputs, batch, classes = make_inputs(SHAPES["nchw-odd"], "random", torch.float32, device="cuda")
    out = out_buffers(batch, classes, torch.float32, "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.ops.eefast.compact_exits_padded(*inputs, THRESHOLD, 1, *out)
        with pytest.raises(RuntimeError, match="synchroniz"):
            torch.ops.eefast.compact_exits(*inputs, THRESHOLD, 1, *out)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.cuda
@pytest.mark.parametrize("op", ["compact_exits", "compact_exits_padded"])
def test_cuda_opcheck(extension, op):
    inputs, batch, classes = make_inputs(SHAPES["nchw-odd"], "random", torch.float32, device="cuda")
    torch.library.opcheck(getattr(torch.ops.eefast, op), (*inputs, THRESHOLD, 1, *out_buffers(batch, classes, torch.float32, "cuda")))
