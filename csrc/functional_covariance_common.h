// Per-element arithmetic of the functional covariance, shared by the CPU and CUDA kernels so
// that the CPU tests exercise the GPU's math. For T tasks, M inputs each and K outputs, with
// per layer l the Jacobian coordinates Jh_k = U^T J_k V in the eigenbases of G (U, mu) and A
// (V, lambda), scale s, damping delta_l, and the Gram matrix R_l of the Jacobian's component
// outside span(U) (x) span(V) (zero where both bases are complete):
//   f_cov[k, j] = sum_l ( R_l[k, j] / delta_l + sum_{p,q} Jh_k,pq Jh_j,pq / (s mu_p lambda_q + delta_l) )
// which is J H^-1 J^T for H_l = s * G_l (x) A_l + delta_l * I. Each weight is the posterior
// variance along one eigenvector pair; negative round-off eigenvalues are clamped to 0 (as in
// the log-determinant), NaN stays NaN.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"
#include "kron_logdet_common.h"

namespace llama_fast {

// 1 / (s * mu * lambda + delta): the posterior variance along the eigenvector pair (p, q).
template <typename T>
LF_HOST_DEVICE T covariance_weight(T mu, T lambda, T scale, T damping) {
  return T(1) / (scale * clamp_eigenvalue(mu) * clamp_eigenvalue(lambda) + damping);
}

// One layer: the Jacobian coordinates and the eigenvalues they are weighted by.
struct CovarianceLayer {
  const void* rotated;  // [T, M, K, g, a], contiguous
  const void* evals_G;  // [T, g], contiguous
  const void* evals_A;  // [T, a], contiguous
  int64_t g;
  int64_t a;
};

// The (k, j), j <= k, of entry `pair` of the lower triangle in row-major order
// (pair = k (k + 1) / 2 + j).
LF_HOST_DEVICE void pair_of_index(int64_t pair, int64_t* k, int64_t* j) {
  // A floating-point estimate of the row, corrected by at most a step either way.
  int64_t row = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(pair) + 1.0) - 1.0) * 0.5);
  while (row * (row + 1) / 2 > pair) --row;
  while ((row + 1) * (row + 2) / 2 <= pair) ++row;
  *k = row;
  *j = pair - row * (row + 1) / 2;
}

// sum_{n < count} x[n] * y[n] * w[n]: the weighted inner product of two Jacobian rows over a
// stretch of eigenvector pairs.
template <typename Acc, typename X>
LF_HOST_DEVICE Acc weighted_dot(const X* x, const X* y, const Acc* w, int64_t count) {
  Acc total = Acc(0);
  // The reduction may be reordered (the host compiler then vectorises it, as BLAS does).
#if !defined(__CUDA_ARCH__) && defined(_OPENMP)
  _Pragma("omp simd reduction(+ : total)")
#endif
  for (int64_t n = 0; n < count; ++n)
    total += static_cast<Acc>(x[n]) * static_cast<Acc>(y[n]) * w[n];
  return total;
}

// R[k, j] / delta: the covariance of the directions where the precision is delta alone.
template <typename Acc>
LF_HOST_DEVICE Acc residual_term(Acc residual, Acc damping) {
  return residual / damping;
}

}  // namespace llama_fast
