// sym_eig: argument checks and output shaping shared by the CPU and CUDA kernels
// (cpu/sym_eig_kernel.cpp, cuda/sym_eig_kernel.cu).
#pragma once

#include <ATen/core/Tensor.h>

#include "llama_fast.h"

namespace llama_fast {

// M must be [..., d, d], float32/float64; errors name the argument.
void check_sym_eig_input(const at::Tensor& M);

// Reshapes flat [B, d] / [B, d, d] / [B] results back to M's leading dims.
SymEigOutput unflatten_sym_eig(const at::Tensor& M, const at::Tensor& evals,
                               const at::Tensor& evecs, const at::Tensor& info);

}  // namespace llama_fast
