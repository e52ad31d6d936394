// CPU kernel of chol_logdet: batched Cholesky factorisation and log-determinant. Two paths:
//  - "portable": the right-looking Cholesky shared with the CUDA kernel (chol_common.h),
//    serially per matrix, parallel over matrices with at::parallel_for;
//  - "lapack": LAPACK's potrf through ATen's batched linalg_cholesky_ex (default: blocked
//    LAPACK is faster than the unblocked loop on the CPU).
// LLAMA_FAST_CPU_CHOL=portable|lapack forces one path (the tests run both).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../chol.h"
#include "../chol_common.h"
#include "path_choice.h"

namespace llama_fast {
namespace {

// Factorises one matrix in place (lower triangle); returns 0 or the failing pivot + 1.
template <typename T>
int cholesky_in_place(T* A, int64_t d) {
  for (int64_t j = 0; j < d; ++j) {
    if (!chol_pivot(A, d, j)) return static_cast<int>(j + 1);
    for (int64_t i = j + 1; i < d; ++i) chol_scale(A, d, j, i);
    for (int64_t i = j + 1; i < d; ++i)
      for (int64_t k = j + 1; k <= i; ++k) chol_update(A, d, j, i, k);
  }
  return 0;
}

template <typename T>
void portable_batch(at::Tensor& L, at::Tensor& info) {
  const int64_t d = L.size(-1);
  int* info_ptr = info.data_ptr<int>();
  T* data = L.data_ptr<T>();
  at::parallel_for(0, L.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) info_ptr[b] = cholesky_in_place(data + b * d * d, d);
  });
}

CholOutput chol_logdet_cpu(const at::Tensor& M) {
  check_chol_input(M);
  const int64_t d = M.size(-1);
  at::Tensor L = M.reshape({-1, d, d}).contiguous().clone();
  at::Tensor info = at::zeros({L.size(0)}, L.options().dtype(at::kInt));
  if (L.numel() > 0) {
    if (cpu_path_from_env("LLAMA_FAST_CPU_CHOL", "portable", "lapack") == CpuPath::kFirst) {
      AT_DISPATCH_FLOATING_TYPES(L.scalar_type(), "chol_logdet_cpu",
                                 [&] { portable_batch<scalar_t>(L, info); });
    } else {
      std::tie(L, info) = at::linalg_cholesky_ex(L);
    }
  }
  return chol_output(M, L, info);
}

}  // namespace

TORCH_LIBRARY_IMPL(llama_fast, CPU, m) { m.impl("chol_logdet", &chol_logdet_cpu); }

}  // namespace llama_fast
