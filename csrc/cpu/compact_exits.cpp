// CPU implementation of eefast::compact_exits and eefast::compact_exits_padded, and both ops'
// Autograd kernel (the same for every device: it refuses tensors requiring grad).
//
// A serial scan over the indices (all checked first) and the confidences gives each surviving
// row its output position (O(M) scalar work), then one at::parallel_for pass over the rows
// writes the exiting rows' logits and exit numbers into the batch outputs and copies the
// surviving rows of x as raw byte blocks.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cstring>
#include <tuple>
#include <vector>

#include "../compact_exits.h"

namespace eefast {
namespace {

// keep[i] = !(confidence[i] >= threshold), compared in confidence's dtype as `h >= T` in PyTorch
// does (T rounded to that dtype first); a NaN confidence never exits. Returns the rows' output
// positions (-1 for exiting rows) and the number of survivors. Every row's batch position is
// checked here, before anything is written: exiting rows' address out_logits, surviving rows'
// are carried to index_kept and address it at a later exit.
std::pair<std::vector<int64_t>, int64_t> survivor_positions(const char* op, const at::Tensor& confidence,
                                                            const at::Tensor& index, double threshold,
                                                            int64_t batch) {
  const int64_t rows = confidence.size(0);
  const int64_t* idx = index.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < rows; ++i) {
    TORCH_CHECK_VALUE(idx[i] >= 0 && idx[i] < batch, op, ": expected index values in [0, ", batch,
                      ") (rows of out_logits), got ", idx[i], " at row ", i);
  }
  std::vector<int64_t> position(rows);
  int64_t survivors = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, confidence.scalar_type(), "compact_exits_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* h = confidence.const_data_ptr<scalar_t>();
    const opmath_t t = static_cast<opmath_t>(static_cast<scalar_t>(threshold));
    for (int64_t i = 0; i < rows; ++i) {
      const bool exits = static_cast<opmath_t>(h[i]) >= t;
      position[i] = exits ? -1 : survivors++;
    }
  });
  return {std::move(position), survivors};
}

// Writes exiting rows into (out_logits, out_exit) and copies surviving rows of x / index to
// their positions in (x_kept, index_kept).
void scatter_and_compact(const at::Tensor& x, const at::Tensor& logits, const at::Tensor& index,
                         int64_t exit_index, const at::Tensor& out_logits, const at::Tensor& out_exit,
                         const std::vector<int64_t>& position, const at::Tensor& x_kept,
                         const at::Tensor& index_kept) {
  const int64_t rows = x.size(0);
  const int64_t row_bytes = rows == 0 ? 0 : static_cast<int64_t>(x.nbytes()) / rows;
  const int64_t logit_bytes = logits.size(1) * static_cast<int64_t>(logits.element_size());

  const char* x_src = static_cast<const char*>(x.const_data_ptr());
  char* x_dst = static_cast<char*>(x_kept.data_ptr());
  const char* logits_src = static_cast<const char*>(logits.const_data_ptr());
  char* logits_dst = static_cast<char*>(out_logits.data_ptr());
  const int64_t* idx = index.const_data_ptr<int64_t>();
  int64_t* idx_dst = index_kept.data_ptr<int64_t>();
  int64_t* exit_dst = out_exit.data_ptr<int64_t>();

  // Rows are copied whole; a grain of a few rows keeps the per-task overhead small.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_bytes + logit_bytes));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t pos = position[i];
      if (pos < 0) {
        const int64_t b = idx[i];
        std::memcpy(logits_dst + b * logit_bytes, logits_src + i * logit_bytes, logit_bytes);
        exit_dst[b] = exit_index;
      } else {
        std::memcpy(x_dst + pos * row_bytes, x_src + i * row_bytes, row_bytes);
        idx_dst[pos] = idx[i];
      }
    }
  });
}

// Checked, laid-out inputs and each row's output position.
struct Plan {
  at::MemoryFormat format;
  at::Tensor x;       // [M, ...] in `format`
  at::Tensor logits;  // [M, K] contiguous
  at::Tensor index;   // [M] contiguous
  std::vector<int64_t> position;
  int64_t survivors;
};

Plan plan(const char* op, const at::Tensor& x, const at::Tensor& logits, const at::Tensor& confidence,
          const at::Tensor& index, double threshold, int64_t exit_index, const at::Tensor& out_logits,
          const at::Tensor& out_exit) {
  check_compact_exits_args(op, x, logits, confidence, index, exit_index, out_logits, out_exit);
  const auto format = compacted_memory_format(x);
  at::Tensor index_c = index.contiguous();
  auto [position, survivors] =
      survivor_positions(op, confidence.contiguous(), index_c, threshold, out_logits.size(0));
  return {format, x.contiguous(format), logits.contiguous(), index_c, std::move(position), survivors};
}

std::tuple<at::Tensor, at::Tensor> compact_exits_cpu(const at::Tensor& x, const at::Tensor& logits,
                                                     const at::Tensor& confidence, const at::Tensor& index,
                                                     double threshold, int64_t exit_index, at::Tensor& out_logits,
                                                     at::Tensor& out_exit) {
  Plan p = plan("compact_exits", x, logits, confidence, index, threshold, exit_index, out_logits, out_exit);
  auto kept_shape = p.x.sizes().vec();
  kept_shape[0] = p.survivors;
  at::Tensor x_kept = at::empty(kept_shape, p.x.options().memory_format(p.format));
  at::Tensor index_kept = at::empty({p.survivors}, p.index.options());
  scatter_and_compact(p.x, p.logits, p.index, exit_index, out_logits, out_exit, p.position, x_kept, index_kept);
  return {x_kept, index_kept};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> compact_exits_padded_cpu(
    const at::Tensor& x, const at::Tensor& logits, const at::Tensor& confidence, const at::Tensor& index,
    double threshold, int64_t exit_index, at::Tensor& out_logits, at::Tensor& out_exit) {
  Plan p = plan("compact_exits_padded", x, logits, confidence, index, threshold, exit_index, out_logits, out_exit);
  at::Tensor x_kept = at::empty(p.x.sizes(), p.x.options().memory_format(p.format)).zero_();  // at::zeros drops it
  at::Tensor index_kept = at::full({p.x.size(0)}, -1, p.index.options());
  scatter_and_compact(p.x, p.logits, p.index, exit_index, out_logits, out_exit, p.position, x_kept, index_kept);
  return {x_kept, index_kept, at::scalar_tensor(p.survivors, p.index.options())};
}

// Autograd (every device; registered here, in the one source every build compiles): the ops
// have no gradient, so with grad mode on they refuse tensors requiring grad
// (check_compact_exits_grad) rather than return outputs whose gradient is silently lost; then
// they run below autograd, as torch.library documents for non-differentiable ops.
std::tuple<at::Tensor, at::Tensor> compact_exits_autograd(const at::Tensor& x, const at::Tensor& logits,
                                                          const at::Tensor& confidence, const at::Tensor& index,
                                                          double threshold, int64_t exit_index,
                                                          at::Tensor& out_logits, at::Tensor& out_exit) {
  check_compact_exits_grad("compact_exits", x, logits, out_logits);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("eefast::compact_exits", "")
                             .typed<decltype(compact_exits_cpu)>();
  at::AutoDispatchBelowAutograd guard;
  return op.call(x, logits, confidence, index, threshold, exit_index, out_logits, out_exit);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> compact_exits_padded_autograd(
    const at::Tensor& x, const at::Tensor& logits, const at::Tensor& confidence, const at::Tensor& index,
    double threshold, int64_t exit_index, at::Tensor& out_logits, at::Tensor& out_exit) {
  check_compact_exits_grad("compact_exits_padded", x, logits, out_logits);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("eefast::compact_exits_padded", "")
                             .typed<decltype(compact_exits_padded_cpu)>();
  at::AutoDispatchBelowAutograd guard;
  return op.call(x, logits, confidence, index, threshold, exit_index, out_logits, out_exit);
}

}  // namespace

TORCH_LIBRARY_IMPL(eefast, CPU, m) {
  m.impl("compact_exits", &compact_exits_cpu);
  m.impl("compact_exits_padded", &compact_exits_padded_cpu);
}

TORCH_LIBRARY_IMPL(eefast, Autograd, m) {
  m.impl("compact_exits", &compact_exits_autograd);
  m.impl("compact_exits_padded", &compact_exits_padded_autograd);
}

}  // namespace eefast
