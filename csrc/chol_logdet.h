// chol_logdet: argument checks and output shaping shared by the CPU and CUDA kernels
// (cpu/chol_logdet_kernel.cpp, cuda/chol_logdet_kernel.cu).
#pragma once

#include <ATen/core/Tensor.h>

#include "llama_fast.h"

namespace llama_fast {

// M must be [..., d, d] square, float32/float64.
void check_chol_input(const at::Tensor& M);

// The op's outputs from the factorised flat batch L [B, d, d] (lower triangular, zeros above)
// and info, reshaped to M's leading dims; log det = 2 * sum log diag(L) (NaN where info != 0)
// unless the kernel computed it already (`logdet` [B] defined).
CholLogdetOutput chol_output(const at::Tensor& M, const at::Tensor& L, const at::Tensor& info,
                             const at::Tensor& logdet = at::Tensor());

}  // namespace llama_fast
