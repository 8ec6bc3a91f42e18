// Shared by the CPU and CUDA implementations of eefast::compact_exits(_padded): the argument
// checks (run before any memory is touched) and the layout rule of the compacted rows.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/core/grad_mode.h>

#include <cstdint>
#include <string>
#include <utility>

namespace eefast {

// The compacted rows keep channels_last(_3d) when x is in it; anything else comes out
// contiguous. Either way each row (sample) is one dense block, copied as raw bytes.
// eefast/ops.py:compacted_memory_format states the same rule for the fake kernel.
inline at::MemoryFormat compacted_memory_format(const at::Tensor& x) {
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  if (x.dim() == 5 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)) {
    return at::MemoryFormat::ChannelsLast3d;
  }
  return at::MemoryFormat::Contiguous;
}

// "torch.float32": dtypes named as a Python user writes them.
inline std::string dtype_name(at::ScalarType dtype) {
  return "torch." + std::string(c10::getDtypeNames(dtype).first);
}

// Whether a and b (on one device) may share memory: their byte spans [first element, last
// element] intersect. Exact for dense tensors (as the outputs are), conservative for strided
// ones. The same rule as eefast/ops.py:_may_overlap.
inline bool may_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || a.device() != b.device()) return false;
  const auto span = [](const at::Tensor& t) {
    int64_t last = 0;  // offset of the last element, in elements (strides are >= 0)
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
    return std::pair<uintptr_t, uintptr_t>{begin, begin + static_cast<uintptr_t>((last + 1) * t.element_size())};
  };
  const auto [a_begin, a_end] = span(a);
  const auto [b_begin, b_end] = span(b);
  return a_begin < b_end && b_begin < a_end;
}

// Raises ValueError (shapes, devices, layouts, outputs sharing memory) or TypeError (dtypes)
// naming what was expected and what was given. Mirrors eefast/ops.py:check_compact_exits_args.
inline void check_compact_exits_args(const char* op, const at::Tensor& x, const at::Tensor& logits,
                                     const at::Tensor& confidence, const at::Tensor& index,
                                     int64_t exit_index, const at::Tensor& out_logits,
                                     const at::Tensor& out_exit) {
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": expected x of shape [M, ...] (one row per running sample), got a 0-d tensor");
  const int64_t rows = x.size(0);
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.size(0) == rows, op,
                    ": expected logits of shape [M, K] with M = ", rows, " (rows of x), got ", logits.sizes());
  const int64_t classes = logits.size(1);
  TORCH_CHECK_VALUE(confidence.dim() == 1 && confidence.size(0) == rows, op,
                    ": expected confidence of shape [", rows, "] (one per row of x), got ", confidence.sizes());
  TORCH_CHECK_VALUE(index.dim() == 1 && index.size(0) == rows, op,
                    ": expected index of shape [", rows, "] (one per row of x), got ", index.sizes());
  TORCH_CHECK_VALUE(out_logits.dim() == 2 && out_logits.size(1) == classes, op,
                    ": expected out_logits of shape [B, ", classes, "] (K = logits.size(1)), got ", out_logits.sizes());
  TORCH_CHECK_VALUE(out_exit.dim() == 1 && out_exit.size(0) == out_logits.size(0), op,
                    ": expected out_exit of shape [", out_logits.size(0), "] (B = out_logits.size(0)), got ",
                    out_exit.sizes());
  TORCH_CHECK_VALUE(exit_index >= 0, op, ": expected exit_index >= 0, got ", exit_index);

  TORCH_CHECK_TYPE(at::isFloatingType(logits.scalar_type()), op,
                   ": expected floating-point logits, got ", dtype_name(logits.scalar_type()));
  TORCH_CHECK_TYPE(at::isFloatingType(confidence.scalar_type()), op,
                   ": expected floating-point confidence (probabilities), got ", dtype_name(confidence.scalar_type()));
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, op, ": expected int64 index, got ", dtype_name(index.scalar_type()));
  TORCH_CHECK_TYPE(out_logits.scalar_type() == logits.scalar_type(), op, ": expected out_logits of dtype ",
                   dtype_name(logits.scalar_type()), " (the dtype of logits), got ", dtype_name(out_logits.scalar_type()));
  TORCH_CHECK_TYPE(out_exit.scalar_type() == at::kLong, op, ": expected int64 out_exit, got ",
                   dtype_name(out_exit.scalar_type()));

  const at::Device device = x.device();
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"logits", logits},
                                {"confidence", confidence}, {"index", index},
                                {"out_logits", out_logits}, {"out_exit", out_exit}}) {
    TORCH_CHECK_VALUE(t.device() == device, op, ": expected every tensor on ", device, " (the device of x), got ",
                      name, " on ", t.device());
  }
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"out_logits", out_logits},
                                {"out_exit", out_exit}}) {
    TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": expected ", name,
                      " without internal overlap (it is written in place, each element at an address of its own), got "
                      "sizes ", t.sizes(), " and strides ", t.strides(), " (elements sharing memory, as from expand)");
  }
  TORCH_CHECK_VALUE(out_logits.is_contiguous() && out_exit.is_contiguous(), op,
                    ": expected contiguous out_logits and out_exit (they are written in place), got strides ",
                    out_logits.strides(), " and ", out_exit.strides());
  // An output sharing memory with an input would be written while the input is read (the rows are
  // processed in parallel), or with the other output: each must have memory of its own.
  for (const auto& [name, other] : {std::pair<const char*, const at::Tensor&>{"x", x}, {"logits", logits},
                                    {"confidence", confidence}, {"index", index}, {"out_exit", out_exit}}) {
    TORCH_CHECK_VALUE(!may_overlap(out_logits, other), op, ": expected out_logits and ", name,
                      " in separate memory (out_logits is written in place), got tensors that overlap");
  }
  for (const auto& [name, other] : {std::pair<const char*, const at::Tensor&>{"x", x}, {"logits", logits},
                                    {"confidence", confidence}, {"index", index}}) {
    TORCH_CHECK_VALUE(!may_overlap(out_exit, other), op, ": expected out_exit and ", name,
                      " in separate memory (out_exit is written in place), got tensors that overlap");
  }
}

// The ops are inference ops: no gradient flows from x_kept or out_logits back to x or logits.
// With grad mode on, a gradient asked for through them would be silently lost, so they refuse
// x, logits or out_logits requiring grad (confidence only decides which rows exit, and has no
// gradient in the reference either). Raises RuntimeError. Mirrors eefast/ops.py:check_compact_exits_grad.
inline void check_compact_exits_grad(const char* op, const at::Tensor& x, const at::Tensor& logits,
                                     const at::Tensor& out_logits) {
  if (!at::GradMode::is_enabled()) return;
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"x", x}, {"logits", logits},
                                {"out_logits", out_logits}}) {
    TORCH_CHECK(!t.requires_grad(), op, " is an inference op (it has no gradient): expected no tensor requiring grad "
                "while grad mode is on, got ", name, " requiring grad; call it under torch.no_grad() or "
                "torch.inference_mode(), or on detached tensors");
  }
}

}  // namespace eefast
