// Per-matrix arithmetic of the batched symmetric Gram product (K-FAC factors), shared by the
// CPU and CUDA kernels so that the CPU tests exercise the same code the GPU runs.
//
//   out[t] = scale * xbar[t]^T xbar[t],  xbar[t] = [x[t], 1] when `ones`, else x[t]
//
// x[t] is a (rows x cols) matrix addressed through strides; the column of ones is never
// stored, it is produced on load by `xbar_at`.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace llama_fast {

// One group member of a grouped Gram launch: all T tasks of one factor of one layer.
struct GramProblem {
  const void* x;       // [tasks, rows, cols], strided
  void* out;           // [tasks, width, width], contiguous
  int64_t tasks;
  int64_t rows;
  int64_t cols;
  int64_t stride_t;
  int64_t stride_r;
  int64_t stride_c;
  double scale;
  bool ones;           // append the implicit column of ones (homogeneous bias coordinate)

  LF_HOST_DEVICE int64_t width() const { return cols + (ones ? 1 : 0); }
};

// Element (r, c) of xbar for one task: data inside the stored columns, 1 in the bias column.
template <typename T>
LF_HOST_DEVICE T xbar_at(const T* x_task, const GramProblem& p, int64_t r, int64_t c) {
  return c < p.cols ? x_task[r * p.stride_r + c * p.stride_c] : T(1);
}

// Element (r, c) of xbar, or 0 outside the matrix (zero padding of partial tiles).
template <typename T>
LF_HOST_DEVICE T xbar_padded(const T* x_task, const GramProblem& p, int64_t r, int64_t c) {
  return (r < p.rows && c < p.width()) ? xbar_at(x_task, p, r, c) : T(0);
}

LF_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Number of tiles in the upper triangle (diagonal included) of an n x n grid of tiles.
LF_HOST_DEVICE int64_t triangle_tiles(int64_t n) { return n * (n + 1) / 2; }

// The k-th upper-triangle tile in row-major order: tile row `i` <= tile column `j`.
// A short loop: tile grids are at most a few dozen wide.
LF_HOST_DEVICE void triangle_tile_coords(int64_t k, int64_t n, int64_t& i, int64_t& j) {
  i = 0;
  while (k >= n - i) {
    k -= n - i;
    ++i;
  }
  j = i + k;
}

// Register-blocked rank-K update acc[m][n] += sum_k P[k*ldp + m] * Q[k*ldq + n]:
// the inner product of RM columns with RN columns over K rows of packed (k-major) panels.
template <int RM, int RN, typename acc_t, typename T>
LF_HOST_DEVICE void outer_accumulate(acc_t (&acc)[RM][RN], const T* P, int64_t ldp, const T* Q,
                                     int64_t ldq, int64_t K) {
  for (int64_t k = 0; k < K; ++k) {
    acc_t pk[RM];
    acc_t qk[RN];
LF_UNROLL
    for (int m = 0; m < RM; ++m) pk[m] = static_cast<acc_t>(P[k * ldp + m]);
LF_UNROLL
    for (int n = 0; n < RN; ++n) qk[n] = static_cast<acc_t>(Q[k * ldq + n]);
LF_UNROLL
    for (int m = 0; m < RM; ++m) {
LF_UNROLL
      for (int n = 0; n < RN; ++n) acc[m][n] += pk[m] * qk[n];
    }
  }
}

// Writes one accumulated element of the symmetric result and its mirror image.
// Both positions get the bit-identical value, so the output is exactly symmetric.
template <typename T, typename acc_t>
LF_HOST_DEVICE void store_symmetric(T* out_task, int64_t width, int64_t p, int64_t q, acc_t value,
                                    double scale) {
  const T v = static_cast<T>(value * static_cast<acc_t>(scale));
  out_task[p * width + q] = v;
  out_task[q * width + p] = v;
}

}  // namespace llama_fast
