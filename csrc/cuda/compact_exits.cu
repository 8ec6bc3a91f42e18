// CUDA implementation of eefast::compact_exits and eefast::compact_exits_padded.
//
// Three launches on the current stream:
//   1. decide_rows:  one block per row: keep[i] = !(h[i] >= T); exiting rows write their logits
//                    and the exit number into the batch outputs at index[i].
//   2. cub::DeviceScan::InclusiveSum(keep) -> position (row i survives to position[i] - 1;
//                    position[M-1] is the survivor count).
//   3. gather_rows:  one block per row: surviving rows copy their bytes (16/8/4/1-byte vectors)
//                    to their position in the compacted output.
// compact_exits reads the survivor count to the host once (the only synchronisation) to size
// its outputs; compact_exits_padded keeps capacity M and returns the count on the device.
// The host checks (compact_exits.h: shapes, dtypes, outputs sharing memory with any other
// argument, tensors requiring grad) raise before the first launch. An index value out of
// [0, B), any row's, is found on the device without a synchronisation: decide_rows fails a
// device-side assertion (CUDA_KERNEL_ASSERT), in both ops. As with any device-side assertion,
// the CUDA context is then unusable (every later CUDA call raises), so whatever other blocks
// of that launch wrote can no longer be read.
// Only c10/cuda headers are used (ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cub/device/device_scan.cuh>

#include <cstdint>
#include <limits>
#include <tuple>

#include "../compact_exits.h"

namespace eefast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;  // rows are strided over at most this many blocks

template <typename scalar_t, typename conf_t>
__global__ void decide_rows_kernel(const conf_t* __restrict__ confidence,   // [M]
                                   const int64_t* __restrict__ index,       // [M]
                                   const scalar_t* __restrict__ logits,     // [M, K]
                                   scalar_t* __restrict__ out_logits,       // [B, K]
                                   int64_t* __restrict__ out_exit,          // [B]
                                   int32_t* __restrict__ keep,              // [M]
                                   int64_t rows, int64_t classes, int64_t batch, conf_t threshold,
                                   int64_t exit_index) {
  using opmath_t = at::opmath_type<conf_t>;
  for (int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
    // Every row's index is checked, the surviving rows' too (gather_rows copies them to index_kept).
    const int64_t b = index[i];
    CUDA_KERNEL_ASSERT(b >= 0 && b < batch && "compact_exits: index out of range of out_logits");
    const bool exits = static_cast<opmath_t>(confidence[i]) >= static_cast<opmath_t>(threshold);
    if (threadIdx.x == 0) keep[i] = exits ? 0 : 1;
    if (!exits) continue;
    for (int64_t k = threadIdx.x; k < classes; k += blockDim.x) out_logits[b * classes + k] = logits[i * classes + k];
    if (threadIdx.x == 0) out_exit[b] = exit_index;
  }
}

// Copies surviving row i (row_vecs elements of vec_t) to row position[i] - 1 of x_kept.
template <typename vec_t>
__global__ void gather_rows_kernel(const vec_t* __restrict__ x,            // [M, row_vecs]
                                   const int64_t* __restrict__ index,      // [M]
                                   const int32_t* __restrict__ keep,       // [M]
                                   const int32_t* __restrict__ position,   // [M] inclusive sum of keep
                                   vec_t* __restrict__ x_kept,             // [capacity, row_vecs]
                                   int64_t* __restrict__ index_kept,       // [capacity]
                                   int64_t rows, int64_t row_vecs) {
  for (int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
    if (!keep[i]) continue;
    const int64_t dst = position[i] - 1;
    if (threadIdx.x == 0) index_kept[dst] = index[i];
    const vec_t* src_row = x + i * row_vecs;
    vec_t* dst_row = x_kept + dst * row_vecs;
    for (int64_t v = threadIdx.x; v < row_vecs; v += blockDim.x) dst_row[v] = src_row[v];
  }
}

__global__ void count_kernel(const int32_t* __restrict__ position, int64_t rows, int64_t* __restrict__ count) {
  *count = rows == 0 ? 0 : position[rows - 1];
}

int64_t blocks_for(int64_t rows) { return std::max<int64_t>(1, std::min<int64_t>(rows, kMaxBlocks)); }

// The widest vector that divides the row size and both base addresses.
template <typename Fn>
void with_row_vector(const void* src, const void* dst, int64_t row_bytes, Fn&& fn) {
  const auto aligned = [&](int64_t width) {
    return row_bytes % width == 0 && reinterpret_cast<uintptr_t>(src) % width == 0 &&
           reinterpret_cast<uintptr_t>(dst) % width == 0;
  };
  if (aligned(16)) return fn(uint4{});
  if (aligned(8)) return fn(uint2{});
  if (aligned(4)) return fn(uint32_t{});
  return fn(uint8_t{});
}

// Launches steps 1 and 2; returns (keep, position), both [M] int32.
std::pair<at::Tensor, at::Tensor> decide_and_scan(const at::Tensor& logits, const at::Tensor& confidence,
                                                  const at::Tensor& index, double threshold, int64_t exit_index,
                                                  at::Tensor& out_logits, at::Tensor& out_exit) {
  const int64_t rows = confidence.size(0);
  TORCH_CHECK_VALUE(rows <= std::numeric_limits<int32_t>::max(), "compact_exits: expected at most 2^31 - 1 rows, got ",
                    rows);
  auto int_options = index.options().dtype(at::kInt);
  at::Tensor keep = at::empty({rows}, int_options);
  at::Tensor position = at::empty({rows}, int_options);
  if (rows == 0) return {keep, position};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const int64_t classes = logits.size(1);
  const int threads = static_cast<int>(std::min<int64_t>(kThreads, std::max<int64_t>(32, (classes + 31) / 32 * 32)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "compact_exits_cuda", [&] {
    using logit_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, confidence.scalar_type(), "compact_exits_cuda", [&] {
      decide_rows_kernel<logit_t, scalar_t><<<blocks_for(rows), threads, 0, stream>>>(
          confidence.const_data_ptr<scalar_t>(), index.const_data_ptr<int64_t>(), logits.const_data_ptr<logit_t>(),
          out_logits.data_ptr<logit_t>(), out_exit.data_ptr<int64_t>(), keep.data_ptr<int32_t>(), rows, classes,
          out_logits.size(0), static_cast<scalar_t>(threshold), exit_index);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });

  size_t temp_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceScan::InclusiveSum(nullptr, temp_bytes, keep.const_data_ptr<int32_t>(),
                                               position.data_ptr<int32_t>(), static_cast<int>(rows), stream));
  at::Tensor temp = at::empty({static_cast<int64_t>(temp_bytes)}, index.options().dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceScan::InclusiveSum(temp.data_ptr(), temp_bytes, keep.const_data_ptr<int32_t>(),
                                               position.data_ptr<int32_t>(), static_cast<int>(rows), stream));
  return {keep, position};
}

void gather_rows(const at::Tensor& x, const at::Tensor& index, const at::Tensor& keep, const at::Tensor& position,
                 at::Tensor& x_kept, at::Tensor& index_kept) {
  const int64_t rows = x.size(0);
  if (rows == 0) return;
  const int64_t row_bytes = static_cast<int64_t>(x.nbytes()) / rows;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_row_vector(x.const_data_ptr(), x_kept.data_ptr(), row_bytes, [&](auto vec) {
    using vec_t = decltype(vec);
    const int64_t row_vecs = row_bytes / static_cast<int64_t>(sizeof(vec_t));
    const int threads = static_cast<int>(std::min<int64_t>(kThreads, std::max<int64_t>(32, (row_vecs + 31) / 32 * 32)));
    gather_rows_kernel<vec_t><<<blocks_for(rows), threads, 0, stream>>>(
        static_cast<const vec_t*>(x.const_data_ptr()), index.const_data_ptr<int64_t>(),
        keep.const_data_ptr<int32_t>(), position.const_data_ptr<int32_t>(), static_cast<vec_t*>(x_kept.data_ptr()),
        index_kept.data_ptr<int64_t>(), rows, row_vecs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor survivor_count(const at::Tensor& position) {
  at::Tensor count = at::empty({}, position.options().dtype(at::kLong));
  count_kernel<<<1, 1, 0, c10::cuda::getCurrentCUDAStream()>>>(position.const_data_ptr<int32_t>(), position.size(0),
                                                               count.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return count;
}

// Checks the arguments, writes the exiting rows and scans the survivors (launches 1 and 2).
struct Decided {
  at::MemoryFormat format;
  at::Tensor x;         // [M, ...] in `format`
  at::Tensor index;     // [M]
  at::Tensor keep;      // [M] int32
  at::Tensor position;  // [M] int32, inclusive sum of keep
};

Decided decide(const char* op, const at::Tensor& x_in, const at::Tensor& logits, const at::Tensor& confidence,
               const at::Tensor& index_in, double threshold, int64_t exit_index, at::Tensor& out_logits,
               at::Tensor& out_exit) {
  check_compact_exits_args(op, x_in, logits, confidence, index_in, exit_index, out_logits, out_exit);
  const auto format = compacted_memory_format(x_in);
  at::Tensor index = index_in.contiguous();
  auto [keep, position] = decide_and_scan(logits.contiguous(), confidence.contiguous(), index, threshold, exit_index,
                                          out_logits, out_exit);
  return {format, x_in.contiguous(format), index, keep, position};
}

std::tuple<at::Tensor, at::Tensor> compact_exits_cuda(const at::Tensor& x, const at::Tensor& logits,
                                                      const at::Tensor& confidence, const at::Tensor& index,
                                                      double threshold, int64_t exit_index, at::Tensor& out_logits,
                                                      at::Tensor& out_exit) {
  c10::cuda::CUDAGuard guard(x.device());
  Decided d = decide("compact_exits", x, logits, confidence, index, threshold, exit_index, out_logits, out_exit);
  // The one device->host synchronisation: the survivor count sizes the outputs.
  const int64_t survivors = survivor_count(d.position).item<int64_t>();
  auto kept_shape = d.x.sizes().vec();
  kept_shape[0] = survivors;
  at::Tensor x_kept = at::empty(kept_shape, d.x.options().memory_format(d.format));
  at::Tensor index_kept = at::empty({survivors}, d.index.options());
  gather_rows(d.x, d.index, d.keep, d.position, x_kept, index_kept);
  return {x_kept, index_kept};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> compact_exits_padded_cuda(
    const at::Tensor& x, const at::Tensor& logits, const at::Tensor& confidence, const at::Tensor& index,
    double threshold, int64_t exit_index, at::Tensor& out_logits, at::Tensor& out_exit) {
  c10::cuda::CUDAGuard guard(x.device());
  Decided d = decide("compact_exits_padded", x, logits, confidence, index, threshold, exit_index, out_logits,
                     out_exit);
  at::Tensor x_kept = at::empty(d.x.sizes(), d.x.options().memory_format(d.format)).zero_();  // at::zeros drops it
  at::Tensor index_kept = at::full({d.x.size(0)}, -1, d.index.options());
  gather_rows(d.x, d.index, d.keep, d.position, x_kept, index_kept);
  return {x_kept, index_kept, survivor_count(d.position)};
}

}  // namespace

TORCH_LIBRARY_IMPL(eefast, CUDA, m) {
  m.impl("compact_exits", &compact_exits_cuda);
  m.impl("compact_exits_padded", &compact_exits_padded_cuda);
}

}  // namespace eefast
