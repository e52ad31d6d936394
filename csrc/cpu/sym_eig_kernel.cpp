// CPU kernel of sym_eig: batched symmetric eigendecomposition. Two paths:
//  - "jacobi": the parallel-order Jacobi solver shared with the CUDA kernel (sym_eig_common.h),
//    its rounds run serially, parallel over matrices with at::parallel_for;
//  - "lapack": LAPACK's syevd, called directly on each matrix (the ssyevd_/dsyevd_ that torch
//    itself links), in place in the eigenvector buffer, in parallel over the batch with one
//    workspace per thread. torch.linalg.eigh runs the same syevd one matrix after another
//    (its own copies, info tensor and workspace per call); over matrices the 2 cores scale.
//    Where the symbols are absent, ATen's linalg_eigh serves.
// "auto" takes Jacobi up to d = 8, where LAPACK's fixed costs per call and per matrix dominate,
// and LAPACK above. The Jacobi path keeps the GPU's arithmetic under test on the CPU at every
// size. LLAMA_FAST_CPU_EIG=jacobi|lapack forces one path.
// Timings of both paths: benchmarks/bench_eig.py, benchmarks/RESULTS.md.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../sym_eig.h"
#include "../sym_eig_common.h"
#include "path_choice.h"

// LAPACK's divide-and-conquer symmetric eigensolver, as torch declares it (LP64). Weak: bound
// at load time from libtorch_cpu where torch exports it, null where it does not.
extern "C" {
void ssyevd_(char* jobz, char* uplo, int* n, float* a, int* lda, float* w, float* work,
             int* lwork, int* iwork, int* liwork, int* info) __attribute__((weak));
void dsyevd_(char* jobz, char* uplo, int* n, double* a, int* lda, double* w, double* work,
             int* lwork, int* iwork, int* liwork, int* info) __attribute__((weak));
}

namespace llama_fast {
namespace {

template <typename T>
T sum_squares(const T* A, int64_t d, bool off_diagonal_only) {
  T total = 0;
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < d; ++j)
      if (!off_diagonal_only || i != j) total += A[i * d + j] * A[i * d + j];
  return total;
}

// One round of the shared parallel-order Jacobi, its four phases run serially.
template <typename T>
void jacobi_round(T* A, T* V, int64_t d, int64_t n, int64_t round, JacobiRound<T> r) {
  for (int64_t k = 0; k < n / 2; ++k) jacobi_pair_rotation(A, d, round, k, n, r);
  for (int64_t k = 0; k < n / 2; ++k) {
    int64_t p, q;
    jacobi_pair(round, k, n, p, q);
    if (q >= d) continue;
    for (int64_t j = 0; j < d; ++j) jacobi_rotate_rows(A, d, p, q, r.c[k], r.s[k], j);
  }
  for (int64_t k = 0; k < n / 2; ++k) {
    int64_t p, q;
    jacobi_pair(round, k, n, p, q);
    if (q >= d) continue;
    for (int64_t i = 0; i < d; ++i) {
      jacobi_rotate_cols(A, d, p, q, r.c[k], r.s[k], i);
      jacobi_rotate_cols(V, d, p, q, r.c[k], r.s[k], i);
    }
  }
  for (int64_t k = 0; k < n / 2; ++k) jacobi_set_block(A, d, round, k, n, r);
}

// Eigendecomposition of one d x d matrix M into ascending evals and column eigenvectors,
// stored column-major (LAPACK's layout, that of every CPU result).
template <typename T>
int jacobi_eig(const T* M, int64_t d, T* evals, T* evecs) {
  T max_abs = 0;
  for (int64_t e = 0; e < d * d; ++e) max_abs = max_abs_step(max_abs, M[e]);
  if (!std::isfinite(max_abs)) {  // as LAPACK's path: NaN results and info 1
    std::fill(evals, evals + d, std::numeric_limits<T>::quiet_NaN());
    std::fill(evecs, evecs + d * d, std::numeric_limits<T>::quiet_NaN());
    return 1;
  }
  const int shift = jacobi_exponent(max_abs);
  const int64_t n = jacobi_even(d);
  std::vector<T> A(d * d), V(d * d, T(0)), rotations(2 * n);
  for (int64_t e = 0; e < d * d; ++e) A[e] = std::ldexp(M[e], -shift);
  const JacobiRound<T> r{rotations.data(), rotations.data() + n / 2, rotations.data() + n,
                         rotations.data() + 3 * n / 2};
  for (int64_t i = 0; i < d; ++i) V[i * d + i] = T(1);
  const T norm_sq = sum_squares(A.data(), d, false);
  bool converged = false;
  for (int sweep = 0; sweep <= kJacobiMaxSweeps; ++sweep) {
    converged = jacobi_converged(sum_squares(A.data(), d, true), norm_sq, d);
    if (converged || sweep == kJacobiMaxSweeps) break;
    for (int64_t round = 0; round < n - 1; ++round)
      jacobi_round(A.data(), V.data(), d, n, round, r);
  }
  for (int64_t i = 0; i < d; ++i) {
    const int64_t r = ascending_rank(A.data(), d, i);
    evals[r] = std::ldexp(A[i * d + i], shift);
    for (int64_t row = 0; row < d; ++row) evecs[r * d + row] = V[row * d + i];
  }
  return converged ? 0 : 1;
}

// Matrix b of the batch by the shared Jacobi solver, into evals[b] / evecs[b].
void jacobi_one(const at::Tensor& flat, at::Tensor& evals, at::Tensor& evecs, at::Tensor& info,
                int64_t b) {
  const int64_t d = flat.size(-1);
  AT_DISPATCH_FLOATING_TYPES(flat.scalar_type(), "sym_eig_jacobi_one", [&] {
    info.data_ptr<int>()[b] = jacobi_eig(flat.data_ptr<scalar_t>() + b * d * d, d,
                                         evals.data_ptr<scalar_t>() + b * d,
                                         evecs.data_ptr<scalar_t>() + b * d * d);
  });
}

// syevd on one column-major n x n matrix `a` (overwritten by its eigenvectors); lwork = -1
// asks for the workspace sizes instead.
inline void syevd(int n, float* a, float* w, float* work, int lwork, int* iwork, int liwork,
                  int* info) {
  char jobz = 'V', uplo = 'U';
  ssyevd_(&jobz, &uplo, &n, a, &n, w, work, &lwork, iwork, &liwork, info);
}
inline void syevd(int n, double* a, double* w, double* work, int lwork, int* iwork, int liwork,
                  int* info) {
  char jobz = 'V', uplo = 'U';
  dsyevd_(&jobz, &uplo, &n, a, &n, w, work, &lwork, iwork, &liwork, info);
}

template <typename T>
bool have_syevd() {
  if constexpr (std::is_same_v<T, float>) return ssyevd_ != nullptr;
  return dsyevd_ != nullptr;
}

// syevd's workspace sizes for n x n (its own query).
template <typename T>
std::pair<int, int> syevd_workspace(int n) {
  T work_size = 0, w = 0, a = 0;
  int iwork_size = 0, info = 0;
  syevd(n, &a, &w, &work_size, -1, &iwork_size, -1, &info);
  return {std::max<int>(1, static_cast<int>(work_size)), std::max(1, iwork_size)};
}

// syevd cost per matrix in flop-equivalents, roughly: the reduction, divide and conquer and
// back-transformation (10 d^3), plus LAPACK's fixed cost per call, which dominates small d.
int64_t syevd_flops(int64_t d) { return 10 * d * d * d + 10000; }

// Chunks below this many flops run inline: waking the thread pool costs more.
constexpr int64_t kMinParallelFlops = int64_t(1) << 16;

// Every matrix of the batch by syevd, in parallel over matrices. Symmetric input reads the
// same row- or column-major, so each matrix is copied straight into its (column-major)
// eigenvector slot and decomposed there; uplo 'U' of that buffer is M's lower triangle, the
// triangle torch.linalg.eigh reads. A failed matrix gets NaN eigenvalues (the caller retries
// it with Jacobi).
template <typename T>
void syevd_batch(const at::Tensor& flat, at::Tensor& evals, at::Tensor& evecs) {
  const int64_t d = flat.size(-1);
  const auto [lwork, liwork] = syevd_workspace<T>(static_cast<int>(d));
  const T* M = flat.data_ptr<T>();
  T* w = evals.data_ptr<T>();
  T* Q = evecs.data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, kMinParallelFlops / syevd_flops(d));
  at::parallel_for(0, flat.size(0), grain, [&](int64_t begin, int64_t end) {
    std::vector<T> work(lwork);
    std::vector<int> iwork(liwork);
    for (int64_t b = begin; b < end; ++b) {
      std::copy(M + b * d * d, M + (b + 1) * d * d, Q + b * d * d);
      int info = 0;
      syevd(static_cast<int>(d), Q + b * d * d, w + b * d, work.data(), lwork, iwork.data(),
               liwork, &info);
      if (info != 0) std::fill(w + b * d, w + (b + 1) * d, std::numeric_limits<T>::quiet_NaN());
    }
  });
}

// ATen's batched linalg_eigh (where torch exports no syevd); NaN eigenvalues where it fails.
void linalg_eigh_batch(const at::Tensor& flat, at::Tensor& evals, at::Tensor& evecs) {
  try {
    auto [w, Q] = at::linalg_eigh(flat);
    evals.copy_(w);
    evecs.copy_(Q);
  } catch (const c10::Error&) {
    for (int64_t b = 0; b < flat.size(0); ++b) {
      try {
        auto [w, Q] = at::linalg_eigh(flat[b]);
        evals[b].copy_(w);
        evecs[b].copy_(Q);
      } catch (const c10::Error&) {
        evals[b].fill_(std::numeric_limits<double>::quiet_NaN());
      }
    }
  }
}

// Rows of a contiguous [B, d] tensor holding a NaN or Inf (a plain loop: the ATen ops for
// this cost more than LAPACK itself on small batches).
std::vector<int64_t> non_finite_rows(const at::Tensor& evals) {
  std::vector<int64_t> rows;
  const int64_t d = evals.size(-1);
  AT_DISPATCH_FLOATING_TYPES(evals.scalar_type(), "sym_eig_non_finite_rows", [&] {
    const scalar_t* w = evals.data_ptr<scalar_t>();
    for (int64_t b = 0; b < evals.size(0); ++b)
      for (int64_t i = 0; i < d; ++i)
        if (!std::isfinite(w[b * d + i])) {
          rows.push_back(b);
          break;
        }
  });
  return rows;
}

// LAPACK on the whole batch, then the shared Jacobi solver for every matrix LAPACK failed on:
// syevd (MKL, float32) fails on some PSD matrices with many exact and near-zero eigenvalues
// (K-FAC factors of dead ReLU units), either with an error or, worse, silently with NaN
// eigenvalues (2 and 1 of 600 such sinusoid factors). Jacobi converges on them.
void lapack_eig(const at::Tensor& flat, at::Tensor& evals, at::Tensor& evecs, at::Tensor& info) {
  AT_DISPATCH_FLOATING_TYPES(flat.scalar_type(), "sym_eig_lapack", [&] {
    if (have_syevd<scalar_t>())
      syevd_batch<scalar_t>(flat, evals, evecs);
    else
      linalg_eigh_batch(flat, evals, evecs);
  });
  // A matrix holding a NaN or Inf anywhere has NaN eigenvalues and info 1: LAPACK reads one
  // triangle only, and would return finite eigenvalues for a non-finite entry in the other.
  int* info_ptr = info.data_ptr<int>();
  for (const int64_t b : non_finite_rows(flat.reshape({flat.size(0), -1}))) {
    evals[b].fill_(std::numeric_limits<double>::quiet_NaN());
    evecs[b].fill_(std::numeric_limits<double>::quiet_NaN());
    info_ptr[b] = 1;
  }
  for (const int64_t b : non_finite_rows(evals)) {
    if (info_ptr[b] == 0) jacobi_one(flat, evals, evecs, info, b);
  }
}

// Jacobi work per matrix in syevd_flops' units: sweeps (~6) x rounds (d) x pairs (d/2) x
// rotations (4d) x ~4 operations each. (Counted as 12 d^3, batches of small matrices stayed on
// one thread.)
int64_t jacobi_flops(int64_t d) { return 48 * d * d * d + 1; }

template <typename T>
void jacobi_batch(const at::Tensor& flat, at::Tensor& evals, at::Tensor& evecs, at::Tensor& info) {
  const int64_t d = flat.size(-1);
  const T* M = flat.data_ptr<T>();
  T* w = evals.data_ptr<T>();
  T* Q = evecs.data_ptr<T>();
  int* info_ptr = info.data_ptr<int>();
  const int64_t grain = std::max<int64_t>(1, kMinParallelFlops / jacobi_flops(d));
  at::parallel_for(0, flat.size(0), grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      info_ptr[b] = jacobi_eig(M + b * d * d, d, w + b * d, Q + b * d * d);
  });
}

// Up to this size the shared Jacobi solver beats LAPACK (syevd per matrix through ATen, with
// its fixed costs per call and per matrix); above it LAPACK's O(d^3) tridiagonal route wins.
constexpr int64_t kJacobiAutoMaxDim = 8;

bool use_jacobi(int64_t d) {
  const CpuPath path = cpu_path_from_env("LLAMA_FAST_CPU_EIG", "jacobi", "lapack");
  return path == CpuPath::kFirst || (path == CpuPath::kAuto && d <= kJacobiAutoMaxDim);
}

SymEigOutput sym_eig_cpu(const at::Tensor& M) {
  check_sym_eig_input(M);
  const int64_t d = M.size(-1);
  const at::Tensor flat = M.reshape({-1, d, d}).contiguous();
  const int64_t batch = flat.size(0);
  at::Tensor evals = at::empty({batch, d}, flat.options());
  // Eigenvectors column-major per matrix, as LAPACK (and torch.linalg.eigh) return them:
  // no transposing copy of LAPACK's result (it cost as much as a 10 x 10 solve).
  at::Tensor evecs = at::empty_strided({batch, d, d}, {d * d, 1, d}, flat.options());
  at::Tensor info = at::zeros({batch}, flat.options().dtype(at::kInt));
  if (batch > 0 && d > 0) {
    if (use_jacobi(d)) {
      AT_DISPATCH_FLOATING_TYPES(flat.scalar_type(), "sym_eig_cpu",
                                 [&] { jacobi_batch<scalar_t>(flat, evals, evecs, info); });
    } else {
      lapack_eig(flat, evals, evecs, info);
    }
  }
  return unflatten_sym_eig(M, evals, evecs, info);
}

}  // namespace

TORCH_LIBRARY_IMPL(llama_fast, CPU, m) { m.impl("sym_eig", &sym_eig_cpu); }

}  // namespace llama_fast
