// kron_logdet_exact, kron_logdet_from_eigs, kron_logdet_weights: argument checks shared by the
// CPU and CUDA kernels of the per-layer reductions over eigenvalue pairs
// (cpu/kron_logdet_kernel.cpp, cuda/kron_logdet_kernel.cu) and by kron_scaled_normal.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace llama_fast {

// evals_A[l] [T, a_l], evals_G[l] [T, g_l], damping [T]: same dtype and device, T everywhere.
void check_kron_eigs(at::TensorList evals_A, at::TensorList evals_G, const at::Tensor& damping);

// Contiguous versions of the tensors (no copy for those already contiguous).
std::vector<at::Tensor> contiguous_all(at::TensorList xs);

}  // namespace llama_fast
