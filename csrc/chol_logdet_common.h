// Per-element arithmetic of the batched Cholesky factorisation (right-looking, unblocked),
// shared by the CPU and CUDA kernels. Step j of a d x d row-major matrix A (lower triangle):
//   1. pivot:  A[j][j] <- sqrt(A[j][j])            (fails unless A[j][j] > 0)
//   2. scale:  A[i][j] <- A[i][j] / A[j][j]        for i > j          (independent)
//   3. update: A[i][k] <- A[i][k] - A[i][j] A[k][j] for j < k <= i    (independent)
// After d steps the lower triangle holds L with A = L L^T.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace llama_fast {

template <typename T>
LF_HOST_DEVICE bool chol_pivot(T* A, int64_t d, int64_t j) {
  const T v = A[j * d + j];
  if (!(v > T(0))) return false;  // also catches NaN
  A[j * d + j] = sqrt(v);
  return true;
}

template <typename T>
LF_HOST_DEVICE void chol_scale(T* A, int64_t d, int64_t j, int64_t i) {
  A[i * d + j] /= A[j * d + j];
}

template <typename T>
LF_HOST_DEVICE void chol_update(T* A, int64_t d, int64_t j, int64_t i, int64_t k) {
  A[i * d + k] -= A[i * d + j] * A[k * d + j];
}

}  // namespace llama_fast
