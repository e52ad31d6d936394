// sym_eig op family: argument checks and output shaping shared by the CPU and CUDA kernels
// (cpu/eig_kernel.cpp, cuda/eig_kernel.cu).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace llama_fast {

// (eigenvalues [..., d] ascending, eigenvectors [..., d, d] as columns, info [...] int32:
// 0 converged, 1 not converged).
using SymEigOutput = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// M must be [..., d, d], float32/float64; errors name the argument.
void check_sym_eig_input(const at::Tensor& M);

// Reshapes flat [B, d] / [B, d, d] / [B] results back to M's leading dims.
SymEigOutput unflatten_sym_eig(const at::Tensor& M, const at::Tensor& evals,
                               const at::Tensor& evecs, const at::Tensor& info);

}  // namespace llama_fast
