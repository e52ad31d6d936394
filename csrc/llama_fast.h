// Public C++ API of llama_fast: typed calls of the registered ops through the dispatcher, so
// that C++ users get the CPU or CUDA kernel from the inputs' device exactly as Python does.
// Link libllama_fast (CMakeLists.txt) with --no-as-needed: the ops register at load time.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/Tensor.h>

#include <tuple>
#include <vector>

namespace llama_fast {

// K-FAC factors of a list of layers for all tasks at once:
// A[l] = a_scale[l] * abar^T abar (abar = [a[l], 1] if bias[l]), G[l] = g_scale[l] * g^T g.
inline std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> kfac_factors(
    at::TensorList a, at::TensorList g, const c10::List<bool>& bias,
    c10::ArrayRef<double> a_scale, c10::ArrayRef<double> g_scale) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("llama_fast::kfac_factors", "")
          .typed<std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>>(
              at::TensorList, at::TensorList, const c10::List<bool>&, c10::ArrayRef<double>,
              c10::ArrayRef<double>)>();
  return op.call(a, g, bias, a_scale, g_scale);
}

}  // namespace llama_fast
