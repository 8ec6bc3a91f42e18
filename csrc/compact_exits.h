// Shared by the CPU and CUDA implementations of eefast::compact_exits(_padded): the argument
// checks (run before any memory is touched) and the layout rule of the compacted rows.
#pragma once

#include <ATen/ATen.h>

#include <string>

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

// Raises ValueError (shapes, devices, layouts) or TypeError (dtypes) naming what was expected
// and what was given. Mirrors eefast/ops.py:check_compact_exits_args.
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
  TORCH_CHECK_VALUE(out_logits.is_contiguous() && out_exit.is_contiguous(), op,
                    ": expected contiguous out_logits and out_exit (they are written in place), got strides ",
                    out_logits.strides(), " and ", out_exit.strides());
}

}  // namespace eefast
