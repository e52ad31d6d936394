// Per-matrix arithmetic of the batched symmetric eigensolver (parallel-order cyclic Jacobi,
// Brent & Luk), shared by the CPU and CUDA kernels: the CPU runs the same rounds serially, so
// CPU tests exercise the arithmetic the GPU runs.
//
// One sweep is n-1 rounds (n = d rounded up to even); each round pairs all indices into n/2
// disjoint (p, q) pairs, so its rotations commute and can be applied at once:
//   1. every pair computes its rotation (c, s) from A[p][p], A[q][q], A[p][q];
//   2. rows p and q of A are rotated (A <- J^T A);
//   3. columns p and q of A and of V are rotated (A <- A J, V <- V J);
//   4. every pair's 2 x 2 block is set to its exact rotated value (diagonal, zeros).
// Sweeps repeat until the off-diagonal Frobenius norm falls below eps * ||A||_F.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace llama_fast {

// Sweeps before giving up. Well-separated spectra converge quadratically in 6-10 sweeps, but
// strongly rank-deficient factors (rank 3 of 64, float64) converge only linearly, about x0.55
// in off(A)^2 per sweep, once their null-space block is at the sqrt(eps) level: 47 sweeps
// there (measured). Low-rank factors should take the low-rank path (LowRankFactor) instead.
constexpr int kJacobiMaxSweeps = 100;

// Converged when off(A) <= d * eps * ||A||_F (eps: unit roundoff of T): the rounding floor of
// the rotations themselves, each of which leaves errors of order eps * ||A|| in the entries it
// touches. (A stricter sqrt(d) * eps failed to converge on rank-deficient float64 matrices,
// d = 64: 9 of 150, their noise-level null-space block never settles below it.)
template <typename T>
LF_HOST_DEVICE bool jacobi_converged(T off_sq, T norm_sq, int64_t d) {
  const T eps = sizeof(T) == 4 ? T(1.2e-7) : T(2.3e-16);
  return off_sq <= eps * eps * T(d) * T(d) * norm_sq;
}

LF_HOST_DEVICE int64_t jacobi_even(int64_t d) { return d + (d & 1); }

// max(a, b) of two magnitudes that keeps a NaN: a matrix holding one has no eigenvalues.
template <typename T>
LF_HOST_DEVICE T nan_max(T a, T b) {
  if (a != a) return a;
  if (b != b) return b;
  return a > b ? a : b;
}

// The running largest |entry| of a matrix, NaN once any entry is NaN.
template <typename T>
LF_HOST_DEVICE T max_abs_step(T running, T x) {
  return nan_max(running, static_cast<T>(fabs(x)));
}

// LAPACK-style scaling (xSYEV scales its input into range the same way): the sweeps run on
// M * 2^-e, e the binary exponent of M's largest |entry|, so the sums of squares of the
// convergence test neither underflow to 0 nor overflow to inf at any scale of M (unscaled,
// a 1e-25 float32 matrix looked converged before its first rotation). A power of two scales
// exactly: every rotation, and so every result, is the unscaled run's times 2^e.
template <typename T>
LF_HOST_DEVICE int jacobi_exponent(T max_abs) {
  int e = 0;
  if (max_abs > T(0)) frexp(max_abs, &e);
  return e;
}

// Pair k (0 <= k < n/2) of round r (0 <= r < n-1) of the round-robin tournament on n
// (even) players: player n-1 stays, the others rotate. Indices >= d are padding (skipped).
LF_HOST_DEVICE void jacobi_pair(int64_t round, int64_t k, int64_t n, int64_t& p, int64_t& q) {
  const int64_t m = n - 1;
  int64_t a = (round + k) % m;
  int64_t b = k == 0 ? m : (round + m - k) % m;
  p = a < b ? a : b;
  q = a < b ? b : a;
}

// Rotation (c, s) zeroing the off-diagonal entry of [[app, apq], [apq, aqq]]
// (Golub & Van Loan, Algorithm 8.5.1), overflow-safe for large tau; t = s / c.
template <typename T>
LF_HOST_DEVICE void jacobi_rotation(T app, T aqq, T apq, T& c, T& s, T& t) {
  if (apq == T(0)) {
    c = T(1);
    s = T(0);
    t = T(0);
    return;
  }
  const T tau = (aqq - app) / (T(2) * apq);
  t = (tau >= T(0) ? T(1) : T(-1)) / (fabs(tau) + hypot(T(1), tau));
  c = T(1) / sqrt(T(1) + t * t);
  s = t * c;
}

// (x, y) <- (c x - s y, s x + c y): entries p and q of a row or column after the rotation.
template <typename T>
LF_HOST_DEVICE void rotate_pair(T& x, T& y, T c, T s) {
  const T xp = c * x - s * y;
  const T yq = s * x + c * y;
  x = xp;
  y = yq;
}

// The rotations of one round, per pair k: (c, s), and the rotated 2 x 2 block's diagonal.
template <typename T>
struct JacobiRound {
  T* c;
  T* s;
  T* diag_p;
  T* diag_q;
};

// Phase 1 of a round for pair k: its rotation, or the identity for a padding index, and the
// diagonal its 2 x 2 block will have: app - t apq and aqq + t apq (Rutishauser's update).
// Phases 2 and 3 would leave each of these with an error of order eps * ||row p||, and such
// errors accumulate over the sweeps: float32 eigenvalues of 130 x 130 matrices were off by up
// to 1.2e-5 ||A|| that way, 20 times LAPACK's error.
template <typename T>
LF_HOST_DEVICE void jacobi_pair_rotation(const T* A, int64_t d, int64_t round, int64_t k,
                                         int64_t n, JacobiRound<T> r) {
  int64_t p, q;
  jacobi_pair(round, k, n, p, q);
  if (q >= d) {
    r.c[k] = T(1);
    r.s[k] = T(0);
    return;
  }
  const T app = A[p * d + p], aqq = A[q * d + q], apq = A[p * d + q];
  T t;
  jacobi_rotation(app, aqq, apq, r.c[k], r.s[k], t);
  r.diag_p[k] = app - t * apq;
  r.diag_q[k] = aqq + t * apq;
}

// Phase 4 for pair k: its 2 x 2 block set to the exact result of the rotation (the diagonal
// from phase 1, zeros off it), over the rounding that phases 2 and 3 left there.
template <typename T>
LF_HOST_DEVICE void jacobi_set_block(T* A, int64_t d, int64_t round, int64_t k, int64_t n,
                                     JacobiRound<T> r) {
  int64_t p, q;
  jacobi_pair(round, k, n, p, q);
  if (q >= d) return;
  A[p * d + p] = r.diag_p[k];
  A[q * d + q] = r.diag_q[k];
  A[p * d + q] = T(0);
  A[q * d + p] = T(0);
}

// Phase 2, one element: rows p and q of A at column j.
template <typename T>
LF_HOST_DEVICE void jacobi_rotate_rows(T* A, int64_t d, int64_t p, int64_t q, T c, T s, int64_t j) {
  rotate_pair(A[p * d + j], A[q * d + j], c, s);
}

// Phase 3, one element: columns p and q of X (A or V) at row i.
template <typename T>
LF_HOST_DEVICE void jacobi_rotate_cols(T* X, int64_t d, int64_t p, int64_t q, T c, T s, int64_t i) {
  rotate_pair(X[i * d + p], X[i * d + q], c, s);
}

// Position of eigenvalue i in ascending order (ties by index): a stable rank sort that
// every thread can compute for its own entry.
template <typename T>
LF_HOST_DEVICE int64_t ascending_rank(const T* A, int64_t d, int64_t i) {
  const T value = A[i * d + i];
  int64_t rank = 0;
  for (int64_t j = 0; j < d; ++j) {
    const T other = A[j * d + j];
    rank += (other < value || (other == value && j < i)) ? 1 : 0;
  }
  return rank;
}

}  // namespace llama_fast
