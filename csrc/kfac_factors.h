// kfac_factors: argument checking and output planning shared by the CPU and CUDA kernels
// (cpu/kfac_factors_kernel.cpp, cuda/kfac_factors_kernel.cu).
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <vector>

#include "kfac_factors_common.h"
#include "llama_fast.h"

namespace llama_fast {

// Outputs of one kfac_factors call and the 2L Gram problems (A then G per layer) filling them.
struct KfacPlan {
  TensorVector A;
  TensorVector G;
  std::vector<GramProblem> problems;
  at::ScalarType dtype = at::kFloat;
};

// Checks the arguments (ranks, task counts, dtypes, devices, list lengths) with errors that
// name the offending argument, allocates the outputs on the inputs' device and describes the
// Gram problems. `a` and `g` are layer lists: a[l] is [T, N_l, i_l], g[l] is [T, M_l, o_l].
KfacPlan plan_kfac_factors(at::TensorList a, at::TensorList g, const c10::List<bool>& bias,
                           c10::ArrayRef<double> a_scale, c10::ArrayRef<double> g_scale);

}  // namespace llama_fast
