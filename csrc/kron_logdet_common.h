// Per-element arithmetic of the damped Kronecker log-determinant, shared by the CPU and CUDA
// kernels. Per layer, with eigenvalues mu (of G) and lambda (of A), scale s and damping delta:
//   log det(s * G (x) A + delta I) = sum_{p,q} log(s * mu_p * lambda_q + delta)
// and its gradient weights (DESIGN.md section 1), without eigenvector derivatives:
//   w_A[q] = sum_p s mu_p / (s mu_p lambda_q + delta),  w_G[p] = sum_q s lambda_q / (...),
//   d/d delta = sum_{p,q} 1 / (s mu_p lambda_q + delta).
// Negative round-off eigenvalues are clamped to 0.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace llama_fast {

template <typename T>
LF_HOST_DEVICE T clamp_eigenvalue(T x) {
  return x > T(0) ? x : (x == x ? T(0) : x);  // NaN stays NaN: no plausible log-det from it
}

// The two reductions over all (p, q) pairs of one layer of one task.
enum class KronReduction : int { kLog = 0, kInverse = 1 };

template <typename T>
LF_HOST_DEVICE T kron_term(KronReduction what, T mu, T lambda, T scale, T damping) {
  const T h = scale * clamp_eigenvalue(mu) * clamp_eigenvalue(lambda) + damping;
  return what == KronReduction::kLog ? log(h) : T(1) / h;
}

// w for one eigenvalue `x` of one factor against all n eigenvalues `others` of the other:
// sum_k s * others_k / (s * others_k * x + delta).
template <typename T, typename E>
LF_HOST_DEVICE T kron_weight(T x, const E* others, int64_t n, T scale, T damping) {
  T total = T(0);
  const T xc = clamp_eigenvalue(x);
  for (int64_t k = 0; k < n; ++k) {
    const T o = scale * clamp_eigenvalue(static_cast<T>(others[k]));
    total += o / (o * xc + damping);
  }
  return total;
}

}  // namespace llama_fast
