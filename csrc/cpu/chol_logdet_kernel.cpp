// CPU kernel of chol_logdet: batched Cholesky factorisation and log-determinant. Two paths:
//  - "portable": the right-looking Cholesky shared with the CUDA kernel (chol_logdet_common.h),
//    serially per matrix, parallel over matrices with at::parallel_for; the default up to
//    order kPortableMaxOrder, where it beats LAPACK's per-matrix calls;
//  - "lapack": LAPACK's potrf through ATen's batched linalg_cholesky_ex (blocked: faster
//    for larger matrices).
// Either way the factor comes out with zeros above the diagonal and the log-det from its
// diagonal in the same pass, without further copies of the batch (with a clone and a tril copy
// around the factorisation, large batches took far longer than torch.linalg.cholesky).
// LLAMA_FAST_CPU_CHOL=portable|lapack forces one path (the tests run both).
// Timings of both paths: benchmarks/bench_chol.py, benchmarks/RESULTS.md.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "../chol_logdet.h"
#include "../chol_logdet_common.h"
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

// The order up to which the portable path beats LAPACK's blocked one, as measured by
// benchmarks/bench_chol.py.
constexpr int64_t kPortableMaxOrder = 96;

// 2 * sum log diag(L) of one factor whose diagonal entries lie `step` apart, NaN if it failed
// (info != 0).
template <typename T>
T logdet_of_factor(const T* L, int64_t d, int64_t step, int info) {
  if (info != 0) return std::numeric_limits<T>::quiet_NaN();
  T sum = 0;
  for (int64_t j = 0; j < d; ++j) sum += std::log(L[j * step]);
  return 2 * sum;
}

// Factorises every matrix of L [B, d, d] (a private copy) in place, zeroes its upper
// triangle and writes the log-det.
template <typename T>
void portable_batch(at::Tensor& L, at::Tensor& info, at::Tensor& logdet) {
  const int64_t d = L.size(-1);
  int* info_ptr = info.data_ptr<int>();
  T* data = L.data_ptr<T>();
  T* out = logdet.data_ptr<T>();
  at::parallel_for(0, L.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      T* A = data + b * d * d;
      info_ptr[b] = cholesky_in_place(A, d);
      for (int64_t i = 0; i < d; ++i)
        for (int64_t k = i + 1; k < d; ++k) A[i * d + k] = T(0);
      out[b] = logdet_of_factor(A, d, d + 1, info_ptr[b]);
    }
  });
}

// LAPACK's factor of the batch (column-major, as potrf leaves it, zeros above the diagonal).
template <typename T>
void lapack_batch(const at::Tensor& flat, at::Tensor& L, at::Tensor& info, at::Tensor& logdet) {
  std::tie(L, info) = at::linalg_cholesky_ex(flat);
  const T* data = L.data_ptr<T>();
  const int* info_ptr = info.data_ptr<int>();
  T* out = logdet.data_ptr<T>();
  for (int64_t b = 0; b < L.size(0); ++b)
    out[b] = logdet_of_factor(data + b * L.stride(0), L.size(-1), L.stride(1) + L.stride(2), info_ptr[b]);
}

CholLogdetOutput chol_logdet_cpu(const at::Tensor& M) {
  check_chol_input(M);
  const int64_t d = M.size(-1);
  const at::Tensor flat = M.reshape({-1, d, d});
  at::Tensor logdet = at::empty({flat.size(0)}, M.options());
  at::Tensor info = at::zeros({flat.size(0)}, M.options().dtype(at::kInt));
  if (flat.numel() == 0) return chol_output(M, flat.clone(), info, logdet);
  const CpuPath path = cpu_path_from_env("LLAMA_FAST_CPU_CHOL", "portable", "lapack");
  const bool portable = path == CpuPath::kFirst || (path == CpuPath::kAuto && d <= kPortableMaxOrder);
  at::Tensor L;
  if (portable) {
    L = flat.clone(at::MemoryFormat::Contiguous);
    AT_DISPATCH_FLOATING_TYPES(L.scalar_type(), "chol_logdet_cpu",
                               [&] { portable_batch<scalar_t>(L, info, logdet); });
  } else {
    AT_DISPATCH_FLOATING_TYPES(flat.scalar_type(), "chol_logdet_cpu",
                               [&] { lapack_batch<scalar_t>(flat, L, info, logdet); });
  }
  return chol_output(M, L, info, logdet);
}

}  // namespace

TORCH_LIBRARY_IMPL(llama_fast, CPU, m) { m.impl("chol_logdet", &chol_logdet_cpu); }

}  // namespace llama_fast
