// eefast._C: operator schemas (declared once, here) and the Python module's build information.
//
// Implementations live beside this file, one per device: cpu/*.cpp and cuda/*.cu register
// themselves with TORCH_LIBRARY_IMPL(eefast, <device>, m). Fake (meta) kernels are registered
// from Python (eefast/ops.py), so torch.library.opcheck and torch.compile see every op.

#include <torch/library.h>

#ifdef TORCH_EXTENSION_NAME
#include <torch/version.h>
#include <pybind11/pybind11.h>
#ifdef EEFAST_WITH_CUDA
#include <cuda.h>  // CUDA_VERSION of the toolkit this was compiled with
#endif
#endif

TORCH_LIBRARY(eefast, m) {
  // At one exit point of batched early-exit inference: rows whose confidence reaches the
  // threshold write their class logits and the exit number into the whole batch's outputs
  // (at their original batch positions `index`); the rest of the batch is returned compacted.
  //   x            [M, ...]  features of the samples still running (any dtype)
  //   logits       [M, K]    this exit's class logits
  //   confidence   [M]       this exit's confidence h (a probability), floating point
  //   index        [M]       int64, each row's position in the original batch
  //   out_logits   [B, K]    written at index[i] for exiting rows (same dtype as logits)
  //   out_exit     [B]       int64, written with exit_index for exiting rows
  // returns x[keep] [S, ...] and index[keep] [S], keep = !(confidence >= threshold) (NaN stays).
  m.def(
      "compact_exits(Tensor x, Tensor logits, Tensor confidence, Tensor index, float threshold, "
      "int exit_index, Tensor(a!) out_logits, Tensor(b!) out_exit) -> (Tensor, Tensor)");
  // The same without any device->host synchronisation: outputs keep the capacity M.
  // returns x_kept [M, ...] (rows >= count are zero), index_kept [M] (rows >= count are -1),
  // count [] int64 (on the device).
  m.def(
      "compact_exits_padded(Tensor x, Tensor logits, Tensor confidence, Tensor index, "
      "float threshold, int exit_index, Tensor(a!) out_logits, Tensor(b!) out_exit) "
      "-> (Tensor, Tensor, Tensor)");
}

#ifdef TORCH_EXTENSION_NAME
namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef EEFAST_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = std::to_string(CUDA_VERSION / 1000) + "." +
                         std::to_string((CUDA_VERSION % 1000) / 10);
#else
  info["cuda"] = false;
  info["cuda_version"] = pybind11::none();
#endif
#ifdef EEFAST_CUDA_ARCHS
  info["cuda_archs"] = EEFAST_CUDA_ARCHS;
#else
  info["cuda_archs"] = pybind11::none();
#endif
  info["torch_version"] = TORCH_VERSION;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "eefast compiled operators (registered under torch.ops.eefast)";
  m.def("build_info", &build_info,
        "How this extension was built: CUDA compiled in or not, CUDA version, CUDA "
        "architectures, and the torch version it was built against.");
}
#endif
