"""Public functional ops of eefast, each dispatched to its fastest available implementation.

``compact_exits`` runs the compiled C++/CUDA op ``torch.ops.eefast.compact_exits`` when
``eefast._C`` has a kernel for the tensors' device, and the plain-PyTorch fallback built on
``eefast.reference`` otherwise (warning once). Both give identical results.

``eenet_loss`` runs the fused Triton kernel (``eefast.kernels``) on CUDA tensors when Triton is
installed, and ``eefast.reference`` otherwise. ``impl="triton"`` or ``impl="reference"`` per
call, or ``EEFAST_IMPL`` in the environment (read at import), overrides the choice; Triton on
CPU tensors needs ``TRITON_INTERPRET=1`` set before eefast is imported.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from eefast import _ext, reference

try:
    from eefast.kernels import ee_loss as _triton_loss
    from eefast.kernels import exit_head as _triton_head
except ImportError as _error:  # Triton not installed
    _triton_loss = _triton_head = None
    TRITON_ERROR: str | None = f"{type(_error).__name__}: {_error}"
else:
    TRITON_ERROR = None

HAS_TRITON = _triton_loss is not None
IMPLS = ("auto", "triton", "reference")
# EEFAST_IMPL, read once at import; a value not in IMPLS fails where an implementation is chosen
# (and at the start of every command line), not at import, so `import eefast` always works.
DEFAULT_IMPL = os.environ.get("EEFAST_IMPL", "auto").strip().lower() or "auto"


def check_default_impl() -> str:
    """EEFAST_IMPL's value, or ValueError naming the choices when it is not one of them."""
    if DEFAULT_IMPL not in IMPLS:
        raise ValueError(f"EEFAST_IMPL: expected one of {IMPLS}, got {DEFAULT_IMPL!r}")
    return DEFAULT_IMPL


def choose_impl(impl: str | None, tensor: Tensor) -> str:
    """'triton' or 'reference' for an op on ``tensor``: Triton on CUDA tensors when installed."""
    impl = check_default_impl() if impl is None else impl
    if impl not in IMPLS:
        raise ValueError(f"expected impl in {IMPLS}, got {impl!r}")
    if impl == "auto" or tensor.device.type == "meta":  # meta tensors (shape inference) have no data to run on
        return "triton" if tensor.is_cuda and HAS_TRITON else "reference"
    if impl == "triton" and not HAS_TRITON:
        raise RuntimeError(f"impl='triton' was asked for, but Triton is unavailable ({TRITON_ERROR})")
    if impl == "triton" and not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"impl='triton' runs on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1 set before "
                         f"eefast is imported; got a tensor on {tensor.device}")
    return impl

__all__ = [
    "compact_exits", "compacted_memory_format", "check_compact_exits_args", "check_compact_exits_grad",
    "exit_head",
    "eenet_loss", "eenet_loss_parts", "check_loss_args", "choose_impl", "HAS_TRITON", "IMPLS",
]

_COMPACT_OPS = ("compact_exits", "compact_exits_padded")
# Devices with a compiled kernel, per op; decided once so dispatch is a dict lookup
# (cheap, and traceable by torch.compile).
_COMPILED_DEVICES: dict[str, frozenset[str]] = {
    op: frozenset(d for d in ("cpu", "cuda") if _ext.has_kernel(op, d)) for op in _COMPACT_OPS
}


def compacted_memory_format(x: Tensor) -> torch.memory_format:
    """Layout of the compacted rows: channels_last(_3d) stays so, anything else is contiguous.

    The same rule as csrc/compact_exits.h:compacted_memory_format.
    """
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def check_compact_exits_args(
    op: str,
    x: Tensor,
    logits: Tensor,
    confidence: Tensor,
    index: Tensor,
    exit_index: int,
    out_logits: Tensor,
    out_exit: Tensor,
) -> None:
    """Raises ValueError (shape, device, layout, outputs sharing memory) or TypeError (dtype)
    naming expected and given.

    Reads metadata and addresses only, so the fake kernel runs it too (skipping the addresses).
    Mirrors csrc/compact_exits.h.
    """
    if x.dim() < 1:
        raise ValueError(f"{op}: expected x of shape [M, ...] (one row per running sample), got a 0-d tensor")
    rows = x.shape[0]
    if logits.dim() != 2 or logits.shape[0] != rows:
        raise ValueError(f"{op}: expected logits of shape [M, K] with M = {rows} (rows of x), got {list(logits.shape)}")
    classes = logits.shape[1]
    if confidence.dim() != 1 or confidence.shape[0] != rows:
        raise ValueError(f"{op}: expected confidence of shape [{rows}] (one per row of x), got {list(confidence.shape)}")
    if index.dim() != 1 or index.shape[0] != rows:
        raise ValueError(f"{op}: expected index of shape [{rows}] (one per row of x), got {list(index.shape)}")
    if out_logits.dim() != 2 or out_logits.shape[1] != classes:
        raise ValueError(
            f"{op}: expected out_logits of shape [B, {classes}] (K = logits.size(1)), got {list(out_logits.shape)}"
        )
    if out_exit.dim() != 1 or out_exit.shape[0] != out_logits.shape[0]:
        raise ValueError(
            f"{op}: expected out_exit of shape [{out_logits.shape[0]}] (B = out_logits.size(0)), "
            f"got {list(out_exit.shape)}"
        )
    if exit_index < 0:
        raise ValueError(f"{op}: expected exit_index >= 0, got {exit_index}")
    if not logits.is_floating_point():
        raise TypeError(f"{op}: expected floating-point logits, got {logits.dtype}")
    if not confidence.is_floating_point():
        raise TypeError(f"{op}: expected floating-point confidence (probabilities), got {confidence.dtype}")
    if index.dtype != torch.int64:
        raise TypeError(f"{op}: expected int64 index, got {index.dtype}")
    if out_logits.dtype != logits.dtype:
        raise TypeError(f"{op}: expected out_logits of dtype {logits.dtype} (the dtype of logits), got {out_logits.dtype}")
    if out_exit.dtype != torch.int64:
        raise TypeError(f"{op}: expected int64 out_exit, got {out_exit.dtype}")
    named = {"logits": logits, "confidence": confidence, "index": index, "out_logits": out_logits, "out_exit": out_exit}
    for name, tensor in named.items():
        if tensor.device != x.device:
            raise ValueError(
                f"{op}: expected every tensor on {x.device} (the device of x), got {name} on {tensor.device}"
            )
    for name, tensor in (("out_logits", out_logits), ("out_exit", out_exit)):
        if torch._debug_has_internal_overlap(tensor) == 1:  # at::MemOverlap::Yes
            raise ValueError(
                f"{op}: expected {name} without internal overlap (it is written in place, each element at an "
                f"address of its own), got sizes {list(tensor.shape)} and strides {list(tensor.stride())} "
                "(elements sharing memory, as from expand)"
            )
    if not (out_logits.is_contiguous() and out_exit.is_contiguous()):
        raise ValueError(
            f"{op}: expected contiguous out_logits and out_exit (they are written in place), "
            f"got strides {list(out_logits.stride())} and {list(out_exit.stride())}"
        )
    # An output sharing memory with an input would be written while the input is read, or with the
    # other output. Fake tensors (the fake kernel, torch.compile) have no addresses to compare: the
    # compiled op checks the real ones when it runs.
    if _has_addresses(x, logits, confidence, index, out_logits, out_exit):
        inputs = {"x": x, "logits": logits, "confidence": confidence, "index": index}
        pairs = [("out_logits", out_logits, name, t) for name, t in {**inputs, "out_exit": out_exit}.items()]
        pairs += [("out_exit", out_exit, name, t) for name, t in inputs.items()]
        for out_name, out, name, other in pairs:
            if _may_overlap(out, other):
                raise ValueError(
                    f"{op}: expected {out_name} and {name} in separate memory ({out_name} is written in place), "
                    "got tensors that overlap"
                )


def _has_addresses(*tensors: Tensor) -> bool:
    """Whether the tensors' data pointers are real memory (not fake or meta tensors, not traced)."""
    if torch.compiler.is_compiling():
        return False
    return not any(isinstance(t, torch._subclasses.FakeTensor) or t.is_meta for t in tensors)


def _may_overlap(a: Tensor, b: Tensor) -> bool:
    """Whether a and b may share memory: their byte spans [first element, last element] intersect.

    Exact for dense tensors (as the outputs are), conservative for strided ones. The same rule as
    csrc/compact_exits.h:may_overlap.
    """
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False

    def span(t: Tensor) -> tuple[int, int]:
        last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))  # strides are >= 0
        return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()

    (a_begin, a_end), (b_begin, b_end) = span(a), span(b)
    return a_begin < b_end and b_begin < a_end


def check_compact_exits_grad(op: str, x: Tensor, logits: Tensor, out_logits: Tensor) -> None:
    """Raises RuntimeError if, with grad mode on, x, logits or out_logits requires grad.

    The ops are inference ops: no gradient flows from x_kept or out_logits back to x or logits, so
    one asked for would be silently lost. confidence only decides which rows exit (no gradient in
    the reference either). Mirrors csrc/compact_exits.h:check_compact_exits_grad (the compiled
    ops' Autograd kernel).
    """
    if not torch.is_grad_enabled():
        return
    for name, tensor in (("x", x), ("logits", logits), ("out_logits", out_logits)):
        if tensor.requires_grad:
            raise RuntimeError(
                f"{op} is an inference op (it has no gradient): expected no tensor requiring grad while grad "
                f"mode is on, got {name} requiring grad; call it under torch.no_grad() or torch.inference_mode(), "
                "or on detached tensors"
            )


def _check_index_range(op: str, index: Tensor, batch: int) -> None:
    """Raises ValueError unless every index value (exiting and surviving rows') is in [0, batch).

    Reads the values (a host synchronisation on CUDA). Mirrors the compiled ops' check.
    """
    bad = (index < 0) | (index >= batch)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{op}: expected index values in [0, {batch}) (rows of out_logits), got {int(index[row])} at row {row}"
        )


def _compact_exits_fallback(x, logits, confidence, index, threshold, exit_index, out_logits, out_exit, padded):
    op = "compact_exits_padded" if padded else "compact_exits"
    check_compact_exits_grad(op, x, logits, out_logits)
    check_compact_exits_args(op, x, logits, confidence, index, exit_index, out_logits, out_exit)
    _check_index_range(op, index, out_logits.shape[0])
    memory_format = compacted_memory_format(x)
    x_kept, index_kept = reference.compact_exits(
        x, logits, confidence, index, threshold, exit_index, out_logits, out_exit
    )
    x_kept = x_kept.contiguous(memory_format=memory_format)
    if not padded:
        return x_kept, index_kept
    survivors = x_kept.shape[0]
    x_padded = torch.zeros_like(x, memory_format=memory_format)
    x_padded[:survivors] = x_kept
    index_padded = torch.full_like(index, -1)
    index_padded[:survivors] = index_kept
    return x_padded, index_padded, torch.tensor(survivors, dtype=torch.int64, device=index.device)


def compact_exits(
    x: Tensor,  # [M, ...] features of the samples still running
    logits: Tensor,  # [M, K] this exit's class logits
    confidence: Tensor,  # [M] this exit's confidence h (probability)
    index: Tensor,  # [M] int64, each row's position in the original batch
    threshold: float,
    exit_index: int,
    out_logits: Tensor,  # [B, K] written in place
    out_exit: Tensor,  # [B] int64, written in place
    *,
    padded: bool = False,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Removes the rows that exit here from the running batch (see ``eefast.reference.compact_exits``).

    Rows with ``confidence >= threshold`` write their logits and ``exit_index`` into
    ``out_logits`` / ``out_exit`` at ``index``; returns ``(x_kept [S, ...], index_kept [S])``,
    the survivors in order, in new tensors (channels_last stays channels_last). On CUDA this
    reads the survivor count to the host once.

    With ``padded=True`` nothing is synchronised: returns ``(x_kept [M, ...], index_kept [M],
    count [])`` where rows past ``count`` are zeros and their index is -1.

    Refused before anything is written (ValueError): ``out_logits`` or ``out_exit`` sharing memory
    with any other argument or within itself, and any index value (a surviving row's too, so the
    -1 padding of ``padded=True`` cannot be passed back as it is) outside ``[0, B)``. On CUDA a bad
    index is found on the device without a synchronisation: a device-side assertion, after which
    the CUDA context is unusable. An inference op: with grad mode on, ``x``, ``logits`` or
    ``out_logits`` requiring grad is a RuntimeError (nothing would carry their gradient).
    """
    op = "compact_exits_padded" if padded else "compact_exits"
    if x.device.type in _COMPILED_DEVICES[op]:
        return getattr(torch.ops.eefast, op)(
            x, logits, confidence, index, float(threshold), int(exit_index), out_logits, out_exit
        )
    _ext.warn_fallback_once(op, x.device.type)
    return _compact_exits_fallback(
        x, logits, confidence, index, threshold, exit_index, out_logits, out_exit, padded
    )


if _ext.HAS_EXT:

    @torch.library.register_fake("eefast::compact_exits")
    def _compact_exits_fake(x, logits, confidence, index, threshold, exit_index, out_logits, out_exit):
        check_compact_exits_args("compact_exits", x, logits, confidence, index, exit_index, out_logits, out_exit)
        survivors = torch.library.get_ctx().new_dynamic_size()  # 0 <= survivors <= M
        shape = (survivors, *x.shape[1:])
        x_kept = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=compacted_memory_format(x))
        return x_kept, index.new_empty((survivors,))

    @torch.library.register_fake("eefast::compact_exits_padded")
    def _compact_exits_padded_fake(x, logits, confidence, index, threshold, exit_index, out_logits, out_exit):
        check_compact_exits_args(
            "compact_exits_padded", x, logits, confidence, index, exit_index, out_logits, out_exit
        )
        x_kept = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=compacted_memory_format(x))
        return x_kept, index.new_empty(index.shape), index.new_empty(())


# ---- exit head and loss ----------------------------------------------------------------------
# The fused Triton kernels (eefast.kernels) serve CUDA tensors; the CPU runs eefast.reference.


def exit_head(
    x: Tensor,  # [B, C, H, W]
    kind: str,
    cls_weight: Tensor,  # [K, F]
    cls_bias: Tensor,  # [K]
    conf_weight: Tensor,  # [1, F]
    conf_bias: Tensor,  # [1]
    bn: reference.BatchNormArgs | None = None,
    *,
    impl: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Class logits ``[B, K]`` and confidence logits ``[B]`` of an exit block (see eefast.reference.exit_head).

    With Triton (``impl``, see choose_impl) the fused kernels run batch norm, ReLU and pooling, and
    the heads too when they hold at most ``eefast.kernels.exit_head.HEADS_IN_KERNEL_MAX`` weights;
    larger heads are reference.exit_heads (``F.linear``) on the kernels' pooled features (a plain
    exit's then run the reference: there is nothing left to fuse)."""
    if kind not in reference.EXIT_KINDS:
        raise ValueError(f"exit_head: expected kind in {reference.EXIT_KINDS}, got {kind!r}")
    if x.dim() != 4:
        raise ValueError(f"exit_head: expected x of shape [B, C, H, W], got {list(x.shape)}")
    features = math.prod(x.shape[1:]) if kind == "plain" else x.shape[1]  # (x[0] fails on 0 rows)
    if cls_weight.dim() != 2 or cls_weight.shape[1] != features:
        raise ValueError(
            f"exit_head: expected cls_weight of shape [K, {features}] for a {kind} exit on {list(x.shape[1:])} "
            f"features, got {list(cls_weight.shape)}"
        )
    if conf_weight.shape != (1, features):
        raise ValueError(f"exit_head: expected conf_weight of shape [1, {features}], got {list(conf_weight.shape)}")
    for name, bias, size in (("cls_bias", cls_bias, cls_weight.shape[0]), ("conf_bias", conf_bias, 1)):
        if bias.shape != (size,):
            raise ValueError(f"exit_head: expected {name} of shape [{size}], got {list(bias.shape)}")
    if kind == "bnpool" and bn is None:
        raise ValueError("exit_head: kind 'bnpool' needs bn=BatchNormArgs(...), got None")
    if choose_impl(impl, x) == "reference":
        return reference.exit_head(x, kind, cls_weight, cls_bias, conf_weight, conf_bias, bn)
    normalizes = kind == "bnpool"  # only a bnpool exit normalises (and rectifies)
    bn = bn if normalizes else None
    heads = (cls_weight, cls_bias, conf_weight, conf_bias)
    heads_in_kernel = _triton_head.heads_in_kernel(cls_weight.shape[0], features)
    if kind == "plain":
        if not heads_in_kernel:  # nothing to fuse: torch's linear layers on the flattened map, as the reference
            return reference.exit_head(x, kind, cls_weight, cls_bias, conf_weight, conf_bias)
        x = x.contiguous().view(x.shape[0], -1, 1, 1)  # flatten in (C, H, W) order: C*H*W channels of one pixel
    outputs = _fused_head(x, heads if heads_in_kernel else None, bn, normalizes)
    if heads_in_kernel:
        return outputs
    # heads the kernels' per-sample programs would each read whole: torch's linear layers (one matrix
    # product each, and autograd's own backward for them) on the kernel's pooled features
    pooled, = outputs
    return reference.exit_heads(pooled, *heads)


def _fused_head(x: Tensor, heads: tuple[Tensor, ...] | None, bn: reference.BatchNormArgs | None,
                normalizes: bool) -> tuple[Tensor, ...]:
    """(logits, conf) from the fused head with ``heads`` applied in its kernels, or (pooled,) for
    heads None: one launch for inference, the custom op under torch.compile, the eager
    autograd.Function otherwise."""
    head_args = (None,) * 4 if heads is None else heads
    batch_stats = bn is not None and (bn.training or bn.running_mean is None)
    if _inference(x, heads or (), bn, batch_stats):
        # one launch on the parameters as stored: without autograd or torch.compile watching, the
        # op around it would cost more host time than the kernel runs (36.6 against 56.4 us a call on
        # the H200: benchmarks/results/h200-exit-head-profile.txt)
        bn_stats = None if bn is None else (bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
        return _triton_head.inference(x, heads, bn_stats, normalizes)
    values_per_channel = x.numel() // max(x.shape[1], 1)
    if batch_stats and values_per_channel == 1:  # as F.batch_norm
        raise ValueError(f"exit_head: batch statistics need more than 1 value per channel, got input of shape "
                         f"{list(x.shape)}")
    bn_args = (None, None, None, None, 0.0) if bn is None else (
        bn.weight, bn.bias, None if batch_stats else bn.running_mean, None if batch_stats else bn.running_var,
        float(bn.eps))
    update = batch_stats and bn.training and bn.running_mean is not None and values_per_channel > 0
    # (an empty batch leaves the running statistics, as nn.BatchNorm2d does)
    if torch.compiler.is_compiling():  # torch.compile traces the custom op, which cannot update them itself
        out, conf, _, stats = _triton_head.exit_head_fused(x, *head_args, *bn_args, batch_stats, normalizes)
        if update:
            _update_running_stats(bn, stats)
    else:
        # the statistics kernels update the running statistics where they can
        fused_update = update and _triton_head.fused_running_update(bn.running_mean, bn.running_var)
        running_update = (bn.running_mean, bn.running_var, bn.momentum) if fused_update else None
        out, conf, _, stats = _triton_head.ExitHeadFunction.apply(x, *head_args, *bn_args, batch_stats, normalizes,
                                                                  running_update)
        if update and not fused_update:
            _update_running_stats(bn, stats)
    return (out,) if heads is None else (out, conf)


def _inference(x: Tensor, heads: tuple[Tensor, ...], bn: reference.BatchNormArgs | None, batch_stats: bool) -> bool:
    """Whether the exit head can be one launch of the forward kernel: no gradient wanted, not traced
    by torch.compile, and batch norm (if any) normalising with its running statistics."""
    if torch.compiler.is_compiling() or batch_stats:
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in heads) or (
        bn is not None and any(t is not None and t.requires_grad for t in (bn.weight, bn.bias)))))


def _update_running_stats(bn: reference.BatchNormArgs, stats: Tensor) -> None:
    """nn.BatchNorm2d's update, running = (1 - momentum) * running + momentum * batch statistic, from
    the batch's [mean, biased variance, unbiased variance] (one foreach launch)."""
    with torch.no_grad():
        stats = stats if stats.dtype == bn.running_mean.dtype else stats.to(bn.running_mean.dtype)
        torch._foreach_lerp_([bn.running_mean, bn.running_var], [stats[0], stats[2]], bn.momentum)


def check_loss_args(logits: Tensor, conf_logits: Tensor, target: Tensor, costs: Tensor, lam: float, version: str) -> None:
    """Raises ValueError / TypeError naming what eenet_loss expected and what it was given."""
    if version not in reference.LOSS_VERSIONS:
        raise ValueError(f"eenet_loss: expected version in {reference.LOSS_VERSIONS}, got {version!r}")
    if not (isinstance(lam, (int, float)) and not isinstance(lam, bool) and lam >= 0):  # inf: the cost term alone
        raise ValueError(f"eenet_loss: expected a number lam >= 0 (inf allowed), got {lam!r}")
    if logits.dim() != 3 or logits.shape[0] < 1:
        raise ValueError(f"eenet_loss: expected logits of shape [E, B, K] (E >= 1 exits), got {list(logits.shape)}")
    num_exits, batch, classes = logits.shape
    if conf_logits.shape != (num_exits - 1, batch):
        raise ValueError(
            f"eenet_loss: expected conf_logits of shape [{num_exits - 1}, {batch}] (E-1 early exits, B), "
            f"got {list(conf_logits.shape)}"
        )
    if target.shape != (batch,):
        raise ValueError(f"eenet_loss: expected target of shape [{batch}], got {list(target.shape)}")
    if costs.shape != (num_exits,):
        raise ValueError(f"eenet_loss: expected costs of shape [{num_exits}] (one per exit), got {list(costs.shape)}")
    if not logits.is_floating_point() or not conf_logits.is_floating_point():
        raise TypeError(
            f"eenet_loss: expected floating-point logits and conf_logits, got {logits.dtype} and {conf_logits.dtype}"
        )
    if target.dtype != torch.int64:
        raise TypeError(f"eenet_loss: expected int64 class indices as target, got {target.dtype}")
    for name, tensor in (("conf_logits", conf_logits), ("target", target), ("costs", costs)):
        if tensor.device != logits.device:
            raise ValueError(
                f"eenet_loss: expected every tensor on {logits.device} (the device of logits), got {name} on {tensor.device}"
            )
    values_readable = target.device.type == "cpu" and not torch.compiler.is_compiling()  # no host sync, no graph break
    if values_readable and target.numel() and not bool(((target >= 0) & (target < classes)).all()):
        raise ValueError(
            f"eenet_loss: expected target values in [0, {classes}), got min {int(target.min())}, max {int(target.max())}"
        )
    if values_readable and num_exits > 1 and not bool((costs[1:] > costs[:-1]).all()):
        raise ValueError(f"eenet_loss: expected costs increasing from exit to exit, got {costs.tolist()}")


def eenet_loss_parts(
    logits: Tensor,  # [E, B, K]
    conf_logits: Tensor,  # [E-1, B]
    target: Tensor,  # [B]
    costs: Tensor,  # [E]
    *,
    impl: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Per exit: ``(CE(y, Y_n) [E], mean_batch(C_n) [E])`` (see eefast.reference.eenet_loss_parts)."""
    check_loss_args(logits, conf_logits, target, costs, 1.0, "v2")
    if choose_impl(impl, logits) == "triton":
        ce, cost, _ = _triton_loss.ee_loss_parts(logits, conf_logits, target, costs)
        return ce.mean(dim=1), cost.mean(dim=1)
    return reference.eenet_loss_parts(logits, conf_logits, target, costs)


def eenet_loss(
    logits: Tensor,  # [E, B, K]
    conf_logits: Tensor,  # [E-1, B]
    target: Tensor,  # [B]
    costs: Tensor,  # [E]
    lam: float = 1.0,
    version: str = "v2",
    *,
    impl: str | None = None,
) -> Tensor:
    """The EENet training loss, a scalar (see eefast.reference.eenet_loss)."""
    check_loss_args(logits, conf_logits, target, costs, lam, version)
    if choose_impl(impl, logits) == "triton":
        # eager autograd skips the custom op's dispatch layers; torch.compile traces the custom op
        loss_op = _triton_loss.ee_loss if torch.compiler.is_compiling() else _triton_loss.EELossEager.apply
        per_sample, _ = loss_op(logits, conf_logits, target, costs, float(lam), version)
        return per_sample.mean()
    return reference.eenet_loss(logits, conf_logits, target, costs, lam, version)
