// functional_covariance (the linearised predictive's covariance J H^-1 J^T): argument checks,
// output allocation and the per-call layer table shared by the CPU and CUDA kernels
// (cpu/functional_covariance_kernel.cpp, cuda/functional_covariance_kernel.cu).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace llama_fast {

// The sizes every kernel walks: D damping grid points, T tasks, M inputs per task, K outputs,
// L layers.
struct CovarianceSizes {
  int64_t grid, tasks, inputs, outputs, layers;
};

// rotated[l] [T, M, K, g_l, a_l], evals_G[l] [T, g_l], evals_A[l] [T, a_l], residual
// [L, T, M, K, K] (optional), damping [D, T, L]: one floating dtype and device, one T, M, K.
CovarianceSizes check_functional_covariance(at::TensorList rotated, at::TensorList evals_G,
                                            at::TensorList evals_A,
                                            const std::optional<at::Tensor>& residual,
                                            const at::Tensor& damping);

}  // namespace llama_fast
