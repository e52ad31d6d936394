// kron_scaled_normal (Gaussian posterior sampling): argument checks and output allocation
// shared by the CPU and CUDA kernels (cpu/kron_scaled_normal_kernel.cpp,
// cuda/kron_scaled_normal_kernel.cu).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace llama_fast {

// evals_A[l] [T, a_l], evals_G[l] [T, g_l], damping [T] (same dtype and device), num_samples >= 0.
void check_scaled_normal(at::TensorList evals_A, at::TensorList evals_G, const at::Tensor& damping,
                         int64_t num_samples);

// Outputs [S, T, g_l, a_l] of every layer, uninitialised, with damping's dtype and device.
std::vector<at::Tensor> empty_scaled_normal(at::TensorList evals_A, at::TensorList evals_G,
                                            const at::Tensor& damping, int64_t num_samples);

}  // namespace llama_fast
